"""Argument checks shared by the functional math and the quantizer modules (the functional layer imports nothing
above it, so they live here)."""

from __future__ import annotations

import math


def check_bits(bits: object, name: str, allow_none: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``bits`` is an int in 1..16 (or None when allowed).

    Raises:
        ValueError: If ``bits`` is not allowed.
    """
    if bits is None and allow_none:
        return
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        allowed = "an int in 1..16" + (" or None (keep float)" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {bits!r}.")


def check_positive(value: object, name: str, allow_zero: bool = False) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``value`` is a finite positive (or non-negative) number.

    Raises:
        ValueError: If ``value`` is not allowed.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        allowed = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")
