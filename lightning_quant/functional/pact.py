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


class _PACTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, levels: int) -> Tensor:
        a = alpha.to(x.dtype)
        y = torch.clamp(x, min=torch.zeros_like(a), max=a)
        q = torch.round(y * (levels / a)) * (a / levels)
        code = torch.where(x >= a, 2, torch.where(x >= 0, 1, 0)).to(torch.int8)
        ctx.save_for_backward(code)
        ctx.alpha_shape = alpha.shape
        ctx.alpha_dtype = alpha.dtype
        return q

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        (code,) = ctx.saved_tensors
        grad_x = grad * (code == 1).to(grad.dtype)
        # Summed in float32 at least: a bf16 sum over a large tensor would lose the low bits of alpha's gradient.
        acc = torch.promote_types(grad.dtype, torch.float32)
        grad_alpha = (grad.to(acc) * (code == 2).to(acc)).sum().to(ctx.alpha_dtype).reshape(ctx.alpha_shape)
        return grad_x, grad_alpha, None


def pact_quantize(x: Tensor, alpha: Tensor, bits: int) -> Tensor:
    """PACT: clip ``x`` to ``[0, alpha]`` and quantize to ``2**bits`` levels, with the paper's gradients.

    Args:
        x: Input activations, any shape and floating dtype.
        alpha: The clip, a one-element tensor (learned). Must be positive; callers clamp it.
        bits: Bit width ``k``, 1..16.

    Returns:
        The fake-quantized activations, same shape and dtype as ``x``.
    """
    return _PACTFunction.apply(x, alpha, 2**bits - 1)
