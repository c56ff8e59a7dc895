"""Per-epoch schedules for a quantizer's hyper-parameter (DSQ temperature, QuantNoise rate).

A schedule is a pure function of ``(epoch, max_epochs)``: every DDP rank computes the same value and a resumed run
continues exactly where it stopped, with nothing to synchronise. The value moves from ``start`` at epoch 0 to
``end`` at the last epoch (``max_epochs - 1``) and stays there after. Schedules are small frozen dataclasses that
round-trip through plain dicts (:meth:`Schedule.to_dict`, :func:`schedule_from_dict`), so they can live in a
checkpoint that torch loads with ``weights_only=True``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


def _progress(epoch: int, max_epochs: int) -> float:
    if max_epochs <= 1:
        return 1.0
    return min(max(epoch / (max_epochs - 1), 0.0), 1.0)


def _check_number(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")


@dataclass(frozen=True)
class Schedule:
    """Base class: subclasses define ``__call__(epoch, max_epochs)``; ``start``/``end`` bound every value."""

    def __call__(self, epoch: int, max_epochs: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def endpoints(self) -> tuple[float, float]:
        """The first and last values; every schedule here is monotone, so these bound all its values."""
        return self(0, 2), self(1, 2)

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
        return {"type": type(self).__name__, **asdict(self)}


@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """The same ``value`` every epoch."""

    value: float

    def __post_init__(self) -> None:
        _check_number(self.value, "value")

    def __call__(self, epoch: int, max_epochs: int) -> float:
        return float(self.value)


@dataclass(frozen=True)
class _Ramp(Schedule):
    """A schedule from ``start`` (first epoch) to ``end`` (last epoch); subclasses give the shape."""

    start: float
    end: float

    def __post_init__(self) -> None:
        _check_number(self.start, "start")
        _check_number(self.end, "end")


@dataclass(frozen=True)
class LinearSchedule(_Ramp):
    """Straight line from ``start`` (first epoch) to ``end`` (last epoch)."""

    def __call__(self, epoch: int, max_epochs: int) -> float:
        t = _progress(epoch, max_epochs)
        return float(self.start + (self.end - self.start) * t)


@dataclass(frozen=True)
class CosineSchedule(_Ramp):
    """Half cosine from ``start`` to ``end``: slow at both ends, fastest in the middle."""

    def __call__(self, epoch: int, max_epochs: int) -> float:
        t = _progress(epoch, max_epochs)
        return float(self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t)))


@dataclass(frozen=True)
class ExponentialSchedule(_Ramp):
    """Geometric from ``start`` to ``end`` (both > 0): the same ratio every epoch."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start <= 0 or self.end <= 0:
            raise ValueError(f"ExponentialSchedule needs `start` > 0 and `end` > 0, got {self.start!r}, {self.end!r}.")

    def __call__(self, epoch: int, max_epochs: int) -> float:
        t = _progress(epoch, max_epochs)
        return float(self.start * (self.end / self.start) ** t)


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
