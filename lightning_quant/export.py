"""Export a model injected by :func:`~lightning_quant.inject_quantizers` (or a callback) to a QDQ ONNX file.

:func:`export_onnx` works on a deep copy of the model (the user's modules, parameters and training mode are left as
they were) in three steps:

1. **Grids.** Every quantized tensor -- each call site of an activation quantizer, each quantized weight -- gets an
   integer :class:`Grid` (``value = offset + (code - zero_point) * scale``), read from the module's public
   attributes by a small per-quantizer table (:data:`ACTIVATION_RULES`, :data:`WEIGHT_RULES`). Weight codes are
   recovered from the module's own eval output and checked against the grid, so a wrong table entry fails loudly.
   Everything that can not be represented is refused here, before anything is traced or written.
2. **Trace.** Each quantizer in the copy is swapped for an export module whose forward is one marker op
   (``lightning_quant::QDQ``, an autograd Function with an ONNX ``symbolic``), and the copy is traced by torch's
   TorchScript exporter at opset 20. The markers keep the exporter from folding BatchNorm into quantized weights and
   stand for the quantizers' custom ops, which it has no ONNX rules for. For that export only, the
   exporter gets rules for ``aten::diff`` and for ``cumsum`` of a bool (transformers' mask code), and the copy's
   forward takes the given inputs only (the exporter would make graph inputs of the other parameters' defaults).
3. **Rewrite.** With the ``onnx`` package every marker becomes ``[Clip] [Sub] QuantizeLinear DequantizeLinear [Add]``
   (activations) or an integer initializer with ``DequantizeLinear [Add]`` (weights); the opset is raised to 21
   (INT4/UINT4 and 16-bit QuantizeLinear/DequantizeLinear; the other ops used do not change between 20 and 21).

How each quantizer exports (``k`` bits, ``L = 2^k - 1``):

* ``PACTActivation``: ``Clip(0, alpha)``, then Q/DQ with scale ``alpha / L`` (float32, as torch computes it),
  zero point 0, UINT4 for ``k <= 4``, else UINT8 (UINT16 above 8). One grid per call site; sites kept float by
  ``site_bits`` export as ReLU/ReLU6.
* ``DSQActivation``: the eval forward is the hard staircase on ``[l, u]``: ``Clip(max(l, 0), min(u, 6 if ReLU6))``,
  Q/DQ with scale ``Delta = (u - l) / L``. With ``l = 0`` the zero point is 0; a learned ``l != 0`` exports as
  ``Sub(l)`` before the Q and ``Add(l)`` after the DQ (the same float operations torch does). torch returns ``u``
  itself for the top level, where ``L * Delta`` can miss it by an ulp: a ``Where`` puts ``u`` back in that case.
* ``LSQPlusInput``: the integer grid through 0 it trains on: ``Clip`` to its end levels ``(-z s, (L - z) s)``,
  then Q/DQ with scale ``s`` and the integer zero point ``z`` (UINT4 for ``k <= 4``, else UINT8/UINT16).
* ``DSQInput``: as ``DSQActivation`` without the ReLU: ``Clip(l, u)``, ``Sub(l)``, Q/DQ, ``Add(l)``.
* ``DSQWeight``: codes ``i`` in ``0..L`` (unsigned), ``DequantizeLinear(i, Delta, 0)``, then ``Add(l)`` unless
  ``l = 0`` (and the same top-level ``Where``). ``l / Delta`` is practically never an integer after training, and
  an integer zero point rounded from it would move every level.
* ``QuantNoiseWeight``: scalar mode at eval is the affine fake-quant with the scale and zero point observed from the
  weight: unsigned codes with that integer zero point, exact. Block mode is float at eval: the weight stays float.
* ``DoReFaWeight``: levels ``(2j - L) / L``: signed codes ``c = 2j - L`` (odd, in ``[-L, L]``), scale ``1 / L``,
  zero point 0: INT4 for ``k <= 3``, INT8 for ``k <= 7``, INT16 for ``k = 8`` (codes up to +-255). The codes are
  exact; ``DequantizeLinear`` computes ``c * (1/L)`` where torch computes ``2 (j / L) - 1``, which differ by one ulp
  on some levels (at 4 bits: 9 of 16).

``integer_kernels=True`` writes the graph onnxruntime runs with integer kernels instead (QLinearConv, QLinearMatMul,
QLinearAdd in its optimized graph): every container is 8-bit, BatchNorm after a quantized Conv/Gemm is folded into a
per-channel weight scale and the bias, biases feeding a quantized layer are int32 (``DequantizeLinear`` with scale
``s_x * s_w``), and each activation gets a UINT8 Q/DQ pair right after its producer (so a Conv's requantization is
fused into it) before its clip and k-bit Q/DQ. Codes then differ from the fake-quant model at level boundaries:
the integer kernels round the bias and requantize with a fixed-point multiplier.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_quant.layers import QUANTIZED_LAYERS
from lightning_quant.quantizers.base import ActivationQuantizer, WeightQuantizer
from lightning_quant.quantizers.dsq import DSQActivation, DSQWeight
from lightning_quant.quantizers.inputs import MIN_STEP as INPUT_MIN_STEP
from lightning_quant.quantizers.inputs import DSQInput, LSQPlusInput
from lightning_quant.quantizers.lsq import LSQWeight
from lightning_quant.quantizers.pact import MIN_ALPHA, DoReFaWeight, PACTActivation
from lightning_quant.quantizers.quant_noise import QuantNoiseWeight
from lightning_quant.surgery import activation_quantizers, injected_recipe

__all__ = [
    "ACTIVATION_RULES",
    "WEIGHT_RULES",
    "Grid",
    "export_onnx",
    "onnxruntime_session",
]

DOMAIN = "lightning_quant"
#: Opset the TorchScript exporter traces at (its highest) and the opset the written file declares.
TRACE_OPSET, OPSET = 20, 21
#: Metadata key holding a JSON list of every quantized tensor (name, kind, site, code tensor, scale, dtype...).
METADATA_KEY = "lightning_quant.quantized_tensors"
# DSQ's collapsed-range guard (functional/dsq.py, DEFAULT_MIN_WIDTH), reproduced to compute the same Delta.
_DSQ_MIN_WIDTH = 1e-8


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lightning_quant.export_onnx needs the `onnx` package: pip install 'lightning_quant[export]'"
            " (onnx, onnxruntime, onnxscript)."
        ) from err
    return onnx


# --------------------------------------------------------------------------------------------------- grids


@dataclass
class Grid:
    """The integer grid of one quantized tensor: ``value = offset + (code - zero_point) * scale``.

    Args:
        scale: float32 step, 0-d (per tensor) or 1-d (per channel along ``axis``).
        zero_point: Integer zero point (stored codes include it).
        qmin: Smallest stored code.
        qmax: Largest stored code.
        offset: Float added after ``DequantizeLinear`` (subtracted before ``QuantizeLinear``), or None.
        clip: Activations: ``(lo, hi)`` applied with ``Clip`` before ``QuantizeLinear``.
        top: ``(value DequantizeLinear gives for qmax, value torch gives)`` when they differ, else None.
        axis: Channel axis of a 1-d scale.
    """

    scale: np.ndarray
    zero_point: int
    qmin: int
    qmax: int
    offset: float | None = None
    clip: tuple[float, float] | None = None
    top: tuple[float, float] | None = None
    axis: int = 0

    def scale_like(self, ndim: int) -> np.ndarray:
        """The float32 scale shaped to broadcast against a tensor of ``ndim`` dimensions."""
        scale = np.asarray(self.scale, np.float32)
        if scale.ndim == 1:
            shape = [1] * ndim
            shape[self.axis] = -1
            scale = scale.reshape(shape)
        return scale

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        """What ``DequantizeLinear`` (then ``Add(offset)``) computes in float32 for ``codes``."""
        shifted = (codes.astype(np.int32) - np.int32(self.zero_point)).astype(np.float32)
        values = shifted * self.scale_like(codes.ndim)
        if self.offset is not None:
            values = (np.float32(self.offset) + values).astype(np.float32)
        return values


def _f32(value: Tensor | float) -> float:
    return float(torch.as_tensor(value, dtype=torch.float32))


def _with_top(grid: Grid, torch_top: float) -> Grid:
    """Record a top-level fix when ``DequantizeLinear`` does not give torch's top level bit for bit."""
    computed = float(grid.dequantize(np.array([grid.qmax]))[0])
    return grid if computed == torch_top else replace(grid, top=(computed, torch_top))


def _pact_grid(module: PACTActivation, site: int, bits: int) -> Grid:
    # The same float32 scalars as functional/pact.py: a = max(alpha, MIN_ALPHA), step = a / L.
    alpha = module.alpha.detach().float().reshape(-1)[site].clamp_min(MIN_ALPHA)
    levels = 2**bits - 1
    step = (alpha / levels).numpy()
    return Grid(step, 0, 0, levels, clip=(0.0, float(alpha)))


def _dsq_range(lower: Tensor, upper: Tensor, bits: int) -> tuple[float, float, float, int]:
    """``(l, u_eff, Delta, n)`` in float32 exactly as functional/dsq.py's ``_range`` computes them."""
    lo, up = lower.detach().float().reshape(()), upper.detach().float().reshape(())
    n = 2**bits - 1
    width = up - lo
    collapsed = bool(width < _DSQ_MIN_WIDTH)
    up_eff = lo + _DSQ_MIN_WIDTH if collapsed else up
    delta = (torch.full_like(width, _DSQ_MIN_WIDTH) if collapsed else width) / n
    return float(lo), float(up_eff), float(delta), n


def _dsq_grid(lo: float, up: float, delta: float, n: int) -> Grid:
    # Zero point 0 only for l = 0: otherwise `(i - z) * Delta` would not round like torch's `l + i * Delta`.
    grid = Grid(np.array(delta, np.float32), 0, 0, n, offset=None if lo == 0.0 else lo)
    return _with_top(grid, up)


def _dsq_activation_grid(module: DSQActivation, site: int, bits: int) -> Grid:
    lo, up, delta, n = _dsq_range(module.lower[site], module.upper[site], bits)
    # relu/relu6 first, then the clamp to [l, u]: one Clip with the tighter bounds.
    clip_hi = min(up, 6.0) if module.relu6 else up
    return replace(_dsq_grid(lo, up, delta, n), clip=(max(lo, 0.0), clip_hi))


def _dsq_weight_grid(module: DSQWeight, weight: Tensor) -> Grid:
    return _dsq_grid(*_dsq_range(module.lower, module.upper, module.bits))


def _dorefa_grid(module: DoReFaWeight, weight: Tensor) -> Grid:
    levels = 2**module.bits - 1
    return Grid(np.array(_f32(1.0 / levels), np.float32), 0, -levels, levels)


def _quant_noise_grid(module: QuantNoiseWeight, weight: Tensor) -> Grid | None:
    if module.mode == "block":
        return None  # block noise is float at eval
    # functional/quant_noise.py's observer, in the weight's float32 arithmetic.
    w = weight.detach().float()
    qmax = 2**module.bits - 1
    scale = (w.amax() - w.amin()) / float(qmax)
    if not bool(scale > 0):
        return None  # a constant weight is returned unchanged at eval
    zero_point = int(torch.round(-w.amin() / scale))
    return Grid(scale.numpy(), zero_point, 0, qmax)


def _lsq_grid(module: LSQWeight, weight: Tensor) -> Grid:
    # Codes in [qmin, qmax] with zero point 0; the step per tensor (0-d) or per output channel.
    scale = module.scale().detach().float()
    if not module.per_channel:
        return Grid(scale.reshape(()).numpy(), 0, module.qmin, module.qmax)
    return Grid(scale.numpy(), 0, module.qmin, module.qmax, axis=module.channel_axis % weight.dim())


def _lsq_plus_input_grid(module: LSQPlusInput, site: int, bits: int) -> Grid:
    # functional/lsq.py in float32: s = max(step, MIN_STEP), z = clamp(round(-beta / s), 0, L), beta = min(lower, 0);
    # y = (clamp(round(x / s) + z, 0, L) - z) * s is Clip to the end levels, then QuantizeLinear/DequantizeLinear.
    lo, _ = module.ends()
    step = module.step(bits).detach().float().reshape(()).clamp_min(INPUT_MIN_STEP)
    levels = 2**bits - 1
    zero_point = int(torch.round(-lo.detach().float().reshape(()) / step).clamp(0, levels))
    ends = (float((0 - zero_point) * step), float((levels - zero_point) * step))
    return Grid(step.numpy(), zero_point, 0, levels, clip=ends)


def _dsq_input_grid(module: DSQInput, site: int, bits: int) -> Grid:
    lo, up, delta, n = _dsq_range(module.lower[0], module.upper[0], bits)
    return replace(_dsq_grid(lo, up, delta, n), clip=(lo, up))


#: Activation quantizer type -> ``rule(module, site, bits) -> Grid``. Exact types: a subclass may compute otherwise.
ACTIVATION_RULES: dict[type[nn.Module], Callable[[Any, int, int], Grid]] = {
    PACTActivation: _pact_grid,
    DSQActivation: _dsq_activation_grid,
    LSQPlusInput: _lsq_plus_input_grid,
    DSQInput: _dsq_input_grid,
}
#: Weight quantizer type -> ``rule(module, float weight) -> Grid`` (None: float at eval). The codes are recovered
#: from the module's eval output and checked against the grid, so a new entry (LSQ: ``Grid(q.scale(), 0, q.qmin,
#: q.qmax)`` with ``axis=0`` for a per-channel scale) needs nothing else.
WEIGHT_RULES: dict[type[nn.Module], Callable[[Any, Tensor], Grid | None]] = {
    DoReFaWeight: _dorefa_grid,
    LSQWeight: _lsq_grid,
    DSQWeight: _dsq_weight_grid,
    QuantNoiseWeight: _quant_noise_grid,
}


# ---------------------------------------------------------------------------------------------- planning

#: Integer containers by width: (width, signed ONNX type, unsigned ONNX type, signed range, unsigned range).
_CONTAINERS = [(4, "INT4", "UINT4"), (8, "INT8", "UINT8"), (16, "INT16", "UINT16")]


def _container(qmin: int, qmax: int, width: int | None) -> str | None:
    """The narrowest ONNX integer type (of ``width`` bits when given) holding ``[qmin, qmax]``, or None."""
    for bits, signed, unsigned in _CONTAINERS:
        if width is not None and bits != width:
            continue
        if qmin >= 0 and qmax <= 2**bits - 1:
            return unsigned
        if -(2 ** (bits - 1)) <= qmin and qmax <= 2 ** (bits - 1) - 1:
            return signed
    return None


@dataclass
class _Point:
    """One quantized tensor: an activation call site or a weight."""

    name: str
    kind: str
    site: int
    bits: int
    quantizer: str
    grid: Grid
    dtype: str
    codes: np.ndarray | None = None
    max_ulps: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _refuse(what: str, why: str) -> ValueError:
    return ValueError(f"export_onnx can not represent {what} exactly: {why}.")


def _activation_points(name: str, module: ActivationQuantizer, integer_kernels: bool) -> dict[int, _Point]:
    rule = ACTIVATION_RULES.get(type(module))
    if rule is None:
        raise ValueError(
            f"export_onnx has no export rule for the activation quantizer {name!r} ({type(module).__name__});"
            f" supported: {sorted(t.__name__ for t in ACTIVATION_RULES)}."
        )
    points = {}
    for site in range(module.num_sites):
        bits = module.bits_at(site)
        if bits is None:
            continue  # a float site: exported as ReLU / ReLU6
        grid = rule(module, site, bits)
        what = f"{type(module).__name__} {name!r} (site {site}, {bits} bits)"
        dtype = _container(grid.qmin, grid.qmax, 8 if integer_kernels else None)
        if dtype is None:
            raise _refuse(what, f"codes {grid.qmin}..{grid.qmax} fit no {'8-bit ' if integer_kernels else ''}type")
        if integer_kernels and grid.offset is not None:
            raise _refuse(
                what,
                f"with integer_kernels=True: its lower bound l={grid.offset} is not a level of an"
                " integer grid through 0 (the integer kernels need a zero point)",
            )
        points[site] = _Point(name, "activation", site, bits, type(module).__name__, grid, dtype)
    return points


def _weight_codes(point: _Point, values: Tensor) -> tuple[np.ndarray, float]:
    """Integer codes of the quantizer's eval output ``values`` on ``point.grid``, and the worst error.

    The error of the rebuilt levels is counted in ulps of the largest level: DoReFa's ``2 (j / L) - 1`` cancels
    near 0, so its small levels carry the rounding of ``j / L`` (up to half an ulp of 1), which ``c * (1 / L)``
    does not reproduce.
    """
    grid = point.grid
    wq = values.detach().float().numpy()
    scale = grid.scale_like(wq.ndim).astype(np.float64)
    shifted = wq.astype(np.float64) - (grid.offset or 0.0)
    codes = np.rint(shifted / scale).astype(np.int64) + grid.zero_point
    if codes.size and (codes.min() < grid.qmin or codes.max() > grid.qmax):
        raise RuntimeError(
            f"{point.quantizer} {point.name!r}: codes {codes.min()}..{codes.max()} outside"
            f" {grid.qmin}..{grid.qmax}; the export rule does not match the quantizer."
        )
    rebuilt = grid.dequantize(codes)
    if grid.top is not None:
        rebuilt = np.where(rebuilt == np.float32(grid.top[0]), np.float32(grid.top[1]), rebuilt)
    unit = float(np.spacing(np.float32(np.abs(wq).max()))) if wq.size else 1.0
    worst = float(np.abs(rebuilt.astype(np.float64) - wq).max()) / unit if wq.size else 0.0
    if worst > 2:
        raise RuntimeError(
            f"{point.quantizer} {point.name!r}: the grid rebuilds its levels only to {worst:.3g} ulps;"
            " the export rule does not match the quantizer."
        )
    return codes, worst


def _weight_point(name: str, layer: nn.Module, integer_kernels: bool, storage_bits: int | None) -> _Point | None:
    quantizer = layer.weight_quantizer
    rule = WEIGHT_RULES.get(type(quantizer))
    if rule is None:
        raise ValueError(
            f"export_onnx has no export rule for the weight quantizer of {name!r} ({type(quantizer).__name__});"
            f" supported: {sorted(t.__name__ for t in WEIGHT_RULES)}."
        )
    grid = rule(quantizer, layer.weight)
    if grid is None:
        return None
    bits = getattr(quantizer, "bits", None)
    what = f"{type(quantizer).__name__} weights of {name!r} at {bits} bits"
    width = 8 if integer_kernels else storage_bits
    dtype = _container(grid.qmin, grid.qmax, width)
    if dtype is None:
        where = f"{width}-bit storage" if width else "any integer type"
        raise _refuse(what, f"its codes span {grid.qmin}..{grid.qmax}, which {where} can not hold")
    if integer_kernels and grid.offset is not None:
        raise _refuse(
            what,
            f"with integer_kernels=True: its levels l + i * Delta (l={grid.offset:.6g},"
            f" Delta={float(grid.scale):.6g}) have no integer zero point (l / Delta is not an integer)",
        )
    point = _Point(name, "weight", 0, bits, type(quantizer).__name__, grid, dtype)
    with torch.no_grad():
        point.codes, point.max_ulps = _weight_codes(point, quantizer(layer.weight))
    return point


# ------------------------------------------------------------------------------------------ export modules


class _Marker(torch.autograd.Function):
    """Identity in torch; one ``lightning_quant::QDQ`` node (attribute ``key``) in the traced ONNX graph."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, key: int) -> Tensor:
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, key: int) -> Any:
        out = g.op(f"{DOMAIN}::QDQ", x, key_i=key)
        out.setType(x.type())  # a Conv's symbolic needs its weight's shape
        return out


class _ExportActivation(ActivationQuantizer):
    """Stands in for an activation quantizer: the same call-site bookkeeping, a marker per quantized call."""

    def __init__(self, original: ActivationQuantizer, points: dict[int, _Point], calls: list[_Point]) -> None:
        super().__init__(original.num_sites)
        self.site_bits = original.site_bits
        self.bits = original.bits
        self.relu6 = bool(getattr(original, "relu6", False))  # what a float site computes
        self.points = points
        self.calls = calls

    def quantize(self, x: Tensor, site: int) -> Tensor:
        self.calls.append(self.points[site])
        return _Marker.apply(x, len(self.calls) - 1)


class _ExportWeight(WeightQuantizer):
    """Stands in for a weight quantizer: a marker on the (float) weight, replaced by integer codes later."""

    def __init__(self, point: _Point | None, calls: list[_Point]) -> None:
        super().__init__()
        self.point = point
        self.calls = calls

    def forward(self, weight: Tensor) -> Tensor:
        if self.point is None:
            return weight  # float at eval (QuantNoise block mode, a constant weight)
        self.calls.append(self.point)
        return _Marker.apply(weight, len(self.calls) - 1)


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for attr, child in list(parent._modules.items()):
            if child is old:
                parent._modules[attr] = new


def _prepare(model: nn.Module, integer_kernels: bool, storage_bits: int | None) -> tuple[list[_Point], list[_Point]]:
    """Swap the export modules into ``model`` (the copy); return the trace's call list and every point planned."""
    calls: list[_Point] = []
    planned: list[_Point] = []
    for name, module in activation_quantizers(model):
        points = _activation_points(name, module, integer_kernels)
        planned.extend(points.values())
        _replace_module(model, module, _ExportActivation(module, points, calls))
    for name, layer in list(model.named_modules()):
        if isinstance(layer, QUANTIZED_LAYERS):
            point = _weight_point(name, layer, integer_kernels, storage_bits)
            planned.extend([point] if point else [])
            layer.weight_quantizer = _ExportWeight(point, calls)
    return calls, planned


# --------------------------------------------------------------------------------------------------- trace


def _as_args(example_input: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    args = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not args or not all(isinstance(a, Tensor) for a in args):
        raise ValueError(f"`example_input` must be a tensor or a tuple of tensors, got {type(example_input).__name__}.")
    return args


def _names(prefix: str, count: int) -> list[str]:
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _diff_symbolic(g: Any, x: Any, n: Any, dim: Any, prepend: Any, append: Any) -> Any:
    """``torch.diff`` (n = 1) as ONNX ``Concat`` + two ``Slice`` + ``Sub``: transformers' mask code calls it on the
    position ids (packed-sequence detection), and the TorchScript exporter has no rule for it."""
    from torch.onnx import symbolic_helper as sh

    order, axis = sh._get_const(n, "i", "n"), sh._get_const(dim, "i", "dim")
    if order != 1:
        return sh._unimplemented("diff", f"n={order} (only n=1)", x)
    parts = [v for v in (prepend, x, append) if not sh._is_none(v)]
    x = g.op("Concat", *parts, axis_i=axis) if len(parts) > 1 else x

    def const(values: list[int]) -> Any:
        return g.op("Constant", value_t=torch.tensor(values, dtype=torch.int64))

    later = g.op("Slice", x, const([1]), const([2**63 - 1]), const([axis]))
    earlier = g.op("Slice", x, const([0]), const([-1]), const([axis]))
    return g.op("Sub", later, earlier)


def _cumsum_symbolic(g: Any, x: Any, dim: Any, dtype: Any) -> Any:
    """``torch.cumsum`` with torch's promotion: a bool or integer input sums in int64 (the exporter's own rule emits
    ``CumSum`` on the input's type, which ONNX does not allow for bool: transformers' mask code sums a bool mask)."""
    from torch.onnx import symbolic_helper as sh
    from torch.onnx import symbolic_opset11

    if sh._is_none(dtype) and x.type().scalarType() in ("Bool", "Byte", "Char", "Short", "Int"):
        x = g.op("Cast", x, to_i=7)  # TensorProto.INT64
    return symbolic_opset11.cumsum(g, x, dim, dtype)


#: ``aten`` ops the TorchScript exporter lacks or gets wrong, registered for the duration of one export only.
_EXTRA_SYMBOLICS = {"aten::diff": _diff_symbolic, "aten::cumsum": _cumsum_symbolic}


@contextlib.contextmanager
def _extra_symbolics() -> Iterator[None]:
    for name, symbolic in _EXTRA_SYMBOLICS.items():
        torch.onnx.register_custom_op_symbolic(name, symbolic, TRACE_OPSET)
    try:
        yield
    finally:
        for name in _EXTRA_SYMBOLICS:
            torch.onnx.unregister_custom_op_symbolic(name, TRACE_OPSET)
        _drop_empty_symbolic_groups(list(_EXTRA_SYMBOLICS))


def _drop_empty_symbolic_groups(names: list[str]) -> None:
    """Forget the ops whose only rule was ours: torch's ``unregister_custom_op_symbolic`` leaves an empty group that
    later exports of the op then fail on with ``min() arg is an empty sequence`` instead of "not supported"."""
    try:
        from torch.onnx._internal.torchscript_exporter.registration import registry
    except ImportError:  # pragma: no cover - another torch layout: nothing to clean
        return
    for name in names:
        group = registry.get_function_group(name)
        if group is not None and not list(getattr(group, "_functions", [None])):
            registry._registry.pop(name, None)


def _trace(model: nn.Module, args: tuple[Tensor, ...], calls: list[_Point]) -> tuple[bytes, list[str]]:
    """TorchScript-export ``model`` (the copy) with its markers; returns the bytes and the input names."""
    # The exporter appends the defaults of the forward's other parameters to the inputs and turns the non-None ones
    # into graph inputs (transformers' ``logits_to_keep=0``): the copy's forward takes the given inputs only.
    forward = type(model).forward
    model.forward = lambda *inputs: forward(model, *inputs)
    with torch.no_grad():
        out = model(*args)
        calls.clear()  # the keys of the traced run are the ones that count
    outputs = 1 if isinstance(out, Tensor) else len(out)
    inputs, output_names = _names("input", len(args)), _names("output", outputs)
    dynamic = {name: {0: "batch"} for name in (*inputs, *output_names)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo=True, which traces the quantizers into plain
        # float ops without any Q/DQ; it warns about the custom domain's shape inference too. Both are expected.
        warnings.simplefilter("ignore")
        with _extra_symbolics():
            torch.onnx.export(
                model,
                args,
                buffer,
                dynamo=False,
                opset_version=TRACE_OPSET,
                input_names=inputs,
                output_names=output_names,
                dynamic_axes=dynamic,
                custom_opsets={DOMAIN: 1},
                do_constant_folding=True,
            )
    return buffer.getvalue(), inputs


# -------------------------------------------------------------------------------------------------- rewrite


def _numpy_dtype(dtype: str) -> Any:
    if dtype.endswith("INT4"):
        import ml_dtypes  # an onnx dependency

        return ml_dtypes.int4 if dtype == "INT4" else ml_dtypes.uint4
    return {"FLOAT": np.float32}.get(dtype) or np.dtype(dtype.lower())


class _Graph:
    """Small helpers over an ``onnx.GraphProto``: constants, producers, consumers, fresh names."""

    def __init__(self, onnx: Any, model: Any) -> None:
        self.onnx = onnx
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}

    def producers(self) -> dict[str, Any]:
        return {out: node for node in self.graph.node for out in node.output}

    def consumers(self) -> dict[str, list[Any]]:
        found: dict[str, list[Any]] = {}
        for node in self.graph.node:
            for name in node.input:
                found.setdefault(name, []).append(node)
        for out in self.graph.output:
            found.setdefault(out.name, []).append(None)
        return found

    def value(self, name: str) -> np.ndarray | None:
        """The constant behind ``name`` (an initializer, possibly through Identity nodes), or None."""
        producers = self.producers()
        while name not in self.inits and name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]
        init = self.inits.get(name)
        return None if init is None else self.onnx.numpy_helper.to_array(init)

    def const(self, name: str, array: np.ndarray, dtype: str = "FLOAT") -> str:
        # raw little-endian data (4-bit types packed two per byte); make_tensor's int32_data would take a varint of
        # up to 10 bytes per int8 code.
        tensor = self.onnx.numpy_helper.from_array(np.asarray(array).astype(_numpy_dtype(dtype)), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> Any:
        return self.onnx.helper.make_node(op, inputs, [output], name=output, **attrs)


def _activation_chain(g: _Graph, x: str, y: str, point: _Point, label: str, integer_kernels: bool) -> tuple:
    """Nodes computing ``y`` from ``x`` for one activation call, and the name of its code tensor."""
    grid, nodes, cur = point.grid, [], x
    scale = g.const(f"{label}/scale", grid.scale)
    zero = g.const(f"{label}/zero_point", np.array(grid.zero_point), point.dtype)
    if integer_kernels:
        # A UINT8 pair right after the producer: onnxruntime fuses it into QLinearConv / QLinearAdd.
        zero8 = g.const(f"{label}/zero_point8", np.array(grid.zero_point), "UINT8")
        nodes += [
            g.node("QuantizeLinear", [cur, scale, zero8], f"{label}/requant"),
            g.node("DequantizeLinear", [f"{label}/requant", scale, zero8], f"{label}/requant_dq"),
        ]
        cur = f"{label}/requant_dq"
    if grid.clip is not None:
        lo, hi = (g.const(f"{label}/clip_{s}", np.array(v, np.float32)) for s, v in zip("lh", grid.clip))
        if point.dtype.endswith("INT4"):
            # onnxruntime 1.32's ClipQuantFusion throws on a 4-bit zero point; Max/Min clip the same values.
            nodes += [
                g.node("Max", [cur, lo], f"{label}/clip_low"),
                g.node("Min", [f"{label}/clip_low", hi], f"{label}/clip"),
            ]
        else:
            nodes.append(g.node("Clip", [cur, lo, hi], f"{label}/clip"))
        cur = f"{label}/clip"
    if grid.offset is not None:  # torch clamps, then subtracts l
        offset = g.const(f"{label}/offset", np.array(grid.offset, np.float32))
        nodes.append(g.node("Sub", [cur, offset], f"{label}/shifted"))
        cur = f"{label}/shifted"
    code = f"{label}/code"
    nodes += [g.node("QuantizeLinear", [cur, scale, zero], code), g.node("DequantizeLinear", [code, scale, zero], y)]
    nodes += _level_fixes(g, nodes, point.grid, label, integer_kernels)
    return nodes, code


def _level_fixes(g: _Graph, nodes: list, grid: Grid, label: str, integer_kernels: bool) -> list:
    """``Add(offset)`` and the top-level ``Where`` after the last node of ``nodes`` (renamed to keep its output)."""
    y, extra = nodes[-1].output[0], []
    top = grid.top if not integer_kernels else None  # the integer kernels take the level DequantizeLinear gives
    if grid.offset is None and top is None:
        return extra
    nodes[-1].output[0] = cur = f"{label}/dequantized"
    nodes[-1].name = cur
    if grid.offset is not None:
        offset = g.const(f"{label}/level_offset", np.array(grid.offset, np.float32))
        extra.append(g.node("Add", [cur, offset], f"{label}/levels"))
        cur = f"{label}/levels"
    if top is not None:  # torch returns u itself for the top level; L * Delta (+ l) can miss it by an ulp
        computed, exact = (g.const(f"{label}/top_{s}", np.array(v, np.float32)) for s, v in zip("ce", top))
        extra += [
            g.node("Equal", [cur, computed], f"{label}/is_top"),
            g.node("Where", [f"{label}/is_top", exact, cur], f"{label}/top"),
        ]
        cur = f"{label}/top"
    extra[-1].output[0] = y
    extra[-1].name = y
    return extra


def _weight_chain(g: _Graph, y: str, point: _Point, label: str, transpose: bool) -> list:
    grid, codes = point.grid, point.codes
    axis = grid.axis
    if transpose:  # a Linear traced as Transpose -> MatMul: store the codes transposed instead
        codes, axis = codes.T, 1 - axis
    q = g.const(f"{label}/codes", codes, point.dtype)
    scale = g.const(f"{label}/scale", grid.scale)
    zero = np.full(np.shape(grid.scale), grid.zero_point)
    zp = g.const(f"{label}/zero_point", zero, point.dtype)
    attrs = {"axis": axis} if np.ndim(grid.scale) == 1 else {}
    nodes = [g.node("DequantizeLinear", [q, scale, zp], y, **attrs)]
    return nodes + _level_fixes(g, nodes, grid, label, False)


def _labels(markers: list[Any], calls: list[_Point]) -> dict[str, str]:
    """A readable, unique name per marker: ``<module>[/site<i>]/call<n>`` (calls of one site counted in order)."""
    seen: dict[tuple[str, int], int] = {}
    labels = {}
    for node in markers:
        point = calls[node.attribute[0].i]
        n = seen.get((point.name, point.site), 0)
        seen[(point.name, point.site)] = n + 1
        site = f"/site{point.site}" if point.kind == "activation" else ""
        labels[node.output[0]] = f"{point.name}{site}/{point.kind}{n}"
    return labels


def _fold_batchnorm(g: _Graph, markers: dict[str, _Point]) -> int:
    """Fold eval BatchNorm into the quantized Conv/Gemm before it: per-channel weight scale, new bias."""
    producers, consumers = g.producers(), g.consumers()
    drop, folded = [], 0
    for bn in g.graph.node:
        layer = producers.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if layer is None or layer.op_type not in ("Conv", "Gemm") or len(consumers[bn.input[0]]) != 1:
            continue
        point = markers.get(layer.input[1])
        trans_b = next((a.i for a in layer.attribute if a.name == "transB"), 0)
        if point is None or (layer.op_type == "Gemm" and not trans_b) or np.ndim(point.grid.scale) != 0:
            continue
        gamma, beta, mean, var = (g.value(name).astype(np.float64) for name in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        factor = gamma / np.sqrt(var + eps)
        if (factor < 0).any():  # a negative scale: flip the codes of those channels (symmetric grids only)
            if point.grid.zero_point != 0 or point.grid.qmin != -point.grid.qmax:
                raise _refuse(
                    f"{point.quantizer} weights of {point.name!r} folded with a negative BatchNorm scale",
                    "its grid is not symmetric, so the codes of those channels can not be negated",
                )
            sign = np.where(factor < 0, -1, 1).reshape((-1,) + (1,) * (point.codes.ndim - 1))
            point.codes = point.codes * sign
        scale = (float(point.grid.scale) * np.abs(factor)).astype(np.float32)
        point.grid = replace(point.grid, scale=scale, axis=0)
        bias = g.value(layer.input[2]).astype(np.float64) if len(layer.input) > 2 else 0.0
        new_bias = g.const(f"{point.name}/folded_bias", ((bias - mean) * factor + beta).astype(np.float32))
        layer.input.extend([""] * (3 - len(layer.input)))
        layer.input[2] = new_bias
        layer.output[0] = bn.output[0]
        drop.append(bn)
        folded += 1
    for bn in drop:
        g.graph.node.remove(bn)
    return folded


def _int32_biases(g: _Graph) -> None:
    """Store the float bias of each Conv/Gemm between two DequantizeLinear inputs as int32 (scale ``s_x * s_w``)."""
    producers = g.producers()
    for layer in list(g.graph.node):
        if layer.op_type not in ("Conv", "Gemm") or len(layer.input) < 3 or not layer.input[2]:
            continue
        x, w = producers.get(layer.input[0]), producers.get(layer.input[1])
        bias = g.value(layer.input[2])
        if bias is None or not all(p is not None and p.op_type == "DequantizeLinear" for p in (x, w)):
            continue
        s_x, s_w = g.value(x.input[1]), g.value(w.input[1])
        if s_x is None or s_w is None or np.ndim(s_x) != 0:
            continue
        scale = (np.float32(s_x) * s_w.astype(np.float32)).astype(np.float32) * np.ones_like(bias, np.float32)
        codes = np.clip(np.rint(bias.astype(np.float64) / scale), -(2**31), 2**31 - 1)
        label = f"{layer.name or layer.output[0]}/bias"
        q, s = g.const(f"{label}/codes", codes, "INT32"), g.const(f"{label}/scale", scale)
        node = g.node("DequantizeLinear", [q, s], f"{label}/dequantized", axis=0)
        g.graph.node.insert(list(g.graph.node).index(layer), node)
        layer.input[2] = node.output[0]


def _expand_markers(g: _Graph, calls: list[_Point], integer_kernels: bool) -> list[dict[str, Any]]:
    """Replace every marker by its Q/DQ chain; return the metadata of every quantized tensor."""
    markers = [n for n in g.graph.node if n.domain == DOMAIN]
    labels, consumers = _labels(markers, calls), g.consumers()
    nodes, records, transposed = [], [], set()
    for node in g.graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        point, label = calls[node.attribute[0].i], labels[node.output[0]]
        if point.kind == "activation":
            chain, code = _activation_chain(g, node.input[0], node.output[0], point, label, integer_kernels)
        else:
            users = consumers.get(node.output[0], [])
            transpose = len(users) == 1 and users[0] is not None and users[0].op_type == "Transpose"
            y = users[0].output[0] if transpose else node.output[0]
            transposed.update([node.output[0]] if transpose else [])
            chain, code = _weight_chain(g, y, point, label, transpose), f"{label}/codes"
        nodes.extend(chain)
        records.append(_record(point, label, code))
    g.graph.ClearField("node")
    g.graph.node.extend(n for n in nodes if not (n.op_type == "Transpose" and n.input[0] in transposed))
    return records


def _record(point: _Point, label: str, code: str) -> dict[str, Any]:
    grid = point.grid
    return {
        "label": label,
        "name": point.name,
        "kind": point.kind,
        "site": point.site,
        "bits": point.bits,
        "quantizer": point.quantizer,
        "code": code,
        "dtype": point.dtype,
        "scale": np.asarray(grid.scale, np.float32).tolist(),
        "zero_point": grid.zero_point,
        "offset": grid.offset,
        "clip": grid.clip,
        "top": grid.top,
        "weight_max_ulps": point.max_ulps,
    }


def _check_inputs(g: _Graph, inputs: list[str]) -> None:
    """Refuse a graph that does not read its inputs (what tracing ctypes-written tensors gives, with no error)."""
    declared = {i.name for i in g.graph.input}
    used = {name for node in g.graph.node for name in node.input}
    missing = [name for name in inputs if name not in declared or name not in used]
    if missing:
        raise RuntimeError(
            f"The exported graph does not read its input(s) {missing}: some module computed its output outside"
            " torch's view (e.g. through ctypes); nothing was written."
        )


def _rewrite(onnx: Any, data: bytes, calls: list[_Point], inputs: list[str], integer_kernels: bool) -> Any:
    model = onnx.load_from_string(data)
    g = _Graph(onnx, model)
    _check_inputs(g, inputs)
    if integer_kernels:
        weights = {n.output[0]: calls[n.attribute[0].i] for n in g.graph.node if n.domain == DOMAIN}
        _fold_batchnorm(g, {k: p for k, p in weights.items() if p.kind == "weight"})
    records = _expand_markers(g, calls, integer_kernels)
    if integer_kernels:
        _int32_biases(g)
    used = {name for node in g.graph.node for name in node.input} | {o.name for o in g.graph.output}
    kept = [t for t in g.graph.initializer if t.name in used]
    g.graph.ClearField("initializer")
    g.graph.initializer.extend(kept)
    for opset in list(model.opset_import):
        if opset.domain == DOMAIN:
            model.opset_import.remove(opset)
        elif opset.domain in ("", "ai.onnx"):
            opset.version = OPSET
    del model.graph.value_info[:]  # shapes traced at opset 20 through the markers; onnxruntime infers its own
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(records)})
    onnx.checker.check_model(model)
    return model


# ----------------------------------------------------------------------------------------------- public API


def export_float_onnx(model: nn.Module, example_input: Tensor, path: str | os.PathLike) -> str:
    """The float baseline of :func:`export_onnx`: the same exporter, opset and names (``input``/``output``, dynamic
    batch), no quantization. For a model without quantizers (the float model a QDQ export is compared with).

    Args:
        model: A float model (eval mode is the caller's choice).
        example_input: One input batch.
        path: The ``.onnx`` file to write.

    Returns:
        ``path`` as a string.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            model,
            (example_input,),
            str(path),
            dynamo=False,
            opset_version=TRACE_OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    return str(path)


def export_onnx(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    path: str | os.PathLike,
    *,
    integer_kernels: bool = False,
    weight_storage_bits: int | None = None,
) -> str:
    """Write a QDQ ONNX model of a quantized model (injected by ``inject_quantizers`` or a callback).

    Every quantized tensor gets ``QuantizeLinear``/``DequantizeLinear`` (weights: integer initializers with
    ``DequantizeLinear``), the batch dimension is dynamic, and onnxruntime reproduces the eval model's integer codes
    except within float rounding of a level boundary. The module docstring says how each quantizer exports. The
    model's ``lightning_quant.quantized_tensors`` metadata lists every quantized tensor (its code tensor's name,
    scale, zero point, dtype). Run it with :func:`onnxruntime_session` (which turns off onnxruntime's QDQ fusions
    unless ``integer_kernels``) or any runtime that reads opset 21.

    Args:
        model: The injected model. Not modified: the export works on a deep copy in eval mode.
        example_input: One input (a tensor, or a tuple of the forward's positional tensors); its batch dimension
            becomes symbolic (``batch``).
        path: Where to write the ``.onnx`` file; its folder must exist.
        integer_kernels: Write the graph onnxruntime runs with integer kernels (8-bit containers, BatchNorm folded
            into per-channel weight scales, int32 biases) instead of the exact fake-quant graph.
        weight_storage_bits: Integer width of the weight initializers: 4, 8 or 16; None takes the narrowest that
            holds the codes (INT4/UINT4 up to 4 bits, except DoReFa, whose codes need one bit more).

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: If the model was never injected, ``example_input`` or ``weight_storage_bits`` is invalid, a
            quantizer has no export rule, or a quantizer at its bit width can not be stored exactly (the message
            names the module and why: e.g. DoReFa at 4 bits needs codes -15..15, which INT4 can not hold).
        FileNotFoundError: If ``path``'s folder does not exist.
        ImportError: If ``onnx`` is not installed (the ``export`` extra).
        RuntimeError: If the traced graph does not read its input.
    """
    onnx = _onnx()
    path = os.fspath(path)
    _check_arguments(model, path, integer_kernels, weight_storage_bits)
    args = _as_args(example_input)
    clone = copy.deepcopy(model).eval()
    calls, _ = _prepare(clone, integer_kernels, weight_storage_bits)  # every refusal happens here
    data, inputs = _trace(clone, args, calls)
    exported = _rewrite(onnx, data, calls, inputs, integer_kernels)
    onnx.save(exported, path)
    return path


def _check_arguments(model: nn.Module, path: str, integer_kernels: bool, storage_bits: int | None) -> None:
    if not isinstance(model, nn.Module) or injected_recipe(model) is None:
        raise ValueError(
            f"export_onnx needs a model injected by inject_quantizers (or a lightning_quant callback); "
            f"{type(model).__name__} holds no lightning_quant recipe."
        )
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"export_onnx: the folder of `path` does not exist: {folder!r}.")
    if not isinstance(integer_kernels, bool):
        raise ValueError(f"`integer_kernels` must be a bool, got {integer_kernels!r}.")
    if storage_bits not in (None, 4, 8, 16) or isinstance(storage_bits, bool):
        raise ValueError(f"`weight_storage_bits` must be None, 4, 8 or 16, got {storage_bits!r}.")
    if integer_kernels and storage_bits not in (None, 8):
        raise ValueError(
            f"`weight_storage_bits`={storage_bits} with integer_kernels=True: onnxruntime's integer kernels read"
            " 8-bit weights only."
        )


def quantized_tensors(path_or_model: str | os.PathLike | Any) -> list[dict[str, Any]]:
    """The metadata :func:`export_onnx` stores: one dict per quantized tensor (``label``, ``code``, ``scale``...).

    Args:
        path_or_model: A file written by :func:`export_onnx`, or the loaded ``onnx.ModelProto``.

    Raises:
        ValueError: If the model holds no lightning_quant metadata.
    """
    onnx = _onnx()
    model = onnx.load(os.fspath(path_or_model)) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ValueError("This ONNX model was not written by lightning_quant.export_onnx (no metadata).")
    return json.loads(props[METADATA_KEY])


def onnxruntime_session(
    path: str | os.PathLike | bytes, *, integer_kernels: bool = False, threads: int | None = None
) -> Any:
    """An onnxruntime CPU session for a file written by :func:`export_onnx`.

    Args:
        path: The ``.onnx`` file (or its bytes).
        integer_kernels: Let onnxruntime fuse Q/DQ into integer kernels. Off (the default), its QDQ fusions and
            its ``WeightBiasQuantization`` pass are disabled, so the session computes the fake-quant graph exactly
            as written (a DQ -> Conv -> Q triple would otherwise run as QLinearConv and move codes at boundaries).
        threads: Intra-op threads (None: onnxruntime's default).

    Raises:
        ImportError: If onnxruntime is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("onnxruntime_session needs onnxruntime: pip install 'lightning_quant[export]'.") from err
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    disabled = []
    if not integer_kernels:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        disabled = ["WeightBiasQuantization"]
    source = path if isinstance(path, bytes) else os.fspath(path)
    return ort.InferenceSession(
        source, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled or None
    )
