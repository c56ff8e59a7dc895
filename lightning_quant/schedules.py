"""Schedules for a quantizer's hyper-parameter (DSQ temperature, QuantNoise rate).

A schedule is a pure function of *training progress* ``t`` in [0, 1]: ``start`` at ``t = 0``, ``end`` at ``t = 1``.
The callbacks compute ``t`` from where the run is (:mod:`lightning_quant.callbacks.base`): by default from the
optimizer step (``global_step / (total steps - 1)``, so the value moves over the whole run however Lightning bounds
it: ``max_epochs``, ``max_steps``, ``limit_train_batches``...), or per epoch (``epoch / (epochs - 1)``, the papers'
"each epoch"). Every DDP rank computes the same value, and a resumed run continues exactly where it stopped, with
nothing to synchronise.

Schedules are small immutable classes (not dataclasses: LightningCLI's parser accepts ``class_path`` for plain
classes only) that round-trip through plain dicts (:meth:`Schedule.to_dict`, :func:`schedule_from_dict`), so they can
live in a checkpoint that torch loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
from typing import Any


def progress_of(epoch: int, num_epochs: int) -> float:
    """Progress of epoch ``epoch`` (0-based) in a run of ``num_epochs`` epochs: 0 at the first, 1 at the last."""
    if num_epochs <= 1:
        return 0.0
    return min(max(epoch / (num_epochs - 1), 0.0), 1.0)


def _check_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


class Schedule:
    """Base class: subclasses define :meth:`at` and list their constructor arguments in ``_fields``."""

    _fields: tuple[str, ...] = ()

    def at(self, progress: float) -> float:  # pragma: no cover - abstract
        """The value at training progress ``progress`` in [0, 1] (clamped)."""
        raise NotImplementedError

    def __call__(self, epoch: int, num_epochs: int) -> float:
        """The value at epoch ``epoch`` of ``num_epochs`` (per-epoch mode)."""
        return self.at(progress_of(epoch, num_epochs))

    def endpoints(self) -> tuple[float, float]:
        """The first and last values; every schedule here is monotone, so these bound all its values."""
        return self.at(0.0), self.at(1.0)

    def check_range(self, name: str, low: float, high: float, low_open: bool = True, high_open: bool = True) -> None:
        """Raise a ``ValueError`` naming ``name`` unless every value lies in the given interval.

        Raises:
            ValueError: If a value leaves the interval.
        """
        for v in self.endpoints():
            ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
            if not ok:
                interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
                raise ValueError(f"`{name}` must stay inside {interval}; {self!r} reaches {v!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"type": type(self).__name__, **{f: getattr(self, f) for f in self._fields}}

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new one.")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.to_dict().items()))

    def __repr__(self) -> str:
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({args})"


class ConstantSchedule(Schedule):
    """The same ``value`` all run long.

    Args:
        value: The value.

    Raises:
        ValueError: If ``value`` is not a finite number.
    """

    _fields = ("value",)

    def __init__(self, value: float) -> None:
        object.__setattr__(self, "value", _check_number(value, "value"))

    def at(self, progress: float) -> float:
        return self.value


class _Ramp(Schedule):
    """A schedule from ``start`` (progress 0) to ``end`` (progress 1); subclasses give the shape.

    Args:
        start: Value at the start of training.
        end: Value at the end of training.

    Raises:
        ValueError: If ``start`` or ``end`` is not a finite number.
    """

    _fields = ("start", "end")

    def __init__(self, start: float, end: float) -> None:
        object.__setattr__(self, "start", _check_number(start, "start"))
        object.__setattr__(self, "end", _check_number(end, "end"))


def _clamp(progress: float) -> float:
    return min(max(float(progress), 0.0), 1.0)


class LinearSchedule(_Ramp):
    """Straight line from ``start`` to ``end``."""

    def at(self, progress: float) -> float:
        return float(self.start + (self.end - self.start) * _clamp(progress))


class CosineSchedule(_Ramp):
    """Half cosine from ``start`` to ``end``: slow at both ends, fastest in the middle."""

    def at(self, progress: float) -> float:
        return float(self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * _clamp(progress))))


class ExponentialSchedule(_Ramp):
    """Geometric from ``start`` to ``end`` (both > 0): the same ratio per unit of progress.

    Raises:
        ValueError: If ``start`` or ``end`` is not positive.
    """

    def __init__(self, start: float, end: float) -> None:
        super().__init__(start, end)
        if self.start <= 0 or self.end <= 0:
            raise ValueError(f"ExponentialSchedule needs `start` > 0 and `end` > 0, got {start!r}, {end!r}.")

    def at(self, progress: float) -> float:
        return float(self.start * (self.end / self.start) ** _clamp(progress))


_SCHEDULES = {cls.__name__: cls for cls in (ConstantSchedule, LinearSchedule, CosineSchedule, ExponentialSchedule)}


def schedule_from_dict(data: dict[str, Any]) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_dict`'s output.

    Raises:
        ValueError: If the type is unknown.
    """
    data = dict(data)
    kind = data.pop("type", None)
    if kind not in _SCHEDULES:
        raise ValueError(f"Unknown schedule type {kind!r}; known: {sorted(_SCHEDULES)}.")
    return _SCHEDULES[kind](**data)


def as_schedule(value: float | Schedule, name: str) -> Schedule:
    """Accept a number (held constant) or a :class:`Schedule`.

    Raises:
        ValueError: If ``value`` is neither.
    """
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number or a lightning_quant.schedules.Schedule, got {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return ConstantSchedule(float(value))
