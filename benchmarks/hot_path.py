"""Success and failure paths of the primitives, against a bare ``await f()``."""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import sys
import tracemalloc
from collections.abc import Callable, Coroutine
from typing import Any

import anyio

import stalwart as sw

from ._harness import Call, Case


async def f() -> int:
    return 1


async def raising() -> int:
    raise ValueError


def _fails_twice() -> Call:
    """Each logical call fails twice, then succeeds."""
    state = [0]

    async def g() -> int:
        state[0] += 1
        if state[0] % 3:
            raise ValueError
        return 1

    return g


def caught_raise() -> Call:
    """The baseline of a rejection: a coroutine that raises, awaited and caught."""

    async def call() -> None:
        # try/except rather than contextlib.suppress: measure the raise alone
        try:  # noqa: SIM105
            await raising()
        except ValueError:
            pass

    return call


def open_breaker_rejection() -> Call:
    breaker = sw.CircuitBreaker()
    guarded = breaker(f)
    breaker.force_open()

    async def call() -> None:
        try:  # noqa: SIM105
            await guarded()
        except sw.CircuitOpenError:
            pass

    return call


def one_in_ten_fails(wrap: Callable[[Callable[[], Coroutine[Any, Any, int]]], Call]) -> Call:
    """Every tenth call raises (and is caught): the window really turns over."""
    count = [0]

    async def g() -> int:
        count[0] += 1
        if count[0] % 10 == 0:
            raise ValueError
        return 1

    guarded = wrap(g)

    async def call() -> None:
        try:  # noqa: SIM105
            await guarded()
        except ValueError:
            pass

    return call


def breaker_cases() -> list[Case]:
    """The circuit breaker's budgets (issue 3), and what its options cost."""
    big = sw.CountWindow(1_000_000)
    return [
        Case(
            "CircuitBreaker closed, success",
            lambda: sw.CircuitBreaker()(f),
            "bare await f()",
            4,
        ),
        Case(
            "CircuitBreaker closed, success, window 1,000,000",
            lambda: sw.CircuitBreaker(window=big)(f),
            "bare await f()",
            4,
        ),
        Case(
            "CircuitBreaker closed, success, TimeWindow(60)",
            lambda: sw.CircuitBreaker(window=sw.TimeWindow(60))(f),
            "bare await f()",
            note="reads the clock",
        ),
        Case(
            "CircuitBreaker closed, success, slow_call_duration",
            lambda: sw.CircuitBreaker(slow_call_duration=1.0)(f),
            "bare await f()",
            note="reads the clock twice",
        ),
        Case("a coroutine that raises, caught", caught_raise),
        Case(
            "CircuitBreaker open rejection, caught",
            open_breaker_rejection,
            "a coroutine that raises, caught",
            2,
        ),
        Case("1 in 10 calls fails, caught", lambda: one_in_ten_fails(lambda g: g)),
        Case(
            "CircuitBreaker, 1 in 10 fails, window 10",
            lambda: one_in_ten_fails(sw.CircuitBreaker(window=10)),
            "1 in 10 calls fails, caught",
        ),
        Case(
            "CircuitBreaker, 1 in 10 fails, window 1,000,000",
            lambda: one_in_ten_fails(sw.CircuitBreaker(window=big)),
            "1 in 10 calls fails, caught",
            note="same cost as window 10: O(1)",
        ),
        Case(
            "Pipeline(Timeout, Retry, CircuitBreaker, Bulkhead)",
            lambda: sw.Pipeline(sw.Timeout(10), sw.Retry(), sw.CircuitBreaker(), sw.Bulkhead(8))(f),
            "bare await f()",
            35,
        ),
    ]


def breaker_memory() -> list[tuple[str, float, float | None]]:
    """Bytes per breaker (tracemalloc): (item, bytes, budget)."""
    from prometheus_client import CollectorRegistry

    telemetry = sw.Telemetry(registry=CollectorRegistry())
    rows: list[tuple[str, float, float | None]] = [
        (
            "CircuitBreaker(), default window",
            per_object(lambda i: sw.CircuitBreaker(telemetry=telemetry)),
            400,
        ),
        (
            "CircuitBreaker(), each with its own name (its metric series and span name too)",
            per_object(lambda i: sw.CircuitBreaker(name=f"cb{i}", telemetry=telemetry)),
            None,
        ),
        (
            "CircuitBreaker(window=TimeWindow(60))",
            per_object(lambda i: sw.CircuitBreaker(window=sw.TimeWindow(60), telemetry=telemetry)),
            None,
        ),
        (
            "CircuitBreaker(window=1_000_000)",
            per_object(lambda i: sw.CircuitBreaker(window=1_000_000, telemetry=telemetry), 20),
            None,
        ),
    ]
    return rows


def per_object(make: Callable[[int], object], n: int = 1000) -> float:
    """Memory allocated and kept per object made by ``make``, by tracemalloc."""
    make(-1)  # first-use allocations (caches, shared objects) are not the object's
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        kept = [make(i) for i in range(n)]
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return (grown - sys.getsizeof(kept)) / n


def handwritten_three_tries() -> Call:
    g = _fails_twice()

    async def loop() -> object:
        for attempt in range(3):
            try:
                return await g()
            except ValueError:
                if attempt == 2:
                    raise
        raise AssertionError

    return loop


ZERO = sw.Backoff(initial=0.0, maximum=0.0)


async def keyed(key: str) -> int:
    return 1


def idempotency_replay() -> Call:
    """Every call replays: the harness's warm-up ran the one key once."""
    return functools.partial(sw.Idempotency(key="key")(keyed), "order-1")


def idempotency_first_execution() -> Call:
    """Every call runs and stores: the keys come round again only long after
    the default store (10,000 records) has evicted them."""
    keys = itertools.cycle([f"order-{i}" for i in range(50_000)])
    return sw.Idempotency(key=functools.partial(next, keys))(f)


def cases() -> list[Case]:
    result = [
        Case("bare await f()", lambda: f),
        Case("Retry, success", lambda: sw.Retry()(f), "bare await f()", 3),
        Case("Bulkhead, uncontended", lambda: sw.Bulkhead(8)(f), "bare await f()", 4),
        Case("Timeout", lambda: sw.Timeout(10)(f), "bare await f()", 25),
        Case(
            "Pipeline(Timeout, Retry, Bulkhead)",
            lambda: sw.Pipeline(sw.Timeout(10), sw.Retry(), sw.Bulkhead(8))(f),
            "bare await f()",
            30,
        ),
        Case("hand-written 3-try loop", handwritten_three_tries),
        Case(
            "Retry, fails twice then succeeds (zero backoff)",
            lambda: sw.Retry(attempts=3, backoff=ZERO)(_fails_twice()),
            "hand-written 3-try loop",
            4,
        ),
        Case("Idempotency, replay", idempotency_replay, "bare await f()", 15),
        Case(
            "Idempotency, first execution",
            idempotency_first_execution,
            "bare await f()",
            25,
            note="a fresh key each call; the full store evicts one record per call",
        ),
    ]
    result += breaker_cases()
    if sys.version_info >= (3, 11):

        def with_asyncio_timeout() -> Call:
            async def call() -> int:
                async with asyncio.timeout(10):
                    return await f()

            return call

        result.append(Case("asyncio.timeout (for scale)", with_asyncio_timeout, "bare await f()"))

    def with_fail_after() -> Call:
        async def call() -> int:
            with anyio.fail_after(10):
                return await f()

        return call

    result.append(Case("anyio.fail_after (for scale)", with_fail_after, "bare await f()"))
    return result
