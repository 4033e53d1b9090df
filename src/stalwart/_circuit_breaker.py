"""The circuit breaker: stop calling a dependency that keeps failing, then probe it.

States and transitions (``docs/explanation/circuit-breaker.md`` has the
diagram): CLOSED opens when a trigger fires; OPEN becomes HALF_OPEN once
``open_for`` has passed; HALF_OPEN closes (with an empty window) after
``half_open_calls`` successful trials, and opens again on a failed or slow one.

How it stays cheap:

* The hot path is one coroutine layer. While CLOSED with a count window
  (and nothing needs timing), once a success can no longer trip the breaker
  (see `_record`), a successful call costs two attribute checks and
  ``ring.pending += 1``, with no clock read. With a time window every
  outcome is checked against the triggers: time moving old calls out can
  raise a rate, whatever the new outcome was.
* Rejection while OPEN reads the clock once and builds a fresh
  `CircuitOpenError` (a shared instance would keep every rejected caller's
  traceback alive).
* The state is read from the breaker's own memory; a store is only asked to
  change it (see `CircuitStore`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar, final

import anyio

from . import _clock, _telemetry, _validate
from ._circuit_store import CircuitRecord, CircuitState, CircuitStore
from ._errors import CircuitOpenError
from ._matchers import ExceptionMatcher, Matcher
from ._metrics import REJECTED, MetricFamily, PolicyMetrics
from ._policy import AsyncCallable, Binding, Policy
from ._privates import otel_probe
from ._telemetry import Telemetry
from ._warnings import warn
from ._windows import CountRing, CountWindow, Ring, TimeWindow, ring_for
from .events import CallRejected, CircuitStateChanged

__all__ = ["CircuitBreaker", "CircuitBreakerStatistics", "CircuitState"]

P = ParamSpec("P")
T = TypeVar("T")


_CLOSED: Final = CircuitState.CLOSED
_OPEN: Final = CircuitState.OPEN
_HALF_OPEN: Final = CircuitState.HALF_OPEN

# How a finished call counts.
_SUCCESS: Final = 0
_FAILURE: Final = 1
_NEITHER: Final = 2

_DEFAULT_WINDOW: Final = 100


# Defaults told apart from the same numbers given explicitly, by identity.
# Numbers, so that signatures and help() show the numbers; copied or pickled
# (the tuner sends options to worker processes), they stay themselves.


class _DefaultFailureRate(float):
    __slots__ = ()

    def __reduce__(self) -> str:
        return "_DEFAULT_FAILURE_RATE"


class _DefaultMinimumCalls(int):
    __slots__ = ()

    def __reduce__(self) -> str:
        return "_DEFAULT_MINIMUM_CALLS"


#: ``failure_rate`` not given: 0.5, or no rate trigger when ``consecutive_failures`` is given.
_DEFAULT_FAILURE_RATE: Final = _DefaultFailureRate(0.5)
#: ``minimum_calls`` not given (given, it asks for a rate trigger: see `CircuitBreaker`).
_DEFAULT_MINIMUM_CALLS: Final = _DefaultMinimumCalls(10)

# `CircuitOpenError(...)` runs two Python-level __init__s with keyword
# arguments: more than a bare `await` costs. Rejections build the object
# directly, without a message (the error makes its standard one when read);
# tests check that str(), repr(), args and pickling see the same error.
_new_error: Final = CircuitOpenError.__new__


@final
@dataclass(frozen=True, slots=True)
class CircuitBreakerStatistics:
    """A snapshot of a `CircuitBreaker` (see `CircuitBreaker.statistics`).

    The window's figures are those of the current (or, while not CLOSED,
    the last) closed period; a transition to CLOSED empties the window.
    """

    state: CircuitState
    #: calls in the window
    calls: int
    #: of which failed
    failures: int
    #: of which took at least ``slow_call_duration``
    slow_calls: int
    #: failures / calls (0.0 for an empty window)
    failure_rate: float
    #: slow_calls / calls (0.0 for an empty window)
    slow_call_rate: float
    #: failures in a row, up to the last call
    consecutive_failures: int
    #: half-open trial calls running in this process
    trial_calls: int
    #: seconds until a trial call is allowed: inf when forced open; None when not
    #: OPEN, or read outside a running event loop
    time_until_half_open: float | None


CIRCUIT_STATES: Final = tuple(state.value for state in CircuitState)


class CircuitBreakerMetrics(PolicyMetrics):
    """A `CircuitBreaker`'s: its state (written at each transition), transitions, rejections."""

    exclusive = True
    __slots__ = ("state", "transitions")

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.state = "closed"
        self.transitions: dict[tuple[str, str], int] = {}

    def transition(self, from_state: str, to_state: str) -> None:
        key = (from_state, to_state)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        self.state = to_state

    def _states(self) -> Iterator[tuple[tuple[str], float]]:
        for state in CIRCUIT_STATES:
            yield (state,), 1.0 if self.state == state else 0.0

    def _transitions(self) -> Iterator[tuple[tuple[str, str], float]]:
        yield from sorted(self.transitions.items())

    families = (
        MetricFamily(
            "stalwart_circuit_state",
            "gauge",
            "1 for the circuit breaker's current state, 0 for the others.",
            _states,
            ("state",),
        ),
        MetricFamily(
            "stalwart_circuit_transitions",
            "counter",
            "Circuit breaker state changes.",
            _transitions,
            ("from_state", "to_state"),
        ),
        MetricFamily(
            "stalwart_circuit_rejected", "counter", "Calls an open circuit rejected.", "rejected"
        ),
    )


@final
@dataclass(frozen=True, slots=True)
class _Rules:
    """A breaker's validated options: when to open, close, and what counts.

    Breakers with equal options share one (see `_shared`): a service with
    a breaker per dependency mostly uses the defaults.
    """

    #: None: no failure-rate trigger
    failure_rate: float | None
    minimum_calls: int
    #: calls the window must hold for rates to count: ``minimum_calls``, or
    #: the size of a smaller `CountWindow`
    enough: int
    consecutive_failures: int | None
    slow_call_duration: float | None
    slow_call_rate: float
    open_for: float
    half_open_calls: int
    failure_on: Matcher
    ignore: Matcher

    def classify(self, exc: BaseException) -> int:
        """How a call that raised ``exc`` counts: success, failure or neither."""
        if not isinstance(exc, Exception) or self.ignore(exc):
            return _NEITHER
        return _FAILURE if self.failure_on(exc) else _SUCCESS

    def is_slow(self, duration: float) -> bool:
        threshold = self.slow_call_duration
        return threshold is not None and duration >= threshold

    def tripped(self, ring: Ring) -> bool:
        """Should a CLOSED breaker with this (refreshed) window open?"""
        limit = self.consecutive_failures
        if limit is not None and ring.run >= limit:
            return True
        calls = ring.calls
        if calls < self.enough:
            return False
        rate = self.failure_rate
        if rate is not None and ring.failures / calls >= rate:
            return True
        return self.slow_call_duration is not None and ring.slow / calls >= self.slow_call_rate

    def triggers(self) -> str:
        """The active triggers, as the constructor's keywords (for ``repr``)."""
        parts = []
        if self.failure_rate is not None:
            parts.append(f"failure_rate={self.failure_rate:g}")
        if self.consecutive_failures is not None:
            parts.append(f"consecutive_failures={self.consecutive_failures}")
        if self.slow_call_duration is not None:
            parts.append(f"slow_call_duration={self.slow_call_duration:g}")
            parts.append(f"slow_call_rate={self.slow_call_rate:g}")
        if self.failure_rate is not None or self.slow_call_duration is not None:
            parts.append(f"minimum_calls={self.minimum_calls}")
        return ", ".join(parts) or "failure_rate=None"


# Shared options objects, keyed by value. Only options made of types are
# shared: a predicate may hold on to anything, and is not ours to keep.
_rules_by_value: dict[_Rules, _Rules] = {}
_RULES_KEPT: Final = 256


def _shared(rules: _Rules) -> _Rules:
    if rules.failure_on.is_predicate or rules.ignore.is_predicate:
        return rules
    found = _rules_by_value.get(rules)
    if found is not None:
        return found
    if len(_rules_by_value) < _RULES_KEPT:
        _rules_by_value[rules] = rules
    return rules


def _warn_of_unused_minimum(
    rules: _Rules, window: CountWindow | TimeWindow, *, given: bool
) -> None:
    """Warn of a ``minimum_calls`` that does not do what it says (see `CircuitBreaker`)."""
    rated = rules.failure_rate is not None or rules.slow_call_duration is not None
    if not rated:
        if given:
            warn(
                f"minimum_calls={rules.minimum_calls} has no effect: no rate trigger is on "
                "(failure_rate is off by default when consecutive_failures is given); "
                "pass failure_rate too, or leave minimum_calls out"
            )
        return
    if given and rules.enough < rules.minimum_calls:
        warn(
            f"minimum_calls={rules.minimum_calls} is more than the window holds "
            f"({window!r}): its rate triggers count from {rules.enough} calls on; "
            f"give minimum_calls <= {rules.enough}, or a larger window"
        )


def _now_or_none() -> float | None:
    try:
        return _clock.now()
    except RuntimeError:  # no event loop running: nothing time-based can change
        return None


@final
class CircuitBreaker(Policy):
    """Stop calling a dependency that keeps failing; let a few trials probe it.

    **CLOSED**, calls run and their outcomes fill a window (the last
    ``window`` calls, or a `TimeWindow`). The breaker **opens** when

    * the window holds at least ``minimum_calls`` calls and the share of
      failures is at least ``failure_rate`` (when not None); or
    * ``consecutive_failures`` calls in a row failed (when set); or
    * the window holds at least ``minimum_calls`` calls and the share that
      took ``slow_call_duration`` seconds or more (when set) is at least
      ``slow_call_rate``.

    The triggers are checked each time an outcome is recorded, whatever it
    was: in a `TimeWindow`, a success can come after older calls have left
    the window and raised its failure rate. A breaker trips on the triggers
    its caller named: ``CircuitBreaker(consecutive_failures=5)`` opens on
    five failures in a row and on nothing else (pass ``failure_rate`` too to
    have both). With no trigger at all (``failure_rate=None`` alone), only
    `force_open` opens it: a switch for operators.

    **OPEN**, calls fail at once with `CircuitOpenError`, whose
    ``retry_after`` is the time left until trials are allowed: after
    ``open_for`` seconds the breaker is **HALF_OPEN**. Then at most
    ``half_open_calls`` trial calls run at once; others are rejected with
    ``retry_after`` 0.0. Any failed or slow trial opens the breaker again;
    ``half_open_calls`` successful trials close it, with an empty window.

    Exceptions matching ``ignore`` count as nothing; then those matching
    ``failure_on`` are failures; any other exception is a success (the
    dependency answered). Cancellation and other `BaseException` s that are
    not `Exception` s count as nothing; a trial that ends so, or is ignored,
    gives its slot back. A call counts in the window only if the breaker is
    CLOSED when it ends, and a trial only if its half-open period is not
    over.

    Args:
        failure_rate: share of failures that opens, in [0, 1], or None for
            no failure-rate trigger. Not given: 0.5, or None when
            ``consecutive_failures`` is given.
        window: an ``int`` n (= ``CountWindow(n)``, the last n calls) or a
            `TimeWindow`. Recording an outcome is O(1) whatever its size.
        minimum_calls: calls the window must hold before rates count, >= 1.
            A `CountWindow` smaller than that never holds so many: its size
            is used instead, with a `StalwartWarning`. Given while no rate
            trigger is on, it would do nothing: a `StalwartWarning` too.
        consecutive_failures: failures in a row that open, >= 1, or None.
        slow_call_duration: seconds from which a call is slow, > 0, or None.
        slow_call_rate: share of slow calls that opens, in [0, 1].
        open_for: seconds to stay OPEN before trials, >= 0.
        half_open_calls: concurrent trials in HALF_OPEN, and successes that
            close, >= 1.
        failure_on: what is a failure: an exception type, tuple of types,
            or predicate ``exc -> bool``.
        ignore: what counts as nothing, in the same forms.
        store: where the state lives: None (this object), an
            `InProcessCircuitStore`, or ``stalwart.redis.RedisStore``. Breakers
            sharing a store share the state of their ``name``.

    Example::

        breaker = sw.CircuitBreaker(failure_rate=0.5, window=50, open_for=10.0)

        @breaker
        async def get_quote(symbol: str) -> Decimal: ...
    """

    kind = "circuit_breaker"
    metrics_type = CircuitBreakerMetrics
    _metrics: CircuitBreakerMetrics
    _decorator_call = "CircuitBreaker()"
    __slots__ = (
        "_fast",
        "_open_clock",
        "_open_until",
        "_ring",
        "_rules",
        "_state",
        "_store",
        "_successes",
        "_timed",
        "_trials",
        "_tripping",
        "_version",
    )

    def __init__(
        self,
        *,
        failure_rate: float | None = _DEFAULT_FAILURE_RATE,
        window: int | CountWindow | TimeWindow = _DEFAULT_WINDOW,
        minimum_calls: int = _DEFAULT_MINIMUM_CALLS,
        consecutive_failures: int | None = None,
        slow_call_duration: float | None = None,
        slow_call_rate: float = 1.0,
        open_for: float = 30.0,
        half_open_calls: int = 1,
        failure_on: ExceptionMatcher = Exception,
        ignore: ExceptionMatcher = (),
        store: CircuitStore | None = None,
        name: str = "circuit",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry, shared_state=store)
        if isinstance(window, int) and not isinstance(window, bool):
            window = CountWindow(
                _validate.count("window", window, maximum=_validate.MAX_WINDOW_CALLS)
            )
        elif not isinstance(window, (CountWindow, TimeWindow)):
            raise TypeError(
                "window must be an int (a number of calls), a CountWindow or a TimeWindow, "
                f"not {type(window).__name__}"
            )
        minimum_given = minimum_calls is not _DEFAULT_MINIMUM_CALLS
        minimum_calls = int(_validate.count("minimum_calls", minimum_calls))
        consecutive_failures = _validate.optional_count(
            "consecutive_failures", consecutive_failures
        )
        if failure_rate is _DEFAULT_FAILURE_RATE:
            failure_rate = None if consecutive_failures is not None else float(failure_rate)
        elif failure_rate is not None:
            failure_rate = _validate.rate("failure_rate", failure_rate)
        rules = _Rules(
            failure_rate=failure_rate,
            minimum_calls=minimum_calls,
            enough=(
                min(minimum_calls, window.size)
                if isinstance(window, CountWindow)
                else minimum_calls
            ),
            consecutive_failures=consecutive_failures,
            slow_call_duration=_validate.optional_duration(
                "slow_call_duration", slow_call_duration, positive=True
            ),
            slow_call_rate=_validate.rate("slow_call_rate", slow_call_rate),
            open_for=_validate.duration("open_for", open_for),
            half_open_calls=_validate.count("half_open_calls", half_open_calls),
            failure_on=Matcher("failure_on", failure_on),
            ignore=Matcher("ignore", ignore, allow_empty=True),
        )
        if store is not None and not isinstance(store, CircuitStore):
            raise TypeError(
                "store must be a circuit store (InProcessCircuitStore, RedisStore) or None, "
                f"not {type(store).__name__}"
            )
        _validate.stored_duration("open_for", rules.open_for, store)
        _warn_of_unused_minimum(rules, window, given=minimum_given)
        self._rules = _shared(rules)
        timing = rules.slow_call_duration is not None
        self._ring: Ring = ring_for(window, slow=timing)
        self._timed = timing or isinstance(window, TimeWindow)
        self._fast = False
        self._state = _CLOSED
        self._version = 0
        self._open_until = 0.0
        self._open_clock: Callable[[], float] | None = None  # see `_install`
        self._trials = 0
        self._successes = 0
        self._tripping = -1  # the version a transition to OPEN is being asked from
        self._store = store
        if store is not None:
            self._on_answer(store.attach(self._name, self._on_record))

    # -- options -------------------------------------------------------------

    @property
    def failure_rate(self) -> float | None:
        """The failure-rate trigger's threshold, or None when it is off."""
        return self._rules.failure_rate

    @property
    def window(self) -> CountWindow | TimeWindow:
        return self._ring.window

    @property
    def minimum_calls(self) -> int:
        return self._rules.minimum_calls

    @property
    def consecutive_failures(self) -> int | None:
        return self._rules.consecutive_failures

    @property
    def slow_call_duration(self) -> float | None:
        return self._rules.slow_call_duration

    @property
    def slow_call_rate(self) -> float:
        return self._rules.slow_call_rate

    @property
    def open_for(self) -> float:
        return self._rules.open_for

    @property
    def half_open_calls(self) -> int:
        return self._rules.half_open_calls

    @property
    def store(self) -> CircuitStore | None:
        return self._store

    # -- state ---------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """CLOSED, OPEN or HALF_OPEN, as of now.

        An OPEN breaker whose open period is over reads as HALF_OPEN (read
        outside a running event loop, the state of the last call).
        """
        now = _now_or_none()
        if now is not None:
            self._observe(now)
        return self._state

    def statistics(self) -> CircuitBreakerStatistics:
        """The state and the window's counts, as of now.

        Read outside a running event loop: as of the last call.
        """
        now = _now_or_none()
        if now is not None:
            self._observe(now)
        ring = self._ring
        ring.refresh(now)
        calls, failures, slow = ring.calls, ring.failures, ring.slow
        state = self._state
        until: float | None = None
        if state is _OPEN:
            if self._open_until == math.inf:
                until = math.inf
            elif now is not None:
                until = max(0.0, self._open_until - now)
        return CircuitBreakerStatistics(
            state=state,
            calls=calls,
            failures=failures,
            slow_calls=slow,
            failure_rate=failures / calls if calls else 0.0,
            slow_call_rate=slow / calls if calls else 0.0,
            consecutive_failures=ring.run,
            trial_calls=self._trials if state is _HALF_OPEN else 0,
            time_until_half_open=until,
        )

    def force_open(self) -> None:
        """Open now, and stay OPEN (no trials) until `reset`.

        Rejections say ``retry_after=inf``. With a shared store, every
        breaker sharing the state opens.
        """
        self._install(_OPEN, self._version + 1, math.inf)
        if self._store is not None:
            self._store.assign(self._name, _OPEN)

    def reset(self) -> None:
        """Close now, with an empty window (also ends a `force_open`)."""
        self._install(_CLOSED, self._version + 1, 0.0)
        if self._store is not None:
            self._store.assign(self._name, _CLOSED)

    def _observe(self, now: float) -> None:
        """OPEN turns HALF_OPEN when its period is over (forced: never, until is inf)."""
        if self._state is _OPEN and now >= self._open_until:
            self._state = _HALF_OPEN
            self._announce(_OPEN, _HALF_OPEN)

    def _install(self, state: CircuitState, version: int, open_until: float) -> None:
        """Make ``state`` (CLOSED or OPEN) the breaker's state, at ``version``."""
        before = self._state
        self._fast = False
        self._version = version
        self._open_until = open_until
        # The clock an OPEN state's rejections may read directly: ``until``
        # came from time.monotonic() (a plain asyncio loop), or is infinite
        # (forced: any clock will do). Else None, and they ask `_clock.now`.
        if open_until == math.inf:
            self._open_clock = time.monotonic
        else:
            self._open_clock = _clock.monotonic_or_none() if state is _OPEN else None
        self._trials = self._successes = 0
        if state is _CLOSED:
            self._ring.clear()
        self._state = state
        if before is not state:
            self._announce(before, state)

    def _announce(self, before: CircuitState, after: CircuitState) -> None:
        self._metrics.transition(before.value, after.value)
        self.report(CircuitStateChanged, from_state=before, to_state=after)

    def _on_record(self, record: CircuitRecord) -> None:
        """A record the store pushed: adopt it if it is newer than ours."""
        if record.version > self._version:
            self._adopt(record)

    def _on_answer(self, record: CircuitRecord) -> None:
        """A record the store answered a request with: it is the truth now.

        Adopted unless it says what we hold, even if its version is older:
        a breaker that went on alone while its store was unreachable may be
        ahead of it, and must come back to it.
        """
        if (
            record.version != self._version
            or (record.state is _CLOSED) != (self._state is _CLOSED)
            or record.forced != (self._open_until == math.inf)
        ):
            self._adopt(record)

    def _adopt(self, record: CircuitRecord) -> None:
        if record.state is _CLOSED:
            self._install(_CLOSED, record.version, 0.0)
            return
        if record.forced:
            until = math.inf
        else:
            # Without a clock, take the period as over: the store refuses
            # trial permits until it really is.
            now = _now_or_none()
            until = -math.inf if now is None else now + max(0.0, record.open_for)
        self._install(_OPEN, record.version, until)

    async def _transition(self, expected: int, state: CircuitState) -> None:
        """Move from version ``expected`` to ``state`` (CLOSED or OPEN), through the store."""
        store = self._store
        if store is not None:
            try:
                record = await store.transition(self._name, expected, state, self._rules.open_for)
            except Exception:  # noqa: BLE001 - the caller's own outcome must not be masked
                pass  # the store is unreachable: decide alone, catch up with its next push
            else:
                self._on_answer(record)
                return
        if self._version == expected:
            until = _clock.now() + self._rules.open_for if state is _OPEN else 0.0
            self._install(state, expected + 1, until)

    async def _trip(self) -> None:
        """Open through the store (asked once per version, however many calls fail)."""
        version = self._version
        if self._tripping == version:
            return
        self._tripping = version
        try:
            await self._transition(version, _OPEN)
        finally:
            self._tripping = -1

    # -- outcomes ------------------------------------------------------------

    def _failed(self, exc: BaseException, start: float) -> bool:
        """A call admitted while CLOSED (at ``start``) raised ``exc``: count it.

        True when the breaker must now trip through its store (``await
        self._trip()``); without a store it has tripped already.
        """
        kind = self._rules.classify(exc)
        if kind == _NEITHER:
            return False
        return self._record(kind == _FAILURE, start)

    def _record(self, failure: bool, start: float) -> bool:
        """A call admitted while CLOSED (at ``start``) ended: count it (see `_failed`).

        Not counted if the breaker has left CLOSED since: the window belongs
        to the closed period, and a transition to CLOSED empties it.
        """
        if self._state is not _CLOSED:
            return False
        ring, rules = self._ring, self._rules
        if self._timed:
            # Checked whatever the outcome: calls leaving a time window (here,
            # or in a `statistics()` read since the last outcome) can raise
            # its rates, so even a success may find the breaker tripped.
            now = _clock.now()
            threshold = rules.slow_call_duration
            ring.record(failure, threshold is not None and now - start >= threshold, now)
        else:
            ring.record(failure, False, 0.0)
        if rules.tripped(ring):
            if self._store is not None:
                return True
            self._install(_OPEN, self._version + 1, _clock.now() + rules.open_for)
        elif not self._timed and (rules.failure_rate is None or ring.calls >= rules.enough):
            # From now on a success cannot trip the breaker, so the wrapper
            # only counts it. With a count window and no slow-call trigger,
            # a success ends any run of failures; it adds a call or replaces
            # the oldest, so no call ever leaves and the failure rate cannot
            # rise; and with `enough` calls held (or no rate trigger) no rate
            # trigger starts to count. The first failure (or any change of
            # state: `_install`) brings the breaker back here.
            self._fast = True
        return False

    # -- rejections ----------------------------------------------------------

    def _rejected(self, retry_after: float) -> CircuitOpenError:
        """The error for a call rejected while OPEN (counted and reported here).

        Every rejection of an open breaker comes through here, so it is kept
        to the bone: its budget is twice the cost of raising a bare exception
        (the "CircuitBreaker open, rejection" row).
        """
        error = _new_error(CircuitOpenError)  # its message is made when read
        error.policy = self._name
        error.retry_after = retry_after
        self._metrics.rejected += 1
        if (
            self._telemetry._listeners
            or _telemetry._explicit_tracing
            or otel_probe._TRACER_PROVIDER is not None
        ):
            self.report(CallRejected, reason="circuit_open", retry_after=retry_after)
        return error

    def _trials_taken(self) -> CircuitOpenError:
        """The error for a call rejected while HALF_OPEN: every trial slot is taken."""
        error = self._rejected(0.0)
        error.args = (
            f"circuit breaker {self._name!r} is half-open and all its "
            f"{self._rules.half_open_calls} trial calls are running",
        )
        return error

    # -- calls ---------------------------------------------------------------

    async def _admit(self, start: float | None) -> int | None:
        """Admit a call the wrapper could not admit or reject by itself.

        Returns None for a call to run as a CLOSED one, or the version of the
        half-open period whose trial permit it holds; raises the rejection
        otherwise. Counts the call's outcome if it ends here.
        """
        try:
            return await self._permit()
        except CircuitOpenError:
            if start is not None:
                self._metrics.took(REJECTED, start)
            raise
        except BaseException as exc:
            self._metrics.failed(exc, start)
            raise

    async def _permit(self) -> int | None:
        while True:
            now = _clock.now()
            self._observe(now)
            state = self._state
            if state is _CLOSED:
                return None
            if state is _OPEN:
                raise self._rejected(self._open_until - now)
            if self._trials >= self._rules.half_open_calls:
                raise self._trials_taken()
            version = self._version
            self._trials += 1  # taken before asking the store: local callers see it
            store = self._store
            if store is None:
                return version
            try:
                limit = self._rules.half_open_calls
                refused = await store.acquire_trial(self._name, version, limit)
            except Exception:  # noqa: BLE001
                refused = None  # the store is unreachable: the local limit alone applies
            except BaseException:
                self._end_trial(version)
                raise
            if refused is not None:
                self._end_trial(version)
                self._on_answer(refused)
                raise self._trials_taken()
            if self._version == version:
                return version
            # The state moved on while we asked: this permit is void; look again.

    def _end_trial(self, version: int) -> bool:
        """Free the local trial slot of ``version``; False if that period is over."""
        if self._version != version:
            return False
        self._trials -= 1
        return True

    async def _settle_trial(self, version: int, error: BaseException | None, start: float) -> None:
        """A trial of ``version`` (begun at ``start``) ended: returned, or raised ``error``."""
        rules = self._rules
        kind = _SUCCESS if error is None else rules.classify(error)
        if not self._end_trial(version):
            return  # the half-open period is over: its trials no longer count
        store = self._store
        if kind == _NEITHER:
            if store is not None:
                # Often a cancelled trial: without a shield the permit would
                # stay taken (fleet-wide) until the store let it lapse.
                with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                    await store.release_trial(self._name, version, False)
            return
        if kind == _FAILURE or rules.is_slow(_clock.now() - start):
            await self._transition(version, _OPEN)
            return
        self._successes += 1
        successes = self._successes  # what counts if the store is unreachable
        if store is not None:
            with contextlib.suppress(Exception):
                successes = await store.release_trial(self._name, version, True)
        if successes >= rules.half_open_calls:
            await self._transition(version, _CLOSED)

    # -- decorator -----------------------------------------------------------

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        positional: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        breaker, ring, now, metrics = self, self._ring, _clock.now, self._metrics
        rejected, admit, settle = self._rejected, self._admit, self._settle_trial
        slot, span, timer = self._telemetry.provider_slot, self.in_span, self.timer()
        # The start of a closed call or trial, when the breaker needs it (slow calls).
        starts = self._rules.slow_call_duration is not None
        # `_fast` (see `_record`) is only ever set on a counting-only CountRing.
        counter = ring if isinstance(ring, CountRing) else None

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await span(plain, args, kwargs)
                start = None if timer is None else timer()
                trial: int | None = None
                if not breaker._fast:
                    state = breaker._state
                    if state is _OPEN:
                        clock, until = breaker._open_clock, breaker._open_until
                        moment = now() if clock is None else clock()
                        if moment < until:
                            if start is not None:
                                metrics.took(REJECTED, start)
                            raise rejected(until - moment)
                    if state is not _CLOSED:
                        trial = await admit(start)
                began = now() if starts else 0.0
                try:
                    result = await (fn(*args, **kwargs) if kwargs else positional(*args))
                except BaseException as exc:
                    metrics.failed(exc, start)
                    if trial is not None:
                        await settle(trial, exc, began)
                    elif breaker._failed(exc, began):
                        await breaker._trip()
                    raise
                if trial is not None:
                    await settle(trial, None, began)
                elif breaker._fast:
                    # Still fast: the await may have let the state change
                    # (mypy keeps its narrowing across an await, hence the ignore).
                    counter.pending += 1  # type: ignore[union-attr]
                elif breaker._record(False, began):
                    await breaker._trip()
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return guarded

        return self.build(make, binding)

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self._rules.triggers()}, window={self.window!r}, "
            f"open_for={self._rules.open_for:g}, name={self._name!r})"
        )
