"""Fleet-wide retry budgets and bulkheads on a real Redis: the scripts, outages and recoveries.

Stores with one prefix on one Redis stand for processes (each store is a
client of its own, each policy a member of its own); the tests with real
processes are in ``test_fleet_processes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry
from redis.crc import key_slot

import stalwart as sw
from stalwart.redis import RedisStore
from stalwart.redis._budget import BUDGET
from stalwart.redis._bulkhead import BULKHEAD
from stalwart.redis._client import _digest

from . import redis_support
from .conftest import sample
from .fleet_stores import FleetStore

pytestmark = [pytest.mark.redis, pytest.mark.realtime]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


@contextlib.asynccontextmanager
async def replicas(count: int, **options: Any) -> AsyncIterator[list[RedisStore]]:
    """``count`` stores on one prefix, each with a client of its own: a fleet's replicas."""
    redis_support.require_redis()
    prefix = redis_support.unique_prefix()
    clients = [redis_support.client() for _ in range(count)]
    stores = [RedisStore(c, prefix=prefix, **options) for c in clients]
    try:
        yield stores
    finally:
        for store in stores:
            await store.aclose()
        await redis_support.delete_prefix(clients[0], prefix)
        for c in clients:
            await c.aclose()


def telemetry() -> tuple[sw.Telemetry, CollectorRegistry]:
    registry = CollectorRegistry()
    return sw.Telemetry(registry=registry), registry


# Exchanges that reserve nothing (ratio and floor 0): the counts alone.
NOTHING: dict[str, Any] = {"member_ttl": 5.0, "ratio": 0.0, "floor": 0.0, "want": 0}
QUICK: dict[str, Any] = {**NOTHING, "member_ttl": 0.1}


async def test_an_exchange_sent_twice_counts_once() -> None:
    async with replicas(1) as (store,):
        first = await store.exchange_budget("b", "m1", 10, 2, (10, 2), window=10.0, **NOTHING)
        again = await store.exchange_budget("b", "m1", 10, 2, (10, 2), window=10.0, **NOTHING)
        more = await store.exchange_budget("b", "m1", 15, 3, (5, 1), window=10.0, **NOTHING)
        other = await store.exchange_budget("b", "m2", 4, 0, (4, 0), window=10.0, **NOTHING)
    assert (first.requests, first.retries, first.processes) == (10, 2, 1)
    assert (again.requests, again.retries) == (10, 2)
    assert (more.requests, more.retries) == (15, 3)
    assert (other.requests, other.retries, other.processes) == (19, 3, 2)


async def test_counts_leave_the_window_and_the_key_expires() -> None:
    async with replicas(1) as (store,):
        await store.exchange_budget("b", "m1", 10, 2, (10, 2), window=0.5, **QUICK)
        key = store._budget_key("b")
        assert await store.client.pttl(key) > 0
        await asyncio.sleep(0.7)
        totals = await store.exchange_budget("b", "m2", 1, 0, (1, 0), window=0.5, **QUICK)
        assert (totals.requests, totals.retries, totals.processes) == (1, 0, 1)


async def test_reservations_never_exceed_what_the_fleet_has_left() -> None:
    options: dict[str, Any] = {"window": 10.0, "member_ttl": 5.0, "ratio": 0.5, "floor": 0.0}
    async with replicas(1) as (store,):
        a = await store.exchange_budget("b", "a", 10, 0, (10, 0), want=100, **options)
        b = await store.exchange_budget("b", "b", 0, 0, (0, 0), want=100, **options)
        assert (a.granted, a.retries) == (5, 5)  # 10 requests earn 5 retries: a took them
        assert (b.granted, b.retries, b.processes) == (0, 5, 2)
        # a made 2 of its 5: the 3 left return, and each process may reserve half of them.
        again = await store.exchange_budget("b", "a", 10, 2, (0, 2), want=100, **options)
        assert (again.granted, again.retries) == (2, 4)
        other = await store.exchange_budget("b", "b", 0, 0, (0, 0), want=100, **options)
        assert (other.granted, other.retries) == (1, 5)


async def test_every_script_touches_keys_of_one_record() -> None:
    async with replicas(1) as (store,):
        budget = store._budget_key("payments")
        counts, leases, waiting = store._bulkhead_keys("payments")
        digest = _digest("payments")
        # Named by the store's one helper, as every record is: hash-tagged where
        # that matters (a cluster), so that one script's keys share a slot.
        assert budget == store._key("budget", digest)
        assert counts == store._key("bulkhead", digest)
    assert leases == counts + ":leases"
    assert waiting == counts + ":waiting"
    if "{" in counts:
        assert len({key_slot(k.encode()) for k in (counts, leases, waiting)}) == 1
    assert "payments" not in budget + counts  # no user-chosen text reaches a key
    assert (BUDGET.name, BULKHEAD.name) == ("budget", "bulkhead")


async def test_permits_are_leased_up_to_the_limit_and_lapse() -> None:
    async with replicas(1) as (store,):
        args: dict[str, Any] = {"extra": 0, "limit": 5, "far": 2, "lease": 0.3, "within": 1.0}
        a = await store.adjust_permits("h", "a", 3, **args)
        b = await store.adjust_permits("h", "b", 4, **args)
        assert (a.granted, a.held, a.total) == (3, 3, 3)
        assert (b.granted, b.held, b.total) == (2, 2, 5)
        back = await store.adjust_permits("h", "a", -1, **args)
        assert (back.granted, back.held, back.total) == (-1, 2, 4)
        await asyncio.sleep(0.4)  # neither renewed: both leases lapsed
        c = await store.adjust_permits("h", "c", 1, **args)
        assert (c.held, c.total) == (1, 1)
        await store.adjust_permits("h", "c", -1, **args)
        assert await store.client.exists(*store._bulkhead_keys("h")) == 0


async def test_a_batch_is_added_only_while_the_fleet_is_far_from_its_limit() -> None:
    async with replicas(1) as (store,):
        args: dict[str, Any] = {"limit": 10, "far": 5, "lease": 5.0, "within": 1.0}
        a = await store.adjust_permits("h", "a", 1, extra=2, **args)
        b = await store.adjust_permits("h", "b", 1, extra=2, **args)
        c = await store.adjust_permits("h", "c", 1, extra=2, **args)
        assert [a.granted, b.granted, c.granted] == [3, 1, 1]  # 3, then 6 > 5 would be near
        await store.adjust_permits("h", "a", -3, extra=0, **args)
        await store.adjust_permits("h", "b", -1, extra=0, **args)
        await store.adjust_permits("h", "c", -1, extra=0, **args)


async def test_bulkheads_of_several_replicas_keep_one_limit() -> None:
    async with replicas(3) as stores:
        bulkheads = [
            sw.Bulkhead(
                5, max_queued=None, store=s, name="fleet", telemetry=telemetry()[0], lease=5.0
            )
            for s in stores
        ]
        running = peak = 0

        async def work() -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.005)
            running -= 1

        calls = [b(work) for b in bulkheads]
        with sw.deadline(30.0):
            await asyncio.gather(*(calls[i % 3]() for i in range(150)))
        assert peak == 5
        assert all(b.in_flight == 0 and b.queued == 0 for b in bulkheads)


async def test_budgets_of_several_replicas_share_one_budget() -> None:
    async with replicas(2) as stores:
        budgets = [
            sw.RetryBudget(
                ratio=0.5,
                min_per_second=0.0,
                store=s,
                name="fleet",
                sync_interval=0.05,
                telemetry=telemetry()[0],
            )
            for s in stores
        ]
        for _ in range(20):
            budgets[0].deposit()
        budgets[1].deposit()
        await redis_support.until(lambda: budgets[1].statistics().fleet_requests == 21)
        await redis_support.until(lambda: budgets[1].statistics().processes == 2)
        taken = 0
        end = asyncio.get_running_loop().time() + 1.0
        while asyncio.get_running_loop().time() < end:
            taken += sum(budgets[1].try_withdraw() for _ in range(5))
            await asyncio.sleep(0.01)
        # 21 first attempts earn 10.5 retries; the other keeps one reserved.
        assert 8 <= taken <= 10


async def test_a_budget_with_redis_away_decides_alone_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stalwart.redis")
    tel, registry = telemetry()
    client = redis.asyncio.Redis.from_url(redis_support.closed_port_url())
    store = RedisStore(client, timeout=0.2)
    budget = sw.RetryBudget(
        ratio=0.5, min_per_second=0.0, store=store, sync_interval=0.05, telemetry=tel
    )
    for _ in range(10):
        budget.deposit()
    await asyncio.sleep(0.3)
    assert sum(budget.try_withdraw() for _ in range(10)) == 5
    assert (
        sample(registry, "stalwart_retry_budget_store_unavailable_total", policy="retry_budget")
        == 5
    )
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1
    await store.aclose()
    await client.aclose()


async def test_a_bulkhead_with_redis_away_degrades_within_the_deadline_then_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stalwart.redis")
    tel, registry = telemetry()
    with redis_support.private_redis() as server:
        client = redis_support.client(server.url)
        store = RedisStore(client, timeout=2.0)
        # No batch: every call asks Redis for its permit, and gives it back after.
        bulkhead = sw.Bulkhead(
            4, max_queued=None, store=store, batch=0, local_limit=2, lease=3.0, telemetry=tel
        )

        @bulkhead
        async def call() -> str:
            await asyncio.sleep(0.01)
            return "ran"

        assert await call() == "ran"
        await redis_support.until(lambda: bulkhead.statistics().held == 0)
        server.pause()  # SIGSTOP: Redis hangs
        try:
            start = asyncio.get_running_loop().time()
            with sw.deadline(0.8):
                assert await call() == "ran"
            waited = asyncio.get_running_loop().time() - start
            assert waited < 0.8  # half the deadline for Redis, then the local limit
            assert bulkhead.statistics().degraded
            failed = sample(
                registry, "stalwart_bulkhead_store_unavailable_total", policy="bulkhead"
            )
            assert failed is not None
            assert failed >= 1
        finally:
            server.resume()
        await redis_support.until(lambda: not bulkhead.statistics().degraded, within=15.0)
        assert await call() == "ran"
        assert bulkhead.statistics().held is not None
        logs = [r.getMessage() for r in caplog.records]
        assert sum("unreachable" in m for m in logs) == 1
        assert sum("reachable again" in m for m in logs) == 1
        await store.aclose()
        await client.aclose()


async def test_the_success_path_makes_no_round_trip_per_call() -> None:
    """The benchmark's count (``benchmarks/redis_store.py``, part 4), briefly."""
    from benchmarks import redis_store

    redis_support.require_redis()
    counted = redis.asyncio.Redis.from_url(
        redis_support.REDIS_URL, connection_class=redis_store._Counting
    )
    store = RedisStore(counted, prefix=redis_support.unique_prefix())
    try:
        rows = await redis_store.fleet_round_trips(store, seconds=0.3)
    finally:
        await store.aclose()
        await redis_support.delete_prefix(counted, store.prefix)
        await counted.aclose()
    for label, calls, trips in rows:
        assert calls >= 100, label
        assert trips <= 10, (label, calls, trips)  # a few exchanges or renewals, for all of them


@pytest.mark.parametrize("seed", range(3))
async def test_the_scripts_agree_with_the_stand_in_the_unit_tests_use(seed: int) -> None:
    """``budget.lua`` and ``bulkhead.lua`` against ``tests/fleet_stores.py``, on one sequence.

    The virtual-time tests of the policies run against the stand-in: it must
    keep the same books as Redis (long windows and leases, so that no clock
    enters the comparison).
    """
    rng = random.Random(seed)
    fake = FleetStore(latency=0.0)
    members = ["a", "b", "c"]
    async with replicas(1) as (store,):
        totals = dict.fromkeys(members, (0, 0))
        for _ in range(40):
            member = rng.choice(members)
            requests, retries = totals[member]
            requests += rng.randrange(0, 20)
            retries += rng.randrange(0, 3)
            totals[member] = (requests, retries)
            options: dict[str, Any] = {
                "window": 1000.0,
                "member_ttl": 500.0,
                "ratio": 0.3,
                "floor": 4.0,
                "want": rng.randrange(0, 8),
            }
            expected = await fake.exchange_budget("b", member, requests, retries, (0, 0), **options)
            got = await store.exchange_budget("b", member, requests, retries, (0, 0), **options)
            assert got == expected
        for _ in range(60):
            member = rng.choice(members)
            delta = rng.randrange(-4, 6)
            options = {"extra": rng.randrange(0, 3), "limit": 8, "far": 4, "lease": 500.0}
            expected_grant = await fake.adjust_permits("h", member, delta, within=1.0, **options)
            got_grant = await store.adjust_permits("h", member, delta, within=1.0, **options)
            assert got_grant == expected_grant


async def test_a_budget_rejoins_the_fleet_when_a_stalled_redis_resumes() -> None:
    tel, registry = telemetry()
    with redis_support.private_redis() as server:
        client = redis_support.client(server.url)
        store = RedisStore(client, timeout=0.3)
        budget = sw.RetryBudget(
            ratio=0.5, min_per_second=0.0, store=store, sync_interval=0.05, telemetry=tel
        )
        budget.deposit()
        await redis_support.until(lambda: budget.statistics().processes == 1)
        server.pause()  # SIGSTOP: Redis hangs
        try:
            for _ in range(10):
                budget.deposit()
            fleet = budget._fleet
            assert fleet is not None
            await redis_support.until(lambda: fleet.failing_since is not None)
            # Its own window decides (11 first attempts earn 5.5), and says so.
            assert sum(budget.try_withdraw() for _ in range(10)) == 5
            unavailable = "stalwart_retry_budget_store_unavailable_total"
            assert sample(registry, unavailable, policy="retry_budget") == 5
        finally:
            server.resume()
        # Back: what it counted meanwhile reaches Redis, and it is in the fleet again.
        await redis_support.until(lambda: budget.statistics().fleet_requests == 11, within=15.0)
        assert fleet.failing_since is None
        assert budget.statistics().fleet_retries is not None
        await store.aclose()
        await client.aclose()


async def test_a_call_that_may_not_queue_asks_redis_once() -> None:
    async with replicas(2) as (a, b):
        holder = sw.Bulkhead(1, max_queued=None, store=a, name="one", telemetry=telemetry()[0])
        other = sw.Bulkhead(1, store=b, name="one", telemetry=telemetry()[0])  # max_queued=0
        release = asyncio.Event()

        async def hold() -> None:
            await release.wait()

        async def quick() -> str:
            return "ran"

        assert await other.call(quick) == "ran"  # the fleet had room: one round trip
        await redis_support.until(lambda: other.statistics().held == 0, within=10.0)
        holding = asyncio.ensure_future(holder.call(hold))
        await redis_support.until(lambda: holder.in_flight == 1)
        with pytest.raises(sw.BulkheadFullError):
            await other.call(quick)
        release.set()
        await holding
