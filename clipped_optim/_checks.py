"""Argument checks shared by the constructor and the policy objects: each raises a ``ValueError``
that names the owner, the argument, the value and what is allowed."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["fail", "is_real", "positive_finite", "positive_int", "flag", "unit_interval", "choice"]


def fail(owner: str, arg: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{owner}: invalid {arg}={value!r}; {allowed}")


def is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def positive_finite(owner: str, arg: str, value: Any) -> float:
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise fail(owner, arg, value, "expected a positive finite number")
    return float(value)


def positive_int(owner: str, arg: str, value: Any, least: int = 1, what: str = "") -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
        raise fail(owner, arg, value, f"expected an integer >= {least}{what}")
    return int(value)


def flag(owner: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(owner, arg, value, "expected True or False")
    return value


def unit_interval(owner: str, arg: str, value: Any, lo_closed: bool, hi_closed: bool) -> float:
    ok = is_real(value) and (value >= 0 if lo_closed else value > 0) and (value <= 1 if hi_closed else value < 1)
    if not ok:
        lo, hi = "[" if lo_closed else "(", "]" if hi_closed else ")"
        raise fail(owner, arg, value, f"expected a number in {lo}0, 1{hi}")
    return float(value)


def choice(owner: str, arg: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise fail(owner, arg, value, f"expected one of {', '.join(map(repr, allowed))}")
    return value
