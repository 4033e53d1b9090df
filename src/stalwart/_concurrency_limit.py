"""A bulkhead whose limit adapts to the dependency: `ConcurrencyLimit`.

The policy admits a call while fewer than ``limit`` calls are in flight, and
reports each call that ends to its algorithm (`_adaptive_limits`: AIMD,
Vegas, Gradient2), which answers with the new limit. What a call tells the
algorithm:

* a call that **returns** is a sample of the round trip (unless
  ``drop_on_result`` says its result is a rejection: then it is a drop);
* a call that raises an exception matching ``drop_on`` is a **drop**: by
  default a timeout (`TimeoutError`, `DeadlineExceeded` among them) or a
  rejection by a limit below (`RateLimitExceeded`, `BulkheadFullError`);
* a call **cancelled by an expired deadline** around the policy (a `Timeout`
  or `deadline` outside it) timed out too: a drop, when ``drop_on`` matches
  a `DeadlineExceeded`;
* any other exception, and any other cancellation, is **no sample**: an
  error comes back as fast or as slow as it likes, and says nothing of the
  dependency's queue.

The round trip is measured from the moment the call is admitted (time spent
queued for a slot is the policy's, not the dependency's), and the load it
was measured under is the number of calls in flight then, itself included.

Not every call is timed. A call that starts with at least half the limit in
flight is; of the others, one in 32 is, unless the algorithm is probing
(then all are). No algorithm moves a limit on samples taken under half of it
(a limit that is not used is not tested), and two clock reads and a sample
cost more than the rest of the policy: timing every call would triple the
cost of an uncontended call for nothing. Drops are always reported.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine
from typing import Any, Final, NoReturn, ParamSpec, TypeVar, final

from . import _clock, _validate
from ._adaptive_limits import ALGORITHMS, AimdLimit, Gradient2Limit, LimitAlgorithm, VegasLimit
from ._deadline import counting_expiry
from ._errors import BulkheadFullError, RateLimitExceeded
from ._gauges import LiveMetrics, live_gauge, refuse
from ._matchers import ExceptionMatcher, Matcher
from ._metrics import MetricFamily
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry, observed
from ._waiters import WaitQueue
from .events import LimitChanged

__all__ = ["DEFAULT_DROPS", "ConcurrencyLimit", "ConcurrencyLimitMetrics"]

P = ParamSpec("P")
T = TypeVar("T")

#: What ``drop_on`` matches by default: a timeout, or a rejection by a limit below.
DEFAULT_DROPS: Final = (TimeoutError, RateLimitExceeded, BulkheadFullError)

# The bounds ConcurrencyLimit's signature gives, told apart from bounds given
# with an algorithm object (which carries its own).
_DEFAULT_BOUNDS: Final = (20, 1, 1000)

# Of the calls that start with under half the limit in flight, one in this many
# is timed: such a limit is far from being used, and timing every call (two
# clock reads and a sample) would cost more than the rest of the policy.
_SAMPLE_EVERY: Final = 32


class ConcurrencyLimitMetrics(LiveMetrics["ConcurrencyLimit"]):
    """A `ConcurrencyLimit`'s: refusals and drops, and its limit and occupancy, read live."""

    __slots__ = ("dropped",)
    dropped: int

    families = (
        live_gauge(
            "stalwart_concurrency_limit",
            "The adaptive concurrency limit: calls allowed in flight now.",
            lambda limit: limit.limit,
        ),
        live_gauge(
            "stalwart_concurrency_in_flight",
            "Calls running inside an adaptive concurrency limit.",
            lambda limit: limit.in_flight,
        ),
        MetricFamily(
            "stalwart_concurrency_rejected",
            "counter",
            "Calls an adaptive concurrency limit turned away.",
            "rejected",
        ),
        MetricFamily(
            "stalwart_concurrency_dropped",
            "counter",
            "Calls that timed out or were rejected below an adaptive concurrency limit.",
            "dropped",
        ),
    )


@final
class ConcurrencyLimit(Policy):
    """A bulkhead whose limit follows the dependency's latency and drops.

    At most `limit` calls run at once, as in a `Bulkhead`, but the limit
    moves: it grows while the dependency answers as fast as it does unloaded,
    and shrinks when its latency rises (a queue is building in front of it)
    or calls are **dropped** (they time out, or a limit below rejects them).
    A service then sends its dependency about as much as it can take, without
    anyone choosing a number that goes stale. A call that finds the limit
    reached waits in FIFO order if fewer than ``max_queued`` calls already
    wait, for at most ``max_wait`` seconds; otherwise it is refused at once
    with `RateLimitExceeded` (``retry_after`` None: a slot frees when a call
    ends).

    The algorithms, after Netflix's concurrency-limits library:

    * ``"gradient2"`` (the default): scales the limit by how much slower
      calls are than unloaded, with some headroom; tolerates noisy latency.
      It settles near 1.5 times the dependency's capacity (in concurrent
      calls) plus 4.
    * ``"vegas"``: keeps a small queue (3 to 6 calls, more for large limits)
      in front of a dependency that queues rather than sheds.
    * ``"aimd"``: adds one per round trip and cuts by a tenth on a drop; for
      a dependency that sheds load itself (429s, 503s, a short queue) and
      whose latency says little.

    Give an algorithm object (`VegasLimit`, `Gradient2Limit`, `AimdLimit`,
    or your own `LimitAlgorithm`) to set its own options; its bounds are
    then its own, and ``initial``, ``minimum``, ``maximum`` and ``rng`` are
    not given here. Each `ConcurrencyLimit` needs an algorithm of its own.

    What counts as a drop: an exception matching ``drop_on`` (by default a
    timeout, `DeadlineExceeded` included, or the `RateLimitExceeded` or
    `BulkheadFullError` of a limit below); a result for which
    ``drop_on_result`` is true (an HTTP 429 or 503 that was returned, not
    raised); and a call cancelled because the deadline around the policy
    expired (when ``drop_on`` matches a `DeadlineExceeded`). Other
    exceptions and cancellations teach the algorithm nothing.

    Args:
        algorithm: ``"gradient2"``, ``"vegas"``, ``"aimd"``, or an algorithm object.
        initial: the limit at first (with an algorithm named).
        minimum: the lowest the limit goes, >= 1.
        maximum: the highest the limit goes, >= ``minimum``.
        max_queued: calls allowed to wait for a slot, >= 0 (``None``: no limit).
        max_wait: seconds a call may wait for a slot, >= 0 (``None``: until
            its deadline, if any).
        drop_on: exceptions that count as drops: a type, a tuple of types or
            a predicate (default `DEFAULT_DROPS`).
        drop_on_result: ``result -> bool``, true for a result that stands
            for a rejection by the dependency.
        rng: spreads the Vegas and Gradient2 probes of the unloaded round
            trip, so that a fleet's clients do not probe in step (default: a
            generator seeded by the operating system).
        name: the ``policy`` label of its metrics and attribute of its spans.
        telemetry: where it reports (``None``: the default `Telemetry`).

    Example::

        @sw.ConcurrencyLimit(algorithm="vegas", drop_on_result=lambda r: r.status_code == 503)
        async def fetch(url: str) -> httpx.Response: ...
    """

    kind = "concurrency"
    metrics_type = ConcurrencyLimitMetrics
    _metrics: ConcurrencyLimitMetrics
    _decorator_call = "ConcurrencyLimit()"
    __slots__ = (
        "_algorithm",
        "_drop_on",
        "_drop_on_result",
        "_drops",
        "_in_flight",
        "_limit",
        "_max_queued",
        "_max_wait",
        "_queue",
        "_quiet_below",
        "_untimed",
    )

    def __init__(
        self,
        *,
        algorithm: str | LimitAlgorithm = "gradient2",
        initial: int = 20,
        minimum: int = 1,
        maximum: int = 1000,
        max_queued: int | None = 0,
        max_wait: float | None = None,
        drop_on: ExceptionMatcher = DEFAULT_DROPS,
        drop_on_result: Callable[[Any], bool] | None = None,
        rng: random.Random | None = None,
        name: str = "concurrency",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, not {type(rng).__name__}")
        self._algorithm = _algorithm(algorithm, initial, minimum, maximum, rng)
        self._limit = self._algorithm.limit
        self._max_queued = _validate.optional_count("max_queued", max_queued, minimum=0)
        self._max_wait = _validate.optional_duration("max_wait", max_wait)
        self._drops = counting_expiry(Matcher("drop_on", drop_on, allow_empty=True))
        self._drop_on = drop_on
        if drop_on_result is not None and not callable(drop_on_result):
            raise TypeError(f"drop_on_result must be callable, not {type(drop_on_result).__name__}")
        self._drop_on_result = drop_on_result
        self._in_flight = 0
        self._queue = WaitQueue()
        # A call that finds fewer than `_quiet_below` in flight starts under half
        # the limit: one such call in _SAMPLE_EVERY is timed (`_untimed` counts
        # down to it), the others are not (see `_sample`).
        self._quiet_below = self._untimed = 0
        self._untimed_below(self._limit)
        self._metrics.live.add(self)

    @property
    def limit(self) -> int:
        """Calls allowed in flight now."""
        return self._limit

    @property
    def algorithm(self) -> LimitAlgorithm:
        """The algorithm that moves the limit."""
        return self._algorithm

    @property
    def in_flight(self) -> int:
        """Calls running now (slots taken)."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now."""
        return self._queue.queued

    @property
    def max_queued(self) -> int | None:
        """Calls allowed to wait for a slot (None: no limit)."""
        return self._max_queued

    @property
    def max_wait(self) -> float | None:
        """Seconds a call may wait for a slot (None: no limit of its own)."""
        return self._max_wait

    @property
    def drop_on(self) -> ExceptionMatcher:
        """The exceptions that count as drops."""
        return self._drop_on

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        call: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        # The wrapper closes over what an untimed call uses, and reaches the
        # rest through `policy`: each name it closes over is copied into every
        # call's frame (the "ConcurrencyLimit" rows of benchmarks/hot_path.py).
        waiters, policy, metrics, judged = (
            self._queue.waiters,
            self,
            self._metrics,
            self._drop_on_result,
        )
        slot, timer = self._telemetry.provider_slot, self.timer()

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await policy.in_span(plain, args, kwargs)
                start = None if timer is None else timer()
                in_flight = policy._in_flight
                if in_flight < policy._quiet_below and policy._untimed:
                    # Under half the limit (so no caller waits), and not the call
                    # in _SAMPLE_EVERY to time: no clock, no sample (the
                    # "ConcurrencyLimit" rows of benchmarks/hot_path.py).
                    policy._in_flight = load = in_flight + 1
                    policy._untimed -= 1
                    try:
                        result = await (call(*args, **kwargs) if kwargs else call(*args))
                    except BaseException as exc:
                        policy._failed(exc, None, load)
                        metrics.failed(exc, start)
                        raise
                    if judged is not None:
                        policy._sampled(result, None, load)
                else:
                    # While any caller waits, every slot is taken (a freed slot
                    # is handed over, a raised limit hands out its new slots at
                    # once): this check alone keeps FIFO order.
                    if in_flight < policy._limit:
                        policy._in_flight = load = in_flight + 1
                    else:
                        await policy._acquire(start)
                        load = policy._in_flight
                    result = await policy._timed(
                        call(*args, **kwargs) if kwargs else call(*args), load, start
                    )
                if waiters:
                    policy._release()
                else:
                    policy._in_flight -= 1
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return guarded

        return self.build(make, binding)

    async def _acquire(self, start: float | None) -> None:
        """Wait for a slot, or raise `RateLimitExceeded` (the call's outcome is counted here)."""
        try:
            admitted = await self._queue.enter(self._max_queued, self._max_wait, self._release)
        except BaseException as exc:
            self._metrics.failed(exc, start)
            raise
        if not admitted:
            self._refuse(start)

    def _release(self) -> None:
        """Hand a slot on to the longest waiter (unless the limit fell), or free it."""
        if self._in_flight <= self._limit and self._queue.grant():
            return
        self._in_flight -= 1

    async def _timed(self, call: Coroutine[Any, Any, T], load: int, start: float | None) -> T:
        """Await a call, timed: its outcome is a sample (and its slot given back if it raised)."""
        if not self._untimed:
            self._untimed = _SAMPLE_EVERY - 1
        clock = _clock.reader()
        began = clock()
        try:
            result = await call
        except BaseException as exc:
            self._failed(exc, began, load)
            self._metrics.failed(exc, start)
            raise
        self._sampled(result, began, load, clock())
        return result

    def _sampled(
        self, result: Any, began: float | None, load: int, ended: float | None = None
    ) -> None:
        """A call returned ``result`` at ``ended``: a sample (a drop, if ``drop_on_result``
        says so). Untimed calls (``began`` None) are samples only as drops."""
        try:
            judge = self._drop_on_result
            dropped = judge is not None and bool(judge(result))
        except BaseException:
            self._release()
            raise
        if dropped:
            self._metrics.dropped += 1
        elif began is None:
            return  # an untimed call that was no drop: nothing to tell
        self._sample(began, load, dropped, ended)

    def _failed(self, exc: BaseException, began: float | None, load: int) -> None:
        """A call raised ``exc``: a drop, or no sample; its slot is given back."""
        try:
            if self._drops(exc):
                self._metrics.dropped += 1
                self._sample(began, load, True)
        finally:
            self._release()

    def _sample(
        self, began: float | None, load: int, dropped: bool, ended: float | None = None
    ) -> None:
        """Tell the algorithm of a call that ended at ``ended`` (None: now); untimed
        (``began`` None), its round trip is 0.0."""
        if ended is None:
            ended = _clock.now()
        algorithm = self._algorithm
        limit = algorithm.on_sample(ended, 0.0 if began is None else ended - began, load, dropped)
        if limit != self._limit:
            self._changed(limit)
        self._untimed_below(limit)

    def _untimed_below(self, limit: int) -> None:
        """Let calls that start under half of ``limit`` go untimed (unless the algorithm probes)."""
        # A call admitted with `in_flight` others starts with `in_flight + 1`:
        # under half the limit when 2 (in_flight + 1) < limit.
        probing = getattr(self._algorithm, "probing", False)
        self._quiet_below = -1 if probing else (limit - 1) // 2

    def _changed(self, limit: int) -> None:
        """The algorithm moved the limit: hand out the new slots, and say so."""
        previous = self._limit
        self._limit = limit
        queue = self._queue
        while self._in_flight < limit and queue.grant():
            self._in_flight += 1
        if observed(self._telemetry):
            self.report(LimitChanged, from_limit=previous, to_limit=limit)

    def _refuse(self, start: float | None) -> NoReturn:
        message = (
            f"concurrency limit {self._name!r} is reached: {self._in_flight} "
            f"call{'' if self._in_flight == 1 else 's'} in flight "
            f"(limit {self._limit}), {self._queue.queued} queued"
        )
        error = RateLimitExceeded(message, policy=self._name, retry_after=None)
        refuse(self, start, "concurrency_limited", None, error)

    def __repr__(self) -> str:
        return (
            f"ConcurrencyLimit(algorithm={self._algorithm!r}, max_queued={self._max_queued}, "
            f"name={self._name!r})"
        )


def _algorithm(
    algorithm: object, initial: int, minimum: int, maximum: int, rng: random.Random | None
) -> LimitAlgorithm:
    """The algorithm ``ConcurrencyLimit(algorithm=...)`` names or gives, checked."""
    if isinstance(algorithm, str):
        if algorithm not in ALGORITHMS:
            known = ", ".join(repr(name) for name in ALGORITHMS)
            raise ValueError(f"algorithm must be one of {known} or an algorithm, got {algorithm!r}")
        if algorithm == "aimd":
            return AimdLimit(initial=initial, minimum=minimum, maximum=maximum)
        adaptive = VegasLimit if algorithm == "vegas" else Gradient2Limit
        return adaptive(
            initial=initial,
            minimum=minimum,
            maximum=maximum,
            rng=random.Random() if rng is None else rng,
        )
    if not callable(getattr(algorithm, "on_sample", None)) or not hasattr(algorithm, "limit"):
        raise TypeError(
            "algorithm must be 'gradient2', 'vegas', 'aimd' or an object with a limit "
            f"and an on_sample() method (a LimitAlgorithm), not {type(algorithm).__name__}"
        )
    if (initial, minimum, maximum) != _DEFAULT_BOUNDS or rng is not None:
        raise ValueError(
            "initial, minimum, maximum and rng are options of the algorithm: give them to "
            f"{type(algorithm).__name__}(...) rather than to ConcurrencyLimit"
        )
    limit = getattr(algorithm, "limit", None)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"algorithm.limit must be an int >= 1, got {limit!r}")
    return algorithm  # type: ignore[return-value]
