"""Validation of options, done once at construction.

Every check names the parameter it rejects, so a typo in a config file points
at its line instead of at a traceback deep inside a call.
"""

from __future__ import annotations

import math
from typing import Any, Final

_NAME_MAX = 200

#: The longest window of calls a `CountWindow` may hold: 12.5 MB per bit
#: plane (25 MB with slow calls). Larger ones would not fit in memory.
MAX_WINDOW_CALLS: Final = 100_000_000
#: The most buckets of a `TimeWindow` (three counters each: 24 MB).
MAX_BUCKETS: Final = 1_000_000


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value: Any) -> str:
    """``repr(value)``, short even for an integer of thousands of digits."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"{'-' if value < 0 else ''}an integer of {value.bit_length()} bits"
    return repr(value)


def _finite(param: str, value: Any, kind: str) -> float:
    """``value`` as a finite float; ``kind`` names what it must be, for the TypeError."""
    if not _is_real(value):
        raise TypeError(f"{param} must be {kind}, not {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:  # an int beyond any float
        raise ValueError(f"{param} must be finite, got {shown(value)}") from None
    if math.isnan(result) or math.isinf(result):
        raise ValueError(f"{param} must be finite, got {value!r}")
    return result


def duration(
    param: str, value: Any, *, positive: bool = False, maximum: float | None = None
) -> float:
    """A finite number of seconds, >= 0 (> 0 when ``positive``; <= ``maximum`` if given)."""
    seconds = _finite(param, value, "a number of seconds")
    if positive and seconds <= 0:
        raise ValueError(f"{param} must be > 0, got {shown(value)}")
    if seconds < 0:
        raise ValueError(f"{param} must be >= 0, got {shown(value)}")
    if maximum is not None and seconds > maximum:
        raise ValueError(f"{param} must be at most {maximum:g} seconds, got {shown(value)}")
    return seconds


def optional_duration(param: str, value: Any, *, positive: bool = False) -> float | None:
    return None if value is None else duration(param, value, positive=positive)


def stored_duration(param: str, seconds: float, store: object) -> float:
    """``seconds`` (already a valid duration), which a policy will hand to ``store``.

    A store that keeps durations somewhere with a limit (Redis's expiry
    times) says so with a ``max_duration`` attribute; the policy checks its
    option against it when it is built, rather than failing when the store
    is first used (after the call ran, for a TTL).
    """
    limit = getattr(store, "max_duration", None)
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and seconds > limit:
        raise ValueError(
            f"{param} must be at most {limit:g} seconds with {type(store).__name__} "
            f"(the store's limit), got {seconds!r}"
        )
    return seconds


def number(param: str, value: Any, *, minimum: float = 0.0) -> float:
    """A finite number >= ``minimum``."""
    result = _finite(param, value, "a number")
    if result < minimum:
        raise ValueError(f"{param} must be >= {minimum:g}, got {shown(value)}")
    return result


def rate(param: str, value: Any) -> float:
    """A share in [0, 1]."""
    if not _is_real(value):
        raise TypeError(f"{param} must be a number in [0, 1], not {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:
        result = math.nan
    if not 0.0 <= result <= 1.0:  # also rejects NaN
        raise ValueError(f"{param} must be in [0, 1], got {shown(value)}")
    return result


def count(param: str, value: Any, *, minimum: int = 1, maximum: int | None = None) -> int:
    """An integer >= ``minimum`` (and <= ``maximum`` if given; bools are not integers here)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{param} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{param} must be >= {minimum}, got {shown(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{param} must be at most {maximum:,}, got {shown(value)}")
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
