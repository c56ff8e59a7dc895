"""Triton kernels: the CUDA kernels of the quantizers' custom ops, one pass each way.

Each launcher is a ``torch.library.triton_op`` (``lightning_quant::<op>_triton``) launching its kernel through
``torch.library.wrap_triton``, as torchao registers its kernels; the ops of the method modules call it on CUDA
(:mod:`._dispatch`; imported on first use). Contiguous float32 only: other dtypes and layouts, and a DSQ range that
is not one per tensor, run the torch reference. Values are the reference's float32 operations in its order, so
forwards and input gradients are bit-identical to it (``tests/test_triton.py``, in the interpreter): divisions are
``div_rn`` (a plain ``/`` is approximate on a GPU), half-to-even rounding is ``(v + 1.5 * 2**23) - 1.5 * 2**23``
(exact for ``|v| < 2**22``), and no multiply-add is fused (``enable_fp_fusion=False``). DSQ's backward has the C
kernels' tanh, so its gradients agree to float32 rounding. Per-tensor gradients are summed per block in float64 in
the kernel, and the block sums by one small torch sum. Each kernel computes its 0-d scalars itself: no tiny launches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

# Imported on the first CUDA call, after these modules: no import cycle.
from lightning_quant.functional import dorefa, dsq, lsq, pact

BLOCK = 1024
_LAUNCH = {"BLOCK": BLOCK, "enable_fp_fusion": False}


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _fits(*tensors: Tensor) -> bool:
    """Contiguous, non-empty float32 (the kernels' only dtype)."""
    return all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors) and tensors[0].numel() > 0


@triton.jit
def _block(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _rint(v):
    # Round half to even: adding 1.5 * 2**23 leaves no fraction bits, so the float adder rounds (|v| < 2**22).
    return (v + 12582912.0) - 12582912.0


# ------------------------------------------------------------------------------------------------ PACT


@triton.jit
def _pact_forward_kernel(x_ptr, q_ptr, code_ptr, alpha_ptr, min_alpha, levels, n, BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    x = tl.load(x_ptr + offs, mask=mask)
    # pact.clip_and_scales in float32, without its 0-d torch ops (each a launch): torch computes `levels / a` as
    # `a.reciprocal() * levels`.
    a = tl.load(alpha_ptr)
    a = tl.where(a < min_alpha, min_alpha, a)
    scale = tl.math.div_rn(1.0, a) * levels
    step = tl.math.div_rn(a, levels)
    y = tl.where(x < 0.0, 0.0, x)  # comparisons, not min/max: NaN passes as in torch.clamp
    y = tl.where(y > a, a, y)
    tl.store(q_ptr + offs, _rint(y * scale) * step, mask=mask)
    code = tl.where(x >= a, 2, tl.where(x >= 0.0, 1, 0))
    tl.store(code_ptr + offs, code.to(tl.int8), mask=mask)


@triton.jit
def _pact_backward_kernel(g_ptr, code_ptr, gx_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    code = tl.load(code_ptr + offs, mask=mask, other=0)
    # Products, not selects: g * 0 is NaN for an infinite g, as in torch.
    tl.store(gx_ptr + offs, g * tl.where(code == 1, 1.0, 0.0), mask=mask)
    terms = (g * tl.where(code == 2, 1.0, 0.0)).to(tl.float64)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(terms, axis=0))


@triton_op("lightning_quant::pact_forward_triton", mutates_args={})
def pact_forward(x: Tensor, alpha: Tensor, levels: int, min_alpha: float) -> tuple[Tensor, Tensor]:
    if not _fits(x, alpha) or alpha.numel() != 1:
        return pact.pact_forward_reference(x, alpha, levels, min_alpha)
    q, code = torch.empty_like(x), torch.empty_like(x, dtype=torch.int8)
    launch = wrap_triton(_pact_forward_kernel)[_grid(x.numel())]
    launch(x, q, code, alpha, min_alpha, float(levels), x.numel(), **_LAUNCH)
    return q, code


@triton_op("lightning_quant::pact_backward_triton", mutates_args={})
def pact_backward(grad: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    grad = grad.contiguous()
    if not _fits(grad) or not code.is_contiguous():
        return pact.pact_backward_reference(grad, code)
    grad_x = torch.empty_like(grad)
    partial = grad.new_empty(_grid(grad.numel()), dtype=torch.float64)
    wrap_triton(_pact_backward_kernel)[_grid(grad.numel())](grad, code, grad_x, partial, grad.numel(), **_LAUNCH)
    return grad_x, partial.sum().float()


# ------------------------------------------------------------------------------------------------ DoReFa


@triton.jit
def _dorefa_forward_kernel(t_ptr, out_ptr, d_ptr, levels, n, BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    t = tl.load(t_ptr + offs, mask=mask)
    d = tl.load(d_ptr)
    r = _rint((tl.math.div_rn(t, d) + 0.5) * levels)
    tl.store(out_ptr + offs, 2.0 * tl.math.div_rn(r, levels) - 1.0, mask=mask)


@triton.jit
def _dorefa_sums_kernel(g_ptr, t_ptr, params_ptr, partial_ptr, count_ptr, levels, n, BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0)
    m = tl.load(params_ptr)
    d = tl.load(params_ptr + 1)
    g_r = tl.math.div_rn(g * 2.0, levels) * levels
    terms = -g_r * tl.math.div_rn(tl.math.div_rn(t, d), d)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(terms.to(tl.float64), axis=0))
    tl.store(count_ptr + tl.program_id(0), tl.sum(tl.where(mask & (tl.abs(t) == m), 1, 0), axis=0))


@triton.jit
def _dorefa_backward_kernel(g_ptr, t_ptr, params_ptr, gt_ptr, levels, n, BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    g = tl.load(g_ptr + offs, mask=mask)
    t = tl.load(t_ptr + offs, mask=mask)
    m = tl.load(params_ptr)
    d = tl.load(params_ptr + 1)
    share = tl.load(params_ptr + 2)
    g_r = tl.math.div_rn(g * 2.0, levels) * levels
    sgn = tl.where(t > 0.0, 1.0, tl.where(t < 0.0, -1.0, 0.0))
    tl.store(gt_ptr + offs, tl.math.div_rn(g_r, d) + tl.where(tl.abs(t) == m, share, 0.0) * sgn, mask=mask)


@triton_op("lightning_quant::dorefa_forward_triton", mutates_args={})
def dorefa_forward(t: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    if not _fits(t):
        return dorefa.dorefa_forward_reference(t, levels)
    m = t.abs().max()  # a reduction first (torch's), then one elementwise pass
    d = 2 * m.clamp_min(torch.finfo(t.dtype).tiny)
    out = torch.empty_like(t)
    wrap_triton(_dorefa_forward_kernel)[_grid(t.numel())](t, out, d, float(levels), t.numel(), **_LAUNCH)
    return out, m, d


@triton_op("lightning_quant::dorefa_backward_triton", mutates_args={})
def dorefa_backward(grad: Tensor, t: Tensor, m: Tensor, d: Tensor, levels: int) -> Tensor:
    grad = grad.contiguous()
    if not _fits(grad, t):
        return dorefa.dorefa_backward_reference(grad, t, m, d, levels)
    n, blocks = t.numel(), _grid(t.numel())
    partial = t.new_empty(blocks, dtype=torch.float64)
    count = t.new_empty(blocks, dtype=torch.int32)
    params = torch.stack([m, d])
    wrap_triton(_dorefa_sums_kernel)[blocks](grad, t, params, partial, count, float(levels), n, **_LAUNCH)
    g_d = partial.sum().float()
    g_m = torch.where(m >= torch.finfo(t.dtype).tiny, g_d * 2, torch.zeros_like(g_d))
    params = torch.stack([m, d, g_m / count.sum()])
    g_t = torch.empty_like(t)
    wrap_triton(_dorefa_backward_kernel)[blocks](grad, t, params, g_t, float(levels), n, **_LAUNCH)
    return g_t


# ------------------------------------------------------------------------------------------------ DSQ


@triton.jit
def _dsq_activation(v, ACTIVATION: tl.constexpr):
    # 0 none, 1 ReLU, 2 ReLU6, as comparisons (NaN passes).
    if ACTIVATION == 1:
        v = tl.where(v < 0.0, 0.0, v)
    if ACTIVATION == 2:
        v = tl.where(v < 0.0, 0.0, tl.where(v > 6.0, 6.0, v))
    return v


@triton.jit
def _dsq_forward_kernel(
    x_ptr, q_ptr, lo_ptr, up_ptr, min_width, n, nlev, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr
):
    offs, mask = _block(n, BLOCK)
    r = _dsq_activation(tl.load(x_ptr + offs, mask=mask), ACTIVATION)
    lo, up, delta = _dsq_range(lo_ptr, up_ptr, min_width, nlev)  # in the kernel: no 0-d torch launches before it
    m = tl.where(r < lo, lo, r)
    m = tl.where(m > up, up, m)
    idx = _rint(tl.math.div_rn(m - lo, delta))
    idx = tl.where(idx < 0.0, 0.0, tl.where(idx > nlev, nlev, idx))
    tl.store(q_ptr + offs, tl.where(idx >= nlev, up, lo + idx * delta), mask=mask)


@triton.jit
def _tanh(x):
    # The C kernels' tanh (Eigen's float rational fit on [-7.9, 7.9]; DSQ's argument stays within 7.3).
    x2 = x * x
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = x2 * p + -8.60467152213735e-11
    p = x2 * p + 5.12229709037114e-08
    p = x2 * p + 1.48572235717979e-05
    p = x2 * p + 6.37261928875436e-04
    p = x2 * p + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = x2 * q + 2.26843463243900e-03
    q = x2 * q + 4.89352518554385e-03
    return x * p / q


@triton.jit
def _dsq_range(lo_ptr, up_ptr, min_width, nlev):
    """dsq._range in float32: the effective upper bound and the bin width under the collapsed-range guard."""
    lo = tl.load(lo_ptr)
    width = tl.load(up_ptr) - lo
    collapsed = width < min_width
    up = tl.where(collapsed, lo + min_width, tl.load(up_ptr))
    return lo, up, tl.math.div_rn(tl.where(collapsed, min_width, width), nlev)


@triton.jit
def _dsq_backward_kernel(
    x_ptr,
    g_ptr,
    gx_ptr,
    lo_ptr,
    up_ptr,
    alpha_ptr,
    partial_ptr,
    min_width,
    n,
    nlev,
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, mask = _block(n, BLOCK)
    v = tl.load(x_ptr + offs, mask=mask, other=float("nan"))  # NaN: outside the range, contributes nothing
    go = tl.load(g_ptr + offs, mask=mask, other=0.0)
    lo, up, delta = _dsq_range(lo_ptr, up_ptr, min_width, nlev)
    # dsq._sharpness: c = log1p(2 (1 - a) / a) with a clamped into [ALPHA_EPS, 1 - ALPHA_EPS] (log1p as
    # x log(1 + x) / ((1 + x) - 1), accurate for small x), and d c / d alpha (0 outside the clamp).
    al = tl.load(alpha_ptr)
    a = tl.where(al < 1e-6, 1e-6, tl.where(al > 1.0 - 1e-6, 1.0 - 1e-6, al))
    z = tl.math.div_rn(2.0 * (1.0 - a), a)
    c = tl.where(1.0 + z == 1.0, z, z * tl.log(1.0 + z) / ((1.0 + z) - 1.0))
    dc_dalpha = tl.where((al >= 1e-6) & (al <= 1.0 - 1e-6), -2.0 / (a * (2.0 - a)), 0.0)
    half_tanh = _tanh(0.5 * c)
    small = c < 0.25  # dsq._SERIES_C[float32]: below it the closed form of d g / d c cancels
    ratio = c / (0.5 * (tl.exp(c) - tl.exp(-c)))  # c / sinh(c), used only where c >= 0.25
    r = _dsq_activation(v, ACTIVATION)
    inside = (r >= lo) & (r <= up)
    t = tl.math.div_rn(tl.where(inside, r, lo) - lo, delta)
    bin = tl.minimum(tl.floor(t), nlev - 1.0)
    y = t - bin - 0.5
    u = c * y
    th = _tanh(u)
    sech2 = 1.0 - th * th
    g = th * (0.5 / half_tanh)
    slope = sech2 * (0.5 * c / half_tanh)
    d_up = ((g - y) + t * (1.0 - slope)) / nlev
    if ACTIVATION == 0:
        passes = inside
    elif ACTIVATION == 1:
        passes = inside & (v > 0.0)
    else:
        passes = inside & (v > 0.0) & (v < 6.0)
    tl.store(gx_ptr + offs, tl.where(passes, go * slope, 0.0), mask=mask)
    sum_u = tl.sum(tl.where(inside, go * d_up, tl.where(r > up, go, 0.0)), axis=0)
    sum_l = tl.sum(tl.where(inside, go * ((1.0 - slope) - d_up), tl.where(r < lo, go, 0.0)), axis=0)
    # d g / d c: (h(2u) - h(c)) * g / c with h(z) = z / sinh(z) = u * sech^2(u) / tanh(u) at z = 2u, or its series.
    h = tl.where(th == 0.0, 1.0, u * sech2 / th)
    y2 = y * y
    series = (1.0 - 4.0 * y2) / 6.0 - c * c * (1.0 - 16.0 * y2 * y2) * (7.0 / 360.0)
    series += c * c * c * c * (1.0 - 64.0 * y2 * y2 * y2) * (31.0 / 15120.0)
    dg_dc = tl.where(small, g * (c * series), g * (h - ratio) / c)
    sum_a = tl.sum(tl.where(inside, go * dg_dc, 0.0), axis=0) * (delta * dc_dalpha)
    pid = tl.program_id(0)
    tl.store(partial_ptr + 3 * pid, sum_l.to(tl.float64))
    tl.store(partial_ptr + 3 * pid + 1, sum_u.to(tl.float64))
    tl.store(partial_ptr + 3 * pid + 2, sum_a.to(tl.float64))


def _dsq_fits(x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor) -> bool:
    bounds = (lower, upper, alpha)
    return _fits(x, *bounds) and all(b.numel() == 1 and b.dim() <= x.dim() for b in bounds)


@triton_op("lightning_quant::dsq_forward_triton", mutates_args={})
def dsq_forward(
    x: Tensor, lower: Tensor, upper: Tensor, alpha: Tensor, bits: int, min_width: float, activation: int
) -> Tensor:
    if not _dsq_fits(x, lower, upper, alpha):
        return dsq.dsq_forward_reference(x, lower, upper, alpha, bits, min_width, activation)
    q = torch.empty_like(x)
    launch = wrap_triton(_dsq_forward_kernel)[_grid(x.numel())]
    launch(x, q, lower, upper, min_width, x.numel(), float(2**bits - 1), ACTIVATION=activation, **_LAUNCH)
    return q


@triton_op("lightning_quant::dsq_backward_triton", mutates_args={})
def dsq_backward(
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
    grad = grad.contiguous()
    if not _dsq_fits(x, lower, upper, alpha) or grad.shape != x.shape or grad.dtype != torch.float32:
        args = (bits, min_width, activation, need_lower, need_alpha)
        return dsq.dsq_backward_reference(grad, x, lower, upper, alpha, *args)
    grad_x = torch.empty_like(x)
    blocks = _grid(x.numel())
    partial = x.new_empty((blocks[0], 3), dtype=torch.float64)
    launch = wrap_triton(_dsq_backward_kernel)[blocks]
    nlev = float(2**bits - 1)
    launch(x, grad, grad_x, lower, upper, alpha, partial, min_width, x.numel(), nlev, ACTIVATION=activation, **_LAUNCH)
    grad_l, grad_u, grad_a = partial.sum(dim=0).float().unbind()
    # Separate tensors: a custom op's outputs may not be views of one another.
    return grad_x, grad_l.reshape(lower.shape).clone(), grad_u.reshape(upper.shape).clone(), grad_a.reshape(alpha.shape)


# ------------------------------------------------------------------------------------------------ LSQ
# One program per (channel, block of that channel's weights): the step is per tensor (one channel) or per output
# channel along dim 0 (each channel's weights contiguous), and each program sums its step-gradient terms.


@triton.jit
def _lsq_forward_kernel(w_ptr, s_ptr, out_ptr, v_ptr, inner, qn, qp, BLOCK: tl.constexpr):
    channel = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    idx = channel * inner + offs
    s = tl.load(s_ptr + channel)
    v = tl.math.div_rn(tl.load(w_ptr + idx, mask=mask), s)
    c = tl.where(v < -qn, -qn, v)  # comparisons: NaN passes as in torch.clamp
    c = tl.where(c > qp, qp, c)
    tl.store(out_ptr + idx, _rint(c) * s, mask=mask)
    tl.store(v_ptr + idx, v, mask=mask)


@triton.jit
def _lsq_backward_kernel(g_ptr, v_ptr, gw_ptr, partial_ptr, inner, blocks, qn, qp, BLOCK: tl.constexpr):
    channel = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    idx = channel * inner + offs
    g = tl.load(g_ptr + idx, mask=mask, other=0.0)
    v = tl.load(v_ptr + idx, mask=mask, other=float("nan"))  # NaN: in no region, no gradient
    inside = (v > -qn) & (v < qp)
    tl.store(gw_ptr + idx, g * tl.where(inside, 1.0, 0.0), mask=mask)
    ds = tl.where(inside, _rint(v) - v, tl.where(v <= -qn, -qn, 0.0))
    ds = tl.where(v >= qp, qp, ds)
    terms = g.to(tl.float64) * ds.to(tl.float64)
    tl.store(partial_ptr + channel * blocks + tl.program_id(1), tl.sum(terms, axis=0))


def _lsq_channels(w: Tensor, step: Tensor) -> int | None:
    """How many steps (1, or one per slice along dim 0), or None for another layout (the reference runs)."""
    if not _fits(w, step):
        return None
    if step.numel() == 1:
        return 1
    per_row = step.dim() == w.dim() and step.shape[0] == w.shape[0] and step.numel() == w.shape[0]
    return w.shape[0] if per_row else None


@triton_op("lightning_quant::lsq_forward_triton", mutates_args={})
def lsq_forward(w: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float, min_step: float) -> tuple[Tensor, Tensor]:
    channels = _lsq_channels(w, step)
    if channels is None:
        return lsq.lsq_forward_reference(w, step, qn, qp, grad_scale, min_step)
    s = step.clamp_min(min_step).contiguous()
    out, v = torch.empty_like(w), torch.empty_like(w)
    inner = w.numel() // channels
    grid = (channels, triton.cdiv(inner, BLOCK))
    wrap_triton(_lsq_forward_kernel)[grid](w, s, out, v, inner, float(qn), float(qp), **_LAUNCH)
    return out, v


@triton_op("lightning_quant::lsq_backward_triton", mutates_args={})
def lsq_backward(grad: Tensor, v: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float) -> tuple[Tensor, Tensor]:
    grad = grad.contiguous()
    channels = _lsq_channels(v, step)
    if channels is None or not _fits(grad):
        return lsq.lsq_backward_reference(grad, v, step, qn, qp, grad_scale)
    inner = v.numel() // channels
    grid = (channels, triton.cdiv(inner, BLOCK))
    grad_w = torch.empty_like(grad)
    partial = v.new_empty(grid, dtype=torch.float64)
    launch = wrap_triton(_lsq_backward_kernel)[grid]
    launch(grad, v, grad_w, partial, inner, grid[1], float(qn), float(qp), **_LAUNCH)
    return grad_w, (partial.sum(dim=1) * grad_scale).reshape(step.shape).to(step.dtype)


# ------------------------------------------------------------------------------------------------ LSQ+


@triton.jit
def _lsq_plus_scalars(step_ptr, offset_ptr, min_step, levels):
    """lsq._zero_point in float32: the floored step, u = -beta / s and z = clamp(round(u), 0, L)."""
    s = tl.load(step_ptr)
    s = tl.where(s < min_step, min_step, s)
    u = tl.math.div_rn(-tl.load(offset_ptr), s)
    ru = _rint(u)  # beyond 2**22 inexact, but then clamped to 0 or L all the same
    return s, u, ru, tl.where(ru < 0.0, 0.0, tl.where(ru > levels, levels, ru))


@triton.jit
def _lsq_plus_forward_kernel(x_ptr, step_ptr, offset_ptr, out_ptr, q_ptr, min_step, levels, n, BLOCK: tl.constexpr):
    offs, mask = _block(n, BLOCK)
    s, u, ru, z = _lsq_plus_scalars(step_ptr, offset_ptr, min_step, levels)
    q = tl.math.div_rn(tl.load(x_ptr + offs, mask=mask), s)
    c = _rint(q) + z  # |q| >= 2**22 rounds inexactly, but lands beyond [0, L] all the same
    c = tl.where(c < 0.0, 0.0, tl.where(c > levels, levels, c))
    tl.store(out_ptr + offs, (c - z) * s, mask=mask)
    tl.store(q_ptr + offs, q, mask=mask)


@triton.jit
def _lsq_plus_backward_kernel(
    g_ptr, q_ptr, step_ptr, offset_ptr, gx_ptr, partial_ptr, min_step, levels, n, BLOCK: tl.constexpr
):
    offs, mask = _block(n, BLOCK)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    q = tl.load(q_ptr + offs, mask=mask, other=float("nan"))  # NaN: in no region, no gradient
    s, u, ru, z = _lsq_plus_scalars(step_ptr, offset_ptr, min_step, levels)
    v = q + z
    inside = (v > 0.0) & (v < levels)
    low = v <= 0.0
    high = v >= levels
    ru = tl.zeros_like(v) + ru  # a block, to combine with the per-element masks
    pulled = (low | high) & (ru >= 0.0) & (ru <= levels)  # z moves: not held by its clamp
    tl.store(gx_ptr + offs, g * tl.where(inside, 1.0, 0.0), mask=mask)
    ds = tl.where(inside, _rint(q) - q, 0.0)
    ds = ds + tl.where(low, -z, 0.0)
    ds = ds + tl.where(high, levels - z, 0.0)
    ds = ds + tl.where(pulled, u, 0.0)
    g64 = g.to(tl.float64)
    pid = tl.program_id(0)
    tl.store(partial_ptr + 2 * pid, tl.sum(g64 * ds.to(tl.float64), axis=0))
    tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.where(pulled, g64, 0.0), axis=0))


@triton_op("lightning_quant::lsq_plus_forward_triton", mutates_args={})
def lsq_plus_forward(
    x: Tensor, step: Tensor, offset: Tensor, levels: int, grad_scale: float, min_step: float
) -> tuple[Tensor, Tensor]:
    if not _fits(x, step, offset) or step.numel() != 1 or offset.numel() != 1:
        return lsq.lsq_plus_forward_reference(x, step, offset, levels, grad_scale, min_step)
    out, q = torch.empty_like(x), torch.empty_like(x)
    launch = wrap_triton(_lsq_plus_forward_kernel)[_grid(x.numel())]
    launch(x, step, offset, out, q, min_step, float(levels), x.numel(), **_LAUNCH)
    return out, q


@triton_op("lightning_quant::lsq_plus_backward_triton", mutates_args={})
def lsq_plus_backward(
    grad: Tensor, q: Tensor, step: Tensor, offset: Tensor, levels: int, grad_scale: float, min_step: float
) -> tuple[Tensor, Tensor, Tensor]:
    grad = grad.contiguous()
    if not _fits(grad, q, step, offset) or step.numel() != 1 or offset.numel() != 1:
        return lsq.lsq_plus_backward_reference(grad, q, step, offset, levels, grad_scale, min_step)
    grad_x = torch.empty_like(grad)
    blocks = _grid(q.numel())
    partial = q.new_empty((blocks[0], 2), dtype=torch.float64)
    launch = wrap_triton(_lsq_plus_backward_kernel)[blocks]
    launch(grad, q, step, offset, grad_x, partial, min_step, float(levels), q.numel(), **_LAUNCH)
    sum_s, sum_o = partial.sum(dim=0).unbind()
    grad_step = (sum_s * grad_scale).reshape(step.shape).to(step.dtype)
    return grad_x, grad_step, sum_o.reshape(offset.shape).to(offset.dtype)
