"""The Triton kernels (lightning_quant/functional/triton_kernels.py) on CPU tensors, in Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before triton is first imported (torch._dynamo imports it, so the conftest's
imports already have): the one test that runs in the suite's process starts this file again in a fresh pytest
process with the variable set, where the CUDA code path runs in numpy on this machine. The forwards and PACT's and
DoReFa's backwards must give the reference's bits; DSQ's backward (the C kernels' tanh) agrees to float32 rounding.
Small tensors: the interpreter is slow. Skipped where triton is not installed (dev extras, Linux only).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_same, dorefa_input, pact_input

from lightning_quant.functional.dorefa import dorefa_backward_reference, dorefa_forward_reference
from lightning_quant.functional.dsq import dsq_backward_reference, dsq_forward_reference
from lightning_quant.functional.lsq import (
    lsq_backward_reference,
    lsq_forward_reference,
    lsq_plus_backward_reference,
    lsq_plus_forward_reference,
)
from lightning_quant.functional.pact import pact_backward_reference, pact_forward_reference

pytest.importorskip("triton")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
if INTERPRETED:
    from lightning_quant.functional import triton_kernels as tk

interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 process started below")


@pytest.mark.skipif(INTERPRETED, reason="this is that process")
def test_interpreter_cases_pass_in_a_fresh_process() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", __file__]
    command += ["-W", "ignore::RuntimeWarning"]  # numpy's NaN warnings from the interpreter
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


@interpreted
def test_the_kernels_run_in_the_interpreter() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(tk._pact_forward_kernel, InterpretedFunction)


@interpreted
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pact_is_bit_identical_to_the_reference(bits: int) -> None:
    alpha = [0.7, 2.5, 6.0, 10.0][bits % 4]
    x = pact_input(3001, alpha, bits, torch.float32, seed=bits)  # not a multiple of the block: the tail is masked
    a = torch.tensor([alpha])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(bits))
    grad[:3] = torch.tensor([float("inf"), float("nan"), -0.0])
    q, code = tk.pact_forward(x, a, 2**bits - 1, 0.0)
    q_ref, code_ref = pact_forward_reference(x, a, 2**bits - 1, 0.0)
    assert_same(q, q_ref)
    assert torch.equal(code, code_ref)
    for got, want in zip(tk.pact_backward(grad, code), pact_backward_reference(grad, code_ref)):
        assert_same(got, want)


@interpreted
def test_pact_alpha_floor_and_other_dtypes() -> None:
    x = pact_input(2000, 0.5, 4, torch.float32, seed=9)
    a = torch.tensor([0.01])  # below the floor: the forward clips at 0.3 (rounded to float32)
    assert_same(tk.pact_forward(x, a, 15, 0.3)[0], pact_forward_reference(x, a, 15, 0.3)[0])
    x16 = x.to(torch.bfloat16)  # not the kernels' dtype: the reference runs
    assert_same(tk.pact_forward(x16, a, 15, 0.3)[0], pact_forward_reference(x16, a, 15, 0.3)[0])


@interpreted
@pytest.mark.parametrize("bits", [1, 4])
def test_dorefa_is_bit_identical_to_the_reference(bits: int) -> None:
    w, grad = dorefa_input((40, 30, 3), seed=bits)  # a tie at the largest magnitude and a zero
    t = torch.tanh(w)
    levels = 2**bits - 1
    out, m, d = tk.dorefa_forward(t, levels)
    for got, want in zip((out, m, d), dorefa_forward_reference(t, levels)):
        assert_same(got, want)
    assert_same(tk.dorefa_backward(grad, t, m, d, levels), dorefa_backward_reference(grad, t, m, d, levels))


@interpreted
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize(("bits", "alpha"), [(2, 0.2), (4, 0.95), (8, 0.5)])  # 0.95: the small-c series
def test_dsq_forward_is_bit_identical_and_gradients_agree(bits: int, alpha: float, activation: int) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3001, generator=g) * 2 + 0.5
    lo, up, al = torch.tensor(0.25), torch.tensor(3.0), torch.tensor(alpha)
    delta = 2.75 / (2**bits - 1)
    special = [0.25, 3.0, 0.25 + delta, 0.25 + 0.5 * delta, -1.0, 6.0, 7.0, float("nan"), float("inf"), -float("inf")]
    x[: len(special)] = torch.tensor(special)
    grad = torch.randn(x.shape, generator=g)
    args = (bits, 1e-8, activation)
    assert_same(tk.dsq_forward(x, lo, up, al, *args), dsq_forward_reference(x, lo, up, al, *args))
    got = tk.dsq_backward(grad, x, lo, up, al, *args, True, True)
    want = dsq_backward_reference(grad, x, lo, up, al, *args, True, True)
    assert torch.equal(got[0] == 0, want[0] == 0)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@interpreted
@pytest.mark.parametrize("step_shape", [(1,), (6, 1, 1, 1)])
def test_lsq_is_bit_identical_to_the_reference(step_shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(step_shape))
    w = torch.randn(6, 5, 7, 11, generator=g) * 0.3  # 385 weights per channel: one partial block each
    w.view(-1)[:3] = torch.tensor([float("nan"), 0.0, -0.0])
    step = torch.rand(step_shape, generator=g) * 0.05 + 0.02
    step.view(-1)[0] = 1e-9  # below the floor: the forward uses min_step
    w.view(-1)[5:7] = torch.tensor([1.0, -1.0])  # far outside the grid: saturated at Qp and -Qn
    grad = torch.randn(w.shape, generator=g)
    args = (8, 7, 0.01, 1e-6)
    out, v = tk.lsq_forward(w, step, *args)
    out_ref, v_ref = lsq_forward_reference(w, step, *args)
    assert_same(out, out_ref)
    assert_same(v, v_ref)
    for got, want in zip(
        tk.lsq_backward(grad, v, step, 8, 7, 0.01), lsq_backward_reference(grad, v_ref, step, 8, 7, 0.01)
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)  # float64 sums in another order, then rounded


@interpreted
@pytest.mark.parametrize(("lo", "up", "min_width"), [(1.0, 1.0, 1e-8), (0.5, 0.2, 1e-3)])  # collapsed, inverted
def test_dsq_forward_guards_a_collapsed_range_as_the_reference(lo: float, up: float, min_width: float) -> None:
    x = torch.linspace(-1, 2, 2049)
    args = (torch.tensor(lo), torch.tensor(up), torch.tensor(0.3), 4, min_width, 0)
    assert_same(tk.dsq_forward(x, *args), dsq_forward_reference(x, *args))


@interpreted
@pytest.mark.parametrize(("step", "offset"), [(0.05, -0.61), (0.05, 0.3), (1e-9, -0.2)])  # z inside, z clamped, floor
def test_lsq_plus_is_bit_identical_to_the_reference(step: float, offset: float) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2500, generator=g) * 0.4
    x[:4] = torch.tensor([float("nan"), 0.0, -5.0, 5.0])
    grad = torch.randn(x.shape, generator=g)
    s, b = torch.tensor([step]), torch.tensor([offset])
    args = (15, 0.01, 1e-3)
    out, q = tk.lsq_plus_forward(x, s, b, *args)
    out_ref, q_ref = lsq_plus_forward_reference(x, s, b, *args)
    assert_same(out, out_ref)
    assert_same(q, q_ref)
    got, want = tk.lsq_plus_backward(grad, q, s, b, *args), lsq_plus_backward_reference(grad, q_ref, s, b, *args)
    assert_same(got[0], want[0])
    for a, w in zip(got[1:], want[1:]):  # float64 sums in another order, then rounded to float32
        torch.testing.assert_close(a, w, rtol=1e-6, atol=0)
