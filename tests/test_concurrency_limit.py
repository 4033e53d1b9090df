"""ConcurrencyLimit: a bulkhead whose limit follows latency and drops, as a policy.

The first part pins the policy's rules with an algorithm that records what it
is told; the second runs each real algorithm, as a policy, in front of the
simulated queue of ``tests/queueing.py`` in virtual time (asyncio and trio):
it converges near the downstream's capacity, backs off when the capacity
halves (latency rises), and recovers when it comes back.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.events import CallRejected, Event, LimitChanged

from .conftest import Spans, sample
from .queueing import Downstream
from .test_adaptive_limits import Trace


class Scripted:
    """A `LimitAlgorithm` that records its samples and returns the limits it is told to."""

    def __init__(self, limit: int = 2, *, probing: bool = False) -> None:
        self.limit = limit
        self.probing = probing
        self.samples: list[tuple[float, float, int, bool]] = []
        self.next: list[int] = []  # limits to move to, one per sample

    def on_sample(self, now: float, rtt: float, in_flight: int, dropped: bool) -> int:
        self.samples.append((now, rtt, in_flight, dropped))
        if self.next:
            self.limit = self.next.pop(0)
        return self.limit


class Gate:
    """Calls that block until released, to hold slots on demand."""

    def __init__(self) -> None:
        self.event = anyio.Event()

    async def __call__(self, seconds: float = 0.0) -> str:
        await self.event.wait()
        await anyio.sleep(seconds)
        return "done"

    def open(self) -> None:
        self.event.set()


async def settle() -> None:
    """Let every runnable task run until it blocks (virtual time: instant)."""
    await anyio.sleep(0.001)


def limited(algorithm: Scripted, **options: Any) -> sw.ConcurrencyLimit:
    return sw.ConcurrencyLimit(
        algorithm=algorithm, telemetry=options.pop("telemetry", None), **options
    )


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"algorithm": "cubic"},
            ValueError,
            "algorithm must be one of 'aimd', 'vegas', 'gradient2'",
        ),
        (
            {"algorithm": 3},
            TypeError,
            "algorithm must be 'gradient2', 'vegas', 'aimd' or an object",
        ),
        ({"algorithm": sw.VegasLimit(), "initial": 5}, ValueError, "give them to VegasLimit"),
        (
            {"algorithm": sw.AimdLimit(), "rng": random.Random(1)},
            ValueError,
            "options of the algorithm",
        ),
        ({"initial": 0}, ValueError, "initial must be >= 1"),
        ({"minimum": 5, "maximum": 2}, ValueError, "maximum must be >= minimum"),
        ({"max_queued": -1}, ValueError, "max_queued must be >= 0"),
        ({"max_wait": -1.0}, ValueError, "max_wait must be >= 0"),
        ({"drop_on": 3}, TypeError, "drop_on must be an exception type"),
        ({"drop_on_result": 3}, TypeError, "drop_on_result must be callable"),
        ({"rng": 3}, TypeError, "rng must be a random.Random"),
        ({"name": ""}, ValueError, "name must be 1-"),
    ],
)
def test_options_are_validated_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        sw.ConcurrencyLimit(**options)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("aimd", sw.AimdLimit), ("vegas", sw.VegasLimit), ("gradient2", sw.Gradient2Limit)],
)
def test_an_algorithm_named_gets_the_bounds_given(name: str, cls: type[Any]) -> None:
    limit = sw.ConcurrencyLimit(algorithm=name, initial=7, minimum=2, maximum=9)
    assert isinstance(limit.algorithm, cls)
    assert limit.limit == 7


def test_the_default_is_gradient2_from_20() -> None:
    limit = sw.ConcurrencyLimit()
    assert isinstance(limit.algorithm, sw.Gradient2Limit)
    assert (limit.limit, limit.in_flight, limit.queued, limit.max_queued) == (20, 0, 0, 0)
    assert limit.drop_on == (TimeoutError, sw.RateLimitExceeded, sw.BulkheadFullError)


# -- admission --------------------------------------------------------------------------


async def test_calls_beyond_the_limit_are_refused_at_once(registry: CollectorRegistry) -> None:
    seen: list[Event] = []
    telemetry = sw.Telemetry(registry=registry, listeners=[seen.append])
    limit = limited(Scripted(2), name="search", telemetry=telemetry)
    gate = Gate()
    guarded = limit(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        tg.start_soon(guarded)
        await settle()
        with pytest.raises(sw.RateLimitExceeded) as caught:
            await guarded()
        assert limit.in_flight == 2
        gate.open()
    assert caught.value.policy == "search"
    assert caught.value.retry_after is None
    assert "2 calls in flight (limit 2)" in str(caught.value)
    rejected = [e for e in seen if isinstance(e, CallRejected)]
    assert [(e.reason, e.kind) for e in rejected] == [("concurrency_limited", "concurrency")]
    assert sample(registry, "stalwart_concurrency_rejected_total", policy="search") == 1
    calls = "stalwart_calls_total"
    assert sample(registry, calls, policy="search", kind="concurrency", outcome="rejected") == 1
    assert sample(registry, calls, policy="search", kind="concurrency", outcome="success") == 2
    assert limit.in_flight == 0


async def test_one_call_in_flight_is_said_in_the_singular() -> None:
    guarded = limited(Scripted(1), name="search")(Gate())
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        await settle()
        with pytest.raises(sw.RateLimitExceeded) as caught:
            await guarded()
        tg.cancel_scope.cancel()
    assert "'search' is reached: 1 call in flight (limit 1), 0 queued" in str(caught.value)


async def test_queued_calls_wait_in_fifo_order_then_run() -> None:
    limit = limited(Scripted(1), max_queued=2)
    order: list[int] = []

    @limit
    async def work(n: int) -> None:
        order.append(n)
        await anyio.sleep(1.0)

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(work, n)
            await settle()
        assert (limit.in_flight, limit.queued) == (1, 2)
        with pytest.raises(sw.RateLimitExceeded):
            await work(3)
    assert order == [0, 1, 2]
    assert (limit.in_flight, limit.queued) == (0, 0)


async def test_a_queued_call_is_refused_when_max_wait_passes() -> None:
    limit = limited(Scripted(1), max_queued=None, max_wait=0.5)
    gate = Gate()
    guarded = limit(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        await settle()
        before = anyio.current_time()
        with pytest.raises(sw.RateLimitExceeded):
            await guarded()
        assert anyio.current_time() - before == pytest.approx(0.5, abs=1e-6)
        gate.open()
    assert (limit.in_flight, limit.queued) == (0, 0)


async def test_a_call_cancelled_while_queued_leaves_the_queue() -> None:
    limit = limited(Scripted(1), max_queued=None)
    gate = Gate()
    guarded = limit(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        await settle()
        with anyio.move_on_after(1.0):
            await guarded()
        assert limit.queued == 0
        gate.open()
    assert limit.in_flight == 0


async def test_slots_are_given_back_on_error_and_cancellation() -> None:
    limit = limited(Scripted(1))

    @limit
    async def failing() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await failing()
    assert limit.in_flight == 0
    with anyio.move_on_after(1.0):
        await limit(Gate())()
    assert limit.in_flight == 0


# -- what the algorithm is told ----------------------------------------------------------


async def test_a_sample_is_the_round_trip_from_admission_and_the_load_at_the_start() -> None:
    algorithm = Scripted(2)
    limit = limited(algorithm, max_queued=None)

    @limit
    async def work(seconds: float) -> None:
        await anyio.sleep(seconds)

    async with anyio.create_task_group() as tg:
        tg.start_soon(work, 3.0)
        await settle()
        tg.start_soon(work, 1.0)
        await settle()
        tg.start_soon(work, 1.0)  # queued until the second call ends
    by_end = sorted(algorithm.samples)
    rtts = [round(rtt, 3) for _, rtt, _, _ in by_end]
    loads = [load for _, _, load, _ in by_end]
    assert rtts == [1.0, 1.0, 3.0]  # the queued call's wait is not its round trip
    assert loads == [2, 2, 1]
    assert not any(dropped for *_, dropped in by_end)


@pytest.mark.parametrize(
    "error",
    [
        TimeoutError(),
        sw.DeadlineExceeded("late", policy="inner", timeout=1.0),
        sw.RateLimitExceeded("below", policy="below"),
        sw.BulkheadFullError("below", policy="below"),
    ],
)
async def test_timeouts_and_rejections_below_are_drops(
    error: Exception, registry: CollectorRegistry
) -> None:
    algorithm = Scripted()
    limit = limited(algorithm, name="drops", telemetry=sw.Telemetry(registry=registry))

    @limit
    async def failing() -> None:
        await anyio.sleep(0.25)
        raise error

    with pytest.raises(type(error)):
        await failing()
    assert [(round(rtt, 3), dropped) for _, rtt, _, dropped in algorithm.samples] == [(0.25, True)]
    assert sample(registry, "stalwart_concurrency_dropped_total", policy="drops") == 1


async def test_other_errors_teach_the_algorithm_nothing() -> None:
    algorithm = Scripted()
    limit = limited(algorithm)

    @limit
    async def failing() -> None:
        raise ConnectionResetError

    with pytest.raises(ConnectionResetError):
        await failing()
    assert algorithm.samples == []
    assert limit.in_flight == 0


async def test_drop_on_chooses_the_exceptions_that_are_drops() -> None:
    class Overloaded(Exception):
        pass

    algorithm = Scripted()
    limit = limited(algorithm, drop_on=lambda exc: isinstance(exc, Overloaded))

    async def raising(error: Exception) -> None:
        raise error

    for error in (Overloaded(), TimeoutError()):
        with pytest.raises(type(error)):
            await limit.call(raising, error)
    assert [dropped for *_, dropped in algorithm.samples] == [True]


async def test_a_result_drop_on_result_picks_out_is_a_drop() -> None:
    algorithm = Scripted()
    limit = limited(algorithm, drop_on_result=lambda status: status == 503)

    async def answer(status: int) -> int:
        return status

    assert await limit.call(answer, 200) == 200
    assert await limit.call(answer, 503) == 503
    assert [dropped for *_, dropped in algorithm.samples] == [False, True]


async def test_a_drop_on_result_that_raises_still_gives_the_slot_back() -> None:
    def broken(result: object) -> bool:
        raise KeyError("predicate")

    limit = limited(Scripted(), drop_on_result=broken)

    async def answer() -> int:
        return 1

    with pytest.raises(KeyError):
        await limit.call(answer)
    assert limit.in_flight == 0


async def test_a_call_cut_short_by_the_deadline_around_it_is_a_drop() -> None:
    algorithm = Scripted()
    limit = limited(algorithm)
    with pytest.raises(sw.DeadlineExceeded):
        await sw.Timeout(0.5)(limit(Gate()))()
    with pytest.raises(sw.DeadlineExceeded), sw.deadline(0.5):
        await limit(Gate())()
    assert [(round(rtt, 3), dropped) for _, rtt, _, dropped in algorithm.samples] == [
        (0.5, True),
        (0.5, True),
    ]


async def test_a_call_cancelled_for_any_other_reason_is_no_sample() -> None:
    algorithm = Scripted()
    limit = limited(algorithm)
    with anyio.move_on_after(0.5):
        await limit(Gate())()
    with sw.deadline(10.0), anyio.move_on_after(0.5):
        await limit(Gate())()
    assert algorithm.samples == []


async def test_without_timeouts_among_its_drops_a_deadline_is_no_sample() -> None:
    algorithm = Scripted()
    limit = limited(algorithm, drop_on=sw.RateLimitExceeded)
    with pytest.raises(sw.DeadlineExceeded):
        await sw.Timeout(0.5)(limit(Gate()))()
    assert algorithm.samples == []


async def test_far_below_the_limit_one_call_in_32_is_timed_but_every_drop_counts() -> None:
    algorithm = Scripted(100)
    limit = limited(algorithm)

    async def work(error: Exception | None) -> None:
        await anyio.sleep(0.5)
        if error is not None:
            raise error

    for _ in range(33):  # the first and the 33rd are timed
        await limit.call(work, None)
    assert [(round(rtt, 3), dropped) for _, rtt, _, dropped in algorithm.samples] == [
        (0.5, False),
        (0.5, False),
    ]
    with pytest.raises(TimeoutError):
        await limit.call(work, TimeoutError())  # not timed: its round trip is unknown
    assert algorithm.samples[-1][1:] == (0.0, 1, True)


async def test_at_half_the_limit_or_more_every_call_is_timed() -> None:
    algorithm = Scripted(4)
    limit = limited(algorithm)

    @limit
    async def work() -> None:
        await anyio.sleep(0.5)

    for _ in range(6):
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(work)
    loads = [load for _, _, load, _ in algorithm.samples]
    assert loads.count(2) == 6  # every call that started with 2 in flight
    assert loads.count(1) == 1  # one of the 6 that started alone


async def test_while_the_algorithm_probes_every_call_is_timed() -> None:
    algorithm = Scripted(100, probing=True)
    limit = limited(algorithm)

    async def work() -> None:
        pass

    for _ in range(10):
        await limit.call(work)
    assert len(algorithm.samples) == 10


async def test_gradient2_times_every_call_of_its_first_probe() -> None:
    limit = sw.ConcurrencyLimit(algorithm="gradient2", rng=random.Random(1))
    algorithm = limit.algorithm
    assert isinstance(algorithm, sw.Gradient2Limit)

    async def work() -> None:
        await anyio.sleep(0.01)

    def probing() -> bool:
        return algorithm.probing

    await limit.call(work)  # the first call is timed, and starts a probe
    assert probing()
    for _ in range(200):
        await limit.call(work)
    assert not probing()
    assert algorithm.base_rtt == pytest.approx(0.01)


@pytest.mark.parametrize(("max_queued", "refused"), [(0, 5), (5, 0)])
async def test_a_burst_over_a_quarter_of_the_limit_while_it_probes_is_refused_or_queued(
    max_queued: int, refused: int
) -> None:
    """What load-shedding.md says a probe costs: the limit is a quarter of itself."""
    limit = sw.ConcurrencyLimit(max_queued=max_queued, rng=random.Random(1))
    algorithm = limit.algorithm
    assert isinstance(algorithm, sw.Gradient2Limit)

    @limit
    async def work() -> None:
        await anyio.sleep(0.05)

    await work()  # the first call starts a probe: 20 // 4 = 5 calls at once
    assert algorithm.probing
    assert limit.limit == 5
    outcomes: list[str] = []

    async def one() -> None:
        try:
            await work()
        except sw.RateLimitExceeded:
            outcomes.append("refused")
        else:
            outcomes.append("served")

    async with anyio.create_task_group() as group:
        for _ in range(10):  # half the limit of 20 it had and will have again
            group.start_soon(one)
    assert outcomes.count("refused") == refused
    assert outcomes.count("served") == 10 - refused


# -- the limit moving --------------------------------------------------------------------


def starts(
    limit: sw.ConcurrencyLimit,
) -> tuple[list[float], Callable[[float], Coroutine[Any, Any, None]]]:
    """A call through ``limit`` that sleeps its argument, and when each such call started."""
    started: list[float] = []

    @limit
    async def work(seconds: float) -> None:
        started.append(anyio.current_time())
        await anyio.sleep(seconds)

    return started, work


async def test_a_raised_limit_lets_queued_calls_in_at_once() -> None:
    algorithm = Scripted(1)
    limit = limited(algorithm, max_queued=None)
    started, work = starts(limit)
    algorithm.next = [3]
    async with anyio.create_task_group() as tg:
        tg.start_soon(work, 1.0)
        await settle()
        for _ in range(3):
            tg.start_soon(work, 5.0)
        await settle()
        assert limit.queued == 3
    # The first call's end raised the limit to 3: all three waiters ran at once.
    assert [round(t - started[0], 3) for t in started] == [0.0, 1.0, 1.0, 1.0]


async def test_a_lowered_limit_holds_new_calls_until_enough_have_ended() -> None:
    algorithm = Scripted(3)
    started, work = starts(limited(algorithm, max_queued=None))
    algorithm.next = [1, 1, 1, 1]
    async with anyio.create_task_group() as tg:
        for seconds in (1.0, 2.0, 3.0):
            tg.start_soon(work, seconds)
        await settle()
        tg.start_soon(work, 1.0)
        await settle()
    # The limit fell to 1 when the first call ended: the waiter ran once the
    # other two had ended too.
    assert round(started[3] - started[0], 3) == 3.0


async def test_a_moved_limit_is_reported_as_an_event_and_a_gauge(
    registry: CollectorRegistry,
) -> None:
    seen: list[Event] = []
    telemetry = sw.Telemetry(registry=registry, listeners=[seen.append])
    algorithm = Scripted(2)
    limit = limited(algorithm, name="pdf", telemetry=telemetry)
    assert sample(registry, "stalwart_concurrency_limit", policy="pdf") == 2

    async def work() -> None:
        pass

    algorithm.next = [2, 3]
    await limit.call(work)
    await limit.call(work)
    changes = [e for e in seen if isinstance(e, LimitChanged)]
    assert [(e.from_limit, e.to_limit, e.policy, e.kind) for e in changes] == [
        (2, 3, "pdf", "concurrency")
    ]
    assert str(changes[0]) == "concurrency 'pdf': limit 2 -> 3"
    assert sample(registry, "stalwart_concurrency_limit", policy="pdf") == 3
    assert sample(registry, "stalwart_concurrency_in_flight", policy="pdf") == 0


async def test_a_call_runs_in_its_span_and_the_limit_change_is_recorded_on_it(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    algorithm = Scripted(4)
    limit = limited(algorithm, name="pdf", telemetry=telemetry)
    algorithm.next = [5]

    @limit
    async def work() -> None:
        pass

    await work()
    span = spans.only()
    assert span.name == "stalwart.concurrency pdf"
    [event] = span.events
    assert event.name == "stalwart.limit.changed"
    assert dict(event.attributes or {}) == {
        "stalwart.policy": "pdf",
        "stalwart.from_limit": 4,
        "stalwart.to_limit": 5,
    }


async def test_it_composes_in_a_pipeline_where_an_inner_timeout_is_a_drop() -> None:
    algorithm = Scripted()
    limit = limited(algorithm)

    @sw.Pipeline(sw.Retry(attempts=2, on=sw.DeadlineExceeded), limit, sw.Timeout(1.0))
    async def slow() -> None:
        await anyio.sleep(5.0)

    with pytest.raises(sw.DeadlineExceeded):
        await slow()
    assert [dropped for *_, dropped in algorithm.samples] == [True, True]
    assert limit.in_flight == 0


# -- against a simulated downstream ------------------------------------------------------


class Overloaded(Exception):
    """The simulated downstream's queue was full: the service's 503."""


# The downstream: 10 workers, lognormal service (median 100 ms, sigma 0.5),
# offered 1.5 times what it can serve (Poisson arrivals). Its capacity halves
# at 30 s (latency rises: the queue grows) and comes back at 60 s.
WORKERS = 10
MEDIAN = 0.1
SIGMA = 0.5
HALVED, RESTORED, END = 30.0, 60.0, 90.0


async def offer(limit: sw.ConcurrencyLimit, *, queue: int | None, seed: int) -> Trace:
    """Poisson arrivals at 1.5 times the capacity, through ``limit``, to the downstream."""
    downstream = Downstream(capacity=WORKERS, queue=queue, median=MEDIAN, sigma=SIGMA, seed=seed)
    rate = 1.5 * WORKERS / downstream.mean_service
    arrivals = random.Random(f"arrivals:{seed}")
    trace = Trace()
    origin = anyio.current_time()

    @limit
    async def call() -> None:
        now = anyio.current_time()
        finish = downstream.arrive(now)
        if finish is None:
            await anyio.sleep(0.001)
            raise Overloaded
        await anyio.sleep(finish - now)

    async def one() -> None:
        try:
            await call()
        except sw.RateLimitExceeded:
            trace.refused += 1
        except Overloaded:
            trace.dropped += 1

    async def watch() -> None:
        while (t := anyio.current_time() - origin) < END:
            trace.times.append(t)
            trace.limits.append(limit.limit)
            await anyio.sleep(0.1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        changes = [(HALVED, WORKERS // 2), (RESTORED, WORKERS)]
        while (t := anyio.current_time() - origin) < END:
            while changes and changes[0][0] <= t:
                downstream.set_capacity(anyio.current_time(), changes.pop(0)[1])
            tg.start_soon(one)
            await anyio.sleep(arrivals.expovariate(rate))
    return trace


def phases(trace: Trace, low: Any, high: Any) -> None:
    """From 15 s after each change, the median limit is within [low(c), high(c)] for its c."""
    for end, workers in ((HALVED, WORKERS), (RESTORED, WORKERS // 2), (END, WORKERS)):
        median = trace.median(end - 15.0, end)
        assert low(workers) <= median <= high(workers), (end, workers, median)


def backs_off_and_recovers(trace: Trace) -> None:
    before = trace.median(HALVED - 10.0, HALVED)
    after = trace.median(HALVED + 5.0, HALVED + 15.0)
    back = trace.median(RESTORED + 5.0, RESTORED + 15.0)
    assert after < 0.8 * before, (before, after)
    assert back > 1.25 * after, (after, back)


async def test_aimd_as_a_policy_settles_just_under_where_the_downstream_sheds() -> None:
    """A short queue (8 places): calls are dropped above c + 8, and AIMD saws below that.

    From 15 s after each change the median limit is within [0.85 (c + 8), c + 8]; it
    falls by over a fifth within 15 s of the halving, and grows back as fast.
    """
    queue = 8
    trace = await offer(
        sw.ConcurrencyLimit(algorithm="aimd", drop_on=(TimeoutError, Overloaded)),
        queue=queue,
        seed=1,
    )
    phases(trace, lambda c: 0.85 * (c + queue), lambda c: c + queue)
    backs_off_and_recovers(trace)
    assert trace.dropped > 0
    assert trace.refused > 0


async def test_vegas_as_a_policy_keeps_a_small_queue_in_front_of_a_deep_one() -> None:
    """A deep queue (80 places) that never fills: Vegas holds c + alpha to c + beta.

    alpha and beta are 3 and 6 at these limits; the probed base is off by a
    few percent, which moves that by a few calls: from 15 s after each change,
    within [c + 1, c + 12].
    """
    trace = await offer(
        sw.ConcurrencyLimit(algorithm="vegas", rng=random.Random(1)), queue=80, seed=1
    )
    phases(trace, lambda c: c + 1, lambda c: c + 12)
    backs_off_and_recovers(trace)
    assert trace.dropped == 0


async def test_gradient2_as_a_policy_settles_near_tolerance_times_capacity() -> None:
    """The same deep queue: Gradient2 holds about 1.5 c + 4 (within 25 %, from 15 s after
    each change)."""
    trace = await offer(
        sw.ConcurrencyLimit(algorithm="gradient2", rng=random.Random(1)), queue=80, seed=1
    )
    phases(trace, lambda c: 0.75 * (1.5 * c + 4), lambda c: 1.25 * (1.5 * c + 4))
    backs_off_and_recovers(trace)
    assert trace.dropped == 0


async def test_the_limit_keeps_latency_near_the_unloaded_one_where_no_limit_would_not() -> None:
    """What the limit is for: offered 1.5 times its capacity, an unlimited caller's queue
    grows without end; behind Gradient2 the calls served wait a bounded while."""
    waits: dict[str, list[float]] = {"limited": [], "unlimited": []}
    for kind in waits:
        downstream = Downstream(capacity=WORKERS, queue=None, median=MEDIAN, sigma=SIGMA, seed=3)
        rate = 1.5 * WORKERS / downstream.mean_service
        arrivals = random.Random("arrivals:3")
        guard = sw.ConcurrencyLimit(rng=random.Random(3)) if kind == "limited" else None

        async def call(kind: str = kind, downstream: Downstream = downstream) -> None:
            now = anyio.current_time()
            finish = downstream.arrive(now)
            assert finish is not None
            await anyio.sleep(finish - now)
            waits[kind].append(anyio.current_time() - now)

        async def one(call: Any = call, guard: sw.ConcurrencyLimit | None = guard) -> None:
            with contextlib.suppress(sw.RateLimitExceeded):
                await (call() if guard is None else guard.call(call))

        start = anyio.current_time()
        async with anyio.create_task_group() as tg:
            while anyio.current_time() - start < 20.0:
                tg.start_soon(one)
                await anyio.sleep(arrivals.expovariate(rate))
    limited_p99 = sorted(waits["limited"])[math.ceil(0.99 * len(waits["limited"])) - 1]
    unlimited_p99 = sorted(waits["unlimited"])[math.ceil(0.99 * len(waits["unlimited"])) - 1]
    assert limited_p99 < 1.0
    assert unlimited_p99 > 5.0


# -- whatever happens --------------------------------------------------------------------

Call = tuple[int, int, str]  # (arrival, duration, how it ends)

workloads = st.lists(
    st.tuples(
        st.integers(0, 12),
        st.integers(0, 4),
        st.sampled_from(["returns", "raises", "times out", "is cancelled"]),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60)
@given(
    calls=workloads,
    limits=st.lists(st.integers(1, 4), max_size=25),
    max_queued=st.sampled_from([0, 2, None]),
)
async def test_no_call_starts_past_the_limit_and_no_slot_is_lost(
    calls: list[Call], limits: list[int], max_queued: int | None
) -> None:
    algorithm = Scripted(2, probing=True)  # every call is a sample: the limit moves a lot
    algorithm.next = list(limits)
    limit = limited(algorithm, max_queued=max_queued, max_wait=3.0)
    running = 0

    @limit
    async def body(duration: int, ending: str) -> None:
        nonlocal running
        running += 1
        assert running <= limit.in_flight <= limit.limit
        try:
            await anyio.sleep(duration)
            if ending == "raises":
                raise ValueError
            if ending == "times out":
                raise TimeoutError
        finally:
            running -= 1

    async def caller(arrival: int, duration: int, ending: str) -> None:
        await anyio.sleep(arrival)
        with contextlib.suppress(ValueError, TimeoutError, sw.RateLimitExceeded):
            if ending == "is cancelled":
                with anyio.move_on_after(duration / 2):
                    await body(duration, ending)
            else:
                await body(duration, ending)

    with anyio.fail_after(1_000):
        async with anyio.create_task_group() as tg:
            for arrival, duration, ending in calls:
                tg.start_soon(caller, arrival, duration, ending)
    assert (limit.in_flight, limit.queued, running) == (0, 0, 0)
