"""One bulkhead for a fleet: the local side, in virtual time, against an in-memory store.

Several `Bulkhead`s sharing one `FleetStore` are several processes sharing
one Redis (see ``tests/fleet_stores.py``; ``test_fleet_redis.py`` runs the
same against a real Redis and real processes).
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw

from .conftest import sample
from .fleet_stores import FleetStore

NAME = "fleet"


def fleet_bulkhead(store: FleetStore, limit: int, **options: Any) -> sw.Bulkhead:
    """A process's bulkhead: on a registry of its own, as in a process of its own."""
    options.setdefault("telemetry", sw.Telemetry(registry=CollectorRegistry()))
    return sw.Bulkhead(limit, store=store, name=NAME, **options)


class Occupancy:
    """Calls running in the whole fleet, and the most seen at once."""

    def __init__(self) -> None:
        self.running = 0
        self.peak = 0

    async def work(self, seconds: float) -> None:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await anyio.sleep(seconds)
        finally:
            self.running -= 1


async def test_the_fleet_never_runs_more_than_its_limit() -> None:
    store = FleetStore()
    occupancy = Occupancy()
    processes = [fleet_bulkhead(store, 10, max_queued=None) for _ in range(3)]
    calls = [process(occupancy.work) for process in processes]
    async with anyio.create_task_group() as tg:
        for i in range(90):
            tg.start_soon(calls[i % 3], 0.1 + (i % 7) / 50)
            await anyio.sleep(0.003)
    assert occupancy.peak == 10
    assert all(p.in_flight == 0 and p.queued == 0 for p in processes)


async def test_far_from_the_limit_calls_cost_no_round_trip() -> None:
    store = FleetStore()
    bulkhead = fleet_bulkhead(store, 32, lease=30.0)

    @bulkhead
    async def work() -> None:
        await anyio.sleep(0.01)

    for _ in range(500):  # 5 seconds of calls one after another
        await work()
    # The first call's batch, then a renewal every 10 s at most.
    assert store.requests["adjust_permits"] <= 2
    assert bulkhead.statistics().held == 3  # a batch of 2 (32 / 16) kept ahead, and the call's


async def test_a_process_with_no_permit_waits_in_fifo_order() -> None:
    store = FleetStore()
    holder = fleet_bulkhead(store, 1, max_queued=None)
    waiting = fleet_bulkhead(store, 1, max_queued=None)
    release = anyio.Event()
    order: list[int] = []

    @holder
    async def hold() -> None:
        await release.wait()

    @waiting
    async def queued(i: int) -> None:
        order.append(i)
        await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.sleep(0.1)
        for i in range(5):
            tg.start_soon(queued, i)
            await anyio.sleep(0.001)
        await anyio.sleep(0.5)
        assert order == []  # the fleet is full: they wait (and their process asks again)
        assert waiting.queued == 5
        release.set()
    assert order == [0, 1, 2, 3, 4]


async def test_a_call_that_may_not_wait_asks_the_store_once_then_is_refused() -> None:
    store = FleetStore()
    holder = fleet_bulkhead(store, 1, max_queued=None)
    other = fleet_bulkhead(store, 1)  # max_queued=0: never waits in line
    release = anyio.Event()

    @holder
    async def hold() -> None:
        await release.wait()

    @other
    async def call() -> str:
        return "ran"

    assert await call() == "ran"  # the fleet had room: one round trip, then it ran
    await anyio.sleep(5.0)  # its process gives the permit back at its next renewal
    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.sleep(0.1)
        before = store.requests["adjust_permits"]
        with pytest.raises(sw.BulkheadFullError) as refused:
            await call()
        assert str(refused.value) == (
            f"bulkhead {NAME!r} is full: the fleet's limit of 1 is reached (0 running here), "
            "0 calls queued"
        )
        assert store.requests["adjust_permits"] - before <= 2  # its ask (and a give-back)
        release.set()


async def test_a_waiting_process_gets_its_share_from_one_with_a_queue_of_its_own() -> None:
    store = FleetStore()
    busy = fleet_bulkhead(store, 4, max_queued=None)
    late = fleet_bulkhead(store, 4, max_queued=None)
    served: list[float] = []

    @busy
    async def hog() -> None:
        await anyio.sleep(0.05)

    @late
    async def call() -> None:
        served.append(anyio.current_time())
        await anyio.sleep(0.05)

    async with anyio.create_task_group() as tg:
        for _ in range(200):  # ten seconds of work, four at a time: a queue that never ends
            tg.start_soon(hog)
        await anyio.sleep(0.5)
        assert busy.statistics().held == 4
        start = anyio.current_time()
        async with anyio.create_task_group() as callers:
            for _ in range(20):
                callers.start_soon(call)
        # The busy process gives back what is over its share (4 / 2), instead
        # of handing it to its own queue: the late one is served at 2 at a time.
        assert served[0] - start < 0.5
        assert anyio.current_time() - start < 20 * 0.05 / 2 + 1.0
        assert max(late.statistics().held or 0, 0) <= 2
        tg.cancel_scope.cancel()


async def test_max_wait_bounds_the_wait_for_a_full_fleet() -> None:
    store = FleetStore()
    holder = fleet_bulkhead(store, 1)
    waiting = fleet_bulkhead(store, 1, max_queued=None, max_wait=0.5)
    release = anyio.Event()

    @holder
    async def hold() -> None:
        await release.wait()

    @waiting
    async def call() -> None:
        pass

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await anyio.sleep(0.1)
        start = anyio.current_time()
        with pytest.raises(sw.BulkheadFullError):
            await call()
        assert anyio.current_time() - start == pytest.approx(0.5, abs=0.01)
        assert waiting.queued == 0
        release.set()


async def test_a_dead_processs_permits_return_after_its_lease() -> None:
    store = FleetStore()
    dead = fleet_bulkhead(store, 4, max_queued=None, lease=3.0)
    alive = fleet_bulkhead(store, 4, max_queued=None, lease=3.0, max_wait=10.0)
    dead_member = dead._fleet.member  # type: ignore[union-attr]
    started = anyio.Event()

    @dead
    async def stuck() -> None:
        started.set()
        await anyio.sleep(math.inf)

    @alive
    async def call() -> float:
        return anyio.current_time()

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(stuck)
        await started.wait()
        await anyio.sleep(0.1)
        assert store.held(NAME) == 4
        store.cut.add(dead_member)  # its host is gone: it renews no more
        start = anyio.current_time()
        admitted = await call()
        # Its permits lapsed with its lease (renewed every second until the cut).
        assert 2.0 <= admitted - start <= 3.2
        tg.cancel_scope.cancel()


async def test_an_unreachable_store_falls_back_on_the_local_limit_then_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FleetStore()
    registry = CollectorRegistry()
    bulkhead = fleet_bulkhead(
        store, 10, max_queued=None, local_limit=2, telemetry=sw.Telemetry(registry=registry)
    )
    occupancy = Occupancy()
    store.down = True
    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(bulkhead.call, occupancy.work, 1.0)
        await anyio.sleep(0.1)
        assert bulkhead.statistics().degraded
        assert (bulkhead.in_flight, bulkhead.queued) == (2, 4)
    assert occupancy.peak == 2
    failed = sample(registry, "stalwart_bulkhead_store_unavailable_total", policy=NAME)
    assert failed is not None
    assert failed >= 1
    store.down = False
    await anyio.sleep(6.0)  # the next try (backing off up to 5 s) gets through
    assert not bulkhead.statistics().degraded
    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(bulkhead.call, occupancy.work, 1.0)
        await anyio.sleep(0.1)
        assert bulkhead.in_flight == 6  # the fleet's limit again


async def test_a_refusal_while_the_store_is_away_says_so() -> None:
    store = FleetStore()
    bulkhead = fleet_bulkhead(store, 10, local_limit=1)
    release = anyio.Event()
    store.down = True
    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead.call, release.wait)
        await anyio.sleep(0.1)
        assert bulkhead.statistics().degraded
        with pytest.raises(sw.BulkheadFullError) as refused:
            await bulkhead.call(release.wait)
        release.set()
    assert str(refused.value) == (
        f"bulkhead {NAME!r} is full: its store is away, and this process runs 1 of the 1 "
        "calls it may run alone, 0 calls queued"
    )


async def test_a_hung_store_degrades_before_the_callers_deadline() -> None:
    store = FleetStore(timeout=5.0)
    store.down = store.hang = True  # every request hangs until its bound
    bulkhead = fleet_bulkhead(store, 10, max_queued=None, local_limit=3)

    @bulkhead
    async def call() -> str:
        return "ran"

    start = anyio.current_time()
    with sw.deadline(1.0):
        assert await call() == "ran"
    # The keeper gave the store half the time the call had left, then degraded.
    assert anyio.current_time() - start == pytest.approx(0.5, abs=0.01)


async def test_a_store_answering_late_degrades_before_the_lease_lapses() -> None:
    # A store whose timeout outlasts the lease (a cluster client following a
    # failover may take all of it): the process must not run calls on
    # permits that lapsed meanwhile, which the others could take.
    store = FleetStore(timeout=5.0)
    bulkhead = fleet_bulkhead(store, 10, max_queued=None, local_limit=1, lease=1.5)
    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(bulkhead.call, anyio.sleep, 3.0)
        await anyio.sleep(0.1)
        held = bulkhead.statistics().held
        assert held is not None
        assert held >= 2
        assert store.held(NAME) == held
        store.down = store.hang = True  # the renewal (at a third of the lease) hangs
        await anyio.sleep(1.3 - (anyio.current_time() - start))
        assert not bulkhead.statistics().degraded  # the lease still holds
        await anyio.sleep(1.6 - (anyio.current_time() - start))
        assert store.held(NAME) == 0  # lapsed in the store: the others may take them
        assert bulkhead.statistics().degraded  # and this process decides alone
        store.down = store.hang = False


async def test_an_idle_process_gives_its_permits_back_and_its_keeper_ends() -> None:
    store = FleetStore()
    bulkhead = fleet_bulkhead(store, 32, lease=3.0)

    @bulkhead
    async def work() -> None:
        await anyio.sleep(0.01)

    await work()
    assert store.held(NAME) == 3
    await anyio.sleep(1.1)  # the next renewal: nothing running, all given back
    assert store.held(NAME) == 0
    assert bulkhead.statistics().held == 0
    fleet = bulkhead._fleet
    assert fleet is not None
    assert fleet.task is None
    count = store.requests["adjust_permits"]
    await anyio.sleep(60.0)
    assert store.requests["adjust_permits"] == count


async def test_a_cancelled_waiter_leaves_no_permit_behind() -> None:
    store = FleetStore()
    holder = fleet_bulkhead(store, 2, max_queued=None)
    waiting = fleet_bulkhead(store, 2, max_queued=None)
    release = anyio.Event()

    @holder
    async def hold() -> None:
        await release.wait()

    @waiting
    async def call() -> None:
        await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(hold)
        await anyio.sleep(0.1)
        with anyio.move_on_after(0.3):
            await call()
        assert waiting.queued == 0
        release.set()
    await anyio.sleep(5.0)  # both give everything back at their next renewal
    assert store.held(NAME) == 0
    assert holder.in_flight == waiting.in_flight == 0


async def test_near_the_limit_a_finished_call_gives_its_permit_back() -> None:
    store = FleetStore()
    busy = fleet_bulkhead(store, 4, max_queued=None)
    light = fleet_bulkhead(store, 4, max_queued=None)
    release = anyio.Event()

    @busy
    async def hold() -> None:
        await release.wait()

    @light
    async def quick() -> None:
        await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(hold)
        await anyio.sleep(0.1)
        await quick()
        await anyio.sleep(0.1)
        # The fleet is past half its limit: no spare kept, the permit went back.
        assert light.statistics().held == 0
        assert store.held(NAME) == 3
        release.set()


@pytest.mark.parametrize(("option", "value"), [("lease", 1.0), ("batch", 2), ("local_limit", 3)])
def test_fleet_options_need_a_store(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{option} needs a store"):
        sw.Bulkhead(4, **{option: value})


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("lease", 0.0, ValueError),
        ("lease", math.inf, ValueError),
        ("batch", -1, ValueError),
        ("local_limit", 0, ValueError),
        ("batch", 1.5, TypeError),
    ],
)
def test_bad_fleet_options_are_refused_naming_them(option: str, value: Any, error: type) -> None:
    with pytest.raises(error, match=option):
        sw.Bulkhead(4, store=FleetStore(), **{option: value})


def test_the_store_must_be_a_permit_store() -> None:
    with pytest.raises(TypeError, match=r"store must be a stalwart\.redis\.RedisStore"):
        sw.Bulkhead(4, store=object())  # type: ignore[arg-type]


def test_a_fleet_bulkhead_shows_its_options() -> None:
    store = FleetStore()
    bulkhead = fleet_bulkhead(store, 40, lease=5.0)
    assert bulkhead.store is store
    assert "lease=5, batch=3, local_limit=40" in repr(bulkhead)
    assert bulkhead.statistics() == sw.BulkheadStatistics(40, 0, 0, 0, 0, None, False)


def test_no_warning_is_logged_while_nothing_fails(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert not caplog.records


@pytest.mark.parametrize("outage", [False, True], ids=["store up", "store down a while"])
@pytest.mark.parametrize("seed", range(6))
async def test_random_traffic_keeps_the_limit_and_leaves_nothing_behind(
    seed: int, outage: bool
) -> None:
    """Calls arriving at random, some impatient, some cancelled; the store away a while."""
    rng = random.Random(seed)
    store = FleetStore(latency=0.002)
    store.hang = rng.random() < 0.5  # an outage: refused at once, or hung until the bound
    limit = rng.choice([1, 3, 8])
    processes = [
        fleet_bulkhead(
            store,
            limit,
            max_queued=rng.choice([None, 0, 2]),
            max_wait=rng.choice([None, 0.05, 1.0]),
            batch=rng.choice([0, 1, 2]),
            lease=2.0,
        )
        for _ in range(3)
    ]
    occupancy = Occupancy()
    outcomes: dict[str, int] = {}

    async def one(bulkhead: sw.Bulkhead, seconds: float, patience: float) -> None:
        outcome = "ran"
        with anyio.move_on_after(patience) as scope:
            try:
                await bulkhead.call(occupancy.work, seconds)
            except sw.BulkheadFullError:
                outcome = "refused"
        if scope.cancelled_caught:
            outcome = "cancelled"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    async with anyio.create_task_group() as tg:
        for i in range(300):
            if outage:
                store.down = 100 <= i < 200
            tg.start_soon(
                one,
                rng.choice(processes),
                rng.uniform(0.001, 0.1),
                rng.choice([math.inf, math.inf, 0.03, 0.5]),
            )
            await anyio.sleep(rng.expovariate(200.0))
    if outage:  # each process on its local limit (the whole limit) while the store was away
        assert occupancy.peak <= 3 * limit, occupancy.peak
    else:
        assert occupancy.peak <= limit, occupancy.peak
    assert outcomes.get("ran", 0) > 0
    assert all(p.in_flight == 0 and p.queued == 0 for p in processes)
    await anyio.sleep(10.0)  # back in the fleet; everything given back, every keeper ended
    assert not any(p.statistics().degraded for p in processes)
    assert store.held(NAME) == 0
    assert all(p._fleet is not None and p._fleet.task is None for p in processes)
