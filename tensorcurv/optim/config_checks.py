"""Validation of the optimizer configs' fields: each check raises a one-line ``ValueError`` naming the key."""

from __future__ import annotations

import math
from typing import Any


def check_positive(name: str, value: Any, allow_zero: bool = False, allow_callable: bool = False) -> None:
    if allow_callable and callable(value):
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_in_unit(name: str, value: float, closed_right: bool = False) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value and (value <= 1.0 if closed_right else value < 1.0)):
        raise ValueError(f"{name} must be in [0, 1{']' if closed_right else ')'}, got {value!r}")


def check_optional_positive(name: str, value: Any) -> None:
    if value is not None:
        check_positive(name, value)


def check_interval(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_l1(l1: Any, fista: Any) -> None:
    """The L1 option of every optimizer: ``l1`` (α >= 0) and ``l1_fista`` (a flag)."""
    check_positive("l1", l1, allow_zero=True)
    check_flag("l1_fista", fista)
