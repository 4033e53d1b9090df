"""What the worker processes of the fleet tests do with a fleet-wide `Bulkhead` and `RetryBudget`.

Shared by ``tests/test_fleet_processes.py`` (one Redis) and
``tests/test_redis_ha.py`` (a Redis Cluster, and a primary behind
Sentinels): the worker side (`make_calls`, `spend_in_an_outage`,
`Recording`) and the reading of the workers' reports (`peak`,
`budget_allowed`).

Concurrency is measured on the host's monotonic clock, which every process
on one host shares (``CLOCK_MONOTONIC``): each call notes when it started
and ended inside its permit, and the fleet's peak is the most intervals
that overlap. Unlike a counter in Redis, that still measures while Redis
fails over.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import stalwart as sw

# The retry budget of the tests: a tenth of the first attempts, and a floor
# of 40 retries a second; a process exchanges with the fleet every 100 ms.
RATIO, FLOOR_RATE, SYNC = 0.1, 40.0, 0.1


def retry_budget(store: Any, *, window: float, name: str = "fleet") -> sw.RetryBudget:
    """A process's share of the tests' fleet-wide retry budget."""
    return sw.RetryBudget(
        ratio=RATIO,
        min_per_second=FLOOR_RATE,
        window=window,
        store=store,
        sync_interval=SYNC,
        name=name,
    )


async def make_calls(
    bulkhead: sw.Bulkhead,
    intervals: list[tuple[float, float]],
    *,
    done: Callable[[], bool],
    callers: int = 8,
) -> None:
    """``callers`` tasks calling through ``bulkhead`` back to back until ``done()``.

    Each call appends its (start, end), on the host's monotonic clock, to
    ``intervals``.
    """

    @bulkhead
    async def call() -> None:
        start = time.monotonic()
        try:
            await asyncio.sleep(random.uniform(0.002, 0.02))
        finally:
            intervals.append((start, time.monotonic()))

    async def caller() -> None:
        while not done():
            await call()

    await asyncio.gather(*(caller() for _ in range(callers)))


def peak(intervals: Iterable[Sequence[float]], *, after: float = float("-inf")) -> int:
    """The most calls in flight at once (of those still running at ``after``)."""
    # At the same instant an end comes before a start: they did not overlap.
    events = sorted(
        (at, change)
        for start, end in intervals
        if end > after
        for at, change in ((start, 1), (end, -1))
    )
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


class Down(Exception):
    pass


async def spend_in_an_outage(
    budget: sw.RetryBudget,
    *,
    processes: int,
    seconds: float,
    ready: Callable[[], Awaitable[None]],
) -> dict[str, Any]:
    """Join the fleet sharing ``budget``, await ``ready()``, then call into a total outage.

    Every call fails; `Retry` (four attempts, no backoff) retries as far as
    the budget allows. Returns the first attempts and the retries made, how
    long it ran, and how often the store could not be reached.
    """
    attempts = 0

    @sw.Retry(attempts=4, budget=budget, backoff=sw.Backoff(initial=0.0, maximum=0.0))
    async def call() -> None:
        nonlocal attempts
        attempts += 1
        raise Down

    # Join the fleet before the outage, as long-running replicas have.
    sync = budget.sync_interval or 0.1
    budget.deposit()
    deadline = time.monotonic() + 10.0
    while (budget.statistics().processes or 0) < processes and time.monotonic() < deadline:
        budget.deposit()
        await asyncio.sleep(sync)
    await asyncio.sleep(budget.window)  # the warm-up's floor leaves the window
    await ready()
    joined = attempts
    start = time.monotonic()
    first = 0
    while time.monotonic() - start < seconds:
        first += 1
        with contextlib.suppress(Down):
            await call()
        await asyncio.sleep(0.005)
    metrics = budget.metrics
    assert metrics is not None
    return {
        "first": first,
        "retries": attempts - joined - first,
        "seconds": time.monotonic() - start,
        "store_unavailable": metrics.store_unavailable,
    }


def budget_allowed(reports: Sequence[dict[str, Any]], *, window: float) -> float:
    """The most retries a budget shared by the reporting processes allows (documented bound).

    `RATIO` of the fleet's first attempts, and one floor over the run: the
    window it started with, and a window's worth every nine tenths of a
    window (retries leave it a tenth at a time).
    """
    first: int = sum(report["first"] for report in reports)
    seconds: float = max(report["seconds"] for report in reports)
    return RATIO * first + FLOOR_RATE * (window + seconds / 0.9)


class Recording:
    """A store's fleet-wide limits, with when each request succeeded or failed (monotonic)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.timeout: float = store.timeout
        self.outcomes: dict[str, list[tuple[float, bool]]] = {"permits": [], "budget": []}

    @property
    def closed(self) -> bool:
        return bool(self.store.closed)

    async def _note(self, kind: str, request: Awaitable[Any]) -> Any:
        try:
            reply = await request
        except sw.StoreUnavailable:
            self.outcomes[kind].append((time.monotonic(), False))
            raise
        self.outcomes[kind].append((time.monotonic(), True))
        return reply

    async def adjust_permits(self, *args: Any, **kwargs: Any) -> Any:
        return await self._note("permits", self.store.adjust_permits(*args, **kwargs))

    async def exchange_budget(self, *args: Any, **kwargs: Any) -> Any:
        return await self._note("budget", self.store.exchange_budget(*args, **kwargs))

    def failures(self, kind: str) -> int:
        return sum(not ok for _, ok in self.outcomes[kind])

    def back_since(self, kind: str, since: float) -> float | None:
        """When requests of ``kind`` succeeded again for good (after ``since``), or None."""
        outcomes = self.outcomes[kind]
        last_failure = max((at for at, ok in outcomes if not ok), default=float("-inf"))
        back = [at for at, ok in outcomes if ok and at > max(since, last_failure)]
        return back[0] if back else None
