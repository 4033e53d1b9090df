"""The simulation: one setting's real policies against the simulated downstream.

Each setting runs alone on a fresh `SimulationLoop`, an asyncio event loop
whose clock only moves when every task waits (then it jumps to the next
timer), so an hour of traffic takes seconds and nothing depends on the
machine's speed. asyncio runs ready callbacks in FIFO order and every random
draw comes from a `random.Random` seeded from the scenario's seed, so a
setting's numbers depend on the scenario and the seed alone: not on the
number of worker processes, nor on the order settings run in.

What is real: the `Retry`, `RetryBudget`, `AdaptiveThrottle`, `CircuitBreaker`,
`ConcurrencyLimit`, `Bulkhead`, `Timeout` and `Pipeline` objects; each call runs as
``Pipeline(Timeout(deadline), *the setting's policies)``, the outer `Timeout`
being the caller's deadline (the ambient deadline inside).
What is simulated: the downstream (a server with ``capacity`` slots, a FIFO
queue, a latency distribution and a timeline of failures, behind an optional
``round_trip`` and an optional ``quota``) and its callers.
The breaker's transitions are observed through its telemetry's listeners
(`BreakerLog`), the policies' counts read from their metrics.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import random
from array import array
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from opentelemetry.trace import NoOpTracerProvider
from prometheus_client import CollectorRegistry

from .._errors import BulkheadFullError, CircuitOpenError, DeadlineExceeded, RateLimitExceeded
from .._gcra import Gcra
from .._pipeline import Pipeline
from .._policy import Policy
from .._retry import Retry, RetryMetrics
from .._telemetry import Telemetry
from .._timeout import Timeout
from ..events import CircuitStateChanged, Event
from ..testing import VirtualClockEventLoop
from .scenario import Scenario, Setting
from .schema import SECTIONS

__all__ = [
    "BUCKET",
    "BreakerLog",
    "DownstreamError",
    "OverQuota",
    "Overloaded",
    "Run",
    "SimulationLoop",
    "count",
    "quantiles",
    "simulate",
    "telemetries",
]

#: Seconds per sample of the time series.
BUCKET: Final = 1.0

# asyncio runs a timer's callback once the clock is within its resolution
# (1e-9 s) of the timer's time, so a call due at 3.0 may see 2.9999999999999996:
# bucket indexes allow for that.
_PER_BUCKET: Final = 1.0 / BUCKET

#: Progress is reported every this many virtual seconds (at most 200 times per run).
_TICKS: Final = 200


class DownstreamError(Exception):
    """The simulated downstream answered with an error."""


class Overloaded(DownstreamError):
    """The simulated downstream's queue was full: it turned the request away."""


class OverQuota(DownstreamError):
    """The simulated downstream's quota (``downstream.quota``) refused the request."""


# -- the loop ----------------------------------------------------------------------------


class SimulationLoop(VirtualClockEventLoop):
    """The loop a setting runs on: `stalwart.testing.VirtualClockEventLoop` without I/O.

    Its clock starts at 0 and jumps exactly to the next timer whenever every
    task waits; it never polls a socket, which makes each turn of the loop
    cheaper. A simulation has no I/O to do.
    """

    _io = False


# -- what is measured --------------------------------------------------------------------


class BreakerLog:
    """A listener noting when each of the breaker's transitions happened, and to what.

    Times are the event loop's clock minus ``origin`` (when the run started).
    """

    __slots__ = ("events", "origin")

    def __init__(self, origin: float = 0.0) -> None:
        self.origin = origin
        self.events: list[tuple[float, str]] = []

    def __call__(self, event: Event) -> None:
        if isinstance(event, CircuitStateChanged):
            self.events.append((event.time - self.origin, event.to_state.value))


def telemetries(log: BreakerLog) -> tuple[Telemetry, Telemetry]:
    """A run's telemetry for its policies, and one for its breaker, which reports to ``log``.

    Both on one private registry, untraced. Only the breaker reports to a
    listener: with one, every policy on a telemetry builds its events, and
    the retries' would cost time.
    """
    registry = CollectorRegistry()
    untraced = NoOpTracerProvider()
    return (
        Telemetry(registry=registry, tracer_provider=untraced),
        Telemetry(registry=registry, tracer_provider=untraced, listeners=[log]),
    )


# The grid's policies that refuse calls, by their names (a policy is named after its section).
_REFUSING: Final = frozenset(section.name for section in SECTIONS if section.rejects)


def count(policies: Iterable[Policy], run: Run) -> None:
    """Fill the run's counts from what its policies counted (their metrics)."""
    for policy in policies:
        metrics = policy.metrics
        if isinstance(policy, Retry):
            assert isinstance(metrics, RetryMetrics)
            run.retries, run.exhausted = metrics.attempts, metrics.exhausted
        elif isinstance(policy, Timeout):
            run.timeouts = metrics.timeout
        if policy.name in _REFUSING:
            run.rejected_by[policy.name] = metrics.rejected


@dataclass
class Run:
    """What one setting did, as measured; `stalwart._tune.report` derives the rest."""

    index: int
    #: per `BUCKET` of virtual time (calls by their start, attempts by their arrival):
    calls: list[int] = field(default_factory=list)
    succeeded: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    #: attempts the downstream failed: errors, hangs, rejections by a full queue or the quota
    failed: list[int] = field(default_factory=list)
    #: attempts served after their caller had given up
    wasted: list[int] = field(default_factory=list)
    #: seconds of each bucket the breaker spent OPEN / HALF_OPEN
    open: list[float] = field(default_factory=list)
    half_open: list[float] = field(default_factory=list)
    #: outcomes seen by callers: ok, error, timeout, rejected
    outcomes: dict[str, int] = field(default_factory=dict)
    #: latency seen by callers (all calls, failed ones included), seconds
    latency: dict[str, float] = field(default_factory=dict)
    #: virtual times at which the breaker opened
    opened_at: list[float] = field(default_factory=list)
    time_open: float = 0.0
    #: counted by the policies themselves (their telemetry)
    retries: int = 0
    exhausted: int = 0
    timeouts: int = 0
    #: calls each policy that refuses calls refused, by grid section (``bulkhead``, ...)
    rejected_by: dict[str, int] = field(default_factory=dict)
    #: virtual time at which the last call ended
    end: float = 0.0

    @property
    def bulkhead_rejected(self) -> int:
        """Calls the bulkhead refused (0 without one)."""
        return self.rejected_by.get("bulkhead", 0)


def percentile(ordered: Any, q: float) -> float:
    """The nearest-rank ``q`` quantile of a sorted sequence (0.0 if empty)."""
    n = len(ordered)
    if n == 0:
        return 0.0
    return float(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))])


def quantiles(latencies: Iterable[float]) -> dict[str, float]:
    """The latency figures a `Run` keeps: p50, p99, p999 and the mean (0.0 when empty)."""
    ordered = sorted(latencies)
    return {
        "p50": percentile(ordered, 0.50),
        "p99": percentile(ordered, 0.99),
        "p999": percentile(ordered, 0.999),
        "mean": math.fsum(ordered) / len(ordered) if ordered else 0.0,
    }


def _breaker_time(events: list[tuple[float, str]], open_for: float, end: float, run: Run) -> None:
    """Fill the run's open/half-open series and totals from the transitions.

    The breaker announces OPEN → HALF_OPEN lazily (when next asked), but it
    rejects only until ``open_for`` has passed: that is when it is half-open.
    """
    for i, (t, state) in enumerate(events):
        if state != "open":
            continue
        run.opened_at.append(t)
        j = i + 1
        while j < len(events) and events[j][1] == "half_open":
            j += 1
        settled = events[j][0] if j < len(events) else end
        open_end = min(t + open_for, settled, end)
        _spread(run.open, t, open_end)
        run.time_open += open_end - t
        if settled > open_end:
            _spread(run.half_open, open_end, settled)


def _spread(series: list[float], start: float, end: float) -> None:
    """Add the interval [start, end) to per-bucket seconds."""
    b = int(start / BUCKET)
    while start < end and b < len(series):
        stop = min(end, (b + 1) * BUCKET)
        series[b] += stop - start
        start = stop
        b += 1


# -- the simulation ----------------------------------------------------------------------


def simulate(
    scenario: Scenario, index: int, progress: Callable[[float], None] | None = None
) -> Run:
    """Run setting ``index`` of ``scenario``; ``progress`` gets the share done, now and then."""
    loop = SimulationLoop()
    try:
        return loop.run_until_complete(
            _Simulation(loop, scenario, scenario.settings[index], progress).run()
        )
    finally:
        loop.close()


class _Phases:
    """The downstream's profile at a moment, for moments that never go back in time.

    Until ``steady_until``, the profile is ``steady`` (a phase that is not a
    ramp): the simulation reads those two attributes before calling `at`.
    """

    __slots__ = ("_phases", "current", "end", "steady", "steady_until")

    def __init__(self, scenario: Scenario) -> None:
        ds = scenario.downstream
        base = (ds.error_rate, ds.latency.mu, ds.latency.sigma)
        phases = []
        for p in ds.timeline:
            e0, m0, s0 = p.error_rate, p.latency.mu, p.latency.sigma
            e1, m1, s1 = p.end_error_rate, p.end_latency.mu, p.end_latency.sigma
            ramp = (e0, m0, s0) != (e1, m1, s1)
            phases.append((p.start, p.end, e0, m0, s0, e1 - e0, m1 - m0, s1 - s0, ramp, p.failure))
        after = phases[-1][1] if phases else 0.0
        phases.append((after, math.inf, *base, 0.0, 0.0, 0.0, False, "errors"))
        self._phases = phases
        self.current = phases[0]
        self.end = self.current[1]
        self.steady = (0.0, 0.0, 0.0, False)
        self.steady_until = -math.inf

    def at(self, now: float) -> tuple[float, float, float, bool]:
        """(error rate, mu, sigma, hangs) at ``now``."""
        if now >= self.end:
            while now >= self.end:
                self._phases.pop(0)
                self.current = self._phases[0]
                self.end = self.current[1]
        start, end, e, m, s, de, dm, ds, ramp, failure = self.current
        if ramp:
            share = (now - start) / (end - start)
            return e + de * share, m + dm * share, s + ds * share, failure == "hangs"
        self.steady = (e, m, s, failure == "hangs")
        self.steady_until = end
        return self.steady


class _Simulation:
    """One setting's run.

    `run` keeps its hot paths (an attempt, a call) as closures over local
    variables: a simulated call costs some 40 microseconds, most of them
    asyncio's, and attribute lookups on ``self`` would add a good part.
    """

    def __init__(
        self,
        loop: SimulationLoop,
        scenario: Scenario,
        setting: Setting,
        progress: Callable[[float], None] | None,
    ) -> None:
        self.loop = loop
        self.scenario = scenario
        self.setting = setting
        self.progress = progress
        self.breaker_log = BreakerLog()
        self.telemetry, self.breaker_telemetry = telemetries(self.breaker_log)
        seed = scenario.seed
        self.traffic_rng = random.Random(f"stalwart-tune:{seed}:traffic")
        self.downstream_rng = random.Random(f"stalwart-tune:{seed}:downstream")
        self.policy_rng = random.Random(f"stalwart-tune:{seed}:policies")
        traffic = scenario.traffic
        horizon = (traffic.duration or 60.0) + traffic.deadline + 2 * BUCKET
        self.size = int(horizon / BUCKET) + 1
        self.result = Run(index=setting.index)

    async def run(self) -> Run:
        loop, scenario, run = self.loop, self.scenario, self.result
        traffic, ds = scenario.traffic, scenario.downstream
        time, call_at, create_future = loop.time, loop.call_at, loop.create_future
        size = self.size
        calls, succeeded = [0] * size, [0] * size
        attempts, failed, wasted = [0] * size, [0] * size, [0] * size
        series = [calls, succeeded, attempts, failed, wasted]
        latencies = array("d")
        outcomes = [0, 0, 0, 0]  # ok, error, timeout, rejected
        finished: asyncio.Future[None] = create_future()

        def grow(b: int) -> None:
            nonlocal size
            extra = max(b + 1, 2 * size) - size
            for s in series:
                s.extend([0] * extra)
            size += extra

        # -- the downstream -------------------------------------------------------------
        phases = _Phases(scenario)
        rng_random = self.downstream_rng.random
        gauss = self.downstream_rng.gauss
        exp = math.exp
        capacity = ds.capacity if ds.capacity is not None else math.inf
        queue_limit = ds.queue if ds.queue is not None else math.inf
        error_latency = ds.error_latency
        serves_abandoned = ds.serves_abandoned
        half_trip = ds.round_trip / 2.0
        sleep = asyncio.sleep
        queue: deque[tuple[asyncio.Future[None], float, int]] = deque()
        busy = 0

        def fail(fut: asyncio.Future[None]) -> None:
            if not fut.done():
                fut.set_exception(DownstreamError())

        def reject(fut: asyncio.Future[None]) -> None:
            if not fut.done():
                fut.set_exception(Overloaded())

        def refuse(fut: asyncio.Future[None]) -> None:
            if not fut.done():
                fut.set_exception(OverQuota())

        # The quota's allowance: a GCRA on the loop's clock, as FaultInjection keeps one.
        quota = None if ds.quota is None else Gcra(ds.quota.rate, burst=ds.quota.burst)

        def finish(fut: asyncio.Future[None], b: int) -> None:
            nonlocal busy
            if fut.cancelled():
                wasted[b] += 1
            else:
                fut.set_result(None)
            while queue:
                waiting, service, waiting_b = queue.popleft()
                if not serves_abandoned and waiting.cancelled():
                    continue
                call_at(time() + service, finish, waiting, waiting_b)
                return
            busy -= 1

        async def travel() -> None:
            # The network and both HTTP stacks: on the way there, then back.
            await sleep(half_trip)
            try:
                await reach()
            except DownstreamError:
                await sleep(half_trip)
                raise
            await sleep(half_trip)

        async def reach() -> None:
            nonlocal busy
            now = time()
            b = int(now * _PER_BUCKET + 1e-9)
            if b >= size:
                grow(b)
            attempts[b] += 1
            if quota is not None and quota.reserve(now) is None:
                failed[b] += 1
                fut = create_future()
                call_at(now + error_latency, refuse, fut)
                await fut  # raises OverQuota
            if now < phases.steady_until:
                error_rate, mu, sigma, hangs = phases.steady
            else:
                error_rate, mu, sigma, hangs = phases.at(now)
            fut = create_future()
            if rng_random() < error_rate:
                failed[b] += 1
                if not hangs:
                    call_at(now + error_latency, fail, fut)
            else:
                service = exp(mu + sigma * gauss(0.0, 1.0)) if sigma else exp(mu)
                if busy < capacity:
                    busy += 1
                    call_at(now + service, finish, fut, b)
                elif len(queue) < queue_limit:
                    queue.append((fut, service, b))
                else:
                    failed[b] += 1
                    call_at(now + error_latency, reject, fut)
            await fut

        # -- the callers ----------------------------------------------------------------
        # The caller's deadline is the outermost Timeout: inside it, it is the
        # ambient deadline every policy respects (`sw.deadline` per call would
        # do the same, and validate its argument 180,000 times an hour).
        patience = Timeout(traffic.deadline, name="deadline", telemetry=self.telemetry)
        policies = self.setting.policies(
            self.telemetry,
            self.policy_rng,
            breaker_telemetry=self.breaker_telemetry,
            failure=DownstreamError,
            overloaded=Overloaded,
        )
        attempt = travel if half_trip else reach
        guarded = Pipeline(patience, *policies, name="setting", telemetry=self.telemetry)(attempt)
        in_flight = 0
        starting = True  # new calls may still start

        def crashed(exc: BaseException) -> None:
            if not finished.done():
                finished.set_exception(exc)

        async def call() -> None:
            start = time()
            b = int(start * _PER_BUCKET + 1e-9)
            if b >= size:
                grow(b)
            calls[b] += 1
            try:
                await guarded()
            except DownstreamError:
                outcomes[1] += 1
            except DeadlineExceeded:
                outcomes[2] += 1
            except (CircuitOpenError, BulkheadFullError, RateLimitExceeded):
                outcomes[3] += 1
            else:
                outcomes[0] += 1
                succeeded[b] += 1
            latencies.append(time() - start)

        def ended() -> None:
            nonlocal in_flight
            in_flight -= 1
            if not in_flight and not starting and not finished.done():
                finished.set_result(None)

        async def one_call() -> None:
            try:
                await call()
            except BaseException as exc:  # a bug: stop the simulation with it
                crashed(exc)
                raise
            ended()

        def spawn(coro: Coroutine[Any, Any, None]) -> None:
            # No set of tasks: a waiting call is always held by something the
            # loop holds (a timer, the downstream's queue, its deadline's timer),
            # and a done-callback per call would cost a turn of the loop.
            nonlocal in_flight
            in_flight += 1
            loop.create_task(coro)

        duration = traffic.duration
        if traffic.mode == "open":
            assert traffic.rate is not None
            assert duration is not None
            expovariate, rate = self.traffic_rng.expovariate, traffic.rate

            if not traffic.timeline:

                def arrive() -> None:
                    nonlocal starting
                    spawn(one_call())
                    later = time() + expovariate(rate)
                    if later < duration:
                        call_at(later, arrive)
                    else:
                        starting = False

                first = expovariate(rate)
                if first < duration:
                    call_at(first, arrive)
                else:
                    starting = False

            else:
                # The rate changes at the phases' bounds. Arrivals are memoryless:
                # a draw that would cross a bound is dropped, and drawn anew from
                # the bound at the new rate (the same process, exactly).
                bounds = [p.start for p in traffic.timeline] + [traffic.timeline[-1].end]
                rates = [p.rate for p in traffic.timeline] + [rate]

                def schedule(now: float) -> None:
                    nonlocal starting
                    i = bisect.bisect_right(bounds, now)
                    current = rates[i - 1] if i else rates[0]
                    later = now + expovariate(current)
                    bound = bounds[i] if i < len(bounds) else math.inf
                    if later >= duration and bound >= duration:
                        starting = False
                    elif later >= bound:
                        call_at(bound, schedule, bound)
                    else:
                        call_at(later, arrive_at, later)

                def arrive_at(now: float) -> None:
                    spawn(one_call())
                    schedule(now)

                schedule(0.0)

            def share_done() -> float:
                return min(1.0, time() / duration)

        else:
            assert traffic.clients is not None
            think, per_client = traffic.think_time, traffic.calls
            rng = self.traffic_rng
            total = None if per_client is None else traffic.clients * per_client
            made = 0

            async def client() -> None:
                nonlocal made
                try:
                    if think:
                        await asyncio.sleep(rng.expovariate(1.0 / think))
                    n = 0
                    while (per_client is None or n < per_client) and (
                        duration is None or time() < duration
                    ):
                        await call()
                        n += 1
                        made += 1
                        if think:
                            await asyncio.sleep(rng.expovariate(1.0 / think))
                except BaseException as exc:
                    crashed(exc)
                    raise
                ended()

            for _ in range(traffic.clients):
                spawn(client())
            starting = False

            def share_done() -> float:
                if total is not None:
                    done = made / total
                    if duration is None:
                        return done
                    return max(done, min(1.0, time() / duration))
                assert duration is not None
                return min(1.0, time() / duration)

        # Always ticking, whether or not anyone watches: the ticks are timers too,
        # and the results must not depend on whether a progress bar is shown.
        step = (duration or traffic.deadline) / _TICKS
        report = self.progress
        ticks = 1

        def tick() -> None:
            nonlocal ticks
            if report is not None:
                report(share_done())
            ticks += 1
            call_at(ticks * step, tick)  # not time() + step: no rounding errors piling up

        call_at(step, tick)
        if not in_flight and not starting:
            finished.set_result(None)
        await finished
        end = time()

        # -- what happened --------------------------------------------------------------
        used = min(size, max(1, int(end * _PER_BUCKET + 1e-9) + 1))
        run.calls, run.succeeded = calls[:used], succeeded[:used]
        run.attempts, run.failed, run.wasted = attempts[:used], failed[:used], wasted[:used]
        run.open, run.half_open = [0.0] * used, [0.0] * used
        run.end = end
        run.outcomes = dict(zip(("ok", "error", "timeout", "rejected"), outcomes, strict=True))
        run.latency = quantiles(latencies)
        if self.setting.has_breaker:
            _breaker_time(self.breaker_log.events, self.setting.open_for, end, run)
        count(policies, run)
        if progress := self.progress:
            progress(1.0)
        return run
