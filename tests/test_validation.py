"""Every numeric option of every public class is checked when it is built.

Bad values (wrong types, NaN, infinities, integers beyond any float, values
out of range, values beyond what a store or memory can hold) raise
`ValueError`/`TypeError` naming the parameter, at construction: never an
`OverflowError` or a `MemoryError`, and never later, after a call ran.
Values that are huge but valid work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio

import stalwart as sw
from stalwart.asgi import DeadlineMiddleware, IdempotencyMiddleware
from stalwart.httpx import ResilientTransport
from stalwart.redis import RedisStore
from stalwart.testing import VirtualClockEventLoop

from . import redis_support

HUGE_INT = 10**400  # beyond any float
Factory = Callable[[Any], object]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


def _redis() -> RedisStore:
    return RedisStore(redis.asyncio.Redis())


# (parameter, how to build the object with that parameter set)
DURATIONS: list[tuple[str, Factory]] = [
    ("initial", lambda v: sw.Backoff(initial=v, maximum=math.inf if v != v else 10.0)),
    ("multiplier", lambda v: sw.Backoff(multiplier=v)),
    ("maximum", lambda v: sw.Backoff(maximum=v)),
    ("timeout", lambda v: sw.Retry(timeout=v)),
    ("ratio", lambda v: sw.RetryBudget(ratio=v)),
    ("min_per_second", lambda v: sw.RetryBudget(min_per_second=v)),
    ("window", lambda v: sw.RetryBudget(window=v)),
    ("failure_rate", lambda v: sw.CircuitBreaker(failure_rate=v)),
    ("slow_call_duration", lambda v: sw.CircuitBreaker(slow_call_duration=v)),
    ("slow_call_rate", lambda v: sw.CircuitBreaker(slow_call_rate=v)),
    ("open_for", lambda v: sw.CircuitBreaker(open_for=v)),
    ("seconds", lambda v: sw.TimeWindow(v)),
    ("max_wait", lambda v: sw.Bulkhead(1, max_wait=v)),
    ("seconds", lambda v: sw.Timeout(v)),
    ("seconds", lambda v: sw.deadline(v)),
    ("ttl", lambda v: sw.Idempotency(key="k", ttl=v)),
    ("lease", lambda v: sw.Idempotency(key="k", lease=v)),
    ("timeout", lambda v: RedisStore(redis.asyncio.Redis(), timeout=v)),
    ("reconcile_interval", lambda v: RedisStore(redis.asyncio.Redis(), reconcile_interval=v)),
    ("trial_lease", lambda v: RedisStore(redis.asyncio.Redis(), trial_lease=v)),
    ("ttl", lambda v: IdempotencyMiddleware(_app, ttl=v)),
    ("lease", lambda v: IdempotencyMiddleware(_app, lease=v)),
    ("max_timeout", lambda v: DeadlineMiddleware(_app, max_timeout=v)),
    ("default_timeout", lambda v: DeadlineMiddleware(_app, default_timeout=v)),
    ("autojump_threshold", lambda v: VirtualClockEventLoop(autojump_threshold=v)),
]

COUNTS: list[tuple[str, Factory]] = [
    ("attempts", lambda v: sw.Retry(attempts=v)),
    ("window", lambda v: sw.CircuitBreaker(window=v)),
    ("minimum_calls", lambda v: sw.CircuitBreaker(minimum_calls=v)),
    ("consecutive_failures", lambda v: sw.CircuitBreaker(consecutive_failures=v)),
    ("half_open_calls", lambda v: sw.CircuitBreaker(half_open_calls=v)),
    ("size", lambda v: sw.CountWindow(v)),
    ("buckets", lambda v: sw.TimeWindow(10.0, buckets=v)),
    ("max_concurrent", lambda v: sw.Bulkhead(v)),
    ("max_queued", lambda v: sw.Bulkhead(1, max_queued=v)),
    ("max_entries", lambda v: sw.Idempotency(key="k", max_entries=v)),
    ("max_entries", lambda v: sw.MemoryStore(v)),
    ("max_body_size", lambda v: IdempotencyMiddleware(_app, max_body_size=v)),
    ("max_response_size", lambda v: IdempotencyMiddleware(_app, max_response_size=v)),
    ("max_entries", lambda v: IdempotencyMiddleware(_app, max_entries=v)),
    ("max_hosts", lambda v: ResilientTransport(max_hosts=v)),
]


def _ids(table: list[tuple[str, Factory]]) -> list[str]:
    return [f"{i}-{param}" for i, (param, _) in enumerate(table)]


@pytest.mark.parametrize("bad", [HUGE_INT, -HUGE_INT, math.nan, math.inf, -math.inf], ids=repr)
@pytest.mark.parametrize(("param", "build"), DURATIONS, ids=_ids(DURATIONS))
def test_a_number_that_is_no_finite_float_is_a_value_error(
    param: str, build: Factory, bad: float
) -> None:
    with pytest.raises(ValueError, match=param):
        build(bad)


@pytest.mark.parametrize("bad", ["1", True, b"1", [1]], ids=repr)
@pytest.mark.parametrize(("param", "build"), DURATIONS, ids=_ids(DURATIONS))
def test_a_number_of_the_wrong_type_is_a_type_error(param: str, build: Factory, bad: Any) -> None:
    with pytest.raises(TypeError, match=param):
        build(bad)


@pytest.mark.parametrize("bad", [-HUGE_INT, -1], ids=repr)
@pytest.mark.parametrize(("param", "build"), COUNTS, ids=_ids(COUNTS))
def test_a_count_below_its_range_is_a_value_error(param: str, build: Factory, bad: int) -> None:
    with pytest.raises(ValueError, match=param):
        build(bad)


@pytest.mark.parametrize("bad", [1.0, "1", True, math.nan], ids=repr)
@pytest.mark.parametrize(("param", "build"), COUNTS, ids=_ids(COUNTS))
def test_a_count_that_is_no_int_is_a_type_error(param: str, build: Factory, bad: Any) -> None:
    with pytest.raises(TypeError, match=param):
        build(bad)


def test_an_error_message_shows_a_huge_integer_briefly() -> None:
    with pytest.raises(ValueError, match="an integer of 1329 bits") as info:
        sw.Timeout(HUGE_INT)
    assert len(str(info.value)) < 100
    with pytest.raises(ValueError, match="an integer of 1329 bits"):
        sw.Bulkhead(-HUGE_INT)


# -- upper bounds: memory, and what a store can keep ------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: sw.CountWindow(10**12), "size must be at most 100,000,000"),
        (lambda: sw.CircuitBreaker(window=10**12), "window must be at most 100,000,000"),
        (lambda: sw.CircuitBreaker(window=HUGE_INT), "window must be at most"),
        (lambda: sw.TimeWindow(10.0, buckets=10**12), "buckets must be at most 1,000,000"),
        (lambda: sw.TimeWindow(1e-300), "seconds / buckets must be at least 1e-06"),
        (lambda: sw.TimeWindow(1e-6, buckets=10), "seconds / buckets must be at least"),
    ],
)
def test_a_window_that_would_not_fit_in_memory_is_refused(
    build: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_the_largest_windows_allowed_are_built() -> None:
    sw.CircuitBreaker(window=100_000_000)
    sw.CircuitBreaker(window=sw.TimeWindow(1.0, buckets=1_000_000))


@pytest.mark.parametrize(
    ("build", "param"),
    [
        (lambda: sw.Idempotency(key="k", ttl=1e306, store=_redis()), "ttl"),
        (lambda: sw.Idempotency(key="k", lease=1e16, store=_redis()), "lease"),
        (lambda: IdempotencyMiddleware(_app, ttl=1e306, store=_redis()), "ttl"),
        (lambda: IdempotencyMiddleware(_app, lease=1e16, store=_redis()), "lease"),
        (lambda: sw.CircuitBreaker(open_for=1e16, store=_redis()), "open_for"),
        (lambda: RedisStore(redis.asyncio.Redis(), trial_lease=1e16), "trial_lease"),
    ],
)
def test_a_duration_beyond_what_redis_can_keep_is_refused_when_built(
    build: Callable[[], object], param: str
) -> None:
    with pytest.raises(ValueError, match=rf"{param} must be at most 1e\+12 seconds"):
        build()


def test_the_longest_durations_redis_can_keep_are_accepted() -> None:
    store = _redis()
    assert store.max_duration == 1e12
    assert sw.Idempotency(key="k", ttl=1e12, lease=1e12, store=store).ttl == 1e12
    assert sw.CircuitBreaker(name="x", open_for=1e12, store=store).open_for == 1e12


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
async def test_the_store_checks_durations_before_it_sends_anything() -> None:
    # Nothing listens at this address: a ValueError, not a StoreUnavailable,
    # proves the check comes first.
    client = redis_support.client(redis_support.closed_port_url())
    try:
        store = RedisStore(client, timeout=0.2)
        with pytest.raises(ValueError, match="lease must be between 0 and 1e"):
            await store.claim("scope", "k", fingerprint=None, lease=1e16)
        lease = sw.Lease("scope", "k", None, "token", 30.0)
        with pytest.raises(ValueError, match="ttl must be between 0 and 1e"):
            await store.complete(lease, "value", ttl=1e306)
        await store.aclose()
    finally:
        await client.aclose()


async def test_huge_but_valid_values_work() -> None:
    big = 1e306

    async def ok() -> str:
        return "ok"

    async def boom() -> str:
        raise LookupError

    assert await sw.Timeout(big)(ok)() == "ok"
    with sw.deadline(big):
        assert await ok() == "ok"
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 2:
            raise LookupError
        return "ok"

    budget = sw.RetryBudget(ratio=big, min_per_second=big, window=big)
    backoff = sw.Backoff(initial=0.001, multiplier=big, maximum=big, jitter="none")
    retry = sw.Retry(attempts=HUGE_INT, timeout=big, backoff=backoff, budget=budget)
    assert await retry(flaky)() == "ok"
    assert backoff.base(3) == backoff.base(10**6) == big  # no overflow however far
    bulkhead = sw.Bulkhead(HUGE_INT, max_queued=HUGE_INT, max_wait=big)
    assert await bulkhead(ok)() == "ok"
    breaker = sw.CircuitBreaker(
        open_for=big,
        consecutive_failures=1,
        failure_rate=0.5,  # minimum_calls counts only with a rate trigger on
        window=sw.TimeWindow(big),
        minimum_calls=HUGE_INT,
        half_open_calls=HUGE_INT,
    )
    with pytest.raises(LookupError):
        await breaker(boom)()
    with pytest.raises(sw.CircuitOpenError) as rejected:
        await breaker(ok)()
    assert rejected.value.retry_after == pytest.approx(big)
    once = sw.Idempotency(key="k", ttl=big, lease=big, max_entries=HUGE_INT)

    async def echo(k: str) -> str:
        return k

    assert await once(echo)("a") == await once(echo)("a") == "a"
