"""DoReFa weight quantization, as used for the weights in the PACT paper (Zhou et al. 2016, eq. 9)::

    w_q = 2 * quantize_k( tanh(w) / (2 * max|tanh(w)|) + 0.5 ) - 1,    quantize_k(r) = round((2**k - 1) r) / (2**k - 1)

The gradient is straight-through on ``round`` only; it flows through ``tanh`` and the normalisation by the max (to
the arg-max element too), as in the reference TensorFlow code. The output lies in ``[-1, 1]`` whatever the scale of
``w``: the layers that follow (batch norm) absorb the scale, as in the paper's networks.

Kernels: ``tanh`` is torch's (autograd differentiates it); the rest is the custom ops
``lightning_quant::dorefa_forward`` / ``dorefa_backward`` on ``t = tanh(w)``: the reference below, the C kernels on
CPU float32 (bit-identical to it) and Triton on CUDA. The backward is the sequence of operations autograd ran through
``2 * (round_ste(t / (2 * max|t|.clamp_min(tiny)) + 0.5) * L) / L) - 1``::

    g_r  = ((g * 2) / L) * L                       through ``- 1``, ``2 *``, ``/ L``, round (STE), ``* L``, ``+ 0.5``
    g_d  = sum(-g_r * ((t / d) / d))               ``t / d`` with respect to d = 2 * m, m = max|t| clamped
    g_m  = where(max|t| >= tiny, g_d * 2, 0)        ``2 *`` and ``clamp_min``
    g_t  = g_r / d + where(|t| == max|t|, g_m / count, 0) * sgn(t)    ``max`` (shared evenly among ties), ``abs``
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_quant.functional import native
from lightning_quant.functional._dispatch import define_op, register_autograd


def dorefa_forward_reference(t: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """The quantized ``t``, ``m = max|t|`` and ``d = 2 * max(m, tiny)`` (an all-zero ``t`` gives the middle level)."""
    m = t.abs().max()
    d = 2 * m.clamp_min(torch.finfo(t.dtype).tiny)
    return 2 * (torch.round((t / d + 0.5) * levels) / levels) - 1, m, d


def dorefa_backward_reference(grad: Tensor, t: Tensor, m: Tensor, d: Tensor, levels: int) -> Tensor:
    """The gradient with respect to ``t`` (the module docstring's formulas; ``g_d`` summed in float64)."""
    g_r = ((grad * 2) / levels) * levels
    g_d = (-g_r * ((t / d) / d)).sum(dtype=torch.float64).to(g_r.dtype)
    g_m = torch.where(m >= torch.finfo(t.dtype).tiny, g_d * 2, torch.zeros_like(g_d))
    share = g_m / (t.abs() == m).sum()
    return g_r / d + torch.where(t.abs() == m, share, torch.zeros_like(share)) * torch.sgn(t)


def _dorefa_forward_cpu(t: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    lib = native.applies(t)
    if lib is None:
        return dorefa_forward_reference(t, levels)
    out, m, d = torch.empty_like(t), t.new_empty(()), t.new_empty(())
    tiny = torch.finfo(t.dtype).tiny
    lib.lq_dorefa_forward_f32(
        t.data_ptr(), out.data_ptr(), m.data_ptr(), d.data_ptr(), t.numel(), levels, tiny, native.threads()
    )
    return out, m, d


def _dorefa_backward_cpu(grad: Tensor, t: Tensor, m: Tensor, d: Tensor, levels: int) -> Tensor:
    lib = native.applies(t) if grad.dtype == torch.float32 else None
    if lib is None:
        return dorefa_backward_reference(grad, t, m, d, levels)
    grad = grad.contiguous()
    g_t = torch.empty_like(t)
    tiny = torch.finfo(t.dtype).tiny
    lib.lq_dorefa_backward_f32(
        grad.data_ptr(), t.data_ptr(), g_t.data_ptr(), t.numel(), float(m), float(d), levels, tiny, native.threads()
    )
    return g_t


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    t, levels = inputs
    _, m, d = output
    ctx.save_for_backward(t, m, d)
    ctx.levels = levels
    ctx.mark_non_differentiable(m, d)
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs that get no gradient


def _backward(ctx, grad: Tensor, _grad_m: Tensor | None, _grad_d: Tensor | None) -> tuple[Tensor, None]:
    if grad is None:
        return None, None
    t, m, d = ctx.saved_tensors
    return dorefa_backward(grad, t, m, d, ctx.levels), None


dorefa_forward = define_op("dorefa_forward", dorefa_forward_reference, cpu=_dorefa_forward_cpu)
dorefa_backward = define_op("dorefa_backward", dorefa_backward_reference, cpu=_dorefa_backward_cpu)
register_autograd(dorefa_forward, _setup_context, _backward)


def dorefa_quantize_weight(w: Tensor, bits: int) -> Tensor:
    """DoReFa ``k``-bit weight quantization with the straight-through estimator on the rounding.

    Args:
        w: The float weight.
        bits: Bit width ``k``, 1..16.

    Returns:
        The quantized weight, values in ``{2 j / (2**k - 1) - 1 : j = 0 .. 2**k - 1}``.
    """
    return dorefa_forward(torch.tanh(w), 2**bits - 1)[0]
