"""QuantNoise (Fan et al. 2020, "Training with Quantization Noise for Extreme Model Compression") as pure functions.

At each training forward only a random fraction ``p`` of the weights (or of weight blocks) is distorted; the rest
stays in full precision, so most gradients are unbiased while the network still learns to live with the distortion.
Two distortions are provided:

* **scalar noise** (:func:`scalar_noise`): each entry is, with probability ``p``, replaced by its per-tensor affine
  fake-quantized value (:func:`fake_quantize_affine`, ``2**bits`` levels from the current min/max).
* **block noise** (:func:`block_noise`): the iPQ proxy. Each block is, with probability ``p``, zeroed, and the whole
  tensor is rescaled by ``1 / (1 - p)`` so that its expectation is the weight (as in dropout).

Gradients are straight-through everywhere (``d out / d w = 1``): this is the paper's STE on the noised part, and it
is exactly the gradient fairseq's implementation ends up with (it writes the noisy tensor into ``weight.data`` so
autograd never sees the noise). Unlike fairseq these functions never write into ``w``: fairseq's
``weight.data = s * weight.masked_fill(mask, 0)`` turns the noise into a permanent change of the stored weight
that compounds on every training forward (fairseq issues 3783, 3195).

Every tensor-valued rate ``p`` is read as a tensor (never ``.item()``) and no Python branch depends on tensor
values, so these functions trace under ``torch.compile(fullgraph=True)``; branches depend only on shapes and Python
arguments.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_quant.functional.checks import check_bits

__all__ = ["block_noise", "block_shape", "check_block_size", "check_rate", "fake_quantize_affine", "scalar_noise"]

# No custom ops here: the work is torch's own ops (min/max, rand, where, masked_fill), which every tracer and compiler
# already handles and fuses with their neighbours; an opaque op would only hide them. The straight-through gradient is
# an autograd function returning the quantized values themselves (no ``w + (q - w).detach()`` rounding noise).


def check_rate(p: object, block: bool = False, allow_tensor: bool = True) -> float | Tensor:
    """Check a noise rate: a number in [0, 1] (in [0, 1) with ``block``), or, with ``allow_tensor``, a 0-d tensor
    (not value-checked: a module's buffer read inside a possibly compiled forward; checking it would sync the device).

    Raises:
        ValueError: If ``p`` is not allowed; the message names it.
    """
    if isinstance(p, Tensor) and allow_tensor:
        if p.dim() != 0:
            raise ValueError(f"`p` must be a number or a 0-d tensor, got a tensor of shape {tuple(p.shape)}.")
        return p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0):
        raise ValueError(f"`p` must be a number in [0, 1], got {p!r}.")
    if block and p == 1.0:
        # Dropping every block zeroes the weight: the layer would train on its bias alone.
        raise ValueError(
            "`p` must be in [0, 1) for mode='block', got 1.0: p = 1 drops every block and the layer's weight "
            "would be all zeros."
        )
    return float(p)


def check_block_size(block_size: object) -> None:
    """Raise a ``ValueError`` unless ``block_size`` is an int >= 1."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"`block_size` must be an int >= 1, got {block_size!r}.")


def _affine_fake_quantize_values(w: Tensor, bits: int) -> Tensor:
    """The fake-quantized values of ``w`` (no autograd: called inside the autograd functions)."""
    qmax = float(2**bits - 1)
    w_min = w.amin()
    w_max = w.amax()
    scale = (w_max - w_min) / qmax
    # A constant tensor (max == min, or a range so small that the scale underflows) is already one level: keep it.
    # A substitute scale of 1 keeps the arithmetic finite; `torch.where` then discards that branch.
    degenerate = scale <= 0
    scale = torch.where(degenerate, torch.ones_like(scale), scale)
    # Integer zero point: when min < 0 < max it lies in [0, qmax] and 0.0 is exactly one of the levels.
    zero_point = torch.round(-w_min / scale)
    q = torch.clamp(torch.round(w / scale + zero_point), 0.0, qmax)
    return torch.where(degenerate, w, (q - zero_point) * scale)


class _StraightThrough(torch.autograd.Function):
    """Returns ``values`` (computed from ``w`` without autograd) as they are, with the identity gradient to ``w``."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, values: Tensor) -> Tensor:
        return values

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _block_noise_values(w: Tensor, dropped: Tensor, p: Tensor) -> Tensor:
    # `dropped` has the block shape (out, blocks) of `block_shape`; each block is a run of consecutive entries, so
    # the weight is viewed as (out, blocks, entries per block) for every layer type.
    blocks = w.reshape(dropped.shape[0], dropped.shape[1], -1)
    # p == 1 drops every block; dividing by 1 instead of 0 keeps the result the zero tensor rather than 0/0 = NaN.
    keep = 1.0 - p
    keep = torch.where(keep > 0, keep, torch.ones_like(keep))
    return (blocks.masked_fill(dropped.unsqueeze(-1), 0.0) / keep).view(w.shape)


def fake_quantize_affine(w: Tensor, bits: int) -> Tensor:
    """Per-tensor asymmetric (affine) fake quantization of ``w`` to ``2**bits`` levels, straight-through gradient.

    The quantization parameters are observed from the current values of ``w`` (no running statistics)::

        scale      = (max(w) - min(w)) / (2**bits - 1)
        zero_point = round(-min(w) / scale)                 # an integer offset
        q          = clamp(round(w / scale + zero_point), 0, 2**bits - 1)
        out        = (q - zero_point) * scale

    ``round`` is round-half-to-even (``torch.round``). The output holds at most ``2**bits`` distinct values, each
    exactly ``(q - zero_point) * scale``: the straight-through estimator is an autograd function returning ``out``
    itself, so no ``w + (out - w).detach()`` rounding error creeps into the levels. Because the zero point is
    rounded, the levels are the grid through 0.0 and the extremes of ``w`` can land up to half a step outside it
    (they are then clamped to the outermost level); at ``bits=1`` a tensor symmetric about 0 has the levels
    ``{0, max - min}`` and collapses to 0, as with ``torch.ao.quantization``'s min/max observers. Use at least
    2 bits. A constant tensor (``max == min``) is returned unchanged (it already is a single level).

    Args:
        w: The tensor to quantize (any shape, floating point). Never modified.
        bits: Number of bits, an int in 1..16.

    Returns:
        A new tensor of ``w``'s shape and dtype; its gradient with respect to ``w`` is the identity.

    Raises:
        ValueError: If ``bits`` is not an int in 1..16.
    """
    check_bits(bits, "bits")
    if w.numel() == 0:
        return w.clone()
    with torch.no_grad():
        values = _affine_fake_quantize_values(w, bits)
    return _StraightThrough.apply(w, values)


def scalar_noise(w: Tensor, p: float | Tensor, bits: int, generator: torch.Generator | None = None) -> Tensor:
    """QuantNoise with scalar (int-``bits``) noise: a random fraction ``p`` of the entries take their quantized value.

    A fresh Bernoulli(``p``) mask is drawn on every call; entries where it is set take the value of
    :func:`fake_quantize_affine` ``(w, bits)`` (scale and zero point observed from the whole of ``w``), the others
    keep their float value. ``p = 0`` returns exactly the values of ``w``, ``p = 1`` exactly
    ``fake_quantize_affine(w, bits)``. The gradient is the identity on every entry (straight-through on the
    quantized ones, exact on the float ones).

    Args:
        w: The weight (any shape, floating point). Never modified.
        p: The noise rate in [0, 1]: a number, or a 0-d tensor (e.g. a module buffer; not value-checked here).
        bits: Number of bits of the scalar quantizer, an int in 1..16.
        generator: Optional random generator (on ``w``'s device) for reproducible masks.

    Returns:
        A new tensor of ``w``'s shape and dtype.

    Raises:
        ValueError: If ``bits`` is not an int in 1..16, or ``p`` is a number outside [0, 1].
    """
    check_bits(bits, "bits")
    check_rate(p)
    if w.numel() == 0:
        return w.clone()
    # Uniform draws lie in [0, 1): `< 0` never holds and `< 1` always does, so p = 0 and p = 1 are exact.
    uniform = torch.rand(w.shape, generator=generator, device=w.device)
    # A number is compared in the draws' dtype, as `uniform < p` does; as a tensor it never recompiles a kernel.
    rate = p if isinstance(p, Tensor) else torch.tensor(p, dtype=uniform.dtype)
    with torch.no_grad():
        values = torch.where(uniform < rate, _affine_fake_quantize_values(w, bits), w)
    return _StraightThrough.apply(w, values)


def block_shape(shape: torch.Size | tuple[int, ...], block_size: int, name: str | None = None) -> tuple[int, ...]:
    """The shape of the per-block Bernoulli mask of a weight of ``shape``; it broadcasts back by repetition.

    Blocks follow fairseq's ``quant_noise``:

    * 2-D weight (``nn.Linear`` ``(out, in)``, ``nn.Embedding`` ``(num, dim)``): ``block_size`` consecutive entries
      along the last dimension (input features, embedding dimension). Mask shape ``(out, in // block_size)``.
    * convolution weight ``(out, in / groups, *kernel)`` with a kernel of one element (1x1, 1, 1x1x1): ``block_size``
      consecutive input channels. Mask shape ``(out, in // block_size)``.
    * convolution weight with a larger kernel: one whole kernel per ``(out, in)`` pair; ``block_size`` is not used.
      Mask shape ``(out, in)``.

    Args:
        shape: The weight's shape.
        block_size: Number of consecutive input features per block, an int >= 1.
        name: Optional layer name, quoted in the error message.

    Returns:
        The mask shape described above.

    Raises:
        ValueError: If ``block_size`` is not an int >= 1, the weight has fewer than 2 dimensions, or ``block_size``
            does not divide the number of input features (the message names the layer when ``name`` is given).
    """
    check_block_size(block_size)
    where = f"layer {name!r}" if name is not None else "the weight"
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"Block noise needs a weight with at least 2 dimensions; {where} has shape {shape}.")
    out_features, in_features = shape[0], shape[1]
    if len(shape) > 2 and math.prod(shape[2:]) > 1:
        return (out_features, in_features)
    if in_features % block_size != 0:
        kind = "input features" if len(shape) == 2 else "input channels (per group)"
        raise ValueError(
            f"QuantNoise block_size={block_size} does not divide the {in_features} {kind} of {where} "
            f"(weight shape {shape}); choose a block_size that divides {in_features}, or skip this layer."
        )
    return (out_features, in_features // block_size)


def block_noise(
    w: Tensor,
    p: float | Tensor,
    block_size: int,
    generator: torch.Generator | None = None,
    name: str | None = None,
) -> Tensor:
    """QuantNoise with the iPQ block proxy: drop each block with probability ``p``, rescale by ``1 / (1 - p)``.

    Blocks are those of :func:`block_shape`. A fresh Bernoulli(``p``) draw per block on every call; dropped blocks
    become 0, every kept entry is ``w / (1 - p)``, so the expectation over draws is ``w``. ``p = 0`` returns the
    values of ``w``. ``p = 1`` drops every block and returns zeros (there is nothing left to rescale; defined this
    way rather than as 0/0 = NaN, and :class:`~lightning_quant.quantizers.quant_noise.QuantNoiseWeight` refuses
    ``p = 1`` in block mode). The gradient is the identity (straight-through, as in fairseq).

    Args:
        w: The weight, at least 2-D (floating point). Never modified.
        p: The drop rate in [0, 1]: a number, or a 0-d tensor (e.g. a module buffer; not value-checked here).
        block_size: Number of consecutive input features per block, an int >= 1 (unused for convolutions with a
            kernel larger than one element, whose blocks are whole kernels).
        generator: Optional random generator (on ``w``'s device) for reproducible masks.
        name: Optional layer name, quoted in error messages.

    Returns:
        A new tensor of ``w``'s shape and dtype.

    Raises:
        ValueError: If ``p`` is a number outside [0, 1], or ``block_size`` is invalid for ``w`` (see
            :func:`block_shape`).
    """
    check_rate(p)
    mask_shape = block_shape(w.shape, block_size, name)
    if w.numel() == 0:
        return w.clone()
    p_tensor = torch.as_tensor(p, dtype=w.dtype, device=w.device)
    dropped = torch.rand(mask_shape, generator=generator, device=w.device) < p_tensor
    with torch.no_grad():
        values = _block_noise_values(w, dropped, p_tensor)
    return _StraightThrough.apply(w, values)
