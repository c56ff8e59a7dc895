"""Numerics of LSQ (Esser et al. 2019) and of the LSQWeight module, checked against the paper's formulas.

Expected values are computed here by hand (in comments) or with plain float64 torch ops written out from the paper,
never read off the code under test. ``torch.round`` rounds half to even, as the formula's ``round`` does here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_quant.functional.dorefa import dorefa_quantize_weight
from lightning_quant.functional.lsq import lsq_quantize, lsq_range
from lightning_quant.quantizers import DoReFaWeight, LSQWeight
from lightning_quant.quantizers.lsq import MIN_STEP

F64 = torch.float64


def ref_lsq(w: Tensor, s: Tensor, qn: int, qp: int, g: float) -> tuple[Tensor, Tensor, Tensor]:
    """Paper, elementwise: output, d out / d w, and the per-element d out / d s (times g), boundaries saturated."""
    v = w / s
    out = torch.round(torch.clamp(v, -qn, qp)) * s
    inside = (v > -qn) & (v < qp)
    ds = torch.where(inside, torch.round(v) - v, torch.zeros_like(v))
    ds = ds + torch.where(v <= -qn, -float(qn), 0.0) + torch.where(v >= qp, float(qp), 0.0)
    return out, inside.to(w.dtype), ds * g


def leaves(w: list[float] | Tensor, s: list[float] | Tensor) -> tuple[Tensor, Tensor]:
    w = torch.as_tensor(w, dtype=F64).clone().requires_grad_(True)
    s = torch.as_tensor(s, dtype=F64).clone().requires_grad_(True)
    return w, s


# ------------------------------------------------------------------------------------------------ range


def test_integer_ranges() -> None:
    assert lsq_range(2) == (2, 1)  # {-2, -1, 0, 1}
    assert lsq_range(2, narrow=True) == (1, 1)  # ternary
    assert lsq_range(3) == (4, 3)
    assert lsq_range(8) == (128, 127)
    assert lsq_range(8, narrow=True) == (127, 127)
    assert lsq_range(16) == (32768, 32767)


# ------------------------------------------------------------------------------------------------ hand-computed


def test_hand_computed_case_3_bits() -> None:
    # 3 bits: Qn = 4, Qp = 3. s = 0.25, w / s = [-2.2, -0.4, 0, 1.04, 3.6]
    # codes: round(-2.2) = -2, round(-0.4) = 0, 0, round(1.04) = 1, 3.6 > Qp -> 3 (saturated)
    # outputs: [-0.5, 0, 0, 0.25, 0.75]; d/dw: [1, 1, 1, 1, 0]
    # d/ds terms: -2 + 2.2 = 0.2, 0 + 0.4 = 0.4, 0, 1 - 1.04 = -0.04, Qp = 3 -> sum 3.56
    w, s = leaves([-0.55, -0.1, 0.0, 0.26, 0.9], [0.25])
    out = lsq_quantize(w, s, 3, grad_scale=1.0)
    assert out.tolist() == [-0.5, 0.0, 0.0, 0.25, 0.75]
    out.sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert math.isclose(s.grad.item(), 3.56, rel_tol=1e-12)
    # Default grad scale: g = 1 / sqrt(N Qp) = 1 / sqrt(5 * 3).
    w, s = leaves([-0.55, -0.1, 0.0, 0.26, 0.9], [0.25])
    lsq_quantize(w, s, 3).sum().backward()
    assert math.isclose(s.grad.item(), 3.56 / math.sqrt(15), rel_tol=1e-12)
    assert s.grad.shape == (1,)


def test_boundaries_are_saturated() -> None:
    # 3 bits, s = 0.5: v = w / s = [-4 (= -Qn), -4.5, -3.75, 2.75, 3 (= Qp), 3.5]
    w, s = leaves([-2.0, -2.25, -1.875, 1.375, 1.5, 1.75], [0.5])
    out = lsq_quantize(w, s, 3, grad_scale=1.0)
    # codes -4, -4, round(-3.75) = -4, round(2.75) = 3, 3, 3
    assert out.tolist() == [-2.0, -2.0, -2.0, 1.5, 1.5, 1.5]
    out.backward(torch.tensor([1.0, 10.0, 100.0, 1000.0, 1e4, 1e5], dtype=F64))
    # d/dw: only strictly inside (-Qn < v < Qp): -3.75 and 2.75
    assert w.grad.tolist() == [0.0, 0.0, 100.0, 1000.0, 0.0, 0.0]
    # d/ds: -Qn, -Qn, round(-3.75) + 3.75 = -0.25, round(2.75) - 2.75 = 0.25, Qp, Qp (weighted by the upstream grad)
    expected = -4 * 1.0 - 4 * 10.0 - 0.25 * 100.0 + 0.25 * 1000.0 + 3 * 1e4 + 3 * 1e5
    assert math.isclose(s.grad.item(), expected, rel_tol=1e-14)


def test_ties_round_half_to_even() -> None:
    # 4 bits (Qn 8, Qp 7), s = 1: v = w. Ties go to the even code.
    w, s = leaves([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 6.5], [1.0])
    out = lsq_quantize(w, s, 4, grad_scale=1.0)
    assert out.tolist() == [-2.0, -2.0, 0.0, 0.0, 2.0, 2.0, 6.0]
    out.backward(torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0], dtype=F64))
    assert w.grad.tolist() == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]
    # round(v) - v: +0.5, -0.5, +0.5, -0.5, +0.5, -0.5, -0.5
    expected = 0.5 * 1 - 0.5 * 2 + 0.5 * 4 - 0.5 * 8 + 0.5 * 16 - 0.5 * 32 - 0.5 * 64
    assert s.grad.item() == expected


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("narrow", [False, True])
@pytest.mark.parametrize("grad_scale", [None, 1.0, 0.3])
def test_matches_paper_formulas(bits: int, narrow: bool, grad_scale: float | None) -> None:
    qn, qp = (2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1) if narrow else (2 ** (bits - 1), 2 ** (bits - 1) - 1)
    g = torch.Generator().manual_seed(bits)
    w0 = torch.randn(300, dtype=F64, generator=g) * 0.2
    s0 = 0.4 / qn  # -Qn s at 2 sigma, Qp s between 1 and 2 sigma: both ends saturate
    up = torch.randn(300, dtype=F64, generator=g)
    w, s = leaves(w0, [s0])
    out = lsq_quantize(w, s, bits, narrow=narrow, grad_scale=grad_scale)
    out.backward(up)
    gs = 1.0 / math.sqrt(300 * qp) if grad_scale is None else grad_scale
    ref_out, ref_dw, ref_ds = ref_lsq(w0, torch.tensor(s0, dtype=F64), qn, qp, gs)
    assert torch.equal(out.detach(), ref_out)
    assert torch.equal(w.grad, up * ref_dw)
    assert torch.allclose(s.grad, (up * ref_ds).sum().reshape(1), rtol=1e-12, atol=1e-15)
    codes = torch.round(out.detach() / s0)
    assert codes.min() == -qn and codes.max() == qp  # both ends reached


def test_narrow_vs_full_two_bits() -> None:
    w = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.7, 3.0], dtype=F64)
    s = torch.tensor([1.0], dtype=F64)
    assert lsq_quantize(w, s, 2).tolist() == [-2.0, -1.0, 0.0, 0.0, 1.0, 1.0]  # {-2, -1, 0, 1}
    assert lsq_quantize(w, s, 2, narrow=True).tolist() == [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]  # ternary
    # w = -1.0 is inside the full range (v = -1 > -2) but saturated in the narrow one (v = -1 = -Qn).
    wl, sl = leaves([-1.0], [1.0])
    lsq_quantize(wl, sl, 2, narrow=True, grad_scale=1.0).sum().backward()
    assert wl.grad.tolist() == [0.0] and sl.grad.tolist() == [-1.0]
    wl, sl = leaves([-1.0], [1.0])
    lsq_quantize(wl, sl, 2, grad_scale=1.0).sum().backward()
    assert wl.grad.tolist() == [1.0] and sl.grad.tolist() == [0.0]


# ------------------------------------------------------------------------------------------------ zero and scale


def test_pruned_zeros_stay_exactly_zero() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=g)
    w[:, ::3] = 0.0
    for q in (LSQWeight(4), LSQWeight(4, per_channel=True), LSQWeight(2, narrow=True)):
        q.init_from(w)
        out = q(w)
        assert bool((out[:, ::3] == 0).all())
    # DoReFa has no zero level: the same zeros come out as +-1 / (2**k - 1).
    assert not bool((DoReFaWeight(4)(w)[:, ::3] == 0).any())
    assert LSQWeight.has_zero_level and not DoReFaWeight.has_zero_level


def test_keeps_the_weights_scale() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, dtype=F64, generator=g) * 0.01
    q = LSQWeight(4).to(F64)
    q.init_from(w)
    out = q(w)
    ratio = out.abs().max().item() / w.abs().max().item()
    assert 0.5 < ratio < 1.5
    assert (out - w).square().mean().item() < 0.05 * w.square().mean().item()
    # DoReFa's output spans [-1, 1] whatever the weight: about 25x too large here.
    assert dorefa_quantize_weight(w, 4).abs().max().item() == 1.0


def test_float32_output_is_exactly_code_times_step() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5000, generator=g)
    s = torch.tensor([0.1], dtype=torch.float32)  # not exact in binary
    out = lsq_quantize(w, s, 4)
    assert out.dtype == torch.float32
    codes = torch.round(torch.clamp(w / s, -8, 7))
    assert torch.equal(out, codes * s)  # one float32 product per element, no `w + (q - w).detach()` residue
    assert len(set(out.tolist())) <= 16


# ------------------------------------------------------------------------------------------------ per channel


def test_per_channel_gradients_are_independent() -> None:
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(3, 20, dtype=F64, generator=g)
    s0 = torch.tensor([0.2, 0.5, 1.0], dtype=F64)
    w, s = leaves(w0, s0.view(3, 1))
    lsq_quantize(w, s, 3).sum().backward()
    assert s.grad.shape == (3, 1)
    for c in range(3):
        # Channel c alone as a per-tensor problem with N = 20: the same output, gradients and step gradient.
        wc, sc = leaves(w0[c], s0[c : c + 1])
        out_c = lsq_quantize(wc, sc, 3)
        out_c.sum().backward()
        assert torch.equal(w.grad[c], wc.grad)
        assert torch.allclose(s.grad[c], sc.grad, rtol=1e-14, atol=0)
        _, _, ds = ref_lsq(w0[c], s0[c], 4, 3, 1 / math.sqrt(20 * 3))
        assert math.isclose(s.grad[c].item(), ds.sum().item(), rel_tol=1e-12)
    # Changing channel 1's weights leaves channel 0's and 2's step gradients as they were.
    w2 = w0.clone()
    w2[1] *= 3
    w2, s2 = leaves(w2, s0.view(3, 1))
    lsq_quantize(w2, s2, 3).sum().backward()
    assert s2.grad[0].item() == s.grad[0].item() and s2.grad[2].item() == s.grad[2].item()
    assert s2.grad[1].item() != s.grad[1].item()


def test_module_per_channel_axis_1_matches_functional() -> None:
    # transformers' Conv1D stores (in, out): the output channel is axis 1.
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(6, 4, dtype=F64, generator=g)
    q = LSQWeight(3, per_channel=True, channel_axis=1).to(F64)
    q.init_from(w0)
    assert q.step.shape == (4,) and q.scale().shape == (4,)
    w = w0.clone().requires_grad_(True)
    q(w).sum().backward()
    wr, sr = leaves(w0, q.step.detach().view(1, 4))
    lsq_quantize(wr, sr, 3, min_step=MIN_STEP).sum().backward()
    assert torch.equal(q(w0), lsq_quantize(w0, q.step.detach().view(1, 4), 3))
    assert torch.equal(w.grad, wr.grad)
    assert torch.equal(q.step.grad, sr.grad.view(4))
    assert (q.qmin, q.qmax) == (-4, 3)


def test_per_channel_state_dict_into_fresh_module() -> None:
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(5))
    q = LSQWeight(4, per_channel=True)
    q.init_from(w)
    fresh = LSQWeight(4, per_channel=True)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(w), q(w))


def test_forward_needs_init_for_per_channel() -> None:
    with pytest.raises(ValueError, match="init_from"):
        LSQWeight(4, per_channel=True)(torch.randn(5, 7))


# ------------------------------------------------------------------------------------------------ NaN and floor


def test_nan_passes_through_without_gradient() -> None:
    w, s = leaves([0.3, float("nan"), -0.7, 2.0], [0.25])
    out = lsq_quantize(w, s, 3, grad_scale=1.0)
    assert math.isnan(out[1].item())
    assert out[[0, 2, 3]].tolist() == [0.25, -0.75, 0.75]
    out.sum().backward()
    assert w.grad.tolist() == [1.0, 0.0, 1.0, 0.0]
    # 0.3/0.25 = 1.2 -> 1 - 1.2 = -0.2; -2.8 -> -3 + 2.8 = -0.2; 8 -> Qp = 3. NaN adds nothing.
    assert math.isclose(s.grad.item(), 2.6, rel_tol=1e-12)


def test_step_floor_has_straight_through_gradient() -> None:
    # A step pushed to -1 is used as the floor 0.5 in the forward; its gradient is the one at the floor.
    w, s = leaves([0.6, 5.0], [-1.0])
    out = lsq_quantize(w, s, 3, grad_scale=1.0, min_step=0.5)
    assert out.tolist() == [0.5, 1.5]  # v = 1.2 -> 1, v = 10 -> Qp = 3
    out.sum().backward()
    assert math.isclose(s.grad.item(), (1 - 1.2) + 3, rel_tol=1e-12)
    q = LSQWeight(4)
    with torch.no_grad():
        q.step.fill_(0.0)
    assert bool(torch.isfinite(q(torch.randn(10))).all())
    assert q.scale().item() == pytest.approx(MIN_STEP)


# ------------------------------------------------------------------------------------------------ init_from


def brute_force_step(w: Tensor, qn: int, qp: int, points: int = 4000) -> tuple[float, float]:
    """The step on a fine float64 grid over (0, 1.2 max|w| / Qp] with the least squared error, and that error."""
    steps = torch.linspace(1, points, points, dtype=F64) / points * 1.2 * w.abs().max() / qp
    err = ((torch.round(torch.clamp(w[None] / steps[:, None], -qn, qp)) * steps[:, None] - w[None]) ** 2).mean(1)
    i = int(err.argmin())
    return steps[i].item(), err[i].item()


def mse_at(w: Tensor, step: float, qn: int, qp: int) -> float:
    return ((torch.round(torch.clamp(w / step, -qn, qp)) * step - w) ** 2).mean().item()


@pytest.mark.parametrize("bits,narrow", [(2, False), (3, False), (4, True)])
def test_init_from_is_mse_optimal(bits: int, narrow: bool) -> None:
    qn, qp = lsq_range(bits, narrow)
    w = torch.randn(400, dtype=F64, generator=torch.Generator().manual_seed(bits))
    q = LSQWeight(bits, narrow=narrow).to(F64)
    q.init_from(w)
    step = q.step.item()
    best_step, best_err = brute_force_step(w, qn, qp)
    assert mse_at(w, step, qn, qp) <= best_err * (1 + 1e-12)
    assert step == pytest.approx(best_step, rel=2e-3)


def test_init_from_per_channel_is_mse_optimal_per_channel() -> None:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(4, 150, dtype=F64, generator=g) * torch.tensor([[0.01], [0.1], [1.0], [5.0]], dtype=F64)
    q = LSQWeight(3, per_channel=True).to(F64)
    q.init_from(w)
    for c in range(4):
        best_step, best_err = brute_force_step(w[c], 4, 3)
        assert mse_at(w[c], q.step[c].item(), 4, 3) <= best_err * (1 + 1e-12)
        assert q.step[c].item() == pytest.approx(best_step, rel=2e-3)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bits", [1, 17, 0, 2.0, True])
def test_bits_errors(bits: object) -> None:
    with pytest.raises(ValueError, match="`bits`.*2..16"):
        lsq_quantize(torch.zeros(3), torch.ones(1), bits)
    with pytest.raises(ValueError, match="`bits`.*2..16"):
        LSQWeight(bits)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="`step`.*broadcast"):
        lsq_quantize(torch.zeros(3, 4), torch.ones(3), 4)
    with pytest.raises(ValueError, match="`step`.*broadcast"):
        lsq_quantize(torch.zeros(3, 4), torch.ones(2, 1), 4)
    with pytest.raises(ValueError, match="`grad_scale`.*> 0"):
        lsq_quantize(torch.zeros(3), torch.ones(1), 4, grad_scale=0.0)
    with pytest.raises(ValueError, match="`per_channel`.*bool"):
        LSQWeight(4, per_channel=1)
    with pytest.raises(ValueError, match="`narrow`.*bool"):
        LSQWeight(4, narrow="yes")
    with pytest.raises(ValueError, match="`channel_axis`.*int"):
        LSQWeight(4, channel_axis=1.0)
    with pytest.raises(ValueError, match=r"`per_channel`.*fewer than 2 dims.*\(5,\)"):
        LSQWeight(4, per_channel=True).init_from(torch.randn(5))
    with pytest.raises(ValueError, match=r"`channel_axis`.*\[-2, 1\].*got 2"):
        LSQWeight(4, per_channel=True, channel_axis=2).init_from(torch.randn(5, 3))
    with pytest.raises(ValueError, match="`channel_axis`"):
        LSQWeight(4, per_channel=True, channel_axis=-3)(torch.randn(5, 3))


def test_extra_repr() -> None:
    assert repr(LSQWeight(4)) == "LSQWeight(bits=4, per_channel=False, narrow=False)"
    assert "channel_axis=1" in repr(LSQWeight(2, per_channel=True, channel_axis=1, narrow=True))
