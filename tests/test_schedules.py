"""Per-epoch schedules: values against their formulas, serialisation, and argument checks.

A schedule of ``max_epochs`` epochs runs from ``start`` at epoch 0 to ``end`` at the last epoch ``max_epochs - 1``
(progress ``t = epoch / (max_epochs - 1)``, clamped to [0, 1]) and stays at ``end`` after.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_quant.schedules import (
    ConstantSchedule,
    CosineSchedule,
    ExponentialSchedule,
    LinearSchedule,
    Schedule,
    as_schedule,
    schedule_from_dict,
)

MAX_EPOCHS = 11  # last epoch 10, middle epoch 5 (t = 0.5), epoch 3 at t = 0.3


def linear(start: float, end: float, t: float) -> float:
    return start + (end - start) * t


def cosine(start: float, end: float, t: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * t)) / 2


def exponential(start: float, end: float, t: float) -> float:
    return start * (end / start) ** t


CASES = [
    (LinearSchedule(0.2, 0.9), linear, 0.2, 0.9),
    (LinearSchedule(1.0, -3.0), linear, 1.0, -3.0),
    (CosineSchedule(0.5, 0.05), cosine, 0.5, 0.05),
    (CosineSchedule(-1.0, 4.0), cosine, -1.0, 4.0),
    (ExponentialSchedule(0.4, 0.01), exponential, 0.4, 0.01),
    (ExponentialSchedule(1e-3, 2.0), exponential, 1e-3, 2.0),
]


@pytest.mark.parametrize(("schedule", "formula", "start", "end"), CASES, ids=lambda v: repr(v)[:40])
def test_schedule_values_follow_formula(schedule: Schedule, formula, start: float, end: float) -> None:
    # First epoch: start; last epoch and beyond: end; negative epochs clamp to start.
    assert schedule(0, MAX_EPOCHS) == pytest.approx(start, rel=1e-12, abs=1e-15)
    assert schedule(MAX_EPOCHS - 1, MAX_EPOCHS) == pytest.approx(end, rel=1e-12, abs=1e-15)
    assert schedule(MAX_EPOCHS, MAX_EPOCHS) == pytest.approx(end, rel=1e-12, abs=1e-15)
    assert schedule(10 * MAX_EPOCHS, MAX_EPOCHS) == pytest.approx(end, rel=1e-12, abs=1e-15)
    assert schedule(-3, MAX_EPOCHS) == pytest.approx(start, rel=1e-12, abs=1e-15)
    for epoch in range(MAX_EPOCHS):
        t = epoch / (MAX_EPOCHS - 1)
        assert schedule(epoch, MAX_EPOCHS) == pytest.approx(formula(start, end, t), rel=1e-12, abs=1e-15), epoch
    # Values are plain floats (they go into logs and checkpoints).
    assert type(schedule(3, MAX_EPOCHS)) is float
    # Monotone between the end points.
    values = [schedule(e, MAX_EPOCHS) for e in range(MAX_EPOCHS)]
    assert values == sorted(values) or values == sorted(values, reverse=True)


def test_schedule_middle_values_hand_computed() -> None:
    mid = (MAX_EPOCHS - 1) // 2
    assert LinearSchedule(0.2, 0.9)(mid, MAX_EPOCHS) == pytest.approx(0.55, rel=1e-12)
    assert CosineSchedule(0.5, 0.05)(mid, MAX_EPOCHS) == pytest.approx(0.275, rel=1e-12)  # cos(pi/2) = 0
    assert ExponentialSchedule(0.4, 0.1)(mid, MAX_EPOCHS) == pytest.approx(0.2, rel=1e-12)  # geometric mean
    # Cosine is slow at the start: after 1 of 10 epochs it moved (1 - cos(pi/10)) / 2 of the way, linear 1/10.
    assert CosineSchedule(1.0, 0.0)(1, MAX_EPOCHS) == pytest.approx((1 + math.cos(math.pi / 10)) / 2, rel=1e-12)
    # Exponential keeps one ratio per epoch.
    s = ExponentialSchedule(0.5, 0.5 * 2.0**-10)
    for e in range(MAX_EPOCHS - 1):
        assert s(e + 1, MAX_EPOCHS) / s(e, MAX_EPOCHS) == pytest.approx(0.5, rel=1e-12)


def test_constant_schedule() -> None:
    s = ConstantSchedule(0.3)
    assert [s(e, MAX_EPOCHS) for e in (-1, 0, 5, 10, 50)] == [0.3] * 5
    assert s(0, 1) == 0.3
    assert type(ConstantSchedule(2)(0, 3)) is float


@pytest.mark.parametrize(
    "schedule",
    [
        ConstantSchedule(0.25),
        LinearSchedule(0.2, 0.9),
        CosineSchedule(0.5, 0.05),
        ExponentialSchedule(0.4, 0.01),
    ],
    ids=lambda s: type(s).__name__,
)
def test_to_dict_round_trip(schedule: Schedule, tmp_path) -> None:
    data = schedule.to_dict()
    assert data["type"] == type(schedule).__name__
    assert all(isinstance(v, (str, int, float)) for v in data.values())
    rebuilt = schedule_from_dict(data)
    assert rebuilt == schedule and type(rebuilt) is type(schedule)
    assert [rebuilt(e, MAX_EPOCHS) for e in range(MAX_EPOCHS)] == [schedule(e, MAX_EPOCHS) for e in range(MAX_EPOCHS)]
    assert data == schedule.to_dict()  # from_dict does not consume its argument

    # A checkpoint-like dict holding it loads with weights_only=True.
    path = tmp_path / "state.pt"
    torch.save({"schedule": data, "epoch": 3, "value": torch.tensor(schedule(3, MAX_EPOCHS))}, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["schedule"] == data
    assert schedule_from_dict(loaded["schedule"]) == schedule


def test_schedule_from_dict_rejects_unknown_type() -> None:
    with pytest.raises(ValueError, match="Unknown schedule type"):
        schedule_from_dict({"type": "StepSchedule", "start": 1.0})
    with pytest.raises(ValueError, match="Unknown schedule type"):
        schedule_from_dict({"start": 1.0, "end": 2.0})


@pytest.mark.parametrize(
    ("schedule", "low", "high", "kwargs", "ok"),
    [
        (LinearSchedule(0.2, 0.9), 0.0, 1.0, {}, True),
        (LinearSchedule(0.2, 1.0), 0.0, 1.0, {}, False),  # reaches the open upper bound
        (LinearSchedule(0.2, 1.0), 0.0, 1.0, {"high_open": False}, True),
        (CosineSchedule(0.0, 0.5), 0.0, 1.0, {}, False),  # starts on the open lower bound
        (CosineSchedule(0.0, 0.5), 0.0, 1.0, {"low_open": False}, True),
        (ExponentialSchedule(0.5, 2.0), 0.0, 1.0, {}, False),
        (ConstantSchedule(-0.1), 0.0, 1.0, {"low_open": False}, False),
    ],
)
def test_check_range(schedule: Schedule, low: float, high: float, kwargs: dict, ok: bool) -> None:
    if ok:
        schedule.check_range("my_rate", low, high, **kwargs)
    else:
        with pytest.raises(ValueError, match="my_rate"):
            schedule.check_range("my_rate", low, high, **kwargs)


def test_as_schedule_accepts_numbers_and_schedules() -> None:
    s = as_schedule(0.3, "rate")
    assert isinstance(s, ConstantSchedule) and s(7, MAX_EPOCHS) == 0.3
    assert as_schedule(2, "rate")(0, MAX_EPOCHS) == 2.0
    linear_schedule = LinearSchedule(0.1, 0.2)
    assert as_schedule(linear_schedule, "rate") is linear_schedule


@pytest.mark.parametrize("value", ["0.3", None, True, [0.1, 0.2], {"type": "ConstantSchedule", "value": 0.3}])
def test_as_schedule_rejects_non_numbers(value: object) -> None:
    with pytest.raises(ValueError, match="rate"):
        as_schedule(value, "rate")  # type: ignore[arg-type]


@pytest.mark.parametrize(("start", "end"), [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, -0.5)])
def test_exponential_rejects_non_positive(start: float, end: float) -> None:
    with pytest.raises(ValueError, match="ExponentialSchedule"):
        ExponentialSchedule(start, end)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1.0", None, True])
def test_schedules_reject_non_finite_arguments(bad: object) -> None:
    with pytest.raises(ValueError, match="start"):
        LinearSchedule(bad, 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="end"):
        CosineSchedule(1.0, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="value"):
        ConstantSchedule(bad)  # type: ignore[arg-type]


def test_as_schedule_names_the_argument_for_non_finite_numbers() -> None:
    with pytest.raises(ValueError, match="rate"):
        as_schedule(float("nan"), "rate")
