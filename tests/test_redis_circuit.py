"""Circuit breakers sharing their state through Redis, in one process.

Two stores on the same prefix, each with its own client and pub/sub
connection, stand for two replicas (``test_redis_processes.py`` runs real
ones). Real time: open periods of a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import stalwart as sw
from stalwart import CircuitState
from stalwart.redis import RedisStore
from stalwart.redis._client import _digest

from . import redis_support
from .redis_support import Boom, breaker, opened_store
from .test_redis_store import counting_client

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


@pytest.fixture
async def stores() -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two replicas' stores: same prefix, separate clients."""
    async with opened_store() as one, opened_store(prefix=one.prefix) as two:
        yield one, two


async def ok(seconds: float = 0.0) -> str:
    await asyncio.sleep(seconds)
    return "ok"


async def boom() -> str:
    raise Boom


async def attempt(fn: Callable[[], Any]) -> str:
    try:
        return str(await fn())
    except sw.CircuitOpenError:
        return "rejected"
    except Boom:
        return "boom"


async def eventually(check: Callable[[], bool], within: float = 10.0) -> float:
    """Seconds until ``check()`` holds (polling every millisecond); fails after ``within``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > within:
            raise AssertionError(f"still not true after {within}s")
        await asyncio.sleep(0.001)
    return loop.time() - start


async def test_closed_successes_and_open_rejections_never_reach_redis() -> None:
    redis_support.require_redis()
    client, sent = counting_client()
    prefix = redis_support.unique_prefix()
    try:
        async with RedisStore(client, prefix=prefix, timeout=30.0) as store:
            cb = breaker(store, minimum_calls=5, consecutive_failures=None, open_for=60.0)
            await store.sync()
            guarded = cb(ok)
            sent.clear()
            for _ in range(200):
                await guarded()
            # Nothing from the calls: the store's background task may still
            # re-read the record it just subscribed to (a loaded machine
            # delays it), and that is all it may do.
            assert sent.mine().round_trips == 0
            assert set(sent.scripts) <= {"read_circuits"}
            cb.force_open()
            await eventually(lambda: "assign" in sent.scripts, within=10.0)  # in the background
            sent.clear()
            for _ in range(200):
                assert await attempt(guarded) == "rejected"
            assert sent.mine().round_trips == 0
            assert set(sent.scripts) <= {"read_circuits"}
    finally:
        await redis_support.delete_prefix(client, prefix)
        await client.aclose()


# A push reaches the other replicas in a pub/sub hop (a millisecond or so; the
# benchmarks measure it); without it they would learn at the next re-read,
# every `reconcile_interval` (5 s by default). Sooner than this shows a push,
# however loaded the machine.
PUSHED = 2.5


async def test_a_transition_reaches_the_other_replicas_by_a_push(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    a, b = breaker(one), breaker(two)
    await one.sync()
    await two.sync()
    assert await attempt(a(boom)) == "boom"
    assert a.state is OPEN
    assert await eventually(lambda: b.state is not CLOSED) < PUSHED
    assert await attempt(b(ok)) == "rejected"


async def test_a_successful_trial_on_one_replica_closes_them_all(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    a, b = breaker(one), breaker(two)
    await two.sync()
    await attempt(a(boom))
    await eventually(lambda: b.state is OPEN)
    await asyncio.sleep(0.1)
    assert await attempt(b(ok)) == "ok"
    assert b.state is CLOSED
    assert await eventually(lambda: a.state is CLOSED) < PUSHED


async def test_force_open_and_reset_reach_every_replica(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    a, b = breaker(one), breaker(two)
    await two.sync()
    a.force_open()
    await eventually(lambda: b.state is OPEN)
    await asyncio.sleep(0.15)  # longer than open_for: forced stays open
    assert b.state is OPEN
    assert await attempt(b(ok)) == "rejected"
    b.reset()
    await eventually(lambda: a.state is CLOSED)
    assert await attempt(a(ok)) == "ok"


async def test_force_open_then_reset_are_written_in_order(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    a, b = breaker(one), breaker(two)
    await two.sync()
    a.force_open()
    a.reset()
    a.force_open()
    await eventually(lambda: b.state is OPEN)
    assert b.statistics().time_until_half_open == float("inf")

    async def written() -> bool:
        fields = await one.client.hgetall(f"{one.prefix}circuit:{_digest('dep')}")
        return (fields.get(b"state"), fields.get(b"forced")) == (b"open", b"1")

    # The last write wins: in the wrong order, the reset would be last.
    await redis_support.until(written)
    await asyncio.sleep(0.1)
    assert await written()


async def test_half_open_trials_are_limited_across_replicas(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    a, b = breaker(one, half_open_calls=1), breaker(two, half_open_calls=1)
    await attempt(a(boom))
    await eventually(lambda: b.state is OPEN)
    await asyncio.sleep(0.1)
    running, finish = asyncio.Event(), asyncio.Event()

    async def held() -> str:
        running.set()  # the trial runs: its permit is taken, fleet-wide
        await finish.wait()
        return "ok"

    trial = asyncio.create_task(a(held)())
    await running.wait()
    with pytest.raises(sw.CircuitOpenError) as rejected:
        await b(ok)()
    assert rejected.value.retry_after == 0.0
    finish.set()
    assert await trial == "ok"
    await eventually(lambda: b.state is CLOSED)


async def test_trial_successes_are_counted_across_replicas(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    a, b = breaker(one, half_open_calls=2), breaker(two, half_open_calls=2)
    await attempt(a(boom))
    await eventually(lambda: b.state is OPEN)
    await asyncio.sleep(0.1)
    assert await attempt(a(ok)) == "ok"
    assert a.state is HALF_OPEN  # one success of the two needed
    assert await attempt(b(ok)) == "ok"
    assert b.state is CLOSED
    await eventually(lambda: a.state is CLOSED)


async def test_a_trial_permit_never_given_back_lapses() -> None:
    async with opened_store(trial_lease=0.1) as store:
        record = await store.transition("dep", 0, OPEN, 0.0)
        assert await store.acquire_trial("dep", record.version, 1) is None  # then "dies"
        refused = await store.acquire_trial("dep", record.version, 1)
        assert refused is not None
        assert refused.version == record.version
        await asyncio.sleep(0.12)
        assert await store.acquire_trial("dep", record.version, 1) is None


async def test_a_replica_that_loses_a_race_adopts_the_winners_record(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    won = await one.transition("dep", 0, OPEN, 10.0)
    lost = await two.transition("dep", 0, OPEN, 10.0)
    assert lost.version == won.version
    assert lost.state is OPEN
    assert 9.0 < lost.open_for <= 10.0


async def test_a_breaker_built_later_starts_from_the_fleets_state(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    a = breaker(one, open_for=10.0)
    await attempt(a(boom))
    late = breaker(two, open_for=10.0)
    await two.sync()
    assert late.state is OPEN
    left = late.statistics().time_until_half_open
    assert left is not None
    assert 9.0 < left <= 10.0


async def test_a_lost_message_is_repaired_by_the_next_reconciliation() -> None:
    async with opened_store(reconcile_interval=0.2) as store:
        cb = breaker(store, open_for=60.0)
        await store.sync()  # the store's own first read is over
        # Another replica's write whose message never arrived: the record
        # changes in Redis, and nobody is told. Without re-reads, the
        # breaker would stay closed for ever.
        await store.client.hset(
            f"{store.prefix}circuit:{_digest('dep')}",
            mapping={"state": "open", "version": 2**40, "until": 0, "forced": "1"},
        )
        await eventually(lambda: cb.state is OPEN)


def test_breakers_built_before_the_loop_follow_once_the_store_runs() -> None:
    redis_support.require_redis()
    client = redis_support.client()
    store = RedisStore(client, prefix=redis_support.unique_prefix())
    early = breaker(store, open_for=10.0)  # at import time, say: no loop yet

    async def main() -> None:
        try:
            async with opened_store(prefix=store.prefix) as other:
                await attempt(breaker(other, open_for=10.0)(boom))  # another replica trips
                assert early.state is CLOSED  # nobody has told this one yet
                async with store:
                    await store.sync()
                    assert early.state is OPEN
        finally:
            await client.aclose()

    asyncio.run(main())


async def test_a_pubsub_connection_that_reconnects_is_followed_by_a_re_read() -> None:
    name = f"stalwart-test-{id(object())}"
    async with opened_store() as plain:
        client = redis_support.client(client_name=name)
        try:
            async with RedisStore(client, prefix=plain.prefix, reconcile_interval=60.0) as store:
                cb = breaker(store, open_for=60.0)
                await store.sync()
                await client.hset(  # a change whose message is lost...
                    f"{store.prefix}circuit:{_digest('dep')}",
                    mapping={"state": "open", "version": 2**40, "until": 0, "forced": "1"},
                )
                [ours] = [c for c in await client.client_list(_type="pubsub") if c["name"] == name]
                await client.client_kill_filter(_id=ours["id"])  # ...as the connection drops
                # Re-read on reconnection, long before the next periodic re-read (60 s).
                await eventually(lambda: cb.state is OPEN, within=20.0)
        finally:
            await client.aclose()


async def test_a_stray_message_on_a_breakers_channel_is_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with opened_store() as store:
        cb = breaker(store)
        await store.sync()
        channel = f"{store.prefix}circuit:{_digest('dep')}"
        for junk in (b"garbage", b"open 1e999 0 0", b""):
            await store.client.publish(channel, junk)
        await store.transition("dep", 0, OPEN, 10.0)  # a real one still gets through
        await eventually(lambda: cb.state is OPEN)
        assert await attempt(cb(ok)) == "rejected"
    ignored = [r for r in caplog.records if "ignored a message" in r.getMessage()]
    assert len(ignored) == 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no restart


# -- growing open periods and hung trials, fleet-wide ----------------------------------

# Openings of 0.2 s, then 0.8 s: far enough apart that a loaded machine's
# delays between a transition and the read cannot blur them (Redis counts
# milliseconds, hence the margin above).
GROWING = sw.Backoff(initial=0.2, multiplier=4.0, maximum=3.2, jitter="none")
MARGIN = 0.01


def time_left(cb: sw.CircuitBreaker) -> float:
    left = cb.statistics().time_until_half_open
    assert left is not None
    return left


async def test_the_count_of_openings_in_a_row_is_shared_across_replicas(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    a, b = breaker(one, open_for=GROWING), breaker(two, open_for=GROWING)
    await one.sync()
    await two.sync()
    assert await attempt(a(boom)) == "boom"  # the first opening: 0.2 s
    assert 0.0 < time_left(a) <= 0.2 + MARGIN
    await eventually(lambda: b.state is HALF_OPEN)
    assert await attempt(b(boom)) == "boom"  # b's trial fails: the second, 0.8 s
    assert 0.2 + MARGIN < time_left(b) <= 0.8 + MARGIN
    fields = await one.client.hgetall(f"{one.prefix}circuit:{_digest('dep')}")
    assert fields[b"openings"] == b"2"
    await eventually(lambda: a.state is HALF_OPEN)  # a learnt of it, by a push
    assert await attempt(a(ok)) == "ok"  # closed: the count starts again
    await eventually(lambda: b.state is CLOSED)
    assert await attempt(b(boom)) == "boom"
    assert 0.0 < time_left(b) <= 0.2 + MARGIN


@pytest.mark.parametrize(("written_at", "openings"), [(5, 4), (4, 1)])
async def test_openings_written_at_another_version_count_as_none(
    written_at: int, openings: int
) -> None:
    # A replica of an older stalwart changes the record without "openings":
    # the count left from before must not make the next opening longer.
    async with opened_store() as store:
        await store.client.hset(
            f"{store.prefix}circuit:{_digest('dep')}",
            mapping={
                "state": "open",
                "version": 5,
                "until": 0,
                "forced": "0",
                "openings": 3,
                "ov": written_at,
            },
        )
        record = await store.transition("dep", 5, OPEN, 1.0)
        assert (record.version > 5, record.openings) == (True, openings)


async def test_a_trial_permit_lapses_after_trial_timeout() -> None:
    async with opened_store() as store:  # its own lease: 30 s
        record = await store.transition("dep", 0, OPEN, 0.0)
        # A lease long enough that a loaded machine does not outlive it between
        # two requests, and short enough to wait for.
        assert await store.acquire_trial("dep", record.version, 1, lease=0.5) is None
        assert await store.acquire_trial("dep", record.version, 1, lease=0.5) is not None
        await asyncio.sleep(0.55)
        assert await store.acquire_trial("dep", record.version, 1, lease=0.5) is None


async def test_a_hung_trial_on_one_replica_frees_its_slot_after_trial_timeout(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    one, two = stores
    a = breaker(one, open_for=0.1, trial_timeout=1.0)
    b = breaker(two, open_for=0.1, trial_timeout=1.0)
    await two.sync()
    await attempt(a(boom))
    await eventually(lambda: b.state is HALF_OPEN)
    running = asyncio.Event()

    async def hangs() -> str:
        running.set()
        await asyncio.sleep(60.0)
        return "ok"

    hung = asyncio.create_task(a(hangs)())
    try:
        await running.wait()
        assert await attempt(b(ok)) == "rejected"  # the fleet's one permit is a's
        # a's process could have died: the permit lapses with its trial's time.
        await asyncio.sleep(1.05)
        assert await attempt(b(ok)) == "ok"
        assert b.state is CLOSED
        await eventually(lambda: a.state is CLOSED)
    finally:
        hung.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await hung
    assert a.state is CLOSED  # the hung trial's end counts for nothing
