"""From runs to answers: the numbers per setting, the ranking, the table and the JSON.

Definitions (the how-to and ``--help`` repeat them):

* **success**: the share of calls that returned, as their callers saw them;
* **latency**: from the start of a call to its outcome, failed calls included;
* **attempts/call**: attempts that reached the downstream, per call;
* **peak load**: the highest attempts-per-call over any `WINDOW` seconds
  that overlap the incident (the phases that are not healthy; the whole run
  if there are none): 1.0 is the load without retries;
* **detect**: from the start of the outage (else the brownout) to the
  breaker's first opening;
* **recover**: from the end of the outage (else the brownout) to the start of
  the first `WINDOW` seconds whose calls succeed about as often as before the
  incident (within 1 point, or 3 standard errors when calls are few);
* **open**: seconds the breaker spent rejecting calls.

Ranking: when there is an incident, settings whose peak load stays within
``max_load`` come first; then, in each group, higher success first
(differences under 0.1 point are ties), then lower peak load (or attempts per
call without an incident; within about 5% they are ties), then lower p99
latency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from .._version import __version__
from .engine import BUCKET, Run
from .scenario import Scenario, Setting

__all__ = ["DEFAULT_MAX_LOAD", "WINDOW", "Report", "Result", "summarize", "table_columns"]

#: Seconds over which load and success are measured (the default retry budget's window).
WINDOW: Final = 10

#: Peak load a setting may put on the downstream and still rank first.
DEFAULT_MAX_LOAD: Final = 1.5


@dataclass(frozen=True)
class Result:
    """The numbers of one setting."""

    setting: Setting
    run: Run
    calls: int
    success_rate: float
    attempts_per_call: float
    peak_load: float | None
    outage_load: float | None
    time_to_detect: float | None
    time_to_recover: float | None
    #: False: the callers never got back to their success rate of before the incident
    #: (None: no outage or brownout to recover from)
    recovered: bool | None

    @property
    def label(self) -> str:
        return self.setting.label

    @property
    def load(self) -> float:
        """The load figure the ranking uses: peak load, or attempts/call without one."""
        return self.attempts_per_call if self.peak_load is None else self.peak_load

    def to_json(self, rank: int) -> dict[str, Any]:
        run = self.run
        return {
            "rank": rank,
            "label": self.label,
            "options": _plain(self.setting.options),
            "calls": self.calls,
            "success_rate": _r(self.success_rate),
            "outcomes": dict(run.outcomes),
            "latency": {k: _r(v) for k, v in run.latency.items()},
            "attempts_per_call": _r(self.attempts_per_call),
            "peak_load": _r(self.peak_load),
            "outage_load": _r(self.outage_load),
            "time_to_detect": _r(self.time_to_detect),
            "time_to_recover": _r(self.time_to_recover),
            "recovered": self.recovered,
            "time_open": _r(run.time_open) if self.setting.has_breaker else None,
            "breaker_opened": len(run.opened_at) if self.setting.has_breaker else None,
            "downstream": {
                "attempts": sum(run.attempts),
                "failed": sum(run.failed),
                "served_for_nobody": sum(run.wasted),
            },
            "policies": {
                "retries": run.retries,
                "retries_exhausted": run.exhausted,
                "timeouts": run.timeouts,
                # calls each refusing policy refused: bulkhead_rejected, ...
                **{f"{name}_rejected": count for name, count in run.rejected_by.items()},
            },
            "last_call_ended": _r(run.end),
        }


def _r(value: float | None) -> float | None:
    """Rounded for JSON: 6 significant digits are more than a simulation is worth."""
    return None if value is None else float(f"{value:.6g}")


def _plain(value: Any) -> Any:
    """Options for JSON: unset labels left out."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not (k == "label" and v is None)}
    return value


@dataclass(frozen=True)
class Report:
    scenario: Scenario
    #: best first
    results: tuple[Result, ...]
    max_load: float

    @property
    def best(self) -> Result:
        return self.results[0]

    @property
    def worst(self) -> Result:
        return self.results[-1]

    def recommendation(self) -> str:
        """One line: the best setting, its numbers, and what the worst would have cost."""
        best, worst = self.best, self.worst
        line = f"Recommended: {best.label} ({_numbers(best, self.scenario)})"
        if len(self.results) > 1:
            line += f"; worst: {worst.label} ({_numbers(worst, self.scenario)})"
        if self.scenario.incident is not None and best.load > self.max_load:
            line += f". No setting kept the peak load within {self.max_load:g}x"
        return line + "."

    def to_json(self) -> dict[str, Any]:
        s = self.scenario
        return {
            "stalwart": __version__,
            "scenario": {
                "name": s.name,
                "description": s.description,
                "seed": s.seed,
                "summary": s.describe(),
                "incident": list(s.incident) if s.incident else None,
                "outage": list(s.core) if s.core else None,
            },
            "max_load": self.max_load,
            "recommendation": self.recommendation(),
            "settings": [r.to_json(rank) for rank, r in enumerate(self.results, 1)],
        }

    def table(self) -> str:
        return _table(self)


def _numbers(result: Result, scenario: Scenario) -> str:
    parts = [f"{_pct(result.success_rate)} success"]
    if result.peak_load is not None and scenario.incident is not None:
        parts.append(f"{result.peak_load:.2f}x peak load")
    else:
        parts.append(f"{result.attempts_per_call:.2f} attempts/call")
    parts.append(f"p99 {_secs(result.run.latency['p99'])}")
    if scenario.core is not None and result.setting.has_breaker:
        detect = "never" if result.time_to_detect is None else _secs(result.time_to_detect)
        parts.append(f"detects in {detect}")
    return ", ".join(parts)


# -- the numbers -----------------------------------------------------------------------


def _prefix(values: Sequence[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _starts_end(scenario: Scenario, run: Run) -> int:
    """Buckets in which calls could start (whole windows are taken within them)."""
    duration = scenario.traffic.duration
    if duration is None or scenario.traffic.mode == "closed":
        return len(run.calls)
    return min(len(run.calls), max(1, math.ceil(duration / BUCKET)))


def _measure(scenario: Scenario, setting: Setting, run: Run) -> Result:
    calls_total = sum(run.calls)
    attempts_total = sum(run.attempts)
    success = run.outcomes.get("ok", 0) / calls_total if calls_total else 0.0
    per_call = attempts_total / calls_total if calls_total else 0.0
    calls, attempts = _prefix(run.calls), _prefix(run.attempts)
    succeeded = _prefix(run.succeeded)
    horizon = _starts_end(scenario, run)
    w = max(1, min(WINDOW, horizon))

    def between(prefix: list[float], a: int, b: int) -> float:
        b = min(b, len(prefix) - 1)
        a = min(max(a, 0), b)
        return prefix[b] - prefix[a]

    incident = scenario.incident
    if incident is None:
        lo, hi = 0, horizon
    else:
        lo, hi = _b(incident[0]) - w + 1, _b(incident[1], up=True)
    peak: float | None = None
    for t in range(max(0, lo), max(0, min(hi, horizon - w + 1))):
        n = between(calls, t, t + w)
        if n:
            amplification = between(attempts, t, t + w) / n
            peak = amplification if peak is None else max(peak, amplification)
    if peak is None and calls_total:
        peak = per_call

    core = scenario.core
    outage_load = None
    detect = None
    recover = None
    recovered = None
    if core is not None:
        a, b = _b(core[0]), _b(core[1], up=True)
        n = between(calls, a, b)
        outage_load = between(attempts, a, b) / n if n else None
        if setting.has_breaker:
            assert incident is not None
            for opened in run.opened_at:
                if core[0] <= opened <= incident[1]:
                    detect = opened - core[0]
                    break
        recover, recovered = _recovery(scenario, run, calls, succeeded, horizon, w)
    return Result(
        setting=setting,
        run=run,
        calls=calls_total,
        success_rate=success,
        attempts_per_call=per_call,
        peak_load=peak,
        outage_load=outage_load,
        time_to_detect=detect,
        time_to_recover=recover,
        recovered=recovered,
    )


def _b(t: float, *, up: bool = False) -> int:
    return math.ceil(t / BUCKET) if up else int(t / BUCKET)


def _recovery(
    scenario: Scenario,
    run: Run,
    calls: list[float],
    succeeded: list[float],
    horizon: int,
    w: int,
) -> tuple[float | None, bool]:
    incident, core = scenario.incident, scenario.core
    assert incident is not None
    assert core is not None
    lead_in = min(_b(incident[0]), horizon)
    before = calls[lead_in]
    if before < 1 or lead_in < w:
        return None, True  # no healthy time before the incident to compare with
    baseline = succeeded[lead_in] / before
    start = _b(core[1], up=True)
    for t in range(start, horizon - w + 1):
        n = calls[t + w] - calls[t]
        if not n:
            continue
        rate = (succeeded[t + w] - succeeded[t]) / n
        tolerance = max(0.01, 3 * math.sqrt(baseline * (1 - baseline) / n))
        if rate >= baseline - tolerance:
            return t * BUCKET - core[1], True
    return None, False


def _load_step(load: float) -> int:
    """Loads within about 5% of each other rank as equal (steps of 5% on a log scale)."""
    return round(math.log(max(load, 1e-6)) / math.log(1.05))


def summarize(
    scenario: Scenario, runs: Sequence[Run], *, max_load: float = DEFAULT_MAX_LOAD
) -> Report:
    """Measure every run and rank the settings, best first."""
    results = [_measure(scenario, scenario.settings[run.index], run) for run in runs]
    results.sort(
        key=lambda r: (
            scenario.incident is not None and r.load > max_load + 1e-9,
            -round(r.success_rate, 3),
            _load_step(r.load),
            r.run.latency["p99"],
            r.setting.index,
        )
    )
    return Report(scenario=scenario, results=tuple(results), max_load=max_load)


# -- the table -------------------------------------------------------------------------


def _pct(share: float) -> str:
    if share >= 0.9995 and share < 1.0:
        return f"{share:.3%}"
    return f"{share:.1%}" if share < 0.999 else f"{share:.2%}"


def _secs(seconds: float) -> str:
    if seconds < 1.0:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def table_columns(report: Report) -> list[tuple[str, str, Any]]:
    """The table's columns for ``report``: (heading, alignment, the cell of a `Result`)."""
    s = report.scenario
    any_breaker = any(r.setting.has_breaker for r in report.results)
    columns: list[tuple[str, str, Any]] = [
        ("#", ">", None),
        ("setting", "<", None),
        ("success", ">", lambda r: _pct(r.success_rate)),
        ("p50", ">", lambda r: _secs(r.run.latency["p50"])),
        ("p99", ">", lambda r: _secs(r.run.latency["p99"])),
        ("p99.9", ">", lambda r: _secs(r.run.latency["p999"])),
        ("attempts/call", ">", lambda r: f"{r.attempts_per_call:.2f}"),
    ]
    if s.incident is not None:
        columns.append(("peak load", ">", lambda r: f"{r.peak_load:.2f}x"))
    if s.core is not None:
        if any_breaker:
            columns.append(
                (
                    "detect",
                    ">",
                    lambda r: (
                        "-"
                        if not r.setting.has_breaker
                        else ("never" if r.time_to_detect is None else _secs(r.time_to_detect))
                    ),
                )
            )
        columns.append(
            (
                "recover",
                ">",
                lambda r: (
                    "never"
                    if r.recovered is False
                    else ("-" if r.time_to_recover is None else _secs(r.time_to_recover))
                ),
            )
        )
    if any_breaker:
        columns.append(
            ("open", ">", lambda r: _secs(r.run.time_open) if r.setting.has_breaker else "-")
        )
    if s.traffic.mode == "closed" and s.traffic.calls is not None:
        columns.append(("all done", ">", lambda r: _secs(r.run.end)))
    return columns


def _table(report: Report) -> str:
    s = report.scenario
    columns = table_columns(report)
    rows = []
    for rank, result in enumerate(report.results, 1):
        row = [str(rank), result.label]
        row += [fn(result) for _, _, fn in columns[2:]]
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for (_, align, _), width, cell in zip(columns, widths, cells, strict=True):
            out.append(cell.ljust(width) if align == "<" else cell.rjust(width))
        return "  ".join(out).rstrip()

    title = f"Scenario {s.name!r}"
    if s.description:
        title += f": {s.description}"
    lines = [title, s.describe() + "."]
    lines.append(
        f"{len(report.results)} setting{'s' if len(report.results) != 1 else ''}, "
        f"seed {s.seed}, virtual time."
        + (f" Options that do not vary: {s.common}." if s.common else "")
    )
    lines.append("")
    lines.append(line([h for h, _, _ in columns]))
    over = False
    for result, row in zip(report.results, rows, strict=True):
        if not over and s.incident is not None and result.load > report.max_load + 1e-9:
            over = True
            if result is not report.best:
                lines.append(f"  (over {report.max_load:g}x peak load on the downstream:)")
        lines.append(line(row))
    lines.append("")
    lines.extend(_legend(s, [h for h, _, _ in columns[2:]]))
    lines.append("")
    lines.append(report.recommendation())
    return "\n".join(lines).rstrip() + "\n"


def _legend(scenario: Scenario, shown: Sequence[str]) -> list[str]:
    """What each column shown means, one line each (the module docstring says it in full)."""
    kinds = {p.kind for p in scenario.downstream.timeline}
    if scenario.traffic.surges:
        kinds.add("surge")
    core = next((k for k in ("outage", "brownout", "recovery", "surge") if k in kinds), "incident")
    meanings = {
        "success": "calls that returned, as their callers saw them",
        "latency": "time from a call's start to its outcome, failed calls included",
        "attempts/call": (
            "attempts that reached the downstream, per call (rejected calls made none)"
        ),
        "peak load": (
            f"most attempts per call over any {WINDOW} s around the incident (1.00x: no retries)"
        ),
        "detect": f"from the start of the {core} to the breaker's first opening",
        "recover": f"from the end of the {core} until calls succeed about as often as before",
        "open": "time the breaker spent rejecting calls",
        "all done": "when the last call ended",
        "run": (
            "live: against the service; sim: simulated, with the round trip measured "
            "live (in brackets); diff: live minus sim (peak load: relative)"
        ),
    }
    rows = []
    for n in shown:
        if n not in ("p50", "p99", "p99.9"):
            rows.append((n, meanings[n]))
        elif n == "p50":
            rows.append(("p50 p99 p99.9", meanings["latency"]))
    width = max(len(name) for name, _ in rows)
    return [f"  {name.ljust(width)}  {meaning}" for name, meaning in rows]
