"""Scenarios: what the simulated downstream does, who calls it, and which settings to compare.

A scenario is read from TOML (`load`, `parse_text`) or from a dict already
parsed (`from_dict`, which the tests use to shrink the built-in scenarios),
validated against `schema`, and resolved into frozen dataclasses the engine
reads: the timeline becomes absolute phases, the grid a list of `Setting` s,
each of which can build its real stalwart policies (`Setting.policies`).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from opentelemetry.trace import NoOpTracerProvider
from prometheus_client import CollectorRegistry

from .._circuit_breaker import _DEFAULT_FAILURE_RATE
from .._matchers import ExceptionMatcher
from .._policy import Policy
from .._telemetry import Telemetry
from . import builtin, schema
from .schema import GRID, SCENARIO, Field, Problems, ScenarioError, Table

__all__ = [
    "MAX_SETTINGS",
    "Downstream",
    "Latency",
    "Phase",
    "Quota",
    "RatePhase",
    "Scenario",
    "ScenarioError",
    "Setting",
    "Traffic",
    "from_dict",
    "load",
    "parse_text",
]

#: A grid larger than this is refused: each setting simulates the whole scenario.
MAX_SETTINGS: Final = 1000

# z-score of the 99th percentile of a standard normal distribution.
_Z99: Final = 2.3263478740408408


@dataclass(frozen=True)
class Latency:
    """A log-normal service time, given by its median and 99th percentile."""

    median: float
    p99: float

    @property
    def mu(self) -> float:
        return math.log(self.median)

    @property
    def sigma(self) -> float:
        return math.log(self.p99 / self.median) / _Z99

    def scaled(self, factor: float) -> Latency:
        return Latency(self.median * factor, self.p99 * factor)

    def describe(self) -> str:
        if self.p99 == self.median:
            return f"{_duration(self.median)} each"
        return f"median {_duration(self.median)}, p99 {_duration(self.p99)}"


@dataclass(frozen=True)
class Phase:
    """One phase of the timeline, at absolute times.

    A recovery ramps from ``error_rate`` and ``latency`` to ``end_error_rate``
    and ``end_latency``; other phases have equal start and end values.
    """

    kind: str
    start: float
    end: float
    error_rate: float
    latency: Latency
    end_error_rate: float
    end_latency: Latency
    failure: str

    @property
    def duration(self) -> float:
        return self.end - self.start

    def describe(self) -> str:
        what = self.kind
        if self.kind == "outage":
            rate = "" if self.error_rate == 1.0 else f"{self.error_rate:.0%} "
            what = f"outage ({rate}{self.failure})"
        elif self.kind == "brownout":
            what = f"brownout ({self.latency.describe()})"
        return f"{what} {_duration(self.duration)}"


@dataclass(frozen=True)
class RatePhase:
    """A phase of the traffic's timeline, at absolute times: its calls per second."""

    start: float
    end: float
    rate: float


@dataclass(frozen=True)
class Traffic:
    mode: str
    rate: float | None
    clients: int | None
    think_time: float
    calls: int | None
    #: seconds during which calls start; None: until each closed client made its ``calls``
    duration: float | None
    deadline: float
    #: open traffic: the phases of the timeline (after them: ``rate``)
    timeline: tuple[RatePhase, ...] = ()

    @property
    def surges(self) -> tuple[RatePhase, ...]:
        """The phases above the base rate."""
        return tuple(p for p in self.timeline if self.rate is not None and p.rate > self.rate)

    def describe(self) -> str:
        if self.mode == "open":
            assert self.rate is not None
            assert self.duration is not None
            text = f"{_duration(self.duration)} of traffic at {self.rate:g} calls/s"
            changes = [
                f"{p.rate:g} calls/s from {_duration(p.start)} to {_duration(p.end)}"
                for p in self.timeline
                if p.rate != self.rate
            ]
            return f"{text} ({', '.join(changes)})" if changes else text
        think = f", thinking {_duration(self.think_time)}" if self.think_time else ""
        if self.calls is not None:
            calls = f"{self.calls} call{'s' if self.calls != 1 else ''} each"
            within = f" within {_duration(self.duration)}" if self.duration is not None else ""
            return f"{self.clients} clients, {calls}{think}{within}"
        assert self.duration is not None
        return f"{self.clients} clients calling for {_duration(self.duration)}{think}"


@dataclass(frozen=True)
class Quota:
    """A rate limit the downstream enforces: ``rate`` requests a second, ``burst`` at once."""

    rate: float
    burst: int

    def describe(self) -> str:
        return f"quota {self.rate:g}/s (burst {self.burst})"


@dataclass(frozen=True)
class Downstream:
    latency: Latency
    error_rate: float
    error_latency: float
    capacity: int | None
    queue: int | None
    serves_abandoned: bool
    timeline: tuple[Phase, ...]
    #: seconds per attempt outside the downstream (network, HTTP stacks), half each way
    round_trip: float = 0.0
    #: the rate limit it enforces (before anything else), if any
    quota: Quota | None = None

    def at(self, t: float) -> tuple[float, float, float, bool]:
        """The profile ``t`` seconds into the timeline: (error rate, mu, sigma, hangs).

        ``mu`` and ``sigma`` are the log-normal latency's parameters; a
        recovery's values are interpolated. Before 0 and after the last phase:
        the base profile. Any ``t``, in any order (the engine's own cursor
        only moves forward).
        """
        phases = self.timeline
        i = bisect.bisect_right(self._starts, t) - 1
        if i < 0 or t >= phases[i].end:
            return self.error_rate, self.latency.mu, self.latency.sigma, False
        p = phases[i]
        hangs = p.failure == "hangs"
        share = (t - p.start) / p.duration
        if share <= 0.0 or (p.latency == p.end_latency and p.error_rate == p.end_error_rate):
            return p.error_rate, p.latency.mu, p.latency.sigma, hangs
        e0, m0, s0 = p.error_rate, p.latency.mu, p.latency.sigma
        return (
            e0 + (p.end_error_rate - e0) * share,
            m0 + (p.end_latency.mu - m0) * share,
            s0 + (p.end_latency.sigma - s0) * share,
            hangs,
        )

    @functools.cached_property
    def _starts(self) -> list[float]:
        return [p.start for p in self.timeline]

    def describe(self) -> str:
        parts = [f"latency {self.latency.describe()}", f"{self.error_rate:.2%} errors"]
        if self.round_trip:
            parts.append(f"round trip {_duration(self.round_trip)}")
        if self.capacity is not None:
            queue = "unbounded queue" if self.queue is None else f"queue {self.queue}"
            parts.append(f"{self.capacity} at once, {queue}")
        if self.quota is not None:
            parts.append(self.quota.describe())
        return ", ".join(parts)


@dataclass(frozen=True)
class Setting:
    """One point of the grid: the options of each policy (None: not used)."""

    index: int
    label: str
    #: ``{"retry": {...} | None, "breaker": ..., "bulkhead": ..., "timeout": float | None}``
    options: Mapping[str, Any]

    @property
    def has_breaker(self) -> bool:
        return self.options["breaker"] is not None

    @property
    def open_for(self) -> float:
        breaker = self.options["breaker"]
        return 0.0 if breaker is None else float(breaker["open_for"])

    def policies(
        self,
        telemetry: Telemetry,
        rng: random.Random,
        *,
        breaker_telemetry: Telemetry | None = None,
        failure: ExceptionMatcher = Exception,
        overloaded: ExceptionMatcher = Exception,
    ) -> list[Policy]:
        """The real stalwart policies of this setting, outermost first.

        Named after their grid sections (``retry``, ``throttle``, ``breaker``,
        ``concurrency``, ``bulkhead``, ``timeout``); each `Retry` gets a
        `RetryBudget` of its own when configured (so one setting's calls
        share one budget). The breaker reports to ``breaker_telemetry`` when
        given (the engine listens to it there). ``failure`` and
        ``overloaded`` (exception types or predicates) say how the
        downstream's failure of an attempt shows, and its refusal because it
        is overloaded: the throttle's rejections and the concurrency limit's
        drops (the simulated downstream raises `DownstreamError` and
        `Overloaded`; live, the runner reads the transport's errors).
        """
        build = schema.Build(
            telemetry, rng, breaker_telemetry or telemetry, failure=failure, overloaded=overloaded
        )
        return [
            _built(section, schema.unlabelled(self.options[section.name]), build)
            for section in schema.SECTIONS
            if self.options[section.name] is not None
        ]


def _built(section: schema.Section, options: Any, build: schema.Build) -> Policy:
    return schema.made(f"grid.{section.name}", lambda: section.build(options, build))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    traffic: Traffic
    downstream: Downstream
    settings: tuple[Setting, ...]
    #: the options every setting shares, those that differ from stalwart's defaults
    common: str

    @property
    def incident(self) -> tuple[float, float] | None:
        """From the start of the first phase that is not healthy (or surge of traffic) to the
        end of the last one."""
        spans = [(p.start, p.end) for p in self.downstream.timeline if p.kind != "healthy"]
        spans += [(p.start, p.end) for p in self.traffic.surges]
        if not spans:
            return None
        return min(start for start, _ in spans), max(end for _, end in spans)

    @property
    def core(self) -> tuple[float, float] | None:
        """The outage phases (or else the brownouts, the recoveries, the surges of traffic),
        first to last.

        Detection is timed from its start, recovery from its end.
        """
        for kind in ("outage", "brownout", "recovery"):
            phases = [p for p in self.downstream.timeline if p.kind == kind]
            if phases:
                return (phases[0].start, phases[-1].end)
        surges = self.traffic.surges
        return (surges[0].start, surges[-1].end) if surges else None

    def describe(self) -> str:
        parts = [self.traffic.describe()]
        if self.downstream.timeline:
            parts.append(
                "downstream: " + ", then ".join(p.describe() for p in self.downstream.timeline)
            )
        if self.downstream.quota is not None:
            parts.append(f"downstream {self.downstream.quota.describe()}")
        return "; ".join(parts)


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    if seconds >= 1:
        return f"{seconds:g} s"
    return f"{seconds * 1000:g} ms"


# -- reading ---------------------------------------------------------------------------


def load(path: str | Path) -> Scenario:
    """Read and validate a scenario file; its name defaults to the file's stem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ScenarioError([("", f"cannot read {path}: {reason}")], str(path)) from None
    except UnicodeDecodeError:
        raise ScenarioError([("", "not UTF-8 text")], str(path)) from None
    return parse_text(text, name=path.stem, source=str(path))


def parse_text(text: str, *, name: str, source: str | None = None) -> Scenario:
    """Validate a scenario written in TOML."""
    source = source or name
    return from_dict(schema.loads_toml(text, source), name=name, source=source)


def from_dict(data: Mapping[str, Any], *, name: str, source: str | None = None) -> Scenario:
    """Validate a scenario already parsed from TOML; raise `ScenarioError` with every problem."""
    source = source or name
    problems = Problems()
    top = schema.check_table(dict(data), SCENARIO, "", problems)
    traffic_in = top.get("traffic", {})
    downstream_in = top.get("downstream", {})
    timeline = _timeline(downstream_in, problems)
    traffic = _traffic(traffic_in, timeline, problems)
    downstream = _downstream(downstream_in, timeline, problems)
    grid_in = data.get("grid") if "grid" in data else _default_grid()
    settings, common = _grid(grid_in, problems) if isinstance(grid_in, (dict, list)) else ((), "")
    problems.raise_if_any(source)
    assert traffic is not None
    assert downstream is not None
    return Scenario(
        name=top["name"] or name,
        description=top["description"],
        seed=top["seed"],
        traffic=traffic,
        downstream=downstream,
        settings=settings,
        common=common,
    )


def _default_grid() -> dict[str, Any]:
    """The grid of the built-in ``outage`` scenario: what a scenario without one compares."""
    outage = builtin.NAMES[0]
    grid: dict[str, Any] = schema.loads_toml(builtin.text(outage), outage)["grid"]
    return grid


def _latency(raw: Mapping[str, Any] | None, path: str, problems: Problems) -> Latency | None:
    if raw is None or "median" not in raw:
        return None
    median = raw["median"]
    p99 = raw.get("p99")
    if p99 is None:
        return Latency(median, median)
    if p99 < median:
        problems.add(f"{path}.p99", f"must be ≥ median ({median:g}), got {p99:g}")
        return None
    return Latency(median, p99)


def _timeline(raw: Mapping[str, Any], problems: Problems) -> list[dict[str, Any]] | None:
    """The timeline's entries after the checks that need several keys; None if broken."""
    entries = raw.get("timeline")
    if "timeline" not in raw:
        return None  # it had problems
    if entries is None:
        return []
    ok = True
    for i, entry in enumerate(entries):
        path = f"downstream.timeline[{i}]"
        if not isinstance(entry, dict):
            ok = False
            continue
        if "phase" not in entry or "duration" not in entry:
            ok = False
        kind = entry.get("phase")
        if kind is None:
            continue
        if entry.get("slowdown") is not None and kind != "brownout":
            problems.add(f"{path}.slowdown", f"only a brownout has a slowdown, not a {kind} phase")
            ok = False
        if kind == "brownout" and entry.get("slowdown") is not None and entry.get("latency"):
            problems.add(f"{path}.slowdown", "give either slowdown or latency, not both")
            ok = False
        if kind == "recovery":
            for key in ("error_rate", "latency"):
                if entry.get(key) is not None:
                    problems.add(
                        f"{path}.{key}",
                        "a recovery ramps from the previous phase to the base profile; "
                        f"it takes no {key}",
                    )
                    ok = False
        latency = entry.get("latency")
        if latency is not None and _latency(latency, f"{path}.latency", problems) is None:
            ok = False
    return entries if ok else None


def _traffic(
    raw: Mapping[str, Any], timeline: list[dict[str, Any]] | None, problems: Problems
) -> Traffic | None:
    mode = raw.get("mode")
    if mode == "open":
        if "rate" in raw and raw["rate"] is None:
            problems.add("traffic.rate", 'missing: open traffic (mode = "open") needs a rate')
        for key in ("clients", "calls"):
            if raw.get(key) is not None:
                problems.add(f"traffic.{key}", 'only closed traffic (mode = "closed") has ' + key)
        if raw.get("think_time"):
            problems.add("traffic.think_time", 'only closed traffic (mode = "closed") thinks')
    elif mode == "closed":
        if "clients" in raw and raw["clients"] is None:
            problems.add(
                "traffic.clients", 'missing: closed traffic (mode = "closed") needs clients'
            )
        if raw.get("rate") is not None:
            problems.add("traffic.rate", 'only open traffic (mode = "open") has a rate')
        if raw.get("timeline"):
            problems.add(
                "traffic.timeline", 'only open traffic (mode = "open") has a timeline of rates'
            )
    phases = _rate_phases(raw)
    duration = raw.get("duration")
    if duration is None:
        lengths = [sum(entry["duration"] for entry in timeline or ())]
        lengths.append(phases[-1].end if phases else 0.0)
        duration = max(lengths) or None
    if (
        "duration" in raw
        and duration is None
        and timeline is not None
        and not (mode == "closed" and raw.get("calls") is not None)
    ):
        problems.add(
            "traffic.duration",
            "missing: give a duration, a downstream.timeline"
            + (", or calls per client" if mode == "closed" else ""),
        )
    needed = ("mode", "rate", "clients", "think_time", "calls", "duration", "deadline", "timeline")
    if any(key not in raw for key in needed):
        return None
    return Traffic(
        mode=raw["mode"],
        rate=raw["rate"],
        clients=raw["clients"],
        think_time=raw["think_time"],
        calls=raw["calls"],
        duration=duration,
        deadline=raw["deadline"],
        timeline=phases,
    )


def _rate_phases(raw: Mapping[str, Any]) -> tuple[RatePhase, ...]:
    """The traffic's timeline at absolute times (a phase without a rate has the base rate)."""
    entries = raw.get("timeline") or ()
    phases = []
    t = 0.0
    for entry in entries:
        if not isinstance(entry, dict) or "duration" not in entry:
            return ()  # it had problems
        rate = entry.get("rate")
        if rate is None:
            rate = raw.get("rate")
        if rate is None:
            return ()  # closed traffic, reported
        phases.append(RatePhase(t, t + entry["duration"], rate))
        t += entry["duration"]
    return tuple(phases)


def _downstream(
    raw: Mapping[str, Any], timeline: list[dict[str, Any]] | None, problems: Problems
) -> Downstream | None:
    base = _latency(raw.get("latency"), "downstream.latency", problems)
    if raw.get("queue") is not None and "capacity" in raw and raw["capacity"] is None:
        problems.add("downstream.queue", "a queue needs a capacity (downstream.capacity)")
    needed = ("error_rate", "error_latency", "capacity", "queue", "serves_abandoned")
    if base is None or timeline is None or any(k not in raw for k in needed):
        return None
    base_error = raw["error_rate"]
    phases: list[Phase] = []
    t = 0.0
    previous = (base_error, base)
    for i, entry in enumerate(timeline):
        kind = entry["phase"]
        latency = _latency(entry.get("latency"), f"downstream.timeline[{i}].latency", Problems())
        error = entry.get("error_rate")
        if kind == "recovery":
            start, end = previous, (base_error, base)
        else:
            if kind == "brownout" and latency is None:
                latency = base.scaled(entry.get("slowdown") or 10.0)
            if error is None:
                error = 1.0 if kind == "outage" else base_error
            start = end = (error, latency or base)
        phases.append(
            Phase(
                kind=kind,
                start=t,
                end=t + entry["duration"],
                error_rate=start[0],
                latency=start[1],
                end_error_rate=end[0],
                end_latency=end[1],
                failure=entry.get("failure", "errors"),
            )
        )
        t += entry["duration"]
        previous = end
    return Downstream(
        latency=base,
        error_rate=base_error,
        error_latency=raw["error_latency"],
        capacity=raw["capacity"],
        queue=raw["queue"],
        serves_abandoned=raw["serves_abandoned"],
        timeline=tuple(phases),
        round_trip=raw.get("round_trip", 0.0),
        quota=_quota(raw.get("quota")),
    )


def _quota(raw: Mapping[str, Any] | None) -> Quota | None:
    if raw is None or "rate" not in raw:
        return None
    burst = raw.get("burst")
    return Quota(raw["rate"], max(1, math.floor(raw["rate"])) if burst is None else burst)


# -- the grid --------------------------------------------------------------------------


def _grid(
    raw: dict[str, Any] | list[dict[str, Any]], problems: Problems
) -> tuple[tuple[Setting, ...], str]:
    """The settings of a ``[grid]`` table, or of every ``[[grid]]`` table in turn."""
    before = len(problems.items)
    tables = raw if isinstance(raw, list) else [raw]
    combos: list[dict[str, Any]] = []
    for i, table in enumerate(tables):
        where = f"grid[{i}]" if isinstance(raw, list) else "grid"
        combos += _combinations(table, where, problems)
    if len(problems.items) > before:
        return (), ""
    if len(combos) > MAX_SETTINGS:
        problems.add(
            "grid",
            f"{len(combos)} settings is too many (at most {MAX_SETTINGS}): each one simulates "
            "the whole scenario; narrow some lists of alternatives",
        )
        return (), ""
    leaves = [dict(_leaves(combo, GRID, "")) for combo in combos]
    labels = _labels(leaves, alternatives=isinstance(raw, list))
    settings = tuple(
        Setting(index=i, label=label, options=combo)
        for i, (label, combo) in enumerate(zip(labels, combos, strict=True))
    )
    refused: dict[tuple[str, str], None] = {}
    dummy = Telemetry(registry=CollectorRegistry(), tracer_provider=NoOpTracerProvider())
    for setting in settings:
        refusal = _refusal(setting, dummy)
        if refusal is not None:
            refused[refusal] = None
    for path, message in refused:
        problems.add(path, message)
    return settings, _common(leaves)


def _combinations(raw: dict[str, Any], where: str, problems: Problems) -> list[dict[str, Any]]:
    """Every combination of one grid table's alternatives (none if it has problems)."""
    before = len(problems.items)
    schema._unknown_keys(raw, GRID, where, problems)
    axes: list[list[tuple[str, Any]]] = []
    for f in GRID.fields:
        path = f"{where}.{f.name}"
        if f.name in raw:
            if f.name == "breaker":
                _both_windows(raw[f.name], path, problems)
            options = schema.expand(raw[f.name], f, path, problems)
            if f.name == "breaker":
                options = [_trigger_defaults(option) for option in options]
        else:
            options = [None]
        axes.append([(f.name, option) for option in options])
    if len(problems.items) > before:
        return []
    count = math.prod(len(axis) for axis in axes)
    if count > MAX_SETTINGS:
        problems.add(
            where,
            f"{count} settings is too many (at most {MAX_SETTINGS}): each one simulates the "
            "whole scenario; narrow some lists of alternatives",
        )
        return []
    return [dict(combo) for combo in itertools.product(*axes)]


def _refusal(setting: Setting, telemetry: Telemetry) -> tuple[str, str] | None:
    """Why the policies refuse this setting's options, if they do."""
    try:
        setting.policies(telemetry, random.Random(0))
    except schema.Refused as exc:
        return exc.path, exc.message
    return None


def _trigger_defaults(breaker: dict[str, Any] | None) -> dict[str, Any] | None:
    """A breaker's options with ``failure_rate`` as `CircuitBreaker` reads it when not given.

    Not given, it is 0.5, or off when ``consecutive_failures`` is given: the
    labels, the options in the JSON and the breaker then say the same.
    """
    if breaker is None or breaker["failure_rate"] is not _DEFAULT_FAILURE_RATE:
        return breaker
    off = breaker["consecutive_failures"] is not None
    return {**breaker, "failure_rate": None if off else float(_DEFAULT_FAILURE_RATE)}


def _both_windows(raw: Any, path: str, problems: Problems) -> None:
    tables = raw if isinstance(raw, list) else [raw]
    for i, table in enumerate(tables):
        if isinstance(table, dict) and "window" in table and "time_window" in table:
            where = f"{path}[{i}]" if isinstance(raw, list) else path
            problems.add(f"{where}.time_window", "give either window or time_window, not both")


def _leaves(options: Mapping[str, Any], table: Table, prefix: str) -> Iterator[tuple[str, str]]:
    """``(path, text)`` for every option: sections ``on``/``off``, then their keys."""
    for f in table.fields:
        path = schema.join_path(prefix, f.name)
        value = options[f.name]
        if path in ("retry.backoff", "retry.budget") and options["attempts"] == 1:
            continue  # a Retry that never retries: neither matters
        if isinstance(f.kind, Table):
            if value is None:
                yield path, "off"
            else:
                if f.switchable:
                    yield path, "on"
                yield from _leaves(value, f.kind, path)
        elif f.name == "label":
            if value is not None:
                yield path, value
        else:
            yield path, _value_text(value, f)


def _value_text(value: Any, f: Field) -> str:
    if value is None:
        return "off" if f.switchable else "none"
    if isinstance(f.kind, schema.Number) and f.kind.unit == "s":
        return f"{value:g}s"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


_ALIASES: Final = {"retry.attempts": "attempts", "retry.backoff.jitter": "jitter"}

# What a section that is on in some settings only shows instead of "on".
_HEADLINES: Final = {
    **{s.name: s.headline for s in schema.SECTIONS if s.headline is not None},
    "retry.budget": "ratio",
}


def _alias(path: str) -> str:
    if path in _ALIASES:
        return _ALIASES[path]
    section, _, option = path.partition(".")
    if option and _HEADLINES.get(section) == option:
        return section  # a section's headline option stands for it: bulkhead=8
    for section in ("retry.backoff", "retry.budget"):
        if path == section or path.startswith(section + "."):
            return path[len("retry.") :]
    return path


def _displayed(row: Mapping[str, str]) -> dict[str, str]:
    """``row`` as labels show it: a section with a ``label`` is that label, its options unsaid."""
    labelled = [path[: -len(".label")] for path in row if path.endswith(".label")]
    shown = {}
    for path, value in row.items():
        owner = next((s for s in labelled if path == s or path.startswith(s + ".")), None)
        if owner is None:
            shown[path] = value
        elif path == owner:
            shown[path] = row[f"{owner}.label"]
    return shown


def _labels(leaves: Sequence[Mapping[str, str]], *, alternatives: bool = False) -> list[str]:
    """A short label per setting: ``key=value`` for every option that differs between them.

    A section that is on in some settings and off in others shows its
    ``label``, else its varying options, else its headline option (``on``
    for a breaker). Among ``alternatives`` (the settings of several
    ``[[grid]]`` tables), a section that is off is left unsaid, and a
    setting with every section off is ``no policy``.
    """
    rows = [_displayed(row) for row in leaves]
    varying = [p for p in _ORDER if len({row[p] for row in rows if p in row}) > 1]
    labels = []
    for row, raw in zip(rows, leaves, strict=True):
        parts = []
        for path in varying:
            if path not in row:
                continue  # inside a section that is off or labelled here
            value = row[path]
            if alternatives and value == "off" and "." not in path:
                continue
            if value == "on":
                if any(other.startswith(path + ".") and other in row for other in varying):
                    continue  # its varying options say more
                headline = _HEADLINES.get(path)
                if headline is not None:
                    value = raw[f"{path}.{headline}"]
            parts.append(f"{_alias(path)}={value}")
        if parts:
            labels.append(" ".join(parts))
        else:
            labels.append("no policy" if alternatives else "the only setting")
    return labels


def _common(leaves: Sequence[Mapping[str, str]]) -> str:
    """The options that never vary, where they differ from stalwart's defaults.

    A section on in every setting whose options are all defaults is named by
    its headline option (``attempts=3``), or as ``breaker=on``.
    """
    shared: list[tuple[str, str]] = []  # (path, text)
    present: list[str] = []  # sections on in every setting
    for path in _ORDER:
        if path.endswith(".label"):
            continue
        rows = [row for row in leaves if path in row]
        values = {row[path] for row in rows}
        if len(values) != 1:
            continue  # absent, or it varies: the labels show it
        value = values.pop()
        if value in ("on", "off"):
            if value == "on" and len(rows) == len(leaves) and "." not in path:
                present.append(path)
            continue
        if _default_text(path, rows[0]) != value:
            shared.append((path, f"{_alias(path)}={value}"))
    named = []
    for section in present:
        if any(path.startswith(section + ".") for path, _ in shared):
            continue  # its options say it is there
        headline = _HEADLINES.get(section)
        if headline is None:
            named.append(f"{section}=on")
        else:
            option = f"{section}.{headline}"
            named.append(f"{_alias(option)}={leaves[0][option]}")
    return ", ".join([*named, *(text for _, text in shared)])


def _default_text(path: str, row: Mapping[str, str]) -> str | None:
    """The text of ``path``'s default in ``row``'s setting."""
    if path == "breaker.failure_rate" and row.get("breaker.consecutive_failures", "off") != "off":
        return "off"  # not given, it is off when consecutive_failures is given
    return _DEFAULTS.get(path)


def _full_defaults() -> dict[str, Any]:
    """Every section on, with its defaults (a bulkhead's ``max_concurrent`` has none)."""
    out: dict[str, Any] = {}
    for f in GRID.fields:
        if isinstance(f.kind, Table):
            section = schema._default_of(Field(f.name, f.kind, {}, ""))
            out[f.name] = section
        else:
            out[f.name] = f.default
    out["retry"]["budget"] = schema._default_of(Field("budget", schema.BUDGET, {}, ""))
    return out


#: Every option's path, in the order labels show them, and its default's text.
_DEFAULTS: Final = dict(_leaves(_full_defaults(), GRID, ""))
_ORDER: Final = tuple(_DEFAULTS)
