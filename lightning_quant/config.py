"""Recipes: what to quantize and how, as small dataclasses that round-trip through plain dicts.

A config says which module types it replaces and builds the quantizer for one place of the model. The surgery
(:mod:`lightning_quant.surgery`) decides *where* (skip patterns, first/last-layer policy, call sites) and is shared by
every method. ``to_dict``/``config_from_dict`` store a recipe in a checkpoint that torch loads with
``weights_only=True`` and rebuild it in :func:`lightning_quant.load_from_checkpoint`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from lightning_quant.layers import output_channel_axis
from lightning_quant.quantizers.base import ActivationQuantizer, WeightQuantizer, check_bits, check_positive
from lightning_quant.quantizers.dsq import DSQActivation, DSQWeight
from lightning_quant.quantizers.inputs import DSQInput, LSQPlusInput
from lightning_quant.quantizers.lsq import LSQWeight
from lightning_quant.quantizers.pact import DoReFaWeight, PACTActivation
from lightning_quant.quantizers.quant_noise import QuantNoiseWeight

#: Allowed values of ``first_last``: what happens to the first and last weight layers (and the activation that feeds
#: the last layer). ``"float"`` is the PACT paper's choice; ``"8bit"`` the common later compromise.
FIRST_LAST_POLICIES = ("float", "8bit", "quantize")

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def as_names(value: object, name: str) -> tuple[str, ...]:
    """Normalise a list-of-names argument: None is empty, one string is one name (not its characters).

    Raises:
        ValueError: If ``value`` is not None, a string, or a sequence of non-empty strings.
    """
    if value is None:
        return ()
    names = (value,) if isinstance(value, str) else value
    try:
        names = tuple(names)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"`{name}` must be a module name, a glob pattern or a list of them (or None), got {value!r}.")
    return names


@dataclass(frozen=True)
class QuantConfig:
    """Base recipe. Subclasses set ``method`` and override the two ``make_*`` factories.

    Args:
        act_bits: Bit width of quantized activations, or None to leave activations float.
        weight_bits: Bit width of quantized weights, or None to leave weights float.
        first_last: ``"float"``, ``"8bit"`` or ``"quantize"``; see :data:`FIRST_LAST_POLICIES`.
        skip: Module names or glob patterns (``fnmatch``) left alone, with everything under them.
        quantize_inputs: Put the input of every quantized weight layer on an ``act_bits`` grid where no quantized
            activation already does (GELU/SiLU/Hardswish outputs, residual sums, pooling, LayerNorm), with the
            recipe's input quantizer (:meth:`make_input`). False: only the activation modules are quantized.
    """

    method: ClassVar[str] = ""
    act_bits: int | None = 4
    weight_bits: int | None = 4
    first_last: str = "float"
    skip: tuple[str, ...] = field(default_factory=tuple)
    quantize_inputs: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.quantize_inputs, bool):
            raise ValueError(f"`quantize_inputs` must be a bool, got {self.quantize_inputs!r}.")
        check_bits(self.act_bits, "act_bits", allow_none=True)
        check_bits(self.weight_bits, "weight_bits", allow_none=True)
        if self.first_last not in FIRST_LAST_POLICIES:
            raise ValueError(f"`first_last` must be one of {FIRST_LAST_POLICIES}, got {self.first_last!r}.")
        object.__setattr__(self, "skip", as_names(self.skip, "skip"))

    activation_types: ClassVar[tuple[type[nn.Module], ...]] = ACTIVATION_TYPES
    weight_types: ClassVar[tuple[type[nn.Module], ...]] = WEIGHT_TYPES

    def make_activation(self, original: nn.Module, num_sites: int, bits: int) -> ActivationQuantizer:
        raise NotImplementedError

    def make_weight(self, layer: nn.Module, name: str, bits: int) -> WeightQuantizer:
        raise NotImplementedError

    def make_input(self, bits: int) -> ActivationQuantizer | None:
        """The quantizer for a weight layer's input that is not on a grid yet; None: the recipe has none."""
        return None

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["skip"] = list(self.skip)
        return {"method": self.method, **data}


#: Weight quantizers PACT can use, by the names its ``weight_quantizer`` argument takes.
PACT_WEIGHT_QUANTIZERS = ("lsq", "dorefa")


@dataclass(frozen=True)
class PACTConfig(QuantConfig):
    """PACT recipe: learned-clip activations (:class:`PACTActivation`) and learned-step (LSQ) or DoReFa weights.

    Args:
        alpha_init: Initial clip of every activation, or None (default) to calibrate each call site's clip from the
            data it sees (:mod:`lightning_quant.calibrator`; until then it holds 6, as ReLU6). The paper's fixed
            start is 10. ``nn.ReLU6`` sites start at ``min(alpha_init, 6)``.
        weight_quantizer: ``"lsq"`` (default): :class:`LSQWeight`, a learned step per tensor (or per output channel)
            started at the MSE-optimal clip of the weight, with a zero level and the weight's own scale.
            ``"dorefa"``: the paper's DoReFa weights (no learned values; output in [-1, 1] whatever the weight's
            scale, no zero level).
        per_channel: One LSQ step per output channel instead of one per tensor (``"lsq"`` only).
    """

    method: ClassVar[str] = "pact"
    alpha_init: float | None = None
    weight_quantizer: str = "lsq"
    per_channel: bool = False

    def __post_init__(self) -> None:
        check_bits(self.act_bits, "act_bits")  # PACT is about activations: they are always quantized
        super().__post_init__()
        if self.alpha_init is not None:
            check_positive(self.alpha_init, "alpha_init")
        if self.weight_quantizer not in PACT_WEIGHT_QUANTIZERS:
            raise ValueError(
                f"`weight_quantizer` must be one of {PACT_WEIGHT_QUANTIZERS}, got {self.weight_quantizer!r}."
            )
        if not isinstance(self.per_channel, bool):
            raise ValueError(f"`per_channel` must be a bool, got {self.per_channel!r}.")
        if self.per_channel and self.weight_quantizer != "lsq":
            raise ValueError(
                f"`per_channel=True` needs `weight_quantizer='lsq'` (DoReFa has no per-channel scale), got"
                f" weight_quantizer={self.weight_quantizer!r}."
            )
        if self.weight_quantizer == "lsq" and self.weight_bits is not None and self.weight_bits < 2:
            raise ValueError(
                f"`weight_bits` must be at least 2 with `weight_quantizer='lsq'` (1 bit leaves no zero level), got"
                f" {self.weight_bits!r}; use weight_quantizer='dorefa' for binary weights."
            )

    def make_activation(self, original: nn.Module, num_sites: int, bits: int) -> ActivationQuantizer:
        relu6 = isinstance(original, nn.ReLU6)
        if self.alpha_init is None:  # calibrated from data later; 6 until then
            return PACTActivation(bits, num_sites=num_sites, alpha_init=6.0, relu6=relu6, calibrated=False)
        alpha = min(self.alpha_init, 6.0) if relu6 else self.alpha_init
        return PACTActivation(bits, num_sites=num_sites, alpha_init=alpha, relu6=relu6)

    def make_input(self, bits: int) -> ActivationQuantizer | None:
        return LSQPlusInput(bits)

    def make_weight(self, layer: nn.Module, name: str, bits: int) -> WeightQuantizer:
        if self.weight_quantizer == "dorefa":
            return DoReFaWeight(bits)
        quantizer = LSQWeight(bits, per_channel=self.per_channel, channel_axis=output_channel_axis(layer))
        if self.per_channel and layer.weight.dim() < 2:
            raise ValueError(
                f"`per_channel=True` needs an output-channel axis, but {name}'s weight has shape"
                f" {tuple(layer.weight.shape)}; skip that layer or use per-tensor steps."
            )
        quantizer.init_from(layer.weight.detach())
        return quantizer


@dataclass(frozen=True)
class DSQConfig(QuantConfig):
    """DSQ recipe: :class:`DSQActivation` for activations, :class:`DSQWeight` for weights.

    Weight ranges start at the weight's own ``[min, max]`` (set here, at injection); activation ranges start at the
    documented default ``[0, 6]`` and are calibrated from the first batch by the callback.

    Args:
        temperature: Initial characteristic variable alpha in (0, 1).
        learn_temperature: Learn alpha per layer (a Parameter) instead of following a schedule (a buffer).
        learn_activation_lower: Learn the activations' lower bound too (weights learn both bounds always); off by
            default, see :class:`~lightning_quant.quantizers.dsq.DSQActivation`'s ``learn_lower``.
    """

    method: ClassVar[str] = "dsq"
    temperature: float = 0.2
    learn_temperature: bool = False
    learn_activation_lower: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise ValueError(f"`temperature` must be a float in the open interval (0, 1), got {self.temperature!r}.")
        if not 0.0 < self.temperature < 1.0:
            raise ValueError(f"`temperature` must be a float in the open interval (0, 1), got {self.temperature!r}.")
        for flag in ("learn_temperature", "learn_activation_lower"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"`{flag}` must be a bool, got {getattr(self, flag)!r}.")

    def make_activation(self, original: nn.Module, num_sites: int, bits: int) -> ActivationQuantizer:
        return DSQActivation(
            bits,
            num_sites=num_sites,
            temperature=float(self.temperature),
            learn_temperature=self.learn_temperature,
            relu6=isinstance(original, nn.ReLU6),
            learn_lower=self.learn_activation_lower,
        )

    def make_input(self, bits: int) -> ActivationQuantizer | None:
        return DSQInput(bits, temperature=float(self.temperature))

    def make_weight(self, layer: nn.Module, name: str, bits: int) -> WeightQuantizer:
        quantizer = DSQWeight(bits, temperature=float(self.temperature), learn_temperature=self.learn_temperature)
        quantizer.calibrate(layer.weight.detach())
        return quantizer


#: Layer types QuantNoise may cover, by the names its ``layer_types`` argument takes.
QUANT_NOISE_LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "Embedding": nn.Embedding,
}


@dataclass(frozen=True)
class QuantNoiseConfig(QuantConfig):
    """QuantNoise recipe: weights only, each covered layer gets a :class:`QuantNoiseWeight`.

    Args:
        mode: ``"scalar"`` (int-``weight_bits`` noise) or ``"block"`` (iPQ-style proxy).
        block_size: Consecutive input features per block in block mode.
        layer_types: Names of the layer types to cover, from :data:`QUANT_NOISE_LAYER_TYPES`.
    """

    method: ClassVar[str] = "quant_noise"
    act_bits: int | None = None
    first_last: str = "quantize"
    mode: str = "scalar"
    block_size: int = 8
    layer_types: tuple[str, ...] = ("Linear", "Conv2d", "Embedding")

    activation_types: ClassVar[tuple[type[nn.Module], ...]] = ()

    def __post_init__(self) -> None:
        if self.act_bits is not None:
            raise ValueError(f"QuantNoise quantizes weights only: `act_bits` must be None, got {self.act_bits!r}.")
        check_bits(self.weight_bits, "bits")
        super().__post_init__()
        types = (self.layer_types,) if isinstance(self.layer_types, str) else tuple(self.layer_types or ())
        unknown = [t for t in types if t not in QUANT_NOISE_LAYER_TYPES]
        if unknown or not types:
            raise ValueError(
                f"`layer_types` must be a non-empty list of {sorted(QUANT_NOISE_LAYER_TYPES)},"
                f" got {self.layer_types!r}."
            )
        object.__setattr__(self, "layer_types", types)
        QuantNoiseWeight(self.weight_bits, p=0.0, mode=self.mode, block_size=self.block_size)  # validates the rest

    @property
    def weight_types(self) -> tuple[type[nn.Module], ...]:  # type: ignore[override]
        return tuple(QUANT_NOISE_LAYER_TYPES[t] for t in self.layer_types)

    def make_weight(self, layer: nn.Module, name: str, bits: int) -> WeightQuantizer:
        quantizer = QuantNoiseWeight(bits, p=0.0, mode=self.mode, block_size=self.block_size)
        quantizer.check_layer(layer, name)
        return quantizer

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["layer_types"] = list(self.layer_types)
        return data


_CONFIGS: dict[str, type[QuantConfig]] = {"pact": PACTConfig, "dsq": DSQConfig, "quant_noise": QuantNoiseConfig}


def recipe_difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """The fields in which two :meth:`QuantConfig.to_dict` outputs differ, as ``"act_bits: checkpoint 4 vs now 2"``."""
    keys = sorted(set(saved) | set(current))
    return ", ".join(
        f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
    )


def config_from_dict(data: dict[str, Any]) -> QuantConfig:
    """Rebuild a recipe from :meth:`QuantConfig.to_dict`'s output.

    Raises:
        ValueError: If the method is unknown.
    """
    data = dict(data)
    method = data.pop("method", None)
    if method not in _CONFIGS:
        raise ValueError(f"Unknown quantization method {method!r}; known: {sorted(_CONFIGS)}.")
    cls = _CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known})
