"""Numerics of LSQ (Esser et al. 2019) and of the LSQWeight module, checked against the paper's formulas; LSQ+
(Bhalgat et al. 2020) on the integer grid of ONNX QuantizeLinear/DequantizeLinear, and the LSQPlusInput module.

Expected values are computed here by hand (in comments) or with plain float64 torch ops written out from the paper,
never read off the code under test. ``torch.round`` rounds half to even, as the formula's ``round`` does here.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_quant.functional.dorefa import dorefa_quantize_weight
from lightning_quant.functional.lsq import lsq_plus_quantize, lsq_quantize, lsq_range
from lightning_quant.quantizers import DoReFaWeight, LSQWeight
from lightning_quant.quantizers.inputs import LSQPlusInput, estimate_range
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


# ------------------------------------------------------------------------------------ LSQ+ (integer zero point)


def plus_leaves(x: list[float] | Tensor, s: float, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    x = torch.as_tensor(x, dtype=F64).clone().requires_grad_(True)
    return x, torch.tensor([s], dtype=F64, requires_grad=True), torch.tensor([beta], dtype=F64, requires_grad=True)


def ref_lsq_plus(x: Tensor, s: float, beta: float, levels: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Elementwise: y = (clamp(round(x/s) + z, 0, L) - z) s with z = clamp(round(-beta/s), 0, L); dy/dx, dy/ds (LSQ
    inside, the saturated level's (c - z) plus dy/dz dz/ds = u outside), dy/dbeta (dy/dz dz/dbeta = 1 outside),
    z passed straight through its rounding but not through its clamp."""
    u = -beta / s
    z = min(max(round(u), 0), levels)  # Python's round is half to even, as torch.round
    q = x / s
    v = q + z
    y = (torch.clamp(torch.round(q) + z, 0, levels) - z) * s
    inside, low, high = (v > 0) & (v < levels), v <= 0, v >= levels
    moves = 0 <= round(u) <= levels
    pull = u if moves else 0.0
    ds = torch.where(inside, torch.round(q) - q, torch.zeros_like(q))
    ds = ds + low.to(F64) * (pull - z) + high.to(F64) * (levels - z + pull)
    dbeta = ((low | high) & moves).to(F64)
    return y, inside.to(F64), ds, dbeta


def test_lsq_plus_hand_computed_3_bits() -> None:
    # 3 bits (L = 7), s = 0.5, beta = -0.8: u = -beta / s = 1.6, z = 2, levels (c - 2) * 0.5 = -1.0 .. 2.5 (0 is one;
    # the continuous LSQ+ grid -0.8 + i * 0.5 had none). x / s = [-2.6, -0.6, 0, 1.48, 5.2, 5.0], v = x / s + 2 =
    # [-0.6 (low), 1.4, 2, 3.48, 7.2 (high), 7.0 (= L: saturated)].
    # codes clamp(round(x / s) + 2, 0, 7) = [0, 1, 2, 3, 7, 7] -> y = [-1.0, -0.5, 0, 0.5, 2.5, 2.5]
    x, s, beta = plus_leaves([-1.3, -0.3, 0.0, 0.74, 2.6, 2.5], 0.5, -0.8)
    out = lsq_plus_quantize(x, s, beta, 3, grad_scale=1.0)
    assert out.tolist() == [-1.0, -0.5, 0.0, 0.5, 2.5, 2.5]
    out.backward(torch.tensor([1.0, 10.0, 100.0, 1000.0, 1e4, 1e5], dtype=F64))
    assert x.grad.tolist() == [0.0, 10.0, 100.0, 1000.0, 0.0, 0.0]
    # dy/ds: low -z + u = -0.4; inside round(q) - q = -1 + 0.6 = -0.4, 0, 1 - 1.48 = -0.48; high L - z + u = 6.6
    expected = -0.4 * 1 - 0.4 * 10 + 0 * 100 - 0.48 * 1000 + 6.6 * 1e4 + 6.6 * 1e5
    assert math.isclose(s.grad.item(), expected, rel_tol=1e-12)
    assert beta.grad.item() == 1 + 1e4 + 1e5  # dy/dbeta: 1 on the saturated outputs only
    # Default grad scale (LSQ's g = 1 / sqrt(N L)) on the step only.
    x, s, beta = plus_leaves([-1.3, -0.3, 0.0, 0.74, 2.6, 2.5], 0.5, -0.8)
    lsq_plus_quantize(x, s, beta, 3).sum().backward()
    ones = -0.4 - 0.4 + 0 - 0.48 + 6.6 + 6.6
    assert math.isclose(s.grad.item(), ones / math.sqrt(6 * 7), rel_tol=1e-12)
    assert beta.grad.item() == 3.0


def test_lsq_plus_zero_point_clamped_to_code_range() -> None:
    # beta = 0.3 > 0, s = 0.5, 2 bits: u = -0.6 rounds to -1, clamped to z = 0: levels 0, 0.5, 1, 1.5; z does not
    # move, so beta gets no gradient and the saturated outputs' dy/ds is (c - z) alone: low 0, high L = 3.
    x, s, beta = plus_leaves([-0.2, 0.6, 2.0], 0.5, 0.3)
    out = lsq_plus_quantize(x, s, beta, 2, grad_scale=1.0)
    assert out.tolist() == [0.0, 0.5, 1.5]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]
    assert math.isclose(s.grad.item(), 0 + (1 - 1.2) + 3, rel_tol=1e-12)
    assert beta.grad.item() == 0.0
    # beta = -3, s = 0.5, 2 bits: u = 6 > L, z = 3: levels -1.5 .. 0. x / s = [-4, 2]: codes 0 and 3.
    x, s, beta = plus_leaves([-2.0, 1.0], 0.5, -3.0)
    out = lsq_plus_quantize(x, s, beta, 2, grad_scale=1.0)
    assert out.tolist() == [-1.5, 0.0]
    out.sum().backward()
    assert s.grad.item() == -3.0 + 0.0 and beta.grad.item() == 0.0


def test_lsq_plus_rounds_before_adding_the_zero_point() -> None:
    # s = 1, beta = -2.25 (z = 2): x / s = 0.5 rounds half to even to 0 -> y = 0; the continuous grid rounded
    # (x - beta) / s = 2.75 to 3, giving 0.75. Ties: -1.5 -> -2, -0.5 -> 0, 1.5 -> 2, 2.5 -> 2.
    x, s, beta = plus_leaves([-1.5, -0.5, 0.5, 1.5, 2.5], 1.0, -2.25)
    assert lsq_plus_quantize(x, s, beta, 3, grad_scale=1.0).tolist() == [-2.0, 0.0, 0.0, 2.0, 2.0]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("beta", [-0.37, -1.9, 0.0])
def test_lsq_plus_matches_formulas(bits: int, beta: float) -> None:
    levels = 2**bits - 1
    g = torch.Generator().manual_seed(bits)
    x0 = torch.randn(400, dtype=F64, generator=g) * 2
    s0 = 3.0 / levels  # a range of 3: both ends saturate for every beta here
    up = torch.randn(400, dtype=F64, generator=g)
    x, s, b = plus_leaves(x0, s0, beta)
    out = lsq_plus_quantize(x, s, b, bits, grad_scale=0.3)
    out.backward(up)
    ref_y, ref_dx, ref_ds, ref_db = ref_lsq_plus(x0, s0, beta, levels)
    assert torch.equal(out.detach(), ref_y)
    assert torch.equal(x.grad, up * ref_dx)
    assert math.isclose(s.grad.item(), 0.3 * (up * ref_ds).sum().item(), rel_tol=1e-10, abs_tol=1e-12)
    assert math.isclose(b.grad.item(), (up * ref_db).sum().item(), rel_tol=1e-12, abs_tol=1e-12)
    z = min(max(round(-beta / s0), 0), levels)
    codes = torch.round(out.detach() / s0) + z
    assert codes.min() == 0 and codes.max() == levels  # both ends reached
    assert torch.equal(codes, torch.round(codes)) and (out.detach() == 0).any()  # an integer grid through 0


def test_lsq_plus_is_torch_integer_fake_quant() -> None:
    # float32: the same levels as torch's own integer fake-quant with that zero point, except where x / s is a tie
    # within float rounding (torch multiplies by 1 / s, we divide as QuantizeLinear does).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * 2
    s, beta = torch.tensor([0.0713]), torch.tensor([-1.234])
    z = int(torch.round(-beta / s))
    ours = lsq_plus_quantize(x, s, beta, 5)
    theirs = torch.fake_quantize_per_tensor_affine(x, float(s), z, 0, 31)
    near_tie = ((x / s - torch.floor(x / s)) - 0.5).abs() < 1e-4
    assert torch.equal(ours[~near_tie], theirs[~near_tie]) and near_tie.sum() < 10


def test_lsq_plus_nan_and_step_floor() -> None:
    x, s, beta = plus_leaves([0.3, float("nan"), 5.0], -1.0, -0.5)
    out = lsq_plus_quantize(x, s, beta, 2, grad_scale=1.0, min_step=0.5)
    # s -> 0.5, u = 1, z = 1: levels -0.5 .. 1.0. 0.3 / 0.5 = 0.6 -> 1 -> 0.5; 5 / 0.5 = 10 -> high -> 1.0
    assert math.isnan(out[1].item()) and out[[0, 2]].tolist() == [0.5, 1.0]
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0]
    assert math.isclose(s.grad.item(), (1 - 0.6) + (3 - 1 + 1), rel_tol=1e-12)  # straight through the floor
    assert beta.grad.item() == 1.0


def test_lsq_plus_input_learns_through_its_ends() -> None:
    # lower -1, upper 2, 2 bits: s = 1, u = 1, z = 1. x = [-1.7 (low), 0.4, 2.6 (high)] -> [-1, 0, 2].
    q = LSQPlusInput(2).double()
    with torch.no_grad():
        q.lower.fill_(-1.0)
        q.upper.fill_(2.0)
    out = q(torch.tensor([-1.7, 0.4, 2.6], dtype=F64))
    assert out.tolist() == [-1.0, 0.0, 2.0]
    out.backward(torch.tensor([1.0, 10.0, 100.0], dtype=F64))
    # dy/ds: (-z + u) * 1 + (0 - 0.4) * 10 + (L - z + u) * 100 = 296, times g = 1 / sqrt(3 * 3); dy/dbeta = 1 + 100.
    ds, dbeta = 296 / 3, 101.0
    assert math.isclose(q.upper.grad.item(), ds / 3, rel_tol=1e-12)  # s = (upper - lower) / 3
    assert math.isclose(q.lower.grad.item(), dbeta - ds / 3, rel_tol=1e-12)


def test_lsq_plus_input_range_keeps_zero() -> None:
    # lower pushed above 0: the grid spans [0, upper] (0 is a level of every integer grid), and the lower end still
    # gets the gradient of the low outputs, so it can come back.
    q = LSQPlusInput(2).double()
    with torch.no_grad():
        q.lower.fill_(0.5)
        q.upper.fill_(1.5)
    out = q(torch.tensor([-1.0, 0.7, 3.0], dtype=F64))
    assert out.tolist() == [0.0, 0.5, 1.5]
    out[0].backward()
    assert q.lower.grad.item() == 1.0


def test_lsq_plus_mse_calibration_measures_the_integer_grid() -> None:
    # The "mse" search picks the shrink factor whose *integer* grid has the least error: recompute by hand.
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(3000, generator=g, dtype=F64), torch.rand(30, generator=g, dtype=F64) * 9 - 3])
    levels = 3
    errors = []
    for f in torch.linspace(0.02, 1.0, 50, dtype=F64).tolist():
        lo, hi = f * x.min().item(), f * x.max().item()
        s = (hi - lo) / levels
        z = min(max(round(-lo / s), 0), levels)
        y = (torch.clamp(torch.round(x / s) + z, 0, levels) - z) * s
        errors.append((((y - x) ** 2).mean().item(), f, s, z))
    _, f, _, _ = min(errors)
    lo, hi = estimate_range(x, 2, "mse", zero_point=True).tolist()
    assert lo == pytest.approx(f * x.min().item(), rel=1e-12) and hi == pytest.approx(f * x.max().item(), rel=1e-12)
    # DSQ's continuous grid lo + i s is another grid: its search picks another factor here.
    assert estimate_range(x, 2, "mse").tolist() != [lo, hi]
