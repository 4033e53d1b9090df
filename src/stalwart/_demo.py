"""``python -m stalwart demo``: a flaky dependency made reliable, in virtual time."""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
from prometheus_client import CollectorRegistry

from . import _clock
from ._bulkhead import Bulkhead
from ._errors import StalwartError
from ._pipeline import Pipeline
from ._retry import Backoff, Retry
from ._retry_budget import RetryBudget
from ._telemetry import Telemetry
from ._timeout import Timeout
from .testing import VirtualClockEventLoop


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    attempts: int = 0
    latencies: list[float] | None = None

    def line(self, label: str, calls: int) -> str:
        lat = sorted(self.latencies or [0.0])
        p50 = statistics.median(lat)
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (
            f"  {label:<16} {self.ok:>4}/{calls} ok   {self.attempts / calls:4.2f} attempts/call"
            f"   p50 {p50 * 1000:7.1f} ms   p99 {p99 * 1000:8.1f} ms"
        )


def _downstream(rng: random.Random, tally: Tally) -> Callable[[], Coroutine[Any, Any, str]]:
    """30% of calls fail fast, 5% hang for a minute, the rest take ~20 ms."""

    async def call() -> str:
        tally.attempts += 1
        roll = rng.random()
        if roll < 0.30:
            await anyio.sleep(0.005)
            raise ConnectionError("connection reset by peer")
        if roll < 0.35:
            await anyio.sleep(60)
        await anyio.sleep(rng.uniform(0.010, 0.030))
        return "ok"

    return call


async def _drive(
    calls: int,
    guard: Callable[
        [Callable[[], Coroutine[Any, Any, str]]], Callable[[], Coroutine[Any, Any, str]]
    ],
    seed: int,
) -> Tally:
    tally = Tally(latencies=[])
    fn = guard(_downstream(random.Random(seed), tally))

    async def one() -> None:
        start = _clock.now()
        try:
            with anyio.fail_after(120):
                await fn()
            tally.ok += 1
        except (ConnectionError, StalwartError, TimeoutError):
            tally.failed += 1
        assert tally.latencies is not None
        tally.latencies.append(_clock.now() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(calls):
            tg.start_soon(one)
            await anyio.sleep(0.01)
    return tally


async def _main(calls: int, seed: int) -> None:
    registry = CollectorRegistry()
    telemetry = Telemetry(registry=registry)
    policy = Pipeline(
        Timeout(2.0, name="total", telemetry=telemetry),
        Retry(
            attempts=4,
            backoff=Backoff(initial=0.05, maximum=0.5),
            budget=RetryBudget(ratio=0.5),
            rng=random.Random(seed),
            name="retry",
            telemetry=telemetry,
        ),
        Bulkhead(32, max_queued=64, name="bulkhead", telemetry=telemetry),
        Timeout(0.25, name="attempt", telemetry=telemetry),
        name="demo",
        telemetry=telemetry,
    )
    print(
        f"{calls} calls at 100/s to a dependency where 30% of calls fail and 5% hang"
        " (virtual time):\n"
    )
    bare = await _drive(calls, lambda fn: fn, seed)
    print(bare.line("unprotected", calls))
    guarded = await _drive(calls, policy, seed)
    print(guarded.line("stalwart", calls))
    print("\nthe stalwart pipeline, outermost first:")
    for member in policy.policies:
        print(f"  {member!r}")
    print("\nits Prometheus metrics:")
    for family in registry.collect():
        for s in family.samples:
            if s.value and not s.name.endswith("_created"):
                labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
                print(f"  {s.name}{{{labels}}} {s.value:g}")


def main(calls: int = 1000, seed: int = 1) -> None:
    anyio.run(
        _main,
        calls,
        seed,
        backend="asyncio",
        backend_options={"loop_factory": VirtualClockEventLoop},
    )
