"""Sharing a breaker's state through the store protocol.

`Server` and `SharedStore` are a test double of a remote store (what
``stalwart.redis.RedisStore`` is for real): the server holds the records;
each "process" has its own `SharedStore`, whose requests take a round trip
(they suspend) and which learns of changes by messages the test delivers
when it chooses, so races between processes can be staged exactly.
"""

from __future__ import annotations

import gc
import logging
import math
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart import CircuitState
from stalwart._circuit_store import CircuitRecord, CircuitStore, InProcessCircuitStore, Listener

from .conftest import sample

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


@dataclass
class Entry:
    state: CircuitState = CLOSED
    version: int = 0
    open_until: float = 0.0
    forced: bool = False
    openings: int = 0
    trials: list[float] = field(default_factory=list)  # when each permit lapses
    successes: int = 0


@dataclass
class Server:
    """The shared backend: records by key, and a queue of messages per subscriber."""

    entries: dict[str, Entry] = field(default_factory=dict)
    subscribers: list[SharedStore] = field(default_factory=list)
    immediate: bool = True  # deliver messages at once, or when `deliver` is called
    queued: list[tuple[SharedStore, str, CircuitRecord]] = field(default_factory=list)

    def entry(self, key: str) -> Entry:
        return self.entries.setdefault(key, Entry())

    def record(self, key: str) -> CircuitRecord:
        entry = self.entry(key)
        if entry.state is CLOSED:
            return CircuitRecord(CLOSED, entry.version)
        if entry.forced:
            return CircuitRecord(OPEN, entry.version, forced=True)
        left = entry.open_until - anyio.current_time()
        return CircuitRecord(OPEN, entry.version, left, openings=entry.openings)

    def change(self, key: str, state: CircuitState, open_until: float, forced: bool) -> None:
        entry = self.entry(key)
        entry.openings = entry.openings + 1 if state is OPEN and not forced else 0
        entry.state, entry.open_until, entry.forced = state, open_until, forced
        entry.version += 1
        entry.trials = []
        entry.successes = 0
        for store in self.subscribers:
            self.queued.append((store, key, self.record(key)))
        if self.immediate:
            self.deliver()

    def deliver(self) -> None:
        queued, self.queued = self.queued, []
        for store, key, record in queued:
            store.receive(key, record)


class SharedStore:
    """One process's client of the `Server`: a `CircuitStore`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.listeners: dict[str, list[weakref.WeakMethod[Listener]]] = {}
        self.requests = 0
        server.subscribers.append(self)

    def receive(self, key: str, record: CircuitRecord) -> None:
        for ref in self.listeners.get(key, []):
            listener = ref()
            if listener is not None:
                listener(record)

    async def round_trip(self) -> None:
        self.requests += 1
        await anyio.lowlevel.checkpoint()

    def attach(self, key: str, listener: Listener) -> CircuitRecord:
        self.listeners.setdefault(key, []).append(weakref.WeakMethod(listener))
        # A real store would answer from its cache and push the record later;
        # this one's cache is always warm.
        if self.server.entry(key).state is OPEN and not self.server.entry(key).forced:
            return CircuitRecord(OPEN, self.server.entry(key).version, 0.0)
        return self.server.record(key)

    async def transition(
        self, key: str, expected_version: int, state: CircuitState, open_for: float
    ) -> CircuitRecord:
        await self.round_trip()
        if self.server.entry(key).version == expected_version:
            self.server.change(key, state, anyio.current_time() + open_for, forced=False)
        return self.server.record(key)

    async def acquire_trial(
        self, key: str, version: int, limit: int, *, lease: float | None = None
    ) -> CircuitRecord | None:
        await self.round_trip()
        entry = self.server.entry(key)
        now = anyio.current_time()
        entry.trials = [until for until in entry.trials if until > now]
        if (
            entry.version == version
            and entry.state is OPEN
            and not entry.forced
            and now >= entry.open_until
            and len(entry.trials) < limit
        ):
            entry.trials.append(math.inf if lease is None else now + lease)
            return None
        return self.server.record(key)

    async def release_trial(self, key: str, version: int, succeeded: bool) -> int:
        await self.round_trip()
        entry = self.server.entry(key)
        if entry.version != version:
            return 0
        if entry.trials:
            entry.trials.remove(min(entry.trials))
        entry.successes += succeeded
        return entry.successes

    def assign(self, key: str, state: CircuitState) -> None:
        self.requests += 1
        forced = state is OPEN
        self.server.change(key, state, 0.0, forced)


def test_the_fake_and_the_in_process_store_follow_the_protocol() -> None:
    assert isinstance(SharedStore(Server()), CircuitStore)
    assert isinstance(InProcessCircuitStore(), CircuitStore)


class Boom(Exception):
    pass


async def ok(seconds: float = 0.0) -> str:
    await anyio.sleep(seconds)
    return "ok"


async def boom() -> str:
    raise Boom


Call = Callable[[], Coroutine[Any, Any, str]]


async def attempt(fn: Call) -> str:
    try:
        return await fn()
    except sw.CircuitOpenError:
        return "rejected"
    except Boom:
        return "boom"


def pair(
    store: CircuitStore | None = None, other: CircuitStore | None = None, **options: Any
) -> tuple[sw.CircuitBreaker, sw.CircuitBreaker]:
    """Two breakers, as if in two processes, sharing the state of "dep".

    Each reports to a registry of its own, as it would in its own process.
    """
    options = {"consecutive_failures": 1, "open_for": 10.0, "name": "dep", **options}
    return (
        sw.CircuitBreaker(store=store, **{"telemetry": _own(), **options}),
        sw.CircuitBreaker(store=other, **{"telemetry": _own(), **options}),
    )


def _own() -> sw.Telemetry:
    return sw.Telemetry(registry=CollectorRegistry())


# -- every rule, whatever the store ---------------------------------------------


def stores() -> dict[str, Callable[[], CircuitStore | None]]:
    return {
        "private": lambda: None,
        "in-process": InProcessCircuitStore,
        "shared": lambda: SharedStore(Server()),
    }


@pytest.fixture(params=list(stores()))
def store(request: pytest.FixtureRequest) -> CircuitStore | None:
    return stores()[request.param]()


async def test_a_breaker_goes_round_its_states_on_any_store(store: CircuitStore | None) -> None:
    cb = sw.CircuitBreaker(consecutive_failures=2, open_for=10.0, half_open_calls=2, store=store)
    assert [await attempt(cb(boom)) for _ in range(3)] == ["boom", "boom", "rejected"]
    assert cb.state is OPEN
    await anyio.sleep(10.0)
    assert cb.state is HALF_OPEN
    assert await attempt(cb(boom)) == "boom"  # a failed trial
    assert cb.state is OPEN
    await anyio.sleep(10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cb(ok), 1.0)
        tg.start_soon(cb(ok), 1.0)
        await anyio.sleep(0.5)
        assert await attempt(cb(ok)) == "rejected"  # both trial slots taken
    assert cb.state is CLOSED
    cb.force_open()
    await anyio.sleep(100.0)
    assert await attempt(cb(ok)) == "rejected"
    cb.reset()
    assert await attempt(cb(ok)) == "ok"


async def test_openings_in_a_row_grow_and_start_again_on_any_store(
    store: CircuitStore | None,
) -> None:
    backoff = sw.Backoff(initial=1.0, multiplier=3.0, maximum=9.0, jitter="none")
    cb = sw.CircuitBreaker(consecutive_failures=1, open_for=backoff, store=store)
    periods = []
    await attempt(cb(boom))
    for _ in range(3):
        periods.append(cb.statistics().time_until_half_open)
        await anyio.sleep(periods[-1] or 0.0)
        await attempt(cb(boom))
    await anyio.sleep(9.0)
    assert await attempt(cb(ok)) == "ok"
    await attempt(cb(boom))
    assert [*periods, cb.statistics().time_until_half_open] == [1.0, 3.0, 9.0, 1.0]


async def test_a_hung_trial_frees_its_slot_after_trial_timeout_on_any_store(
    store: CircuitStore | None,
) -> None:
    cb = sw.CircuitBreaker(consecutive_failures=1, open_for=10.0, trial_timeout=5.0, store=store)
    await attempt(cb(boom))
    await anyio.sleep(10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cb(ok), 1000.0)
        await anyio.sleep(5.0)
        assert await attempt(cb(ok)) == "rejected"  # a failure: open again, for 10 s
        await anyio.sleep(10.0)
        assert await attempt(cb(ok)) == "ok"
        tg.cancel_scope.cancel()
    assert cb.state is CLOSED


async def test_a_hung_trial_in_one_process_frees_the_shared_slot_with_its_lease() -> None:
    server = Server()
    a, b = pair(SharedStore(server), SharedStore(server), trial_timeout=5.0)
    await attempt(a(boom))
    await anyio.sleep(10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a(ok), 1000.0)  # a's process hangs, or dies
        await anyio.sleep(1.0)
        assert await attempt(b(ok)) == "rejected"
        await anyio.sleep(4.0)
        assert await attempt(b(ok)) == "ok"
        tg.cancel_scope.cancel()
    assert a.state is b.state is CLOSED


async def test_an_ignored_trial_gives_its_permit_back_on_any_store(
    store: CircuitStore | None,
) -> None:
    cb = sw.CircuitBreaker(consecutive_failures=1, open_for=1.0, ignore=Boom, store=store)
    inner = sw.CircuitBreaker(consecutive_failures=1, name="inner")
    await attempt(cb(inner(boom)))  # nothing counted
    assert cb.state is CLOSED

    async def fail() -> str:
        raise KeyError

    with pytest.raises(KeyError):
        await cb(fail)()
    await anyio.sleep(1.0)
    assert await attempt(cb(boom)) == "boom"  # ignored: the permit comes back
    assert cb.state is HALF_OPEN
    with anyio.move_on_after(0.5):
        await cb(ok)(5.0)  # cancelled: the permit comes back
    assert await attempt(cb(ok)) == "ok"
    assert cb.state is CLOSED


# -- in one process ------------------------------------------------------------------


async def test_breakers_sharing_an_in_process_store_and_a_name_open_together() -> None:
    store = InProcessCircuitStore()
    reads, writes = pair(store, store)
    other = sw.CircuitBreaker(name="other", store=store)
    await attempt(writes(boom))
    assert reads.state is OPEN
    assert await attempt(reads(ok)) == "rejected"
    assert other.state is CLOSED


async def test_an_in_process_store_holds_its_breakers_weakly() -> None:
    store = InProcessCircuitStore()
    first, _ = pair(store, store)
    ref = weakref.ref(first)
    del first
    gc.collect()
    assert ref() is None
    store.assign("dep", OPEN)  # pushes to the one left, skips the dead one
    assert "1 circuits" in repr(store)


def test_an_in_process_store_accepts_a_plain_function_as_listener() -> None:
    store = InProcessCircuitStore()
    seen: list[CircuitRecord] = []
    store.attach("dep", seen.append)
    store.assign("dep", OPEN)
    assert seen == [CircuitRecord(OPEN, 1, forced=True)]


# -- across processes --------------------------------------------------------------


async def test_a_breaker_that_trips_opens_the_others() -> None:
    server = Server()
    a, b = pair(SharedStore(server), SharedStore(server))
    await attempt(a(boom))
    assert b.state is OPEN
    assert await attempt(b(ok)) == "rejected"
    assert server.entries["dep"].version == 1


async def test_a_successful_trial_anywhere_closes_every_breaker() -> None:
    server = Server()
    a, b = pair(SharedStore(server), SharedStore(server))
    await attempt(a(boom))
    await anyio.sleep(10.0)
    assert await attempt(b(ok)) == "ok"
    assert (a.state, b.state) == (CLOSED, CLOSED)


async def test_trial_permits_are_limited_across_breakers() -> None:
    server = Server()
    a, b = pair(SharedStore(server), SharedStore(server), half_open_calls=1)
    await attempt(a(boom))
    await anyio.sleep(10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a(ok), 2.0)
        await anyio.sleep(1.0)
        with pytest.raises(sw.CircuitOpenError) as info:
            await b(ok)()
        assert info.value.retry_after == 0.0
    assert b.state is CLOSED


async def test_trial_successes_are_counted_across_breakers() -> None:
    server = Server()
    a, b = pair(SharedStore(server), SharedStore(server), half_open_calls=2)
    await attempt(a(boom))
    await anyio.sleep(10.0)
    assert await attempt(a(ok)) == "ok"
    assert a.state is HALF_OPEN
    assert await attempt(b(ok)) == "ok"
    assert (a.state, b.state) == (CLOSED, CLOSED)


async def test_a_breaker_that_loses_a_race_adopts_the_winners_state() -> None:
    server = Server(immediate=False)  # messages wait until delivered
    a, b = pair(SharedStore(server), SharedStore(server), open_for=10.0)
    await attempt(a(boom))  # a opens the circuit (version 1)...
    await anyio.sleep(2.0)
    assert b.state is CLOSED  # ...but b has not heard yet
    await attempt(b(boom))  # b's transition from version 0 is refused
    assert server.entries["dep"].version == 1
    assert b.state is OPEN
    assert b.statistics().time_until_half_open == pytest.approx(8.0)  # a's open period
    server.deliver()  # late messages of older versions change nothing
    assert b.statistics().time_until_half_open == pytest.approx(8.0)
    seen = [
        sample(
            breaker.telemetry.registry,
            "stalwart_circuit_transitions_total",
            policy="dep",
            from_state="closed",
            to_state="open",
        )
        for breaker in (a, b)
    ]
    assert seen == [1, 1]  # one transition seen by each breaker


async def test_force_open_and_reset_reach_every_breaker() -> None:
    server = Server()
    a, b = pair(SharedStore(server), SharedStore(server))
    a.force_open()
    assert b.state is OPEN
    await anyio.sleep(1000.0)
    assert await attempt(b(ok)) == "rejected"
    b.reset()
    assert a.state is CLOSED
    assert await attempt(a(ok)) == "ok"


async def test_a_breaker_created_later_starts_from_the_shared_state() -> None:
    server = Server()
    a, _ = pair(SharedStore(server), SharedStore(server))
    await attempt(a(boom))
    late = sw.CircuitBreaker(name="dep", consecutive_failures=1, store=SharedStore(server))
    assert late.state is HALF_OPEN  # its store could not tell how long is left...
    assert await attempt(late(ok)) == "rejected"  # ...but refuses a trial until the end
    await anyio.sleep(10.0)
    assert await attempt(late(ok)) == "ok"
    assert a.state is CLOSED


async def test_closed_and_open_breakers_never_call_the_store() -> None:
    server = Server()
    store = SharedStore(server)
    cb = sw.CircuitBreaker(name="dep", minimum_calls=5, store=store)
    guarded = cb(ok)
    for _ in range(100):
        await guarded()
    assert store.requests == 0
    cb.force_open()
    requests = store.requests
    for _ in range(100):
        await attempt(guarded)
    assert store.requests == requests


async def test_a_burst_of_failures_asks_the_store_to_open_once() -> None:
    store = SharedStore(Server())
    cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, store=store)
    failing = cb(boom)
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(attempt, failing)
    assert cb.state is OPEN
    assert store.requests == 1


class Down(SharedStore):
    """A store whose backend is unreachable: every request fails."""

    async def round_trip(self) -> None:
        self.requests += 1
        raise ConnectionError("store down")


async def test_with_its_store_down_a_breaker_still_opens_and_closes_alone() -> None:
    cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, open_for=1.0, store=Down(Server()))
    assert await attempt(cb(boom)) == "boom"  # the call's own error, not the store's
    assert cb.state is OPEN
    assert await attempt(cb(ok)) == "rejected"
    await anyio.sleep(1.0)
    assert await attempt(cb(ok)) == "ok"  # a trial under the local limit
    assert cb.state is CLOSED


class Refusing(SharedStore):
    """A store that answers every request with an outage, as a Redis store reports one."""

    async def round_trip(self) -> None:
        self.requests += 1
        raise sw.StoreUnavailable("redis unreachable", policy="store")


async def test_failed_requests_to_the_store_are_counted_and_a_fault_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    telemetry = sw.Telemetry(registry=registry)
    cb = sw.CircuitBreaker(
        name="dep", consecutive_failures=1, open_for=1.0, store=Down(Server()), telemetry=telemetry
    )
    with caplog.at_level(logging.ERROR, logger="stalwart"):
        await attempt(cb(boom))  # a transition the store did not take
        await anyio.sleep(1.0)
        await attempt(cb(boom))  # a trial permit, then a transition
    failed = sample(registry, "stalwart_circuit_store_unavailable_total", policy="dep")
    assert failed == 3.0
    # Not an outage the store reports (StoreUnavailable): a fault, said once.
    [logged] = [r for r in caplog.records if "decides alone" in r.getMessage()]
    assert "'dep'" in logged.getMessage()
    assert "ConnectionError" in logged.getMessage()
    assert logged.exc_info is not None


class LosesGiveBacks(SharedStore):
    """A store that takes everything but the trial permits given back."""

    async def release_trial(self, key: str, version: int, succeeded: bool) -> int:
        self.requests += 1
        raise ConnectionError("store down")


@pytest.mark.parametrize("trial", ["succeeds", "is cancelled"])
async def test_a_trial_permit_that_could_not_be_given_back_is_counted(trial: str) -> None:
    registry = CollectorRegistry()
    cb = sw.CircuitBreaker(
        name="dep",
        consecutive_failures=1,
        open_for=1.0,
        store=LosesGiveBacks(Server()),
        telemetry=sw.Telemetry(registry=registry),
    )
    await attempt(cb(boom))
    await anyio.sleep(1.0)
    if trial == "succeeds":
        assert await attempt(cb(ok)) == "ok"  # its permit is not given back...
        assert cb.state is CLOSED  # ...and its success counts all the same
    else:
        with anyio.move_on_after(0.5):
            await cb(ok)(5.0)
        assert cb.statistics().trial_calls == 0
    assert sample(registry, "stalwart_circuit_store_unavailable_total", policy="dep") == 1.0


async def test_an_outage_the_store_reports_is_counted_not_logged_by_the_breaker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    cb = sw.CircuitBreaker(
        name="dep",
        consecutive_failures=1,
        store=Refusing(Server()),
        telemetry=sw.Telemetry(registry=registry),
    )
    with caplog.at_level(logging.DEBUG, logger="stalwart"):
        await attempt(cb(boom))
    assert sample(registry, "stalwart_circuit_store_unavailable_total", policy="dep") == 1.0
    assert not [r for r in caplog.records if "decides alone" in r.getMessage()]


async def test_with_its_store_down_a_cancelled_trial_still_gives_its_slot_back() -> None:
    cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, open_for=1.0, store=Down(Server()))
    await attempt(cb(boom))
    await anyio.sleep(1.0)
    with anyio.move_on_after(0.5):
        await cb(ok)(5.0)
    assert cb.statistics().trial_calls == 0
    assert await attempt(cb(ok)) == "ok"


async def test_a_breaker_that_went_on_alone_comes_back_to_its_store() -> None:
    server = Server()
    flaky = SharedStore(server)
    cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, open_for=1.0, store=flaky)
    healthy = flaky.round_trip
    flaky.round_trip = Down.round_trip.__get__(flaky)  # type: ignore[method-assign]
    await attempt(cb(boom))
    assert cb.state is OPEN  # alone: the store never heard of it
    flaky.round_trip = healthy  # type: ignore[method-assign]
    assert server.entries["dep"].version == 0
    await anyio.sleep(1.0)
    assert await attempt(cb(ok)) == "rejected"  # the store refuses the trial...
    assert cb.state is CLOSED  # ...and its answer brings the breaker back to it
    assert await attempt(cb(ok)) == "ok"
