"""A retry budget shared by many calls: retries as a share of traffic."""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final, final

from . import _clock, _validate

__all__ = ["RetryBudget", "RetryBudgetStatistics", "charged"]

# The window slides in this many steps: memory and work stay constant, and
# history leaves the window a tenth at a time.
_SLOTS: Final = 10


#: The budget in which the logical call running in this context has already
#: recorded its request: a `Retry` with a budget sets it around its attempts,
#: so that a `Hedge` inside it drawing on the same budget does not record each
#: retried attempt as a new request (which would earn hedges on retries).
charged: ContextVar[RetryBudget | None] = ContextVar("stalwart_budget_charged", default=None)


@final
@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    """A snapshot of a `RetryBudget`'s window."""

    #: first attempts seen in the window
    requests: int
    #: retries made in the window
    retries: int
    #: retries that would be allowed now
    available: int


@final
class RetryBudget:
    """Caps retries at a share of first attempts, over a sliding window.

    Shared by the `Retry` (and `Hedge`) policies of many calls (Finagle's and
    Envoy's retry budgets): every first attempt earns ``ratio`` retries, and a
    floor of ``min_per_second`` retries per second is always allowed so that
    a quiet service can still retry. A retry the budget denies is simply not made;
    the call fails with its last error.

    Under a total outage, a steady stream of calls makes at most about
    ``1 + ratio`` attempts per call (plus ``min_per_second`` divided by the
    calls per second, for the floor), instead of the ``attempts``-fold load
    amplification that turns a blip into an outage. The floor is available
    from the start: a new budget allows ``min_per_second * window`` retries.

    Args:
        ratio: retries earned per first attempt, >= 0 (may exceed 1).
        min_per_second: retries always allowed per second, >= 0.
        window: seconds over which attempts are counted, > 0.

    Example::

        budget = sw.RetryBudget(ratio=0.2)
        fetch_user = sw.Retry(attempts=4, budget=budget)(fetch_user)
        fetch_cart = sw.Retry(attempts=4, budget=budget)(fetch_cart)
    """

    __slots__ = (
        "_last",
        "_min_per_second",
        "_ratio",
        "_requests",
        "_retries",
        "_slot_seconds",
        "_total_requests",
        "_total_retries",
        "_window",
    )

    def __init__(
        self, ratio: float = 0.1, min_per_second: float = 10.0, window: float = 10.0
    ) -> None:
        self._ratio = _validate.number("ratio", ratio)
        self._min_per_second = _validate.number("min_per_second", min_per_second)
        self._window = _validate.duration("window", window, positive=True)
        self._slot_seconds = self._window / _SLOTS
        self._requests = [0] * _SLOTS
        self._retries = [0] * _SLOTS
        self._total_requests = 0
        self._total_retries = 0
        self._last: int | None = None

    @property
    def ratio(self) -> float:
        """Retries earned per first attempt."""
        return self._ratio

    @property
    def min_per_second(self) -> float:
        """Retries always allowed per second."""
        return self._min_per_second

    @property
    def window(self) -> float:
        """Seconds over which attempts and retries are counted."""
        return self._window

    def _advance(self) -> int:
        """Expire slots that left the window; return the current slot index."""
        current = math.floor(_clock.now() / self._slot_seconds)
        last = self._last
        if last != current:
            if last is None or current < last or current - last >= _SLOTS:
                # First use, a new clock (another event loop), or a long pause.
                self._requests = [0] * _SLOTS
                self._retries = [0] * _SLOTS
                self._total_requests = self._total_retries = 0
            else:
                for slot in range(last + 1, current + 1):
                    i = slot % _SLOTS
                    self._total_requests -= self._requests[i]
                    self._total_retries -= self._retries[i]
                    self._requests[i] = self._retries[i] = 0
            self._last = current
        return current % _SLOTS

    def _available(self) -> float:
        earned = self._ratio * self._total_requests + self._min_per_second * self._window
        return earned - self._total_retries

    def deposit(self) -> None:
        """Record a first attempt (`Retry` calls this for you)."""
        i = self._advance()
        self._requests[i] += 1
        self._total_requests += 1

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) if spent."""
        i = self._advance()
        if self._available() < 1.0:
            return False
        self._retries[i] += 1
        self._total_retries += 1
        return True

    def statistics(self) -> RetryBudgetStatistics:
        """The window's counts as of now (needs a running event loop)."""
        self._advance()
        return RetryBudgetStatistics(
            requests=self._total_requests,
            retries=self._total_retries,
            available=max(0, math.floor(self._available())),
        )

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self._ratio:g}, min_per_second={self._min_per_second:g}, "
            f"window={self._window:g})"
        )
