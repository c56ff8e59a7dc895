"""Quantizers for the *input* of a weight layer, where no quantized activation already put it on a grid.

An integer runtime needs every weight layer's input on a grid. A ReLU's output is (PACT's clip); a GELU, SiLU or
Hardswish output, a residual sum, an average pool, a LayerNorm or an embedding is not. The surgery gives such a
layer an ``input_quantizer`` (a child of the layer twin, :mod:`lightning_quant.layers`) with a learned range that
may be signed and asymmetric:

* :class:`LSQPlusInput` (PACT's recipe): LSQ+'s step and offset on an integer grid through 0,
  ``(clamp(round(x / s) + z, 0, L) - z) s`` with the zero point ``z = round(-lower / s)``
  (:func:`~lightning_quant.functional.lsq.lsq_plus_quantize`), learned through its ends ``[lower, upper]``.
* :class:`DSQInput` (DSQ's recipe): DSQ's own learned ``[l, u]`` with its soft-staircase gradient, no activation.

Both start from the data the layer sees (:mod:`lightning_quant.calibrator`): the range ``[lo, hi]`` from the
``calibration`` estimator, averaged across DDP ranks, never again on resume.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_quant.functional.checks import check_bits
from lightning_quant.functional.dsq import dsq_quantize
from lightning_quant.functional.lsq import lsq_plus_quantize
from lightning_quant.quantizers.base import ActivationQuantizer

#: Floor of the LSQ+ step in the forward (straight-through): keeps ``(x - beta) / s`` finite.
MIN_STEP = 1e-8
#: Candidates of the range search (fractions of the observed ``[min, max]``) for the ``"mse"`` estimator.
_SHRINK = torch.linspace(0.02, 1.0, 50, dtype=torch.float64)
_MAX_SAMPLES = 2**16


def _finite_sample(x: Tensor) -> Tensor:
    flat = x.detach().reshape(-1).to(torch.float64)
    flat = flat[torch.isfinite(flat)]
    if flat.numel() > _MAX_SAMPLES:  # a fixed stride: deterministic and cheap; order does not matter here
        flat = flat[:: flat.numel() // _MAX_SAMPLES + 1]
    return flat


def integer_grid(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Step and integer zero point of the grid over ``[lo, hi]`` (``lo <= 0 <= hi``): ``s = (hi - lo) / L``,
    ``z = clamp(round(-lo / s), 0, L)``; its levels are ``(c - z) s`` for codes ``c`` in ``0..L``."""
    levels = 2**bits - 1
    step = ((hi - lo) / levels).clamp_min(1e-12)
    return step, torch.round(-lo / step).clamp(0, levels)


def estimate_range(x: Tensor, bits: int, estimator: str, zero_point: bool = False) -> Tensor:
    """``[lo, hi]`` for a ``bits``-bit asymmetric grid over ``x`` (finite values only).

    ``"max"``: the observed ``[min, max]``. ``"percentile"``: the 0.01th and 99.99th percentiles. ``"mse"``: the
    observed range shrunk towards 0 by the factor (of 50 from 0.02 to 1) that minimises the quantization MSE.

    Args:
        x: Values the layer sees.
        bits: Bit width of the grid.
        estimator: ``"mse"``, ``"percentile"`` or ``"max"``.
        zero_point: The grid is the integer one through 0 (:func:`integer_grid`, LSQ+'s) rather than the
            continuous ``lo + i s`` (DSQ's): the MSE search measures that grid. The ends returned are not rounded
            to it (the zero point is rounded in the forward, as torch.ao's learnable fake-quant rounds its float
            zero point), so learning can move ``-lo / s`` across a rounding boundary from where the data put it.

    Returns:
        A float64 tensor ``[lo, hi]`` with ``hi > lo`` (a constant input gets a small width around it).
    """
    v = _finite_sample(x)
    if v.numel() == 0:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    if estimator == "percentile":
        lo, hi = torch.quantile(v, torch.tensor([1e-4, 1 - 1e-4], dtype=torch.float64))
    else:
        lo, hi = v.min(), v.max()
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))  # 0 stays in range
    if estimator == "mse":
        levels = 2**bits - 1
        los, his = _SHRINK * lo, _SHRINK * hi
        if zero_point:
            steps, zs = integer_grid(los, his, bits)
            codes = (torch.round(v[None, :] / steps[:, None]) + zs[:, None]).clamp(0, levels)
            q = (codes - zs[:, None]) * steps[:, None]
        else:
            steps = ((his - los) / levels).clamp_min(1e-12)
            q = torch.round(((v[None, :] - los[:, None]) / steps[:, None]).clamp(0, levels)) * steps[:, None]
            q = q + los[:, None]
        best = int(((q - v[None, :]) ** 2).mean(dim=1).argmin())
        lo, hi = los[best], his[best]
    if not bool(hi > lo):
        hi = lo + 1e-6
    return torch.stack([lo, hi])


class _RangeInput(ActivationQuantizer):
    """A weight layer's input on a learned range ``[lower, upper]``, one call site; subclasses quantize on it."""

    #: Calibrate for the integer grid through 0 (:func:`integer_grid`) rather than ``lower + i * step``.
    integer_zero_point = False

    def __init__(self, bits: int) -> None:
        super().__init__(1)
        check_bits(bits, "bits")
        self.bits = bits
        self.lower = nn.Parameter(torch.full((1,), -1.0))  # until calibrated: [-1, 1]
        self.upper = nn.Parameter(torch.full((1,), 1.0))
        self.register_buffer("calibrated", torch.zeros(1, dtype=torch.bool))

    def calibration_estimate(self, x: Tensor, site: int, estimator: str) -> Tensor:
        return estimate_range(x, self.bits_at(site), estimator, zero_point=self.integer_zero_point)

    @torch.no_grad()
    def set_calibration(self, site: int, value: Tensor) -> None:
        self.lower.fill_(float(value[0]))
        self.upper.fill_(float(value[1]))

    def forward(self, x: Tensor) -> Tensor:
        return self.quantize(x, 0)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class LSQPlusInput(_RangeInput):
    """A weight layer's input on a ``bits``-bit integer grid through 0 over a learned range ``[lower, upper]``.

    The grid is LSQ+'s with an integer zero point (:func:`~lightning_quant.functional.lsq.lsq_plus_quantize`):
    ``step = (upper - lower) / (2**bits - 1)``, ``offset = lower``, zero point ``z = round(-lower / step)``, levels
    ``(c - z) * step``, exactly what QuantizeLinear/DequantizeLinear and integer kernels compute. It is learned
    through its two ends -- PACT's clip made two-sided -- so one learning rate (the clip group's) fits ranges of any
    bit width: a step is 255 times smaller at 8 bits than its range, and an Adam step of the clips' lr would push it
    through zero. The ends used are ``min(lower, 0)`` and ``max(upper, 0)`` (0 is a level of every integer grid;
    the gradient passes straight through these clamps, so an end pushed past 0 can come back). The ends are
    continuous; the realised grid ``[-z step, (L - z) step]`` has each within ``step / 2`` of them.

    Args:
        bits: Bit width, 1..16.

    Raises:
        ValueError: If ``bits`` is out of range.
    """

    integer_zero_point = True

    def ends(self) -> tuple[Tensor, Tensor]:
        """``(min(lower, 0), max(upper, 0))`` with a straight-through gradient: the range the grid spans."""
        lo, hi = self.lower, self.upper
        return lo + (lo.detach().clamp(max=0) - lo.detach()), hi + (hi.detach().clamp(min=0) - hi.detach())

    def step(self, bits: int) -> Tensor:
        """The grid's step, ``(max(upper, 0) - min(lower, 0)) / (2**bits - 1)``, before the forward's floor."""
        lo, hi = self.ends()
        return (hi - lo) / (2**bits - 1)

    def quantize(self, x: Tensor, site: int) -> Tensor:
        bits = self.bits_at(site)
        return lsq_plus_quantize(x, self.step(bits), self.ends()[0], bits, min_step=MIN_STEP)


class DSQInput(_RangeInput):
    """A weight layer's input on DSQ's learned range ``[l, u]`` (no activation), with DSQ's soft gradient.

    Args:
        bits: Bit width, 1..16.
        temperature: DSQ's characteristic variable alpha in (0, 1) (a buffer the callback's schedule moves).

    Raises:
        ValueError: If ``bits`` is out of range.
    """

    def __init__(self, bits: int, temperature: float = 0.2) -> None:
        super().__init__(bits)
        self.register_buffer("temperature", torch.full((1,), float(temperature)))

    def set_temperature(self, value: float) -> None:
        self.temperature.fill_(float(value))

    def quantize(self, x: Tensor, site: int) -> Tensor:
        return dsq_quantize(x, self.lower[0], self.upper[0], self.temperature[0], self.bits_at(site))
