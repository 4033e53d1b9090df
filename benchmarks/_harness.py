"""A small, honest harness: interleaved rounds, medians, ratios in one run.

Shared machines are noisy, so absolute nanoseconds mean little: every case
runs in the same process, in the same rounds as its baseline, in shuffled
order, and the report divides medians measured side by side.

Each sample lasts about the same time whatever the case costs (``sample_ns``,
from a calibration made while warming up), so a slow peer cannot make the run
long, and a cheap case is still timed over thousands of calls. The garbage
collector is off while timing and runs between samples, so no case pays for
another's garbage.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import math
import random
import statistics
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

Call = Callable[[], Coroutine[Any, Any, Any]]


@dataclass
class Case:
    """One thing timed: a call made over and over.

    ``make`` builds the call once, inside the running event loop (it may be a
    coroutine function, for set-up that has to await); the call takes no
    arguments. A case without a ``baseline`` *is* a baseline. A case with a
    ``library`` is a peer's (stalwart's own cases have none); a ``reference``
    is neither, a point of comparison (what some part of a case costs alone).
    ``sync`` cases
    are plain functions, called rather than awaited; ``batch`` is how many
    calls each invocation makes (a contended case runs many tasks at once).
    """

    name: str
    make: Callable[[], Any]
    baseline: str | None = None  # name of the case this one is compared to
    budget: float | None = None  # allowed ratio to the baseline
    note: str = ""
    group: str = ""
    library: str | None = None
    reference: bool = False
    sync: bool = False
    batch: int = 1
    samples: list[float] = field(default_factory=list)

    @property
    def median_ns(self) -> float:
        return statistics.median(self.samples)

    @property
    def is_baseline(self) -> bool:
        return self.baseline is None

    @property
    def is_peer(self) -> bool:
        return self.library is not None

    @property
    def is_ours(self) -> bool:
        """One of stalwart's own cases (not a baseline, a peer's or a reference)."""
        return not (self.is_baseline or self.is_peer or self.reference)


async def _time(case: Case, call: Callable[[], Any], invocations: int) -> float:
    """Nanoseconds per call over ``invocations`` invocations of ``call``."""
    if case.sync:
        start = time.perf_counter_ns()
        for _ in range(invocations):
            call()
        elapsed = time.perf_counter_ns() - start
    else:
        start = time.perf_counter_ns()
        for _ in range(invocations):
            await call()
        elapsed = time.perf_counter_ns() - start
    return elapsed / (invocations * case.batch)


async def measure(
    cases: list[Case],
    *,
    rounds: int,
    calls: int | None = None,
    sample_ns: float = math.inf,
    n: int | None = None,
    seed: int = 0,
) -> None:
    """Time every case ``rounds`` times, in shuffled order, on any event loop.

    Each sample makes at most ``calls`` calls and lasts about ``sample_ns``
    (fewer calls for a slow case, never fewer than a handful). ``n``: exactly
    ``n`` calls per sample, however long they take (the older scripts' way).
    """
    if n is not None:
        calls, sample_ns = n, math.inf
    if calls is None:
        raise TypeError("measure() needs calls= (or n=)")
    # Cases are keyed by name (their calls, baselines, report rows): two of
    # one name would both time whichever call was built last.
    names = [case.name for case in cases]
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ValueError(f"case names must be unique, got twice: {twice}")
    rng = random.Random(seed)
    built: dict[str, Callable[[], Any]] = {}
    invocations: dict[str, int] = {}
    for case in cases:
        call = case.make()
        if inspect.isawaitable(call):
            call = await call
        built[case.name] = call
    for case in cases:  # warm up (first calls fill caches), then calibrate
        call = built[case.name]
        probe = max(1, calls // (50 * case.batch))
        await _time(case, call, probe)
        estimate = max(1.0, await _time(case, call, probe) * case.batch)
        most = max(1, calls // case.batch)
        fitting = most if math.isinf(sample_ns) else int(sample_ns / estimate)
        invocations[case.name] = max(min(most, 5), min(most, fitting))
    gc.collect()
    gc.freeze()  # what exists now is never garbage: keep collections short
    gc.disable()
    try:
        for _ in range(rounds):
            order = list(cases)
            rng.shuffle(order)
            for case in order:
                case.samples.append(await _time(case, built[case.name], invocations[case.name]))
                gc.collect()
    finally:
        gc.enable()
        gc.unfreeze()


def run(cases: list[Case], *, rounds: int, n: int) -> None:
    """`measure` on a new asyncio loop, ``n`` calls per sample."""
    asyncio.run(measure(cases, rounds=rounds, n=n))


def table(cases: list[Case]) -> str:
    """One flat table of every case (for the integration and Redis scripts)."""
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
