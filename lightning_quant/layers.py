"""Layers whose forward reads a fake-quantized weight, built from the user's layer without copying it.

:func:`swap_layer` turns a layer into its quantized twin in place (a class change, the object stays the same), so
the model holds the very same layer and ``weight``/``bias`` Parameter objects: the user's references, other
callbacks' references, their optimizer groups and their checkpoint keys (``conv1.weight``) stay valid. The weight
quantizer is a child module named ``weight_quantizer``; its learned values (if any) appear as
``conv1.weight_quantizer.*`` keys.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from lightning_quant.quantizers.base import WeightQuantizer


class QuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses ``weight_quantizer(weight)``."""

    weight_quantizer: WeightQuantizer

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight_quantizer(self.weight), self.bias)


class QuantConv1d(nn.Conv1d):
    """``nn.Conv1d`` whose forward uses ``weight_quantizer(weight)``."""

    weight_quantizer: WeightQuantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight_quantizer(weight)``."""

    weight_quantizer: WeightQuantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight_quantizer(self.weight), self.bias)


class QuantConv3d(nn.Conv3d):
    """``nn.Conv3d`` whose forward uses ``weight_quantizer(weight)``."""

    weight_quantizer: WeightQuantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight_quantizer(self.weight), self.bias)


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` whose forward looks rows up in ``weight_quantizer(weight)``."""

    weight_quantizer: WeightQuantizer

    def forward(self, input: Tensor) -> Tensor:
        return F.embedding(
            input,
            self.weight_quantizer(self.weight),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


#: Exact layer type -> its quantized twin. Subclasses are left alone on purpose: they may override ``forward``
#: (``nn.MultiheadAttention``'s ``out_proj`` is a Linear subclass whose forward is never called).
QUANTIZED_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Embedding: QuantEmbedding,
}
QUANTIZED_LAYERS = tuple(QUANTIZED_TWINS.values())



def swap_layer(layer: nn.Module, weight_quantizer: WeightQuantizer) -> nn.Module:
    """Turn ``layer`` into its quantized twin in place and return it.

    The layer keeps its identity: only its class changes (to a subclass of its own class whose ``forward`` reads
    ``weight_quantizer(weight)``) and it gains the ``weight_quantizer`` child. Every reference the user or another
    callback holds to the layer (``ModelPruning``'s list, an optimizer's parameters, hooks) stays valid, and so do its
    Parameter objects and state-dict keys.

    Args:
        layer: A module whose exact type is a key of :data:`QUANTIZED_TWINS`.
        weight_quantizer: The module applied to the weight on every forward.

    Raises:
        TypeError: If ``layer``'s type has no quantized twin.
    """
    twin_cls = QUANTIZED_TWINS.get(type(layer))
    if twin_cls is None:
        raise TypeError(
            f"No quantized twin for {type(layer).__name__}; supported: {sorted(t.__name__ for t in QUANTIZED_TWINS)}"
        )
    # The twin adds no state of its own beyond the child registered below, so the object is a valid twin as is.
    layer.__class__ = twin_cls
    layer.weight_quantizer = weight_quantizer
    return layer
