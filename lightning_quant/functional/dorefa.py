"""DoReFa weight quantization, as used for the weights in the PACT paper (Zhou et al. 2016, eq. 9)::

    w_q = 2 * quantize_k( tanh(w) / (2 * max|tanh(w)|) + 0.5 ) - 1,    quantize_k(r) = round((2**k - 1) r) / (2**k - 1)

The gradient is straight-through on ``round`` only; it flows through ``tanh`` and the normalisation by the max (to
the arg-max element too), as in the reference TensorFlow code. The output lies in ``[-1, 1]`` whatever the scale of
``w``: the layers that follow (batch norm) absorb the scale, as in the paper's networks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_quant.functional import fused, native

# The function is written out as an autograd Function whose per-element work runs in fused kernels (eager or compiled,
# bit-identical; functional/fused.py). Its backward is the exact sequence of operations autograd ran through the
# original expression ``2 * (round_ste(t / (2 * max|t|.clamp_min(tiny)) + 0.5) * L) / L) - 1`` with ``t = tanh(w)``:
#
#   g_r  = ((g * 2) / L) * L                       through ``- 1``, ``2 *``, ``/ L``, round (STE), ``* L``, ``+ 0.5``
#   g_t  = g_r / d                                 ``t / d`` with respect to t
#   g_d  = sum(-g_r * ((t / d) / d))               ... with respect to d = 2 * m, m = max|t| clamped
#   g_m  = where(max|t| >= tiny, g_d * 2, 0)        ``2 *`` and ``clamp_min``
#   g_t += where(|t| == max|t|, g_m / count, 0) * sgn(t)    ``max`` (shared evenly among ties) and ``abs``
#   g_w  = tanh_backward(g_t, t)                   ``tanh``: g_t * (1 - t * t), with 1 - t * t as one fused multiply-add
#
# ``tanh``, ``tanh_backward`` and the sum stay eager ops (see fused.py: inductor's tanh, its summation order, and its
# unfused ``1 - t * t`` differ from eager's in the last bit).


def _forward_body(t: Tensor, levels: int, tiny: float) -> tuple[Tensor, Tensor, Tensor]:
    m = t.abs().max()
    d = 2 * m.clamp_min(tiny)
    out = 2 * (torch.round((t / d + 0.5) * levels) / levels) - 1
    return out, m, d


def _backward_terms_body(grad: Tensor, t: Tensor, d: Tensor, m: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    g_r = ((grad * 2) / levels) * levels
    return -g_r * ((t / d) / d), (t.abs() == m).sum()


def _backward_body(grad: Tensor, t: Tensor, d: Tensor, m: Tensor, share: Tensor, levels: int) -> Tensor:
    g_r = ((grad * 2) / levels) * levels
    return g_r / d + torch.where(t.abs() == m, share, torch.zeros_like(share)) * torch.sgn(t)


_forward = fused.FusedKernel("dorefa_forward", _forward_body)
_backward_terms = fused.FusedKernel("dorefa_backward_terms", _backward_terms_body)
_backward = fused.FusedKernel("dorefa_backward", _backward_body)


class _DoReFaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, bits: int) -> Tensor:
        levels = 2**bits - 1
        t = torch.tanh(w)
        # An all-zero weight would divide by zero; its quantized value is then 0.5 -> the middle level.
        tiny = torch.finfo(t.dtype).tiny
        ctx.levels = levels
        ctx.tiny = tiny
        lib = native.applies(t)
        if lib is not None:
            out, m, d = torch.empty_like(t), t.new_empty(()), t.new_empty(())
            lib.lq_dorefa_forward_f32(
                t.data_ptr(), out.data_ptr(), m.data_ptr(), d.data_ptr(), t.numel(), levels, tiny, native.threads()
            )
            ctx.save_for_backward(t, m, d)
            return out
        flat = fused.fusable(t)
        out, m, d = _forward(t.view(-1), levels, tiny) if flat else _forward.eager(t, levels, tiny)
        ctx.save_for_backward(t, m, d)
        return out.view(t.shape) if flat else out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        t, m, d = ctx.saved_tensors
        levels = ctx.levels
        lib = native.applies(t) if grad.dtype == torch.float32 else None
        if lib is not None:
            grad = grad.contiguous()
            g_t = torch.empty_like(t)
            lib.lq_dorefa_backward_f32(
                grad.data_ptr(),
                t.data_ptr(),
                g_t.data_ptr(),
                t.numel(),
                float(m),
                float(d),
                levels,
                ctx.tiny,
                native.threads(),
            )
            return torch.ops.aten.tanh_backward(g_t, t), None
        flat = fused.fusable(grad, t)
        g, tf = (grad.view(-1), t.view(-1)) if flat else (grad, t)
        terms, count = _backward_terms(g, tf, d, m, levels) if flat else _backward_terms.eager(g, tf, d, m, levels)
        # Accumulated in float64 (as the native kernel does), rounded to the terms' dtype.
        g_d = terms.sum(dtype=torch.float64).to(terms.dtype)
        g_m = torch.where(m >= ctx.tiny, g_d * 2, torch.zeros_like(g_d))
        share = g_m / count
        g_t = _backward(g, tf, d, m, share, levels) if flat else _backward.eager(g, tf, d, m, share, levels)
        grad_w = torch.ops.aten.tanh_backward(g_t.view(t.shape), t)
        return grad_w, None


def dorefa_quantize_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa ``k``-bit weight quantization with the straight-through estimator on the rounding.

    Args:
        w: The float weight.
        bits: Bit width ``k``, 1..16.

    Returns:
        The quantized weight, values in ``{2 j / (2**k - 1) - 1 : j = 0 .. 2**k - 1}``.
    """
    return _DoReFaFunction.apply(w, bits)
