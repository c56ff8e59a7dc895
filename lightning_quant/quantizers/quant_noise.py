"""QuantNoise weight quantizer (Fan et al. 2020): quantize a random fraction ``p`` of the weight at each training step.

:class:`QuantNoiseWeight` is a :class:`~lightning_quant.quantizers.base.WeightQuantizer`: the layer wrappers of
:mod:`lightning_quant.layers` call it on their weight at every forward. It never writes into the weight, so the
stored Parameter only changes through the optimizer (fairseq's block noise overwrote ``weight.data`` and decayed it).

Behaviour by mode:

* ``mode="scalar"`` (int-``bits`` scalar noise):
    - training: :func:`~lightning_quant.functional.quant_noise.scalar_noise` -- each entry takes its fake-quantized
      value with probability ``p``, the rest stay float; straight-through gradient.
    - evaluation: the **whole** weight is fake-quantized, ``fake_quantize_affine(weight, bits)``, with the scale and
      zero point observed from the current weights for ``2**bits`` levels (not an 8-bit observer: fairseq's int4
      path used 8-bit observers, fairseq issue 3858). ``p`` plays no part, so validation measures the quantized
      model the training was preparing for.
* ``mode="block"`` (iPQ proxy noise):
    - training: :func:`~lightning_quant.functional.quant_noise.block_noise` -- each block is dropped with
      probability ``p`` and everything rescaled by ``1 / (1 - p)``; straight-through gradient.
    - evaluation: the weight is returned **unchanged** (no noise at evaluation, as in the paper and fairseq). The
      block proxy prepares the model for product quantization (iPQ), which is a separate step after training;
      ``bits`` is not used in this mode.

The rate is a buffer ``p`` (a 0-d float tensor) set from outside (the callback's schedule) with :meth:`set_p`; the
forward reads it as a tensor, with no ``.item()`` and no Python branch on its value, so a compiled model picks up a
new rate without recompiling. Being a buffer it also follows ``.to(device)`` and is saved in the ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant.functional.quant_noise import (
    block_noise,
    block_shape,
    check_block_size,
    check_rate,
    fake_quantize_affine,
    scalar_noise,
)
from lightning_quant.quantizers.base import WeightQuantizer, check_bits

__all__ = ["QuantNoiseWeight"]

_MODES = ("scalar", "block")


class QuantNoiseWeight(WeightQuantizer):
    """QuantNoise on a layer's weight: scalar (int-``bits``) noise or iPQ-style block noise at rate ``p``.

    See the module docstring for what training and evaluation compute in each mode.

    Args:
        bits: Bits of the scalar quantizer, an int in 1..16 (``mode="scalar"``; unused in block mode).
        p: Initial noise rate in [0, 1] (in [0, 1) for ``mode="block"``); the callback moves it with
            :meth:`set_p`. fairseq's values: 0.5 for scalar noise, 0.05-0.2 for block noise.
        mode: ``"scalar"`` or ``"block"``.
        block_size: Consecutive input features per block in block mode, an int >= 1 (fairseq: 8). Whole kernels
            are the blocks of convolutions with a kernel larger than one element.

    Raises:
        ValueError: If an argument is outside its allowed values (the message names it).
    """

    p: Tensor

    #: Scalar noise quantizes on a grid through 0 (its zero point is an integer); block noise scales or zeroes
    #: whole blocks. Either way a weight that is exactly 0 stays 0.
    has_zero_level = True

    def __init__(self, bits: int = 4, p: float = 0.5, mode: str = "scalar", block_size: int = 8) -> None:
        super().__init__()
        check_bits(bits, "bits")
        if mode not in _MODES:
            raise ValueError(f"`mode` must be one of {list(_MODES)}, got {mode!r}.")
        check_block_size(block_size)
        rate = check_rate(p, block=mode == "block", allow_tensor=False)
        self.bits = bits
        self.mode = mode
        self.block_size = block_size
        # float32 0-d tensor: read by the forward as a tensor, so changing it never retraces a compiled graph.
        self.register_buffer("p", torch.tensor(rate, dtype=torch.float32))

    def set_p(self, value: float) -> None:
        """Set the noise rate in place (the buffer keeps its device and dtype).

        Args:
            value: The new rate in [0, 1] (in [0, 1) for ``mode="block"``).

        Raises:
            ValueError: If ``value`` is not allowed for this mode.
        """
        rate = check_rate(value, block=self.mode == "block", allow_tensor=False)
        with torch.no_grad():
            self.p.fill_(rate)

    def forward(self, weight: Tensor) -> Tensor:
        # Branches depend on Python attributes only (training flag, mode), never on tensor values.
        if self.training:
            if self.mode == "scalar":
                return scalar_noise(weight, self.p, self.bits)
            return block_noise(weight, self.p, self.block_size)
        if self.mode == "scalar":
            return fake_quantize_affine(weight, self.bits)
        return weight

    def check_layer(self, layer: nn.Module, name: str) -> None:
        """Check that this quantizer can noise ``layer``'s weight, before training starts.

        In block mode ``block_size`` must divide the layer's input features (``nn.Linear``), embedding dimension
        (``nn.Embedding``) or input channels per group (1x1 convolutions); larger convolution kernels are whole
        blocks and always fit. Scalar mode fits any weight.

        Args:
            layer: The layer whose ``weight`` this quantizer will receive.
            name: The layer's qualified name, quoted in the error message.

        Raises:
            ValueError: If ``layer`` has no tensor ``weight``, or (block mode) ``block_size`` does not fit it; the
                message names the layer, its number of features and the block size.
        """
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(
                f"QuantNoise needs a layer with a `weight` tensor; layer {name!r} ({type(layer).__name__}) has none."
            )
        if self.mode == "block":
            block_shape(weight.shape, self.block_size, name)

    def extra_repr(self) -> str:
        rate = "?" if self.p.is_meta else f"{float(self.p):.4g}"
        return f"bits={self.bits}, p={rate}, mode={self.mode!r}, block_size={self.block_size}"
