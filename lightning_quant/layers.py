"""Layers whose forward reads a fake-quantized weight, built from the user's layer without copying it.

:func:`swap_layer` builds the quantized twin of a layer by taking over its attribute dictionaries, so the new module
holds the very same ``weight`` and ``bias`` Parameter objects: the user's references, their optimizer groups and
their checkpoint keys (``conv1.weight``) stay valid. The weight quantizer is a child module named
``weight_quantizer``; its learned values (if any) appear as ``conv1.weight_quantizer.*`` keys.
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

_CONTAINERS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def swap_layer(layer: nn.Module, weight_quantizer: WeightQuantizer) -> nn.Module:
    """Return the quantized twin of ``layer`` sharing its Parameters, buffers, hooks and attributes.

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
    twin = twin_cls.__new__(twin_cls)
    twin.__dict__.update(layer.__dict__)
    # Own containers, shared contents: adding `weight_quantizer` must not add it to the old layer as well.
    for key in _CONTAINERS:
        if key in layer.__dict__:
            twin.__dict__[key] = type(layer.__dict__[key])(layer.__dict__[key])
    twin.weight_quantizer = weight_quantizer
    return twin
