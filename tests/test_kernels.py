"""The quantizers' custom ops (lightning_quant::*): the CPU kernels (C where they apply) against the torch reference,
the registrations the dispatcher and the tracers need (schema, fake, autograd: ``torch.library.opcheck``), and
``torch.compile(fullgraph=True)`` / ``torch.export`` on a small model per quantizer. The Triton kernels are tested in
tests/test_triton.py (interpreter). No timing assertions (benchmarks/speed.py measures speed).

"The same bits" (``assert_same``): same dtype, shape and NaN positions, every other element bit-identical (+0.0 and
-0.0 count as equal).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from helpers import assert_same, dorefa_input, pact_input, saved_bytes
from torch import Tensor, nn

from lightning_quant.functional import native
from lightning_quant.functional.dorefa import (
    dorefa_backward,
    dorefa_backward_reference,
    dorefa_forward,
    dorefa_forward_reference,
)
from lightning_quant.functional.dsq import (
    dsq_backward,
    dsq_backward_reference,
    dsq_forward,
    dsq_forward_reference,
    dsq_quantize,
)
from lightning_quant.functional.lsq import lsq_backward, lsq_forward, lsq_plus_backward, lsq_plus_forward
from lightning_quant.functional.pact import (
    pact_backward,
    pact_backward_reference,
    pact_forward,
    pact_forward_reference,
    pact_quantize,
)
from lightning_quant.quantizers import (
    DoReFaWeight,
    DSQActivation,
    DSQWeight,
    LSQWeight,
    PACTActivation,
    QuantNoiseWeight,
)
from lightning_quant.quantizers.inputs import LSQPlusInput

HAVE_COMPILER = native._compiler() is not None


@pytest.fixture
def lib():
    if not HAVE_COMPILER:
        pytest.skip("no C compiler on this machine: the native kernels cannot be built")
    library = native.library()
    assert library is not None, native.build_error()  # with a compiler present, a failed build is a bug
    return library


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ PACT


@pytest.mark.parametrize("n", [4099, 300_007])  # under and over the size where the C kernels go parallel
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pact_cpu_kernels_equal_the_reference(lib, bits: int, n: int) -> None:
    alpha = [0.7, 2.5, 6.0, 10.0][bits % 4]
    x = pact_input(n, alpha, bits, torch.float32, seed=bits)
    a = torch.tensor([alpha])
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(bits))
    for threads in (1, 2):
        torch.set_num_threads(threads)
        q, code = pact_forward(x, a, 2**bits - 1, 0.0)
        q_ref, code_ref = pact_forward_reference(x, a, 2**bits - 1, 0.0)
        assert_same(q, q_ref)
        assert torch.equal(code, code_ref)
        for got, want in zip(pact_backward(grad, code), pact_backward_reference(grad, code_ref)):
            assert_same(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_pact_other_dtypes_and_non_contiguous_inputs_take_the_reference(dtype: torch.dtype) -> None:
    x = pact_input(999, 2.0, 4, dtype, seed=3).view(27, 37).t()
    a = torch.tensor([2.0])
    assert_same(pact_forward(x, a, 15, 0.0)[0], pact_forward_reference(x, a, 15, 0.0)[0])
    assert_same(pact_quantize(x, a, 4), pact_quantize(x.contiguous(), a, 4))


def test_pact_gradients_through_the_op_are_the_papers(lib) -> None:
    # Hand-computable: alpha 2, 2 bits (step 2/3). Below 0, inside, at alpha, above alpha, NaN.
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0, float("nan")], requires_grad=True)
    a = torch.tensor([2.0], requires_grad=True)
    q = pact_quantize(x, a, 2)
    q.backward(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    assert torch.equal(q[:5].detach(), torch.tensor([0.0, 0.0, 2 / 3, 2.0, 2.0]))
    assert torch.equal(x.grad, torch.tensor([0.0, 2.0, 3.0, 0.0, 0.0, 0.0]))
    assert torch.equal(a.grad, torch.tensor([9.0]))  # 4 + 5: the points at and above the clip


def test_pact_saves_one_byte_per_element(lib) -> None:
    x = torch.randn(4, 16, 32, 32, requires_grad=True)
    m = PACTActivation(4, alpha_init=1.0)
    assert saved_bytes(lambda: m(x)) <= x.numel() + 64


# ------------------------------------------------------------------------------------------------ DoReFa


@pytest.mark.parametrize("shape", [(7, 5), (64, 32, 3, 3), (300, 1000)])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dorefa_cpu_kernels_equal_the_reference(lib, bits: int, shape: tuple[int, ...]) -> None:
    w, grad = dorefa_input(shape, seed=bits)
    t = torch.tanh(w)
    levels = 2**bits - 1
    out, m, d = dorefa_forward(t, levels)
    for got, want in zip((out, m, d), dorefa_forward_reference(t, levels)):
        assert_same(got, want)
    assert_same(dorefa_backward(grad, t, m, d, levels), dorefa_backward_reference(grad, t, m, d, levels))


def test_dorefa_zero_and_nan_weights(lib) -> None:
    zero = dorefa_forward(torch.zeros(10), 3)[0]
    assert torch.equal(zero, (2 * (torch.tensor(2.0) / 3) - 1).expand(10))  # the level of round(0.5 * 3) = 2
    nan = torch.tensor([0.5, float("nan"), -0.2])
    assert torch.isnan(dorefa_forward(nan, 3)[0]).all()  # max|t| is NaN: every output is


# ------------------------------------------------------------------------------------------------ DSQ


def dsq_case(bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Values below, inside and above [0.25, 3], bin edges and centres, NaN and inf."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(50_021, generator=g) * 2 + 0.5
    lo, up = 0.25, 3.0
    delta = (up - lo) / (2**bits - 1)
    special = [lo, up, lo + delta, lo + 0.5 * delta, -1.0, 6.0, 7.0, float("nan"), float("inf"), -float("inf")]
    x[: len(special)] = torch.tensor(special)
    return x, torch.tensor(lo), torch.tensor(up), torch.randn(x.shape, generator=g)


def assert_close_grad(got: Tensor, want: Tensor) -> None:
    """Within float32 rounding of the largest entry (the C backward has its own vectorized tanh)."""
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()) + 1e-30)


@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize(("bits", "alpha"), [(1, 0.3), (2, 0.2), (4, 0.95), (8, 0.5)])  # 0.95: the small-c series
def test_dsq_cpu_kernels_forward_exact_backward_to_rounding(lib, bits: int, alpha: float, activation: int) -> None:
    x, lo, up, grad = dsq_case(bits)
    al = torch.tensor(alpha)
    args = (bits, 1e-8, activation)
    assert_same(dsq_forward(x, lo, up, al, *args), dsq_forward_reference(x, lo, up, al, *args))
    got = dsq_backward(grad, x, lo, up, al, *args, True, True)
    want = dsq_backward_reference(grad, x, lo, up, al, *args, True, True)
    assert torch.equal(got[0] == 0, want[0] == 0)  # zero exactly where the reference is (outside, NaN, blocked)
    for g, w in zip(got, want):
        assert_close_grad(g, w)


def test_dsq_activation_is_folded_in(lib) -> None:
    x, lo, up, grad = dsq_case(4)
    for name, act in (("relu", torch.relu), ("relu6", lambda v: torch.clamp(v, 0, 6))):
        folded, apart = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out = dsq_quantize(folded, lo, up, 0.3, 4, activation=name)
        out.backward(grad)
        ref = dsq_quantize(act(apart), lo, up, 0.3, 4)
        ref.backward(grad)
        assert_same(out, ref)
        assert_close_grad(folded.grad, apart.grad)


def test_dsq_float64_reference_matches_the_float32_kernels(lib) -> None:
    # The reference runs in float64 too: the float32 kernels agree with it to float32 rounding.
    x, lo, up, grad = dsq_case(4)
    al = torch.tensor(0.3)
    want = dsq_backward_reference(grad.double(), x.double(), lo.double(), up.double(), al.double(), 4, 1e-8, 0, 1, 1)
    got = dsq_backward(grad, x, lo, up, al, 4, 1e-8, 0, True, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))


def test_dsq_activation_argument_is_checked() -> None:
    with pytest.raises(ValueError, match=r"`activation` must be None, 'relu' or 'relu6', got 'gelu'"):
        dsq_quantize(torch.randn(4), 0.0, 1.0, 0.5, 4, activation="gelu")


# ------------------------------------------------------------------------------------------------ registrations


def _opcheck_cases() -> list[tuple[object, tuple]]:
    x = torch.randn(3, 5) * 2
    lo, up, al = torch.tensor(-1.0), torch.tensor(1.5), torch.tensor(0.4, requires_grad=True)
    code = pact_forward(x, torch.tensor([1.0]), 15, 0.0)[1]
    t = torch.tanh(torch.randn(4, 3))
    _, m, d = dorefa_forward(t, 7)
    return [
        (pact_forward, (x.clone().requires_grad_(True), torch.tensor([1.0], requires_grad=True), 15, 0.0)),
        (pact_backward, (torch.randn(3, 5), code)),
        (dorefa_forward, (t.clone().requires_grad_(True), 7)),
        (dorefa_backward, (torch.randn(4, 3), t, m, d, 7)),
        (dsq_forward, (x.clone().requires_grad_(True), lo, up.clone().requires_grad_(True), al, 4, 1e-8, 1)),
        (dsq_backward, (torch.randn(3, 5), x, lo, up, al.detach(), 4, 1e-8, 0, True, True)),
        (
            lsq_forward,
            (x.clone().requires_grad_(True), torch.tensor([[0.3], [0.2], [0.5]], requires_grad=True), 8, 7, 0.1, 1e-6),
        ),
        (lsq_backward, (torch.randn(3, 5), x / 0.3, torch.tensor([[0.3], [0.2], [0.5]]), 8, 7, 0.1)),
        (lsq_plus_forward, (x.clone().requires_grad_(True), *_lsq_plus_params(), 15, 0.1, 1e-6)),
        (lsq_plus_backward, (torch.randn(3, 5), x / 0.3, *(p.detach() for p in _lsq_plus_params()), 15, 0.1, 1e-6)),
    ]


def _lsq_plus_params() -> tuple[Tensor, Tensor]:
    return torch.tensor([0.3], requires_grad=True), torch.tensor([-1.0], requires_grad=True)


@pytest.mark.parametrize("index", range(10))
def test_ops_pass_opcheck(index: int) -> None:
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch.library documents.
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(op, args)


def test_autograd_kernel_builds_a_graph_only_when_a_gradient_is_wanted() -> None:
    # The ops' own autograd kernel (functional/_dispatch.py): a node only where grad mode is on and an input
    # requires grad; the gradient goes to exactly the inputs that asked for it; no graph under no_grad or
    # inference_mode, with the same values.
    x, alpha = torch.tensor([-1.0, 0.4, 0.8, 3.0]), torch.tensor([1.0])
    expected, _ = pact_forward_reference(x, alpha, 3, 0.0)
    a = alpha.clone().requires_grad_(True)
    out = pact_forward(x, a, 3, 0.0)[0]
    assert out.requires_grad and not x.requires_grad
    out.sum().backward()
    assert a.grad.tolist() == [1.0]  # only x = 3.0 sits at or above the clip
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            q, code = pact_forward(x.clone().requires_grad_(True), alpha.clone().requires_grad_(True), 3, 0.0)
        assert q.grad_fn is None and not q.requires_grad
        assert_same(q, expected)
        assert code.tolist() == [0, 1, 1, 2]


def test_missing_compiler_warns_once_and_falls_back(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_QUANT_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    for name, value in (("_lib", None), ("_error", None), ("_tried", False)):
        monkeypatch.setattr(native, name, value)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    x = pact_input(5000, 2.0, 4, torch.float32, seed=1)
    with pytest.warns(RuntimeWarning, match="native CPU kernels are unavailable"):
        q = pact_quantize(x, torch.tensor([2.0]), 4)
    assert native.library() is None and "no-such-cc" in native.build_error()
    assert_same(q, pact_forward_reference(x, torch.tensor([2.0]), 15, 0.0)[0])


@pytest.mark.skipif(not HAVE_COMPILER, reason="no C compiler on this machine")
def test_build_is_cached_on_disk(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTNING_QUANT_CACHE", str(tmp_path))
    for name, value in (("_lib", None), ("_error", None), ("_tried", False)):
        monkeypatch.setattr(native, name, value)
    assert native.library() is not None
    (built,) = list(tmp_path.rglob("quant_kernels.so"))
    stamp = built.stat().st_mtime_ns
    monkeypatch.setattr(native, "_tried", False)  # a new process: loads the cached file, compiles nothing
    real_run = native.subprocess.run

    def no_compile(args, *rest, **kwargs):
        assert "--version" in args, f"compiled again: {args}"
        return real_run(args, *rest, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", no_compile)
    assert native.library() is not None
    assert built.stat().st_mtime_ns == stamp


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the Linux process map")
def test_library_shares_torchs_openmp_runtime(lib) -> None:
    # libgomp.so.1 by soname, the one torch loaded: no second GNU OpenMP runtime (and thread pool).
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len({p for p in paths if os.path.basename(p).startswith("libgomp.so")}) == 1, paths


# ------------------------------------------------------------------------------------------------ tracers


class _Net(nn.Module):
    """A conv whose weight goes through ``weight_quantizer`` and whose output through ``act`` (each quantizer)."""

    def __init__(self, weight_quantizer: nn.Module, act: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.weight_quantizer = weight_quantizer
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight_quantizer(self.conv.weight)
        return self.act(nn.functional.conv2d(x, w, self.conv.bias, padding=1))


def _dsq_act() -> DSQActivation:
    m = DSQActivation(4, learn_temperature=True)
    m.set_range(0, 0.0, 2.0)
    return m


def _lsq_plus() -> LSQPlusInput:
    m = LSQPlusInput(4)
    m.set_calibration(0, torch.tensor([-1.5, 2.0]))
    return m


NETS = {
    "pact+dorefa": lambda: _Net(DoReFaWeight(4), PACTActivation(4, alpha_init=1.5)),
    "dsq": lambda: _Net(DSQWeight(4), _dsq_act()),
    "lsq+lsq_plus": lambda: _Net(LSQWeight(4), _lsq_plus()),
    "quant_noise": lambda: _Net(QuantNoiseWeight(4, p=1.0), nn.ReLU()),
}


def _run(model: nn.Module, net: nn.Module, x: Tensor) -> list[Tensor]:
    net.zero_grad()
    for m in net.modules():
        if hasattr(m, "reset_sites"):
            m.reset_sites()
    out = model(x)
    out.square().sum().backward()
    return [out.detach()] + [p.grad.clone() for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", list(NETS))
def test_fullgraph_compile_matches_eager(name: str) -> None:
    # fullgraph=True makes any graph break an error; the ops trace through their fake implementations.
    net, x = NETS[name](), torch.randn(2, 3, 9, 9)
    eager = _run(net, net, x)
    torch._dynamo.reset()
    compiled = _run(torch.compile(net, fullgraph=True, backend="aot_eager"), net, x)
    assert len(eager) == len(compiled) and len(eager) > 2
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(NETS))
def test_export_matches_eager(name: str) -> None:
    net, x = NETS[name]().eval(), torch.randn(2, 3, 9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (x,))
    if name != "quant_noise":  # QuantNoise is plain torch ops: nothing of ours in the graph
        targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
        assert any(t.startswith("lightning_quant.") for t in targets), targets
    with torch.no_grad():
        assert_same(program.module()(x), net(x))
