"""LSQ weight quantization (Esser et al. 2019, "Learned Step Size Quantization"): a learned step ``s`` per tensor or
per output channel, signed integer levels with an exact zero, and the paper's gradients.

Integer range for ``b`` bits: the paper's signed range ``Qn = 2**(b-1)``, ``Qp = 2**(b-1) - 1`` (2 bits: codes
``{-2, -1, 0, 1}``), or with ``narrow=True`` the symmetric ``Qn = Qp = 2**(b-1) - 1`` (2 bits: ternary).

Forward, with ``v = w / s`` and ``round`` = ``torch.round`` (half to even)::

    w_q = round(clamp(v, -Qn, Qp)) * s

The output is exactly ``code * s`` rounded once to the compute dtype (never ``w + (w_q - w).detach()``), so a zero
weight gives exactly 0 and the quantized weight keeps the float weight's scale. Backward (paper, eqs. 3 and 5)::

    d w_q / d w = 1                      if -Qn < v < Qp   else 0
    d w_q / d s = round(v) - v           if -Qn < v < Qp
                = -Qn                    if v <= -Qn
                = Qp                     if v >= Qp

and the step's gradient is multiplied by ``grad_scale`` (the paper's ``g = 1 / sqrt(N * Qp)``, ``N`` the number of
weights that share the step) and summed over those weights, in float64.

Boundary convention (the paper's): ``v == -Qn`` and ``v == Qp`` count as saturated. There ``w_q = +-Q s`` is locally
independent of ``w`` and linear in ``s``, so this is also the exact derivative; it matches PACT here, where ``x ==
alpha`` sends its gradient to the clip. The region is decided on ``v`` computed in the compute dtype, never on the
rounded output. NaN weights give NaN outputs and contribute no gradient to ``w`` or ``s``.

Step floor: the forward uses ``max(s, min_step)`` and the step's gradient passes straight through that floor (as
``pact_quantize``'s ``min_alpha``), so a step pushed below it can come back. A step ``<= 0`` would divide by zero or
flip the grid, so ``min_step`` must be positive whenever the step could reach 0 (the module passes one).

Kernels: the custom ops ``lightning_quant::lsq_forward`` / ``lsq_backward``: the torch reference below on CPU (no C
kernel: the same torch ops as before this design) and Triton on CUDA (bit-identical).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_quant.functional._dispatch import define_op, register_autograd
from lightning_quant.functional.checks import check_bits, check_positive


def lsq_range(bits: int, narrow: bool = False) -> tuple[int, int]:
    """The LSQ integer range ``(Qn, Qp)``: codes lie in ``[-Qn, Qp]``.

    Args:
        bits: Bit width, an int in 2..16.
        narrow: Use the symmetric range ``Qn = Qp = 2**(bits-1) - 1`` instead of ``Qn = 2**(bits-1)``.

    Returns:
        ``(Qn, Qp)``, both positive ints.

    Raises:
        ValueError: If ``bits`` is not an int in 2..16.
    """
    check_lsq_bits(bits)
    qp = 2 ** (bits - 1) - 1
    return (qp if narrow else qp + 1), qp


def check_lsq_bits(bits: object, name: str = "bits") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``bits`` is an int in 2..16.

    Raises:
        ValueError: If ``bits`` is not allowed (1 bit has no zero level with a useful grid).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"`{name}` must be an int in 2..16 (1 bit has no zero level), got {bits!r}.")


def _reduce_dims(step_shape: torch.Size, w_shape: torch.Size) -> list[int]:
    """The dims of ``w`` along which the step is broadcast (its gradient is summed over them)."""
    padded = (1,) * (len(w_shape) - len(step_shape)) + tuple(step_shape)
    return [d for d, (n_s, n_w) in enumerate(zip(padded, w_shape)) if n_s == 1 and n_w != 1]


def _check_step_shape(step: Tensor, w: Tensor) -> None:
    try:
        ok = step.numel() > 0 and torch.broadcast_shapes(step.shape, w.shape) == w.shape
    except RuntimeError:  # not broadcastable at all
        ok = False
    if not ok:
        raise ValueError(f"`step` must broadcast to the weight's shape {tuple(w.shape)}, got {tuple(step.shape)}.")


def lsq_forward_reference(
    w: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float, min_step: float
) -> tuple[Tensor, Tensor]:
    """The quantized ``w`` (in its dtype) and ``v = w / s`` in the compute dtype (at least float32), in torch ops.
    (``grad_scale`` is the backward's; an input here so the autograd registration can read it.)"""
    # At least float32: a float32 step divided in bf16/fp16 would lose most of its bits.
    ct = torch.promote_types(torch.promote_types(w.dtype, step.dtype), torch.float32)
    s = step.to(ct).clamp_min(min_step)
    v = w.to(ct) / s
    return (torch.round(torch.clamp(v, -qn, qp)) * s).to(w.dtype), v


def lsq_backward_reference(
    grad: Tensor, v: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float
) -> tuple[Tensor, Tensor]:
    """The gradients of ``w`` and of the step (summed in float64 over the weights sharing it, times ``grad_scale``)."""
    # NaN compares false everywhere, so a NaN weight is in none of the three regions: no gradient at all.
    inside = (v > -qn) & (v < qp)
    grad_w = grad * inside.to(grad.dtype)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    ds = torch.where(inside, torch.round(v) - v, torch.where(v <= -qn, -float(qn), zero))
    ds = torch.where(v >= qp, float(qp), ds)
    terms = grad.to(torch.float64) * ds.to(torch.float64)
    dims = _reduce_dims(step.shape, v.shape)
    total = terms.sum(dim=dims, keepdim=True) if dims else terms
    return grad_w, (total * grad_scale).reshape(step.shape).to(step.dtype)


def _setup_context(ctx, inputs: tuple, output: tuple) -> None:
    _, step, qn, qp, grad_scale, _ = inputs
    ctx.save_for_backward(output[1], step)
    ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs that get no gradient


def _backward(ctx, grad: Tensor, _grad_v: Tensor | None) -> tuple:
    if grad is None:
        return None, None, None, None, None, None
    v, step = ctx.saved_tensors
    grad_w, grad_step = lsq_backward(grad, v, step, ctx.qn, ctx.qp, ctx.grad_scale)
    need_w, need_step = ctx.needs_input_grad[:2]
    return (grad_w if need_w else None), (grad_step if need_step else None), None, None, None, None


lsq_forward = define_op("lsq_forward", lsq_forward_reference)
lsq_backward = define_op("lsq_backward", lsq_backward_reference)
register_autograd(lsq_forward, _setup_context, _backward)


def lsq_quantize(
    w: Tensor,
    step: Tensor,
    bits: int,
    narrow: bool = False,
    grad_scale: float | None = None,
    min_step: float = 0.0,
) -> Tensor:
    """LSQ: ``round(clamp(w / s, -Qn, Qp)) * s`` with the paper's gradients (see the module docstring).

    Args:
        w: The float weight, any shape and floating dtype.
        step: The learned step ``s``, already shaped to broadcast against ``w`` without changing its shape: ``(1,)``
            per tensor, or ``C`` entries along one axis for per channel (e.g. ``(C, 1, 1, 1)`` for a conv weight,
            ``(1, C)`` for a transposed ``Conv1D`` weight). Must be positive unless ``min_step`` is.
        bits: Bit width ``b``, 2..16.
        narrow: Symmetric range ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` instead of LSQ's ``[-2**(b-1), 2**(b-1) - 1]``.
        grad_scale: Factor on the step's gradient. None: the paper's ``1 / sqrt(N * Qp)`` with ``N = w.numel() /
            step.numel()``, the number of weights sharing a step. ``1.0`` gives the unscaled gradient.
        min_step: The forward uses ``max(s, min_step)``; the step's gradient passes straight through the floor.

    Returns:
        The fake-quantized weight, same shape and dtype as ``w``, values ``code * s`` with integer codes.

    Raises:
        ValueError: If ``bits`` is not an int in 2..16, ``step`` does not broadcast to ``w``'s shape, or
            ``grad_scale`` is not a finite positive number.
    """
    qn, qp = lsq_range(bits, narrow)
    _check_step_shape(step, w)
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(max(w.numel() // step.numel(), 1) * qp)
    check_positive(grad_scale, "grad_scale")
    return lsq_forward(w, step, qn, qp, float(grad_scale), float(min_step))[0]


def _zero_point(step: Tensor, offset: Tensor, levels: int, min_step: float, ct: torch.dtype) -> tuple[Tensor, ...]:
    """The floored step ``s``, ``u = -beta / s`` (the zero point before rounding) and ``z = clamp(round(u), 0, L)``."""
    s = step.to(ct).clamp_min(min_step)
    u = -offset.to(ct) / s
    return s, u, torch.round(u).clamp(0, levels)


def lsq_plus_forward_reference(
    x: Tensor, step: Tensor, offset: Tensor, levels: int, grad_scale: float, min_step: float
) -> tuple[Tensor, Tensor]:
    """The quantized ``x`` (in its dtype) and ``q = x / s`` in the compute dtype (at least float32), in torch ops.
    (``grad_scale`` is the backward's; an input here so the autograd registration can read it.)"""
    ct = torch.promote_types(torch.promote_types(x.dtype, step.dtype), torch.float32)
    s, _, z = _zero_point(step, offset, levels, min_step, ct)
    q = x.to(ct) / s
    # What QuantizeLinear / DequantizeLinear compute: round, add the integer zero point, saturate, subtract it.
    return ((torch.clamp(torch.round(q) + z, 0, levels) - z) * s).to(x.dtype), q


def lsq_plus_backward_reference(
    grad: Tensor, q: Tensor, step: Tensor, offset: Tensor, levels: int, grad_scale: float, min_step: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``x``, the step and the offset (:func:`lsq_plus_quantize`'s formulas, sums in float64)."""
    _, u, z = _zero_point(step, offset, levels, min_step, q.dtype)
    v = q + z  # the code before rounding: LSQ's regions are decided on it; NaN is in none of them
    inside, low, high = (v > 0) & (v < levels), v <= 0, v >= levels
    # z moves with beta and s straight through its rounding, not through its clamp to [0, L].
    z_moves = (torch.round(u) >= 0) & (torch.round(u) <= levels)
    pulled = (low | high) & z_moves  # saturated outputs (0 - z) s and (L - z) s follow z
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    ds = torch.where(inside, torch.round(q) - q, zero)
    ds = ds + torch.where(low, -z, zero) + torch.where(high, levels - z, zero)
    ds = ds + torch.where(pulled, u, zero)  # dy/dz * dz/ds = (-s) * (-u / s)
    g64 = grad.to(torch.float64)
    grad_step = ((g64 * ds.to(torch.float64)).sum() * grad_scale).reshape(step.shape).to(step.dtype)
    # dy/dz * dz/dbeta = (-s) * (-1 / s) = 1 on the saturated outputs
    grad_offset = (g64 * pulled.to(torch.float64)).sum().reshape(offset.shape).to(offset.dtype)
    return grad * inside.to(grad.dtype), grad_step, grad_offset


def _plus_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    _, step, offset, *ctx.args = inputs
    ctx.save_for_backward(output[1], step, offset)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _plus_backward(ctx, grad: Tensor, _grad_q: Tensor | None) -> tuple:
    if grad is None:
        return None, None, None, None, None, None
    q, step, offset = ctx.saved_tensors
    grads = lsq_plus_backward(grad, q, step, offset, *ctx.args)
    return (*(g if n else None for g, n in zip(grads, ctx.needs_input_grad)), None, None, None)


lsq_plus_forward = define_op("lsq_plus_forward", lsq_plus_forward_reference)
lsq_plus_backward = define_op("lsq_plus_backward", lsq_plus_backward_reference)
register_autograd(lsq_plus_forward, _plus_setup_context, _plus_backward)


def lsq_plus_quantize(
    x: Tensor, scale: Tensor, offset: Tensor, bits: int, grad_scale: float | None = None, min_step: float = 0.0
) -> Tensor:
    """LSQ+ (Bhalgat et al. 2020) on an integer grid: a learned step ``s`` and offset ``beta``, an integer zero point.

    The levels are those of integer hardware (and of ONNX QuantizeLinear/DequantizeLinear): the offset enters as
    the integer zero point ``z = clamp(round(-beta / s), 0, L)``, so 0 is always a level and the lowest level is
    ``-z s``, within ``s / 2`` of ``beta``. Forward, with ``L = 2**bits - 1``::

        y = (clamp(round(x / s) + z, 0, L) - z) * s

    Backward: torch.ao's learnable fake-quant gradients for ``(s, z)`` (LSQ's for the step, the zero point's
    ``-s`` on saturated outputs), with ``z = -beta / s`` taken straight through its rounding (not through its clamp:
    where the clamp binds, z does not move). With ``v = x / s + z``, LSQ's regions (``v == 0`` and ``v == L`` count
    as saturated) and ``u = -beta / s``::

        dy/dx    = 1 if 0 < v < L else 0
        dy/ds    = round(x / s) - x / s    if 0 < v < L          (times ``grad_scale``)
                 = -z + u                  if v <= 0             (u only where z moves)
                 = L - z + u               if v >= L
        dy/dbeta = 0 inside, 1 saturated (0 where z is clamped)

    The saturated outputs thus follow their end as LSQ+'s continuous ``round(clamp((x - beta) / s, 0, L)) s +
    beta`` did (``u - z`` is the rounding of the zero point), while the output is exactly what an integer runtime
    computes. Used for the input of a weight layer whose input is signed or not on a grid yet (GELU, SiLU,
    Hardswish outputs, residual sums, pooling, LayerNorm, embeddings). NaN inputs give NaN and no gradient.

    Args:
        x: The input, any shape and floating dtype.
        scale: The step ``s``, shape ``(1,)``.
        offset: The offset ``beta`` (the lowest level before its rounding to ``-z s``), shape ``(1,)``.
        bits: Bit width, 1..16.
        grad_scale: Factor on the step's gradient; None: ``1 / sqrt(x.numel() * L)`` (LSQ's ``g``).
        min_step: Floor of the step in the forward (straight-through).

    Returns:
        The fake-quantized input, same shape and dtype as ``x``: ``(code - z) * s`` with integer codes in ``0..L``,
        computed in at least float32.

    Raises:
        ValueError: If ``bits`` is not an int in 1..16 or ``grad_scale`` is not a finite positive number.
    """
    check_bits(bits, "bits")
    levels = 2**bits - 1
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(max(x.numel(), 1) * levels)
    check_positive(grad_scale, "grad_scale")
    return lsq_plus_forward(x, scale, offset, levels, float(grad_scale), float(min_step))[0]
