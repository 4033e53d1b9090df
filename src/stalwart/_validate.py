"""Validation of options, done once at construction.

Every check names the parameter it rejects, so a typo in a config file points
at its line instead of at a traceback deep inside a call.
"""

from __future__ import annotations

import math
from typing import Any

_NAME_MAX = 200


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def duration(param: str, value: Any, *, positive: bool = False) -> float:
    """A finite number of seconds, >= 0 (> 0 when ``positive``)."""
    if not _is_real(value):
        raise TypeError(f"{param} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{param} must be finite, got {value!r}")
    if positive and seconds <= 0:
        raise ValueError(f"{param} must be > 0, got {value!r}")
    if seconds < 0:
        raise ValueError(f"{param} must be >= 0, got {value!r}")
    return seconds


def optional_duration(param: str, value: Any, *, positive: bool = False) -> float | None:
    return None if value is None else duration(param, value, positive=positive)


def number(param: str, value: Any, *, minimum: float = 0.0) -> float:
    """A finite number >= ``minimum``."""
    if not _is_real(value):
        raise TypeError(f"{param} must be a number, not {type(value).__name__}")
    result = float(value)
    if math.isnan(result) or math.isinf(result):
        raise ValueError(f"{param} must be finite, got {value!r}")
    if result < minimum:
        raise ValueError(f"{param} must be >= {minimum:g}, got {value!r}")
    return result


def rate(param: str, value: Any) -> float:
    """A share in [0, 1]."""
    if not _is_real(value):
        raise TypeError(f"{param} must be a number in [0, 1], not {type(value).__name__}")
    result = float(value)
    if not 0.0 <= result <= 1.0:  # also rejects NaN
        raise ValueError(f"{param} must be in [0, 1], got {value!r}")
    return result


def count(param: str, value: Any, *, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (bools are not integers here)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{param} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{param} must be >= {minimum}, got {value!r}")
    return value


def optional_count(param: str, value: Any, *, minimum: int = 1) -> int | None:
    return None if value is None else count(param, value, minimum=minimum)


def name(value: Any) -> str:
    """A policy name: used as a metric label and span attribute, so bounded."""
    if not isinstance(value, str):
        raise TypeError(f"name must be a str, not {type(value).__name__}")
    if not value or len(value) > _NAME_MAX or not value.isprintable():
        raise ValueError(f"name must be 1-{_NAME_MAX} printable characters, got {value!r}")
    return value
