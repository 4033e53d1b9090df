"""Several Python processes sharing one retry budget and one bulkhead through Redis.

The module starts three worker processes once (``python -m
tests.test_fleet_processes URL``). Each test gives them a role (at the
bottom of this file) and a prefix of its own; they say ``ready`` and, on
``go``, run together and report what they saw (what they run, and how it
is read, is shared with ``tests/test_redis_ha.py``: `tests.fleet_workers`).
The fleet's figures are checked against the documented bounds: retries
within the budget (plus its documented error), calls in flight never over
the bulkhead's limit, and a killed process's permits back after its lease.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio

import stalwart as sw
from stalwart.redis import RedisStore

from . import fleet_workers, redis_support

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

WORKERS = 3
SECONDS = 2.5
LIMIT = 6
LEASE = 1.5
WINDOW = 2.0
RATIO, FLOOR_RATE = fleet_workers.RATIO, fleet_workers.FLOOR_RATE


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


class Worker(redis_support.WorkerProcess):
    def __init__(self) -> None:
        super().__init__("tests.test_fleet_processes", redis_support.REDIS_URL, timeout=60.0)

    def start(self, role: str, prefix: str) -> None:
        self.send(json.dumps({"role": role, "prefix": prefix}))


@pytest.fixture(scope="module")
def workers() -> Iterator[list[Worker]]:
    redis_support.require_redis()
    started = [Worker() for _ in range(WORKERS)]
    yield started
    for worker in started:
        worker.kill()


@pytest.fixture
def pool(workers: list[Worker]) -> list[Worker]:
    """The module's workers, any that a test killed replaced."""
    for i, worker in enumerate(workers):
        if not worker.alive:
            worker.kill()
            workers[i] = Worker()
    return workers


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    chosen = redis_support.unique_prefix()
    yield chosen
    client = redis_support.client()
    await redis_support.delete_prefix(client, chosen)
    await client.aclose()


async def run_together(workers: list[Worker], role: str, prefix: str) -> list[dict[str, Any]]:
    for worker in workers:
        worker.start(role, prefix)
    for worker in workers:
        assert await worker.read() == {"ready": True}
    for worker in workers:
        worker.send("go")
    return [await worker.read() for worker in workers]


async def test_calls_in_flight_never_exceed_the_fleets_limit(
    pool: list[Worker], prefix: str
) -> None:
    reports = await run_together(pool, "bulkhead", prefix)
    # Each call noted when it ran, inside its permit: the most that ever
    # overlapped is the fleet's concurrency.
    peak = fleet_workers.peak(i for report in reports for i in report["intervals"])
    assert peak <= LIMIT, peak
    assert all(report["intervals"] for report in reports), reports
    assert all(report["store_unavailable"] == 0 for report in reports), reports
    assert peak == LIMIT  # and the limit was used: 3 x 8 callers for 6 permits


async def test_retries_stay_within_the_fleets_budget(pool: list[Worker], prefix: str) -> None:
    reports = await run_together(pool, "budget", prefix)
    first = sum(report["first"] for report in reports)
    retries = sum(report["retries"] for report in reports)
    seconds = max(report["seconds"] for report in reports)
    assert all(report["store_unavailable"] == 0 for report in reports), reports
    # One budget for the fleet. Retries are reserved in Redis before they
    # are made: never more than the documented bound.
    allowed = fleet_workers.budget_allowed(reports, window=WINDOW)
    assert retries <= allowed, (retries, allowed, reports)
    # Three budgets of their own would each have allowed their own floor.
    alone = RATIO * first + WORKERS * FLOOR_RATE * (WINDOW + seconds / 0.9)
    assert retries < alone * 0.6, (retries, alone)
    assert retries >= 0.5 * allowed, (retries, allowed)  # and the budget was used


async def test_a_killed_processs_permits_return_after_its_lease(
    pool: list[Worker], prefix: str
) -> None:
    holder, waiter = pool[0], pool[1]
    holder.start("hold", prefix)
    assert await holder.read() == {"holding": LIMIT}
    waiter.start("wait", prefix)
    assert await waiter.read() == {"ready": True}
    waiter.send("go")
    refused = await waiter.read()
    assert refused == {"refused": True}  # the holder has every permit
    holder.kill()
    killed = time.monotonic()
    waiter.send("go")
    admitted = await waiter.read()
    waited = time.monotonic() - killed
    # Its lease (renewed every third of it until the kill) lapsed: the
    # permits came back within one lease, plus the waiter's polling.
    assert admitted["admitted"], admitted
    assert waited <= LEASE + 1.0, waited


# -- the worker --------------------------------------------------------------------------------


async def _ready() -> None:
    print(json.dumps({"ready": True}), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    assert line.strip() == "go"


async def _bulkhead(client: redis.asyncio.Redis, store: RedisStore) -> dict[str, Any]:
    bulkhead = sw.Bulkhead(LIMIT, max_queued=None, store=store, name="fleet", lease=LEASE)
    intervals: list[tuple[float, float]] = []
    await _ready()
    end = time.monotonic() + SECONDS
    await fleet_workers.make_calls(bulkhead, intervals, done=lambda: time.monotonic() >= end)
    return {
        "intervals": intervals,
        "store_unavailable": bulkhead.metrics.store_unavailable,  # type: ignore[attr-defined]
    }


async def _budget(client: redis.asyncio.Redis, store: RedisStore) -> dict[str, Any]:
    budget = fleet_workers.retry_budget(store, window=WINDOW)
    return await fleet_workers.spend_in_an_outage(
        budget, processes=WORKERS, seconds=SECONDS, ready=_ready
    )


async def _hold(client: redis.asyncio.Redis, store: RedisStore) -> dict[str, Any]:
    bulkhead = sw.Bulkhead(LIMIT, max_queued=None, store=store, name="fleet", lease=LEASE)
    started = 0
    all_in = asyncio.Event()

    @bulkhead
    async def stuck() -> None:
        nonlocal started
        started += 1
        if started == LIMIT:
            all_in.set()
        await asyncio.Event().wait()

    tasks = [asyncio.ensure_future(stuck()) for _ in range(LIMIT)]
    await all_in.wait()
    print(json.dumps({"holding": started}), flush=True)
    await asyncio.gather(*tasks)  # until it is killed
    return {}


async def _wait(client: redis.asyncio.Redis, store: RedisStore) -> dict[str, Any]:
    impatient = sw.Bulkhead(LIMIT, max_queued=None, max_wait=0.3, store=store, name="fleet")
    patient = sw.Bulkhead(
        LIMIT, max_queued=None, max_wait=LEASE * 4, store=store, name="fleet", lease=LEASE
    )

    async def call() -> None:
        pass

    await _ready()
    try:
        await impatient.call(call)
    except sw.BulkheadFullError:
        print(json.dumps({"refused": True}), flush=True)
    else:
        print(json.dumps({"refused": False}), flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    assert line.strip() == "go"
    try:
        await patient.call(call)
    except sw.BulkheadFullError:
        return {"admitted": False}
    return {"admitted": True}


ROLES = {"bulkhead": _bulkhead, "budget": _budget, "hold": _hold, "wait": _wait}


async def _run(url: str, role: str, prefix: str) -> dict[str, Any]:
    client = redis.asyncio.Redis.from_url(url)
    store = RedisStore(client, prefix=prefix)
    try:
        return await ROLES[role](client, store)
    finally:
        await store.aclose()
        await client.aclose()


def main(url: str) -> None:
    for line in sys.stdin:
        command = json.loads(line)
        report = asyncio.run(_run(url, command["role"], command["prefix"]))
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
