"""A small, honest harness: interleaved rounds, medians, ratios in one run.

Shared machines are noisy, so absolute nanoseconds mean little: every case
runs in the same process, in the same rounds as its baseline, in shuffled
order, and the report divides medians measured side by side.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

Call = Callable[[], Coroutine[Any, Any, Any]]


@dataclass
class Case:
    name: str
    make: Callable[[], Call]
    baseline: str | None = None  # name of the case this one is compared to
    budget: float | None = None  # allowed ratio to the baseline
    note: str = ""
    samples: list[float] = field(default_factory=list)

    @property
    def median_ns(self) -> float:
        return statistics.median(self.samples)


async def _time(call: Call, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        await call()
    return (time.perf_counter_ns() - start) / n


async def measure(cases: list[Case], *, rounds: int, n: int, seed: int = 0) -> None:
    """Run every case ``rounds`` times, ``n`` calls each, in shuffled order."""
    rng = random.Random(seed)
    calls = {case.name: case.make() for case in cases}
    for call in calls.values():  # warm up: first calls allocate caches
        await _time(call, max(1, n // 10))
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            order = list(cases)
            rng.shuffle(order)
            for case in order:
                case.samples.append(await _time(calls[case.name], n))
    finally:
        gc.enable()


def run(cases: list[Case], *, rounds: int, n: int) -> None:
    asyncio.run(measure(cases, rounds=rounds, n=n))


def table(cases: list[Case]) -> str:
    by_name = {c.name: c for c in cases}
    lines = [
        "| item | ns/call | ratio | budget | |",
        "|---|---:|---:|---:|---|",
    ]
    for case in cases:
        if case.baseline is None:
            lines.append(f"| {case.name} | {case.median_ns:,.0f} | baseline | | {case.note} |")
            continue
        base = by_name[case.baseline]
        ratio = case.median_ns / base.median_ns
        budget = f"≤ {case.budget:g}x" if case.budget is not None else ""
        verdict = ""
        if case.budget is not None:
            verdict = "ok" if ratio <= case.budget else "**over**"
        note = f"vs {case.baseline}" + (f"; {case.note}" if case.note else "")
        lines.append(
            f"| {case.name} | {case.median_ns:,.0f} | {ratio:.2f}x | {budget} | {verdict} {note} |"
        )
    return "\n".join(lines)
