"""Metrics read from the live policies at scrape time, and the refusal every limiter ends with.

The limiters (`Bulkhead`, `ConcurrencyLimit`, `RateLimiter`,
`AdaptiveThrottle`, `PerKey`) keep their state on the policy object, not in
their metrics: their metrics hold a weak set of the live policies
(`LiveMetrics`), and a gauge sums what it reads from each (`live_gauge`) when
it is scraped. A policy that is gone has no gauge samples, only counters.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

from ._metrics import MetricFamily, PolicyMetrics
from ._telemetry import observed
from .events import CallRejected

if TYPE_CHECKING:
    from ._policy import Policy

__all__ = ["LiveMetrics", "live_gauge", "refuse"]

L = TypeVar("L")


class LiveMetrics(PolicyMetrics, Generic[L]):
    """Metrics with gauges read from ``live``: the policies of their name alive now.

    A subclass's own ``__slots__`` are counters, each starting at 0 (declare
    their types in the class body).
    """

    exclusive = True
    __slots__ = ("live",)

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.live: weakref.WeakSet[L] = weakref.WeakSet()
        for cls in type(self).__mro__:
            if cls is LiveMetrics:
                break
            for counter in cls.__dict__.get("__slots__", ()):
                setattr(self, counter, 0)


def live_gauge(name: str, documentation: str, read: Callable[[Any], float]) -> MetricFamily:
    """A gauge family: the sum of ``read(policy)`` over the live policies of a `LiveMetrics`."""

    def samples(metrics: LiveMetrics[Any]) -> Iterator[tuple[tuple[()], float]]:
        yield (), sum(read(policy) for policy in list(metrics.live))

    return MetricFamily(name, "gauge", documentation, samples)


def refuse(
    policy: Policy, start: float | None, reason: str, retry_after: float | None, error: Exception
) -> NoReturn:
    """Refuse a call: count it, tell who listens (`CallRejected`), raise ``error``.

    ``start``: the call's start, to time the refusal (None: not timed).
    """
    policy._metrics.refused(start)
    if observed(policy._telemetry):
        policy.report(CallRejected, reason=reason, retry_after=retry_after)
    raise error
