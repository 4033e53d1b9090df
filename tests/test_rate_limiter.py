"""RateLimiter: the GCRA bound on calls started, FIFO waits, max_wait and the deadline, keys.

Every test runs in virtual time on asyncio and on trio. Rates and periods are
powers of two, so the turns (multiples of ``per / rate``) are exact floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart._gcra import GRANTED, Gcra
from stalwart.events import CallRejected, Event
from stalwart.testing import VirtualClockEventLoop

from .conftest import Spans, jump, sample


def now() -> float:
    return anyio.current_time()


async def settle() -> None:
    """Let every runnable task run until it blocks (virtual time: an instant)."""
    await anyio.sleep(0.0001)


class Recorder:
    """A function to limit: records when each call started, by its tag."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, float]] = []

    async def __call__(self, tag: Any = None) -> Any:
        self.started.append((tag, now()))
        return tag

    @property
    def tags(self) -> list[Any]:
        return [tag for tag, _ in self.started]

    @property
    def times(self) -> list[float]:
        return [at for _, at in self.started]


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((0,), {}, ValueError, "rate must be > 0"),
        ((-1,), {}, ValueError, "rate must be >= 0"),
        ((math.nan,), {}, ValueError, "rate must be finite"),
        ((math.inf,), {}, ValueError, "rate must be finite"),
        ((True,), {}, TypeError, "rate must be a number"),
        (("10",), {}, TypeError, "rate must be a number"),
        ((1,), {"per": 0}, ValueError, "per must be > 0"),
        ((1,), {"per": -1.0}, ValueError, "per must be > 0"),
        ((1,), {"per": math.inf}, ValueError, "per must be finite"),
        ((1,), {"burst": 0}, ValueError, "burst must be >= 1"),
        ((1,), {"burst": 2.0}, TypeError, "burst must be an int"),
        ((1,), {"max_wait": -0.5}, ValueError, "max_wait must be >= 0"),
        ((1,), {"max_wait": math.nan}, ValueError, "max_wait must be finite"),
        ((1,), {"max_wait": "1"}, TypeError, "max_wait must be a number of seconds"),
        ((1,), {"max_keys": 0}, ValueError, "max_keys must be >= 1"),
        ((1,), {"max_keys": 1.5}, TypeError, "max_keys must be an int"),
        ((1,), {"key": 3}, TypeError, "key must be a parameter name"),
        ((1,), {"key": "not a name"}, ValueError, "key must be the name of a parameter"),
        ((1,), {"store": object()}, TypeError, "store must be"),
        ((1,), {"name": ""}, ValueError, "name must be 1-200 printable characters"),
    ],
)
def test_bad_options_are_refused_naming_the_parameter(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        sw.RateLimiter(*args, **kwargs)


def test_used_bare_as_a_decorator_it_says_how_to_call_it() -> None:
    async def fetch() -> None: ...

    with pytest.raises(TypeError, match=r"write @sw.RateLimiter\(rate\)"):
        sw.RateLimiter(fetch)  # type: ignore[arg-type]


def test_a_key_that_names_no_parameter_is_refused_at_decoration() -> None:
    limiter = sw.RateLimiter(1, key="user")

    async def fetch(account: str) -> None: ...

    with pytest.raises(ValueError, match="key='user' is not a parameter of"):
        limiter(fetch)


@pytest.mark.parametrize(
    ("rate", "burst", "expected"), [(10, None, 10), (2.5, None, 2), (0.5, None, 1), (10, 3, 3)]
)
def test_burst_defaults_to_the_rate_and_is_at_least_one(
    rate: float, burst: int | None, expected: int
) -> None:
    limiter = sw.RateLimiter(rate, burst=burst)
    assert limiter.burst == expected
    assert limiter.rate == rate


def test_the_options_are_readable_and_shown() -> None:
    limiter = sw.RateLimiter(100, per=60, max_wait=None, key="user", max_keys=5, name="partner")
    assert (limiter.per, limiter.max_wait, limiter.max_keys) == (60.0, None, 5)
    assert repr(limiter) == (
        "RateLimiter(100, per=60, burst=100, max_wait=None, key='user', name='partner')"
    )
    assert sw.RateLimiter(1).max_wait == 0.0


# -- the limit -----------------------------------------------------------------------------


async def test_a_full_bucket_lets_a_burst_through_then_one_call_per_interval() -> None:
    record = Recorder()
    limited = sw.RateLimiter(4, burst=2, max_wait=None)(record)
    start = now()
    for i in range(5):
        await limited(i)
    assert [t - start for t in record.times] == [0.0, 0.0, 0.25, 0.5, 0.75]


async def test_without_max_wait_a_call_over_the_limit_is_refused_at_once() -> None:
    record = Recorder()
    limited = sw.RateLimiter(2, name="search")(record)
    await limited(1)
    await limited(2)
    start = now()
    with pytest.raises(sw.RateLimitExceeded) as info:
        await limited(3)
    assert now() == start
    assert info.value.policy == "search"
    assert info.value.retry_after == 0.5
    assert "'search' is at its limit of 2 calls a second" in str(info.value)
    assert record.tags == [1, 2]


async def test_a_limit_of_one_call_is_said_in_the_singular() -> None:
    limited = sw.RateLimiter(1, per=10.0, name="export")(Recorder())
    await limited()
    with pytest.raises(sw.RateLimitExceeded) as info:
        await limited()
    assert "'export' is at its limit of 1 call per 10s (bursts of 1)" in str(info.value)


async def test_retry_after_is_when_a_permit_is_free() -> None:
    limited = sw.RateLimiter(4, burst=1)(Recorder())
    await limited()
    jump(0.125)
    with pytest.raises(sw.RateLimitExceeded) as info:
        await limited()
    retry_after = info.value.retry_after
    assert retry_after == 0.125
    jump(retry_after - 1 / 1024)
    with pytest.raises(sw.RateLimitExceeded):
        await limited()  # a moment before, it is not
    jump(1 / 1024)
    await limited()  # exactly then, it is let through


async def test_the_bucket_refills_while_idle_up_to_the_burst() -> None:
    limiter = sw.RateLimiter(2, burst=3)
    limited = limiter(Recorder())
    for _ in range(3):
        await limited()
    assert limiter.available() == 0
    jump(1.0)
    assert limiter.available() == 2
    jump(100.0)
    assert limiter.available() == 3


async def test_a_fractional_rate_and_a_long_period() -> None:
    record = Recorder()
    limited = sw.RateLimiter(0.5, per=4, max_wait=None)(record)  # one call every 8 s
    start = now()
    for _ in range(3):
        await limited()
    assert [t - start for t in record.times] == [0.0, 8.0, 16.0]


async def test_the_permit_is_used_whatever_the_call_does() -> None:
    limiter = sw.RateLimiter(1)

    @limiter
    async def failing() -> None:
        raise ValueError("downstream")

    with pytest.raises(ValueError, match="downstream"):
        await failing()
    with pytest.raises(sw.RateLimitExceeded):
        await failing()


async def test_functions_decorated_by_one_limiter_share_its_limit() -> None:
    limiter = sw.RateLimiter(1)
    first, second = limiter(Recorder()), limiter(Recorder())
    await first()
    with pytest.raises(sw.RateLimitExceeded):
        await second()


async def test_call_applies_the_limit_too() -> None:
    limiter = sw.RateLimiter(1)
    record = Recorder()
    assert await limiter.call(record, "a") == "a"
    with pytest.raises(sw.RateLimitExceeded):
        await limiter.call(record, "b")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_limiter_that_outlives_its_event_loop_starts_afresh_on_a_new_clock(
    backend: str,
) -> None:
    limited = sw.RateLimiter(1, per=3600, name=f"outlives {backend}")(Recorder())
    options: dict[str, Any] = (
        {"loop_factory": VirtualClockEventLoop}
        if backend == "asyncio"
        else {"clock": trio.testing.MockClock(autojump_threshold=0)}
    )

    async def late() -> None:
        await anyio.sleep(100)
        await limited()  # on this clock: the next permit is an hour away

    async def early() -> None:
        await limited()  # a new clock, back at 0: a new limit

    anyio.run(late, backend=backend, backend_options=options)
    options = {**options, "clock": trio.testing.MockClock()} if backend == "trio" else options
    anyio.run(early, backend=backend, backend_options=options)


def test_permits_granted_on_a_plain_loop_count_when_another_clock_comes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The wrapper grants on time.monotonic() without telling the bucket what
    # time it saw; a new clock that reads earlier than the last grant is a
    # new clock all the same (the bucket starts full), however long the
    # plain loop ran.
    from stalwart import _rate_limiter

    record = Recorder()
    limited = sw.RateLimiter(1, per=3600, name="plain then mock")(record)
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def on_plain_loop() -> None:
        await limited()  # finds the loop: the bucket sees this time
        started = _rate_limiter._monotonic()
        monkeypatch.setattr(_rate_limiter, "_monotonic", lambda: started + 1e6)
        await limited()  # granted inline, a million seconds on
        clock.jump(started + 5e5)  # the next clock reads between the two

    anyio.run(on_plain_loop, backend="asyncio")
    anyio.run(limited, backend="trio", backend_options={"clock": clock})
    assert len(record.tags) == 3


# -- waiting: FIFO, max_wait, the deadline ------------------------------------------------


async def test_waiters_start_in_fifo_order_one_interval_apart() -> None:
    record = Recorder()
    limited = sw.RateLimiter(4, burst=1, max_wait=10)(record)
    start = now()
    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(limited, i)
            await settle()  # each arrives after the one before
    assert record.tags == list(range(6))
    assert [round(t - start, 6) for t in record.times] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]


async def test_a_newcomer_queues_behind_the_waiters() -> None:
    record = Recorder()
    limited = sw.RateLimiter(1, burst=1, max_wait=10)(record)
    start = now()
    await limited("first")
    async with anyio.create_task_group() as tg:
        tg.start_soon(limited, "waiting")
        await settle()
        jump(0.5)
        tg.start_soon(limited, "newcomer")
    assert record.tags == ["first", "waiting", "newcomer"]
    assert [round(t - start, 6) for t in record.times] == [0.0, 1.0, 2.0]


async def test_an_impatient_newcomer_is_refused_while_others_wait() -> None:
    limiter = sw.RateLimiter(1, burst=1, max_wait=10)
    record = Recorder()
    patient = limiter(record)
    start = now()
    await patient("first")
    async with anyio.create_task_group() as tg:
        tg.start_soon(patient, "waiting")  # its turn is at 1
        await settle()
        jump(0.75)
        impatient = sw.Pipeline(sw.Timeout(0.5), limiter)(record)
        with pytest.raises(sw.RateLimitExceeded) as info:
            await impatient("newcomer")  # its turn would be at 2, after its deadline
        assert info.value.retry_after == pytest.approx(start + 2.0 - now())
    assert record.tags == ["first", "waiting"]


async def test_a_turn_beyond_max_wait_is_refused_at_once() -> None:
    record = Recorder()
    limited = sw.RateLimiter(2, burst=1, max_wait=1.0)(record)
    start = now()
    async with anyio.create_task_group() as tg:
        for i in range(3):  # turns at 0, 0.5 and 1.0: the last waits up to max_wait
            tg.start_soon(limited, i)
            await settle()
        refused_at = now()
        with pytest.raises(sw.RateLimitExceeded) as info:
            await limited(3)  # its turn would be at 1.5
        assert now() == refused_at
        assert info.value.retry_after == pytest.approx(start + 1.5 - refused_at)
    assert record.tags == [0, 1, 2]


@pytest.mark.parametrize("scope", ["deadline", "timeout", "retry timeout", "cancel scope"])
async def test_a_turn_after_the_deadline_is_refused_at_once(scope: str) -> None:
    limiter = sw.RateLimiter(1, burst=1, max_wait=60)
    record = Recorder()
    limited = limiter(record)
    await limited("first")
    start = now()
    with pytest.raises(sw.RateLimitExceeded) as info:
        if scope == "deadline":
            with sw.deadline(0.75):
                await limited("late")
        elif scope == "timeout":
            await sw.Timeout(0.75)(limited)("late")
        elif scope == "retry timeout":
            await sw.Retry(attempts=3, timeout=0.75)(limited)("late")
        else:
            with anyio.fail_after(0.75):
                await limited("late")
    assert now() == start  # refused without waiting in vain
    assert info.value.retry_after == 1.0
    assert record.tags == ["first"]
    await limited("next")  # the refused turn was given back: the next call gets it
    assert record.times[-1] - start == 1.0


async def test_a_turn_before_the_deadline_is_waited_for() -> None:
    record = Recorder()
    limited = sw.RateLimiter(1, burst=1, max_wait=60)(record)
    await limited("first")
    start = now()
    with sw.deadline(1.25):
        await limited("in time")
    assert record.started[-1] == ("in time", start + 1.0)


async def test_a_turn_exactly_at_the_deadline_is_refused() -> None:
    limited = sw.RateLimiter(1, burst=1, max_wait=60)(Recorder())
    await limited()
    with sw.deadline(1.0), pytest.raises(sw.RateLimitExceeded):
        await limited()


# -- cancellation --------------------------------------------------------------------------


class Waiter:
    """A call of ``limited`` in a task of ``tg``, that the test cancels (unforeseen)."""

    def __init__(self, tg: anyio.abc.TaskGroup, limited: Any, tag: Any) -> None:
        self.scope = anyio.CancelScope()
        tg.start_soon(self._run, limited, tag)

    async def _run(self, limited: Any, tag: Any) -> None:
        with self.scope:
            await limited(tag)

    def cancel(self) -> None:
        self.scope.cancel()


async def test_a_cancelled_waiter_gives_its_turn_back() -> None:
    record = Recorder()
    limiter = sw.RateLimiter(1, burst=1, max_wait=10)
    limited = limiter(record)
    start = now()
    await limited("first")
    async with anyio.create_task_group() as tg:
        waiter = Waiter(tg, limited, "cancelled")  # its turn is at 1
        await settle()
        assert limiter.waiting == 1
        jump(0.5)
        waiter.cancel()
    assert limiter.waiting == 0
    await limited("next")
    assert record.started[1:] == [("next", start + 1.0)]


async def test_a_cancelled_waiter_is_counted_as_cancelled(registry: CollectorRegistry) -> None:
    limiter = sw.RateLimiter(
        1, burst=1, max_wait=10, name="api", telemetry=sw.Telemetry(registry=registry)
    )
    limited = limiter(Recorder())
    await limited()
    async with anyio.create_task_group() as tg:
        waiter = Waiter(tg, limited, None)
        await settle()
        waiter.cancel()
    outcome = {"policy": "api", "kind": "rate_limiter", "outcome": "cancelled"}
    assert sample(registry, "stalwart_calls_total", **outcome) == 1


async def test_turns_given_back_in_any_order_are_all_returned_once_the_tail_is() -> None:
    record = Recorder()
    limiter = sw.RateLimiter(1, burst=1, max_wait=10)
    limited = limiter(record)
    start = now()
    await limited("first")
    async with anyio.create_task_group() as tg:
        waiters = []
        for i in range(3):  # turns at 1, 2 and 3
            waiters.append(Waiter(tg, limited, i))
            await settle()
        waiters[1].cancel()  # a middle turn: kept as lost capacity for now
        await settle()
        waiters[2].cancel()  # the tail: both are given back
        await settle()
    assert record.tags == ["first", 0]
    await limited("next")
    assert record.started[-1] == ("next", start + 2.0)


async def test_a_cancelled_middle_waiter_never_lets_an_extra_call_through() -> None:
    record = Recorder()
    limited = sw.RateLimiter(1, burst=1, max_wait=10)(record)
    start = now()
    await limited("first")
    async with anyio.create_task_group() as tg:
        tg.start_soon(limited, "a")  # turn at 1
        await settle()
        middle = Waiter(tg, limited, "b")  # turn at 2
        await settle()
        tg.start_soon(limited, "c")  # turn at 3
        await settle()
        middle.cancel()
        await settle()
        tg.start_soon(limited, "d")  # after c: turn at 4, not at 2
    assert record.tags == ["first", "a", "c", "d"]
    assert [t - start for t in record.times] == [0.0, 1.0, 3.0, 4.0]


# -- keys -----------------------------------------------------------------------------------


async def test_each_key_has_a_limit_of_its_own() -> None:
    limiter = sw.RateLimiter(1, key="user")

    @limiter
    async def search(user: str, query: str) -> str:
        return f"{user}:{query}"

    assert await search("ann", "a") == "ann:a"
    assert await search(user="bob", query="b") == "bob:b"
    with pytest.raises(sw.RateLimitExceeded):
        await search("ann", "again")
    jump(1.0)
    assert await search("ann", "later") == "ann:later"


async def test_a_key_can_be_read_by_a_callable_and_none_is_not_limited() -> None:
    limiter = sw.RateLimiter(1, key=lambda request: request.get("user"))
    record = Recorder()
    limited = limiter(record)
    await limited({"user": "ann"})
    for _ in range(5):
        await limited({})  # no user: an allow-list
    with pytest.raises(sw.RateLimitExceeded):
        await limited({"user": "ann"})


async def test_an_int_key_is_the_same_limit_as_its_decimal_string() -> None:
    limiter = sw.RateLimiter(1, key="user")

    @limiter
    async def fetch(user: int | str) -> None: ...

    await fetch(42)
    with pytest.raises(sw.RateLimitExceeded):
        await fetch("42")
    assert limiter.available(42) == 0
    assert limiter.available("other") == 1


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        ("", ValueError, "must be 1-255 characters, got 0"),
        ("x" * 256, ValueError, "must be 1-255 characters, got 256"),
        (2**64, ValueError, r"must be an int in \[-2\*\*63, 2\*\*63\)"),
        (1.5, TypeError, "must be a str, an int or None, not float"),
        (True, TypeError, "must be a str, an int or None, not bool"),
        (("a", 1), TypeError, "must be a str, an int or None, not tuple"),
    ],
)
async def test_a_bad_key_fails_the_call_and_is_counted_as_its_error(
    key: object, error: type[Exception], message: str, registry: CollectorRegistry
) -> None:
    limiter = sw.RateLimiter(1, key="key", name="k", telemetry=sw.Telemetry(registry=registry))
    record = Recorder()

    @limiter
    async def fetch(key: object) -> None:
        await record(key)

    with pytest.raises(error, match=message):
        await fetch(key)
    assert record.started == []
    outcome = {"policy": "k", "kind": "rate_limiter", "outcome": "error"}
    assert sample(registry, "stalwart_calls_total", **outcome) == 1


async def test_at_most_max_keys_are_kept_least_recently_used_first(
    registry: CollectorRegistry,
) -> None:
    limiter = sw.RateLimiter(
        1, key="key", max_keys=2, name="lru", telemetry=sw.Telemetry(registry=registry)
    )

    @limiter
    async def fetch(key: str) -> None: ...

    await fetch("a")
    await fetch("b")
    with pytest.raises(sw.RateLimitExceeded):
        await fetch("a")  # a is now the most recently used
    await fetch("c")  # drops b, the least recently used
    assert sample(registry, "stalwart_rate_limiter_keys", policy="lru") == 2
    with pytest.raises(sw.RateLimitExceeded):
        await fetch("a")  # a was kept, with its empty bucket
    await fetch("b")  # b came back with a full bucket


async def test_keyed_waiters_are_fifo_per_key_and_independent_across_keys() -> None:
    record = Recorder()
    limiter = sw.RateLimiter(1, burst=1, max_wait=10, key="key")

    @limiter
    async def fetch(key: str, i: int) -> None:
        await record((key, i))

    start = now()
    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(fetch, "a", i)
            await settle()
            tg.start_soon(fetch, "b", i)
            await settle()
    by_key: dict[str, list[tuple[int, float]]] = {"a": [], "b": []}
    for (key, i), at in record.started:
        by_key[key].append((i, round(at - start)))
    assert by_key == {"a": [(0, 0), (1, 1), (2, 2)], "b": [(0, 0), (1, 1), (2, 2)]}


# -- telemetry -----------------------------------------------------------------------------


async def test_refusals_and_waits_are_counted(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    limiter = sw.RateLimiter(2, burst=1, max_wait=0.6, name="api", telemetry=telemetry)
    limited = limiter(Recorder())
    assert sample(registry, "stalwart_rate_limiter_rejected_total", policy="api") == 0
    await limited()
    await limited()  # waits 0.5
    async with anyio.create_task_group() as tg:
        tg.start_soon(limited)  # waits 0.5 more
        await settle()
        assert sample(registry, "stalwart_rate_limiter_waiting", policy="api") == 1
        with pytest.raises(sw.RateLimitExceeded):
            await limited()  # a turn 1 s away: beyond max_wait
    calls = {"policy": "api", "kind": "rate_limiter"}
    assert sample(registry, "stalwart_calls_total", outcome="success", **calls) == 3
    assert sample(registry, "stalwart_calls_total", outcome="rejected", **calls) == 1
    assert sample(registry, "stalwart_rate_limiter_rejected_total", policy="api") == 1
    assert sample(registry, "stalwart_rate_limiter_waits_total", policy="api") == 2
    waited = sample(registry, "stalwart_rate_limiter_wait_seconds_total", policy="api")
    assert waited == 1.0
    assert sample(registry, "stalwart_rate_limiter_waiting", policy="api") == 0


async def test_the_tokens_available_are_a_gauge_read_at_scrape_time(
    registry: CollectorRegistry,
) -> None:
    limiter = sw.RateLimiter(2, burst=4, name="api", telemetry=sw.Telemetry(registry=registry))
    assert sample(registry, "stalwart_rate_limiter_available", policy="api") is None  # unused
    limited = limiter(Recorder())
    for _ in range(4):
        await limited()
    assert sample(registry, "stalwart_rate_limiter_available", policy="api") == 0
    jump(1.0)
    assert sample(registry, "stalwart_rate_limiter_available", policy="api") == 2


async def test_a_keyed_limiter_has_no_tokens_gauge(registry: CollectorRegistry) -> None:
    limiter = sw.RateLimiter(2, key="key", name="api", telemetry=sw.Telemetry(registry=registry))

    @limiter
    async def fetch(key: str) -> None: ...

    await fetch("a")
    assert sample(registry, "stalwart_rate_limiter_available", policy="api") is None
    assert sample(registry, "stalwart_rate_limiter_keys", policy="api") == 1


async def test_a_refusal_is_reported_as_an_event_and_on_the_span(spans: Spans) -> None:
    events: list[Event] = []
    telemetry = sw.Telemetry(
        registry=CollectorRegistry(), tracer_provider=spans.provider, listeners=[events.append]
    )
    limited = sw.RateLimiter(1, name="api", telemetry=telemetry)(Recorder())
    await limited()
    with pytest.raises(sw.RateLimitExceeded):
        await limited()
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, CallRejected)
    assert (event.policy, event.kind, event.reason, event.retry_after) == (
        "api",
        "rate_limiter",
        "rate_limited",
        1.0,
    )
    assert str(event) == "rate_limiter 'api': rejected a call (rate_limited, retry after 1s)"
    refused = [s for s in spans.named("stalwart.rate_limiter api") if not s.status.is_ok]
    assert [e.name for e in refused[0].events] == ["stalwart.rate_limiter.rejected", "exception"]


async def test_limiters_sharing_a_name_warn(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    first = sw.RateLimiter(1, name="shared", telemetry=telemetry)
    with pytest.warns(sw.StalwartWarning, match="another live rate_limiter named 'shared'"):
        second = sw.RateLimiter(1, name="shared", telemetry=telemetry)
    assert first is not second


async def test_a_default_retry_does_not_retry_a_refusal() -> None:
    attempts = Recorder()
    limited = sw.Pipeline(sw.Retry(attempts=5), sw.RateLimiter(1))(attempts)
    await limited()
    with pytest.raises(sw.RateLimitExceeded):
        await limited()
    assert len(attempts.started) == 1


# -- properties ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    at: int  # arrival time, in 1/128 s
    deadline: float | None  # the call's ambient deadline, in seconds from its arrival
    patience: float | None  # cancelled (unforeseen) after this many seconds, if still waiting


arrivals = st.lists(
    st.builds(
        Arrival,
        at=st.integers(0, 640),
        deadline=st.sampled_from([None, None, 0.25, 1.0, 2.5]),
        patience=st.sampled_from([None, None, 0.0625, 0.75, 2.5]),
    ),
    min_size=1,
    max_size=40,
)


@given(
    rate=st.sampled_from([1, 2, 4, 8]),
    per=st.sampled_from([0.5, 1.0, 2.0]),
    burst=st.integers(1, 5),
    max_wait=st.sampled_from([0.0, 0.25, 1.0, 4.0, None]),
    calls=arrivals,
)
async def test_calls_started_keep_to_the_gcra_bound_in_fifo_order(
    rate: int, per: float, burst: int, max_wait: float | None, calls: list[Arrival]
) -> None:
    """For any arrivals, deadlines and cancellations: the bound, FIFO order, max_wait.

    The bound (``stalwart._gcra``): the ``n`` calls that start between two
    of them ``d`` seconds apart number at most ``burst + d * rate / per``;
    so any window of ``per`` seconds holds at most ``burst + rate`` starts.
    """
    interval = per / rate
    limiter = sw.RateLimiter(rate, per=per, burst=burst, max_wait=max_wait)
    entered: list[int] = []
    arrived_at: dict[int, float] = {}
    started: list[tuple[int, float]] = []
    refused: list[tuple[int, float, float | None]] = []  # (call, when, retry_after)

    async def body(i: int) -> None:
        started.append((i, now()))

    limited = limiter(body)

    async def caller(i: int, arrival: Arrival) -> None:
        arrived_at[i] = now()
        try:
            if arrival.deadline is None:
                entered.append(i)
                await limited(i)
            else:
                with sw.deadline(arrival.deadline):
                    entered.append(i)
                    await limited(i)
        except sw.RateLimitExceeded as exc:
            refused.append((i, now(), exc.retry_after))

    async def impatient(i: int, arrival: Arrival, patience: float) -> None:
        async with anyio.create_task_group() as inner:
            inner.start_soon(caller, i, arrival)
            await anyio.sleep(patience)
            inner.cancel_scope.cancel()

    start = now()
    calls = sorted(calls, key=lambda arrival: arrival.at)
    async with anyio.create_task_group() as tg:
        for i, arrival in enumerate(calls):
            await anyio.sleep(start + arrival.at / 128 - now())
            if arrival.patience is None:
                tg.start_soon(caller, i, arrival)
            else:
                tg.start_soon(impatient, i, arrival, arrival.patience)
    times = [at for _, at in started]
    # The bound, between any two calls started.
    for a in range(len(times)):
        for b in range(a, len(times)):
            assert b - a + 1 <= burst + (times[b] - times[a]) / interval + 1e-9
    # FIFO: calls start in the order they took their turn.
    began = dict(started)
    assert [i for i, _ in started] == [i for i in entered if i in began]
    # Nobody waited past its max_wait or its deadline; refusals came at once, and why.
    wait = math.inf if max_wait is None else max_wait
    for i, at in started:
        deadline = calls[i].deadline
        assert at - arrived_at[i] <= wait
        assert deadline is None or at - arrived_at[i] < deadline
    for i, at, retry_after in refused:
        deadline = calls[i].deadline
        assert at == arrived_at[i]
        assert retry_after is not None
        assert retry_after > wait or (deadline is not None and retry_after >= deadline)


@given(
    rate=st.sampled_from([1, 3, 4, 10]),
    burst=st.integers(1, 4),
    gaps=st.lists(st.sampled_from([0.0, 0.0, 0.01, 0.1, 0.25, 0.3, 1.0, 7.0]), max_size=30),
)
async def test_the_wrapper_decides_as_the_gcra_bucket_does(
    rate: int, burst: int, gaps: list[float]
) -> None:
    """The wrapper's inlined fast path and `Gcra.reserve` agree, call after call."""
    limited = sw.RateLimiter(rate, burst=burst)(Recorder())
    bucket = Gcra(rate, burst=burst)
    decided: list[float | None] = []  # 0.0: let through; else the retry_after
    expected: list[float | None] = []
    for gap in gaps:
        jump(gap)
        turn = bucket.reserve(now(), 0.0)
        expected.append(0.0 if turn is GRANTED else bucket.wait_time(now()))
        try:
            await limited()
        except sw.RateLimitExceeded as exc:
            decided.append(exc.retry_after)
        else:
            decided.append(0.0)
    assert decided == expected
