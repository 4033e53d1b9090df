"""Property: for any interleaving of calls over a few keys, each key's body runs
exactly once per TTL (when nothing fails), and every call gets the result of
the run that was current for its key when it arrived.

Arrival times are whole seconds and TTLs end in .5, so no call arrives exactly
as a record expires: the expected runs are then fully determined, and a
simple model of the contract computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import stalwart as sw
from stalwart import IdempotencyStore

from .shared_store import SharedStore

KEYS = ("a", "b", "c")
STORES: dict[str, Callable[[], IdempotencyStore]] = {
    "memory": sw.MemoryStore,
    "shared": SharedStore,
}


@dataclass(frozen=True)
class Scenario:
    ttl: float
    durations: dict[str, int]  # how long each key's body takes
    calls: list[tuple[str, int]]  # (key, arrival time)


scenarios = st.builds(
    Scenario,
    ttl=st.sampled_from([0.5, 2.5, 7.5, 40.5]),
    durations=st.fixed_dictionaries({k: st.integers(0, 6) for k in KEYS}),
    calls=st.lists(st.tuples(st.sampled_from(KEYS), st.integers(0, 40)), min_size=1, max_size=30),
)


def expected_runs(scenario: Scenario) -> tuple[dict[str, list[int]], list[int]]:
    """The model: per key, the start times of its runs; per call, its run's start."""
    starts: dict[str, list[int]] = {k: [] for k in KEYS}
    served: list[int] = [0] * len(scenario.calls)
    order = sorted(range(len(scenario.calls)), key=lambda i: scenario.calls[i][1])
    for i in order:
        key, arrival = scenario.calls[i]
        runs = starts[key]
        if runs and arrival < runs[-1] + scenario.durations[key] + scenario.ttl:
            served[i] = runs[-1]  # in flight (it waits) or stored (a replay)
        else:
            runs.append(arrival)
            served[i] = arrival
    return starts, served


@pytest.mark.parametrize("store_kind", list(STORES))
@settings(max_examples=75)
@given(scenario=scenarios)
async def test_each_key_runs_exactly_once_per_ttl(store_kind: str, scenario: Scenario) -> None:
    start = anyio.current_time()
    runs: dict[str, list[int]] = {k: [] for k in KEYS}
    running = dict.fromkeys(KEYS, 0)
    peak = dict.fromkeys(KEYS, 0)

    @sw.Idempotency(key="key", ttl=scenario.ttl, store=STORES[store_kind]())
    async def body(key: str) -> list[object]:
        began = round(anyio.current_time() - start, 6)
        runs[key].append(int(began))
        running[key] += 1
        peak[key] = max(peak[key], running[key])
        await anyio.sleep(scenario.durations[key])
        running[key] -= 1
        return [key, began]

    got: list[list[object]] = [[] for _ in scenario.calls]

    async def caller(i: int, key: str, arrival: int) -> None:
        await anyio.sleep(arrival)
        got[i] = await body(key)

    with anyio.fail_after(1_000):
        async with anyio.create_task_group() as tg:
            for i, (key, arrival) in enumerate(scenario.calls):
                tg.start_soon(caller, i, key, arrival)

    starts, served = expected_runs(scenario)
    assert runs == starts
    assert all(n <= 1 for n in peak.values()), peak
    assert got == [[key, float(s)] for (key, _), s in zip(scenario.calls, served, strict=True)]
