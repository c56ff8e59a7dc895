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

The backward keeps one ``int8`` code per element (0 below, 1 inside, 2 at or above the clip), not a float copy. The
alpha gradient's per-element terms are at least float32 and are summed in float64, then rounded to float32.

Kernels: the custom ops ``lightning_quant::pact_forward`` / ``pact_backward``; the reference below (any device and
dtype), the C kernels on CPU float32 (:mod:`.native`, bit-identical to it) and Triton on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_quant.functional import native
from lightning_quant.functional._dispatch import define_op, register_autograd


def clip_and_scales(x: Tensor, alpha: Tensor, levels: int, min_alpha: float) -> tuple[Tensor, Tensor, Tensor]:
    """The 0-d clip ``a = max(alpha, min_alpha)``, ``levels / a`` and ``a / levels``, in x's dtype."""
    a = alpha.clamp_min(min_alpha).to(x.dtype).reshape(())
    if x.dtype in (torch.float32, torch.float64):
        return a, levels / a, a / levels
    # `levels / a` is `a.reciprocal() * levels` (Tensor.__rtruediv__), and a Python number meets a bf16/fp16 tensor
    # in float32: spelled out, so no kernel rounds `levels` to the tensor's dtype first.
    return a, (a.reciprocal().float() * levels).to(x.dtype), (a.float() / levels).to(x.dtype)


def pact_forward_reference(x: Tensor, alpha: Tensor, levels: int, min_alpha: float) -> tuple[Tensor, Tensor]:
    """The quantized ``x`` and its int8 code (0 below 0 or NaN, 1 inside, 2 at or above the clip), in torch ops."""
    a, scale, step = clip_and_scales(x, alpha, levels, min_alpha)
    q = torch.round(torch.clamp(x, min=torch.zeros_like(a), max=a) * scale) * step
    code = torch.where(x >= a, 2, torch.where(x >= 0, 1, 0)).to(torch.int8)
    return q, code


def pact_backward_reference(grad: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    """``grad_x = grad * (code == 1)`` and the alpha gradient ``sum(grad * (code == 2))`` (0-d, at least float32)."""
    acc = torch.promote_types(grad.dtype, torch.float32)  # the terms in float32 at least (bf16 sums lose bits)
    terms = grad.to(acc) * (code == 2).to(acc)
    return grad * (code == 1).to(grad.dtype), terms.sum(dtype=torch.float64).to(acc)


def _pact_forward_cpu(x: Tensor, alpha: Tensor, levels: int, min_alpha: float) -> tuple[Tensor, Tensor]:
    lib = native.applies(x, alpha)
    if lib is None or alpha.numel() != 1:
        return pact_forward_reference(x, alpha, levels, min_alpha)
    # The float32 scalars of `clip_and_scales`, without four tiny torch ops; torch computes `levels / a` as
    # `a.reciprocal() * levels` (two roundings).
    a = max(float(alpha), native.to_float32(min_alpha))
    scale = native.to_float32(native.to_float32(1.0 / a) * levels)
    step = native.to_float32(a / levels)
    q, code = torch.empty_like(x), torch.empty(x.shape, dtype=torch.int8)
    lib.lq_pact_forward_f32(x.data_ptr(), q.data_ptr(), code.data_ptr(), x.numel(), a, scale, step, native.threads())
    return q, code


def _pact_backward_cpu(grad: Tensor, code: Tensor) -> tuple[Tensor, Tensor]:
    lib = native.applies(code) if grad.dtype == torch.float32 else None
    if lib is None:
        return pact_backward_reference(grad, code)
    grad = grad.contiguous()  # e.g. the expanded gradient of a `.sum()`; the code is contiguous
    grad_x = torch.empty_like(grad)
    total = lib.lq_pact_backward_f32(
        grad.data_ptr(), code.data_ptr(), grad_x.data_ptr(), grad.numel(), native.threads()
    )
    return grad_x, torch.scalar_tensor(native.to_float32(total), dtype=torch.float32)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    _, alpha, _, _ = inputs
    ctx.save_for_backward(output[1])
    ctx.alpha_shape, ctx.alpha_dtype = alpha.shape, alpha.dtype
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs that get no gradient


def _backward(ctx, grad: Tensor, _grad_code: Tensor | None) -> tuple[Tensor | None, Tensor | None, None, None]:
    if grad is None:  # the output was not used
        return None, None, None, None
    (code,) = ctx.saved_tensors
    grad_x, total = pact_backward(grad, code)
    grad_alpha = total.to(ctx.alpha_dtype).reshape(ctx.alpha_shape) if ctx.needs_input_grad[1] else None
    return (grad_x if ctx.needs_input_grad[0] else None), grad_alpha, None, None


pact_forward = define_op("pact_forward", pact_forward_reference, cpu=_pact_forward_cpu)
pact_backward = define_op("pact_backward", pact_backward_reference, cpu=_pact_backward_cpu)
register_autograd(pact_forward, _setup_context, _backward)


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
    return pact_forward(x, alpha, 2**bits - 1, float(min_alpha))[0]
