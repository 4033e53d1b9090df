"""`RedisStore.aclose` on a real Redis: every task stopped, every permit given back, no leak.

The tasks are the store's own (the follower, the give-backs) and those of the
fleet-wide policies using it (a `Bulkhead`'s keeper, a `RetryBudget`'s
exchanges); the connections are the client's.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from typing import Any

import pytest
import redis.asyncio

import stalwart as sw
from stalwart.redis import RedisStore
from stalwart.redis._client import _digest

from . import redis_support

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

CLOSED = r"Redis store 'fleet-store' is closed"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


def stalwart_tasks() -> set[asyncio.Task[Any]]:
    """Tasks of the store and of its policies (all named ``stalwart...``)."""
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("stalwart") and not t.done()}


def checked_out(client: redis.asyncio.Redis) -> int:
    """Connections of the client's pool in use right now."""
    return len(client.connection_pool._in_use_connections)


def telemetry() -> sw.Telemetry:
    from prometheus_client import CollectorRegistry

    return sw.Telemetry(registry=CollectorRegistry())


async def permits_held(client: redis.asyncio.Redis, store: RedisStore, name: str) -> int:
    counts = await client.hgetall(f"{store.prefix}bulkhead:{_digest(name)}")
    return sum(int(v) for v in counts.values())


def resource_warnings() -> list[warnings.WarningMessage]:
    """What the garbage collector reports of sockets and connections left open."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return [w for w in caught if issubclass(w.category, ResourceWarning)]


async def test_aclose_stops_every_fleet_task_and_gives_the_permits_back() -> None:
    redis_support.require_redis()
    client = redis_support.client()
    admin = redis_support.client()
    store = RedisStore(client, prefix=redis_support.unique_prefix(), name="fleet-store")
    try:
        bulkhead = sw.Bulkhead(4, store=store, name="pdf", telemetry=telemetry(), lease=30.0)
        budget = sw.RetryBudget(store=store, name="api", sync_interval=0.05, telemetry=telemetry())
        breaker = sw.CircuitBreaker(name="bank", store=store)
        release = asyncio.Event()

        @bulkhead
        async def render() -> str:
            await release.wait()
            return "pdf"

        calls = [asyncio.create_task(render()) for _ in range(2)]
        budget.deposit()
        await redis_support.until(lambda: budget.statistics().processes == 1)
        await store.sync()

        async def leased() -> bool:
            return await permits_held(admin, store, "pdf") >= 2

        await redis_support.until(leased)
        names = {t.get_name() for t in stalwart_tasks()}
        assert any(n.startswith("stalwart bulkhead") for n in names), names
        assert any(n.startswith("stalwart retry budget") for n in names), names
        assert any(n.startswith("stalwart.redis follower") for n in names), names

        await store.aclose()

        assert not stalwart_tasks()
        assert checked_out(client) == 0
        assert await permits_held(admin, store, "pdf") == 0
        # The calls in flight finish; the bulkhead goes on alone.
        release.set()
        assert await asyncio.gather(*calls) == ["pdf", "pdf"]
        assert breaker.state is sw.CircuitState.CLOSED
        await redis_support.until(lambda: not stalwart_tasks())
        assert checked_out(client) == 0
    finally:
        await store.aclose()
        await redis_support.delete_prefix(admin, store.prefix)
        await client.aclose()
        await admin.aclose()
    assert resource_warnings() == []


async def test_aclose_stops_a_keeper_waiting_for_redis_within_the_timeout() -> None:
    """A keeper mid-request when the store closes is cancelled; its connection goes back."""
    redis_support.require_redis()
    with redis_support.private_redis() as server:
        client = redis_support.client(server.url)
        store = RedisStore(
            client, prefix=redis_support.unique_prefix(), name="fleet-store", timeout=0.5
        )
        bulkhead = sw.Bulkhead(2, store=store, name="pdf", telemetry=telemetry(), max_queued=None)
        try:

            @bulkhead
            async def work() -> None:
                await asyncio.sleep(0.01)

            await work()  # the keeper leases a permit
            server.pause()  # Redis stops answering: the keeper's next request hangs
            try:
                blocked = [asyncio.create_task(work()) for _ in range(4)]
                await asyncio.sleep(0.05)
                started = asyncio.get_running_loop().time()
                await store.aclose()
                assert asyncio.get_running_loop().time() - started < 3.0
                assert not {
                    t for t in stalwart_tasks() if t.get_name().startswith("stalwart bulkhead")
                }
            finally:
                server.resume()
            await asyncio.gather(*blocked)  # on the local limit
            await redis_support.until(lambda: not stalwart_tasks())
            assert checked_out(client) == 0
        finally:
            await store.aclose()
            await client.aclose()
    assert resource_warnings() == []


async def test_a_closed_store_names_itself_at_every_request() -> None:
    redis_support.require_redis()
    client = redis_support.client()
    store = RedisStore(client, prefix=redis_support.unique_prefix(), name="fleet-store")
    try:
        limiter = sw.RateLimiter(10, store=store, name="rl", telemetry=telemetry())
        await asyncio.gather(store.aclose(), store.aclose())  # together: both return
        await store.aclose()  # and again
        assert store.closed
        assert "closed" in repr(store)
        with pytest.raises(RuntimeError, match=CLOSED):
            await store.claim("scope", "k", fingerprint=None, lease=5.0)
        with pytest.raises(RuntimeError, match=CLOSED):
            await store.sync()
        with pytest.raises(RuntimeError, match=CLOSED):
            async with store:
                pass

        @limiter
        async def ping() -> str:
            return "pong"

        with pytest.raises(RuntimeError, match=CLOSED):
            await ping()
        idempotent = sw.Idempotency(key="k", store=store, telemetry=telemetry())

        @idempotent
        async def charge(k: str) -> str:
            return k

        with pytest.raises(RuntimeError, match=CLOSED):
            await charge("x")
        assert not stalwart_tasks()
    finally:
        await redis_support.delete_prefix(client, store.prefix)
        await client.aclose()


async def test_a_budget_of_a_closed_store_decides_alone_and_starts_no_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with redis_support.opened_store(name="fleet-store") as store:
        budget = sw.RetryBudget(
            ratio=0.5, min_per_second=0.0, store=store, name="api", telemetry=telemetry()
        )
        await store.aclose()
        caplog.set_level(logging.DEBUG)
        for _ in range(10):
            budget.deposit()
        assert not stalwart_tasks()
        assert sum(budget.try_withdraw() for _ in range(10)) == 5  # ratio 0.5 of its own 10
        assert not stalwart_tasks()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
