"""DSQ fake quantizers: learned range ``[l, u]`` and a characteristic variable ``alpha`` ("temperature").

:class:`DSQActivation` takes the place of an ``nn.ReLU`` / ``nn.ReLU6``: it applies that activation, then
quantizes on ``[l, u]`` with :func:`~lightning_quant.functional.dsq.dsq_quantize` (hard levels forward, the soft
curve's gradient backward; every convention is in that module's docstring). :class:`DSQWeight` quantizes a layer's
weight tensor the same way with one range per tensor, as in the paper.

Learned values and state:

* ``lower`` and ``upper`` are Parameters (shape ``(num_sites,)`` for activations, 0-d for weights). Before
  calibration they hold documented defaults ([0, 6] for activations, [-1, 1] for weights); the ``calibrated``
  bool buffer records which have been set from data, so a resumed run (whose checkpoint restores it) does not
  calibrate again.
* The temperature, when not learned, is the float buffer ``temperature`` that a schedule moves with
  :meth:`set_temperature` (a buffer, so it is checkpointed and broadcast by DDP). When learned it is the Parameter
  ``temperature_logit`` with ``alpha = eps + (1 - 2 eps) * sigmoid(logit)``, ``eps = ALPHA_EPS = 1e-6``:
  unconstrained for the optimizer, and strictly inside (0, 1) even where float32 saturates the sigmoid.
  :meth:`get_temperature` returns the alpha the forward uses in both modes.

Calibration: :meth:`range_statistics` returns the two numbers ``[lower, upper]`` a batch suggests; under DDP reduce
``lower`` with MIN and ``upper`` with MAX across ranks (equal to calibrating on the union of the batches), then pass
them to :meth:`set_range`. :meth:`calibrate` does both steps on one process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_quant.functional.dsq import ALPHA_EPS, dsq_quantize
from lightning_quant.quantizers.base import ActivationQuantizer, WeightQuantizer, check_bits

__all__ = ["DSQActivation", "DSQWeight"]

MIN_CALIBRATED_WIDTH = 1e-6
"""Calibration never returns a range narrower than this (a dead ReLU or an all-zero weight gives max == min)."""

_ACT_DEFAULT_RANGE = (0.0, 6.0)
_WEIGHT_DEFAULT_RANGE = (-1.0, 1.0)


def _check_temperature(value: object, name: str = "temperature") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be a float in the open interval (0, 1), got {value!r}.")


def _check_flag(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}.")


def _check_quantile(value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0.0 < value <= 1.0:
        raise ValueError(f"`quantile` must be a float in (0, 1], got {value!r}.")


def _squash(logit: Tensor) -> Tensor:
    # An affine sigmoid into [ALPHA_EPS, 1 - ALPHA_EPS]: a plain sigmoid rounds to exactly 0 or 1 in float32 for
    # |logit| > ~17 (and 88), which is outside the open interval the method needs.
    # (computed in at least float32: in bf16, 1 - 2e-6 is 1 and the interval would close again).
    logit = logit.to(torch.promote_types(logit.dtype, torch.float32))
    return ALPHA_EPS + (1.0 - 2.0 * ALPHA_EPS) * torch.sigmoid(logit)


def _unsquash(alpha: float) -> float:
    p = (alpha - ALPHA_EPS) / (1.0 - 2.0 * ALPHA_EPS)
    p = min(max(p, 1e-12), 1.0 - 1e-12)
    return math.log(p) - math.log1p(-p)


def _to_scalar_tensor(value: Tensor | float, name: str, like: Tensor) -> Tensor:
    """A 0-d copy of ``value`` on ``like``'s device and dtype; raises unless it is one finite number."""
    if isinstance(value, bool) or not isinstance(value, (Tensor, int, float)):
        raise ValueError(f"`{name}` must be a float or a one-element tensor, got {value!r}.")
    tensor = torch.as_tensor(value).detach()
    if tensor.numel() != 1:
        raise ValueError(f"`{name}` must be a float or a one-element tensor, got shape {tuple(tensor.shape)}.")
    tensor = tensor.reshape(()).to(device=like.device, dtype=like.dtype)
    if not bool(torch.isfinite(tensor)):
        raise ValueError(f"`{name}` must be finite, got {float(tensor)}.")
    return tensor


def _stat_dtype(values: Tensor) -> torch.dtype:
    # At least float32 (bf16 statistics would round the range), float64 kept.
    return torch.promote_types(values.dtype, torch.float32)


def _upper_statistic(values: Tensor, quantile: float) -> Tensor:
    """The max (quantile 1) or the given quantile of the finite entries of ``values``; 0 when there are none."""
    finite = values[torch.isfinite(values)].to(_stat_dtype(values))
    if finite.numel() == 0:
        return torch.zeros((), dtype=finite.dtype, device=values.device)
    if quantile >= 1.0:
        return finite.max()
    # kthvalue instead of torch.quantile: the latter refuses inputs above 16M elements.
    k = max(1, min(finite.numel(), math.ceil(quantile * finite.numel())))
    return finite.flatten().kthvalue(k).values


class _TemperatureMixin:
    """Shared handling of the fixed (buffer) or learned (logit Parameter) characteristic variable."""

    learn_temperature: bool
    temperature_logit: nn.Parameter
    temperature: Tensor

    def _init_temperature(self, value: float, shape: tuple[int, ...]) -> None:
        if self.learn_temperature:
            self.temperature_logit = nn.Parameter(torch.full(shape, _unsquash(value)))
        else:
            self.register_buffer("temperature", torch.full(shape, float(value)))

    def get_temperature(self) -> Tensor:
        """The alpha in (0, 1) the forward uses (shape ``(num_sites,)`` for activations, 0-d for weights)."""
        if self.learn_temperature:
            return _squash(self.temperature_logit)
        return self.temperature

    @torch.no_grad()
    def set_temperature(self, value: float) -> None:
        """Set alpha for every site (in place, so optimizers and DDP keep their references).

        When the temperature is learned this re-initialises the learned value.

        Args:
            value: The new alpha, in the open interval (0, 1).

        Raises:
            ValueError: If ``value`` is not a float in (0, 1).
        """
        _check_temperature(value)
        if self.learn_temperature:
            self.temperature_logit.fill_(_unsquash(value))
        else:
            self.temperature.fill_(float(value))

    def _temperature_repr(self) -> str:
        alpha = self.get_temperature().detach().flatten().tolist()
        shown = ", ".join(f"{a:.4g}" for a in alpha[:4]) + (", ..." if len(alpha) > 4 else "")
        return f"temperature=[{shown}], learn_temperature={self.learn_temperature}"


class DSQActivation(_TemperatureMixin, ActivationQuantizer):
    """ReLU (or ReLU6) followed by DSQ quantization on a learned range, one range and temperature per call site.

    Args:
        bits: Bit width, an int in 1..16.
        num_sites: Number of call sites this module serves (each keeps its own ``lower``, ``upper``, alpha).
        temperature: Initial characteristic variable alpha, in (0, 1); small is close to the hard step.
        learn_temperature: Learn alpha (as ``temperature_logit``) instead of taking it from a schedule.
        relu6: Apply ReLU6 instead of ReLU before quantizing.
        learn_lower: Learn ``lower`` too. Off by default: after a ReLU about half the values are exactly 0 = l, and
            each sends ``1 - c / sinh(c)`` of its gradient to ``l``; that mass drags ``l`` off 0 within a few hundred
            steps (clipping every zero to ``l > 0``, or wasting a level below 0). ``upper`` is always learned.

    Raises:
        ValueError: If an argument is out of its allowed range (the message names it).
    """

    def __init__(
        self,
        bits: int,
        num_sites: int = 1,
        temperature: float = 0.2,
        learn_temperature: bool = False,
        relu6: bool = False,
        learn_lower: bool = False,
    ) -> None:
        super().__init__(num_sites)
        check_bits(bits, "bits")
        _check_temperature(temperature)
        _check_flag(learn_temperature, "learn_temperature")
        _check_flag(relu6, "relu6")
        _check_flag(learn_lower, "learn_lower")
        self.bits = bits
        self.relu6 = relu6
        self.learn_temperature = learn_temperature
        lo, up = _ACT_DEFAULT_RANGE
        self.lower = nn.Parameter(torch.full((num_sites,), lo), requires_grad=learn_lower)
        self.upper = nn.Parameter(torch.full((num_sites,), up))
        self.register_buffer("calibrated", torch.zeros(num_sites, dtype=torch.bool))
        self._init_temperature(temperature, (num_sites,))

    def _activation(self, x: Tensor) -> Tensor:
        return F.relu6(x) if self.relu6 else F.relu(x)

    def quantize(self, x: Tensor, site: int) -> Tensor:
        """Apply the activation, then DSQ with this site's range and alpha.

        Args:
            x: The activation's input.
            site: Call-site index in ``0..num_sites-1``.

        Returns:
            The fake-quantized activation, in ``x``'s dtype.
        """
        if self.learn_temperature:
            alpha = _squash(self.temperature_logit[site])
        else:
            alpha = self.temperature[site]
        activation = "relu6" if self.relu6 else "relu"
        return dsq_quantize(x, self.lower[site], self.upper[site], alpha, self.bits_at(site), activation=activation)

    @torch.no_grad()
    def range_statistics(self, x: Tensor, quantile: float = 1.0) -> Tensor:
        """The range a batch suggests: ``[0, max]`` of the activation's output (ReLU keeps 0 a level).

        Non-finite entries are ignored, and ``upper`` is at least ``lower + MIN_CALIBRATED_WIDTH``.

        Args:
            x: A batch of the activation's input.
            quantile: Take this quantile of the outputs as ``upper`` instead of the max (1.0 = max).

        Returns:
            A tensor ``[lower, upper]`` (at least float32) on ``x``'s device (reduce with MIN and MAX under DDP).

        Raises:
            ValueError: If ``quantile`` is not in (0, 1].
        """
        _check_quantile(quantile)
        upper = _upper_statistic(self._activation(x.detach()), quantile)
        lower = torch.zeros_like(upper)
        return torch.stack([lower, torch.clamp(upper, min=MIN_CALIBRATED_WIDTH)])

    @torch.no_grad()
    def calibrate(self, x: Tensor, site: int, quantile: float = 1.0) -> None:
        """Set the range of ``site`` from a batch (single process; under DDP reduce :meth:`range_statistics`).

        Args:
            x: A batch of the activation's input at that site.
            site: Call-site index.
            quantile: As in :meth:`range_statistics`.

        Raises:
            ValueError: If ``site`` or ``quantile`` is out of range.
        """
        self._check_site(site)
        lower, upper = self.range_statistics(x, quantile)
        self.set_range(site, lower, upper)

    @torch.no_grad()
    def set_range(self, site: int, lower: Tensor | float, upper: Tensor | float) -> None:
        """Overwrite the range of one site in place and mark it calibrated.

        Args:
            site: Call-site index in ``0..num_sites-1``.
            lower: New lower bound (float or one-element tensor).
            upper: New upper bound, ``>= lower``.

        Raises:
            ValueError: If ``site`` is out of range, a bound is not one finite number, or ``upper < lower``.
        """
        self._check_site(site)
        lo = _to_scalar_tensor(lower, "lower", self.lower)
        up = _to_scalar_tensor(upper, "upper", self.upper)
        if bool(up < lo):
            raise ValueError(f"`upper` must be >= `lower`, got lower={float(lo)}, upper={float(up)}.")
        self.lower[site] = lo
        self.upper[site] = up
        self.calibrated[site] = True

    @torch.no_grad()
    def set_clip(self, site: int, value: Tensor | float) -> None:
        """Set the upper bound of one site from a calibrated clip (``[lower, clip]``, at most 6 after a ReLU6).

        Raises:
            ValueError: If ``site`` is out of range.
        """
        upper = torch.as_tensor(value, dtype=self.upper.dtype, device=self.upper.device)
        upper = torch.maximum(upper, self.lower[site] + MIN_CALIBRATED_WIDTH)
        self.set_range(site, self.lower[site], upper.clamp(max=6.0) if self.relu6 else upper)

    def _check_site(self, site: object) -> None:
        if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < self.num_sites:
            raise ValueError(f"`site` must be an int in 0..{self.num_sites - 1}, got {site!r}.")

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {super().extra_repr()}, relu6={self.relu6}, {self._temperature_repr()}"


class DSQWeight(_TemperatureMixin, WeightQuantizer):
    """DSQ on a weight tensor with one learned range ``[lower, upper]`` (0-d Parameters) and one alpha.

    Args:
        bits: Bit width, an int in 1..16.
        temperature: Initial characteristic variable alpha, in (0, 1).
        learn_temperature: Learn alpha (as ``temperature_logit``) instead of taking it from a schedule.

    Raises:
        ValueError: If an argument is out of its allowed range (the message names it).
    """

    def __init__(self, bits: int, temperature: float = 0.2, learn_temperature: bool = False) -> None:
        super().__init__()
        check_bits(bits, "bits")
        _check_temperature(temperature)
        _check_flag(learn_temperature, "learn_temperature")
        self.bits = bits
        self.learn_temperature = learn_temperature
        lo, up = _WEIGHT_DEFAULT_RANGE
        self.lower = nn.Parameter(torch.tensor(lo))
        self.upper = nn.Parameter(torch.tensor(up))
        self.register_buffer("calibrated", torch.tensor(False))
        self._init_temperature(temperature, ())

    def forward(self, weight: Tensor) -> Tensor:
        """Return the fake-quantized weight (same shape and dtype)."""
        return dsq_quantize(weight, self.lower, self.upper, self.get_temperature(), self.bits)

    @torch.no_grad()
    def range_statistics(self, weight: Tensor) -> Tensor:
        """``[min(w), max(w)]`` over the finite entries, widened to at least ``MIN_CALIBRATED_WIDTH``.

        Args:
            weight: The weight tensor.

        Returns:
            A tensor ``[lower, upper]`` (at least float32) on the weight's device.
        """
        w = weight.detach()
        finite = w[torch.isfinite(w)].to(_stat_dtype(w))
        if finite.numel() == 0:
            lower = torch.zeros((), dtype=finite.dtype, device=w.device)
            upper = lower
        else:
            lower, upper = finite.min(), finite.max()
        return torch.stack([lower, torch.maximum(upper, lower + MIN_CALIBRATED_WIDTH)])

    @torch.no_grad()
    def calibrate(self, weight: Tensor) -> None:
        """Set the range to the weight's min and max (see :meth:`range_statistics`).

        Args:
            weight: The weight tensor this quantizer serves.
        """
        lower, upper = self.range_statistics(weight)
        self.set_range(lower, upper)

    @torch.no_grad()
    def set_range(self, lower: Tensor | float, upper: Tensor | float) -> None:
        """Overwrite the range in place and mark it calibrated.

        Args:
            lower: New lower bound (float or one-element tensor).
            upper: New upper bound, ``>= lower``.

        Raises:
            ValueError: If a bound is not one finite number or ``upper < lower``.
        """
        lo = _to_scalar_tensor(lower, "lower", self.lower)
        up = _to_scalar_tensor(upper, "upper", self.upper)
        if bool(up < lo):
            raise ValueError(f"`upper` must be >= `lower`, got lower={float(lo)}, upper={float(up)}.")
        self.lower.copy_(lo)
        self.upper.copy_(up)
        self.calibrated.fill_(True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {self._temperature_repr()}"
