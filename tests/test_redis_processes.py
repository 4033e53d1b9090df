"""Several Python processes sharing one breaker name, one idempotency key, one Redis.

The module starts a few worker processes once (``python -m
tests.test_redis_processes URL``); each test gives some of them a role (the
roles are at the bottom of this file) and a prefix of its own. A worker
prints one JSON object per line, and waits for ``go`` on its stdin where the
test needs the processes to start together.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis.asyncio

import stalwart as sw
from stalwart import CircuitState
from stalwart.redis import RedisStore

from . import redis_support

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

WORKER_TIMEOUT = 15.0


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


class Worker(redis_support.WorkerProcess):
    """A Python process that runs roles (bottom of this file) on command."""

    def __init__(self) -> None:
        super().__init__(
            "tests.test_redis_processes", redis_support.REDIS_URL, timeout=WORKER_TIMEOUT
        )

    def start(self, role: str, prefix: str) -> None:
        self.send(json.dumps({"role": role, "prefix": prefix}))


class Pool:
    """Workers started once for the module (starting Python is what takes time)."""

    def __init__(self, size: int) -> None:
        self.workers = [Worker() for _ in range(size)]

    @contextmanager
    def take(self, role: str, count: int, prefix: str) -> Iterator[list[Worker]]:
        """``count`` live workers running ``role``; killed (and replaced) if the test fails."""
        self.workers = [w if w.alive else Worker() for w in self.workers]
        chosen = self.workers[:count]
        for worker in chosen:
            worker.start(role, prefix)
        try:
            yield chosen
        except BaseException:
            for worker in chosen:
                worker.kill()
            raise

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    redis_support.require_redis()
    started = Pool(3)
    yield started
    started.close()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    chosen = redis_support.unique_prefix()
    yield chosen
    client = redis_support.client()
    await redis_support.delete_prefix(client, chosen)
    await client.aclose()


class Boom(Exception):
    pass


async def boom() -> None:
    raise Boom


# A push (a pub/sub hop: a millisecond or so) reaches the other processes long
# before their next periodic re-read (`reconcile_interval`, 5 s by default),
# however loaded the machine.
PUSHED = 2.5


async def test_a_transition_reaches_every_process_by_a_push(pool: Pool, prefix: str) -> None:
    with pool.take("watch", 2, prefix) as watchers:
        for watcher in watchers:
            assert await watcher.read() == {"ready": True}
        # The store closed before its client (which the store never closes).
        async with redis_support.opened_store(prefix=prefix) as store:
            cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, open_for=30.0, store=store)
            with pytest.raises(Boom):
                await cb(boom)()
            tripped = time.time()
            seen = [(await watcher.read())["open_at"] - tripped for watcher in watchers]
    assert all(delay < PUSHED for delay in seen), seen


async def test_half_open_trials_are_limited_across_processes(pool: Pool, prefix: str) -> None:
    with pool.take("trial", 3, prefix) as trialists:
        for trialist in trialists:
            assert await trialist.read() == {"ready": True}
        async with redis_support.opened_store(prefix=prefix) as store:
            cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, open_for=0.5, store=store)
            with pytest.raises(Boom):
                await cb(boom)()
            # The trial that got the permit holds it until told to finish.
            first = [(await t.read())["trial"] for t in trialists]
            assert sorted(first) == ["rejected", "rejected", "running"]
            [runner] = [t for t, said in zip(trialists, first, strict=True) if said == "running"]
            runner.send("finish")
            assert await runner.read() == {"trial": "ran"}
            trials = await store.client.get(f"{prefix}test:trials")
            await store.client.aclose()
    assert trials == b"1"  # one trial in the whole fleet


async def test_a_duplicated_request_runs_once_across_processes(pool: Pool, prefix: str) -> None:
    with pool.take("charge", 3, prefix) as chargers:
        for charger in chargers:
            assert await charger.read() == {"ready": True}
        for charger in chargers:
            charger.send("go")
        results = [(await charger.read())["result"] for charger in chargers]
    assert len({json.dumps(r) for r in results}) == 1  # the same result everywhere
    client = redis_support.client()
    assert await client.get(f"{prefix}test:charges") == b"1"  # charged once
    await client.aclose()


async def test_a_dead_holders_lease_frees_the_key_for_another_process(
    pool: Pool, prefix: str
) -> None:
    with pool.take("hold", 1, prefix) as [holder]:
        assert await holder.read() == {"ready": True}
        holder.send("go")
        assert await holder.read() == {"running": True}
        holder.kill()  # dies holding the key: no release, no completion
    died = time.monotonic()
    with pool.take("charge", 1, prefix) as [charger]:
        assert await charger.read() == {"ready": True}
        charger.send("go")
        result = (await charger.read())["result"]
        waited = time.monotonic() - died
    assert result["by"] != "holder"
    assert waited < LEASE + 10.0  # the lease, and slack for a loaded machine


# -- the workers -------------------------------------------------------------------

# The dead holder's lease: short, so its key frees soon after it dies.
LEASE = 0.3
# A live charger's lease: long enough that renewals, however late a loaded
# machine runs them, keep the claim for the whole call. (With 0.3 s, a
# machine at load 7 let a live claim lapse and another process ran the call:
# the lease was too short for that machine, not the exactly-once rule broken.)
CHARGE_LEASE = 10.0


async def _charge(payment: str, prefix: str, client: redis.asyncio.Redis) -> dict[str, Any]:
    await client.incr(f"{prefix}test:charges")
    await asyncio.sleep(0.1)
    return {"payment": payment, "by": os.getpid()}


async def _hang(payment: str, prefix: str, client: redis.asyncio.Redis) -> dict[str, Any]:
    print(json.dumps({"running": True}), flush=True)
    await asyncio.sleep(3600)
    return {"payment": payment, "by": "holder"}


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def _wait_for_go() -> None:
    line = await asyncio.to_thread(sys.stdin.readline)
    assert line.strip() == "go"


async def _watch(store: RedisStore) -> None:
    cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, open_for=30.0, store=store)
    await store.sync()
    _say({"ready": True})
    while cb.state is CircuitState.CLOSED:  # noqa: ASYNC110 - watched as a user would
        await asyncio.sleep(0.001)
    _say({"open_at": time.time()})


async def _trial(store: RedisStore) -> None:
    cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, store=store, half_open_calls=1)
    await store.sync()
    _say({"ready": True})
    while cb.state is not CircuitState.HALF_OPEN:  # noqa: ASYNC110 - as a user would
        await asyncio.sleep(0.001)

    async def probe() -> None:
        await store.client.incr(f"{store.prefix}test:trials")
        _say({"trial": "running"})
        assert await asyncio.to_thread(sys.stdin.readline) == "finish\n"

    try:
        await cb(probe)()
    except sw.CircuitOpenError:
        _say({"trial": "rejected"})
    else:
        _say({"trial": "ran"})


async def _idempotent(
    store: RedisStore, fn: Callable[..., Coroutine[Any, Any, Any]], lease: float
) -> None:
    guarded = sw.Idempotency(key="payment", store=store, lease=lease)(fn)
    _say({"ready": True})
    await _wait_for_go()
    _say({"result": await guarded("pay-1", store.prefix, store.client)})


ROLES: dict[str, Callable[[RedisStore], Awaitable[None]]] = {
    "watch": _watch,
    "trial": _trial,
    "charge": lambda store: _idempotent(store, _charge, CHARGE_LEASE),
    "hold": lambda store: _idempotent(store, _hang, LEASE),
}


async def _work(role: str, url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(url)
    try:
        async with RedisStore(client, prefix=prefix) as store:
            await ROLES[role](store)
    finally:
        await client.aclose()


def _serve(url: str) -> None:
    """Run the roles the test sends, one per line, until stdin closes."""
    _charge.__qualname__ = _hang.__qualname__ = "charge"  # one record for both
    for line in sys.stdin:
        command = json.loads(line)
        asyncio.run(_work(command["role"], url, command["prefix"]))


if __name__ == "__main__":
    _serve(sys.argv[1])
