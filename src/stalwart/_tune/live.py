"""``tune --live``: a scenario's traffic played against a real HTTP service, beside the simulation.

Each setting's real policies run as they do in the simulation
(``Pipeline(Timeout(deadline), *the setting's policies)``), here as the
policy of a `stalwart.httpx.ResilientTransport`, and the scenario's callers
call the service through it on the real clock: open traffic arrives at
``rate`` calls per second (Poisson, from the same seeded draws as the
simulation), closed traffic is ``clients`` loops. What happens is recorded
in the engine's own `Run`, so `report` measures both the same way.

The service plays the dependency: a real one, or any app behind
`stalwart.testing.FaultInjection` reading the same scenario. Every attempt
carries the ``x-stalwart-faults`` header with its position on the
scenario's timeline in seconds, so the service needs no clock of its own and
each setting starts the timeline at 0.

``--speed X`` shortens the timeline (the traffic's duration and every phase)
X times; rates, latencies and the policies' options are unchanged. The
simulation it is compared with runs the same shortened scenario.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import math
import random
import textwrap
import time
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any, Final, NamedTuple

import anyio
import httpx

from .. import _clock
from .._errors import BulkheadFullError, CircuitOpenError, DeadlineExceeded, RateLimitExceeded
from .._faults import FAULTS_HEADER
from .._pipeline import Pipeline
from .._timeout import Timeout
from ..httpx import ResilientTransport, RetryableStatusError
from .engine import (
    BUCKET,
    BreakerLog,
    Run,
    _breaker_time,
    count,
    percentile,
    quantiles,
    simulate,
    telemetries,
)
from .report import Report, Result, _legend, _secs, summarize, table_columns
from .scenario import Scenario, Setting, Traffic

__all__ = [
    "LATE",
    "Comparison",
    "Played",
    "arrivals",
    "compare",
    "drain_time",
    "failed",
    "overloaded",
    "play",
    "shortened",
    "with_round_trip",
]

#: Connections the client may hold at once: enough that the pool never queues.
_MAX_CONNECTIONS: Final = 2000

#: Seconds past its time by which one call in a hundred may start (open traffic) before
#: a live run is said not to have played its scenario: its client could not keep up.
#: A quarter of a second is seen on a 2-core machine at a load of 8 at 30 calls/s, with
#: the live figures within a point of the simulation's; a client that cannot keep up
#: falls seconds behind.
LATE: Final = 0.5


def failed(exc: BaseException) -> bool:
    """Did the service fail the attempt (the simulated downstream's `DownstreamError`)?

    An answer whose status the transport retries (429, 502, 503, 504), or no
    answer at all (an `httpx.TransportError`: the connection refused, reset,
    ...). A refusal by a policy below (an open breaker, a full bulkhead, a
    rate limit) is not the service's, nor is a timeout (the policies count
    those themselves).
    """
    return isinstance(exc, (RetryableStatusError, httpx.TransportError))


def overloaded(exc: BaseException) -> bool:
    """Did the service refuse the attempt for being overloaded (the simulated `Overloaded`)?

    A 503 answer; from `stalwart.testing.FaultInjection`, whose answers say
    which fault they are in its header, only its full queue's (an injected
    error is an error, whatever its status).
    """
    if not isinstance(exc, RetryableStatusError):
        return False
    said = exc.response.headers.get(FAULTS_HEADER)
    if said is not None:
        return bool(said == "overloaded")
    return exc.response.status_code == 503


def shortened(scenario: Scenario, speed: float) -> Scenario:
    """``scenario`` with its timelines (the traffic's duration and phases, the
    downstream's phases) ``speed`` times shorter."""
    if speed == 1.0:
        return scenario
    traffic = scenario.traffic
    duration = None if traffic.duration is None else traffic.duration / speed
    phases = tuple(
        dataclasses.replace(p, start=p.start / speed, end=p.end / speed)
        for p in scenario.downstream.timeline
    )
    rates = tuple(
        dataclasses.replace(p, start=p.start / speed, end=p.end / speed) for p in traffic.timeline
    )
    downstream = dataclasses.replace(scenario.downstream, timeline=phases)
    return dataclasses.replace(
        scenario,
        traffic=dataclasses.replace(traffic, duration=duration, timeline=rates),
        downstream=downstream,
    )


def arrivals(traffic: Traffic, expovariate: Callable[[float], float]) -> Iterator[float]:
    """When open traffic's calls arrive, in seconds from its start: the simulation's schedule.

    Poisson arrivals at each phase's rate (``traffic.timeline``, then
    ``rate``), drawn from ``expovariate`` in the order the engine draws
    them: a draw that would cross a phase's bound is dropped and drawn anew
    from the bound at the new rate (the same process, exactly).
    """
    assert traffic.rate is not None
    assert traffic.duration is not None
    duration = traffic.duration
    if not traffic.timeline:
        at = expovariate(traffic.rate)
        while at < duration:
            yield at
            at += expovariate(traffic.rate)
        return
    bounds = [p.start for p in traffic.timeline] + [traffic.timeline[-1].end]
    rates = [p.rate for p in traffic.timeline] + [traffic.rate]
    now = 0.0
    while True:
        i = bisect.bisect_right(bounds, now)
        later = now + expovariate(rates[i - 1] if i else rates[0])
        bound = bounds[i] if i < len(bounds) else math.inf
        if later >= duration and bound >= duration:
            return
        if later >= bound:
            now = bound
        else:
            yield later
            now = later


def drain_time(scenario: Scenario) -> float:
    """Seconds for a service playing ``scenario`` to serve what is left in its queue.

    Requests whose callers gave up are still served (unless
    ``serves_abandoned = false``): a full queue takes ``queue / capacity``
    service times at the healthy p99 to empty.
    """
    ds = scenario.downstream
    if ds.capacity is None:
        return ds.latency.p99
    queue = ds.queue if ds.queue is not None else 10 * ds.capacity
    return (queue / ds.capacity + 1.0) * ds.latency.p99


class _Counting(httpx.AsyncBaseTransport):
    """The inner transport: places each attempt on the timeline and counts it."""

    def __init__(self, inner: httpx.AsyncBaseTransport, recorder: _Recorder) -> None:
        self._inner = inner
        self._recorder = recorder

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        recorder = self._recorder
        b = recorder.attempt()
        request.headers[FAULTS_HEADER] = f"{recorder.position():.6f}"
        ok = False
        try:
            response = await self._inner.handle_async_request(request)
            ok = response.status_code < 400
            return response
        finally:
            if not ok:
                recorder.failed[b] += 1

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Recorder:
    """The live run's clock and series, in the engine's `Run` layout."""

    def __init__(self, size: int, speed: float) -> None:
        self.start = _clock.now()
        self.speed = speed
        self.size = size
        self.calls = [0] * size
        self.succeeded = [0] * size
        self.attempts = [0] * size
        self.failed = [0] * size

    def now(self) -> float:
        """Seconds since the run started (of the shortened timeline)."""
        return _clock.now() - self.start

    def position(self) -> float:
        """Where the service's timeline is now: the original scenario's seconds."""
        return self.now() * self.speed

    def bucket(self) -> int:
        b = int(self.now() / BUCKET)
        if b >= self.size:
            extra = b + 1 - self.size
            for series in (self.calls, self.succeeded, self.attempts, self.failed):
                series.extend([0] * extra)
            self.size = b + 1
        return b

    def attempt(self) -> int:
        b = self.bucket()
        self.attempts[b] += 1
        return b


class Played(NamedTuple):
    """What `play` measured."""

    run: Run
    #: the median time, measured twice a second while the traffic ran, of a request
    #: without the faults header: the network and both HTTP stacks, which the
    #: service's injected latency does not include
    round_trip: float
    #: the 99th percentile of how late calls started, in seconds (open traffic; 0.0 for
    #: closed): beyond `LATE`, the client could not keep up and did not play the scenario
    late: float


async def play(
    scenario: Scenario,
    setting: Setting,
    url: str,
    *,
    speed: float = 1.0,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Played:
    """Play ``scenario`` (already `shortened`) against ``url`` with ``setting``'s policies.

    ``speed``: how much the scenario was shortened, so that each attempt
    tells the service its position on the original timeline.

    Returns the run, the round trip and how late calls started (`Played`).
    A client that cannot send what the scenario asks for (its process, or
    the machine, busy) starts calls late and bunched, and the traffic lasts
    longer than the scenario's: its numbers are not the scenario's, and
    `Comparison` says so.
    """
    traffic = scenario.traffic
    horizon = (traffic.duration or 60.0) + traffic.deadline + 2 * BUCKET
    recorder = _Recorder(int(horizon / BUCKET) + 1, speed)
    # The breaker observed as the engine observes it: through its telemetry's listener.
    breaker_log = BreakerLog(origin=recorder.start)
    telemetry, breaker_telemetry = telemetries(breaker_log)
    seed = scenario.seed
    traffic_rng = random.Random(f"stalwart-tune:{seed}:traffic")
    policy_rng = random.Random(f"stalwart-tune:{seed}:policies")
    patience = Timeout(traffic.deadline, name="deadline", telemetry=telemetry)
    policies = setting.policies(
        telemetry,
        policy_rng,
        breaker_telemetry=breaker_telemetry,
        failure=failed,
        overloaded=overloaded,
    )
    policy = Pipeline(patience, *policies, name="setting", telemetry=telemetry)
    inner = transport or httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=_MAX_CONNECTIONS, max_keepalive_connections=200)
    )
    resilient = ResilientTransport(policy, transport=_Counting(inner, recorder), name="live")
    latencies = array("d")
    lateness = array("d")
    outcomes = {"ok": 0, "error": 0, "timeout": 0, "rejected": 0}
    ended = 0.0

    async with httpx.AsyncClient(transport=resilient, timeout=None) as client:

        async def call(due: float | None = None) -> None:
            nonlocal ended
            start = recorder.now()
            if due is not None:
                lateness.append(start - due)
            b = recorder.bucket()
            recorder.calls[b] += 1
            try:
                response = await client.get(url)
            except DeadlineExceeded:
                outcomes["timeout"] += 1
            except (CircuitOpenError, BulkheadFullError, RateLimitExceeded):
                outcomes["rejected"] += 1
            except httpx.HTTPError:
                outcomes["error"] += 1
            else:
                if response.is_success:
                    outcomes["ok"] += 1
                    recorder.succeeded[b] += 1
                else:
                    outcomes["error"] += 1
            finished = recorder.now()
            latencies.append(finished - start)
            ended = max(ended, finished)

        trips: list[float] = []

        async def probe() -> None:
            async with httpx.AsyncClient(timeout=traffic.deadline) as plain:
                while True:
                    start = _clock.now()
                    with contextlib.suppress(httpx.HTTPError):
                        await plain.get(url)
                        trips.append(_clock.now() - start)
                    await anyio.sleep(0.5)

        duration = traffic.duration
        async with anyio.create_task_group() as probing:
            probing.start_soon(probe)
            async with anyio.create_task_group() as group:
                if traffic.mode == "open":
                    assert traffic.rate is not None
                    assert duration is not None
                    for at in arrivals(traffic, traffic_rng.expovariate):
                        await anyio.sleep(max(0.0, at - recorder.now()))
                        group.start_soon(call, at)
                else:
                    assert traffic.clients is not None
                    think, per_client = traffic.think_time, traffic.calls

                    async def client_loop() -> None:
                        if think:
                            await anyio.sleep(traffic_rng.expovariate(1.0 / think))
                        n = 0
                        while (per_client is None or n < per_client) and (
                            duration is None or recorder.now() < duration
                        ):
                            await call()
                            n += 1
                            if think:
                                await anyio.sleep(traffic_rng.expovariate(1.0 / think))

                    for _ in range(traffic.clients):
                        group.start_soon(client_loop)
            probing.cancel_scope.cancel()

    end = ended
    used = min(recorder.size, max(1, int(end / BUCKET) + 1))
    run = Run(index=setting.index)
    run.calls, run.succeeded = recorder.calls[:used], recorder.succeeded[:used]
    run.attempts, run.failed = recorder.attempts[:used], recorder.failed[:used]
    run.wasted = [0] * used  # the client cannot see what the service served for nobody
    run.open, run.half_open = [0.0] * used, [0.0] * used
    run.end = end
    run.outcomes = outcomes
    run.latency = quantiles(latencies)
    if setting.has_breaker:
        _breaker_time(breaker_log.events, setting.open_for, end, run)
    count(policies, run)
    trips.sort()
    return Played(run, percentile(trips, 0.5), percentile(sorted(lateness), 0.99))


# -- side by side ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every setting played live, and simulated, on the same (shortened) scenario."""

    scenario: Scenario
    url: str
    speed: float
    live: Report
    simulated: Report
    #: the round trip measured live, by setting index: what its simulation adds
    round_trips: Mapping[int, float] = dataclasses.field(default_factory=dict)
    #: how late the live calls started (99th percentile), by setting index (`Played.late`)
    late: Mapping[int, float] = dataclasses.field(default_factory=dict)

    def behind(self) -> list[str]:
        """The labels of the settings whose live client could not keep up (`LATE`)."""
        return [r.label for r in self.live.results if self.late.get(r.setting.index, 0.0) > LATE]

    def pairs(self) -> list[tuple[Result, Result]]:
        """(live, simulated) per setting, in the live report's order (best first)."""
        by_index = {r.setting.index: r for r in self.simulated.results}
        return [(r, by_index[r.setting.index]) for r in self.live.results]

    def table(self) -> str:
        return _side_by_side(self)

    def to_json(self) -> dict[str, Any]:
        by_index = {r.setting.index: r for r in self.simulated.results}
        return {
            "url": self.url,
            "speed": self.speed,
            "round_trip": {
                r.label: self.round_trips.get(r.setting.index) for r in self.live.results
            },
            "late": {r.label: self.late.get(r.setting.index) for r in self.live.results},
            "live": self.live.to_json(),
            "simulated": {
                "settings": [
                    by_index[r.setting.index].to_json(rank)
                    for rank, r in enumerate(self.live.results, 1)
                ]
            },
        }


def compare(
    scenario: Scenario,
    url: str,
    *,
    speed: float = 1.0,
    settings: Sequence[int] | None = None,
    max_load: float,
    progress: Callable[[str], None] | None = None,
) -> Comparison:
    """Play and simulate each setting (``settings``: their indexes; default every one)."""
    short = shortened(scenario, speed)
    chosen = list(range(len(short.settings))) if settings is None else list(settings)
    live: list[Run] = []
    simulated: list[Run] = []
    round_trips: dict[int, float] = {}
    late: dict[int, float] = {}
    pause = drain_time(short)
    for n, index in enumerate(chosen):
        setting = short.settings[index]
        if progress is not None:
            progress(f"[{n + 1}/{len(chosen)}] {setting.label}")
        if n:
            time.sleep(pause)  # what the service still queues for the last setting
        run, trip, late[index] = anyio.run(
            functools.partial(play, short, setting, url, speed=speed)
        )
        live.append(run)
        round_trips[index] = trip
        simulated.append(simulate(with_round_trip(short, trip), index))
    return Comparison(
        scenario=short,
        url=url,
        speed=speed,
        live=summarize(short, live, max_load=max_load),
        simulated=summarize(short, simulated, max_load=max_load),
        round_trips=round_trips,
        late=late,
    )


def with_round_trip(scenario: Scenario, seconds: float) -> Scenario:
    """``scenario`` whose downstream is ``seconds`` further away (``downstream.round_trip``)."""
    downstream = dataclasses.replace(scenario.downstream, round_trip=seconds)
    return dataclasses.replace(scenario, downstream=downstream)


def _difference(heading: str, live: Result, sim: Result) -> str:
    """The live figure minus the simulated one, for the column ``heading``."""

    def seconds(a: float | None, b: float | None) -> str:
        if a is None or b is None:
            return "-"
        d = a - b
        return ("+" if d >= 0 else "-") + _secs(abs(d))

    if heading == "success":
        return f"{(live.success_rate - sim.success_rate) * 100:+.1f} pt"
    if heading in ("p50", "p99", "p99.9"):
        key = {"p50": "p50", "p99": "p99", "p99.9": "p999"}[heading]
        return seconds(live.run.latency[key], sim.run.latency[key])
    if heading == "attempts/call":
        return f"{live.attempts_per_call - sim.attempts_per_call:+.2f}"
    if heading == "peak load":
        assert live.peak_load is not None
        assert sim.peak_load is not None
        relative = live.peak_load / sim.peak_load - 1.0 if sim.peak_load else 0.0
        return f"{relative:+.0%}"
    if heading == "detect":
        return seconds(live.time_to_detect, sim.time_to_detect)
    if heading == "recover":
        if live.recovered is False or sim.recovered is False:
            return "-"
        return seconds(live.time_to_recover, sim.time_to_recover)
    if heading == "open":
        if not live.setting.has_breaker:
            return "-"
        return seconds(live.run.time_open, sim.run.time_open)
    if heading == "all done":
        return seconds(live.run.end, sim.run.end)
    return "-"


def _side_by_side(comparison: Comparison) -> str:
    s = comparison.scenario
    columns = table_columns(comparison.live)
    headings = ["#", "setting", "run", *(h for h, _, _ in columns[2:])]
    aligns = ["<", "<", "<", *(a for _, a, _ in columns[2:])]
    rows: list[list[str]] = []
    for rank, (live, sim) in enumerate(comparison.pairs(), 1):
        cells = [fn for _, _, fn in columns[2:]]
        late = comparison.late.get(live.setting.index, 0.0)
        run = f"live (late {_secs(late)})" if late > LATE else "live"
        rows.append([str(rank), live.label, run, *(fn(live) for fn in cells)])
        trip = comparison.round_trips.get(live.setting.index)
        note = "" if trip is None else f" ({trip * 1e3:.1f} ms)"
        rows.append(["", "", f"sim{note}", *(fn(sim) for fn in cells)])
        rows.append(["", "", "diff", *(_difference(h, live, sim) for h, _, _ in columns[2:])])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headings)]

    def line(cells: Sequence[str]) -> str:
        out = [
            cell.ljust(width) if align == "<" else cell.rjust(width)
            for align, width, cell in zip(aligns, widths, cells, strict=True)
        ]
        return "  ".join(out).rstrip()

    title = f"Scenario {s.name!r}"
    if s.description:
        title += f": {s.description}"
    shorter = "" if comparison.speed == 1.0 else f", timeline {comparison.speed:g}x shorter"
    lines = [
        title,
        s.describe() + ".",
        f"{len(rows) // 3} setting{'s' if len(rows) != 3 else ''}, seed {s.seed}: "
        f"live against {comparison.url} (real time{shorter}) beside the simulation "
        "of the same scenario." + (f" Options that do not vary: {s.common}." if s.common else ""),
        "",
        line(headings),
    ]
    lines.extend(line(row) for row in rows)
    lines.append("")
    lines.extend(_legend(s, headings[2:]))
    behind = comparison.behind()
    if behind:
        lines.append("")
        lines.extend(
            textwrap.wrap(
                f"Not played as the scenario says: {', '.join(behind)}. The client started "
                f"calls late (one in a hundred more than {_secs(LATE)} late, in brackets): "
                "it could not send the traffic on time (a busy process or machine), so "
                "its figures are not the scenario's. Run it again with the machine quieter, "
                "or at a lower rate.",
                100,
            )
        )
    lines.append("")
    lines.append(f"Live: {comparison.live.recommendation()}")
    lines.append(f"Simulated: {comparison.simulated.recommendation()}")
    return "\n".join(lines).rstrip() + "\n"


def write_progress(stream: IO[str]) -> Callable[[str], None]:
    def report(text: str) -> None:
        stream.write(f"tune --live {text}\n")
        stream.flush()

    return report
