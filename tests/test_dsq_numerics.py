"""Numerics of DSQ: the functional against a plain-``math`` reference written from the paper, and the modules.

The reference below is deliberately written in the paper's notation (``k``, ``s``, ``m_i``, ``phi``) with Python
floats, while the implementation works in units of bins with ``c = k * Delta`` and a series for small ``c``; the
two share no code.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from lightning_quant.functional import dsq
from lightning_quant.functional.checks import check_bits, check_positive
from lightning_quant.functional.dsq import (
    ALPHA_EPS,
    dsq_quantize,
)
from lightning_quant.quantizers.dsq import DSQActivation, DSQWeight

F64 = torch.float64


def dsq_soft(
    x: torch.Tensor,
    lower: torch.Tensor | float,
    upper: torch.Tensor | float,
    alpha: torch.Tensor | float,
    bits: int,
    min_width: float = dsq.DEFAULT_MIN_WIDTH,
) -> torch.Tensor:
    """The soft value ``Q_s`` (``l`` below the range, ``u`` above), built from ordinary differentiable ops: the
    oracle of this file. Its autograd gradient is, by construction, what ``dsq_quantize`` backpropagates; it serves
    as an independent check of that analytic backward. NaN in ``x`` passes through with zero
    gradient to the bounds, as in :func:`dsq_quantize`.

    Args:
        x: Input of any shape and floating dtype.
        lower: Lower bound ``l`` (tensor or float).
        upper: Upper bound ``u`` (tensor or float).
        alpha: Characteristic variable in ``(0, 1)`` (tensor or float).
        bits: Bit width, an int in 1..16.
        min_width: Smallest range width, as in :func:`dsq_quantize`.

    Returns:
        ``Q_s(x)`` in the compute dtype (the promotion of the inputs' dtypes, at least float32).

    Raises:
        ValueError: If ``bits`` is not an int in 1..16 or ``min_width`` is not a finite number > 0.
    """
    check_bits(bits, "bits")
    check_positive(min_width, "min_width")
    lo, up, al = dsq._as_tensor(lower, x), dsq._as_tensor(upper, x), dsq._as_tensor(alpha, x)
    dtype = dsq._compute_dtype(x.dtype, lo.dtype, up.dtype, al.dtype)
    xc, lo, up, al = x.to(dtype), lo.to(dtype), up.to(dtype), al.to(dtype)
    n = 2**bits - 1
    # Same guard as the forward, with the gradient passed straight through it to `upper` (values from the guard,
    # gradients as if Delta = (u - l) / n), matching the analytic backward.
    up_guard, delta_guard = dsq._range(lo.detach(), up.detach(), n, min_width)
    up_eff = up + (up_guard - up).detach()
    delta_raw = (up - lo) / n
    delta = delta_raw + (delta_guard - delta_raw).detach()

    inside = (xc >= lo) & (xc <= up_eff)
    xs = torch.where(inside, xc, lo)
    t = (xs - lo) / delta
    i = torch.floor(t.detach()).clamp(0, n - 1)
    centre = lo + (i + 0.5) * delta
    _, c = dsq._sharpness(al)
    k = c / delta
    s = 1.0 / torch.tanh(0.5 * c)
    phi = s * torch.tanh(k * (xs - centre))
    q_soft = lo + delta * (i + (phi + 1.0) / 2.0)
    clipped = torch.where(xc < lo, lo, up_eff)
    out = torch.where(inside, q_soft, clipped)
    return torch.where(torch.isnan(xc), xc, out)


def levels_of(lower: torch.Tensor, upper: torch.Tensor, bits: int) -> torch.Tensor:
    """The paper's ``2^bits`` levels ``l + j * Delta``, the top one ``u`` itself (as the forward computes them)."""
    n = 2**bits - 1
    idx = torch.arange(n + 1, dtype=lower.dtype)
    return torch.where(idx >= n, upper, lower + idx * ((upper - lower) / n))


# --------------------------------------------------------------------------------------------------------------------
# Reference (plain math, the paper's formulas)
# --------------------------------------------------------------------------------------------------------------------


def _ref_parts(x: float, lo: float, up: float, alpha: float, bits: int) -> tuple:
    n = 2**bits - 1
    delta = (up - lo) / n
    k = math.log(2.0 / alpha - 1.0) / delta
    s = 1.0 / math.tanh(0.5 * k * delta)
    i = min(max(math.floor((x - lo) / delta), 0), n - 1)
    m = lo + (i + 0.5) * delta
    return n, delta, k, s, i, m


def ref_hard(x: float, lo: float, up: float, alpha: float, bits: int) -> float:
    if x <= lo:
        return lo
    if x >= up:
        return up
    n, delta, k, s, i, m = _ref_parts(x, lo, up, alpha, bits)
    phi = s * math.tanh(k * (x - m))
    if phi > 0:
        j = i + 1
    elif phi < 0:
        j = i
    else:  # sgn(0): half to even on the level index
        j = i if i % 2 == 0 else i + 1
    return up if j == n else lo + j * delta


def ref_soft(x: float, lo: float, up: float, alpha: float, bits: int) -> float:
    if x < lo:
        return lo
    if x > up:
        return up
    _, delta, k, s, i, m = _ref_parts(x, lo, up, alpha, bits)
    phi = s * math.tanh(k * (x - m))
    return lo + delta * (i + (phi + 1.0) / 2.0)


def ref_grads(x: float, lo: float, up: float, alpha: float, bits: int) -> tuple[float, float, float, float]:
    """Hand-derived (dQ/dx, dQ/dl, dQ/du, dQ/dalpha) of the soft value, bin held fixed."""
    if x < lo:
        return 0.0, 1.0, 0.0, 0.0
    if x > up:
        return 0.0, 0.0, 1.0, 0.0
    n, delta, k, s, i, m = _ref_parts(x, lo, up, alpha, bits)
    c = k * delta
    z = k * (x - m)
    sech2 = 1.0 / math.cosh(z) ** 2
    phi = s * math.tanh(z)
    dx = 0.5 * delta * s * k * sech2

    # z = c (x - m) / Delta with m = l + (i + 1/2) Delta and Delta = (u - l) / n.
    def dz(dm: float, ddelta: float) -> float:
        return c * (-dm / delta - (x - m) * ddelta / delta**2)

    du = (1.0 / n) * (i + (phi + 1) / 2) + 0.5 * delta * s * sech2 * dz((i + 0.5) / n, 1.0 / n)
    dl = 1.0 - (1.0 / n) * (i + (phi + 1) / 2) + 0.5 * delta * s * sech2 * dz(1.0 - (i + 0.5) / n, -1.0 / n)
    # s = coth(c / 2), c = log(2 / alpha - 1).
    ds_dc = -0.5 / math.sinh(0.5 * c) ** 2
    dc_dalpha = -2.0 / (alpha * (2.0 - alpha))
    dalpha = 0.5 * delta * (ds_dc * math.tanh(z) + s * sech2 * (x - m) / delta) * dc_dalpha
    return dx, dl, du, dalpha


def _points(lo: float, up: float, bits: int, count: int, seed: int) -> list[float]:
    """Random points around [lo, up], kept away from bin centres (where the rounding direction is a float tie)."""
    rng = random.Random(seed)
    n = 2**bits - 1
    delta = (up - lo) / n
    out = []
    while len(out) < count:
        x = rng.uniform(lo - 0.3 * (up - lo), up + 0.3 * (up - lo))
        frac = (x - lo) / delta % 1.0
        if abs(frac - 0.5) > 1e-6:
            out.append(x)
    return out


def _t(v: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(v, dtype=F64, requires_grad=grad)


def _grads(x: torch.Tensor, lo: float, up: float, alpha: float, bits: int, fn=dsq_quantize) -> list[torch.Tensor]:
    """Per-element gradients: bounds and alpha broadcast to x's shape, so each element has its own copy."""
    xs = x.detach().clone().requires_grad_()
    lt, ut, at = (torch.full_like(xs, v).requires_grad_() for v in (lo, up, alpha))
    fn(xs, lt, ut, at, bits).sum().backward()
    return [xs.grad, lt.grad, ut.grad, at.grad]


LO, UP = -0.7, 2.3  # a range whose Delta is not a dyadic number


# --------------------------------------------------------------------------------------------------------------------
# Forward values
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 9))
def test_hard_forward_equals_reference_exactly(bits: int) -> None:
    xs = _points(LO, UP, bits, 300, seed=bits)
    out = dsq_quantize(torch.tensor(xs, dtype=F64), _t(LO), _t(UP), _t(0.2), bits)
    expected = torch.tensor([ref_hard(x, LO, UP, 0.2, bits) for x in xs], dtype=F64)
    assert torch.equal(out, expected)
    levels = levels_of(_t(LO), _t(UP), bits)
    assert levels.numel() == 2**bits
    assert torch.isin(out, levels).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 0.9])
def test_soft_value_matches_reference(bits: int, alpha: float) -> None:
    xs = _points(LO, UP, bits, 100, seed=10 + bits)
    out = dsq_soft(torch.tensor(xs, dtype=F64), _t(LO), _t(UP), _t(alpha), bits)
    expected = torch.tensor([ref_soft(x, LO, UP, alpha, bits) for x in xs], dtype=F64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_boundaries_bin_edges_and_centres() -> None:
    # l = 0, u = 3, 2 bits: Delta = 1, levels 0..3, centres 0.5, 1.5, 2.5 (exact in binary).
    lo, up = _t(0.0), _t(3.0)
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0], dtype=F64)
    out = dsq_quantize(x, lo, up, _t(0.2), 2)
    # x <= l -> l, edges -> themselves, centres half-to-even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2), x >= u -> u.
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0]
    # The ends are the bounds bit for bit, also for a non-dyadic range.
    lo2, up2 = _t(LO), _t(UP)
    ends = dsq_quantize(torch.tensor([LO, UP, LO - 1, UP + 1], dtype=F64), lo2, up2, _t(0.2), 5)
    assert ends.tolist() == [LO, UP, LO, UP]


def test_gradient_conventions_at_the_range_ends() -> None:
    alpha, bits = 0.2, 3
    c = math.log(2 / alpha - 1)
    edge = c / math.sinh(c)
    gx, gl, gu, _ = _grads(torch.tensor([LO, UP, LO - 1e-9, UP + 1e-9], dtype=F64), LO, UP, alpha, bits)
    # x = l: one-sided soft slope to x, the rest of the unit to l; x = u symmetric; just outside: all to the bound.
    torch.testing.assert_close(gx, torch.tensor([edge, edge, 0.0, 0.0], dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gl, torch.tensor([1 - edge, 0.0, 1.0, 0.0], dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gu, torch.tensor([0.0, 1 - edge, 0.0, 1.0], dtype=F64), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 0.9])
def test_gradients_match_hand_derivation(bits: int, alpha: float) -> None:
    xs = _points(LO, UP, bits, 80, seed=100 + bits)
    got = _grads(torch.tensor(xs, dtype=F64), LO, UP, alpha, bits)
    expected = list(zip(*(ref_grads(x, LO, UP, alpha, bits) for x in xs)))
    for name, g, e in zip(("x", "lower", "upper", "alpha"), got, expected):
        torch.testing.assert_close(g, torch.tensor(e, dtype=F64), rtol=1e-9, atol=1e-10, msg=name)
    # Shifting x, l and u together shifts the output: the three gradients sum to 1 everywhere.
    torch.testing.assert_close(got[0] + got[1] + got[2], torch.ones(len(xs), dtype=F64), rtol=0, atol=1e-10)


def test_analytic_backward_equals_autograd_of_soft_with_broadcast_bounds() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, generator=gen, dtype=F64) * 2
    # Per-channel bounds and alpha (shape (3, 1)) exercise the sum over broadcast dimensions.
    lo = torch.tensor([[-1.0], [-0.3], [0.2]], dtype=F64)
    up = torch.tensor([[1.5], [2.0], [0.9]], dtype=F64)
    al = torch.tensor([[0.1], [0.4], [0.7]], dtype=F64)
    weight = torch.randn(4, 3, 5, generator=gen, dtype=F64)
    results = []
    for fn in (dsq_quantize, dsq_soft):
        leaves = [t.clone().requires_grad_() for t in (x, lo, up, al)]
        (fn(*leaves, 4) * weight).sum().backward()
        results.append([t.grad for t in leaves])
    for a, b in zip(*results):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_of_the_soft_function() -> None:
    # Points inside the range, away from its ends (the clip is a kink there, as it should be).
    x = torch.tensor([-0.61, -0.2, 0.13, 0.55, 0.91, 1.37, 1.8, 2.21], dtype=F64, requires_grad=True)
    lo, up, al = _t(LO, True), _t(UP, True), _t(0.3, True)
    assert torch.autograd.gradcheck(lambda *a: dsq_soft(*a, 3), (x, lo, up, al), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.01, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("bits", [2, 8])
def test_slope_at_centre_and_integral_over_a_bin(alpha: float, bits: int) -> None:
    n = 2**bits - 1
    delta = (UP - LO) / n
    i = n // 2
    s = 1.0 / (1.0 - alpha)  # = 1 / tanh(0.5 * k * Delta)
    centre_slope = 0.5 * s * math.log(2 / alpha - 1)
    # Dense grid over bin i, including both edges (an odd count puts one sample on the centre).
    grid = torch.linspace(LO + i * delta, LO + (i + 1) * delta, 2001, dtype=F64)
    slope = _grads(grid, LO, UP, alpha, bits)[0]
    assert slope[1000].item() == pytest.approx(centre_slope, rel=1e-9)
    # Simpson's rule: the slope integrates to exactly one bin width, i.e. averages 1.
    h = delta / 2000
    integral = h / 3 * (slope[0] + slope[-1] + 4 * slope[1:-1:2].sum() + 2 * slope[2:-1:2].sum())
    assert integral.item() == pytest.approx(delta, rel=1e-6)
    # ...and the soft value runs from one level to the next across the bin.
    soft = dsq_soft(grid[[0, -1]], _t(LO), _t(UP), _t(alpha), bits)
    torch.testing.assert_close(soft, torch.tensor([LO + i * delta, LO + (i + 1) * delta], dtype=F64))


def test_gradient_depends_on_bits_and_tends_to_ste() -> None:
    x = torch.tensor([0.3, 0.77, 1.9], dtype=F64)
    g2 = _grads(x, 0.0, 2.0, 0.2, 2)[0]
    g8 = _grads(x, 0.0, 2.0, 0.2, 8)[0]
    # Under the STE both would be [1, 1, 1]; DSQ's gradient follows each bit width's own bins.
    assert (g2 - g8).abs().max() > 0.1
    # alpha -> 1: the gradient becomes the STE's, 1 inside the range, 0 outside, for any bit width.
    xs = torch.tensor([-0.5, 0.3, 0.77, 1.9, 2.5], dtype=F64)
    for bits in (2, 8):
        g = _grads(xs, 0.0, 2.0, 1 - 1e-6, bits)
        torch.testing.assert_close(g[0], torch.tensor([0.0, 1, 1, 1, 0], dtype=F64), rtol=0, atol=1e-9)
        # The range gradients tend to the clip's: 1 to the bound for clipped points, 0 inside.
        torch.testing.assert_close(g[1], torch.tensor([1.0, 0, 0, 0, 0], dtype=F64), rtol=0, atol=1e-9)
        torch.testing.assert_close(g[2], torch.tensor([0.0, 0, 0, 0, 1], dtype=F64), rtol=0, atol=1e-9)
    # alpha -> 0: a spike at the centre (0.5 * log(2 / alpha - 1) ~ 7.3), nearly flat a quarter bin away.
    spike = _grads(torch.tensor([0.5, 0.25], dtype=F64), 0.0, 3.0, 1e-6, 2)[0]
    assert spike[0] > 7.0 and spike[1] < 0.05


def test_alpha_gradient_accurate_near_one_in_float32() -> None:
    # Naive autograd of the soft formula cancels catastrophically here; the analytic backward must not.
    x = torch.linspace(0.01, 1.99, 101)
    for alpha in (0.99, 0.999, 0.99999):
        g32 = _alpha_grads(x, alpha, torch.float32)
        g64 = _alpha_grads(x.double(), alpha, F64)
        # Per element (a sum over a symmetric grid cancels to ~0 and would hide the error).
        assert (g32.double() - g64).abs().max() <= 1e-4 * g64.abs().max()
        assert g64.abs().max() > 0


def _alpha_grads(x: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    # The same float32 alpha for both dtypes, broadcast to x so that each element reports its own gradient.
    a = torch.full(x.shape, alpha, dtype=torch.float32).to(dtype).requires_grad_()
    dsq_quantize(x.to(dtype), torch.tensor(0.0, dtype=dtype), torch.tensor(2.0, dtype=dtype), a, 2).sum().backward()
    return a.grad


# --------------------------------------------------------------------------------------------------------------------
# Non-finite input, guards, dtypes
# --------------------------------------------------------------------------------------------------------------------


def test_nan_passes_through_and_does_not_poison_the_range() -> None:
    clean = torch.tensor([0.1, 0.6, 1.3, 1.9], dtype=F64)
    dirty = torch.cat([clean, torch.tensor([math.nan, math.inf, -math.inf], dtype=F64)])
    out = dsq_quantize(dirty, _t(0.0), _t(1.5), _t(0.3), 2)
    assert math.isnan(out[4].item())
    assert out[5].item() == 1.5 and out[6].item() == 0.0  # +-inf are clipped like any large value
    g_clean = _grads(clean, 0.0, 1.5, 0.3, 2)
    xs = dirty.clone().requires_grad_()
    lo, up, al = _t(0.0, True), _t(1.5, True), _t(0.3, True)
    # Even a NaN incoming gradient at the NaN element must not reach the bounds or alpha.
    upstream = torch.tensor([1.0, 1, 1, 1, math.nan, 1, 1], dtype=F64)
    torch.autograd.backward(dsq_quantize(xs, lo, up, al, 2), upstream)
    assert torch.isfinite(torch.stack([lo.grad, up.grad, al.grad])).all()
    torch.testing.assert_close(lo.grad, g_clean[1].sum() + 1.0)  # -inf clipped at l
    torch.testing.assert_close(up.grad, g_clean[2].sum() + 1.0)  # +inf clipped at u
    torch.testing.assert_close(al.grad, g_clean[3].sum())
    assert xs.grad[4:].tolist() == [0.0, 0.0, 0.0]
    # The soft function follows the same conventions.
    lo, up, al = _t(0.0, True), _t(1.5, True), _t(0.3, True)
    soft = dsq_soft(dirty, lo, up, al, 2)
    assert math.isnan(soft[4].item()) and soft[5].item() == 1.5 and soft[6].item() == 0.0
    torch.autograd.backward(soft, upstream)
    torch.testing.assert_close(torch.stack([lo.grad, up.grad]), torch.stack([g_clean[1].sum(), g_clean[2].sum()]) + 1)
    torch.testing.assert_close(al.grad, g_clean[3].sum())


def test_collapsed_range_and_extreme_alpha_stay_finite() -> None:
    x = torch.tensor([-1.0, 0.5, 0.5 + 1e-12, 2.0], dtype=F64)
    lo, up = _t(0.5, True), _t(0.5, True)  # u == l
    out = dsq_quantize(x, lo, up, _t(0.2), 4)
    assert torch.isfinite(out).all()
    assert ((out >= 0.5) & (out <= 0.5 + 1e-8)).all()
    out.sum().backward()
    # Straight through the guard: the point above the collapsed range still asks u to grow.
    assert up.grad.item() > 0.5 and torch.isfinite(lo.grad)
    # alpha at (or past) 0 and 1 is clamped, not a NaN.
    for alpha in (0.0, 1.0, -3.0):
        a = _t(alpha, True)
        y = dsq_quantize(torch.tensor([0.2, 0.7], dtype=F64), 0.0, 1.0, a, 2)
        y.sum().backward()
        assert torch.isfinite(y).all() and a.grad.item() == 0.0
    assert ALPHA_EPS > 0


def test_float32_output_is_exactly_on_the_levels() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10_000, generator=gen) * 3
    lo, up = torch.tensor(-2.1), torch.tensor(3.7)
    for bits in (2, 4):
        out = dsq_quantize(x, lo, up, torch.tensor(0.3), bits)
        levels = levels_of(lo, up, bits)
        assert levels.dtype == torch.float32
        assert torch.isin(out, levels).all()
        assert out.unique().numel() == 2**bits
    # For contrast, the usual detach trick leaves values that are not levels.
    q = dsq_quantize(x, lo, up, torch.tensor(0.3), 2)
    noisy = x + (q - x).detach()
    assert not torch.isin(noisy, levels_of(lo, up, 2)).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    x = (torch.linspace(-1, 3, 50)).to(dtype).requires_grad_()
    lo = torch.tensor(0.0, requires_grad=True)
    up = torch.tensor(2.0, requires_grad=True)
    out = dsq_quantize(x, lo, up, torch.tensor(0.2), 2)
    assert out.dtype == dtype
    # Each level rounded to the input dtype: still at most 2^bits values.
    assert out.unique().numel() <= 4
    ref = dsq_quantize(x.detach().float(), 0.0, 2.0, 0.2, 2)
    assert torch.equal(out, ref.to(dtype))
    out.float().sum().backward()
    assert x.grad.dtype == dtype and lo.grad.dtype == torch.float32
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(up.grad)


def test_functional_argument_validation() -> None:
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="`bits` must be an int in 1..16, got 0"):
        dsq_quantize(x, 0.0, 1.0, 0.2, 0)
    with pytest.raises(ValueError, match="`bits`.*got 17"):
        dsq_quantize(x, 0.0, 1.0, 0.2, 17)
    with pytest.raises(ValueError, match="`min_width` must be a finite number > 0, got 0.0"):
        dsq_quantize(x, 0.0, 1.0, 0.2, 2, min_width=0.0)


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


def test_activation_sites_keep_separate_ranges() -> None:
    m = DSQActivation(bits=2, num_sites=2).double()
    m.set_range(0, 0.0, 3.0)
    m.set_range(1, 0.0, 6.0)
    x = torch.tensor([-1.0, 0.9, 2.2, 7.0], dtype=F64)
    # Sites are taken in call order: the same input quantizes on each site's own range.
    assert m(x).tolist() == [0.0, 1.0, 2.0, 3.0]
    assert m(x).tolist() == [0.0, 0.0, 2.0, 6.0]
    m.reset_sites()
    m.zero_grad()
    m(x).sum().backward()  # site 0 only
    assert m.upper.grad[0].item() != 0.0 and m.upper.grad[1].item() == 0.0
    assert m.calibrated.tolist() == [True, True]


def test_activation_calibration_and_statistics() -> None:
    m = DSQActivation(bits=3, num_sites=3)
    assert m.lower.tolist() == [0.0] * 3 and m.upper.tolist() == [6.0] * 3
    x = torch.tensor([[-4.0, 0.5, 2.5], [9.0, math.nan, math.inf]])
    stats = m.range_statistics(x)
    assert stats.tolist() == [0.0, 9.0]  # after ReLU, non-finite ignored
    m.calibrate(x, 1)
    assert m.upper.tolist() == [6.0, 9.0, 6.0] and m.calibrated.tolist() == [False, True, False]
    assert m.range_statistics(torch.arange(1000.0), quantile=0.5)[1].item() == 499.0
    # A dead unit (all outputs 0) still gets a usable, non-empty range.
    dead = m.range_statistics(-torch.ones(10))
    assert dead[1] > dead[0]
    relu6 = DSQActivation(bits=3, relu6=True)
    assert relu6.range_statistics(x)[1].item() == 6.0
    assert relu6(torch.tensor([7.0, -1.0])).tolist() == [6.0, 0.0]
    with pytest.raises(ValueError, match="`site` must be an int in 0..2, got 3"):
        m.set_range(3, 0.0, 1.0)
    with pytest.raises(ValueError, match="`upper` must be >= `lower`"):
        m.set_range(0, 2.0, 1.0)
    with pytest.raises(ValueError, match="`lower` must be finite"):
        m.set_range(0, torch.tensor(math.nan), 1.0)
    with pytest.raises(ValueError, match=r"`quantile` must be a float in \(0, 1\]"):
        m.range_statistics(x, quantile=0.0)


def test_fixed_temperature_is_a_buffer_set_by_the_schedule() -> None:
    m = DSQActivation(bits=2, num_sites=2, temperature=0.3)
    assert "temperature" in dict(m.named_buffers()) and "temperature" not in dict(m.named_parameters())
    m.set_temperature(0.05)
    assert m.get_temperature().tolist() == pytest.approx([0.05, 0.05])
    # A sharper temperature changes the backward, not the forward.
    x = torch.tensor([0.4, 1.1, 2.6], requires_grad=True)
    m.set_range(0, 0.0, 3.0)
    y1 = m.quantize(x, 0)
    (g1,) = torch.autograd.grad(y1.sum(), x)
    m.set_temperature(0.9)
    y2 = m.quantize(x, 0)
    (g2,) = torch.autograd.grad(y2.sum(), x)
    assert torch.equal(y1, y2) and not torch.allclose(g1, g2)
    with pytest.raises(ValueError, match=r"`temperature` must be a float in the open interval \(0, 1\), got 1.5"):
        m.set_temperature(1.5)


def test_learned_temperature_stays_in_unit_interval_and_gets_gradient() -> None:
    m = DSQActivation(bits=2, num_sites=2, temperature=0.2, learn_temperature=True)
    assert "temperature_logit" in dict(m.named_parameters())
    assert m.get_temperature().tolist() == pytest.approx([0.2, 0.2])
    m.set_range(0, 0.0, 3.0)
    x = torch.linspace(-1, 4, 64)
    m.quantize(x, 0).pow(2).sum().backward()
    assert m.temperature_logit.grad[0].item() != 0.0 and m.temperature_logit.grad[1].item() == 0.0
    # Huge steps either way: alpha stays strictly inside (0, 1) and the forward stays finite.
    opt = torch.optim.SGD(m.parameters(), lr=1e4)
    for sign in (1.0, -1.0):
        m.temperature_logit.grad = torch.full((2,), sign * 10.0)
        opt.step()
        alpha = m.get_temperature()
        assert ((alpha > 0) & (alpha < 1)).all()
        assert torch.isfinite(m.quantize(x, 0)).all()
    m.set_temperature(0.4)
    assert m.get_temperature().tolist() == pytest.approx([0.4, 0.4])
    # Also for a bf16 module (bf16 has no number between 1 - 2e-6 and 1).
    m_bf16 = DSQActivation(bits=2, learn_temperature=True).to(torch.bfloat16)
    with torch.no_grad():
        m_bf16.temperature_logit.fill_(1e4)
    assert 0 < m_bf16.get_temperature().item() < 1


def test_weight_quantizer() -> None:
    w = torch.tensor([[-0.8, 0.1], [0.35, 1.2]], dtype=F64)
    q = DSQWeight(bits=2).double()
    assert q.lower.item() == -1.0 and q.upper.item() == 1.0 and not q.calibrated
    q.calibrate(w)
    assert (q.lower.item(), q.upper.item()) == (-0.8, 1.2) and bool(q.calibrated)
    out = q(w.clone().requires_grad_())
    expected = torch.tensor([[ref_hard(v, -0.8, 1.2, 0.2, 2) for v in row] for row in w.tolist()], dtype=F64)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert q.lower.grad is not None and q.upper.grad is not None
    assert q.range_statistics(torch.zeros(4))[1] > 0  # all-zero weights: a non-empty range
    learned = DSQWeight(bits=4, temperature=0.5, learn_temperature=True)
    learned.calibrate(torch.randn(8, 8))
    learned(torch.randn(8, 8)).sum().backward()
    assert learned.temperature_logit.grad is not None and learned.temperature_logit.shape == ()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, "`bits` must be an int in 1..16, got 0"),
        ({"bits": 2.0}, "`bits` must be an int in 1..16, got 2.0"),
        ({"bits": 4, "temperature": 0.0}, r"`temperature` must be a float in the open interval \(0, 1\), got 0.0"),
        ({"bits": 4, "temperature": 1.0}, r"`temperature`.*got 1.0"),
        ({"bits": 4, "learn_temperature": 1}, "`learn_temperature` must be a bool, got 1"),
    ],
)
def test_module_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DSQWeight(**kwargs)
    with pytest.raises(ValueError, match=match):
        DSQActivation(**kwargs)


def test_activation_specific_validation_and_repr() -> None:
    with pytest.raises(ValueError, match="`num_sites` must be an int >= 1, got 0"):
        DSQActivation(bits=4, num_sites=0)
    with pytest.raises(ValueError, match="`relu6` must be a bool, got 'yes'"):
        DSQActivation(bits=4, relu6="yes")
    text = repr(DSQActivation(bits=3, num_sites=2, relu6=True))
    assert "bits=3" in text and "num_sites=2" in text and "relu6=True" in text and "temperature=[0.2, 0.2]" in text
    assert "bits=5" in repr(DSQWeight(bits=5))


def test_modules_trace_as_one_graph() -> None:
    # Dynamo with the eager backend checks the forward has no graph break (e.g. no .item()) without the
    # minute-long inductor compile.
    m = DSQActivation(bits=3, learn_temperature=True)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    x = torch.linspace(-1, 7, 33, requires_grad=True)
    assert torch.equal(compiled(x), m(x))
    w = DSQWeight(bits=3)
    assert torch.equal(torch.compile(w, backend="eager", fullgraph=True)(x), w(x))
