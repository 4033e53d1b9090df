"""Tail-latency hedging: `Hedge`, and the `AdaptiveDelay` it may wait.

A call through a `Hedge` starts one attempt; when that attempt has not
finished after the delay, a second attempt of the same call starts beside it
(a *hedge*), and so on up to ``hedges`` extra attempts; the first success is
the call's result ("The Tail at Scale", Dean and Barroso, CACM 2013).

How a call runs. The attempts run as tasks of one anyio task group that the
call opens and closes: whatever happens, no attempt outlives the call.

* The first success wins: the group's scope is cancelled, which cancels
  every other attempt, and the group's exit waits for them to finish.
  An attempt that succeeds after the winner (both ended in one turn of the
  loop) hands its result to ``discard``, if given, to be released.
* An attempt that fails with an exception matching ``on`` wakes the call,
  which starts the next hedge at once (if any is left), rather than after
  the delay. An exception that ``on`` does not match ends the call: it
  propagates, and the other attempts are cancelled (as `Retry` lets such an
  error through).
* When every attempt made has failed and no more may start, the last
  failure propagates, unchanged.
* Before each hedge: no hedge starts once the ambient deadline has passed,
  and a `RetryBudget` given as ``budget`` must grant it (a denied hedge is
  not made, nor any later one of that call). The call's first attempt is
  recorded in the budget as a request, unless an enclosing `Retry` sharing
  the budget recorded it already (see `_retry_budget.charged`).
* Inside `retries_disabled` (as `ResilientTransport` runs a request that is
  not safe to repeat) the call makes one attempt and nothing else.

The adaptive delay. `AdaptiveDelay` learns a high quantile (p95 by default)
of the attempts' latencies online, with a `LatencyQuantile` (fixed memory,
O(1) per sample, forgetting with a half-life), and waits that long, clamped
to its bounds. Hedging censors what it measures: a slow first attempt that a
hedge beat is cancelled before its latency is known. Dropping those attempts
would bias the quantile low (the slow calls are the ones that vanish), the
delay would shrink, more calls would hedge, and more slow ones vanish. A
cancelled loser is therefore counted at the time it ran, when that is at
least the delay the call waited: its true latency is longer still, and both
lie above the quantile the delay estimated, so the quantile's rank is
counted right. Failed attempts are not samples: an error comes back as fast
or as slow as it likes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from contextvars import Context, copy_context
from dataclasses import dataclass
from heapq import heappush
from sys import modules
from threading import get_ident
from typing import Any, Final, ParamSpec, TypeVar, final
from weakref import WeakKeyDictionary, ref

import anyio
import anyio.abc

from . import _clock, _deadline, _privates, _validate
from ._deadline import (
    _innermost_anyio_scope,
    _looked_up_anyio_scope,
    _timers_of,
    is_cancellation,
    remaining,
)
from ._latency_quantile import LatencyQuantile
from ._matchers import ExceptionMatcher, Matcher
from ._metrics import MetricFamily, PolicyMetrics
from ._policy import AsyncCallable, Binding, Policy
from ._privates import (
    ANYIO_ASYNCIO,
    LOOP_THREAD_ID,
    anyio_task_states,
    current_task,
    scope_chain,
)
from ._retry import _retries_allowed
from ._retry_budget import RetryBudget, charged
from ._telemetry import Telemetry, observed
from .events import Hedged

__all__ = ["AdaptiveDelay", "Hedge", "HedgeMetrics"]

P = ParamSpec("P")
T = TypeVar("T")

# The most hedges a call may make: more is a misconfiguration (every one is
# another request to the dependency), not a use case.
_MAX_HEDGES: Final = 16


@final
@dataclass(frozen=True, slots=True)
class AdaptiveDelay:
    """A hedge delay learned from recent latencies: ``Hedge(delay=AdaptiveDelay())``.

    The delay is the ``quantile`` of the attempts' recent latencies (p95 by
    default: about one call in twenty hedges), between ``minimum`` and
    ``maximum``. Latencies are learned online in fixed memory (a log-bucket
    histogram, 2 % relative error); the delay is the upper edge of the
    quantile's bucket, never below the quantile and at most about 4 % above
    it, so calls as fast as the quantile (all of them, for a steady latency)
    end before it and start no hedge. Each sample loses half its weight every
    ``half_life`` seconds, so the delay follows a dependency that slows down
    or speeds up. Until the recent samples weigh ``warmup`` (about that many
    calls in the last ``half_life`` seconds), the delay is ``maximum``: a
    new or quiet policy hedges little rather than guess.

    Each `Hedge` learns for itself (and `ResilientTransport` for each host).

    Args:
        quantile: the latency quantile to wait, strictly between 0 and 1.
        minimum: the shortest delay, seconds > 0.
        maximum: the longest delay (and the delay while warming up), > ``minimum``.
        half_life: seconds after which a sample weighs half as much, > 0.
        warmup: the weight of samples needed before the quantile is used, >= 1.

    Example::

        hedge = sw.Hedge(delay=sw.AdaptiveDelay(quantile=0.9, minimum=0.01, maximum=0.5))
    """

    quantile: float = 0.95
    minimum: float = 0.005
    maximum: float = 1.0
    half_life: float = 30.0
    warmup: int = 20

    def __post_init__(self) -> None:
        q = _validate.number("quantile", self.quantile)
        if not 0.0 < q < 1.0:
            raise ValueError(f"quantile must be strictly between 0 and 1, got {self.quantile!r}")
        minimum = _validate.duration("minimum", self.minimum, positive=True)
        maximum = _validate.duration("maximum", self.maximum, positive=True)
        if maximum <= minimum:
            raise ValueError(f"maximum must be > minimum ({minimum:g}), got {self.maximum!r}")
        half_life = _validate.duration("half_life", self.half_life, positive=True)
        _validate.count("warmup", self.warmup)
        object.__setattr__(self, "quantile", q)
        object.__setattr__(self, "minimum", minimum)
        object.__setattr__(self, "maximum", maximum)
        object.__setattr__(self, "half_life", half_life)

    def estimator(self) -> LatencyQuantile:
        """A fresh estimator of this quantile, over the range the delay may take."""
        return LatencyQuantile(
            self.quantile, low=self.minimum, high=self.maximum, half_life=self.half_life
        )


class HedgeMetrics(PolicyMetrics):
    """A `Hedge`'s: hedges started, and calls a hedge won."""

    __slots__ = ("hedges", "won")

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.hedges = 0
        self.won = 0

    families = (
        MetricFamily(
            "stalwart_hedges",
            "counter",
            "Hedged attempts started (attempts after the first).",
            "hedges",
        ),
        MetricFamily(
            "stalwart_hedges_won",
            "counter",
            "Calls whose result came from a hedge rather than the first attempt.",
            "won",
        ),
    )


_PENDING: Final = 0
_WON: Final = 1
_FAILED: Final = 2  # an exception `on` does not match ended the call

# What a race needs of a call whose first attempt runs inline (asyncio): the
# caller's task, a copy of its context (for the hedges), the task's
# cancellation count and innermost anyio scope when the call began (to take
# back, or put off, the interruption of that attempt when a hedge wins).
_Inline = tuple[Any, Context, int, Any]

# A `_Lane` record: (start, task, context, anyio scope, fn, args, kwargs).
_START: Final = 0


class _Race:
    """One call's attempts: how many started and are running, how the call ended.

    On asyncio the first attempt runs inline, in the caller's task; only
    when its delay passes (`expire`) does a helper task start, to run the
    hedges in a task group of its own. With a fixed delay the race is built
    only then, from the call's `_Lane` record; with an `AdaptiveDelay` it is
    built at once, as the entry the loop's timer heap fires (see `_Lane` for
    why). A call that ends before its delay costs no task (the "Hedge" rows
    of benchmarks/hot_path.py).
    """

    __slots__ = (
        "anyio_scope",
        "args",
        "cancelling",
        "context",
        "deferral",
        "delay",
        "failure",
        "first",
        "fn",
        "group",
        "helper",
        "hurry",
        "interrupted",
        "kwargs",
        "policy",
        "result",
        "running",
        "started",
        "state",
        "task",
        "timers",
        "wake",
    )
    task: Any  # the caller's asyncio task, whose first attempt runs inline; or None
    # Set for an inline first attempt only (asyncio):
    context: Context
    cancelling: int
    anyio_scope: Any
    timers: Any
    deferral: float

    def __init__(
        self,
        policy: Hedge,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        delay: float,
        inline: _Inline | None = None,
    ) -> None:
        self.policy = policy
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.delay = delay
        self.helper: asyncio.Task[None] | None = None
        if inline is None:
            self.task = None
            self.first = False
            self.prepare(0)
        else:
            # The least a call that ends before its delay needs: the rest is set
            # when the delay passes (`expire`), or the attempt fails (`prepare`).
            self.first = True  # the inline first attempt is running
            self.task, self.context, self.cancelling, self.anyio_scope = inline

    def prepare(self, started: int) -> None:
        """Set up the race's state, ``started`` attempts made (the inline one, if any)."""
        self.started = self.running = started
        self.state = _PENDING
        self.group: anyio.abc.TaskGroup | None = None
        self.wake: anyio.Event | None = None
        self.hurry = 0  # failures not yet answered by a hedge started at once
        self.result: Any = None
        self.failure: BaseException | None = None
        self.interrupted = False
        self.deferral = 0.0

    def end(self, state: int) -> None:
        """The call is decided: wake the hedging loop, interrupt an inline first attempt."""
        self.state = state
        if self.wake is not None:
            self.wake.set()
        if self.first:
            self.interrupt()

    def failed(self, exc: Exception, matches: bool, hedges: int) -> None:
        """An attempt failed with ``exc`` (``matches``: ``on`` matches it)."""
        self.failure = exc
        if not matches:
            self.end(_FAILED)
        elif self.running == 0 and self.started > hedges:
            self.end(_FAILED)  # the last one failed: nothing left to wait for
        else:
            self.hurry += 1
            if self.wake is not None:
                self.wake.set()

    # -- asyncio: the inline first attempt ----------------------------------------------

    def expire(self) -> None:
        """The delay has passed, or an interruption was put off: the loop's timer says so.

        (`_Lane.fire` for a fixed delay; the timer heap for an adaptive one,
        and for an interruption put off.)
        """
        if self.helper is None:
            if self.first:
                self.prepare(1)
                self.helper = self.timers._loop.create_task(
                    self.policy._helper(self), context=self.context
                )
        else:
            self.interrupt()

    def interrupt(self) -> None:
        """Cancel the caller's inline first attempt: the call is decided without it.

        Like a deadline (`_deadline._Scope.expire`), it waits for an anyio
        shielded block inside the attempt to end, looking again soon.
        """
        if self.interrupted or not self.first:
            return
        task = self.task
        if scope_chain(_innermost_anyio_scope(task), self.anyio_scope):
            self.deferral = min(0.01, self.deferral * 2.0 or 0.0005)
            timers = self.timers
            timers.add(timers._loop.time() + self.deferral, self)
            return
        self.interrupted = True
        task.cancel()


class _Lane:
    """The calls in flight of one fixed-delay `Hedge` on one asyncio loop, in start order.

    With a fixed delay, a call's due time (its start plus the delay) grows
    with its start: the calls in flight, kept in the order they started, are
    also in the order they fall due. So a call needs no entry in a heap nor
    a timer of its own: it adds its record to ``calls`` and takes it back
    when its first attempt ends (each O(1), a dict keyed by the caller's
    task; a call of the same policy nested in another, in the same task,
    takes the timer heap instead: `Hedge.wrap`), and one loop timer per
    lane, armed lazily, serves them all.
    When it fires, every record due is taken out and its race started (a
    helper task for the hedges, `_Race.expire`), and the timer is armed
    again for the oldest record left, if any: a call that ended before its
    delay costs no timer call (the "Hedge(delay=0.05), first attempt in
    time" row). The timer may fire for a record already taken back: it
    then looks, and waits for the next. With no call in flight it fires at
    most once more, and is not armed again: an idle loop holds no timer,
    and nothing of a call outlives the call.

    A `Hedge` keeps one lane per loop, keyed weakly by the loop (see
    `Hedge._lane_here`): a lane holds nothing of its loop but the tasks of
    its calls in flight, and the loop's timer holds the lane while armed
    (a loop closed with it armed drops it).
    """

    __slots__ = ("armed", "armed_at", "calls", "fired", "policy")

    def __init__(self, policy: Hedge | None) -> None:
        self.policy = policy
        self.calls: dict[Any, tuple[Any, ...]] = {}  # the caller's task: its record
        self.fired: dict[Any, _Race] = {}  # the caller's task: the race its timer started
        self.armed = False  # (not the handle: it holds the loop, which closes with it armed)
        self.armed_at = 0.0

    def arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Fire at ``when`` (the lane has no timer armed)."""
        self.armed = True
        self.armed_at = when
        # In an empty context: call_at would copy the caller's, and keep it.
        loop.call_at(when, self.fire, context=Context())

    def fire(self) -> None:
        """The loop's timer: start the races of the calls due, arm again for the next."""
        self.armed = False
        calls = self.calls
        if not calls:
            return
        info = _clock.asyncio_loop()
        assert info is not None  # a loop timer runs on its loop
        # The loop runs a timer once it is within its clock resolution of due.
        limit = max(info.time(), self.armed_at)
        policy = self.policy
        assert policy is not None
        delay = policy._fixed
        due: list[Any] = []
        for key, record in calls.items():
            when = record[_START] + delay  # as the call computed it when it armed the timer
            if when > limit:
                self.arm(info.loop, when)
                break
            due.append(key)
        if not due:
            return
        timers = info.timers
        if timers is None:
            timers = _timers_of(info)
        fired = self.fired
        for key in due:
            _, task, context, scope, fn, args, kwargs = calls.pop(key)
            # No hedge inside `retries_disabled`, nor for a task being cancelled:
            # the attempt goes on alone, as the call's only one. (A task's
            # cancellation count is read now, not at the call's start: one that
            # is not being cancelled now was not then, as cancellations are
            # taken back only by whoever requested them, and the count is what
            # an interruption takes back, `_settle`.)
            if not context.get(_retries_allowed, True) or task.cancelling():
                continue
            race = fired[key] = _Race(policy, fn, args, kwargs, delay, (task, context, 0, scope))
            race.timers = timers  # where an interruption put off looks again
            race.expire()


# The running task of a loop (None outside any task, where asyncio itself fails).
_task_of: Final[Callable[[Any], Any]] = current_task


class _Nowhere:
    """Stands for the loop of a policy no call has used yet: running in no thread."""

    __slots__ = ()
    _thread_id = None  # (see _privates.LOOP_THREAD_ID)


# What a fixed-delay policy caches of the loop of its last call (see `Hedge._lane_here`):
# the loop, its clock, the policy's lane there and the lane's calls.
_Here = tuple[Any, Callable[[], float], _Lane, dict[Any, tuple[Any, ...]]]

# The cache before any call, and for a policy that has no lanes: it matches no loop.
_NOWHERE: Final[_Here] = (_Nowhere(), _clock.now, _Lane(None), {})


def _anyio_scope(task: Any) -> Any:
    """`_innermost_anyio_scope`, quick when no task has an anyio scope.

    anyio keeps a task's state from its first scope until the task is
    collected: while anyio's table is empty (or anyio has never run on
    asyncio), no task has a scope, and nothing else is looked up. A task
    that never entered an anyio scope (a plain asyncio caller) has no state
    in the table: one dict lookup says so, and the cache is left to the
    tasks that have one.
    """
    states = _privates._anyio_states
    if not states:
        if states is not None or ANYIO_ASYNCIO not in modules:
            return None  # no task has a scope now, or anyio has never run on asyncio
        states = anyio_task_states()
        if not states:
            return None
    last_task, state = _deadline._last_state  # _innermost_anyio_scope's cache
    if last_task() is task:
        return state.cancel_scope
    if states.get(ref(task)) is None:
        return None
    return _looked_up_anyio_scope(task)


@final
class Hedge(Policy):
    """Cut tail latency: start another attempt beside a slow one, take the first success.

    The call starts; when it has not finished after ``delay`` seconds,
    another attempt of the same call starts beside it, and so on up to
    ``hedges`` extra attempts, each ``delay`` after the one before. The first
    attempt to succeed gives the call its result; every other attempt is
    cancelled and awaited before the call returns, so no task outlives it.

    * An attempt that fails with an exception matching ``on`` starts the
      next hedge at once. An exception ``on`` does not match ends the call
      at once (the other attempts are cancelled) and propagates.
    * When every attempt fails, the last failure propagates unchanged.
    * No hedge starts once the ambient deadline (`deadline`, `Timeout`) has
      passed. With a ``budget``, each hedge draws a retry from it, and a
      hedge it denies is not made: retries and hedges sharing one
      `RetryBudget` together add at most its ``ratio`` of extra load.
    * Cancelling the caller cancels every attempt; cancellation is never
      swallowed.
    * Inside `retries_disabled` (work that is not safe to repeat) a call
      makes a single attempt.

    **Only hedge idempotent work**: a hedged call runs twice (or more) as a
    matter of course. `stalwart.httpx.ResilientTransport` hedges only
    idempotent methods and requests carrying an ``Idempotency-Key``.

    Args:
        hedges: extra attempts at most, 1 to 16.
        delay: seconds to wait before each hedge, >= 0 (0: all attempts at
            once), or an `AdaptiveDelay` learned from recent latencies.
        on: which failures start the next hedge at once rather than end the
            call: a type, a tuple of types or a predicate (default: every
            `Exception`). Cancellation is never one of them.
        budget: a `RetryBudget`, shared with retries or not; each hedge
            draws on it.
        discard: called with the result of an attempt that succeeded after
            another had won (both ended at once), to release it: a function
            or an ``async`` function (``discard=lambda r: r.aclose()``).
        name: the ``policy`` label of its metrics and attribute of its spans.
        telemetry: where it reports (``None``: the default `Telemetry`).

    Metrics: ``stalwart_hedges_total`` (hedges started),
    ``stalwart_hedges_won_total`` (calls a hedge won); event `Hedged` (span
    event ``stalwart.hedge``) for each hedge started.

    Example::

        @sw.Hedge(delay=sw.AdaptiveDelay(quantile=0.95, maximum=0.5))
        async def get_profile(user_id: str) -> Profile: ...
    """

    kind = "hedge"
    metrics_type = HedgeMetrics
    _metrics: HedgeMetrics
    _decorator_call = "Hedge()"
    __slots__ = (
        "_adaptive",
        "_budget",
        "_delay",
        "_discard",
        "_fixed",
        "_hedges",
        "_here",
        "_lanes",
        "_matches",
        "_on",
        "_quantile",
    )

    def __init__(
        self,
        hedges: int = 1,
        *,
        delay: float | AdaptiveDelay = 0.05,
        on: ExceptionMatcher = Exception,
        budget: RetryBudget | None = None,
        discard: Callable[[Any], Any] | None = None,
        name: str = "hedge",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        self._hedges = _validate.count("hedges", hedges, maximum=_MAX_HEDGES)
        self._adaptive: AdaptiveDelay | None
        if isinstance(delay, AdaptiveDelay):
            self._adaptive, self._fixed = delay, 0.0
            self._quantile: LatencyQuantile | None = delay.estimator()
        elif isinstance(delay, (int, float)) and not isinstance(delay, bool):
            self._adaptive, self._fixed = None, _validate.duration("delay", delay)
            self._quantile = None
        else:
            raise TypeError(
                "delay must be a number of seconds or a stalwart.AdaptiveDelay, "
                f"not {type(delay).__name__}"
            )
        self._delay = delay
        self._on = on
        self._matches = Matcher("on", on)
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a stalwart.RetryBudget, not {type(budget).__name__}")
        self._budget = budget
        if discard is not None and not callable(discard):
            raise TypeError(f"discard must be callable, not {type(discard).__name__}")
        self._discard = discard
        # The loop of the last call, and the policy's lane there (see `_lane_here`).
        self._here: _Here = _NOWHERE
        self._lanes: WeakKeyDictionary[asyncio.AbstractEventLoop, _Lane] | None = None

    def _lane_here(self, info: _clock.LoopInfo) -> None:
        """Cache the running loop and this policy's lane there as ``_here``, for the next call.

        A call whose cached loop runs in its thread is on that loop (a thread
        runs one loop at a time) and looks nothing up. The lanes are keyed
        weakly by their loop and hold nothing of it: only the cache does,
        until a call on another loop replaces it.
        """
        loop = info.loop
        if getattr(loop, LOOP_THREAD_ID, None) is None:
            return  # the cache could not tell it runs: every call asks _clock (which said so)
        lanes = self._lanes
        if lanes is None:
            lanes = self._lanes = WeakKeyDictionary()
        lane = lanes.get(loop)
        if lane is None:
            lane = lanes[loop] = _Lane(self)
        self._here = (loop, info.time, lane, lane.calls)

    @property
    def hedges(self) -> int:
        """Extra attempts a call may make at most."""
        return self._hedges

    @property
    def delay(self) -> float | AdaptiveDelay:
        """The delay option: seconds, or the `AdaptiveDelay`."""
        return self._delay

    @property
    def on(self) -> ExceptionMatcher:
        """The failures that start the next hedge at once."""
        return self._on

    @property
    def budget(self) -> RetryBudget | None:
        """The `RetryBudget` hedges draw on, or None."""
        return self._budget

    def current_delay(self) -> float:
        """Seconds the next call would wait before its first hedge (needs a running loop)."""
        quantile = self._quantile
        if quantile is None:
            return self._fixed
        adaptive = self._adaptive
        assert adaptive is not None
        delay = quantile.ceiling  # (not `estimate`: see `LatencyQuantile.ceiling`)
        if delay is None or quantile.weight(_clock.now()) < adaptive.warmup:
            return adaptive.maximum
        return delay

    def _twin(self, discard: Callable[[Any], Any] | None) -> Hedge:
        """A hedge with the same options and telemetry, learning its own delay.

        `ResilientTransport` makes one per host (their metrics are shared:
        same kind and name); ``discard`` releases a late winner's response.
        """
        return Hedge(
            self._hedges,
            delay=self._delay,
            on=self._on,
            budget=self._budget,
            discard=discard if discard is not None else self._discard,
            name=self._name,
            telemetry=self._telemetry,
        )

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        positional: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        slot, span, timer = self._telemetry.provider_slot, self.in_span, self.timer()
        metrics, policy, budget = self._metrics, self, self._budget
        fixed = self._fixed
        retries_allowed = _retries_allowed.get  # (bound once: the "Hedge" row)

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def hedging(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await span(plain, args, kwargs)
                start = None if timer is None else timer()
                loop, clock, lane, calls = policy._here
                try:
                    # (LOOP_THREAD_ID, read inline: `_lane_here` cached a loop that has it.)
                    if loop._thread_id == get_ident() and (task := _task_of(loop)) not in calls:
                        # asyncio, a fixed delay, the loop of the last call (see
                        # `_lane_here`), no call of this policy in flight in this task
                        # (the record's key): the first attempt runs inline, in this
                        # task, with a record in the policy's lane for this loop, whose
                        # timer starts the hedges if the attempt is still running after
                        # the delay (`_Lane.fire`). Whether hedges may start at all
                        # (`retries_disabled`, a task being cancelled) is read then,
                        # from the record, and by `_first_failed`: a call that ends in
                        # time never asks.
                        if budget is not None and charged.get() is not budget and retries_allowed():
                            budget.deposit()
                        # The caller's anyio scope: `_anyio_scope`'s quick answers
                        # inlined (the "Hedge" row): the cached one when this task
                        # looked it up last, none while anyio's table is empty.
                        if (cached := _deadline._last_state)[0]() is task:
                            scope = cached[1].cancel_scope
                        elif not (states := _privates._anyio_states):
                            scope = (
                                None
                                if states is not None or ANYIO_ASYNCIO not in modules
                                else _anyio_scope(task)
                            )
                        else:
                            scope = _anyio_scope(task)
                        began = clock()
                        calls[task] = (
                            began,
                            task,
                            copy_context(),
                            scope,
                            fn,
                            args,
                            kwargs,
                        )
                        if not lane.armed:
                            lane.arm(loop, began + fixed)
                        try:
                            result: T = await (fn(*args, **kwargs) if kwargs else positional(*args))
                        except BaseException as exc:  # noqa: BLE001 - judged below
                            failure: BaseException | None = exc
                            result = None  # type: ignore[assignment]
                        else:
                            try:
                                del calls[task]  # in time: the call is done
                            except KeyError:
                                pass  # the delay passed: `_Lane.fire` took the record
                            else:
                                metrics.success += 1
                                return result if start is None else metrics.returned(result, start)
                            failure = None
                        race = lane.fired.pop(task, None)
                        if race is not None:  # the delay passed: hedges may be running
                            race.first = False
                            result = await policy._settle(race, failure, result, began)
                        elif calls.pop(task, None) is not None:  # failed before the delay
                            assert failure is not None
                            try:
                                result = await policy._first_failed(
                                    fn, args, kwargs, fixed, failure
                                )
                            finally:
                                failure = None
                        elif failure is not None:
                            # The delay passed, and `_Lane.fire` started no hedge: the
                            # attempt was the call's only one.
                            try:
                                raise failure
                            finally:
                                failure = None
                    else:
                        result = await policy._unlaned(fn, args, kwargs)
                except BaseException as exc:
                    metrics.failed(exc, start)
                    raise
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return hedging

        return self.build(make, binding)

    async def _unlaned(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        """A call that takes no lane: its first attempt runs inline with a timer heap entry.

        Trio, or retries disabled: `_race`. On asyncio, an adaptive delay
        (deadlines out of start order), a fixed-delay policy's first call on
        this loop (which caches it: `_lane_here`), or a call nested in one of
        this policy in the same task (whose task keys the record): the first
        attempt runs inline, with an entry in the loop's timer heap that fires
        when the delay passes.
        """
        budget, delay_fixed, quantile = self._budget, self._fixed, self._quantile
        result: Any
        info = _clock.asyncio_loop()
        if info is None or not _retries_allowed.get():
            result = await self._race(fn, args, kwargs)
        else:
            if quantile is None and delay_fixed > 0.0:
                self._lane_here(info)
            if budget is not None and charged.get() is not budget:
                budget.deposit()
            delay = delay_fixed if quantile is None else self.current_delay()
            if delay <= 0.0:
                result = await self._grouped(_Race(self, fn, args, kwargs, delay))
            else:
                task = _task_of(info.loop)
                race = _Race(
                    self,
                    fn,
                    args,
                    kwargs,
                    delay,
                    (task, copy_context(), task.cancelling(), _anyio_scope(task)),
                )
                timers = info.timers
                if timers is None:
                    timers = _timers_of(info)
                race.timers = timers
                began = info.time()
                timers._seq += 1  # _Timers.add, inlined (as _Scope does)
                entry = [began + delay, timers._seq, race]
                heappush(timers._heap, entry)
                if timers._handle is None or entry[0] < timers._armed_at:
                    timers._arm(entry[0])
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - judged below
                    race.first = False
                    failure: BaseException | None = exc
                    result = None
                else:
                    race.first = False
                    failure = None
                if race.helper is not None:
                    result = await self._settle(race, failure, result, began)
                else:
                    heap = timers._heap
                    if heap and heap[-1] is entry:  # _Timers.discard, inlined
                        heap.pop()
                        entry[2] = None
                    else:
                        timers.discard(entry)
                    if failure is not None:
                        try:
                            result = await self._first_failed(fn, args, kwargs, delay, failure)
                        finally:
                            failure = None
                    elif quantile is not None:
                        now = info.time()
                        quantile.add(now, now - began)
        return result  # type: ignore[no-any-return]

    async def _race(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        """A call on trio (whose timers are cancel scopes), or where retries are disabled.

        Every attempt is a task of one group (see `_grouped`).
        """
        if not _retries_allowed.get():
            return await fn(*args, **kwargs)
        budget = self._budget
        if budget is not None and charged.get() is not budget:
            budget.deposit()
        race = _Race(self, fn, args, kwargs, self.current_delay())
        return await self._grouped(race)  # type: ignore[no-any-return]

    async def _first_failed(
        self,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        delay: float,
        failure: BaseException,
    ) -> Any:
        """The inline first attempt failed before the delay: the first hedge starts at once."""
        if (
            not isinstance(failure, Exception)
            or not self._matches(failure)
            or not _retries_allowed.get()
        ):
            raise failure
        race = _Race(self, fn, args, kwargs, delay)
        race.prepare(1)
        race.running = 0
        race.failure = failure
        race.hurry = 1
        del failure
        return await self._grouped(race)

    async def _settle(
        self, race: _Race, exc: BaseException | None, result: Any, began: float
    ) -> Any:
        """The inline first attempt ended after the delay: decide, and wait for the hedges."""
        race.running -= 1
        quantile = self._quantile
        ours = False  # the attempt ended by our interruption
        if race.interrupted:
            # Take our cancellation back; more than ours: the caller is cancelled too.
            ours = race.task.uncancel() <= race.cancelling
            if exc is not None and is_cancellation(type(exc)) and not ours:
                await self._join(race, cancel=True)
                raise exc
        if exc is None:
            if quantile is not None:
                now = _clock.now()
                quantile.add(now, now - began)
            if race.state == _PENDING:
                race.result = result
                race.end(_WON)
            else:
                await self._release(result)  # a hedge won in the same turn
        elif ours:
            if quantile is not None and race.state == _WON:
                now = _clock.now()
                quantile.add(now, now - began)  # a loser: it ran at least this long
        elif isinstance(exc, Exception):
            if race.state == _PENDING:
                race.failed(exc, self._matches(exc), self._hedges)
        else:
            await self._join(race, cancel=True)
            raise exc  # the caller's cancellation (or an exit): never swallowed
        del exc
        await self._join(race, cancel=race.state != _PENDING)
        return self._outcome(race)

    async def _join(self, race: _Race, *, cancel: bool) -> None:
        """Wait for the helper running the hedges to finish (cancelling them, if ``cancel``)."""
        helper = race.helper
        assert helper is not None
        if cancel and not helper.done():
            if race.group is None:
                helper.cancel()  # not started yet: it never will
            else:
                race.group.cancel_scope.cancel()
        try:
            await asyncio.wait((helper,))
        except BaseException:
            # The caller is cancelled while the hedges run: cancel them, wait for them.
            if race.group is not None:
                race.group.cancel_scope.cancel()
            helper.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait((helper,))
            raise
        if not helper.cancelled():
            error = helper.exception()
            if error is not None:
                raise error

    async def _helper(self, race: _Race) -> None:
        """The hedges of a call whose first attempt runs inline (asyncio), past its delay."""
        if race.state == _PENDING:
            await self._grouped(race, joined=True)

    async def _grouped(self, race: _Race, *, joined: bool = False) -> Any:
        """Run the hedges (and the first attempt, if not started) as tasks of one group.

        ``joined``: called by the helper of an inline first attempt, which
        collects the outcome itself.
        """
        hedges, budget, delay = self._hedges, self._budget, race.delay
        closed = False  # no more hedges for this call (deadline or budget)
        async with anyio.create_task_group() as group:
            race.group = group
            wake = race.wake = anyio.Event()
            if race.started == 0:
                self._start(race)
                due = _clock.now() + delay
            else:
                due = _clock.now()  # the delay has passed, or the first attempt failed
            while race.state == _PENDING:
                if race.started <= hedges and not closed:
                    if race.hurry or _clock.now() >= due:
                        if race.hurry:
                            race.hurry -= 1
                        if self._may_hedge(budget):
                            self._start(race)
                            due = _clock.now() + delay
                        else:
                            closed = True
                        continue
                    with anyio.move_on_at(due):
                        await wake.wait()
                elif race.running - race.first:
                    await wake.wait()  # the attempts running in this group
                else:
                    break
                if wake.is_set():
                    wake = race.wake = anyio.Event()
            group.cancel_scope.cancel()
        if joined:
            return None
        return self._outcome(race)

    def _outcome(self, race: _Race) -> Any:
        """The call's result, or its failure raised."""
        if race.state == _WON:
            return race.result
        failure = race.failure
        assert failure is not None
        race.failure = None  # no cycle through the traceback that holds this frame
        try:
            raise failure
        finally:
            del failure

    def _may_hedge(self, budget: RetryBudget | None) -> bool:
        """May the call start another attempt now? Not past the deadline, nor without budget."""
        left = remaining()
        if left is not None and left <= 0.0:
            return False
        return budget is None or budget.try_withdraw()

    def _start(self, race: _Race) -> None:
        race.started += 1
        race.running += 1
        number = race.started
        if number > 1:
            self._metrics.hedges += 1
            if observed(self._telemetry):
                self.report(Hedged, attempt=number)
        group = race.group
        assert group is not None
        group.start_soon(self._attempt, race, number)

    async def _attempt(self, race: _Race, number: int) -> None:
        """One attempt, as a task of the call's group: it reports how it ended to ``race``."""
        quantile = self._quantile
        began = _clock.now() if quantile is not None else 0.0
        try:
            result = await race.fn(*race.args, **race.kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure is the race's to judge
            race.running -= 1
            if race.state == _PENDING:
                race.failed(exc, self._matches(exc), self._hedges)
            return
        except BaseException:
            race.running -= 1
            if quantile is not None and race.state == _WON:
                # A loser, cancelled: it ran at least this long (see the module docstring).
                now = _clock.now()
                if now - began >= race.delay:
                    quantile.add(now, now - began)
            raise
        race.running -= 1
        if quantile is not None:
            now = _clock.now()
            quantile.add(now, now - began)
        if race.state != _PENDING:
            await self._release(result)
            return
        race.result = result
        if number > 1:
            self._metrics.won += 1
        race.end(_WON)

    async def _release(self, result: Any) -> None:
        """Hand a late winner's result to ``discard`` (shielded: the group is cancelled)."""
        discard = self._discard
        if discard is None:
            return
        with anyio.CancelScope(shield=True):
            released = discard(result)
            if inspect.isawaitable(released):
                await released

    def __repr__(self) -> str:
        return (
            f"Hedge({self._hedges}, delay={self._delay!r}, budget={self._budget!r}, "
            f"name={self._name!r})"
        )
