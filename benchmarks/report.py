"""The Markdown report: a table per group, ratios to baselines and to the best peer."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date

import stalwart

from . import hot_path, scaling, telemetry_cost, trio_cases
from ._harness import Case
from .peer_cases import OPTIONAL, version

OTHER_VERSIONS = ("anyio", "trio", "opentelemetry-sdk", "prometheus-client")

GROUP_NOTES = {
    hot_path.RETRY_FAILING: (
        "Every peer sleeps 0 s between tries when told not to wait, which is a "
        "trip through the event loop; stalwart skips a sleep of 0, and the "
        "hand-written loop never sleeps."
    ),
    hot_path.CLOSED: (
        "The peers count consecutive failures; stalwart keeps a failure rate "
        "over the last 100 calls (its default window). pybreaker is timed on "
        "its synchronous path, against a bare synchronous call: its async "
        "decorator returns the coroutine without awaiting it, so it never "
        "sees a failure. Its ratio is not comparable with the others', and it "
        "is never the best peer."
    ),
    hot_path.OPEN: (
        "Each breaker is open (for an hour, or forced open) and every call is "
        "rejected and the rejection caught, against a coroutine that raises "
        "and is caught. pybreaker: synchronous, against a synchronous raise."
    ),
    hot_path.BREAKER_OPTIONS: (
        "stalwart only: a TimeWindow and slow-call detection read the clock; "
        "with 1 call in 10 failing the window really turns over; a result "
        "predicate runs on every call; an open shadow breaker (observe mode) "
        "counts each call as a rejection and runs it."
    ),
    hot_path.CONTENDED: (
        f"{hot_path.TASKS} tasks at once, each making {hot_path.PER_TASK} calls of "
        "a function that yields once (`await asyncio.sleep(0)`), through "
        f"{hot_path.SLOTS} slots, against the same tasks with no limit; ns per call."
    ),
    hot_path.TIMEOUT: "10 seconds, never reached.",
    hot_path.IDEMPOTENCY: "No peer in the set offers idempotency keys: no peer rows.",
    hot_path.HEDGE: (
        "No peer in the set hedges: no peer rows. On asyncio the first attempt runs in the "
        "caller's task; only a call still running at its delay starts a task for its hedges. "
        "With a fixed delay the call adds a record to its policy's queue for the loop, "
        "in start order, which is due order: one loop timer per policy and loop serves "
        "them all, and a call arms nothing. An `AdaptiveDelay`'s calls are due out of "
        "order: each has an entry in the loop's timer heap (as a `Timeout`'s deadline). "
        "The call also copies its context (for the hedges) and notes the task's "
        "cancellation count and anyio scope (to interrupt the first attempt if a hedge wins)."
    ),
    hot_path.PIPELINE: (
        "hyx is the only peer with all four policies: its decorators stacked in the same order."
    ),
    telemetry_cost.GROUP: (
        "The SDK rows use a `TracerProvider` with one span processor that only "
        "counts ended spans, passed as `sw.Telemetry(tracer_provider=...)` (the "
        "global provider is never set). The budget compares the traced pipeline "
        "with one bare span; a span carrying the attribute the contract asks for, "
        "opened the usual way around the same pipeline without SDK, shows what "
        "the contract alone costs. "
        "Every row counts each call's outcome (`stalwart_calls_total`): the "
        "pipeline and each of its four policies add one to a plain integer, "
        "five increments a call, which a scrape reads (as it reads the gauges); "
        "nothing switches that off, and no Prometheus object is touched per "
        "call. Metrics on and off, as far as they can be: the pipeline behind "
        "a call counter with its registry never scraped, and scraped every "
        f"{telemetry_cost.SCRAPE_EVERY:,} calls: the two differ by the scrapes alone."
    ),
}


@dataclass
class Results:
    """Everything one run measured."""

    main: list[Case]
    trio: list[Case]
    telemetry: list[Case]
    scrape_ns: float | None  # None: the telemetry phase's scrape was not timed
    windows: list[scaling.WindowRow]
    queues: list[scaling.QueueRow]
    keys: list[scaling.KeysRow]
    limiter_keys: list[scaling.LimiterKeysRow]
    memory: list[tuple[str, str, float, float | None]]  # item, library, bytes, budget
    rounds: int
    calls: int
    sample_ms: float
    seconds: float = 0.0
    missing: list[str] = field(default_factory=list)


@dataclass
class Check:
    item: str
    value: float
    budget: float
    unit: str  # "x" (a ratio) or " B"

    @property
    def ok(self) -> bool:
        return self.value <= self.budget

    def __str__(self) -> str:
        figure = f"{self.value:.2f}x" if self.unit == "x" else f"{self.value:,.0f} B"
        return f"{self.item}: {figure} (budget ≤ {self.budget:g}{self.unit})"


# -- machine -------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_tag() -> str:
    """A short name for this machine, for result file names: ``amd-epyc-2c``."""
    model = re.sub(r"\((?:r|tm)\)|\bcpu\b|\bprocessor\b|@.*", "", cpu_model().lower())
    words = re.findall(r"[a-z0-9]+", model)[:3] or ["cpu"]
    return "-".join([*words, f"{os.cpu_count() or 1}c"])


def result_stem(today: date | None = None) -> str:
    return f"{(today or date.today()).isoformat()}-{machine_tag()}"


# -- tables --------------------------------------------------------------------


def ns(value: float) -> str:
    return f"{value:,.0f}"


def ratio(value: float) -> str:
    return f"{value:.2f}x"


def checks(results: Results) -> list[Check]:
    """Every budget of the run, in report order."""
    found = []
    for cases in (results.main, results.telemetry):
        by_name = {case.name: case for case in cases}
        for case in cases:
            if case.budget is not None and case.baseline is not None:
                value = case.median_ns / by_name[case.baseline].median_ns
                found.append(Check(case.name, value, case.budget, "x"))
    for item, _, size, budget in results.memory:
        if budget is not None:
            found.append(Check(f"memory per {item}", size, budget, " B"))
    return found


def group_table(cases: Sequence[Case], group: str) -> str:
    """The table of one group: its baselines, stalwart's rows, the peers' rows."""
    by_name = {case.name: case for case in cases}
    members = [case for case in cases if case.group == group and not case.is_baseline]
    ours = [case for case in members if case.is_ours]
    references = [case for case in members if case.reference]
    peers = sorted((case for case in members if case.is_peer), key=lambda c: c.median_ns)
    baselines: list[Case] = []
    for case in members:
        assert case.baseline is not None
        base = by_name[case.baseline]
        if base not in baselines:
            baselines.append(base)
    # Peers are ranked against stalwart's rows of the same baseline only (a
    # synchronous peer, against a synchronous baseline, is not comparable).
    ranked = {case.baseline for case in ours}
    best: dict[str, float] = {}  # baseline name -> fastest peer's ns
    for case in peers:
        if case.baseline in ranked:
            assert case.baseline is not None
            best.setdefault(case.baseline, case.median_ns)
    lines = [
        "| item | library | ns/call | ratio | budget | | vs best peer | notes |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    lines += [f"| {base.name} | | {ns(base.median_ns)} | baseline | | | | |" for base in baselines]
    for case in [*references, *ours, *peers]:
        assert case.baseline is not None
        value = case.median_ns / by_name[case.baseline].median_ns
        budget = verdict = ""
        if case.budget is not None:
            budget = f"≤ {case.budget:g}x"
            verdict = "ok" if value <= case.budget else "**over**"
        fastest = best.get(case.baseline)
        if fastest is None or case.reference:
            versus = "—"
        elif case.is_peer and case.median_ns == fastest:
            versus = "best peer"
        else:
            versus = ratio(case.median_ns / fastest)
        notes = [case.note] if case.note else []
        if len(baselines) > 1:
            notes.insert(0, f"vs {case.baseline}")
        library = "reference" if case.reference else case.library or "**stalwart**"
        lines.append(
            f"| {case.name} | {library} | {ns(case.median_ns)} | {ratio(value)} | {budget} "
            f"| {verdict} | {versus} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def groups_section(cases: Sequence[Case], groups: Iterable[str]) -> list[str]:
    out = []
    for group in groups:
        if not any(case.group == group for case in cases):
            continue
        out += [f"#### {group}", "", group_table(cases, group), ""]
        if group in GROUP_NOTES:
            out += [GROUP_NOTES[group], ""]
    return out


def windows_table(rows: Sequence[scaling.WindowRow]) -> str:
    lines = [
        "| window | closed, success: ns/call | 1 in 10 fails: ns/call "
        "| vs the smallest window | memory per breaker |",
        "|---|---:|---:|---:|---:|",
    ]
    smallest: dict[str, float] = {}  # kind of window -> its first row's cost
    for row in rows:
        base = smallest.setdefault(row.window.split("(")[0], row.one_in_ten.median_ns)
        lines.append(
            f"| {row.window} | {ns(row.success.median_ns)} | {ns(row.one_in_ten.median_ns)} "
            f"| {ratio(row.one_in_ten.median_ns / base)} | {row.bytes_per_breaker:,.0f} B |"
        )
    return "\n".join(lines)


def queues_table(rows: Sequence[scaling.QueueRow]) -> str:
    lines = [
        "| calls queued | Bulkhead(1, max_queued=None): ns/call | asyncio.Semaphore(1): ns/call "
        "| ratio | vs the shortest queue |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row.waiting:,} | {ns(row.bulkhead_ns)} | {ns(row.semaphore_ns)} "
        f"| {ratio(row.bulkhead_ns / row.semaphore_ns)} "
        f"| {ratio(row.bulkhead_ns / rows[0].bulkhead_ns)} |"
        for row in rows
    ]
    return "\n".join(lines)


def keys_table(rows: Sequence[scaling.KeysRow]) -> str:
    lines = [
        f"| distinct keys | first execution: ns/call | memory held, max_entries={scaling.BOUND:,} "
        "| replay: ns/call | memory held, max_entries=keys | per record |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row.keys:,} | {ns(row.first_ns)} | {mb(row.bounded_bytes)} | {ns(row.replay_ns)} "
        f"| {mb(row.holding_bytes)} | {row.holding_bytes / row.keys:,.0f} B |"
        for row in rows
    ]
    return "\n".join(lines)


def limiter_keys_table(rows: Sequence[scaling.LimiterKeysRow]) -> str:
    lines = [
        "| keys held | random keys: ns/call | vs the fewest keys | one key: ns/call "
        "| vs the fewest keys | memory held | per key |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row.keys:,} | {ns(row.random_ns)} | {ratio(row.random_ns / rows[0].random_ns)} "
        f"| {ns(row.same_ns)} | {ratio(row.same_ns / rows[0].same_ns)} "
        f"| {mb(row.held_bytes)} | {row.held_bytes / row.keys:,.0f} B |"
        for row in rows
    ]
    return "\n".join(lines)


def mb(size: float) -> str:
    return f"{size / 1e6:,.2f} MB" if size >= 1e5 else f"{size / 1e3:,.1f} kB"


def memory_table(rows: Sequence[tuple[str, str, float, float | None]]) -> str:
    lines = ["| item | library | bytes | budget | |", "|---|---|---:|---:|---|"]
    for item, library, size, budget in rows:
        verdict = "" if budget is None else ("ok" if size <= budget else "**over**")
        limit = "" if budget is None else f"≤ {budget:g}"
        lines.append(f"| {item} | {library} | {size:,.0f} | {limit} | {verdict} |")
    return "\n".join(lines)


# -- the report ------------------------------------------------------------------


def versions_line(names: Iterable[str]) -> str:
    found = [f"{name} {version(name)}" for name in names if version(name) is not None]
    return ", ".join(found) or "none installed"


def render(results: Results, *, chart: str | None = None, today: date | None = None) -> str:
    found = checks(results)
    missed = [check for check in found if not check.ok]
    python = f"{platform.python_version()} ({platform.python_implementation()})"
    out = [
        "### The run",
        "",
        "| | |",
        "|---|---|",
        f"| date | {(today or date.today()).isoformat()} |",
        f"| machine | {cpu_model()}, {os.cpu_count()} cores ({platform.machine()}, "
        f"{platform.system()} {platform.release()}) |",
        f"| Python | {python} |",
        f"| stalwart | {stalwart.__version__} |",
        f"| peers | {versions_line(OPTIONAL)} |",
        f"| also | {versions_line(OTHER_VERSIONS)} |",
        f"| rounds | {results.rounds} interleaved rounds, each sample at most "
        f"{results.calls:,} calls or about {results.sample_ms:g} ms; medians |",
        f"| wall time | {results.seconds:.0f} s |",
        "",
    ]
    if results.missing:
        out += [f"Not installed, so not measured: {', '.join(results.missing)}.", ""]
    if missed:
        out += [f"**Budgets: {len(found) - len(missed)} of {len(found)} met.** Over:", ""]
        out += [f"- {check}" for check in missed]
        out.append("")
    else:
        out += [f"**Budgets: all {len(found)} met.**", ""]
    if chart is not None:
        out += [f"![Ratios to baseline, stalwart and its peers, log scale]({chart})", ""]
    if results.main:
        out += [
            "### Hot path, asyncio",
            "",
            "*ratio*: ns/call over the ns/call of the row's baseline (the first "
            "rows of its table), measured in the same rounds. *vs best peer*: "
            "ns/call over that of the fastest peer row with the same baseline "
            "(below 1.00x: faster than every peer).",
            "",
        ]
        out += groups_section(results.main, hot_path.GROUPS)
    if results.trio:
        out += ["### trio", "", "The same, on trio, in one `trio.run`.", ""]
        out += groups_section(results.trio, trio_cases.GROUPS)
    if results.telemetry:
        out += ["### Telemetry", ""]
        out += groups_section(results.telemetry, [telemetry_cost.GROUP])
    if results.scrape_ns is not None:
        out += [
            f"One scrape of that registry (`generate_latest`, the pipeline's four "
            f"policies on it) takes {results.scrape_ns / 1000:,.1f} µs.",
            "",
        ]
    # A run of selected rows (``run.py --only``) measures no scaling and no memory.
    if results.windows or results.queues or results.keys or results.limiter_keys:
        out += scaling_section(results)
    if results.memory:
        out += [
            "### Memory per breaker",
            "",
            memory_table(results.memory),
            "",
            "By tracemalloc, kept per breaker over many made in a row; the peers' "
            "breakers as their constructors make them.",
            "",
        ]
    return "\n".join(out)


def scaling_section(results: Results) -> list[str]:
    return [
        "### Scaling",
        "",
        "#### CircuitBreaker: the window's size",
        "",
        windows_table(results.windows),
        "",
        "Memory per breaker by tracemalloc; *vs the smallest window*: the "
        "1-in-10-fails cost over that of the smallest window of the same kind.",
        "",
        "#### Bulkhead: calls queued",
        "",
        queues_table(results.queues),
        "",
        "One slot and K other calls waiting for it: every call queues behind "
        "K others, is handed the slot, yields once inside it and hands it on; "
        "ns per call (a task switch included), against `asyncio.Semaphore(1)` "
        "with the same K waiters.",
        "",
        "#### Idempotency: distinct keys through the in-process store",
        "",
        keys_table(results.keys),
        "",
        f"First executions: one call per key, through `MemoryStore(max_entries="
        f"{scaling.BOUND:_})` (the default bound), which evicts the least recently "
        "used record once full. Replays: random keys from a store holding "
        "every key. Memory held: `sys.getsizeof` over everything the store "
        "reaches.",
        "",
        "#### RateLimiter(key=...): keys held",
        "",
        limiter_keys_table(results.limiter_keys),
        "",
        "A limiter whose `max_keys` is the number of keys, holding a bucket for "
        "each (one call per key first), at a rate no run reaches: every call "
        "finds a permit. Random keys: calls on keys drawn at random from those "
        "held; one key: the same key over and over, the work of a call without "
        "the CPU cache misses of a big table. Memory held: `sys.getsizeof` over "
        "everything the limiter's key table reaches.",
        "",
    ]
