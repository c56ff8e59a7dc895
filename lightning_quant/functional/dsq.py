r"""Differentiable Soft Quantization (DSQ; Gong et al., ICCV 2019) as plain torch functions.

Notation. A range ``[l, u]`` and ``b`` bits give ``n = 2^b - 1`` intervals of width ``Delta = (u - l) / n`` and the
``n + 1`` levels ``l + j * Delta`` (``j = 0..n``). For ``x`` inside the range, ``t = (x - l) / Delta`` is its position
in units of bins, ``i = clamp(floor(t), 0, n - 1)`` its bin and ``m_i = l + (i + 0.5) * Delta`` the bin centre. The
characteristic variable ``alpha`` in ``(0, 1)`` (the "temperature") fixes the steepness
``k = log(2 / alpha - 1) / Delta`` and ``s = 1 / tanh(0.5 * k * Delta)`` (``= 1 / (1 - alpha)``), and

* ``phi(x) = s * tanh(k * (x - m_i))`` (from -1 at the bin's left edge to +1 at its right edge),
* the soft value ``Q_s(x) = l + Delta * (i + (phi(x) + 1) / 2)`` (``dsq_soft`` in ``tests/test_dsq_numerics.py``),
* the hard value ``Q(x) = l + Delta * (i + (sgn(phi(x)) + 1) / 2)``, i.e. ``x`` rounded to the nearest level.

Writing ``c = k * Delta = log(2 / alpha - 1)`` (dimensionless), the slope is ``dQ_s/dx = 0.5 * s * c *
sech^2(k * (x - m_i))``: ``0.5 * s * log(2 / alpha - 1)`` at a bin centre, ``c / sinh(c)`` at a bin edge, and its
integral over a bin is exactly ``Delta`` (``Q_s`` runs from one level to the next), so the slope averages 1 per bin.
As ``alpha -> 1`` (``c -> 0``) ``Q_s(x) -> x`` and the gradient tends to the plain straight-through estimator; as
``alpha -> 0`` it tends to a spike at each bin centre.

Forward (what :func:`dsq_quantize` returns) -- the hard value, exactly:

* ``x <= l`` gives ``l`` and ``x >= u`` gives ``u`` (bit-exact copies of the bounds, ``-inf``/``+inf`` included);
  every other output is ``l + j * Delta`` computed as written, so a tensor holds at most ``2^b`` distinct values
  (no ``x + (q - x).detach()`` float noise: a custom autograd function returns ``q`` itself).
* Bin centres (``sgn(phi) = 0``): the level index ``t`` is rounded half to even, like ``torch.round`` (so with
  ``l = 0, Delta = 1``: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2). "Centre" means where the computed ``t`` is exactly
  ``i + 0.5``; ties are only exact where the float arithmetic makes them so.
* A bin edge ``x = l + j * Delta`` is itself a level and maps to it.
* NaN in ``x`` passes through as NaN (the quantizer does not hide upstream divergence).

Backward -- through the soft value ``Q_s`` (the paper's point: the hard step in the forward, the tanh curve in the
backward; MQBench and the re-implementations do the same), with the bin ``i`` held fixed:

* ``x`` in the closed range ``[l, u]``: ``dQ/dx = dQ_s/dx`` (one-sided at the ends: ``c / sinh(c)`` at ``x = l`` and
  at ``x = u``); ``x < l`` or ``x > u``: 0.
* ``l`` and ``u``: for ``x`` in ``[l, u]`` the full derivative of ``Q_s`` through its direct ``l`` term, ``Delta``
  and ``m_i`` (the *soft* value's direct term, not the hard one's). In closed form, with ``g = (phi + 1) / 2 - 0.5``,
  ``y = t - i - 0.5`` and ``g' = dQ_s/dx``::

      dQ/du = ((g - y) + t * (1 - g')) / n
      dQ/dl = 1 - g' - dQ/du

  so ``dQ/dl + dQ/du + dQ/dx = 1`` (shifting everything shifts the output) and both vanish in the STE limit
  (``Q_s = x`` no longer depends on the range). At the ends this splits the unit between ``x`` and the bound:
  at ``x = l``: ``dQ/dl = 1 - c / sinh(c)``, ``dQ/du = 0``; at ``x = u``: ``dQ/du = 1 - c / sinh(c)``, ``dQ/dl = 0``.
  A clipped point (``x < l``, ``x > u``, ``-inf``, ``+inf``) outputs the bound itself: gradient 1 to that bound,
  0 to the other and to ``x`` and ``alpha``.
* ``alpha``: ``dQ_s/dalpha`` for ``x`` in ``[l, u]`` (through ``c`` and ``s``), 0 for clipped points.
* NaN in ``x``: the element contributes exactly 0 to the gradients of ``x``, ``l``, ``u`` and ``alpha``, even where
  the incoming gradient is NaN, so one bad element cannot poison the learned range.

Guards (no data-dependent Python branches, so ``torch.compile`` sees one graph):

* ``alpha`` is clamped into ``[ALPHA_EPS, 1 - ALPHA_EPS]`` (its gradient is 0 outside, as ``torch.clamp`` does);
  ``c`` is computed as ``log1p(2 * (1 - alpha) / alpha)`` to stay accurate near ``alpha = 1``.
* If ``u - l < min_width`` (a collapsed or inverted range) the forward uses ``[l, l + min_width]``; the gradient
  computed for that upper bound is given to ``u`` (straight through the guard), so a collapsed range can reopen.
  A NaN bound is not guarded: the output becomes NaN, so a poisoned parameter shows.

Dtypes: the arithmetic runs in the promotion of ``x``'s, the bounds' and ``alpha``'s dtypes, at least float32
(bf16/fp16 inputs are upcast); the output is cast back to ``x``'s dtype, so under bf16 it holds each level rounded to
bf16 (still at most ``2^b`` distinct values). Each gradient is returned in its input's dtype.

Kernels: the custom ops ``lightning_quant::dsq_forward`` / ``dsq_backward`` (the replaced activation folded in): the
reference below (any broadcastable bounds, any dtype), the C kernels on CPU float32 with one range per tensor and
Triton on CUDA likewise; their forwards are bit-identical to the reference, their gradients agree to float32 rounding
(their own vectorized tanh).
"""

from __future__ import annotations

import ctypes
import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_quant.functional import native
from lightning_quant.functional._dispatch import define_op, register_autograd
from lightning_quant.functional.checks import check_bits, check_positive

__all__ = [
    "ALPHA_EPS",
    "DEFAULT_MIN_WIDTH",
    "dsq_quantize",
]

ALPHA_EPS = 1e-6
"""``alpha`` is clamped into ``[ALPHA_EPS, 1 - ALPHA_EPS]``: 0 and 1 themselves make ``k`` infinite or zero."""

DEFAULT_MIN_WIDTH = 1e-8
"""Smallest range width ``u - l`` the forward uses; keeps ``Delta > 0`` for a collapsed range."""

# Below these values of c the closed form of d g / d c cancels catastrophically (two terms ~ 1/c whose difference is
# ~ c); a three-term series is used instead. Chosen where series truncation and rounding errors cross (~1e-6 relative
# in float32, ~1e-12 in float64).
_SERIES_C = {torch.float32: 0.25, torch.float64: 0.03}

Bound = Tensor | float


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    dtype = torch.float32
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    return dtype


def _as_tensor(value: Bound, x: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    # Python floats are taken at x's precision (at least float32), not rounded through the default dtype.
    return torch.as_tensor(value, dtype=_compute_dtype(x.dtype), device=x.device)


def _sharpness(alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Return the clamped alpha and ``c = log(2 / alpha - 1)``, accurate near alpha = 1."""
    a = alpha.clamp(ALPHA_EPS, 1.0 - ALPHA_EPS)
    return a, torch.log1p(2.0 * (1.0 - a) / a)


def _range(lower: Tensor, upper: Tensor, n: int, min_width: float) -> tuple[Tensor, Tensor]:
    """Return the effective upper bound and the bin width under the collapsed-range guard."""
    width = upper - lower
    # `width < min_width` is False for NaN, so a NaN bound flows on into the output instead of being replaced.
    collapsed = width < min_width
    upper_eff = torch.where(collapsed, lower + min_width, upper)
    # The width comes from `min_width` itself, not from `upper_eff - lower`, which is 0 when min_width is below
    # the spacing of floats around `lower`.
    delta = torch.where(collapsed, torch.full_like(width, min_width), width) / n
    return upper_eff, delta


def _hard(x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor, bits: int, min_width: float) -> Tensor:
    """The exact forward value (no autograd)."""
    dtype = _compute_dtype(x.dtype, lower.dtype, upper.dtype, alpha.dtype)
    xc, lo, up = x.to(dtype), lower.to(dtype), upper.to(dtype)
    n = 2**bits - 1
    up_eff, delta = _range(lo, up, n, min_width)
    # maximum/minimum propagate NaN (x and bounds alike); -inf/+inf land on the bounds.
    t = (torch.minimum(torch.maximum(xc, lo), up_eff) - lo) / delta
    # sgn(phi) with sgn(0) resolved half-to-even is exactly rounding t (tanh keeps the sign of its argument).
    idx = torch.round(t).clamp(0, n)
    # The top level is `u` itself: `l + n * ((u - l) / n)` can miss it by an ulp.
    q = torch.where(idx >= n, up_eff, lo + idx * delta)
    shape = torch.broadcast_shapes(q.shape, alpha.shape)
    if shape != q.shape:
        # alpha does not change the value, but it takes part in the output shape like any broadcast operand.
        q = q.expand(shape)
    return q.to(x.dtype)


def _reduce_to(grad: Tensor, like: Tensor) -> Tensor:
    if grad.shape != like.shape:
        grad = grad.sum_to_size(like.shape)
    return grad.to(like.dtype)


_ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2}


def _activate(x: Tensor, activation: int) -> Tensor:
    """The activation DSQ replaces (0 none, 1 ReLU, 2 ReLU6), applied first."""
    return x if activation == 0 else (torch.relu(x) if activation == 1 else torch.clamp(x, 0.0, 6.0))


def _passes(x: Tensor, activation: int) -> Tensor | bool:
    """Where that activation passes its gradient, as ``threshold_backward`` / ``hardtanh_backward`` select it."""
    return True if activation == 0 else ((x > 0) if activation == 1 else (x > 0) & (x < 6))


def dsq_forward_reference(
    x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor, bits: int, min_width: float, activation: int
) -> Tensor:
    """The exact forward value in torch ops (bounds of any broadcastable shape, any floating dtype)."""
    return _hard(_activate(x, activation), lower, upper, alpha, bits, min_width)


def dsq_backward_reference(
    grad: Tensor,
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    alpha: Tensor,
    bits: int,
    min_width: float,
    activation: int,
    need_lower: bool,
    need_alpha: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``x``, ``lower``, ``upper`` and ``alpha`` through the soft value (module docstring); those
    of ``lower`` / ``alpha`` are zeros unless asked for."""
    dtype = _compute_dtype(x.dtype, lower.dtype, upper.dtype, alpha.dtype)
    xc, lo, up, al = _activate(x, activation).to(dtype), lower.to(dtype), upper.to(dtype), alpha.to(dtype)
    go = grad.to(dtype)
    n = 2**bits - 1
    up_eff, delta = _range(lo, up, n, min_width)
    inside = (xc >= lo) & (xc <= up_eff)  # False for NaN
    # The `where`s below select, never multiply, so NaN/inf computed for points outside the range can not leak into
    # the sums for l, u and alpha; the finite stand-in just keeps the arithmetic clean.
    t = (torch.where(inside, xc, lo) - lo) / delta
    y = t - torch.floor(t).clamp(0, n - 1) - 0.5
    a, c = _sharpness(al)
    half_tanh = torch.tanh(0.5 * c)  # = 1 / s = 1 - alpha
    th = torch.tanh(c * y)
    g = 0.5 * th / half_tanh  # Q_s = l + Delta * (i + 0.5 + g)
    slope = 0.5 * c * (1.0 - th * th) / half_tanh  # dQ_s/dx
    zero = torch.zeros((), dtype=dtype, device=go.device)
    grad_x = _reduce_to(torch.where(inside & _passes(x, activation), go * slope, zero), x)
    # (g - y) and (1 - slope) are the small deviations from the identity; grouping them avoids the cancellation of
    # (i + 0.5 + g) - slope * t at high bit widths.
    d_up = ((g - y) + t * (1.0 - slope)) / n
    grad_u = _reduce_to(torch.where(inside, go * d_up, torch.where(xc > up_eff, go, zero)), upper)
    grad_l = torch.zeros_like(lower)
    if need_lower:
        below = torch.where(xc < lo, go, zero)
        grad_l = _reduce_to(torch.where(inside, go * (1.0 - slope - d_up), below), lower)
    grad_a = torch.zeros_like(alpha)
    if need_alpha:
        grad_a = _reduce_to(torch.where(inside, go * delta * _dg_dc(g, y, c), zero) * _dc_dalpha(al, a), alpha)
    return grad_x, grad_l, grad_u, grad_a


# ------------------------------------------------------------------------------------------------ C kernels
# On CPU float32 with one finite range per tensor (both DSQ modules): the activation folded in, one pass each way.


class _NativeScalars(NamedTuple):
    """What the C kernels take besides the tensors (float32 values as Python floats)."""

    lo: float
    up_eff: float
    delta: float
    n: int
    c: float
    half_tanh: float
    alpha_mode: int  # for alpha's gradient: 1 the closed form of dg/dc, 2 its series (small c)
    ratio: float  # h(c) = c / sinh(c), the closed form's constant term
    dc_dalpha: float  # 0 where alpha is outside the clamp, as torch.clamp's gradient is


def _native_scalars(
    x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor, bits: int, min_width: float
) -> _NativeScalars | None:
    """The C kernels' scalars, or None where the reference must run.

    Computed with Python floats instead of a dozen 0-d torch ops (those took 0.2 ms per call, a sixth of the forward
    on a 4M-element tensor). ``lo``, ``up_eff`` and ``delta`` are the float32 values :func:`_range` computes: each
    step is done in float64 and rounded to float32, which gives the correctly rounded float32 result
    (:func:`native.to_float32`), so the forward stays bit-exact. The others only enter the (not bit-exact) backward.
    """
    if lower.numel() != 1 or upper.numel() != 1 or alpha.numel() != 1:
        return None
    # Bounds broadcast into x's shape only if they have no more dimensions than x.
    if max(lower.dim(), upper.dim(), alpha.dim()) > x.dim() or native.applies(x, lower, upper, alpha) is None:
        return None
    lo, up, al = float(lower), float(upper), float(alpha)
    if not (math.isfinite(lo) and math.isfinite(up) and math.isfinite(al)):
        return None
    f32 = native.to_float32
    n = 2**bits - 1
    min_w = f32(min_width)  # torch meets a Python float with a float32 tensor in float32
    width = f32(up - lo)
    collapsed = width < min_w
    up_eff = f32(lo + min_w) if collapsed else up
    delta = f32((min_w if collapsed else width) / n)
    eps_lo, eps_hi = f32(ALPHA_EPS), f32(1.0 - ALPHA_EPS)
    a = min(max(al, eps_lo), eps_hi)
    c = f32(math.log1p(2.0 * (1.0 - a) / a))
    small = c < _SERIES_C[torch.float32]
    return _NativeScalars(
        lo=lo,
        up_eff=up_eff,
        delta=delta,
        n=n,
        c=c,
        half_tanh=f32(math.tanh(0.5 * c)),
        alpha_mode=2 if small else 1,
        ratio=0.0 if small else f32(c / math.sinh(c)),
        dc_dalpha=-2.0 / (a * (2.0 - a)) if eps_lo <= al <= eps_hi else 0.0,
    )


def _dsq_forward_cpu(
    x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor, bits: int, min_width: float, activation: int
) -> Tensor:
    s = _native_scalars(x, lower, upper, alpha, bits, min_width)
    if s is None:
        return dsq_forward_reference(x, lower, upper, alpha, bits, min_width, activation)
    q = torch.empty_like(x)
    native.library().lq_dsq_forward_f32(
        x.data_ptr(), q.data_ptr(), x.numel(), s.lo, s.up_eff, s.delta, s.n, activation, native.threads()
    )
    return q


def _dsq_backward_cpu(
    grad: Tensor,
    x: Tensor,
    lower: Tensor,
    upper: Tensor,
    alpha: Tensor,
    bits: int,
    min_width: float,
    activation: int,
    need_lower: bool,
    need_alpha: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (bits, min_width, activation, need_lower, need_alpha)
    s = _native_scalars(x, lower, upper, alpha, bits, min_width) if grad.dtype == torch.float32 else None
    if s is None or grad.shape != x.shape:
        return dsq_backward_reference(grad, x, lower, upper, alpha, *args)
    grad = grad.contiguous()
    grad_x = torch.empty_like(x)
    sums = (ctypes.c_double * 3)()
    native.library().lq_dsq_backward_f32(
        *(x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), ctypes.addressof(sums), x.numel()),
        *(s.lo, s.up_eff, s.delta, s.n, s.c, s.half_tanh, activation, int(need_lower)),
        *(s.alpha_mode if need_alpha else 0, s.ratio, native.threads()),
    )
    # Rounded to float32 as the reference's float32 sums are (the bounds and alpha are float32 here).
    grad_l = torch.full(lower.shape, native.to_float32(sums[0]))
    grad_u = torch.full(upper.shape, native.to_float32(sums[1]))
    grad_a = torch.full(alpha.shape, native.to_float32(sums[2] * s.delta * s.dc_dalpha))
    return grad_x, grad_l, grad_u, grad_a


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    # Only the inputs are saved; the backward recomputes the bin, which is cheaper than storing it.
    ctx.save_for_backward(*inputs[:4])
    ctx.args = inputs[4:]


def _backward(ctx, grad: Tensor) -> tuple:
    x, lower, upper, alpha = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = dsq_backward(grad, x, lower, upper, alpha, *ctx.args, need[1], need[3])
    return (*(g if n else None for g, n in zip(grads, need)), None, None, None)


dsq_forward = define_op("dsq_forward", dsq_forward_reference, cpu=_dsq_forward_cpu)
dsq_backward = define_op("dsq_backward", dsq_backward_reference, cpu=_dsq_backward_cpu)
register_autograd(dsq_forward, _setup_context, _backward)


def _dg_dc(g: Tensor, y: Tensor, c: Tensor) -> Tensor:
    """``d g / d c`` for ``g = 0.5 * tanh(c y) / tanh(c / 2)``, stable for small ``c``.

    ``d log g / d c = (h(2 c y) - h(c)) / c`` with ``h(z) = z / sinh(z)``; for small ``c`` the difference is the
    series ``c^2 (1 - 4y^2) / 6 - 7 c^4 (1 - 16 y^4) / 360 + 31 c^6 (1 - 64 y^6) / 15120``.
    """
    threshold = _SERIES_C.get(c.dtype, 0.25)
    small = c < threshold
    c_big = torch.where(small, torch.full_like(c, threshold), c)  # keeps the unused branch finite
    z = 2.0 * c_big * y
    z_safe = torch.where(z == 0, torch.ones_like(z), z)
    h_z = torch.where(z == 0, torch.ones_like(z), z_safe / torch.sinh(z_safe))
    exact = g * (h_z - c_big / torch.sinh(c_big)) / c_big
    y2 = y * y
    c2 = c * c
    series = (1 - 4 * y2) / 6 - 7 * c2 * (1 - 16 * y2 * y2) / 360 + 31 * c2 * c2 * (1 - 64 * y2**3) / 15120
    series_d_over_c = c * series
    return torch.where(small, g * series_d_over_c, exact)


def _dc_dalpha(alpha: Tensor, clamped: Tensor) -> Tensor:
    """``d c / d alpha = -2 / (alpha (2 - alpha))`` inside the clamp, 0 outside (as ``torch.clamp`` does)."""
    in_range = (alpha >= ALPHA_EPS) & (alpha <= 1.0 - ALPHA_EPS)
    return torch.where(in_range, -2.0 / (clamped * (2.0 - clamped)), torch.zeros_like(clamped))


def dsq_quantize(
    x: Tensor,
    lower: Bound,
    upper: Bound,
    alpha: Bound,
    bits: int,
    min_width: float = DEFAULT_MIN_WIDTH,
    activation: str | None = None,
) -> Tensor:
    """DSQ fake quantization: the exact hard levels forward, the soft curve's gradient backward.

    Differentiable with respect to ``x``, ``lower``, ``upper`` and ``alpha``; the conventions (boundaries, bin
    centres, the gradients of the bounds, NaN and inf) are listed in the module docstring.

    ``activation="relu"`` (or ``"relu6"``) quantizes ``relu(x)``: the same values and gradients as
    ``dsq_quantize(F.relu(x), ...)``, in one pass (the activation is folded into the kernels).

    Args:
        x: Input of any shape and floating dtype.
        lower: Lower bound ``l``: a 0-d tensor, a tensor broadcastable to ``x`` (e.g. per channel) or a float.
        upper: Upper bound ``u``, same forms.
        alpha: Characteristic variable in ``(0, 1)``, same forms; clamped into ``[ALPHA_EPS, 1 - ALPHA_EPS]``.
        bits: Bit width, an int in 1..16 (``2^bits`` levels).
        min_width: Smallest range width used by the forward when ``upper - lower`` is smaller.
        activation: None, ``"relu"`` or ``"relu6"``: applied to ``x`` first.

    Returns:
        The quantized tensor, in ``x``'s dtype, of the broadcast shape of the inputs.

    Raises:
        ValueError: If ``bits`` is not an int in 1..16, ``min_width`` is not a finite number > 0 or ``activation`` is
            not one of the values above.
    """
    check_bits(bits, "bits")
    check_positive(min_width, "min_width")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"`activation` must be None, 'relu' or 'relu6', got {activation!r}.")
    lo, up, al = _as_tensor(lower, x), _as_tensor(upper, x), _as_tensor(alpha, x)
    return dsq_forward(x, lo, up, al, bits, float(min_width), _ACTIVATIONS[activation])
