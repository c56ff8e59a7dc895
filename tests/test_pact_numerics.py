"""Numerics of PACT (Choi et al. 2018) and of the DoReFa weight quantizer, checked against the papers' formulas.

Every expected value is computed here with plain Python floats (``math``, ``round`` = round half to even, as
``torch.round``), never read off the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_quant.functional.dorefa import dorefa_quantize_weight
from lightning_quant.functional.pact import pact_quantize
from lightning_quant.quantizers.pact import MIN_ALPHA, DoReFaWeight, PACTActivation

# ------------------------------------------------------------------------------------------------ references


def ref_pact_index(x: float, alpha: float, bits: int) -> int:
    """The level index ``j`` of PACT's output ``j * alpha / (2**k - 1)`` for one Python float."""
    levels = 2**bits - 1
    y = min(max(x, 0.0), alpha)
    return round(y * levels / alpha)


def ref_pact(x: float, alpha: float, bits: int) -> float:
    """``y_q = round(clip(x, 0, alpha) * (2**k - 1) / alpha) * alpha / (2**k - 1)``, one Python float at a time."""
    levels = 2**bits - 1
    return ref_pact_index(x, alpha, bits) * alpha / levels


def ref_dorefa(w: list[float], bits: int) -> list[float]:
    """``2 * quantize_k(tanh(w) / (2 max|tanh(w)|) + 0.5) - 1`` with ``quantize_k(r) = round(L r) / L``."""
    levels = 2**bits - 1
    t = [math.tanh(v) for v in w]
    m = max(abs(v) for v in t)
    return [2 * (round(levels * (v / (2 * m) + 0.5)) / levels) - 1 for v in t]


def pact_input(alpha: float, n: int = 4000, seed: int = 0) -> Tensor:
    """float64 values spread over [-0.3 alpha, 1.3 alpha]: below, inside and above the clip."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, dtype=torch.float64, generator=g) * 1.6 - 0.3) * alpha


# ------------------------------------------------------------------------------------------------ PACT forward


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("alpha", [0.7, 2.5, 6.0, 10.0])
def test_pact_forward_matches_formula(bits: int, alpha: float) -> None:
    levels = 2**bits - 1
    x = pact_input(alpha, seed=bits)
    out = pact_quantize(x, torch.tensor(alpha, dtype=torch.float64), bits)
    assert out.dtype == torch.float64 and out.shape == x.shape
    for xi, oi in zip(x.tolist(), out.tolist()):
        j = ref_pact_index(xi, alpha, bits)
        # Same level as the formula, and the value j * alpha / L up to the last bit of a float64 product.
        assert round(oi * levels / alpha) == j
        assert math.isclose(oi, ref_pact(xi, alpha, bits), rel_tol=1e-15, abs_tol=0.0)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pact_forward_exact_with_unit_step_and_half_to_even(bits: int) -> None:
    # alpha = 2**k - 1 makes the step exactly 1, so the output is round(clip(x, 0, alpha)) exactly, ties to even.
    levels = 2**bits - 1
    alpha = float(levels)
    xs = [-1.0, -0.5, 0.0, 0.25, 0.5, 1.5, 2.5, levels - 0.5, levels - 0.25, float(levels), levels + 0.5, 100.0]
    out = pact_quantize(torch.tensor(xs, dtype=torch.float64), torch.tensor(alpha, dtype=torch.float64), bits)
    expected = [float(round(min(max(v, 0.0), alpha))) for v in xs]
    assert out.tolist() == expected
    assert out.tolist() == [ref_pact(v, alpha, bits) for v in xs]
    # Half to even, spelled out: 0.5 -> 0, and (where in range) 1.5 -> 2, 2.5 -> 2.
    assert out[3].item() == 0.0 and out[4].item() == 0.0
    if levels >= 3:
        assert out[5].item() == 2.0 and out[6].item() == 2.0


def test_pact_forward_hand_computed_case() -> None:
    # k = 2, alpha = 3: step 1. clip then round half to even.
    x = torch.tensor([-2.0, 0.4, 0.6, 1.5, 2.49, 2.5, 2.51, 7.0], dtype=torch.float64)
    out = pact_quantize(x, torch.tensor(3.0, dtype=torch.float64), 2)
    assert out.tolist() == [0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("bits", range(1, 9))
def test_pact_output_values_are_the_levels(bits: int) -> None:
    levels = 2**bits - 1
    alpha = 2.5
    x = pact_input(alpha, n=20_000, seed=100 + bits)
    out = pact_quantize(x, torch.tensor(alpha, dtype=torch.float64), bits)
    values = sorted(set(out.tolist()))
    assert len(values) <= 2**bits
    # Dense input: every level is hit, 0 and alpha included.
    assert len(values) == 2**bits
    for j, v in enumerate(values):
        assert math.isclose(v, j * alpha / levels, rel_tol=1e-15, abs_tol=0.0)
    assert values[0] == 0.0


@pytest.mark.parametrize("bits", range(1, 9))
def test_pact_float32_output_exactly_on_levels(bits: int) -> None:
    levels = 2**bits - 1
    # A step of 2**-3 is exact in float32, and so is every j * step: the levels are known exactly.
    alpha = levels / 8.0
    x = pact_input(alpha, n=20_000, seed=200 + bits).to(torch.float32)
    out = pact_quantize(x, torch.tensor(alpha, dtype=torch.float32), bits)
    assert out.dtype == torch.float32
    exact_levels = {j / 8.0 for j in range(levels + 1)}
    assert set(out.tolist()) == exact_levels
    # And the same level as the formula for every element.
    assert out.tolist() == [ref_pact(v, alpha, bits) for v in x.tolist()]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_float32_general_alpha_has_no_spurious_values(bits: int) -> None:
    # alpha = 0.7 (its step is not exact in float32): still at most 2**k distinct values (no `x + (q - x).detach()`
    # residue), each within one float32 rounding of j * alpha / L, one value per level.
    levels = 2**bits - 1
    alpha32 = torch.tensor(0.7, dtype=torch.float32)
    alpha = alpha32.item()  # the float32 value, as a Python float
    x = pact_input(alpha, n=20_000, seed=300 + bits).to(torch.float32)
    out = pact_quantize(x, alpha32, bits)
    values = sorted(set(out.tolist()))
    assert len(values) == 2**bits
    eps32 = torch.finfo(torch.float32).eps
    for j, v in enumerate(values):
        assert math.isclose(v, j * alpha / levels, rel_tol=2 * eps32, abs_tol=0.0)


def test_pact_bf16_input() -> None:
    # k = 4, alpha = 15/8: step 1/8 and scale 8 are exact in bfloat16, so the output equals the float64 formula.
    bits, alpha = 4, 15 / 8
    x = pact_input(alpha, n=2000, seed=5).to(torch.bfloat16).requires_grad_(True)
    a = torch.tensor([alpha], dtype=torch.float32, requires_grad=True)
    out = pact_quantize(x, a, bits)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert out.tolist() == [ref_pact(v, alpha, bits) for v in x.tolist()]
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16
    assert a.grad is not None and a.grad.dtype == torch.float32 and a.grad.shape == (1,)
    xs = x.detach().tolist()
    assert x.grad.tolist() == [1.0 if 0 <= v < alpha else 0.0 for v in xs]
    # The alpha gradient is reduced in the input dtype (as autograd does for any bf16 op), so it is the count of
    # saturated elements up to bfloat16 rounding (8 significant bits).
    saturated = sum(1.0 for v in xs if v >= alpha)
    assert saturated > 256  # large enough that bf16 rounding is visible: the tolerance below is needed and enough
    assert a.grad.item() == pytest.approx(saturated, rel=2**-8)


# ------------------------------------------------------------------------------------------------ PACT backward


def test_pact_gradients_with_boundaries() -> None:
    alpha = 2.0
    xs = [-3.0, -1e-12, 0.0, 1e-12, 0.7, 1.999999, 2.0, 2.0 + 1e-12, 5.0, 1.2, 2.0, -0.0]
    upstream = [0.5 + 1.7 * i - 0.13 * i * i for i in range(len(xs))]  # non-uniform, mixed sign
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    out = pact_quantize(x, a, 3)
    out.backward(torch.tensor(upstream, dtype=torch.float64))
    expected_x = [g if 0.0 <= v < alpha else 0.0 for v, g in zip(xs, upstream)]
    expected_a = math.fsum(g for v, g in zip(xs, upstream) if v >= alpha)
    assert x.grad.tolist() == expected_x
    assert math.isclose(a.grad.item(), expected_a, rel_tol=1e-14)
    # The pinned convention: x == 0 (and -0.0) passes to x, x == alpha goes to alpha only.
    assert x.grad[2].item() == upstream[2] and x.grad[11].item() == upstream[11]
    assert x.grad[6].item() == 0.0 and x.grad[10].item() == 0.0
    assert expected_a != math.fsum(g for v, g in zip(xs, upstream) if v > alpha)  # the x == alpha terms matter


@pytest.mark.parametrize("bits", [1, 2, 5, 8])
def test_pact_gradients_random(bits: int) -> None:
    alpha = 1.3
    x = pact_input(alpha, n=3000, seed=400 + bits).requires_grad_(True)
    g = torch.randn(3000, dtype=torch.float64, generator=torch.Generator().manual_seed(bits))
    a = torch.tensor([alpha], dtype=torch.float64, requires_grad=True)
    pact_quantize(x, a, bits).backward(g)
    xs, gs = x.detach().tolist(), g.tolist()
    assert x.grad.tolist() == [gi if 0 <= v < alpha else 0.0 for v, gi in zip(xs, gs)]
    assert a.grad.shape == (1,)
    assert math.isclose(a.grad.item(), math.fsum(gi for v, gi in zip(xs, gs) if v >= alpha), rel_tol=1e-12)


def test_pact_alpha_gradient_not_hidden_by_rounding() -> None:
    # Values just below alpha round up to the level alpha, but they are inside the clip: gradient to x, not alpha.
    alpha = 1.0
    x = torch.tensor([0.99, 0.999, 1.0, 1.01], dtype=torch.float64, requires_grad=True)
    a = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    out = pact_quantize(x, a, 2)
    assert out.tolist() == [1.0, 1.0, 1.0, 1.0]
    out.backward(torch.tensor([1.0, 10.0, 100.0, 1000.0], dtype=torch.float64))
    assert x.grad.tolist() == [1.0, 10.0, 0.0, 0.0]
    assert a.grad.item() == 1100.0


def test_pact_nan_gives_nan_and_no_gradient() -> None:
    x = torch.tensor([float("nan"), 0.5, float("nan"), 3.0], dtype=torch.float64, requires_grad=True)
    a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    out = pact_quantize(x, a, 4)
    assert math.isnan(out[0].item()) and math.isnan(out[2].item())
    assert out[1].item() == ref_pact(0.5, 2.0, 4) and out[3].item() == 2.0
    out.backward(torch.tensor([7.0, 2.0, 5.0, 3.0], dtype=torch.float64))
    assert x.grad.tolist() == [0.0, 2.0, 0.0, 0.0]
    assert a.grad.item() == 3.0  # only the saturated 3.0; the NaNs add nothing (and no NaN)


def test_pact_infinities() -> None:
    x = torch.tensor([float("-inf"), float("inf")], dtype=torch.float64, requires_grad=True)
    a = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    out = pact_quantize(x, a, 3)
    assert out.tolist() == [0.0, 1.5]
    out.backward(torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert x.grad.tolist() == [0.0, 0.0]
    assert a.grad.item() == 3.0


# ------------------------------------------------------------------------------------------------ PACTActivation


def test_pact_activation_sites_take_turns_and_reset() -> None:
    m = PACTActivation(bits=2, num_sites=2, alpha_init=1.0)
    assert m.alpha.shape == (2,)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([1.0, 3.0]))
    x = torch.tensor([2.4, 0.6, 5.0])
    # site 0: alpha 1, step 1/3; site 1: alpha 3, step 1.
    site0 = [ref_pact(v, 1.0, 2) for v in x.tolist()]
    site1 = [ref_pact(v, 3.0, 2) for v in x.tolist()]
    assert site0 != site1
    assert m(x).tolist() == pytest.approx(site0, rel=1e-6)
    assert m(x).tolist() == pytest.approx(site1, rel=1e-6)
    assert m(x).tolist() == pytest.approx(site0, rel=1e-6)  # wraps around to the first site
    m.reset_sites()
    assert m(x).tolist() == pytest.approx(site0, rel=1e-6)
    m.reset_sites()
    assert m(x).tolist() == pytest.approx(site0, rel=1e-6)  # reset after a single call goes back to site 0 too


def test_pact_activation_gradients_land_on_their_site() -> None:
    m = PACTActivation(bits=3, num_sites=2, alpha_init=1.0)
    with torch.no_grad():
        m.alpha.copy_(torch.tensor([1.0, 3.0]))
    x0 = torch.tensor([2.0, 0.5, 1.0, -1.0])
    x1 = torch.tensor([4.0, 5.0, 1.0, 2.9])
    c0 = torch.tensor([0.25, 7.0, 2.0, 11.0])
    c1 = torch.tensor([3.0, 0.5, 13.0, 17.0])
    y0 = m(x0)
    y1 = m(x1)
    ((y0 * c0).sum() + (y1 * c1).sum()).backward()
    # site 0 saturates at x >= 1 (2.0 and 1.0), site 1 at x >= 3 (4.0 and 5.0).
    assert m.alpha.grad.tolist() == [0.25 + 2.0, 3.0 + 0.5]


def test_pact_activation_single_site_shape_and_grad() -> None:
    m = PACTActivation(bits=4, alpha_init=2.0)
    assert m.alpha.shape == (1,) and m.alpha.item() == 2.0
    x = torch.tensor([-1.0, 1.0, 2.0, 3.0], requires_grad=True)
    m(x).backward(torch.tensor([1.0, 2.0, 4.0, 8.0]))
    assert m.alpha.grad.tolist() == [12.0]
    assert x.grad.tolist() == [0.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("bad_alpha", [0.0, -5.0, 1e-9])
def test_pact_activation_alpha_clamped_away_from_zero(bad_alpha: float) -> None:
    m = PACTActivation(bits=4, alpha_init=1.0)
    with torch.no_grad():
        m.alpha.fill_(bad_alpha)
    x = torch.tensor([-1.0, 0.0, 1e-4, 0.5, 3.0])
    out = m(x)
    assert torch.isfinite(out).all()
    clip = torch.tensor(MIN_ALPHA, dtype=torch.float32).item()
    assert out.max().item() == pytest.approx(clip, rel=1e-6)
    assert out.tolist() == pytest.approx([ref_pact(v, clip, 4) for v in x.tolist()], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("bits", [0, 17, 2.5, True, None, "4"])
def test_pact_activation_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        PACTActivation(bits=bits)  # type: ignore[arg-type]


@pytest.mark.parametrize("alpha_init", [0, -1, 0.0, float("nan"), float("inf"), True])
def test_pact_activation_rejects_bad_alpha_init(alpha_init: object) -> None:
    with pytest.raises(ValueError, match="alpha_init"):
        PACTActivation(bits=4, alpha_init=alpha_init)  # type: ignore[arg-type]


@pytest.mark.parametrize("num_sites", [0, -1, 1.5, True])
def test_pact_activation_rejects_bad_num_sites(num_sites: object) -> None:
    with pytest.raises(ValueError, match="num_sites"):
        PACTActivation(bits=4, num_sites=num_sites)  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [0, 17, 2.5, True])
def test_dorefa_weight_rejects_bad_bits(bits: object) -> None:
    with pytest.raises(ValueError, match="bits"):
        DoReFaWeight(bits)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ DoReFa forward


def dorefa_weight(seed: int, n: int = 257) -> Tensor:
    w = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 0.6
    top = w.abs().topk(2).values
    assert top[0] - top[1] > 1e-3  # a unique arg-max of |tanh(w)|
    return w


@pytest.mark.parametrize("bits", range(1, 9))
def test_dorefa_forward_matches_formula(bits: int) -> None:
    levels = 2**bits - 1
    w = dorefa_weight(bits)
    out = dorefa_quantize_weight(w, bits)
    assert out.dtype == torch.float64 and out.shape == w.shape
    ref = ref_dorefa(w.tolist(), bits)
    for oi, ri in zip(out.tolist(), ref):
        assert round((oi + 1) * levels / 2) == round((ri + 1) * levels / 2)  # same level index
        assert math.isclose(oi, ri, rel_tol=1e-15, abs_tol=1e-15)


@pytest.mark.parametrize("bits", range(1, 9))
def test_dorefa_values_are_the_levels(bits: int) -> None:
    levels = 2**bits - 1
    w = torch.randn(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(50 + bits))
    out = dorefa_quantize_weight(w, bits)
    values = sorted(set(out.tolist()))
    assert len(values) <= 2**bits
    for v in values:
        j = round((v + 1) * levels / 2)
        assert 0 <= j <= levels
        assert math.isclose(v, 2 * j / levels - 1, rel_tol=0.0, abs_tol=1e-15)
    # The arg-max of |tanh| sits exactly on an end level.
    i = int(w.abs().argmax())
    assert out[i].item() == math.copysign(1.0, w[i].item())


def test_dorefa_hand_computed_case() -> None:
    # tanh(w) = [0.8, -0.4, 0.2, 0]: max 0.8, r = t / 1.6 + 0.5 = [1, 0.25, 0.625, 0.5].
    # k = 2 (L = 3): 3r = [3, 0.75, 1.875, 1.5] -> round [3, 1, 2, 2 (half to even)] -> 2 q / 3 - 1.
    w = torch.tensor([math.atanh(0.8), math.atanh(-0.4), math.atanh(0.2), 0.0], dtype=torch.float64)
    out = dorefa_quantize_weight(w, 2)
    assert out.tolist() == pytest.approx([1.0, -1 / 3, 1 / 3, 1 / 3], abs=1e-15)
    # k = 1 (L = 1): r = [1, 0.25, 0.625, 0.5] -> round [1, 0, 1, 0 (half to even)] -> [1, -1, 1, -1].
    assert dorefa_quantize_weight(w, 1).tolist() == [1.0, -1.0, 1.0, -1.0]


def test_dorefa_is_scale_free_and_handles_zero_weight() -> None:
    w = torch.tensor([0.3, -0.1, 0.05], dtype=torch.float64)
    # Output lies in [-1, 1] whatever the weight scale.
    assert dorefa_quantize_weight(w * 100, 4).abs().max().item() <= 1.0
    zero = torch.zeros(6, dtype=torch.float64)
    out = dorefa_quantize_weight(zero, 4)
    # r = 0.5 everywhere; 15 * 0.5 = 7.5 -> 8 (half to even) -> 2 * 8 / 15 - 1.
    assert torch.isfinite(out).all()
    assert out.tolist() == pytest.approx([2 * 8 / 15 - 1] * 6, abs=1e-15)


def test_dorefa_float32_exact_levels() -> None:
    w = torch.randn(4000, generator=torch.Generator().manual_seed(3))
    out = dorefa_quantize_weight(w, 3)
    assert out.dtype == torch.float32
    levels32 = {torch.tensor(2 * j / 7 - 1, dtype=torch.float32).item() for j in range(8)}
    values = set(out.tolist())
    assert len(values) <= 8
    for v in values:
        assert min(abs(v - lv) for lv in levels32) <= 2 * torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------------ DoReFa backward


def dorefa_surrogate(w: Tensor) -> Tensor:
    """The DoReFa map with the rounding removed: the STE makes its gradient the quantizer's gradient."""
    t = torch.tanh(w)
    return 2 * (t / (2 * t.abs().max()) + 0.5) - 1


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_gradient_matches_hand_derivation(bits: int) -> None:
    w = dorefa_weight(600 + bits, n=41).requires_grad_(True)
    c = torch.randn(41, dtype=torch.float64, generator=torch.Generator().manual_seed(bits))
    (grad,) = torch.autograd.grad((c * dorefa_quantize_weight(w, bits)).sum(), w)

    ws, cs = w.detach().tolist(), c.tolist()
    t = [math.tanh(v) for v in ws]
    m_idx = max(range(len(t)), key=lambda i: abs(t[i]))
    big_m = abs(t[m_idx])
    # sum_i c_i (2 (t_i / (2M) + 0.5) - 1) = sum_i c_i t_i / M.
    expected = [cs[i] * 2 * (1 / (2 * big_m)) * (1 - t[i] ** 2) for i in range(len(t))]
    # The arg-max also moves M: d/dw_m of (-sum_i c_i t_i / M) ... = -sum_i c_i t_i / M^2 * sign(t_m) (1 - t_m^2).
    sign = math.copysign(1.0, t[m_idx])
    expected[m_idx] -= math.fsum(ci * ti for ci, ti in zip(cs, t)) / big_m**2 * sign * (1 - t[m_idx] ** 2)
    assert grad.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)

    # The same as autograd through the rounding-free surrogate...
    (surrogate_grad,) = torch.autograd.grad((c * dorefa_surrogate(w)).sum(), w)
    assert torch.allclose(grad, surrogate_grad, rtol=1e-13, atol=1e-13)

    # ... and as central finite differences of that surrogate in float64.
    h = 1e-6
    with torch.no_grad():
        for i in range(len(ws)):
            e = torch.zeros_like(w)
            e[i] = h
            fd = ((c * dorefa_surrogate(w + e)).sum() - (c * dorefa_surrogate(w - e)).sum()) / (2 * h)
            assert fd.item() == pytest.approx(grad[i].item(), rel=1e-6, abs=1e-7)


def test_dorefa_weight_module_forward_and_grad() -> None:
    q = DoReFaWeight(2)
    w = torch.tensor([math.atanh(0.8), math.atanh(-0.4), math.atanh(0.2), 0.0], dtype=torch.float64)
    w.requires_grad_(True)
    out = q(w)
    assert out.tolist() == pytest.approx([1.0, -1 / 3, 1 / 3, 1 / 3], abs=1e-15)
    out.sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and (w.grad != 0).any()


def test_alpha_below_the_floor_still_gets_a_gradient() -> None:
    m = PACTActivation(bits=2, alpha_init=1.0)
    with torch.no_grad():
        m.alpha.fill_(-0.5)  # e.g. pushed there by weight decay
    m(torch.tensor([2.0, 3.0])).sum().backward()
    assert m.alpha.grad.tolist() == [2.0]  # both points are clipped: each sends 1 to alpha, so it can come back
