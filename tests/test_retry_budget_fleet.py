"""One retry budget for a fleet: the local side, in virtual time, against an in-memory store.

Several `RetryBudget`s sharing one `FleetStore` are several processes
sharing one Redis (see ``tests/fleet_stores.py``; ``test_fleet_redis.py``
runs the same against a real Redis and real processes).
"""

from __future__ import annotations

import logging
import math
import random

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw

from .conftest import sample
from .fleet_stores import FleetStore


def fleet_budget(store: FleetStore, **options: float) -> sw.RetryBudget:
    """A process's budget: on a registry of its own, as in a process of its own."""
    settings = {"ratio": 0.1, "min_per_second": 0.0, "window": 10.0, **options}
    return sw.RetryBudget(
        **settings,
        store=store,
        name="fleet",
        telemetry=sw.Telemetry(registry=CollectorRegistry()),
    )


async def test_calls_cost_no_round_trip_only_exchanges_every_sync_interval() -> None:
    store = FleetStore()
    budget = fleet_budget(store, sync_interval=0.5)
    for _ in range(1000):  # 10 seconds of 100 calls a second
        budget.deposit()
        budget.try_withdraw()
        await anyio.sleep(0.01)
    exchanges = store.requests["exchange_budget"]
    assert 10.0 / 0.5 - 2 <= exchanges <= 10.0 / 0.5 + 2


async def spend(budget: sw.RetryBudget, seconds: float, per_tick: int = 5) -> int:
    """Ask for ``per_tick`` retries every 10 ms for ``seconds``; the retries granted."""
    granted = 0
    for _ in range(round(seconds / 0.01)):
        granted += sum(budget.try_withdraw() for _ in range(per_tick))
        await anyio.sleep(0.01)
    return granted


async def test_the_fleet_shares_one_floor() -> None:
    store = FleetStore()
    budgets = [fleet_budget(store, min_per_second=2.0, window=10.0) for _ in range(4)]
    for budget in budgets:
        budget.deposit()  # each process joins the fleet
    await anyio.sleep(1.2)
    granted = [0] * 4

    async def process(i: int) -> None:
        granted[i] = await spend(budgets[i], 3.0)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(process, i)
    # 20 retries for the fleet (2 a second over 10 s), about a quarter each.
    assert sum(granted) == 20
    assert all(3 <= g <= 8 for g in granted), granted
    assert budgets[0].statistics().processes == 4


async def test_first_attempts_earn_retries_for_the_whole_fleet() -> None:
    store = FleetStore()
    earner, spender = fleet_budget(store, ratio=0.5), fleet_budget(store, ratio=0.5)
    for _ in range(40):
        earner.deposit()  # only the first process's calls earn
    spender.deposit()
    await anyio.sleep(1.2)
    # 41 first attempts earn 20.5 retries; the process that needs them gets
    # them, but for the one the other process keeps reserved.
    assert await spend(spender, 3.0) == 19
    assert spender.statistics().fleet_requests == 41


async def test_what_one_process_spends_is_spent_for_all() -> None:
    store = FleetStore()
    first, second = fleet_budget(store, ratio=1.0), fleet_budget(store, ratio=1.0)
    for _ in range(10):
        first.deposit()
    second.deposit()
    await anyio.sleep(1.2)
    assert await spend(first, 3.0) == 10  # the other keeps one reserved
    assert await spend(second, 3.0) == 1  # that one, and nothing more
    assert second.statistics().fleet_retries == 11


async def test_retries_across_the_fleet_stay_within_the_documented_bound() -> None:
    store = FleetStore()
    ratio, floor_rate, window, interval = 0.2, 1.0, 10.0, 0.5
    budgets = [
        fleet_budget(
            store, ratio=ratio, min_per_second=floor_rate, window=window, sync_interval=interval
        )
        for _ in range(5)
    ]
    first = retries = 0

    async def process(budget: sw.RetryBudget, rate: float) -> None:
        nonlocal first, retries
        for _ in range(int(30.0 * rate)):  # 30 s of a total outage: every call retried
            budget.deposit()
            first += 1
            for _ in range(3):
                if not budget.try_withdraw():
                    break
                retries += 1
            await anyio.sleep(1.0 / rate)

    async with anyio.create_task_group() as tg:
        for i, budget in enumerate(budgets):
            tg.start_soon(process, budget, 20.0 * (i + 1))  # 20 to 100 calls a second
    # One budget: ratio of the first attempts, plus the floor over the 30 s
    # (a window's worth every nine tenths of a window: retries leave it a
    # tenth at a time) and the window it started with. Reserved in the store
    # before they are made, retries never exceed it.
    allowed = ratio * first + floor_rate * (window + 30.0 / 0.9)
    assert retries <= allowed, (retries, allowed)
    assert retries >= 0.8 * ratio * first  # and the fleet was not starved either
    # Five in-process budgets would have allowed each its own floor: far more.


async def test_an_unreachable_store_leaves_each_process_its_own_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FleetStore()
    registry = CollectorRegistry()
    budget = sw.RetryBudget(
        ratio=0.5,
        min_per_second=0.0,
        store=store,
        name="fleet",
        telemetry=sw.Telemetry(registry=registry),
    )
    budget.deposit()
    await anyio.sleep(1.0)
    assert budget.statistics().processes == 1
    store.down = True
    await anyio.sleep(2.0)
    for _ in range(10):
        budget.deposit()
    # The fleet's view is stale: the process's own window decides (11 * 0.5).
    assert sum(budget.try_withdraw() for _ in range(10)) == 5
    assert sample(
        registry, "stalwart_retry_budget_store_unavailable_total", policy="fleet"
    ) == pytest.approx(5)
    store.down = False
    await anyio.sleep(6.0)  # the next try (backing off up to 5 s) gets through
    assert budget.statistics().fleet_retries == 5  # what it did meanwhile reached the fleet
    assert budget.statistics().fleet_requests == 11


async def test_the_exchange_task_ends_when_the_process_is_idle() -> None:
    store = FleetStore()
    budget = fleet_budget(store, sync_interval=0.5)
    budget.deposit()
    await anyio.sleep(0.1)
    fleet = budget._fleet
    assert fleet is not None
    assert fleet.task is not None
    await anyio.sleep(2.0)
    assert fleet.task is None
    count = store.requests["exchange_budget"]
    await anyio.sleep(60.0)
    assert store.requests["exchange_budget"] == count  # no traffic, no requests
    budget.deposit()  # and it starts again on the next call
    await anyio.sleep(0.1)
    assert store.requests["exchange_budget"] == count + 1


async def test_a_retry_makes_no_round_trip_of_its_own() -> None:
    store = FleetStore(latency=10.0)  # a store so slow that any wait for it would show
    budget = fleet_budget(store, ratio=1.0, min_per_second=1.0)
    retry = sw.Retry(attempts=3, budget=budget, backoff=sw.Backoff(initial=0.0, maximum=0.0))
    calls = 0

    @retry
    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 2:
            raise ValueError("again")
        return "ok"

    # Its first exchange has not come back: the retry is paid by what the
    # call's own first attempt earned, without waiting for the store.
    with anyio.fail_after(0.001):
        assert await flaky() == "ok"


def test_sync_interval_needs_a_store() -> None:
    with pytest.raises(ValueError, match="sync_interval needs a store"):
        sw.RetryBudget(sync_interval=1.0)


def test_the_store_must_be_a_budget_store() -> None:
    with pytest.raises(TypeError, match=r"store must be a stalwart\.redis\.RedisStore"):
        sw.RetryBudget(store=object())  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.0, -1.0, 11.0, math.nan])
def test_sync_interval_is_positive_and_within_the_window(value: float) -> None:
    with pytest.raises(ValueError, match="sync_interval"):
        sw.RetryBudget(window=10.0, store=FleetStore(), sync_interval=value)


def test_a_fleet_budget_shows_its_store_and_name() -> None:
    store = FleetStore()
    budget = sw.RetryBudget(store=store, name="payments")
    assert budget.store is store
    assert budget.sync_interval == 0.5
    assert "name='payments'" in repr(budget)
    assert sw.RetryBudget(window=1.0, store=store, name="short").sync_interval == 0.1


def test_log_is_quiet_while_nothing_fails(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    assert not caplog.records


@pytest.mark.parametrize("seed", range(6))
async def test_random_traffic_never_overspends_and_leaves_no_task(seed: int) -> None:
    rng = random.Random(seed)
    store = FleetStore(latency=rng.choice([0.0005, 0.01]))
    ratio, floor_rate, window = rng.choice([0.1, 0.5, 2.0]), rng.choice([0.0, 1.0, 5.0]), 5.0
    budgets = [
        fleet_budget(
            store,
            ratio=ratio,
            min_per_second=floor_rate,
            window=window,
            sync_interval=rng.choice([0.05, 0.2, 0.5]),
        )
        for _ in range(rng.randrange(2, 6))
    ]
    first = retries = 0
    seconds = 20.0

    async def process(budget: sw.RetryBudget) -> None:
        nonlocal first, retries
        end = anyio.current_time() + seconds
        rate = rng.uniform(5.0, 100.0)
        while anyio.current_time() < end:
            budget.deposit()
            first += 1
            for _ in range(rng.randrange(0, 4)):  # some calls fail, and want retries
                if budget.try_withdraw():
                    retries += 1
            await anyio.sleep(rng.expovariate(rate))

    async with anyio.create_task_group() as tg:
        for budget in budgets:
            tg.start_soon(process, budget)
    # Reserved before they are made (or earned by the process's own first
    # attempts): never more than the budget over the run.
    assert retries <= ratio * first + floor_rate * (window + seconds / 0.9), (retries, first)
    await anyio.sleep(10.0)
    assert all(b._fleet is not None and b._fleet.task is None for b in budgets)
