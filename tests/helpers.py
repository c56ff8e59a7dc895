"""Helpers shared by the kernel tests (tests/test_kernels.py, tests/test_triton.py)."""

from __future__ import annotations

import torch
from torch import Tensor

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_same(a: Tensor | None, b: Tensor | None) -> None:
    """Bit-identical up to the sign of zero and NaN payloads (compilers may drop the sign of a zero; NaN payloads are
    not compared)."""
    assert (a is None) == (b is None)
    if a is None or b is None:
        return
    assert a.dtype == b.dtype and a.shape == b.shape
    if not a.is_floating_point():
        assert torch.equal(a, b)
        return
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), "NaN positions differ"
    bits_a = a.detach().contiguous().view(_INT[a.element_size()])
    bits_b = b.detach().contiguous().view(_INT[b.element_size()])
    ok = (bits_a == bits_b) | nan_a | ((a == 0) & (b == 0))
    bad = (~ok).nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} elements differ, first at {bad[0].tolist()}: {a[tuple(bad[0])]} vs {b[tuple(bad[0])]}"
    )


def pact_input(n: int, alpha: float, bits: int, dtype: torch.dtype, seed: int) -> Tensor:
    """Random values below, inside and above the clip, then the boundaries: 0, -0, alpha, level midpoints, NaN, inf."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, generator=g, dtype=torch.float64) * 1.6 - 0.3) * alpha
    step = alpha / (2**bits - 1)
    inf = float("inf")
    special = [0.0, -0.0, alpha, -1e-30, 0.5 * step, 1.5 * step, alpha - 0.5 * step, float("nan"), inf, -inf]
    x[: len(special)] = torch.tensor(special, dtype=torch.float64)
    return x.to(dtype)


def saved_bytes(forward) -> int:
    seen: dict[tuple, int] = {}

    def pack(t: Tensor) -> Tensor:
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))] = (
            t.numel() * t.element_size()
        )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def dorefa_input(shape: tuple[int, ...], seed: int) -> tuple[Tensor, Tensor]:
    """A weight with a tie at its largest magnitude (the max's gradient is shared) and a zero, and a gradient."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.7
    flat = w.view(-1)
    if flat.numel() > 8:
        flat[3] = flat.abs().max()
        flat[5] = -flat[3]
        flat[7] = 0.0
    return w, torch.randn(shape, generator=torch.Generator().manual_seed(50 + seed))
