"""Fault injection: a Redis of our own stalled, killed, flushed, while replicas use it.

Every test starts a private ``redis-server`` (never the shared one) and stops
it by its process in a ``finally``, whatever happened. Faults: SIGSTOP and
SIGCONT (a stall: the server keeps its connections and runs, when it
resumes, every request queued meanwhile, including those whose clients gave
up), SIGKILL and a restart (empty), FLUSHALL, and a cluster node answering
a plain client (MOVED). Replicas are worker processes (the roles at the
bottom of this file) or several stores in this process.

The guarantees, with the bounds docs/how-to/redis.md states:

* `STUCK_BOUND`: once Redis answers again, no idempotency key stays claimed
  and no trial permit stays taken by a request that gave up (timed out,
  cancelled by its deadline) longer than this;
* `RECOVERY_BOUND`: once Redis answers again, replicas whose breakers were
  open admit healthy calls again within this;
* `OVERSHOOT`: no call under an ambient deadline ends later than this past
  its deadline, whatever Redis does (completions and releases included).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
import redis.crc
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart import CircuitState, Lease
from stalwart.asgi import IdempotencyMiddleware
from stalwart.redis import RedisStore
from stalwart.redis import _scripts as _redis_scripts
from stalwart.redis._client import _digest

from . import redis_support
from .redis_support import Boom, PrivateRedis, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

STUCK_BOUND = 3.0
RECOVERY_BOUND = 3.0
# An attempt's overshoot past its deadline, at most, beyond how late its
# process's loop ran timers (measured there): 0.5 s held on a quiet machine;
# an attempt left to wait for Redis instead would overshoot by about 1.2 s.
OVERSHOOT = 1.0
# How long Redis stalls: longer than the requests' deadlines and timeouts.
STALL = 1.5
WORKER_TIMEOUT = 30.0


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


def replica_breaker(store: Any, *, open_for: float) -> sw.CircuitBreaker:
    """A replica's breaker on "dep": its own registry, as in a process of its own."""
    return sw.CircuitBreaker(
        name="dep",
        consecutive_failures=1,
        open_for=open_for,
        store=store,
        telemetry=sw.Telemetry(registry=CollectorRegistry()),
    )


def tasks_left() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("stalwart.redis")}


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until ``await check()`` holds, polled every 20 ms; fails after ``within``."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > within:
            raise AssertionError(f"still not true after {within}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def claimed_keys(
    client: redis.asyncio.Redis | redis.asyncio.RedisCluster, prefix: str
) -> list[str]:
    """The idempotency records still claimed (running) under ``prefix``."""
    names = [name async for name in client.scan_iter(match=f"{prefix}idem:*", count=1000)]
    return [
        name.decode()
        for name in names
        if b":void:" not in name and await client.hget(name, "s") == b"r"
    ]


async def load_scripts(client: redis.asyncio.Redis) -> None:
    """Have Redis know every script, as a server in service does.

    A fresh server answers the first request of each script with NOSCRIPT,
    which would make a stalled request fail when it finally runs: the
    faults here must meet the store in its steady state.
    """
    for script in vars(_redis_scripts).values():
        if isinstance(script, _redis_scripts.Script):
            await client.script_load(script.body)


@asynccontextmanager
async def stores(url: str, count: int, **options: Any) -> AsyncIterator[list[RedisStore]]:
    """``count`` replicas' stores on one prefix, each with its own client; closed after."""
    prefix = redis_support.unique_prefix()
    clients = [redis_support.client(url) for _ in range(count)]
    opened = [RedisStore(c, prefix=prefix, **options) for c in clients]
    await load_scripts(clients[0])
    try:
        yield opened
    finally:
        for store in opened:
            await store.aclose()
        for client in clients:
            await client.aclose()


# -- idempotency: nothing stays claimed by a request that gave up -----------------


async def test_a_stalled_redis_leaves_no_key_claimed_by_the_requests_that_gave_up() -> None:
    """In one process: claims cut short by the store's timeout and by deadlines."""
    with private_redis() as server:
        async with stores(server.url, 2, timeout=0.4) as (one, two):
            runs: dict[str, int] = {}

            async def charge(key: str) -> str:
                runs[key] = runs.get(key, 0) + 1
                return f"charged {key}"

            on_one = sw.Idempotency(key="key", store=one)(charge)  # lease 30 s
            on_two = sw.Idempotency(key="key", store=two)(charge)
            assert await on_one("warm-up") == "charged warm-up"  # scripts loaded, clock learnt
            keys = [f"k{i}" for i in range(20)]
            server.pause()
            try:
                started = time.monotonic()
                # Half cut short by the store's timeout (0.4 s), half by
                # their deadline (0.2 s, mid round trip).
                timed_out = await asyncio.gather(
                    *(on_one(k) for k in keys[:10]), return_exceptions=True
                )
                cancelled = []
                for key in keys[10:]:
                    with suppress(sw.DeadlineExceeded), sw.deadline(0.2):
                        cancelled.append(await on_two(key))
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, STALL - elapsed))
            finally:
                server.resume()
            resumed = time.monotonic()
            assert all(isinstance(e, sw.StoreUnavailable) for e in timed_out), timed_out
            assert cancelled == []
            assert runs == {"warm-up": 1}  # none ran: they failed before running
            # Redis ran the queued claims when it resumed; the stores gave
            # back every one whose request had given up.
            await eventually(
                lambda: _none(claimed_keys(one.client, one.prefix)), within=STUCK_BOUND
            )
            assert time.monotonic() - resumed < STUCK_BOUND
            # The clients' retries run, once each, without waiting for a lease.
            # A client retries a 503 (StoreUnavailable) as well: on a loaded
            # machine the first claims after the stall may take longer than
            # the store's 0.4 s while its connections are made again. Such a
            # claim never ran the function, so "once each" still holds.
            retrying = sw.Retry(
                attempts=10, on=sw.StoreUnavailable, backoff=sw.Backoff(initial=0.05)
            )(on_two)
            with sw.deadline(STUCK_BOUND):
                done = await asyncio.gather(*(retrying(k) for k in keys))
            assert done == [f"charged {k}" for k in keys]
            assert all(runs[k] == 1 for k in keys)
            await one.aclose()
            await two.aclose()
            assert not tasks_left()


async def _none(found: Awaitable[list[str]]) -> bool:
    return not await found


async def test_an_ambient_deadline_bounds_a_completion_and_a_release_too() -> None:
    """docs/how-to/redis.md: "an ambient deadline still cuts it shorter"."""
    with private_redis() as server:
        async with stores(server.url, 1, timeout=5.0) as [store]:
            runs: list[str] = []

            async def pay(key: str) -> str:
                runs.append(key)
                server.pause()  # Redis stalls right after the call ran...
                return "paid"

            async def refuse(key: str) -> str:
                runs.append(key)
                server.pause()  # ...or right after it failed
                raise Boom

            paying = sw.Idempotency(key="key", store=store)(pay)
            refusing = sw.Idempotency(key="key", store=store)(refuse)
            assert isinstance(await store.claim("warm-up", "k", fingerprint=None, lease=1.0), Lease)
            try:
                started = time.monotonic()
                with suppress(sw.DeadlineExceeded), sw.deadline(0.5):
                    assert await paying("p-1") == "paid"  # stored: not yet
                took = time.monotonic() - started
            finally:
                server.resume()
            assert 0.45 <= took < 0.5 + OVERSHOOT  # not the store's 5 s
            # Stored in the background once Redis answered: a replay, no new run.
            with sw.deadline(STUCK_BOUND):
                while True:
                    if await paying("p-1") == "paid" and runs == ["p-1"]:
                        break
            try:
                started = time.monotonic()
                with pytest.raises((Boom, sw.DeadlineExceeded)), sw.deadline(0.5):
                    await refusing("r-1")
                took = time.monotonic() - started
            finally:
                server.resume()
            assert 0.45 <= took < 0.5 + OVERSHOOT
            # Released in the background: the key is free again, at once.
            await eventually(lambda: _none(claimed_keys(store.client, store.prefix)), STUCK_BOUND)
            assert runs == ["p-1", "r-1"]


async def test_the_middlewares_503_retry_a_second_later_is_served() -> None:
    """docs: "answer StoreUnavailable with a 503 and a Retry-After: the client's retry,
    a second later, is safe" - and served, not refused with a 409."""
    with private_redis() as server:
        async with stores(server.url, 1, timeout=0.3) as [store]:
            runs: list[bytes] = []

            async def app(scope: Any, receive: Any, send: Any) -> None:
                body = (await receive())["body"]
                runs.append(body)
                await send({"type": "http.response.start", "status": 201, "headers": []})
                await send({"type": "http.response.body", "body": b"created " + body})

            guarded = IdempotencyMiddleware(app, store=store)
            transport = httpx.ASGITransport(app=guarded)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                headers = {"Idempotency-Key": "order-1"}
                warm = await http.post("/orders", content=b"o-0", headers={"Idempotency-Key": "0"})
                assert warm.status_code == 201
                server.pause()
                try:
                    started = time.monotonic()
                    refused = await http.post("/orders", content=b"o-1", headers=headers)
                    took = time.monotonic() - started
                    await asyncio.sleep(STALL - took)
                finally:
                    server.resume()
                assert refused.status_code == 503
                assert refused.headers["Retry-After"] == "1"
                assert took < 0.3 + OVERSHOOT
                await asyncio.sleep(1.0)  # as the Retry-After says
                retried = await http.post("/orders", content=b"o-1", headers=headers)
                assert (retried.status_code, retried.content) == (201, b"created o-1")
                replayed = await http.post("/orders", content=b"o-1", headers=headers)
                assert replayed.headers.get("Idempotent-Replayed") == "true"
            assert runs == [b"o-0", b"o-1"]


# -- breakers: no fleet refusing healthy traffic after a stall ---------------------


async def test_trial_permits_taken_by_requests_that_gave_up_are_given_back() -> None:
    """In one process: two replicas half-open while Redis stalls; their trials give up."""
    with private_redis() as server:
        async with stores(server.url, 2, timeout=1.0) as (one, two):
            a = replica_breaker(one, open_for=0.2)
            b = replica_breaker(two, open_for=0.2)
            await one.sync()
            await two.sync()
            with suppress(Boom):
                await a(_boom)()
            await eventually(lambda: _true(b.state is not CircuitState.CLOSED), within=5.0)
            server.pause()
            try:
                await asyncio.sleep(0.25)  # half-open now, on both
                for breaker in (a, b) * 3:  # trials, each cut short by its deadline
                    with suppress(sw.DeadlineExceeded), sw.deadline(0.15):
                        await breaker(_healthy)()
                await asyncio.sleep(STALL)
            finally:
                server.resume()
            resumed = time.monotonic()
            trials = f"{one.prefix}circuit:{_digest('dep')}:trials"
            await eventually(lambda: _zero(one.client.zcard(trials)), within=STUCK_BOUND)
            await eventually(lambda: _all_admit(a, b), within=RECOVERY_BOUND)
            assert time.monotonic() - resumed < RECOVERY_BOUND + STUCK_BOUND


async def _true(value: bool) -> bool:
    return value


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0


async def _admits(breaker: sw.CircuitBreaker) -> bool:
    try:
        return await breaker(_healthy)() == "ok"
    except sw.CircuitOpenError:
        return False


async def _all_admit(*breakers: sw.CircuitBreaker) -> bool:
    return all([await _admits(breaker) for breaker in breakers])


async def _healthy() -> str:
    await asyncio.sleep(0.001)
    return "ok"


async def _boom() -> str:
    raise Boom


# -- kill and restart, flush -------------------------------------------------------------


async def test_requests_in_flight_when_redis_dies_leave_nothing_behind_after_a_restart(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with private_redis() as server:
        async with stores(server.url, 1, timeout=0.3, reconcile_interval=0.2) as [store]:
            runs: list[str] = []

            async def charge(key: str) -> str:
                runs.append(key)
                return key

            guarded = sw.Idempotency(key="key", store=store)(charge)
            breaker = sw.CircuitBreaker(
                name="dep", consecutive_failures=1, open_for=0.2, store=store
            )
            await store.sync()
            assert await guarded("before") == "before"
            server.pause()
            claims = [asyncio.create_task(guarded(f"k{i}")) for i in range(10)]
            await asyncio.sleep(0.1)  # queued in the stalled server
            server.stop()  # killed, with them
            failed = await asyncio.gather(*claims, return_exceptions=True)
            assert all(isinstance(e, sw.StoreUnavailable) for e in failed)
            with suppress(Boom):
                await breaker(_boom)()  # decided alone
            assert breaker.state is CircuitState.OPEN
            server.start()  # empty: no records, no scripts
            restarted = time.monotonic()
            with sw.deadline(STUCK_BOUND):
                assert await asyncio.gather(*(guarded(f"k{i}") for i in range(10))) == [
                    f"k{i}" for i in range(10)
                ]
            await eventually(lambda: _admits(breaker), within=RECOVERY_BOUND)
            await eventually(lambda: _true(not store._pending), within=STUCK_BOUND)
            assert time.monotonic() - restarted < STUCK_BOUND + RECOVERY_BOUND
            assert sorted(runs) == sorted(["before", *(f"k{i}" for i in range(10))])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_after_a_flushall_calls_and_breakers_carry_on() -> None:
    with private_redis() as server:
        async with stores(server.url, 2, timeout=0.5, reconcile_interval=0.2) as (one, two):
            runs: list[str] = []

            async def charge(key: str) -> str:
                runs.append(key)
                return key

            guarded = sw.Idempotency(key="key", store=one)(charge)
            a = replica_breaker(one, open_for=0.3)
            b = replica_breaker(two, open_for=0.3)
            await one.sync()
            await two.sync()
            assert await guarded("k1") == "k1"
            held = await one.claim("scope", "held", fingerprint=None, lease=30.0)
            assert isinstance(held, Lease)
            with suppress(Boom):
                await a(_boom)()
            await eventually(lambda: _true(b.state is CircuitState.OPEN), within=5.0)
            server.flushall()  # records, trial permits and scripts: all gone
            flushed = time.monotonic()
            await one.release(held)  # reloads its script, finds nothing to free
            assert await guarded("k2") == "k2"
            assert await guarded("k1") == "k1"  # its record was lost: it runs again
            await eventually(lambda: _all_admit(a, b), within=0.3 + RECOVERY_BOUND)
            assert time.monotonic() - flushed < 0.3 + RECOVERY_BOUND
            assert runs == ["k1", "k2", "k1"]


# -- a cluster node given to a plain client ------------------------------------------------


def test_a_client_of_another_kind_is_refused_with_a_clear_error() -> None:
    with pytest.raises(TypeError, match=r"redis\.asyncio\.RedisCluster client"):
        RedisStore(redis.Redis())  # type: ignore[arg-type]


@contextmanager
def two_node_cluster(tmp_path: Path) -> Iterator[tuple[PrivateRedis, PrivateRedis]]:
    """Two cluster nodes, slots 0-8191 on the first and the rest on the second."""
    options = ("--cluster-enabled", "yes", "--cluster-config-file")
    with (
        private_redis(*options, "nodes-1.conf", "--dir", str(tmp_path)) as first,
        private_redis(*options, "nodes-2.conf", "--dir", str(tmp_path)) as second,
    ):
        import redis as sync_redis

        with (
            sync_redis.Redis(port=first.port) as one,
            sync_redis.Redis(port=second.port) as two,
        ):
            one.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 8191)
            two.execute_command("CLUSTER", "ADDSLOTSRANGE", 8192, 16383)
            one.execute_command("CLUSTER", "MEET", "127.0.0.1", second.port)
            deadline = time.monotonic() + 20.0
            while b"cluster_state:ok" not in one.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise AssertionError("the cluster did not form")
                time.sleep(0.05)
        yield first, second


def _names() -> Iterator[str]:
    return (f"k{i}" for i in range(10_000))


def _elsewhere(key: str) -> bool:
    """Is ``key`` served by the second node of `two_node_cluster`?"""
    return redis.crc.key_slot(key.encode()) >= 8192


async def test_a_plain_client_of_a_cluster_node_finds_the_store_unavailable(
    tmp_path: Path,
) -> None:
    with two_node_cluster(tmp_path) as (first, _):
        client = redis_support.client(first.url)
        try:
            store = RedisStore(client, prefix="p:", timeout=1.0)
            # Keys whose slots the other node serves: MOVED.
            key = next(k for k in _names() if _elsewhere(store._record_key("scope", k)))
            hint = r"give RedisStore a redis\.asyncio\.RedisCluster"
            with pytest.raises(sw.StoreUnavailable, match=hint):
                await store.claim("scope", key, fingerprint=None, lease=5.0)
            name = next(n for n in _names() if _elsewhere(f"p:circuit:{_digest(n)}"))
            breaker = sw.CircuitBreaker(name=name, consecutive_failures=1, store=store)
            with suppress(Boom):
                await breaker(_boom)()
            assert breaker.state is CircuitState.OPEN  # decided alone
            await store.aclose()
        finally:
            await client.aclose()


# -- several replicas as processes --------------------------------------------------------


def _worker(url: str, prefix: str, role: str, *options: str) -> redis_support.WorkerProcess:
    """A Python process playing one replica (a role at the bottom of this file)."""
    return redis_support.WorkerProcess(
        "tests.test_redis_fault_injection", url, prefix, role, *options, timeout=WORKER_TIMEOUT
    )


@contextmanager
def workers(
    url: str, prefix: str, role: str, count: int, *options: str
) -> Iterator[list[redis_support.WorkerProcess]]:
    started = [_worker(url, prefix, role, *options) for _ in range(count)]
    try:
        yield started
    finally:
        for worker in started:
            worker.kill()


@pytest.mark.parametrize(
    ("timeout", "deadline"),
    [(0.25, 2.0), (2.0, 0.3)],
    ids=["cut-by-the-store-timeout", "cancelled-by-the-deadline"],
)
async def test_replicas_serve_every_duplicated_request_once_after_a_stall(
    timeout: float, deadline: float
) -> None:
    """Three processes, each a replica, each sending every request (a client's retries
    landing anywhere) while Redis stalls."""
    with private_redis() as server:
        prefix = redis_support.unique_prefix()
        keys = [f"order-{i}" for i in range(15)]
        with workers(server.url, prefix, "clients", 3, str(timeout), str(deadline)) as fleet:
            for worker in fleet:
                assert await worker.read() == {"ready": True}
            server.pause()
            try:
                for worker in fleet:
                    worker.send(json.dumps(keys))
                await asyncio.sleep(STALL)
            finally:
                server.resume()
            resumed = time.time()
            said = [await worker.read() for worker in fleet]
        client = redis_support.client(server.url)
        try:
            left = await claimed_keys(client, prefix)
        finally:
            await client.aclose()
    reports = [message["results"] for message in said]
    for message in said:
        for r in message["results"]:
            assert r["finished"] - resumed < STUCK_BOUND, r  # no lease to wait out
            # No attempt past its deadline, beyond how late its loop ran.
            assert r["overshoot"] < OVERSHOOT + message["lag"], (r, message["lag"])
    for i, key in enumerate(keys):
        served = {results[i]["result"] for results in reports}
        ran = [run for results in reports for run in results[i]["runs"]]
        cut = [run for results in reports for run in results[i]["cut"]]
        assert len(served) == 1, served  # one result, fleet-wide
        # Ran once, fleet-wide: every other run was a call cut short by its deadline.
        assert sorted(ran) == sorted([*served, *cut]), (key, ran, cut)
    assert left == []


async def test_replicas_breakers_admit_healthy_calls_soon_after_a_stall() -> None:
    """Three processes whose breakers are open when Redis stalls; the dependency is
    healthy again; every trial gives up at its deadline until Redis answers."""
    with private_redis() as server:
        prefix = redis_support.unique_prefix()
        with workers(server.url, prefix, "replica", 3) as fleet:
            for worker in fleet:
                assert await worker.read() == {"ready": True}
            fleet[0].send("trip")  # one trips; the others learn it from Redis
            for worker in fleet[1:]:
                worker.send("watch")
            for worker in fleet:
                assert await worker.read() == {"open": True}
            server.pause()
            try:
                for worker in fleet:
                    worker.send("go")
                await asyncio.sleep(STALL)
            finally:
                server.resume()
            resumed = time.time()
            recovered = [(await worker.read())["recovered_at"] for worker in fleet]
            for worker in fleet:
                worker.send("stop")
            reports = [(await worker.read())["calls"] for worker in fleet]
        client = redis_support.client(server.url)
        try:
            permits = await client.zcard(f"{prefix}circuit:{_digest('dep')}:trials")
            state = await client.hget(f"{prefix}circuit:{_digest('dep')}", "state")
        finally:
            await client.aclose()
    assert all(at - resumed < RECOVERY_BOUND for at in recovered), (resumed, recovered)
    for calls, at in zip(reports, recovered, strict=True):
        assert all(end - start < REPLICA_DEADLINE + OVERSHOOT for start, end, _ in calls)
        later = [outcome for start, _, outcome in calls if start >= at]
        assert len(later) >= STREAK, calls
        assert set(later) == {"ok"}, calls  # every replica admits healthy traffic again
    assert permits == 0
    assert state == b"closed"


# -- the workers -----------------------------------------------------------------------

REPLICA_DEADLINE = 0.2
STREAK = 25  # calls in a row that a replica must admit to count as recovered


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def _line() -> str:
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def _clients(store: RedisStore, options: list[str]) -> None:
    """Send every key of the list read from stdin, as a client would: retrying until served.

    Reports, per key, the result received and the runs made here, telling
    apart the runs whose call was cut short (by its deadline: a call
    cancelled after its function returned is a failed call, whose key is
    freed, and may run again).
    """
    deadline = float(options[1])
    runs: dict[str, list[str]] = {}

    async def charge(key: str) -> str:
        run = f"{key} by {os.getpid()}:{len(runs.setdefault(key, []))}"
        runs[key].append(run)
        return run

    guarded = sw.Idempotency(key="key", store=store)(charge)  # lease: 30 s
    _say({"ready": True})
    keys = json.loads(await _line())
    loop = asyncio.get_running_loop()

    async def request(key: str) -> dict[str, Any]:
        overshoot = 0.0
        cut: list[str] = []
        while True:
            started = loop.time()
            before = len(runs.get(key, ()))
            try:
                with sw.deadline(deadline):
                    result = await guarded(key)
            except (sw.StoreUnavailable, sw.DeadlineExceeded, sw.IdempotencyConflict):
                result = None
                cut += runs.get(key, [])[before:]
            overshoot = max(overshoot, loop.time() - started - deadline)
            if result is not None:
                return {
                    "result": result,
                    "finished": time.time(),
                    "overshoot": overshoot,
                    "runs": runs.get(key, []),
                    "cut": cut,
                }
            await asyncio.sleep(0.05)

    # How late this process's loop ran a timer, at most, while the requests
    # ran: on a loaded machine the process itself waits for a core, and every
    # attempt's overshoot grows by as much.
    lag = 0.0

    async def tick() -> None:
        nonlocal lag
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            lag = max(lag, loop.time() - before - 0.01)

    ticker = asyncio.ensure_future(tick())
    try:
        results = await asyncio.gather(*(request(k) for k in keys))
    finally:
        ticker.cancel()
    _say({"results": results, "lag": lag})


async def _replica(store: RedisStore, options: list[str]) -> None:
    """A breaker replica: trips on command, then calls a healthy dependency until told to stop."""
    breaker = sw.CircuitBreaker(name="dep", consecutive_failures=1, open_for=0.3, store=store)
    await store.sync()
    _say({"ready": True})
    command = await _line()
    if command == "trip":
        with suppress(Boom):
            await breaker(_boom)()
    while breaker.state is CircuitState.CLOSED:  # noqa: ASYNC110 - watched as a user would
        await asyncio.sleep(0.005)
    _say({"open": True})
    assert await _line() == "go"
    stop = asyncio.ensure_future(_line())
    calls: list[tuple[float, float, str]] = []
    in_a_row = 0  # calls admitted in a row, up to the last
    told = False
    while not stop.done():
        started = time.time()
        try:
            with sw.deadline(REPLICA_DEADLINE):
                outcome = await breaker(_healthy)()
        except sw.CircuitOpenError:
            outcome = "rejected"
        except sw.DeadlineExceeded:
            outcome = "deadline"
        calls.append((started, time.time(), outcome))
        in_a_row = in_a_row + 1 if outcome == "ok" else 0
        if in_a_row == STREAK and not told:
            told = True
            _say({"recovered_at": calls[-STREAK][0]})
        await asyncio.sleep(0.02)
    _say({"calls": calls})


ROLES: dict[str, Callable[[RedisStore, list[str]], Awaitable[None]]] = {
    "clients": _clients,
    "replica": _replica,
}


async def _work(url: str, prefix: str, role: str, options: list[str]) -> None:
    client = redis.asyncio.Redis.from_url(url)
    timeout = float(options[0]) if options else 1.0
    await load_scripts(client)
    try:
        async with RedisStore(client, prefix=prefix, timeout=timeout) as store:
            await ROLES[role](store, options)
    finally:
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(_work(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
