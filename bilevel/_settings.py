"""Checks of configuration values (a solver's, a policy's, a call's flags): each names who was
configured, the setting and what it must be, so a bad value fails where it was given rather
than as a torch error, or a silently different behaviour, later."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_flag", "check_int", "check_positive"]


def check_flag(who: str, name: str, value: Any) -> None:
    """Raise ``TypeError("Who(name=value): name must be True or False")`` unless value is a bool.

    Truthiness is not enough: ``restart="False"`` would turn the option on."""
    if not isinstance(value, bool):
        raise TypeError(f"{who}({name}={value!r}): {name} must be True or False")


def check_positive(who: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError("Who(name=value): name must be > 0 and finite")`` unless value is a finite
    positive number (``>= 0`` with ``allow_zero``); a ``TypeError`` for a non-number (a bool, a
    string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{who}({name}={value!r}): {name} must be a number, not {type(value).__name__}")
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(
            f"{who}({name}={value!r}): {name} must be {'>= 0' if allow_zero else '> 0'} and finite"
        )


def check_int(who: str, name: str, value: int, minimum: int) -> None:
    """Raise unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}({name}={value!r}): {name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{who}({name}={value!r}): {name} must be >= {minimum}")
