"""stalwart's success and failure paths, against a bare ``await f()``.

The cases here are stalwart's own and their baselines; `peer_cases` adds the
other libraries' equivalents to the same groups.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import sys
import tracemalloc
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, Final

from prometheus_client import CollectorRegistry

import stalwart as sw
import stalwart.events as sw_events

from ._harness import Call, Case

# The groups of the report, in its order: what the rows of a group measure.
RETRY: Final = "Retry, success"
RETRY_FAILING: Final = "Retry, fails twice then succeeds (zero backoff)"
CLOSED: Final = "CircuitBreaker closed, success"
OPEN: Final = "CircuitBreaker open, rejection"
BREAKER_OPTIONS: Final = "CircuitBreaker: what its options and failures cost"
BULKHEAD: Final = "Bulkhead, uncontended"
CONTENDED: Final = "Bulkhead, contended: 16 tasks, 4 slots"
ADAPTIVE: Final = "ConcurrencyLimit and AdaptiveThrottle, uncontended"
TIMEOUT: Final = "Timeout"
IDEMPOTENCY: Final = "Idempotency (in-process store)"
PIPELINE: Final = "Pipeline"
RATE_LIMITER: Final = "RateLimiter, permit available"
HEDGE: Final = "Hedge, the first attempt answers before the delay"
FALLBACK: Final = "Fallback, success"
PER_KEY: Final = "PerKey, the key's policy found"
GROUPS: Final = (
    RETRY,
    RETRY_FAILING,
    CLOSED,
    OPEN,
    BREAKER_OPTIONS,
    BULKHEAD,
    CONTENDED,
    ADAPTIVE,
    TIMEOUT,
    IDEMPOTENCY,
    PIPELINE,
    RATE_LIMITER,
    HEDGE,
    FALLBACK,
    PER_KEY,
)

BARE: Final = "bare await f()"
BARE_SYNC: Final = "bare call g() (sync)"
RAISE: Final = "a coroutine that raises, caught"
RAISE_SYNC: Final = "a function that raises, caught (sync)"
HAND_LOOP: Final = "hand-written 3-try loop"
ONE_IN_TEN: Final = "1 in 10 calls fails, caught"
UNLIMITED: Final = "16 tasks, no limit"

# Contention: TASKS tasks, each making PER_TASK calls through SLOTS slots.
TASKS: Final = 16
SLOTS: Final = 4
PER_TASK: Final = 8

ZERO = sw.Backoff(initial=0.0, maximum=0.0)

_ids = itertools.count()


def unique(kind: str) -> str:
    """A name of its own for a breaker or bulkhead: two live ones of one name would warn."""
    return f"{kind}-{next(_ids)}"


async def f() -> int:
    return 1


async def raising() -> int:
    raise ValueError


def g() -> int:
    return 1


def g_raising() -> int:
    raise ValueError


async def f_yielding() -> int:
    """Lets the other tasks run once, as any real I/O would."""
    await asyncio.sleep(0)
    return 1


def passthrough() -> Call:
    """The least any decorator costs: one more coroutine, passing the arguments on."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await f(*args, **kwargs)

    return wrapper


def fails_twice() -> Call:
    """Each logical call fails twice, then succeeds."""
    state = [0]

    async def flaky() -> int:
        state[0] += 1
        if state[0] % 3:
            raise ValueError
        return 1

    return flaky


def caught(guarded: Callable[[], Coroutine[Any, Any, Any]], *errors: type[Exception]) -> Call:
    """Await ``guarded()`` and swallow ``errors``, as a caller that expects them."""

    async def call() -> None:
        # try/except rather than contextlib.suppress: measure the raise alone
        try:  # noqa: SIM105
            await guarded()
        except errors:
            pass

    return call


def caught_sync(guarded: Callable[[], Any], *errors: type[Exception]) -> Callable[[], None]:
    def call() -> None:
        try:  # noqa: SIM105
            guarded()
        except errors:
            pass

    return call


def contended(guarded: Callable[[], Coroutine[Any, Any, Any]]) -> Call:
    """TASKS tasks at once, each making PER_TASK calls of ``guarded``."""

    async def worker() -> None:
        for _ in range(PER_TASK):
            await guarded()

    async def call() -> None:
        await asyncio.gather(*(worker() for _ in range(TASKS)))

    return call


def open_breaker_rejection(telemetry: sw.Telemetry | None = None) -> Call:
    breaker = sw.CircuitBreaker(name=unique("breaker"), telemetry=telemetry)
    guarded = breaker(f)
    breaker.force_open()
    return caught(guarded, sw.CircuitOpenError)


def is_none(result: object) -> bool:
    return result is None


def observing_open_breaker() -> Call:
    """A shadow breaker, forced open: every call would be rejected, and runs."""
    breaker = sw.CircuitBreaker(mode="observe", name=unique("breaker"))
    breaker.force_open()
    return breaker(f)


def ignore(event: sw_events.Event) -> None:
    """A listener that keeps nothing: what is timed is stalwart's side of an event."""


def listened() -> sw.Telemetry:
    """A telemetry with one listener (on a registry of its own, as the default one's)."""
    return sw.Telemetry(registry=CollectorRegistry(), listeners=[ignore])


def timed() -> sw.Telemetry:
    """A telemetry that measures latency (``stalwart_call_duration_seconds``)."""
    return sw.Telemetry(registry=CollectorRegistry(), latency=True)


def one_in_ten_fails(wrap: Callable[[Callable[[], Coroutine[Any, Any, int]]], Call]) -> Call:
    """Every tenth call raises (and is caught): the window really turns over."""
    count = [0]

    async def sometimes() -> int:
        count[0] += 1
        if count[0] % 10 == 0:
            raise ValueError
        return 1

    return caught(wrap(sometimes), ValueError)


def handwritten_three_tries() -> Call:
    flaky = fails_twice()

    async def loop() -> object:
        for attempt in range(3):
            try:
                return await flaky()
            except ValueError:
                if attempt == 2:
                    raise
        raise AssertionError

    return loop


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


#: A rate no run reaches: every call finds a permit.
UNREACHED_RATE: Final = 10**9


def rate_limited_per_key() -> Call:
    """Every call has a key (one key, its bucket found in the limiter's table)."""
    limiter = sw.RateLimiter(UNREACHED_RATE, key="key", name=unique("rate_limiter"))
    return functools.partial(limiter(keyed), "user-1")


def hedged_adaptive() -> Call:
    """A warm adaptive delay (its estimate in use): a clock read and a sample per call."""
    return sw.Hedge(delay=sw.AdaptiveDelay(warmup=1), name=unique("hedge"))(f)


#: The breaker that `PerKey` rows hold, alone: their baseline.
KEYED_BREAKER: Final = "CircuitBreaker closed, success, alone (keyed function)"


def keyed_breaker() -> Call:
    breaker = sw.CircuitBreaker(name=unique("breaker"))
    return functools.partial(breaker(keyed), "host-1")


def per_key_breaker() -> Call:
    """Every call finds its key's breaker (one key, in a table of 1,000)."""
    per_key = sw.PerKey(
        lambda key: sw.CircuitBreaker(name=unique("breaker")), key="key", name=unique("per_key")
    )
    guarded = per_key(keyed)
    return functools.partial(guarded, "host-1")


def baselines() -> list[Case]:
    return [
        Case(BARE, lambda: f),
        Case(BARE_SYNC, lambda: g, sync=True),
        Case(RAISE, lambda: caught(raising, ValueError)),
        Case(RAISE_SYNC, lambda: caught_sync(g_raising, ValueError), sync=True),
        Case(HAND_LOOP, handwritten_three_tries),
        Case(ONE_IN_TEN, lambda: one_in_ten_fails(lambda g: g)),
        Case(UNLIMITED, lambda: contended(f_yielding), batch=TASKS * PER_TASK),
    ]


def cases() -> list[Case]:
    """stalwart's cases, with their budgets (ratios to their baselines)."""
    big = sw.CountWindow(1_000_000)
    return [
        Case(
            "a pass-through decorator: `return await fn(*args, **kwargs)`",
            passthrough,
            BARE,
            group=RETRY,
            reference=True,
            note="the floor under any decorator",
        ),
        Case("Retry, success", lambda: sw.Retry()(f), BARE, 3, group=RETRY),
        Case(
            "Retry, success, latency measured",
            lambda: sw.Retry(telemetry=timed())(f),
            BARE,
            group=RETRY,
            note="Telemetry(latency=True): two clock reads and a histogram bucket per call",
        ),
        Case(
            "Retry, fails twice then succeeds (zero backoff)",
            lambda: sw.Retry(attempts=3, backoff=ZERO)(fails_twice()),
            HAND_LOOP,
            4,
            group=RETRY_FAILING,
            note="no listener: no event is built",
        ),
        Case(
            "Retry, fails twice then succeeds, one listener on its telemetry",
            lambda: sw.Retry(attempts=3, backoff=ZERO, telemetry=listened())(fails_twice()),
            HAND_LOOP,
            group=RETRY_FAILING,
            note="two Retrying events per call, built and handed to a listener",
        ),
        Case(
            "CircuitBreaker closed, success",
            lambda: sw.CircuitBreaker(name=unique("breaker"))(f),
            BARE,
            4,
            group=CLOSED,
        ),
        Case(
            "CircuitBreaker closed, success, window 1,000,000",
            lambda: sw.CircuitBreaker(window=big, name=unique("breaker"))(f),
            BARE,
            4,
            group=CLOSED,
        ),
        Case(
            "CircuitBreaker open rejection, caught",
            open_breaker_rejection,
            RAISE,
            2,
            group=OPEN,
            note="no listener: no event is built",
        ),
        Case(
            "CircuitBreaker open rejection, caught, one listener on its telemetry",
            lambda: open_breaker_rejection(listened()),
            RAISE,
            group=OPEN,
            note="a CallRejected event per call, built and handed to a listener",
        ),
        Case(
            "CircuitBreaker closed, success, TimeWindow(60)",
            lambda: sw.CircuitBreaker(window=sw.TimeWindow(60), name=unique("breaker"))(f),
            BARE,
            note="reads the clock",
            group=BREAKER_OPTIONS,
        ),
        Case(
            "CircuitBreaker closed, success, slow_call_duration",
            lambda: sw.CircuitBreaker(slow_call_duration=1.0, name=unique("breaker"))(f),
            BARE,
            note="reads the clock twice",
            group=BREAKER_OPTIONS,
        ),
        Case(
            "CircuitBreaker closed, success, failure_on_result",
            lambda: sw.CircuitBreaker(failure_on_result=is_none, name=unique("breaker"))(f),
            BARE,
            note="the predicate called on every result",
            group=BREAKER_OPTIONS,
        ),
        Case(
            'CircuitBreaker(mode="observe") open, call let through',
            observing_open_breaker,
            BARE,
            note="counted as a rejection, then run",
            group=BREAKER_OPTIONS,
        ),
        Case(
            "CircuitBreaker, 1 in 10 fails, window 10",
            lambda: one_in_ten_fails(sw.CircuitBreaker(window=10, name=unique("breaker"))),
            ONE_IN_TEN,
            group=BREAKER_OPTIONS,
        ),
        Case(
            "CircuitBreaker, 1 in 10 fails, window 1,000,000",
            lambda: one_in_ten_fails(sw.CircuitBreaker(window=big, name=unique("breaker"))),
            ONE_IN_TEN,
            note="same cost as window 10: O(1)",
            group=BREAKER_OPTIONS,
        ),
        Case(
            "Bulkhead, uncontended",
            lambda: sw.Bulkhead(8, name=unique("bulkhead"))(f),
            BARE,
            4,
            group=BULKHEAD,
        ),
        Case(
            f"Bulkhead({SLOTS}, max_queued={TASKS - SLOTS})",
            lambda: contended(
                sw.Bulkhead(SLOTS, max_queued=TASKS - SLOTS, name=unique("bulkhead"))(f_yielding)
            ),
            UNLIMITED,
            batch=TASKS * PER_TASK,
            group=CONTENDED,
        ),
        *(
            Case(
                f'ConcurrencyLimit(algorithm="{algorithm}"), uncontended',
                lambda algorithm=algorithm: sw.ConcurrencyLimit(  # type: ignore[misc]
                    algorithm=algorithm, name=unique("concurrency")
                )(f),
                BARE,
                5,
                group=ADAPTIVE,
                note="far below its limit: one call in 32 is timed and sampled",
            )
            for algorithm in ("gradient2", "vegas", "aimd")
        ),
        Case(
            "AdaptiveThrottle, the dependency accepting",
            lambda: sw.AdaptiveThrottle(name=unique("throttle"))(f),
            BARE,
            12,
            group=ADAPTIVE,
            note="a clock read and two counts per call; no random draw while nothing is refused",
        ),
        Case("Timeout", lambda: sw.Timeout(10)(f), BARE, 25, group=TIMEOUT),
        Case("Idempotency, replay", idempotency_replay, BARE, 15, group=IDEMPOTENCY),
        Case(
            "Idempotency, first execution",
            idempotency_first_execution,
            BARE,
            25,
            note="a fresh key each call; the full store evicts one record per call",
            group=IDEMPOTENCY,
        ),
        Case(
            "Pipeline(Timeout, Retry, Bulkhead)",
            lambda: sw.Pipeline(
                sw.Timeout(10), sw.Retry(), sw.Bulkhead(8, name=unique("bulkhead"))
            )(f),
            BARE,
            30,
            group=PIPELINE,
        ),
        Case(
            "Pipeline(Timeout, Retry, CircuitBreaker, Bulkhead)",
            lambda: sw.Pipeline(
                sw.Timeout(10),
                sw.Retry(),
                sw.CircuitBreaker(name=unique("breaker")),
                sw.Bulkhead(8, name=unique("bulkhead")),
            )(f),
            BARE,
            35,
            group=PIPELINE,
        ),
        Case(
            "RateLimiter, permit available",
            lambda: sw.RateLimiter(UNREACHED_RATE, name=unique("rate_limiter"))(f),
            BARE,
            4,
            group=RATE_LIMITER,
            note="reads the loop's clock; GCRA: one number per bucket",
        ),
        Case(
            "RateLimiter(key=...), permit available",
            rate_limited_per_key,
            BARE,
            group=RATE_LIMITER,
            note="reads the key, checks it, finds its bucket (LRU)",
        ),
        Case(
            "Hedge(delay=0.05), first attempt in time",
            lambda: sw.Hedge(delay=0.05, name=unique("hedge"))(f),
            BARE,
            8,
            group=HEDGE,
            note="the attempt runs inline; a record queued and taken back, no timer, no task",
        ),
        Case(
            "Hedge(delay=AdaptiveDelay()), first attempt in time",
            hedged_adaptive,
            BARE,
            group=HEDGE,
            note="a timer heap entry, not the queue; reads the clock twice, adds a latency sample",
        ),
        Case(
            "Fallback, success",
            lambda: sw.Fallback(0)(f),
            BARE,
            3,
            group=FALLBACK,
            note="the fallback is never built nor called on success",
        ),
        Case(KEYED_BREAKER, keyed_breaker, BARE, group=PER_KEY, reference=True),
        Case(
            "PerKey(CircuitBreaker), the key's breaker found",
            per_key_breaker,
            KEYED_BREAKER,
            2,
            group=PER_KEY,
            note="reads the key, checks it, finds its entry (LRU), then the breaker",
        ),
    ]


def breaker_memory(quick: bool = False) -> list[tuple[str, str, float, float | None]]:
    """Bytes per breaker (tracemalloc): (item, library, bytes, budget).

    The breakers of one name all live at once: stalwart warns that their
    state series merge (`StalwartWarning`), which is beside the point here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sw.StalwartWarning)
        return _breaker_memory(quick)


def _breaker_memory(quick: bool) -> list[tuple[str, str, float, float | None]]:
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    n = 100 if quick else 1000
    return [
        (
            "CircuitBreaker(), default window",
            "stalwart",
            per_object(lambda i: sw.CircuitBreaker(telemetry=telemetry), n),
            400,
        ),
        (
            "CircuitBreaker(), each with its own name (its metric series and span name too)",
            "stalwart",
            per_object(lambda i: sw.CircuitBreaker(name=f"cb{i}", telemetry=telemetry), n),
            None,
        ),
        (
            "CircuitBreaker(window=TimeWindow(60))",
            "stalwart",
            per_object(
                lambda i: sw.CircuitBreaker(window=sw.TimeWindow(60), telemetry=telemetry), n
            ),
            None,
        ),
        (
            "CircuitBreaker(window=1_000_000)",
            "stalwart",
            per_object(lambda i: sw.CircuitBreaker(window=1_000_000, telemetry=telemetry), 20),
            None,
        ),
    ]


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
