"""PACT activation quantization (Choi et al. 2018, "PACT: Parameterized Clipping Activation").

Forward, for ``k`` bits and a learned clip ``alpha > 0``::

    y   = clip(x, 0, alpha)
    y_q = round(y * (2**k - 1) / alpha) * alpha / (2**k - 1)

``round`` is ``torch.round`` (half to even). Backward, straight-through on the rounding (paper, eq. 3)::

    d y_q / d x     = 1  if 0 <= x < alpha  else 0
    d y_q / d alpha = 1  if x >= alpha      else 0

Boundary convention: ``x == 0`` passes its gradient to ``x``; ``x == alpha`` sends it to ``alpha`` (the point is
clipped, so it is a saturated value, and the clip must see it to move). The masks are computed on the float input,
never on the quantized output, so rounding can not hide a saturated point from ``alpha``. NaN inputs give NaN
outputs and no gradient to either ``x`` or ``alpha``.

The backward keeps one ``int8`` code per element (0 below, 1 inside, 2 at or above the clip), not a float copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_quant.functional import fused, native

# Per-element bodies, run eagerly or as one compiled kernel each (functional/fused.py); bit-identical either way.


def _clip_and_scales(x: Tensor, alpha: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """The 0-d clip ``a``, ``levels / a`` and ``a / levels`` in x's dtype, exactly as eager torch computed them.

    Computed before the per-element kernel: inside it the compiler reloads ``a`` and redoes both divisions for every
    vector of 16 elements (it cannot prove the output does not alias ``alpha``).
    """
    a = alpha.to(x.dtype).reshape(())
    if x.dtype in (torch.float32, torch.float64):
        return a, levels / a, a / levels
    # `levels / a` is `a.reciprocal() * levels` (Tensor.__rtruediv__), and a Python number meets a bf16/fp16 tensor
    # in float32: spelled out, so a compiler cannot round `levels` to the tensor's dtype first.
    return a, (a.reciprocal().float() * levels).to(x.dtype), (a.float() / levels).to(x.dtype)


def _forward_body(x: Tensor, a: Tensor, scale: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    y = torch.clamp(x, min=torch.zeros_like(a), max=a)
    q = torch.round(y * scale) * step
    # Float literals: with int ones inductor blends in int64 before narrowing (about 20% slower).
    code = torch.where(x >= a, 2.0, torch.where(x >= 0, 1.0, 0.0)).to(torch.int8)
    return q, code


def _backward_x_body(grad: Tensor, code: Tensor) -> Tensor:
    c = code.to(torch.float32)  # compared as float: inductor does not vectorize int8 comparisons
    return grad * (c == 1).to(grad.dtype)


def _backward_x_eager(grad: Tensor, code: Tensor) -> Tensor:
    return grad * (code == 1).to(grad.dtype)


def _backward_x_alpha_body(grad: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    c = code.to(torch.float32)
    acc = torch.promote_types(grad.dtype, torch.float32)
    # The alpha gradient's per-element terms, in float32 at least (a bf16 sum would lose its low bits); the caller
    # sums them eagerly, so the sum does not depend on the compiler.
    return grad * (c == 1).to(grad.dtype), grad.to(acc) * (c == 2).to(acc)


def _backward_x_alpha_eager(grad: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    acc = torch.promote_types(grad.dtype, torch.float32)
    return grad * (code == 1).to(grad.dtype), grad.to(acc) * (code == 2).to(acc)


_forward = fused.FusedKernel("pact_forward", _forward_body)
_backward_x = fused.FusedKernel("pact_backward_x", _backward_x_body, _backward_x_eager)
_backward_x_alpha = fused.FusedKernel("pact_backward_x_alpha", _backward_x_alpha_body, _backward_x_alpha_eager)


class _PACTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, levels: int, min_alpha: float) -> Tensor:
        ctx.alpha_shape = alpha.shape
        ctx.alpha_dtype = alpha.dtype
        lib = native.applies(x, alpha)
        if lib is not None:
            # The same float32 scalars as `_clip_and_scales`, without four tiny torch ops (see native.to_float32).
            a = max(float(alpha.detach()), native.to_float32(min_alpha))
            # torch computes `levels / a` as `a.reciprocal() * levels` (Tensor.__rtruediv__): two roundings.
            scale = native.to_float32(native.to_float32(1.0 / a) * levels)
            step = native.to_float32(a / levels)
            q, code = torch.empty_like(x), torch.empty(x.shape, dtype=torch.int8)
            lib.lq_pact_forward_f32(
                x.data_ptr(), q.data_ptr(), code.data_ptr(), x.numel(), a, scale, step, native.threads()
            )
            ctx.save_for_backward(code)
            return q
        a, scale, step = _clip_and_scales(x, alpha.clamp_min(min_alpha), levels)
        if fused.fusable(x):
            q, code = _forward(x.view(-1), a, scale, step)
            q, code = q.view(x.shape), code.view(x.shape)
        else:
            q, code = _forward.eager(x, a, scale, step)
        ctx.save_for_backward(code)
        return q

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (code,) = ctx.saved_tensors
        need_x, need_alpha = ctx.needs_input_grad[:2]
        lib = native.applies(code) if grad.dtype == torch.float32 else None
        if lib is not None:
            grad = grad.contiguous()  # e.g. the expanded gradient of a `.sum()`; the code is contiguous
            grad_x = torch.empty_like(grad) if need_x else None
            total = lib.lq_pact_backward_f32(
                grad.data_ptr(),
                code.data_ptr(),
                grad_x.data_ptr() if need_x else None,
                grad.numel(),
                int(need_alpha),
                native.threads(),
            )
            grad_alpha = None
            if need_alpha:
                # Rounded to float32 like the per-element terms, then to alpha's dtype (as the torch path does).
                grad_alpha = torch.full(ctx.alpha_shape, native.to_float32(total), dtype=ctx.alpha_dtype)
            return grad_x, grad_alpha, None, None
        flat = fused.fusable(grad, code)
        g, c = (grad.view(-1), code.view(-1)) if flat else (grad, code)
        grad_x = grad_alpha = None
        if need_alpha:
            grad_x, terms = _backward_x_alpha(g, c) if flat else _backward_x_alpha.eager(g, c)
            # Accumulated in float64 (see the module docstring), rounded like the per-element terms.
            grad_alpha = terms.sum(dtype=torch.float64).to(terms.dtype).to(ctx.alpha_dtype).reshape(ctx.alpha_shape)
        elif need_x:
            grad_x = _backward_x(g, c) if flat else _backward_x.eager(g, c)
        if grad_x is not None and flat:
            grad_x = grad_x.view(grad.shape)
        return (grad_x if need_x else None), grad_alpha, None, None


def pact_quantize(x: Tensor, alpha: Tensor, bits: int, min_alpha: float = 0.0) -> Tensor:
    """PACT: clip ``x`` to ``[0, alpha]`` and quantize to ``2**bits`` levels, with the paper's gradients.

    Args:
        x: Input activations, any shape and floating dtype.
        alpha: The clip, a one-element tensor (learned). Must be positive, or ``min_alpha`` must be.
        bits: Bit width ``k``, 1..16.
        min_alpha: The forward uses ``max(alpha, min_alpha)`` (in float32 when alpha is float32); the gradient of
            alpha passes straight through that floor, so an alpha pushed below it (by weight decay) can come back.

    Returns:
        The fake-quantized activations, same shape and dtype as ``x``.
    """
    return _PACTFunction.apply(x, alpha, 2**bits - 1, min_alpha)
