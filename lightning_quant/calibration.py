"""Clip estimators: where to start a quantizer's range from the data it sees. Plain torch: no Lightning import.

Used to start activation clips (PACT alpha, DSQ upper bound) from a batch of activations, and the LSQ step from the
weight (``step = clip / Qp``). Every estimator ignores non-finite values, computes in float64, is deterministic and
never returns less than :data:`MIN_CLIP` (an all-zero or all-negative input would otherwise give a clip of 0).

Grids, for a clip ``c`` and ``b`` bits (the quantizers' own):

* unsigned (after a ReLU): ``Q_c(x) = round(clamp(x, 0, c) * L / c) * c / L`` with ``L = 2**b - 1``; values below 0
  go to 0.
* signed (LSQ): step ``s = c / Qp``, ``Q_c(x) = round(clamp(x / s, -Qn, Qp)) * s`` with ``(Qn, Qp)`` from
  :func:`~lightning_quant.functional.lsq.lsq_range` (``narrow`` as there).

:func:`mse_clip` minimises ``mean((Q_c(x) - x)**2)`` over ``c``. Search: a grid of ``COARSE_POINTS`` clips
``max * i / COARSE_POINTS`` (``max`` = the largest value for unsigned, ``max|x|`` for signed), a finer grid of
``FINE_POINTS`` over the two coarse cells around the best one, then Lloyd iterations: with the codes of the best
clip fixed, the error is quadratic in ``c`` and minimal at ``c = sum(a x) / sum(a**2)`` (``a`` = code over ``Qp`` or
``L``); re-rounding at that clip can only lower the error again. The result is a local minimum, exact up to
float64 rounding (Lloyd stops when the clip moves by less than ``LLOYD_RTOL = 1e-12`` of itself); it is the global
one whenever that lies within a coarse cell of the best coarse clip, which is all a grid search can promise (the
error is continuous but not unimodal in ``c``). Clips above ``max`` are only reached by the Lloyd steps.

The grid search sums errors over runs of the sorted values (prefix sums, a binary search per level), which costs
``O(levels log n)`` per candidate instead of ``O(n)``: about 0.5 s for a million values on one CPU core.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_quant.functional.lsq import check_lsq_bits, lsq_range

__all__ = [
    "CLIP_ESTIMATORS",
    "DEFAULT_PERCENTILE",
    "MIN_CLIP",
    "get_clip_estimator",
    "max_clip",
    "mse_clip",
    "mse_clip_per_channel",
    "percentile_clip",
]

MIN_CLIP = 1e-8
"""The smallest clip an estimator returns (what an input with no positive finite magnitude gets)."""

DEFAULT_PERCENTILE = 99.99
"""The percentile the ``"percentile"`` estimator of :data:`CLIP_ESTIMATORS` uses."""

COARSE_POINTS = 128
FINE_POINTS = 33
LLOYD_ITERATIONS = 50
LLOYD_RTOL = 1e-12
_CHUNK_ELEMENTS = 2**22  # float64 elements per candidate batch (32 MiB), so the search never holds (k, n) at once
_SAMPLE_SEED = 0


# ------------------------------------------------------------------------------------------------ checks


def _check_grid_bits(bits: object, signed: bool) -> None:
    if signed:
        check_lsq_bits(bits)
    elif isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"`bits` must be an int in 1..16 (2..16 when signed), got {bits!r}.")


def check_max_samples(max_samples: object, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` unless ``max_samples`` is an int >= 1 (or None when allowed).

    Raises:
        ValueError: If ``max_samples`` is not allowed.
    """
    if max_samples is None and allow_none:
        return
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        allowed = "None or an int >= 1" if allow_none else "an int >= 1"
        raise ValueError(f"`max_samples` must be {allowed}, got {max_samples!r}.")


def _grid(bits: int, signed: bool, narrow: bool) -> tuple[int, int, int]:
    """``(lowest code, highest code, codes per clip)``: ``Q_c(x) = round(clamp(x * d / c, lo, hi)) * c / d``."""
    if signed:
        qn, qp = lsq_range(bits, narrow)
        return -qn, qp, qp
    levels = 2**bits - 1
    return 0, levels, levels


# ------------------------------------------------------------------------------------------------ data preparation


def sample_indices(n: int, budget: int, device: torch.device) -> Tensor | None:
    """A fixed-seed uniform sample of ``budget`` column indices out of ``n`` (None: keep all).

    Random indices, not a stride: a stride through an NCHW activation would pick the same few spatial positions.
    They are drawn on the CPU with their own generator, so the sample does not depend on the device or global RNG.
    """
    if n <= budget:
        return None
    g = torch.Generator().manual_seed(_SAMPLE_SEED)
    return torch.randint(n, (budget,), generator=g).to(device)


def _rows(x: Tensor, axis: int | None, max_samples: int) -> Tensor:
    """``x`` as float64 rows ``(C, n)`` (one row per channel, or one row), subsampled, non-finite values set to 0.

    A 0 has no error under any clip of these grids (it is a level) and a zero code, so it changes neither the
    argmin nor the Lloyd step: setting non-finite values to 0 is the same as leaving them out.
    """
    x = x.detach()
    rows = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
    idx = sample_indices(rows.shape[1], max(max_samples // max(rows.shape[0], 1), 1), rows.device)
    rows = (rows if idx is None else rows[:, idx]).to(torch.float64)
    return torch.where(torch.isfinite(rows), rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


# ------------------------------------------------------------------------------------------------ MSE search


class _Sorted:
    """Rows sorted, with prefix sums of ``x`` and ``x**2``: the error of a clip then costs a search per level.

    Under a clip, the levels split the sorted row into runs (boundaries half a step above each level but the top);
    a run of ``n_j`` values with sums ``s1``, ``s2`` on level ``l`` has error ``s2 - 2 l s1 + l**2 n_j``. A value on a
    boundary is equally far from both levels, so which run takes it does not change the error (half-to-even rounding
    included). This is ``O(levels log n)`` per clip instead of ``O(n)``; :func:`_mse` falls back to the direct sum
    where the levels outnumber the values.
    """

    def __init__(self, rows: Tensor) -> None:
        self.x = rows.sort(dim=1).values
        zero = rows.new_zeros(rows.shape[0], 1)
        self.s1 = torch.cat([zero, self.x.cumsum(dim=1)], dim=1)
        self.s2 = torch.cat([zero, self.x.square().cumsum(dim=1)], dim=1)

    def runs(self, clips: Tensor, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per clip and level: ``(sum x, sum x**2, count)`` of the values on it, each ``(C, k, levels)``, and the
        codes over ``d`` (``levels``,)."""
        lo, hi, d = grid
        c, n = self.x.shape
        k = clips.shape[1]
        codes = torch.arange(lo, hi + 1, dtype=torch.float64, device=clips.device)
        bounds = ((codes[:-1] + 0.5) * (clips[:, :, None] / d)).reshape(c, -1)
        pos = torch.searchsorted(self.x, bounds).reshape(c, k, -1)
        edge = pos.new_zeros(1).expand(c, k, 1)
        pos = torch.cat([edge, pos, edge + n], dim=2).reshape(c, -1)
        s1 = self.s1.gather(1, pos).reshape(c, k, -1).diff(dim=2)
        s2 = self.s2.gather(1, pos).reshape(c, k, -1).diff(dim=2)
        cnt = pos.reshape(c, k, -1).diff(dim=2).to(torch.float64)
        return s1, s2, cnt, codes / d

    def mse(self, clips: Tensor, grid: tuple[int, int, int]) -> Tensor:
        s1, s2, cnt, a = self.runs(clips, grid)
        level = a * clips[:, :, None]
        return (s2 - 2 * level * s1 + level.square() * cnt).sum(dim=2) / max(self.x.shape[1], 1)

    def lloyd_step(self, clip: Tensor, grid: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
        """``(sum a x, sum a**2)`` per row for the codes ``a`` (over ``d``) of ``clip`` (C,)."""
        s1, _, cnt, a = self.runs(clip[:, None], grid)
        return (a * s1).sum(dim=2)[:, 0], (a.square() * cnt).sum(dim=2)[:, 0]


def _mse_direct(rows: Tensor, clips: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Mean squared error ``(C, k)`` of each row of ``rows`` (C, n) under each of its clips ``clips`` (C, k)."""
    lo, hi, d = grid
    c, n = rows.shape
    k = clips.shape[1]
    chunk = max(1, _CHUNK_ELEMENTS // max(c * n, 1))
    out = []
    for start in range(0, k, chunk):
        cl = clips[:, start : start + chunk, None]  # (C, k', 1)
        q = torch.round(torch.clamp(rows[:, None, :] * d / cl, lo, hi)) * (cl / d)
        out.append((q - rows[:, None, :]).square().mean(dim=2))
    return torch.cat(out, dim=1)


def _mse(rows: Tensor, sorted_rows: _Sorted | None, clips: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """``(C, k)`` errors, by runs of the sorted rows when given (in candidate chunks that bound the memory)."""
    if sorted_rows is None:
        return _mse_direct(rows, clips, grid)
    per_clip = rows.shape[0] * (grid[1] - grid[0] + 2)
    chunk = max(1, _CHUNK_ELEMENTS // 8 // per_clip)
    return torch.cat([sorted_rows.mse(clips[:, i : i + chunk], grid) for i in range(0, clips.shape[1], chunk)], dim=1)


def _best(rows: Tensor, sorted_rows: _Sorted | None, clips: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """The clip (C,) of least error among ``clips`` (C, k), the first (smallest index) among ties."""
    idx = _mse(rows, sorted_rows, clips, grid).argmin(dim=1, keepdim=True)
    return clips.gather(1, idx).squeeze(1)


def _lloyd(rows: Tensor, sorted_rows: _Sorted | None, clip: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Alternate "best clip for these codes" and "codes for this clip" while the error goes down.

    Stops when no row improves or every clip moves by less than ``LLOYD_RTOL`` of itself (near a fixed point with
    many values, codes of values on a boundary can keep flipping for ever smaller gains).
    """
    lo, hi, d = grid
    err = _mse(rows, sorted_rows, clip[:, None], grid)[:, 0]
    for _ in range(LLOYD_ITERATIONS):
        if sorted_rows is None:
            a = torch.round(torch.clamp(rows * d / clip[:, None], lo, hi)) / d
            num, den = (a * rows).sum(dim=1), a.square().sum(dim=1)
        else:
            num, den = sorted_rows.lloyd_step(clip, grid)
        new = torch.where(den > 0, num / den.clamp_min(1e-300), clip)
        new = torch.where(new > 0, new, clip)
        new_err = _mse(rows, sorted_rows, new[:, None], grid)[:, 0]
        better = new_err < err
        moved = ((new - clip).abs() > LLOYD_RTOL * clip) & better
        clip = torch.where(better, new, clip)
        err = torch.where(better, new_err, err)
        if not bool(moved.any()):
            break
    return clip


def _mse_clip_rows(rows: Tensor, bits: int, signed: bool, narrow: bool) -> Tensor:
    """The MSE-optimal clip of each row of ``rows`` (C, n), float64 (see the module docstring)."""
    grid = _grid(bits, signed, narrow)
    top = (rows.abs() if signed else rows).amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    live = top > 0
    top = torch.where(live, top, torch.ones_like(top))  # dead rows: any clip will do, answered MIN_CLIP below
    t = torch.arange(1, COARSE_POINTS + 1, dtype=torch.float64, device=rows.device) / COARSE_POINTS
    # Runs of sorted values pay off while the levels are fewer than the values (always, up to 8 bits).
    sorted_rows = _Sorted(rows) if grid[1] - grid[0] < rows.shape[1] // 4 else None
    best = _best(rows, sorted_rows, top[:, None] * t, grid)
    h = top / COARSE_POINTS
    lo = (best - h).clamp_min(h / FINE_POINTS)
    hi = torch.minimum(best + h, top)
    u = torch.linspace(0, 1, FINE_POINTS, dtype=torch.float64, device=rows.device)
    fine = torch.cat([best[:, None], lo[:, None] + (hi - lo)[:, None] * u], dim=1)
    best = _lloyd(rows, sorted_rows, _best(rows, sorted_rows, fine, grid), grid)
    return torch.where(live, best, torch.zeros_like(best)).clamp_min(MIN_CLIP)


def mse_clip(x: Tensor, bits: int, signed: bool = False, narrow: bool = False, max_samples: int = 2**20) -> Tensor:
    """The clip ``c`` minimising ``mean((Q_c(x) - x)**2)`` over the finite values of ``x`` (module docstring).

    Args:
        x: The data (activations, or a weight), any shape.
        bits: Bit width: 1..16 unsigned, 2..16 signed.
        signed: The signed LSQ grid with step ``c / Qp``; else the unsigned grid on ``[0, c]``.
        narrow: With ``signed``, the symmetric range ``Qn = Qp`` (see
            :func:`~lightning_quant.functional.lsq.lsq_range`).
        max_samples: Larger inputs are searched on a fixed-seed uniform sample of this many values.

    Returns:
        A 0-d float64 tensor on ``x``'s device, at least :data:`MIN_CLIP` (exactly that when ``x`` has no positive
        finite value, unsigned, or no non-zero finite value, signed).

    Raises:
        ValueError: If ``bits`` or ``max_samples`` is out of range.
    """
    _check_grid_bits(bits, signed)
    check_max_samples(max_samples)
    return _mse_clip_rows(_rows(x, None, max_samples), bits, signed, narrow)[0]


def _check_axis(x: Tensor, axis: object) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -x.dim() <= axis < x.dim():
        raise ValueError(
            f"`axis` must be an int in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}-d tensor, got {axis!r}."
        )
    return axis % x.dim()


def mse_clip_per_channel(
    x: Tensor, bits: int, axis: int = 0, signed: bool = True, narrow: bool = False, max_samples: int = 2**20
) -> Tensor:
    """:func:`mse_clip` for each slice of ``x`` along ``axis`` (one clip per output channel), searched together.

    Args:
        x: The data, at least 1-d (a weight: axis 0 for ``nn.Linear``/``nn.ConvNd``, 1 for a ``Conv1D``).
        bits: Bit width: 1..16 unsigned, 2..16 signed.
        axis: The channel axis; negative counts from the end.
        signed: The signed LSQ grid (the default: this serves weights); else the unsigned grid on ``[0, c]``.
        narrow: With ``signed``, the symmetric range ``Qn = Qp``.
        max_samples: Budget for all channels together: each channel is searched on the same fixed-seed sample of
            ``max_samples // C`` of its values when it has more.

    Returns:
        A float64 tensor of shape ``(C,)`` on ``x``'s device, each at least :data:`MIN_CLIP`.

    Raises:
        ValueError: If ``bits``, ``axis`` or ``max_samples`` is out of range.
    """
    _check_grid_bits(bits, signed)
    check_max_samples(max_samples)
    axis = _check_axis(x, axis)
    return _mse_clip_rows(_rows(x, axis, max_samples), bits, signed, narrow)


# ------------------------------------------------------------------------------------------------ simple estimators


def _magnitudes(x: Tensor, signed: bool) -> Tensor:
    """The finite values as float64, ``|x|`` when signed, ``max(x, 0)`` otherwise (negatives go to level 0)."""
    v = x.detach().reshape(-1)
    v = v[torch.isfinite(v)].to(torch.float64)
    return v.abs() if signed else v.clamp_min(0.0)


def max_clip(x: Tensor, signed: bool = False) -> Tensor:
    """The largest finite value (``max|x|`` when signed): no value is clipped.

    Args:
        x: The data, any shape.
        signed: Use magnitudes; else the largest value (negatives count as 0).

    Returns:
        A 0-d float64 tensor, at least :data:`MIN_CLIP`.
    """
    v = _magnitudes(x, signed)
    top = v.max() if v.numel() else v.new_zeros(())
    return top.clamp_min(MIN_CLIP)


def percentile_clip(x: Tensor, q: float, signed: bool = False, max_samples: int = 2**20) -> Tensor:
    """The ``q``-th percentile of the finite values (of ``|x|`` when signed), linearly interpolated.

    Args:
        x: The data, any shape.
        q: Percentile in (0, 100]; 100 is :func:`max_clip`.
        signed: Use magnitudes; else the values (negatives count as 0).
        max_samples: Larger inputs use a fixed-seed uniform sample of this many values (``torch.quantile`` also
            refuses very large inputs).

    Returns:
        A 0-d float64 tensor, at least :data:`MIN_CLIP`.

    Raises:
        ValueError: If ``q`` is not a number in (0, 100] or ``max_samples`` is out of range.
    """
    ok = isinstance(q, (int, float)) and not isinstance(q, bool) and math.isfinite(q)
    if not ok or not 0 < q <= 100:
        raise ValueError(f"`q` must be a number in (0, 100], got {q!r}.")
    check_max_samples(max_samples)
    v = _magnitudes(x, signed)
    if v.numel() == 0:
        return v.new_full((), MIN_CLIP)
    idx = sample_indices(v.numel(), max_samples, v.device)
    v = v if idx is None else v[idx]
    return torch.quantile(v, q / 100.0).clamp_min(MIN_CLIP)


# ------------------------------------------------------------------------------------------------ by name


def _mse_estimator(x: Tensor, bits: int, signed: bool) -> Tensor:
    """``"mse"``: :func:`mse_clip` (full range when signed)."""
    return mse_clip(x, bits, signed)


def _percentile_estimator(x: Tensor, bits: int, signed: bool) -> Tensor:
    """``"percentile"``: :func:`percentile_clip` at :data:`DEFAULT_PERCENTILE` (``bits`` unused)."""
    return percentile_clip(x, DEFAULT_PERCENTILE, signed)


def _max_estimator(x: Tensor, bits: int, signed: bool) -> Tensor:
    """``"max"``: :func:`max_clip` (``bits`` unused)."""
    return max_clip(x, signed)


CLIP_ESTIMATORS: dict[str, Callable[[Tensor, int, bool], Tensor]] = {
    "mse": _mse_estimator,
    "percentile": _percentile_estimator,
    "max": _max_estimator,
}
"""The estimators by name, each ``(x, bits, signed) -> 0-d float64 clip``."""


def get_clip_estimator(name: str) -> Callable[[Tensor, int, bool], Tensor]:
    """The estimator called ``name`` in :data:`CLIP_ESTIMATORS`.

    Args:
        name: ``"mse"``, ``"percentile"`` or ``"max"``.

    Returns:
        A function ``(x, bits, signed) -> Tensor``.

    Raises:
        ValueError: If ``name`` is not one of them (the message names the ``calibration`` setting).
    """
    if not isinstance(name, str) or name not in CLIP_ESTIMATORS:
        raise ValueError(f"`calibration` must be one of {sorted(CLIP_ESTIMATORS)}, got {name!r}.")
    return CLIP_ESTIMATORS[name]
