"""Adaptive concurrency limits: AIMD, Vegas and Gradient2, as pure state machines.

`ConcurrencyLimit` wraps one of these: it admits a call while fewer than
``limit`` are in flight and, when a call ends, reports it with
``on_sample(now, rtt, in_flight, dropped)``, which returns the new limit.
They do no I/O and read no clock (``now`` and ``rtt`` are seconds given by
the caller); every sample costs O(1) and allocates nothing.

A sample:

* ``now``: when the call ended (never earlier than an earlier sample's);
* ``rtt``: how long it took;
* ``in_flight``: the calls in flight when it started, itself included (the
  load it was measured under: a limit that was not used is not tested, so
  none of the algorithms raises it on samples taken under half of it);
* ``dropped``: the call timed out, or the dependency rejected it for
  overload (a 503, a 429, a full queue): the plainest sign of congestion.

The three follow Netflix's concurrency-limits (the Java library: the rules
are restated here, the code is this project's own) and the TCP congestion
controls they come from. In what follows the dependency has ``c`` workers
(its real capacity, in concurrent calls) and room for ``q`` more waiting.

`AimdLimit`
    TCP Reno's rule (Jacobson 1988; Chiu and Jain 1989): add ``1 / limit``
    per successful sample (about one per round trip at full use) and cut the
    limit to ``backoff`` times itself on a drop, or on a call slower than
    ``timeout``. One cut per congestion event: drops of calls sent before
    the last cut were sent under the old limit and are its echo. It finds
    the ceiling only by hitting it, and settles in a saw-tooth between
    ``backoff * L`` and ``L``, ``L`` being where calls start to be dropped
    (``c + q``). Choose it when the dependency sheds load itself (429s,
    503s, a short queue) and its latency says little.
`VegasLimit`
    TCP Vegas (Brakmo and Peterson, 1995): from the round trip with no
    queue (``base``) and the recent one (``rtt``), the queue the limit
    builds is ``limit * (1 - base / rtt)`` (``limit`` calls on ``c``
    workers take ``limit / c`` times as long: this is exactly the number
    waiting). Below ``alpha`` queued calls it adds ``log10(limit)``, above
    ``beta`` it takes that away, between them it holds, and with no queue
    at all it adds three times as much (a fast start); ``alpha = 3`` and
    ``beta = 6`` times ``max(1, log10(limit))``, as in Netflix's version.
    It settles between ``c + alpha`` and ``c + beta``: a small queue, so no
    worker idles and latency stays near the base. The best choice when the
    dependency queues rather than sheds, and its latency is steady.
`Gradient2Limit`
    Netflix's Gradient2: the ratio ``tolerance * base / rtt`` (the
    "gradient", kept between 0.5 and 1) scales the limit, plus
    ``queue_size`` calls of headroom so that it can grow; each window moves
    the limit a ``smoothing`` share of the way there. It settles where
    latency is ``tolerance`` times the base: about ``tolerance * c +
    queue_size`` calls in flight (1.5 times the capacity, plus 4, by
    default). Its steps are proportional to the excess (up to halving the
    limit), so it backs off faster than Vegas when latency jumps, and it
    tolerates noisier latencies. Netflix's version compares with a
    long-term average of the loaded round trip instead of a probed base;
    in simulation that average follows the queue it should detect, and the
    limit crept up until calls were dropped.

Two departures from Netflix's code, both found necessary in the simulated
queue of ``tests/queueing.py``:

* Vegas and Gradient2 take samples a round trip at a time: a window closes
  once it holds ``window_samples`` samples and spans its own mean round
  trip, and the limit moves once per window, on the window's mean. One
  round trip is how long a change of the limit takes to show in latency;
  reacting to each sample counts the same queue many times, and makes the
  speed of convergence depend on the traffic.
* The base (no-queue) round trip is measured by probes (`_Baseline`), as
  BBR's ProbeRTT and Envoy's adaptive concurrency filter do: a minimum of
  noisy samples sits far below the mean (Vegas then sees a queue that is
  not there and shrinks to a fraction of the capacity), and any baseline
  that drifts up to follow a slower dependency also drifts up with the
  queue it is meant to measure.
"""

from __future__ import annotations

import abc
import math
import random
from typing import Final, Protocol, final

from . import _validate

__all__ = ["ALGORITHMS", "AimdLimit", "Gradient2Limit", "LimitAlgorithm", "VegasLimit"]


class LimitAlgorithm(Protocol):
    """What `ConcurrencyLimit` needs of an algorithm: a limit, and samples to move it.

    `ConcurrencyLimit` reports every call that ends as a drop, and every
    call that started with at least half the limit in flight; of the calls
    that started with fewer, it times one in 32 (such a limit is far from
    being used, and timing every call would cost more than the rest of the
    policy). An algorithm with a true ``probing`` attribute (optional: the
    built-in Vegas and Gradient2 have one, true while they measure the
    unloaded round trip) gets every call while it is true. A drop of a call
    that was not timed comes with ``rtt`` 0.0.
    """

    @property
    def limit(self) -> int:
        """Calls allowed in flight now (between the algorithm's minimum and maximum)."""

    def on_sample(self, now: float, rtt: float, in_flight: int, dropped: bool) -> int:
        """Learn from a call that ended at ``now`` after ``rtt`` seconds, started with
        ``in_flight`` calls in flight (itself included); return the new limit."""


def _bounds(initial: int, minimum: int, maximum: int) -> tuple[int, int, int]:
    minimum = _validate.count("minimum", minimum)
    maximum = _validate.count("maximum", maximum)
    initial = _validate.count("initial", initial)
    if maximum < minimum:
        raise ValueError(f"maximum must be >= minimum, got maximum={maximum}, minimum={minimum}")
    if not minimum <= initial <= maximum:
        raise ValueError(
            f"initial must be between minimum and maximum, got {initial} "
            f"(minimum={minimum}, maximum={maximum})"
        )
    return initial, minimum, maximum


@final
class AimdLimit:
    """Additive increase, multiplicative decrease: TCP Reno's rule, for `ConcurrencyLimit`.

    Adds ``1 / limit`` per call that was not dropped (about one per round
    trip when the limit is used; nothing for calls that started with under
    half the limit in flight), and cuts the limit to ``backoff`` times itself
    on a drop, once per congestion event (drops of calls sent before the last
    cut are its echo). It settles in a saw-tooth just under where calls start
    to be dropped: choose it for a dependency that sheds load itself (429s,
    503s, a short queue).

    Args:
        initial: the limit at first, between ``minimum`` and ``maximum``.
        minimum: the lowest the limit goes, >= 1.
        maximum: the highest the limit goes.
        backoff: the factor a drop cuts the limit by, in [0.5, 1).
        timeout: a call slower than this many seconds counts as a drop
            (None: only drops count).

    Example::

        limit = sw.ConcurrencyLimit(algorithm=sw.AimdLimit(initial=10, backoff=0.8))
    """

    __slots__ = ("_backoff", "_cut_at", "_limit", "_maximum", "_minimum", "_timeout")

    def __init__(
        self,
        *,
        initial: int = 20,
        minimum: int = 1,
        maximum: int = 1000,
        backoff: float = 0.9,
        timeout: float | None = None,
    ) -> None:
        initial, self._minimum, self._maximum = _bounds(initial, minimum, maximum)
        self._backoff = _backoff(backoff)
        self._timeout = _validate.optional_duration("timeout", timeout, positive=True)
        self._limit = float(initial)
        self._cut_at = -math.inf  # when the limit was last cut

    #: AIMD never probes: it needs no sample of an unloaded call.
    probing = False

    @property
    def limit(self) -> int:
        return int(self._limit)

    def on_sample(self, now: float, rtt: float, in_flight: int, dropped: bool) -> int:
        limit = self._limit
        timeout = self._timeout
        if dropped or (timeout is not None and rtt > timeout):
            if now - rtt >= self._cut_at:  # not an echo of congestion already answered
                limit = max(float(self._minimum), limit * self._backoff)
                self._cut_at = now
        elif 2 * in_flight >= limit:
            limit = min(float(self._maximum), limit + 1.0 / limit)
        self._limit = limit
        return int(limit)

    def __repr__(self) -> str:
        return f"AimdLimit(limit={self._limit:.1f}, backoff={self._backoff:g})"


@final
class _Window:
    """Samples of about one round trip, summed: the mean round trip, the load, any drop."""

    __slots__ = ("count", "dropped", "in_flight", "samples", "start", "total")

    def __init__(self) -> None:
        self.clear(-math.inf)

    def clear(self, start: float) -> None:
        self.start = start
        self.samples = 0  # every sample, drops included
        self.count = 0  # samples with a round trip (not dropped)
        self.total = 0.0  # their round trips
        self.in_flight = 0  # the most in flight any of them started with
        self.dropped = False

    def add(self, now: float, rtt: float, in_flight: int, dropped: bool, minimum: int) -> bool:
        """Add a sample; True when the window is complete (at least ``minimum`` samples
        spanning their mean round trip)."""
        if self.start == -math.inf:
            self.start = now
        self.samples += 1
        if dropped:
            self.dropped = True
        else:
            self.count += 1
            self.total += rtt
        if in_flight > self.in_flight:
            self.in_flight = in_flight
        if self.samples < minimum:
            return False
        return not self.count or now - self.start >= self.total / self.count


@final
class _Baseline:
    """The round trip with no queue in front of the dependency, kept honest by probes.

    A probe holds the limit at a quarter of itself: with a quarter of the
    limit in flight nothing queues (unless the limit was over four times the
    dependency's capacity), so the calls' mean round trip is the no-load
    one. It waits one recent round trip for the calls sent before it to end,
    and three more before it counts (calls sent after the start that end
    soon after it are the quick ones, and would bias the mean low; later,
    only calls over three round trips long are missing), then averages
    ``samples`` round trips (at most five per call of the probe's limit, so
    a small limit probes briefly). A mean within a quarter of the last one
    is averaged with it (a probe's mean is noisy); a larger change replaces
    it. A probe that gets no answers gives up after a while and keeps the
    old base.

    A probe runs at the first sample, and then every ``interval`` seconds
    but at least 250 round trips after the last (times 0.75 to 1.25, drawn
    from ``rng`` when given, so that a fleet's clients do not probe in
    step). The cost: a quarter of the limit for about ten round trips in
    every 250, a few percent of the throughput at full load.

    Without probes the base would either never forget (a dependency that
    became slower for good would look queued forever, and the limit would
    collapse) or drift up with the queue it is meant to measure (and the
    limit would creep until calls are dropped).
    """

    __slots__ = (
        "_count",
        "_give_up",
        "_needed",
        "_next",
        "_resume",
        "_settle",
        "_steady",
        "_total",
        "active",
        "base",
        "interval",
        "limit",
        "recent",
        "rng",
        "samples",
    )

    def __init__(self, interval: float, samples: int, rng: random.Random | None) -> None:
        self.interval = interval
        self.samples = samples
        self.rng = rng
        self.base = math.inf  # the no-load round trip
        self.recent = math.nan  # a smoothed recent window mean
        self.active = False
        self.limit = 0  # the limit while probing
        self._resume = 0.0  # the limit to go back to
        self._next = -math.inf
        self._settle = self._steady = self._give_up = 0.0
        self._needed = 0
        self._count = 0
        self._total = 0.0

    def due(self, now: float) -> bool:
        return now >= self._next

    def begin(self, now: float, rtt: float, limit: float, minimum: int) -> None:
        hint = rtt if self.recent != self.recent else max(rtt, self.recent)
        self.active = True
        self.limit = probe = max(minimum, int(limit) // 4)
        self._resume = limit
        self._settle = now + hint  # calls sent from then on find no queue of ours
        # Calls sent after `_settle` that end before `_steady` are the quick
        # ones: counting them would bias the mean low. Later, only calls over
        # three round trips long are missing.
        self._steady = self._settle + 3.0 * hint
        # About five round trips of samples at most, so a small limit probes briefly.
        self._needed = min(self.samples, 5 * probe)
        self._give_up = self._steady + 4.0 * hint * (self._needed / probe + 1.0) + 1.0
        self._count = 0
        self._total = 0.0

    def add(self, now: float, rtt: float, dropped: bool) -> float | None:
        """A sample during a probe; the limit to resume with when the probe is over."""
        if now > self._give_up:
            return self._end(now)
        if dropped or now < self._steady or now - rtt < self._settle:
            return None
        self._count += 1
        self._total += rtt
        if self._count < self._needed:
            return None
        measured = self._total / self._count
        base = self.base
        # A probe's mean is noisy (a few hundred samples at most): while the
        # dependency stays the same, average it with the last one; a change
        # of over a quarter is news, and replaces it.
        if 0.8 < measured / base < 1.25:
            measured = 0.5 * (base + measured)
        self.base = measured
        if self.recent != self.recent:
            self.recent = measured
        return self._end(now)

    def _end(self, now: float) -> float:
        self.active = False
        spread = 1.0 if self.rng is None else 0.75 + 0.5 * self.rng.random()
        # At least 250 round trips apart: a probe lasts about ten of them.
        interval = max(self.interval, 250.0 * self.recent) if self.recent > 0 else self.interval
        self._next = now + interval * spread
        return self._resume

    def window(self, mean: float) -> None:
        """A window's mean round trip (smoothed: how long a queue takes to flush)."""
        recent = self.recent
        self.recent = mean if recent != recent else recent + 0.25 * (mean - recent)


class _Adaptive(abc.ABC):
    """What Vegas and Gradient2 share: windows of samples, a probed baseline, the bounds."""

    __slots__ = ("_baseline", "_limit", "_maximum", "_minimum", "_window", "_window_samples")

    def __init__(
        self,
        initial: int,
        minimum: int,
        maximum: int,
        window_samples: int,
        probe_interval: float,
        probe_samples: int,
        rng: random.Random | None,
    ) -> None:
        initial, self._minimum, self._maximum = _bounds(initial, minimum, maximum)
        self._window_samples = _validate.count("window_samples", window_samples)
        self._baseline = _Baseline(
            _validate.duration("probe_interval", probe_interval, positive=True),
            _validate.count("probe_samples", probe_samples),
            rng,
        )
        self._limit = float(initial)
        self._window = _Window()

    @property
    def limit(self) -> int:
        baseline = self._baseline
        return baseline.limit if baseline.active else int(self._limit)

    @property
    def base_rtt(self) -> float:
        """The round trip with no queue, as last measured (inf before the first probe)."""
        return self._baseline.base

    @property
    def probing(self) -> bool:
        """Is it measuring the unloaded round trip now (and so wants every sample)?"""
        return self._baseline.active

    def on_sample(self, now: float, rtt: float, in_flight: int, dropped: bool) -> int:
        baseline = self._baseline
        if baseline.active:
            resume = baseline.add(now, rtt, dropped)
            if resume is None:
                return baseline.limit
            self._limit = resume
            self._window.clear(now)
            return int(resume)
        if baseline.due(now):
            baseline.begin(now, rtt, self._limit, self._minimum)
            return baseline.limit
        window = self._window
        if not window.add(now, rtt, in_flight, dropped, self._window_samples):
            return int(self._limit)
        limit = self._limit
        if window.count:
            short = window.total / window.count
            baseline.window(short)
            if baseline.base < math.inf or window.dropped:
                limit = self._step(limit, short, baseline.base, window)
        elif window.dropped:
            limit = self._step(limit, math.nan, baseline.base, window)
        window.clear(now)
        self._limit = limit = min(float(self._maximum), max(float(self._minimum), limit))
        return int(limit)

    @abc.abstractmethod
    def _step(self, limit: float, short: float, base: float, window: _Window) -> float:
        """The limit after a window whose mean round trip was ``short`` (NaN: all dropped)."""


def _log10(limit: float) -> float:
    return max(1.0, math.log10(limit))


@final
class VegasLimit(_Adaptive):
    """TCP Vegas's rule on the queue a limit builds, for `ConcurrencyLimit`.

    Once a round trip (a window of at least ``window_samples`` calls), the
    calls waiting in front of the dependency are ``limit * (1 - base /
    rtt)``, ``base`` being the unloaded round trip (probed: see
    `Gradient2Limit`). With none, the limit grows fast (3 steps of
    ``max(1, log10(limit))``); under 3 steps it grows one, over 6 it shrinks
    one, between them it holds; a window with a drop cuts it to ``backoff``
    times itself. It keeps 3 to 6 calls waiting: choose it for a dependency
    that queues rather than sheds, with a steady latency.

    Args:
        initial: the limit at first, between ``minimum`` and ``maximum``.
        minimum: the lowest the limit goes, >= 1.
        maximum: the highest the limit goes.
        backoff: the factor a window with a drop cuts the limit by, in [0.5, 1).
        window_samples: samples per window at least (>= 1).
        probe_interval: seconds between probes of the unloaded round trip.
        probe_samples: round trips a probe averages at most (>= 1).
        rng: spreads the probes (times 0.75 to 1.25), so that a fleet's
            clients do not probe in step; None: every ``probe_interval``.
    """

    __slots__ = ("_backoff",)

    def __init__(
        self,
        *,
        initial: int = 20,
        minimum: int = 1,
        maximum: int = 1000,
        backoff: float = 0.9,
        window_samples: int = 10,
        probe_interval: float = 30.0,
        probe_samples: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            initial, minimum, maximum, window_samples, probe_interval, probe_samples, rng
        )
        self._backoff = _backoff(backoff)

    def _step(self, limit: float, short: float, base: float, window: _Window) -> float:
        if window.dropped:
            return limit * self._backoff
        if 2 * window.in_flight < limit:
            return limit  # not used enough to tell
        queue = limit * (1.0 - base / short)
        step = _log10(limit)
        if queue <= step:
            return limit + 3.0 * step  # nothing queues: grow fast
        if queue < 3.0 * step:
            return limit + step
        if queue > 6.0 * step:
            return limit - step
        return limit

    def __repr__(self) -> str:
        return f"VegasLimit(limit={self.limit}, base_rtt={self.base_rtt:g})"


@final
class Gradient2Limit(_Adaptive):
    """Netflix's Gradient2, on a probed unloaded round trip, for `ConcurrencyLimit`.

    Once a round trip (a window of at least ``window_samples`` calls), the
    limit moves a ``smoothing`` share of the way to ``limit * gradient +
    queue_size``, the gradient being ``tolerance * base / rtt`` kept within
    [0.5, 1] (0.5 for a window with a drop). It settles where calls take
    ``tolerance`` times their unloaded round trip: about ``tolerance * c +
    queue_size`` calls in flight for a dependency of ``c`` workers. Its steps
    are proportional to the excess, so it backs off fast and tolerates noisy
    latencies: the default algorithm.

    The unloaded round trip (``base``) is measured by probes: at the first
    call, then every ``probe_interval`` seconds but at least 250 round trips
    apart, the limit drops to a quarter of itself for a few round trips, and
    the mean round trip of up to ``probe_samples`` calls is the new base. A
    probe finds no queue when a quarter of the limit is under the
    dependency's capacity.

    Args:
        initial: the limit at first, between ``minimum`` and ``maximum``.
        minimum: the lowest the limit goes, >= 1.
        maximum: the highest the limit goes.
        tolerance: how much slower than unloaded recent calls may be before
            the limit shrinks (>= 1; 1.5: by half).
        smoothing: the share of each step taken, in (0, 1].
        queue_size: calls of headroom added at each step, so the limit can grow.
        window_samples: samples per window at least (>= 1).
        probe_interval: seconds between probes of the unloaded round trip.
        probe_samples: round trips a probe averages at most (>= 1).
        rng: spreads the probes (times 0.75 to 1.25), so that a fleet's
            clients do not probe in step; None: every ``probe_interval``.
    """

    __slots__ = ("_queue_size", "_smoothing", "_tolerance")

    def __init__(
        self,
        *,
        initial: int = 20,
        minimum: int = 1,
        maximum: int = 1000,
        tolerance: float = 1.5,
        smoothing: float = 0.2,
        queue_size: float = 4.0,
        window_samples: int = 10,
        probe_interval: float = 30.0,
        probe_samples: int = 100,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            initial, minimum, maximum, window_samples, probe_interval, probe_samples, rng
        )
        self._tolerance = _validate.number("tolerance", tolerance, minimum=1.0)
        self._smoothing = _validate.number("smoothing", smoothing)
        if not 0.0 < self._smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
        self._queue_size = _validate.number("queue_size", queue_size)

    def _step(self, limit: float, short: float, base: float, window: _Window) -> float:
        if window.dropped:
            gradient = 0.5
        elif 2 * window.in_flight < limit:
            return limit  # not used enough to tell
        else:
            gradient = max(0.5, min(1.0, self._tolerance * base / short))
        target = limit * gradient + self._queue_size
        return limit + (target - limit) * self._smoothing

    def __repr__(self) -> str:
        return f"Gradient2Limit(limit={self.limit}, base_rtt={self.base_rtt:g})"


def _backoff(value: float) -> float:
    backoff = _validate.number("backoff", value, minimum=0.5)
    if backoff >= 1.0:
        raise ValueError(f"backoff must be < 1, got {value!r}")
    return backoff


#: The algorithms by the names `ConcurrencyLimit(algorithm=...)` takes.
ALGORITHMS: Final = {"aimd": AimdLimit, "vegas": VegasLimit, "gradient2": Gradient2Limit}
