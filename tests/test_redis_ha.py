"""`RedisStore` on a Redis Cluster and on a primary watched by Sentinels, across processes.

The session starts each topology once (`tests.redis_ha`: three primaries
with a replica each; a primary, a replica and three Sentinels) and six
worker processes (``python -m tests.test_redis_ha``) that play replicas of a
service: each test sends some of them a role, the topology to connect to and
a prefix of its own. Every test runs on both topologies. The fleet-wide
limits' workers share their code, and how their figures are read, with
``tests/test_fleet_processes.py`` (`tests.fleet_workers`). The failovers (a
primary killed mid-run) come last: they leave each topology one replica
short.
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
from typing import Any

import pytest
import redis.asyncio
import redis.crc
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel

import stalwart as sw
from stalwart import CircuitState, Completed
from stalwart.redis import RedisStore
from stalwart.redis._client import _digest

from . import fleet_workers, redis_ha, redis_support

pytestmark = [pytest.mark.redis, pytest.mark.realtime]

WORKER_TIMEOUT = 30.0
# A push (a pub/sub hop) reaches the other processes long before their next
# periodic re-read (`RECONCILE`), however loaded the machine.
PUSHED = 2.5
RECONCILE = 5.0
# After a failover: how soon the fleet is back to normal (breakers closed,
# claims served), on a loaded two-core machine.
RECOVERED = 15.0
STORE_TIMEOUT = 3.0


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


# -- the topologies --------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_ha.Cluster]:
    with redis_ha.started(redis_ha.Cluster, tmp_path_factory.mktemp("cluster")) as group:
        yield group


@pytest.fixture(scope="session")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_ha.Sentinels]:
    with redis_ha.started(redis_ha.Sentinels, tmp_path_factory.mktemp("sentinel")) as group:
        yield group


Spec = dict[str, Any]


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Spec:
    """How a process connects to the topology under test (JSON, for the workers too)."""
    if request.param == "cluster":
        group: redis_ha.Cluster = request.getfixturevalue("cluster")
        return {"kind": "cluster", "ports": group.ports}
    watched: redis_ha.Sentinels = request.getfixturevalue("sentinels")
    return {"kind": "sentinel", "sentinels": watched.addresses}


@asynccontextmanager
async def connection(spec: Spec) -> AsyncIterator[redis.asyncio.Redis | redis.asyncio.RedisCluster]:
    """A client as a service would build it: short timeouts, so that a dead node shows fast."""
    timeouts: dict[str, Any] = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    if spec["kind"] == "cluster":
        # Every node as a startup node, as a service would list them: the
        # first may be the one a failover killed.
        nodes = [ClusterNode("127.0.0.1", port) for port in spec["ports"]]
        cluster = redis.asyncio.RedisCluster(startup_nodes=nodes, **timeouts)
        try:
            yield cluster
        finally:
            await cluster.aclose()
        return
    addresses = [tuple(a) for a in spec["sentinels"]]
    sentinel = Sentinel(addresses, **timeouts)  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 6
    primary: redis.asyncio.Redis = sentinel.master_for(redis_ha.SENTINEL_MASTER, **timeouts)
    try:
        yield primary
    finally:
        await primary.aclose()
        for one in sentinel.sentinels:  # the master's client does not close them
            await one.aclose()


@asynccontextmanager
async def store_of(spec: Spec, prefix: str, **options: Any) -> AsyncIterator[RedisStore]:
    # A generous timeout: a fresh cluster client first learns the nodes and
    # slots, which a loaded two-core machine may take a second to do.
    options.setdefault("timeout", STORE_TIMEOUT)
    async with connection(spec) as client, RedisStore(client, prefix=prefix, **options) as store:
        yield store


async def delete_prefix(spec: Spec, prefix: str) -> None:
    async with connection(spec) as client:
        if isinstance(client, redis.asyncio.RedisCluster):
            await client.initialize()
            for node in client.get_primaries():
                async for key in client.scan_iter(match=prefix + "*", target_nodes=node):
                    await client.delete(key)
        else:
            await redis_support.delete_prefix(client, prefix)


@pytest.fixture
async def prefix(topology: Spec) -> AsyncIterator[str]:
    chosen = redis_support.unique_prefix()
    yield chosen
    await delete_prefix(topology, chosen)


# -- the worker processes --------------------------------------------------------------


class Worker(redis_support.WorkerProcess):
    def __init__(self) -> None:
        super().__init__("tests.test_redis_ha", timeout=WORKER_TIMEOUT)

    def start(self, role: str, spec: Spec, prefix: str, options: dict[str, Any]) -> None:
        command = {"role": role, "topology": spec, "prefix": prefix, "options": options}
        self.send(json.dumps(command))


class Pool:
    """Workers started once for the module (starting Python is what takes time)."""

    def __init__(self, size: int) -> None:
        self.workers = [Worker() for _ in range(size)]
        self.busy: set[int] = set()

    @contextmanager
    def take(
        self, role: str, count: int, spec: Spec, prefix: str, **options: Any
    ) -> Iterator[list[Worker]]:
        """``count`` live workers running ``role``; killed (and replaced) if the test fails.

        ``options``: the role's keyword arguments. Workers taken for another
        role meanwhile are not taken again.
        """
        self.workers = [
            w if w.alive or i in self.busy else Worker() for i, w in enumerate(self.workers)
        ]
        taken = [i for i in range(len(self.workers)) if i not in self.busy][:count]
        chosen = [self.workers[i] for i in taken]
        for worker in chosen:
            worker.start(role, spec, prefix, options)
        self.busy.update(taken)
        try:
            yield chosen
        except BaseException:
            for worker in chosen:
                worker.kill()
            raise
        finally:
            self.busy.difference_update(taken)

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    redis_ha.binaries()
    started = Pool(6)  # the failover test runs two roles at once
    yield started
    started.close()


async def ready(workers: list[Worker]) -> None:
    for worker in workers:
        assert await worker.read() == {"ready": True}


async def together(pool: Pool, role: str, spec: Spec, prefix: str) -> list[dict[str, Any]]:
    """Three workers run ``role`` together: ready, go, and what each reports."""
    with pool.take(role, 3, spec, prefix) as workers:
        await ready(workers)
        for worker in workers:
            worker.send("go")
        return [await worker.read() for worker in workers]


class Boom(Exception):
    pass


async def boom() -> None:
    raise Boom


def own_registry() -> sw.Telemetry:
    return sw.Telemetry(registry=CollectorRegistry())


# -- key names ---------------------------------------------------------------------------


def test_a_cluster_store_keeps_each_records_keys_in_one_slot() -> None:
    client = redis.asyncio.RedisCluster(host="127.0.0.1", port=1)  # never connects
    store = RedisStore(client, prefix="p:")
    circuit = store._circuit("dep")
    record = store._record_key("scope", "key")
    slot = redis.crc.key_slot
    assert circuit.key == f"p:circuit:{{{_digest('dep')}}}"
    assert slot(circuit.key.encode()) == slot(circuit.trials.encode())
    assert slot(circuit.key.encode()) == slot(f"{circuit.key}:void:token".encode())
    assert slot(record.encode()) == slot(f"{record}:void:token".encode())
    assert slot(record.encode()) != slot(store._record_key("scope", "other").encode())


def test_a_single_redis_keeps_the_key_names_of_earlier_versions() -> None:
    # A rolling upgrade runs old and new replicas side by side: they must
    # share the same records.
    store = RedisStore(redis.asyncio.Redis(), prefix="p:")
    assert store._circuit("dep").key == f"p:circuit:{_digest('dep')}"
    assert store._record_key("scope", "key").startswith("p:idem:")
    assert "{" not in store._record_key("scope", "key")


# -- breakers ----------------------------------------------------------------------------


async def test_a_transition_reaches_every_process_by_a_push(
    pool: Pool, topology: Spec, prefix: str
) -> None:
    with pool.take("watch", 2, topology, prefix) as watchers:
        await ready(watchers)
        async with store_of(topology, prefix) as store:
            cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, open_for=30.0, store=store)
            with pytest.raises(Boom):
                await cb(boom)()
            tripped = time.time()
            seen = [(await watcher.read())["open_at"] - tripped for watcher in watchers]
    assert all(delay < PUSHED for delay in seen), seen


async def test_many_breakers_spread_over_the_cluster_are_read_in_one_sync(
    topology: Spec, prefix: str
) -> None:
    names = [f"dep-{i}" for i in range(40)]  # on every node, in as many slots
    async with store_of(topology, prefix) as one, store_of(topology, prefix) as other:
        tripping = [
            sw.CircuitBreaker(
                name=n, consecutive_failures=1, open_for=30.0, store=one, telemetry=own_registry()
            )
            for n in names[::2]
        ]
        for cb in tripping:
            with pytest.raises(Boom):
                await cb(boom)()
        following = [
            sw.CircuitBreaker(name=n, store=other, telemetry=own_registry()) for n in names
        ]
        await other.sync()
        states = [cb.state for cb in following]
    assert states == [CircuitState.OPEN, CircuitState.CLOSED] * (len(names) // 2)


async def test_half_open_trials_are_limited_across_the_fleet(topology: Spec, prefix: str) -> None:
    async with (
        store_of(topology, prefix) as a,
        store_of(topology, prefix) as b,
        store_of(topology, prefix) as c,
    ):
        breakers = [
            sw.CircuitBreaker(
                name="dep",
                consecutive_failures=1,
                open_for=0.3,
                half_open_calls=1,
                store=store,
                telemetry=own_registry(),
            )
            for store in (a, b, c)
        ]
        for store in (a, b, c):
            await store.sync()
        with pytest.raises(Boom):
            await breakers[0](boom)()
        await redis_support.until(lambda: all(cb.state is CircuitState.OPEN for cb in breakers))
        await asyncio.sleep(0.3)  # the open period, on Redis's clock: then trials
        release = asyncio.Event()
        ran: list[int] = []

        async def trial(i: int) -> str:
            async def probe() -> None:
                ran.append(i)
                await release.wait()

            try:
                await redis_support.until(lambda: breakers[i].state is CircuitState.HALF_OPEN)
                await breakers[i](probe)()
            except sw.CircuitOpenError:
                return "rejected"
            return "ran"

        tasks = [asyncio.create_task(trial(i)) for i in range(3)]
        await redis_support.until(lambda: len(ran) == 1 and sum(t.done() for t in tasks) == 2)
        release.set()
        outcomes = sorted(await asyncio.gather(*tasks))
        assert outcomes == ["ran", "rejected", "rejected"]
        await redis_support.until(lambda: all(cb.state is CircuitState.CLOSED for cb in breakers))


# -- idempotency -------------------------------------------------------------------------


async def test_a_duplicated_request_runs_once_across_processes(
    pool: Pool, topology: Spec, prefix: str
) -> None:
    results = [report["result"] for report in await together(pool, "charge", topology, prefix)]
    assert len({json.dumps(r) for r in results}) == 1  # the same result everywhere
    async with connection(topology) as client:
        assert await client.get(f"{prefix}test:charges") == b"1"  # charged once


# -- rate limits -------------------------------------------------------------------------

RATE = 20
BURST = 5
RATE_SECONDS = 1.5


async def test_processes_keep_to_one_rate_limit(pool: Pool, topology: Spec, prefix: str) -> None:
    reports = await together(pool, "rate", topology, prefix)
    turns = sorted(turn for report in reports for turn in report["turns"])
    assert all(report["unavailable"] == 0 for report in reports), reports
    assert all(report["turns"] and report["refused"] for report in reports), reports
    # One limit for the fleet: between any two turns, at most burst + rate x time.
    for a in range(len(turns)):
        for b in range(a, len(turns)):
            assert b - a + 1 <= BURST + (turns[b] - turns[a]) * RATE + 1e-6
    assert len(turns) >= RATE * (RATE_SECONDS - 0.5)


# -- pub/sub across a resharding ---------------------------------------------------------


async def test_breakers_follow_a_record_moved_to_another_node(
    cluster: redis_ha.Cluster,
) -> None:
    spec = {"kind": "cluster", "ports": cluster.ports}
    prefix = redis_support.unique_prefix()
    try:
        async with store_of(spec, prefix) as one, store_of(spec, prefix) as other:
            a = sw.CircuitBreaker(
                name="dep",
                consecutive_failures=1,
                open_for=30.0,
                store=one,
                telemetry=own_registry(),
            )
            b = sw.CircuitBreaker(name="dep", store=other, telemetry=own_registry())
            await one.sync()
            await other.sync()
            key = one._circuit("dep").key
            before = cluster.primary_of(key)
            target = next(port for port in cluster.primaries() if port != before)
            await asyncio.to_thread(cluster.move_slot, key, target)
            assert cluster.primary_of(key) == target
            with pytest.raises(Boom):
                await a(boom)()  # written where the record lives now
            await redis_support.until(lambda: b.state is CircuitState.OPEN, within=PUSHED)
            b.reset()  # and back, from the other store
            await redis_support.until(lambda: a.state is CircuitState.CLOSED, within=PUSHED)
    finally:
        await delete_prefix(spec, prefix)


async def test_each_node_that_lost_its_scripts_gets_them_again(cluster: redis_ha.Cluster) -> None:
    spec = {"kind": "cluster", "ports": cluster.ports}
    prefix = redis_support.unique_prefix()
    keys = [f"k{i}" for i in range(12)]  # on every node
    try:
        async with store_of(spec, prefix) as store:
            for key in keys[:6]:
                assert isinstance(
                    await store.claim("s", key, fingerprint=None, lease=5.0), sw.Lease
                )
            for port in cluster.ports:  # as a restarted or newly promoted node would be
                with redis_ha.admin(port) as node:
                    node.script_flush()
            for key in keys:
                found = await store.claim("s", key, fingerprint=None, lease=5.0)
                assert isinstance(found, sw.InFlight if key in keys[:6] else sw.Lease), key
    finally:
        await delete_prefix(spec, prefix)


async def test_a_cluster_client_that_decodes_replies_serves_the_same(
    cluster: redis_ha.Cluster,
) -> None:
    prefix = redis_support.unique_prefix()
    nodes = [ClusterNode("127.0.0.1", port) for port in cluster.ports]
    decoding = redis.asyncio.RedisCluster(startup_nodes=nodes, decode_responses=True)
    spec = {"kind": "cluster", "ports": cluster.ports}
    try:
        async with (
            RedisStore(decoding, prefix=prefix, timeout=STORE_TIMEOUT) as one,
            store_of(spec, prefix) as other,
        ):
            a = sw.CircuitBreaker(
                name="dep", consecutive_failures=1, store=one, telemetry=own_registry()
            )
            b = sw.CircuitBreaker(name="dep", store=other, telemetry=own_registry())
            await one.sync()
            await other.sync()
            with pytest.raises(Boom):
                await a(boom)()
            await redis_support.until(lambda: b.state is CircuitState.OPEN, within=PUSHED)

            async def pay(payment: str) -> dict[str, str]:
                return {"payment": payment, "note": "café ✓"}

            once = sw.Idempotency(key="payment", store=one)(pay)
            assert await once("p-1") == {"payment": "p-1", "note": "café ✓"}
            # Replayed: the codec got the stored bytes, not text decoded by the client.
            assert await once("p-1") == {"payment": "p-1", "note": "café ✓"}
    finally:
        await decoding.aclose()
        await delete_prefix(spec, prefix)


# -- fleet-wide limits: one bulkhead, one retry budget ------------------------------------

FLEET = "fleet"
LIMIT = 6
LEASE = 1.5
WINDOW = 1.0
FLEET_SECONDS = 1.5
# Once the fleet's limits recovered from a failover: how long they run on.
RUN_ON = 1.0


def fleet_key(prefix: str, name: str = FLEET) -> str:
    """A bulkhead's key on a cluster (its other two keys share its slot)."""
    return f"{prefix}bulkhead:{{{_digest(name)}}}"


async def test_processes_keep_to_one_bulkhead_and_one_retry_budget(
    pool: Pool, topology: Spec, prefix: str
) -> None:
    reports = await together(pool, "limits", topology, prefix)
    assert all(report["store_unavailable"] == 0 for report in reports), reports
    # Calls in flight, measured across the processes: never over the limit
    # (there is no slack while every process reaches Redis), and the limit
    # was used (3 x 8 callers for 6 permits).
    peak = fleet_workers.peak(i for report in reports for i in report["intervals"])
    assert peak == LIMIT, peak
    # Retries in a total outage: within the documented bound of one budget.
    retries = sum(report["retries"] for report in reports)
    allowed = fleet_workers.budget_allowed(reports, window=WINDOW)
    assert 0.5 * allowed <= retries <= allowed, (retries, allowed, reports)


async def _all_permits_free(store: RedisStore, name: str) -> float:
    """When (monotonic) the bulkhead's whole limit could be taken at once; given back."""

    async def take(delta: int) -> int:
        grant = await store.adjust_permits(
            name, "test", delta, extra=0, limit=LIMIT, far=0, lease=LEASE, within=STORE_TIMEOUT
        )
        return grant.granted

    end = time.monotonic() + LEASE + RECOVERED
    while (granted := await take(LIMIT)) < LIMIT:
        if granted:
            await take(-granted)
        assert time.monotonic() < end, "the bulkhead's permits never came back"
        await asyncio.sleep(0.05)
    free_at = time.monotonic()
    await take(-LIMIT)
    return free_at


# -- failovers: last, they leave the topologies one replica short -------------------------


async def test_a_failover_mid_run_loses_no_acknowledged_record_and_strands_nothing(
    pool: Pool,
    topology: Spec,
    prefix: str,
    request: pytest.FixtureRequest,
) -> None:
    """Three processes write records and trip a breaker, three use the fleet's limits."""
    circuit = f"{prefix}circuit:{{{_digest('dep')}}}"
    group: redis_ha.Cluster | None = None
    fleet = FLEET
    if topology["kind"] == "cluster":
        group = request.getfixturevalue("cluster")
        # A bulkhead whose keys the same primary serves: one kill for both.
        serving = group.primary_of(circuit)
        fleet = next(
            name
            for name in (f"fleet-{i}" for i in range(256))
            if group.primary_of(fleet_key(prefix, name)) == serving
        )
    with (
        pool.take("churn", 3, topology, prefix) as replicas,
        pool.take("failover", 3, topology, prefix, name=fleet) as limited,
    ):
        await ready(replicas + limited)
        for replica in replicas + limited:
            replica.send("go")
        for replica in replicas + limited:
            assert await replica.read() == {"running": True}
        for replica in replicas:
            replica.send("fail")  # the dependency fails: every breaker opens
        for replica in replicas:
            assert await replica.read() == {"open": True}
        # Kill the primary that serves the breaker's record (and the
        # bulkhead's permits), mid-run.
        if group is not None:
            await asyncio.to_thread(group.fail_over, group.primary_of(circuit))
        else:
            watched: redis_ha.Sentinels = request.getfixturevalue("sentinels")
            await asyncio.to_thread(watched.fail_over)
        for replica in replicas:
            replica.send("heal")
        for replica in limited:
            replica.send("recover")
        reports = [await replica.read() for replica in replicas]
        backs = [await replica.read() for replica in limited]
        # Once every process is back on the fleet's limits, they run on a while.
        for replica in limited:
            replica.send("run on")
        limits = [await replica.read() for replica in limited]
        stopped = time.monotonic()
        # The news still reaches every process by a push: their pub/sub
        # connections came back (on another node, or the new primary).
        async with store_of(topology, prefix) as store:
            cb = sw.CircuitBreaker(
                name="dep", consecutive_failures=1, store=store, telemetry=own_registry()
            )
            await store.sync()
            with pytest.raises(Boom):
                await cb(boom)()
            tripped = time.time()
            seen = [(await replica.read())["open_at"] - tripped for replica in replicas]
            # No permit stranded: once the processes stopped, the bulkhead's
            # whole limit is free within a lease (their spare permits lapse).
            free_at = await _all_permits_free(store, fleet)
    assert all(delay < PUSHED for delay in seen), seen
    # Every breaker closed again once the dependency was healthy.
    assert all(report["closed"] for report in reports), reports
    # Every replica went on working after the failover.
    assert all(report["acked_after"] > 0 for report in reports), reports
    # Every record the store acknowledged is still there, with its value.
    acked = [key for report in reports for key in report["acked"]]
    assert len(acked) > 30
    async with store_of(topology, prefix) as store:
        for key in acked:
            found = await store.claim(SCOPE, key, fingerprint=None, lease=5.0)
            assert found == Completed({"key": key}, None), key
    # The fleet's limits came back by themselves.
    assert all(back["permits"] is not None and back["budget"] for back in backs), backs
    assert free_at - stopped <= LEASE + 2.0, free_at - stopped
    # From when the last process was back (and the calls it had started on
    # its local limit ended): one limit for the fleet again, and all of it used.
    settled = max(back["permits"] for back in backs) + 0.2
    after = [[i for i in report["intervals"] if i[1] > settled] for report in limits]
    assert all(after), "a process made no call after the failover"
    assert fleet_workers.peak(i for calls in after for i in calls) == LIMIT
    # No process ran calls on permits whose lease had lapsed while it waited
    # for the new primary: it decided on its local limit instead.
    assert all(report["lapsed"] == 0 for report in limits), limits
    # And the budget: every process exchanges with the whole fleet again.
    assert all(report["processes"] == len(limits) for report in limits), limits


# -- the workers: roles ------------------------------------------------------------------

SCOPE = "churn"


def _say(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


async def _line() -> str:
    line: str = await asyncio.to_thread(sys.stdin.readline)
    return line.strip()


async def _watch(store: RedisStore) -> None:
    cb = sw.CircuitBreaker(name="dep", consecutive_failures=1, open_for=30.0, store=store)
    await store.sync()
    _say({"ready": True})
    while cb.state is CircuitState.CLOSED:  # noqa: ASYNC110 - watched as a user would
        await asyncio.sleep(0.001)
    _say({"open_at": time.time()})


async def _charge(store: RedisStore) -> None:
    async def charge(payment: str) -> dict[str, Any]:
        await store.client.incr(f"{store.prefix}test:charges")
        await asyncio.sleep(0.1)
        return {"payment": payment, "by": os.getpid()}

    guarded = sw.Idempotency(key="payment", store=store, lease=10.0)(charge)
    _say({"ready": True})
    assert await _line() == "go"
    _say({"result": await guarded("pay-1")})


async def _rate(store: RedisStore) -> None:
    turns: list[float] = []
    unavailable = 0

    class Recording:
        timeout = store.timeout

        async def reserve_turn(self, *args: Any, **kwargs: Any) -> Any:
            nonlocal unavailable
            try:
                turn = await store.reserve_turn(*args, **kwargs)
            except sw.StoreUnavailable:
                unavailable += 1
                raise
            if turn.granted:
                turns.append(turn.at)
            return turn

        def give_back_turn(self, turn: Any, until: float) -> None:
            store.give_back_turn(turn, until)

    limiter = sw.RateLimiter(RATE, burst=BURST, name="fleet", store=Recording())
    _say({"ready": True})
    assert await _line() == "go"
    loop = asyncio.get_running_loop()
    end = loop.time() + RATE_SECONDS
    refused = 0
    while loop.time() < end:
        try:
            await limiter.call(asyncio.sleep, 0)
        except sw.RateLimitExceeded as exc:
            refused += 1
            await asyncio.sleep(min(exc.retry_after or 0.0, 0.01))
    _say({"turns": turns, "refused": refused, "unavailable": unavailable})


async def _churn(store: RedisStore) -> None:
    """Idempotency records written without pause, a breaker in front of a dependency.

    On ``fail`` the dependency fails until every local breaker opened; on
    ``heal`` it works again, and the worker reports once its breaker closed
    (or after `RECOVERED` seconds), with the keys whose result the store
    acknowledged (``complete`` returned True).
    """
    failing = False
    breaker = sw.CircuitBreaker(
        name="dep", consecutive_failures=1, open_for=0.2, store=store, telemetry=own_registry()
    )
    await store.sync()
    acked: list[str] = []
    marks = {"failover": -1}
    errors = 0

    def closed() -> bool:
        return breaker.state is CircuitState.CLOSED

    async def dependency() -> None:
        if failing:
            raise Boom

    async def write() -> None:
        nonlocal errors
        n = 0
        while True:
            key = f"{os.getpid()}-{n}"
            n += 1
            try:
                lease = await store.claim(SCOPE, key, fingerprint=None, lease=30.0)
                assert isinstance(lease, sw.Lease)
                if await store.complete(lease, {"key": key}, ttl=600.0):
                    acked.append(key)
            except sw.StoreUnavailable:
                errors += 1
                await asyncio.sleep(0.05)
            with suppress(Boom, sw.CircuitOpenError):
                await breaker(dependency)()
            await asyncio.sleep(0.005)
            if len(acked) == 20 and marks["failover"] == -1:
                marks["failover"] = 0
                _say({"running": True})

    _say({"ready": True})
    assert await _line() == "go"
    writer = asyncio.create_task(write())
    try:
        assert await _line() == "fail"
        failing = True
        while closed():  # noqa: ASYNC110 - as a user would
            await asyncio.sleep(0.01)
        _say({"open": True})
        assert await _line() == "heal"
        marks["failover"] = len(acked)
        failing = False
        end = time.monotonic() + RECOVERED
        while time.monotonic() < end and not (  # noqa: ASYNC110 - as a user would
            closed() and len(acked) > marks["failover"]
        ):
            await asyncio.sleep(0.01)
    finally:
        while not writer.done():
            # Again and again: on Python 3.11, redis-py's socket writes
            # (asyncio.wait_for) may swallow one cancellation.
            writer.cancel()
            await asyncio.wait({writer}, timeout=0.05)
    _say(
        {
            "closed": closed(),
            "acked": acked,
            "acked_after": len(acked) - marks["failover"],
            "errors": errors,
        }
    )
    while closed():  # noqa: ASYNC110 - watched as a user would
        await asyncio.sleep(0.001)
    _say({"open_at": time.time()})


def _fleet_limits(store: Any, name: str = FLEET) -> tuple[sw.Bulkhead, sw.RetryBudget]:
    # While Redis is away each process runs its share of the limit alone, so
    # that the fleet keeps to it through an outage too.
    bulkhead = sw.Bulkhead(
        LIMIT, max_queued=None, store=store, name=name, lease=LEASE, local_limit=LIMIT // 3
    )
    return bulkhead, fleet_workers.retry_budget(store, window=WINDOW, name=name)


async def _limits(store: RedisStore) -> None:
    """Calls through the fleet's bulkhead while retries into an outage spend its budget."""
    bulkhead, budget = _fleet_limits(store)
    intervals: list[tuple[float, float]] = []
    stop = asyncio.Event()
    calls: list[asyncio.Task[None]] = []

    async def ready() -> None:
        _say({"ready": True})
        assert await _line() == "go"
        making = fleet_workers.make_calls(bulkhead, intervals, done=stop.is_set)
        calls.append(asyncio.create_task(making))

    report = await fleet_workers.spend_in_an_outage(
        budget, processes=3, seconds=FLEET_SECONDS, ready=ready
    )
    stop.set()
    await asyncio.gather(*calls)
    report["intervals"] = intervals
    report["store_unavailable"] += bulkhead.metrics.store_unavailable  # type: ignore[attr-defined]
    _say(report)


class _Lapsed(logging.Handler):
    """Counts a bulkhead's warnings that it ran calls on permits whose lease lapsed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "lease lapsed" in record.getMessage()


async def _failover(store: RedisStore, name: str) -> None:
    """The fleet's limits in use while the test kills a primary: when they came back, and after.

    On ``recover`` (the new primary serves) it reports once both limits
    reach Redis again; on ``run on`` it runs `RUN_ON` seconds more and
    reports its calls.
    """
    recording = fleet_workers.Recording(store)
    bulkhead, budget = _fleet_limits(recording, name)
    lapsed = _Lapsed()
    logging.getLogger("stalwart").addHandler(lapsed)
    intervals: list[tuple[float, float]] = []
    stop = asyncio.Event()

    async def first_attempts() -> None:
        while not stop.is_set():
            budget.deposit()
            await asyncio.sleep(0.01)

    _say({"ready": True})
    assert await _line() == "go"
    tasks = [
        asyncio.create_task(fleet_workers.make_calls(bulkhead, intervals, done=stop.is_set)),
        asyncio.create_task(first_attempts()),
    ]
    try:
        while len(intervals) < 50 or recording.back_since("budget", 0.0) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        _say({"running": True})
        assert await _line() == "recover"
        since = time.monotonic()
        end = since + RECOVERED

        def back() -> bool:
            return (
                recording.back_since("permits", since) is not None
                and recording.back_since("budget", since) is not None
                and not bulkhead.statistics().degraded
            )

        while time.monotonic() < end and not back():  # noqa: ASYNC110 - as a user would
            await asyncio.sleep(0.01)
        _say(
            {
                "permits": recording.back_since("permits", 0.0) if back() else None,
                "budget": back(),
            }
        )
        assert await _line() == "run on"
        await asyncio.sleep(RUN_ON)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        logging.getLogger("stalwart").removeHandler(lapsed)
    _say(
        {
            "intervals": intervals,
            "lapsed": lapsed.count,
            "permit_failures": recording.failures("permits"),
            "processes": budget.statistics().processes,
        }
    )


ROLES: dict[str, Callable[..., Awaitable[None]]] = {
    "watch": _watch,
    "charge": _charge,
    "rate": _rate,
    "churn": _churn,
    "limits": _limits,
    "failover": _failover,
}


async def _work(command: dict[str, Any]) -> None:
    async with store_of(command["topology"], command["prefix"]) as store:
        await ROLES[command["role"]](store, **command["options"])


def _serve() -> None:
    """Run the roles the test sends, one per line, until stdin closes."""
    for line in sys.stdin:
        asyncio.run(_work(json.loads(line)))


if __name__ == "__main__":
    _serve()
