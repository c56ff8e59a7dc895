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


class _QuantizedInput:
    """The optional ``input_quantizer`` child: puts the layer's input on a grid when nothing upstream did."""

    _modules: dict[str, nn.Module | None]

    def quantized_input(self, input: Tensor) -> Tensor:
        quantizer = self._modules.get("input_quantizer")
        return input if quantizer is None else quantizer(input)


class QuantLinear(_QuantizedInput, nn.Linear):
    """``nn.Linear`` whose forward uses ``weight_quantizer(weight)`` (and ``input_quantizer(input)`` if it has one)."""

    weight_quantizer: WeightQuantizer

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(self.quantized_input(input), self.weight_quantizer(self.weight), self.bias)


class QuantConv1d(_QuantizedInput, nn.Conv1d):
    """``nn.Conv1d`` whose forward uses ``weight_quantizer(weight)`` (and ``input_quantizer(input)``)."""

    weight_quantizer: WeightQuantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(input), self.weight_quantizer(self.weight), self.bias)


class QuantConv2d(_QuantizedInput, nn.Conv2d):
    """``nn.Conv2d`` whose forward uses ``weight_quantizer(weight)`` (and ``input_quantizer(input)``)."""

    weight_quantizer: WeightQuantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(input), self.weight_quantizer(self.weight), self.bias)


class QuantConv3d(_QuantizedInput, nn.Conv3d):
    """``nn.Conv3d`` whose forward uses ``weight_quantizer(weight)`` (and ``input_quantizer(input)``)."""

    weight_quantizer: WeightQuantizer

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(self.quantized_input(input), self.weight_quantizer(self.weight), self.bias)


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` whose forward looks rows up in ``weight_quantizer(weight)`` (its input is indices)."""

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


class _WeightSwapTwin(_QuantizedInput):
    """Twin of a layer class this package does not know the forward of (a user's ``nn.Linear`` subclass, timm's
    ``Linear``, transformers' ``Conv1D``): its own ``forward`` runs with ``weight`` standing for the quantized weight.

    The Parameter goes back in place right after, so names, references and the optimizer never see the swap; the
    gradient reaches it through the weight quantizer.
    """

    weight_quantizer: WeightQuantizer
    _parameters: dict[str, nn.Parameter | None]

    def forward(self, input: Tensor, *args, **kwargs):
        weight = self._parameters["weight"]
        self._parameters["weight"] = self.weight_quantizer(weight)  # type: ignore[assignment]
        try:
            return super().forward(self.quantized_input(input), *args, **kwargs)  # type: ignore[misc]
        finally:
            self._parameters["weight"] = weight

    def __reduce_ex__(self, protocol: int):
        # A class made at run time is not importable by name: pickle (ddp_spawn) rebuilds it from its base.
        return _new_swap_twin, (type(self).__bases__[1],), self.__getstate__()


#: Exact layer type -> its quantized twin. Subclasses get a weight-swapping twin (:func:`twin_class`) instead: they
#: may override ``forward``.
QUANTIZED_TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Conv3d: QuantConv3d,
    nn.Embedding: QuantEmbedding,
}
#: Every quantized layer class (``isinstance`` checks).
QUANTIZED_LAYERS: tuple[type, ...] = (*QUANTIZED_TWINS.values(), _WeightSwapTwin)

_SWAP_TWINS: dict[type[nn.Module], type[nn.Module]] = {}


def swap_twin_class(base: type[nn.Module]) -> type[nn.Module]:
    """The (cached) weight-swapping twin class of ``base``."""
    if base not in _SWAP_TWINS:
        _SWAP_TWINS[base] = type(f"Quant{base.__name__}", (_WeightSwapTwin, base), {"__module__": __name__})
    return _SWAP_TWINS[base]


def _new_swap_twin(base: type[nn.Module]) -> nn.Module:
    cls = swap_twin_class(base)
    return cls.__new__(cls)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored transposed, ``(in, out)``."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")


#: Layer types the surgery finds as weight layers (with their subclasses), and transformers' ``Conv1D``.
WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
#: Linear subclasses whose forward is never called (``nn.MultiheadAttention``'s ``out_proj``): not a target.
_NEVER_CALLED = (nn.modules.linear.NonDynamicallyQuantizableLinear,)


def twin_class(layer: nn.Module) -> type[nn.Module] | None:
    """The quantized twin class of ``layer``, or None when it is not a weight layer this package quantizes."""
    cls = type(layer)
    if cls in QUANTIZED_TWINS:
        return QUANTIZED_TWINS[cls]
    if isinstance(layer, (QUANTIZED_LAYERS, _WeightSwapTwin, _NEVER_CALLED)):
        return None
    if isinstance(layer, WEIGHT_LAYER_TYPES) or is_hf_conv1d(layer):
        return swap_twin_class(cls)
    return None


def output_channel_axis(layer: nn.Module) -> int:
    """The weight's output-channel axis: 1 for transformers' ``Conv1D`` (transposed), 0 otherwise."""
    return 1 if is_hf_conv1d(layer) else 0


def swap_layer(layer: nn.Module, weight_quantizer: WeightQuantizer) -> nn.Module:
    """Turn ``layer`` into its quantized twin in place and return it.

    The layer keeps its identity: only its class changes (to a subclass of its own class whose ``forward`` reads
    ``weight_quantizer(weight)``) and it gains the ``weight_quantizer`` child. Every reference the user or another
    callback holds to the layer (``ModelPruning``'s list, an optimizer's parameters, hooks) stays valid, and so do its
    Parameter objects and state-dict keys.

    Args:
        layer: A weight layer (:func:`twin_class` gives its twin class).
        weight_quantizer: The module applied to the weight on every forward.

    Raises:
        TypeError: If ``layer``'s type has no quantized twin.
    """
    twin_cls = twin_class(layer)
    if twin_cls is None:
        raise TypeError(
            f"No quantized twin for {type(layer).__name__}; supported: {sorted(t.__name__ for t in QUANTIZED_TWINS)}"
            " and their subclasses, and transformers' Conv1D"
        )
    # The twin adds no state of its own beyond the child registered below, so the object is a valid twin as is.
    layer.__class__ = twin_cls
    layer.weight_quantizer = weight_quantizer
    return layer
