"""When Redis is down, hung or comes back: bounded calls, breakers alone, resync.

Never the shared server: a private ``redis-server`` that the tests kill and
restart, a port where nothing listens, or a socket that never answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

import stalwart as sw
from stalwart import CircuitState
from stalwart.redis import RedisStore

from . import redis_support
from .redis_support import Boom, breaker, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


async def ok() -> str:
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


async def eventually(check: Callable[[], bool], within: float) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > within:
            raise AssertionError(f"still not true after {within}s")
        await asyncio.sleep(0.002)
    return loop.time() - start


def tasks_left() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("stalwart.redis")}


class Clock:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()

    def __call__(self) -> float:
        return self.loop.time() - self.start


runs: list[str] = []


async def charge(payment: str) -> str:
    runs.append(payment)
    return f"charged {payment}"


# -- idempotency -------------------------------------------------------------------


async def test_with_nothing_listening_a_claim_fails_fast_and_clearly() -> None:
    client = redis_support.client(redis_support.closed_port_url())
    try:
        store = RedisStore(client, timeout=0.2, name="orders-redis")
        guarded = sw.Idempotency(key="payment", store=store)(charge)
        runs.clear()
        clock = Clock()
        with pytest.raises(sw.StoreUnavailable, match="'orders-redis' is unavailable") as info:
            await guarded("p-1")
        assert clock() < 0.5
        assert info.value.policy == "orders-redis"
        assert runs == []  # the call did not run
        # Refused: the claim never left the process, so there is nothing to give back.
        assert not store._pending
        assert not tasks_left()
    finally:
        await client.aclose()


async def test_a_hung_redis_holds_a_call_no_longer_than_the_store_timeout() -> None:
    with redis_support.silent_server() as url:
        client = redis_support.client(url)
        try:
            store = RedisStore(client, timeout=0.15)
            guarded = sw.Idempotency(key="payment", store=store)(charge)
            clock = Clock()
            with pytest.raises(sw.StoreUnavailable, match=r"no answer within 0\.15s"):
                await guarded("p-1")
            assert 0.15 <= clock() < 0.5
            # The claim may run whenever the server answers: it is being given back...
            assert len(store._pending) == 1
            assert tasks_left()
            clock = Clock()
            await store.aclose()  # ...for at most the store's timeout more
            assert clock() < 0.15 + 0.5
            assert not tasks_left()
        finally:
            await client.aclose()


async def test_a_hung_redis_holds_a_call_no_longer_than_its_deadline() -> None:
    with redis_support.silent_server() as url:
        client = redis_support.client(url)
        try:
            store = RedisStore(client, timeout=30.0)
            guarded = sw.Idempotency(key="payment", store=store)(charge)
            clock = Clock()
            with pytest.raises(sw.DeadlineExceeded), sw.deadline(0.1):
                await guarded("p-1")
            assert clock() < 0.4
        finally:
            await client.aclose()


async def test_bypass_runs_calls_without_deduplication_while_redis_is_down(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = redis_support.client(redis_support.closed_port_url())
    try:
        store = RedisStore(client, timeout=0.2, on_unavailable="bypass")
        guarded = sw.Idempotency(key="payment", store=store)(charge)
        runs.clear()
        with caplog.at_level(logging.INFO, logger="stalwart"):
            assert await guarded("p-1") == "charged p-1"
            assert await guarded("p-1") == "charged p-1"
        assert runs == ["p-1", "p-1"]  # the price of availability: no de-duplication
        # The outage is logged once, by the store; not once per call bypassed.
        assert [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()] == []
        assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    finally:
        await client.aclose()


async def test_a_waiter_fails_fast_when_redis_dies_under_it() -> None:
    with private_redis() as server:
        client = redis_support.client(server.url)
        try:
            store = RedisStore(client, timeout=0.2)
            scope = f"idempotency:{__name__}.charge"
            assert isinstance(
                await store.claim(scope, "p-1", fingerprint=None, lease=0.3), sw.Lease
            )
            guarded = sw.Idempotency(key="payment", store=store, lease=0.3)(charge)
            waiter = asyncio.create_task(guarded("p-1"))
            # It waits (subscribed to the key's channel) when Redis dies.
            await redis_support.until(lambda: bool(store._watches))
            server.stop()
            clock = Clock()
            with pytest.raises(sw.StoreUnavailable):
                await waiter
            assert clock() < 5.0  # it does not hang
            await store.aclose()
        finally:
            await client.aclose()


# -- breakers -------------------------------------------------------------------------


async def test_with_redis_down_a_breaker_opens_half_opens_and_closes_alone() -> None:
    with private_redis() as server:
        client = redis_support.client(server.url)
        try:
            async with RedisStore(client, timeout=0.1) as store:
                cb = breaker(store, open_for=0.1)
                await store.sync()
                server.stop()
                assert await attempt(cb(boom)) == "boom"  # its own error, not Redis's
                assert cb.state is OPEN
                assert await attempt(cb(ok)) == "rejected"
                await asyncio.sleep(0.1)
                assert cb.state is HALF_OPEN
                assert await attempt(cb(ok)) == "ok"  # a trial under its own limit
                assert cb.state is CLOSED
        finally:
            await client.aclose()


# The two tests below give their stores a timeout of a second: Redis down
# fails at once (connection refused), and Redis back must be heard. With
# 0.1 s, on a two-core machine at load average 4, the transition written
# after the restart timed out once; its breaker then went on alone and
# adopted the fleet's state, as designed, and the other never opened.


async def test_breakers_fall_back_in_line_when_redis_comes_back() -> None:
    with private_redis() as server:
        one, two = redis_support.client(server.url), redis_support.client(server.url)
        try:
            async with (
                RedisStore(one, timeout=1.0, reconcile_interval=0.1) as first,
                RedisStore(two, timeout=1.0, reconcile_interval=0.1) as second,
            ):
                a, b = breaker(first, open_for=30.0), breaker(second, open_for=30.0)
                await first.sync()
                await second.sync()
                server.stop()
                await asyncio.sleep(0.3)  # both followers notice, and retry
                server.start()  # an empty Redis: no records, no scripts
                assert await attempt(b(boom)) == "boom"
                await eventually(lambda: a.state is OPEN, within=15.0)
                assert await attempt(a(ok)) == "rejected"
            assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("stalwart")]
        finally:
            await one.aclose()
            await two.aclose()


async def test_a_breaker_that_went_on_alone_adopts_the_fleets_state() -> None:
    with private_redis() as server:
        one, two = redis_support.client(server.url), redis_support.client(server.url)
        try:
            async with (
                RedisStore(one, timeout=1.0, reconcile_interval=0.1) as first,
                RedisStore(two, timeout=1.0, reconcile_interval=0.1) as second,
            ):
                a, b = breaker(first, open_for=30.0), breaker(second, open_for=30.0)
                await first.sync()
                await second.sync()
                server.stop()
                assert await attempt(a(boom)) == "boom"
                assert (a.state, b.state) == (OPEN, CLOSED)  # a alone knows
                server.start()
                b.force_open()  # meanwhile the fleet moves on
                b.reset()
                await eventually(lambda: a.state is CLOSED, within=15.0)
                assert await attempt(a(ok)) == "ok"
        finally:
            await one.aclose()
            await two.aclose()


async def test_a_caller_cancelled_while_its_result_is_stored_goes_at_once() -> None:
    # The store finishes a cancelled write in the background, so the policy
    # does not shield it: the caller is not held for the store's timeout.
    with private_redis() as server:
        client = redis_support.client(server.url)
        try:
            async with RedisStore(client, timeout=5.0) as store:
                ran = asyncio.Event()
                charged: list[str] = []

                async def charge_then_stall(payment: str) -> str:
                    charged.append(payment)
                    if not ran.is_set():
                        ran.set()
                        server.pause()  # Redis hangs before the result is stored
                    return f"charged {payment}"

                guarded = sw.Idempotency(key="payment", store=store)(charge_then_stall)
                task = asyncio.create_task(guarded("p-9"))
                await ran.wait()
                await asyncio.sleep(0.1)  # the result is on its way to the hung Redis
                clock = Clock()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert clock() < 1.0  # not the store's 5 s
                server.resume()
                # Stored from the background once Redis answers again: replayed.
                await redis_support.until(lambda: not store._pending, within=10.0)
                assert await guarded("p-9") == "charged p-9"
                assert charged == ["p-9"]
        finally:
            server.resume()
            await client.aclose()


async def test_a_caller_cancelled_while_its_call_runs_goes_at_once_and_frees_the_key() -> None:
    with private_redis() as server:
        client = redis_support.client(server.url)
        try:
            async with RedisStore(client, timeout=5.0) as store:
                started = asyncio.Event()
                charged: list[str] = []

                async def slow_charge(payment: str) -> str:
                    charged.append(payment)
                    if not started.is_set():
                        started.set()
                        server.pause()  # Redis hangs while the call runs
                        await asyncio.sleep(30)
                    return f"charged {payment}"

                guarded = sw.Idempotency(key="payment", store=store)(slow_charge)
                task = asyncio.create_task(guarded("p-10"))
                await started.wait()
                clock = Clock()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert clock() < 1.0  # not the store's 5 s, freeing the key
                server.resume()
                await redis_support.until(lambda: not store._pending, within=10.0)
                assert await guarded("p-10") == "charged p-10"  # the key was freed
                assert charged == ["p-10", "p-10"]
        finally:
            server.resume()
            await client.aclose()
