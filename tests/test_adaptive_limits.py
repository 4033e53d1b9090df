"""AIMD, Vegas and Gradient2: their rules sample by sample, then against a simulated queue.

The simulations drive an algorithm the way `ConcurrencyLimit` will: calls
arrive (Poisson, more than the downstream can serve), are admitted while
fewer than ``limit`` are in flight (the rest are refused at once), go to the
`Downstream` of ``tests/queueing.py``, and report their round trip when they
end. Everything runs in virtual time from a seed: discrete events on a heap,
no event loop.
"""

from __future__ import annotations

import functools
import heapq
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalwart._adaptive_limits import (
    ALGORITHMS,
    AimdLimit,
    Gradient2Limit,
    LimitAlgorithm,
    VegasLimit,
)

from .queueing import Downstream

# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [AimdLimit, VegasLimit, Gradient2Limit])
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"minimum": 0}, ValueError, "minimum must be >= 1"),
        ({"maximum": 1.5}, TypeError, "maximum must be an int"),
        ({"minimum": 10, "maximum": 5}, ValueError, "maximum must be >= minimum"),
        ({"initial": 2000}, ValueError, "initial must be between minimum and maximum"),
        ({"initial": 1, "minimum": 2}, ValueError, "initial must be between minimum and maximum"),
    ],
)
def test_bounds_are_validated(
    algorithm: Callable[..., LimitAlgorithm],
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        algorithm(**options)


@pytest.mark.parametrize(
    ("algorithm", "options", "message"),
    [
        (AimdLimit, {"backoff": 1.0}, "backoff must be < 1"),
        (AimdLimit, {"backoff": 0.4}, "backoff must be >= 0.5"),
        (AimdLimit, {"timeout": 0}, "timeout must be > 0"),
        (VegasLimit, {"backoff": 1.0}, "backoff must be < 1"),
        (VegasLimit, {"window_samples": 0}, "window_samples must be >= 1"),
        (VegasLimit, {"probe_interval": -1.0}, "probe_interval must be > 0"),
        (VegasLimit, {"probe_samples": 0}, "probe_samples must be >= 1"),
        (Gradient2Limit, {"tolerance": 0.9}, "tolerance must be >= 1"),
        (Gradient2Limit, {"smoothing": 0.0}, "smoothing must be in"),
        (Gradient2Limit, {"smoothing": 1.5}, "smoothing must be in"),
        (Gradient2Limit, {"queue_size": -1}, "queue_size must be >= 0"),
    ],
)
def test_options_are_validated(
    algorithm: Callable[..., LimitAlgorithm], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        algorithm(**options)


def test_the_algorithms_are_known_by_the_names_concurrency_limit_takes() -> None:
    assert dict(ALGORITHMS) == {"aimd": AimdLimit, "vegas": VegasLimit, "gradient2": Gradient2Limit}


# -- AIMD ---------------------------------------------------------------------------------


def test_aimd_grows_by_about_one_per_round_trip_of_successes() -> None:
    aimd = AimdLimit(initial=20)
    for i in range(200):
        limit = aimd.on_sample(i * 0.01, 0.05, 20, False)
    # dL/dn = 1/L: L**2 = 20**2 + 2 * 200, so L = 28.3
    assert limit == aimd.limit == 28


def test_aimd_does_not_grow_a_limit_it_does_not_use() -> None:
    aimd = AimdLimit(initial=20)
    for i in range(1000):
        aimd.on_sample(i * 0.01, 0.05, 9, False)
    assert aimd.limit == 20


def test_aimd_cuts_the_limit_on_a_drop() -> None:
    aimd = AimdLimit(initial=40, backoff=0.75)
    assert aimd.on_sample(1.0, 0.05, 40, True) == 30


def test_aimd_cuts_once_per_congestion_event() -> None:
    aimd = AimdLimit(initial=100, backoff=0.5)
    assert aimd.on_sample(10.0, 1.0, 100, True) == 50
    # A call sent before the cut: the same congestion, answered already.
    assert aimd.on_sample(10.5, 1.0, 100, True) == 50
    # A call sent after the cut and dropped too: the cut was not enough.
    assert aimd.on_sample(10.3, 0.1, 50, True) == 25


def test_aimd_counts_a_call_slower_than_its_timeout_as_a_drop() -> None:
    aimd = AimdLimit(initial=40, backoff=0.5, timeout=1.0)
    assert aimd.on_sample(5.0, 1.0, 40, False) == 40  # at the timeout: not over it
    assert aimd.on_sample(6.0, 1.01, 40, False) == 20


def test_aimd_stays_within_its_bounds() -> None:
    aimd = AimdLimit(initial=5, minimum=4, maximum=6, backoff=0.5)
    assert aimd.on_sample(1.0, 0.1, 5, True) == 4
    for i in range(1000):
        aimd.on_sample(2.0 + i, 0.1, 6, False)
    assert aimd.limit == 6
    assert repr(aimd) == "AimdLimit(limit=6.0, backoff=0.5)"


# -- Vegas and Gradient2, sample by sample ------------------------------------------------


class Feeder:
    """Samples in time order: ``count`` calls of ``rtt`` seconds, one every ``gap``."""

    def __init__(self, algorithm: VegasLimit | Gradient2Limit) -> None:
        self.algorithm = algorithm
        self.now = 0.0

    def feed(
        self, count: int, rtt: float, *, gap: float = 0.001, in_flight: int | None = None
    ) -> int:
        limit = self.algorithm.limit
        for _ in range(count):
            self.now += gap
            load = self.algorithm.limit if in_flight is None else in_flight
            limit = self.algorithm.on_sample(self.now, rtt, load, False)
        return limit

    def drop(self) -> int:
        self.now += 0.001
        return self.algorithm.on_sample(self.now, 0.001, self.algorithm.limit, True)

    def probe(self, rtt: float, *, after: float = 0.001) -> None:
        """Let the probe that starts at the next sample (``after`` s on) measure ``rtt``."""
        self.feed(1, rtt, gap=after)
        assert self.algorithm._baseline.active
        while self.algorithm._baseline.active:
            self.feed(1, rtt)

    def window(self, rtt: float, in_flight: int | None = None) -> int:
        """Samples of ``rtt`` until the current window closes; the limit then."""
        window = self.algorithm._window
        while True:
            before = window.samples
            limit = self.feed(1, rtt, in_flight=in_flight)
            if window.samples <= before:
                return limit


@pytest.mark.parametrize("algorithm", [VegasLimit, Gradient2Limit])
def test_the_first_samples_probe_the_base_round_trip_at_a_quarter_of_the_limit(
    algorithm: Callable[..., VegasLimit | Gradient2Limit],
) -> None:
    limiter = algorithm(initial=40, minimum=2)
    feeder = Feeder(limiter)
    assert limiter.base_rtt == math.inf
    assert feeder.feed(1, 0.1) == 10  # the probe starts
    # One round trip for the calls sent before it, three before counting,
    # then five samples per call of its limit.
    feeder.feed(399, 0.1)
    assert limiter.limit == 10
    assert limiter.base_rtt == math.inf
    feeder.feed(49, 0.1)
    assert limiter.limit == 10
    assert feeder.feed(1, 0.1) == 40
    assert limiter.base_rtt == pytest.approx(0.1)


@pytest.mark.parametrize("algorithm", [VegasLimit, Gradient2Limit])
def test_a_probe_counts_only_calls_sent_after_the_queue_drained(
    algorithm: Callable[..., VegasLimit | Gradient2Limit],
) -> None:
    limiter = algorithm(initial=40)
    feeder = Feeder(limiter)
    feeder.feed(1, 0.1)  # the probe starts at 0.001; calls sent before 0.101 had a queue
    feeder.feed(500, 5.0)  # long calls sent before it: ignored, however many
    assert limiter.base_rtt == math.inf
    feeder.feed(50, 0.1)
    assert limiter.base_rtt == pytest.approx(0.1)


@pytest.mark.parametrize("algorithm", [VegasLimit, Gradient2Limit])
@pytest.mark.parametrize(("rtt", "interval"), [(0.1, 30.0), (1.0, 250.0)])
def test_probes_repeat_every_probe_interval_and_at_least_250_round_trips_apart(
    algorithm: Callable[..., VegasLimit | Gradient2Limit], rtt: float, interval: float
) -> None:
    limiter = algorithm(initial=40, probe_interval=30.0)
    feeder = Feeder(limiter)
    feeder.probe(rtt)
    ended = feeder.now
    while not limiter._baseline.active:
        feeder.feed(1, rtt, gap=0.25)
    assert interval <= feeder.now - ended < interval + 0.25


@pytest.mark.parametrize("algorithm", [VegasLimit, Gradient2Limit])
def test_a_similar_base_is_averaged_a_changed_one_replaces_it(
    algorithm: Callable[..., VegasLimit | Gradient2Limit],
) -> None:
    limiter = algorithm(initial=40, probe_interval=30.0)
    feeder = Feeder(limiter)
    feeder.probe(0.1)
    feeder.probe(0.11, after=30.0)
    assert limiter.base_rtt == pytest.approx(0.105)  # within a quarter: averaged
    feeder.probe(0.3, after=30.0)
    assert limiter.base_rtt == pytest.approx(0.3)  # three times slower: replaced


def test_probes_are_spread_by_the_rng() -> None:
    ends = []
    for seed in range(20):
        vegas = VegasLimit(initial=40, probe_interval=100.0, rng=random.Random(seed))
        feeder = Feeder(vegas)
        feeder.probe(0.1)
        ended = feeder.now
        while not vegas._baseline.active:
            feeder.feed(1, 0.1, gap=0.5)
        ends.append(feeder.now - ended)
    assert all(75.0 <= gap <= 125.5 for gap in ends)
    assert max(ends) - min(ends) > 20.0


def test_a_probe_that_gets_no_answer_gives_up_and_keeps_the_limit() -> None:
    vegas = VegasLimit(initial=40)
    feeder = Feeder(vegas)
    feeder.feed(1, 0.1)
    assert vegas.limit == 10
    for _ in range(100):
        feeder.drop()
    feeder.now += 100.0
    assert feeder.drop() == 40
    assert vegas.base_rtt == math.inf


def test_without_a_base_the_limit_holds_except_on_drops() -> None:
    vegas = VegasLimit(initial=40, probe_interval=1000.0)
    feeder = Feeder(vegas)
    feeder.feed(1, 0.1)
    feeder.now += 100.0
    feeder.drop()  # the probe gives up
    assert feeder.window(0.1) == 40
    assert feeder.window(0.5) == 40
    feeder.drop()
    assert feeder.window(0.1) == 36


def test_vegas_grows_fast_while_nothing_queues() -> None:
    vegas = VegasLimit(initial=40)
    feeder = Feeder(vegas)
    feeder.probe(0.1)
    step = math.log10(40)
    assert feeder.window(0.1) == int(40 + 3 * step)


def test_vegas_adds_below_alpha_holds_between_and_takes_away_above_beta() -> None:
    vegas = VegasLimit(initial=100)
    feeder = Feeder(vegas)
    feeder.probe(0.1)
    # limit 100: log10 = 2, alpha = 6, beta = 12 queued calls; queue = 100 * (1 - 0.1 / rtt)
    assert feeder.window(0.1 / (1 - 0.04)) == 102  # 4 queued: add log10(100)
    assert feeder.window(0.1 / (1 - 0.09)) == 102  # 9 queued: hold
    feeder.window(0.1 / (1 - 0.3))  # 30 queued: take log10(102) away
    assert vegas._limit == pytest.approx(102 - math.log10(102))


def test_vegas_cuts_on_a_drop() -> None:
    vegas = VegasLimit(initial=100, backoff=0.8)
    feeder = Feeder(vegas)
    feeder.probe(0.1)
    feeder.drop()
    assert feeder.window(0.1) == 80


@pytest.mark.parametrize("algorithm", [VegasLimit, Gradient2Limit])
def test_a_limit_that_is_not_used_does_not_move(
    algorithm: Callable[..., VegasLimit | Gradient2Limit],
) -> None:
    limiter = algorithm(initial=100)
    feeder = Feeder(limiter)
    feeder.probe(0.1)
    assert feeder.window(0.1, in_flight=49) == 100
    assert feeder.window(1.0, in_flight=49) == 100


@pytest.mark.parametrize(
    ("rtt", "expected"),
    [
        (0.1, 40 + 0.2 * 4),  # no queue: the headroom, a smoothing share of it
        (0.12, 40 + 0.2 * 4),  # within the tolerance: the same
        (0.2, 40 + 0.2 * (40 * 0.75 + 4 - 40)),  # gradient 1.5 * 0.1 / 0.2
        (1.0, 40 + 0.2 * (40 * 0.5 + 4 - 40)),  # gradient floored at 0.5
    ],
)
def test_gradient2_scales_the_limit_by_tolerance_times_base_over_rtt(
    rtt: float, expected: float
) -> None:
    gradient2 = Gradient2Limit(initial=40)
    feeder = Feeder(gradient2)
    feeder.probe(0.1)
    feeder.window(rtt)
    assert gradient2._limit == pytest.approx(expected)


def test_gradient2_halves_its_target_on_a_drop() -> None:
    gradient2 = Gradient2Limit(initial=40, smoothing=1.0, queue_size=0.0)
    feeder = Feeder(gradient2)
    feeder.probe(0.1)
    feeder.drop()
    assert feeder.window(0.1) == 20
    assert "Gradient2Limit(limit=20, base_rtt=0.1" in repr(gradient2)


def test_a_window_waits_for_its_samples_and_its_round_trip() -> None:
    vegas = VegasLimit(initial=40, window_samples=20)
    feeder = Feeder(vegas)
    feeder.probe(0.1)
    before = vegas.limit
    feeder.feed(19, 0.01, gap=0.1)  # spans its round trip, but 19 samples
    assert vegas.limit == before
    feeder.feed(1, 0.01, gap=0.1)
    assert vegas.limit > before
    grown = vegas.limit
    feeder.feed(30, 1.0, gap=0.01)  # 30 samples within 0.3 s: under the round trip of 1 s
    assert vegas.limit == grown


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@settings(max_examples=200)
@given(
    samples=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=2.0),  # seconds since the previous sample
            st.floats(min_value=0.0, max_value=5.0),  # round trip
            st.integers(min_value=1, max_value=500),  # in flight
            st.booleans(),  # dropped
        ),
        max_size=400,
    ),
    minimum=st.integers(min_value=1, max_value=10),
    span=st.integers(min_value=0, max_value=100),
)
def test_the_limit_stays_within_its_bounds_whatever_the_samples(
    name: str, samples: list[tuple[float, float, int, bool]], minimum: int, span: int
) -> None:
    maximum = minimum + span
    limiter = ALGORITHMS[name](initial=minimum, minimum=minimum, maximum=maximum)
    now = 0.0
    for gap, rtt, in_flight, dropped in samples:
        now += gap
        limit = limiter.on_sample(now, rtt, in_flight, dropped)
        assert limit == limiter.limit
        assert minimum <= limit <= maximum


# -- against a simulated queue ------------------------------------------------------------


@dataclass
class Trace:
    """The limit after every event, and how calls fared."""

    times: list[float] = field(default_factory=list)
    limits: list[int] = field(default_factory=list)
    refused: int = 0
    dropped: int = 0

    def limits_between(self, start: float, end: float) -> list[int]:
        return [limit for t, limit in zip(self.times, self.limits, strict=True) if start <= t < end]

    def median(self, start: float, end: float) -> float:
        return statistics.median(self.limits_between(start, end))


def simulate(
    limiter: LimitAlgorithm,
    downstream: Downstream,
    *,
    rate: float,
    duration: float,
    capacity_at: dict[float, int] | None = None,
    seed: object = 0,
    timeout: float | None = None,
    rejection: float = 0.001,
) -> Trace:
    """Poisson arrivals at ``rate`` through ``limiter`` to ``downstream`` for ``duration`` s.

    ``capacity_at`` changes the downstream's workers at given times. A call
    the downstream turns away comes back dropped after ``rejection``
    seconds; one slower than ``timeout`` is given up (dropped) then, though
    the downstream goes on serving it.
    """
    rng = random.Random(f"arrivals:{seed}")
    changes = sorted((capacity_at or {}).items())
    ending: list[tuple[float, int, float, int, bool]] = []  # (end, order, start, load, dropped)
    order = 0
    in_flight = 0
    trace = Trace()
    arrival = rng.expovariate(rate)
    while arrival < duration or ending:
        if ending and (ending[0][0] <= arrival or arrival >= duration):
            now, _, start, load, dropped = heapq.heappop(ending)
            in_flight -= 1
            limiter.on_sample(now, now - start, load, dropped)
        else:
            now = arrival
            arrival += rng.expovariate(rate)
            while changes and changes[0][0] <= now:
                downstream.set_capacity(now, changes.pop(0)[1])
            if in_flight >= limiter.limit:
                trace.refused += 1
                continue
            in_flight += 1
            finish = downstream.arrive(now)
            if finish is None:
                end, dropped = now + rejection, True
            elif timeout is not None and finish - now > timeout:
                end, dropped = now + timeout, True
            else:
                end, dropped = finish, False
            trace.dropped += dropped
            heapq.heappush(ending, (end, order, now, in_flight, dropped))
            order += 1
        trace.times.append(now)
        trace.limits.append(limiter.limit)
    return trace


# The downstream: 40 workers, lognormal service (median 100 ms, sigma 0.5),
# offered 1.5 times what it can serve. Its capacity halves at 60 s (latency
# rises: the queue grows) and comes back at 120 s.
WORKERS = 40
MEDIAN = 0.1
SIGMA = 0.5
PHASES = {60.0: WORKERS // 2, 120.0: WORKERS}
DURATION = 180.0


def run(
    limiter: LimitAlgorithm, *, queue: int, seed: object = 0, duration: float = DURATION
) -> Trace:
    downstream = Downstream(capacity=WORKERS, queue=queue, median=MEDIAN, sigma=SIGMA, seed=seed)
    rate = 1.5 * WORKERS / downstream.mean_service
    return simulate(
        limiter, downstream, rate=rate, duration=duration, capacity_at=PHASES, seed=seed
    )


@functools.cache
def phases(name: str, seed: int) -> Trace:
    """The three phases for one algorithm (simulated once, read by several tests)."""
    return run(ALGORITHMS[name](initial=20), queue=8 if name == "aimd" else 80, seed=seed)


SEEDS = [0, 1, 2]


def assert_phases(trace: Trace, low: Callable[[int], float], high: Callable[[int], float]) -> None:
    """The median limit of each phase's last 30 s is within [low(c), high(c)] for its c."""
    for start, end, workers in ((0.0, 60.0, WORKERS), (60.0, 120.0, WORKERS // 2)):
        median = trace.median(end - 30.0, end)
        assert low(workers) <= median <= high(workers), (start, workers, median)
    recovered = trace.median(150.0, 180.0)
    assert low(WORKERS) <= recovered <= high(WORKERS), ("recovered", recovered)


@pytest.mark.parametrize("seed", SEEDS)
def test_aimd_settles_just_under_where_the_downstream_starts_shedding(seed: int) -> None:
    """A short queue (8 places): calls are dropped above c + 8; AIMD saws below that.

    Within 30 s of each change the median limit is between 0.9 (c + 8) and c + 8.
    """
    queue = 8
    trace = phases("aimd", seed)
    assert_phases(trace, lambda c: 0.9 * (c + queue), lambda c: c + queue)
    assert trace.dropped > 0


@pytest.mark.parametrize("seed", SEEDS)
def test_vegas_keeps_a_small_queue_in_front_of_a_deep_one(seed: int) -> None:
    """A deep queue (80 places) that never fills: Vegas holds c + alpha to c + beta.

    alpha and beta are 3 and 6 times log10(limit) (5 and 10 at 50); the base
    a probe measures is off by a few percent, which moves that by a few
    calls: within [c + 1, c + 15], settled within 30 s of each change.
    """
    trace = phases("vegas", seed)
    assert_phases(trace, lambda c: c + 1, lambda c: c + 15)
    assert trace.dropped == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_gradient2_settles_near_tolerance_times_capacity(seed: int) -> None:
    """The same deep queue: Gradient2 holds about 1.5 c + 4.

    Within 25 %: the tolerance multiplies the probe's error on the base.
    """
    trace = phases("gradient2", seed)
    assert_phases(trace, lambda c: 0.75 * (1.5 * c + 4), lambda c: 1.25 * (1.5 * c + 4))
    assert trace.dropped == 0


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_backs_off_within_seconds_when_capacity_halves_and_grows_back(
    name: str, seed: int
) -> None:
    trace = phases(name, seed)
    before = trace.median(50.0, 60.0)
    after = trace.median(65.0, 75.0)  # 5 to 15 s after the halving
    back = trace.median(125.0, 135.0)  # 5 to 15 s after the return
    assert after < 0.8 * before
    assert back > 1.25 * after


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_simulation_is_determined_by_its_seed(name: str) -> None:
    first = run(ALGORITHMS[name](initial=20), queue=20, seed=7, duration=20.0)
    again = run(ALGORITHMS[name](initial=20), queue=20, seed=7, duration=20.0)
    other = run(ALGORITHMS[name](initial=20), queue=20, seed=8, duration=20.0)
    assert first.limits == again.limits
    assert first.limits != other.limits
