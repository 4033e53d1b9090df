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
* The newer options cost nothing when unused: a ``Backoff`` as ``open_for``
  and ``trial_timeout`` only act on transitions and half-open trials (off
  the hot path); ``failure_on_result`` and ``mode="observe"`` are constants
  the wrapper closes over (the "CircuitBreaker closed, success" and
  "CircuitBreaker open, rejection" rows).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal, ParamSpec, TypeVar, final, get_args

import anyio

from . import _clock, _telemetry, _validate
from ._circuit_store import CircuitRecord, CircuitState, CircuitStore
from ._errors import CircuitOpenError, StoreUnavailable
from ._matchers import ExceptionMatcher, Matcher
from ._metrics import REJECTED, MetricFamily, PolicyMetrics
from ._policy import AsyncCallable, Binding, Policy
from ._privates import otel_probe
from ._retry import Backoff
from ._telemetry import Telemetry
from ._warnings import warn
from ._windows import CountRing, CountWindow, Ring, TimeWindow, ring_for
from .events import CallRejected, CircuitStateChanged

_log = logging.getLogger("stalwart")

__all__ = ["CircuitBreaker", "CircuitBreakerMode", "CircuitBreakerStatistics", "CircuitState"]

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

CircuitBreakerMode = Literal["enforce", "observe"]
"""``"enforce"``: reject calls while open; ``"observe"``: a shadow breaker that never does."""
_MODES: Final = frozenset(get_args(CircuitBreakerMode))


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
    __slots__ = ("state", "store_fault_logged", "store_unavailable", "transitions")

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.state = "closed"
        self.transitions: dict[tuple[str, str], int] = {}
        self.store_unavailable = 0
        self.store_fault_logged = False  # kept here: no slot on every breaker for it

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
        MetricFamily(
            "stalwart_circuit_store_unavailable",
            "counter",
            "Requests of a circuit breaker to its store that failed (it then decided alone).",
            "store_unavailable",
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
    #: the open period, when ``backoff`` is None
    open_for: float
    #: the open periods, one delay per opening in a row, or None
    backoff: Backoff | None
    half_open_calls: int
    failure_on: Matcher
    ignore: Matcher
    trial_timeout: float | None
    failure_on_result: Callable[[Any], bool] | None
    #: mode="observe": never reject
    observe: bool
    #: where the open periods' jitter is drawn from
    rng: random.Random | None
    #: a time window or a slow-call trigger: every outcome reads the clock
    timed: bool

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
    if (
        rules.failure_on.is_predicate
        or rules.ignore.is_predicate
        or rules.failure_on_result is not None
    ):
        return rules
    found = _rules_by_value.get(rules)
    if found is not None:
        return found
    if len(_rules_by_value) < _RULES_KEPT:
        _rules_by_value[rules] = rules
    return rules


# Jitters that let an open period be far shorter than the Backoff's delay, and how.
_SHRINKING_JITTERS: Final = {
    "full": "between 0 and its delay",
    "decorrelated": "between its initial delay and three times the last period",
}


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
class _Trial:
    """A half-open trial call: the period (version) it belongs to, and when it was admitted."""

    __slots__ = ("started", "version")

    def __init__(self, version: int, started: float) -> None:
        self.version = version
        self.started = started


#: A call ``mode="observe"`` lets through where it would have rejected it. It
#: was counted as rejected, as it would have been; its outcome counts nowhere.
_LET_THROUGH: Final = _Trial(-1, 0.0)


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

    **Growing open periods.** ``open_for=Backoff(...)``: the k-th opening in
    a row (no close in between) lasts the backoff's delay k, jittered as
    the backoff says (``"equal"`` or ``"full"`` jitter keep replicas from
    half-opening together); a close starts again from 1. With a store, the
    count of openings is the store's, shared by every breaker of the name.

    **Hung trials.** With ``trial_timeout``, a half-open trial still running
    after that many seconds counts as a failure: the next call that finds
    it (or its own end) re-opens the breaker, and the open period is counted
    from the moment the trial ran out of time. The trial itself is not
    cancelled (put a `Timeout` inside the breaker for that); its outcome no
    longer counts.

    **Shadow mode.** ``mode="observe"`` keeps the window, the states, the
    metrics and the events exactly as ``"enforce"`` would, rejections
    included (``stalwart_circuit_rejected_total`` and `CallRejected` count
    the calls it *would* have rejected), but lets every call run: a way to
    choose thresholds on production traffic. A call let through counts in
    no window and no trial, as it would not have run.

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
        open_for: seconds to stay OPEN before trials, >= 0; or a `Backoff`,
            whose delay k is the length of the k-th opening in a row.
        half_open_calls: concurrent trials in HALF_OPEN, and successes that
            close, >= 1.
        failure_on: what is a failure: an exception type, tuple of types,
            or predicate ``exc -> bool``.
        ignore: what counts as nothing, in the same forms.
        trial_timeout: seconds after which a trial still running counts as
            a failure and frees its slot, > 0, or None (trials may run for
            ever). With a store, also how long the store holds the trial's
            permit should its process stop answering.
        failure_on_result: ``result -> bool``: True makes a returned value
            count as a failure (the caller still gets it). A predicate that
            raises counts as the call raising that exception.
        mode: ``"enforce"`` (default) or ``"observe"`` (never reject).
        rng: the ``random.Random`` the open periods' jitter draws from
            (default: the ``random`` module's generator).
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
        "_express",
        "_fast",
        "_last_period",
        "_open_clock",
        "_open_until",
        "_openings",
        "_ring",
        "_rules",
        "_running",
        "_state",
        "_store",
        "_successes",
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
        open_for: float | Backoff = 30.0,
        half_open_calls: int = 1,
        failure_on: ExceptionMatcher = Exception,
        ignore: ExceptionMatcher = (),
        trial_timeout: float | None = None,
        failure_on_result: Callable[[Any], bool] | None = None,
        mode: CircuitBreakerMode = "enforce",
        rng: random.Random | None = None,
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
        backoff: Backoff | None = None
        if isinstance(open_for, Backoff):
            backoff, open_for = open_for, open_for.maximum
            if backoff.jitter in _SHRINKING_JITTERS:
                warn(
                    f"open_for={backoff!r} draws each open period "
                    f"{_SHRINKING_JITTERS[backoff.jitter]}: the breaker may half-open "
                    "almost at once, and its periods need not grow; give the Backoff "
                    "jitter='equal' (between half and all of the delay) or 'none'"
                )
        elif not isinstance(open_for, (int, float)) or isinstance(open_for, bool):
            raise TypeError(
                f"open_for must be a number of seconds or a Backoff, not {type(open_for).__name__}"
            )
        if failure_on_result is not None and not callable(failure_on_result):
            raise TypeError(
                "failure_on_result must be a callable (result -> bool) or None, "
                f"not {type(failure_on_result).__name__}"
            )
        if mode not in _MODES:
            raise ValueError(f"mode must be 'enforce' or 'observe', got {mode!r}")
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, not {type(rng).__name__}")
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
            backoff=backoff,
            half_open_calls=_validate.count("half_open_calls", half_open_calls),
            failure_on=Matcher("failure_on", failure_on),
            ignore=Matcher("ignore", ignore, allow_empty=True),
            trial_timeout=_validate.optional_duration(
                "trial_timeout", trial_timeout, positive=True
            ),
            failure_on_result=failure_on_result,
            observe=mode == "observe",
            rng=rng,
            timed=slow_call_duration is not None or isinstance(window, TimeWindow),
        )
        if store is not None and not isinstance(store, CircuitStore):
            raise TypeError(
                "store must be a circuit store (InProcessCircuitStore, RedisStore) or None, "
                f"not {type(store).__name__}"
            )
        # A Backoff's longest delay is its maximum (checked as open_for).
        _validate.stored_duration("open_for", rules.open_for, store)
        if rules.trial_timeout is not None:
            _validate.stored_duration("trial_timeout", rules.trial_timeout, store)
        _warn_of_unused_minimum(rules, window, given=minimum_given)
        self._rules = _shared(rules)
        self._ring: Ring = ring_for(window, slow=rules.slow_call_duration is not None)
        self._fast = self._express = False
        self._state = _CLOSED
        self._version = 0
        self._open_until = 0.0
        self._open_clock: Callable[[], float] | None = None  # see `_install`
        self._openings = 0  # openings in a row, the current one included
        self._last_period: float | None = None  # for "decorrelated" jitter
        # This period's trials, oldest first: a tuple, so that a breaker that
        # never half-opens holds the shared empty one (the memory test).
        self._running: tuple[_Trial, ...] = ()
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
    def open_for(self) -> float | Backoff:
        """Seconds to stay OPEN, or the `Backoff` giving each opening in a row its length."""
        rules = self._rules
        return rules.open_for if rules.backoff is None else rules.backoff

    @property
    def trial_timeout(self) -> float | None:
        return self._rules.trial_timeout

    @property
    def failure_on_result(self) -> Callable[[Any], bool] | None:
        return self._rules.failure_on_result

    @property
    def mode(self) -> CircuitBreakerMode:
        return "observe" if self._rules.observe else "enforce"

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
            trial_calls=len(self._running) if state is _HALF_OPEN else 0,
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

    def _install(
        self, state: CircuitState, version: int, open_until: float, openings: int = 0
    ) -> None:
        """Make ``state`` (CLOSED or OPEN) the breaker's state, at ``version``.

        ``openings``: for a timed OPEN, the openings in a row, this one included.
        """
        before = self._state
        self._fast = self._express = False
        self._version = version
        self._open_until = open_until
        # The clock an OPEN state's rejections may read directly: ``until``
        # came from time.monotonic() (a plain asyncio loop), or is infinite
        # (forced: any clock will do). Else None, and they ask `_clock.now`.
        if open_until == math.inf:
            self._open_clock = time.monotonic
        else:
            self._open_clock = _clock.monotonic_or_none() if state is _OPEN else None
        self._running = ()
        self._successes = 0
        self._openings = openings if state is _OPEN else 0
        if state is _CLOSED:
            self._ring.clear()
            self._last_period = None
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
        self._install(_OPEN, record.version, until, record.openings)

    def _open_period(self, opening: int) -> float:
        """How long the ``opening``-th opening in a row lasts (a fresh draw each time)."""
        rules = self._rules
        backoff = rules.backoff
        if backoff is None:
            return rules.open_for
        period = backoff.delay(opening, self._last_period, rules.rng)
        self._last_period = period
        return period

    async def _transition(
        self, expected: int, state: CircuitState, since: float | None = None
    ) -> None:
        """Move from version ``expected`` to ``state`` (CLOSED or OPEN), through the store.

        An open period starts at ``since`` (a moment past: a trial's time ran
        out then), or now.
        """
        opening = self._openings + 1
        period: float | None = None
        store = self._store
        if store is not None:
            left = 0.0
            if state is _OPEN:
                period = self._open_period(opening)
                now = _clock.now()
                left = max(0.0, (now if since is None else since) + period - now)
            try:
                record = await store.transition(self._name, expected, state, left)
            except Exception as error:  # noqa: BLE001 - the caller's own outcome must not be masked
                self._store_failed(error)  # decide alone, catch up with its next push
            else:
                self._on_answer(record)
                return
        if self._version != expected:
            return
        if state is _CLOSED:
            self._install(_CLOSED, expected + 1, 0.0)
            return
        if period is None:
            period = self._open_period(opening)
        start = _clock.now() if since is None else since
        self._install(_OPEN, expected + 1, start + period, opening)

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
        if rules.timed:
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
            self._install(_OPEN, self._version + 1, _clock.now() + self._open_period(1), 1)
        elif not rules.timed and (rules.failure_rate is None or ring.calls >= rules.enough):
            # From now on a success cannot trip the breaker, so the wrapper
            # only counts it. With a count window and no slow-call trigger,
            # a success ends any run of failures; it adds a call or replaces
            # the oldest, so no call ever leaves and the failure rate cannot
            # rise; and with `enough` calls held (or no rate trigger) no rate
            # trigger starts to count. The first failure (or any change of
            # state: `_install`) brings the breaker back here. With nothing
            # to judge nor time either, the wrapper's express path is open.
            self._fast = True
            self._express = rules.failure_on_result is None and self.timer() is None
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

    async def _admit(self, start: float | None) -> _Trial | None:
        """Admit a call the wrapper could not admit or reject by itself.

        Returns None for a call to run as a CLOSED one, or the trial it
        runs as (`_LET_THROUGH` for one ``mode="observe"`` lets through);
        raises the rejection otherwise. Counts the call's outcome if it ends
        here.
        """
        try:
            return await self._permit()
        except CircuitOpenError:
            if start is not None:
                self._metrics.took(REJECTED, start)
            if self._rules.observe:
                return _LET_THROUGH  # counted and reported as a rejection all the same
            raise
        except BaseException as exc:
            self._metrics.failed(exc, start)
            raise

    async def _permit(self) -> _Trial | None:
        rules = self._rules
        while True:
            now = _clock.now()
            self._observe(now)
            state = self._state
            if state is _CLOSED:
                return None
            if state is _OPEN:
                raise self._rejected(self._open_until - now)
            version, running, timeout = self._version, self._running, rules.trial_timeout
            if timeout is not None and running and now - running[0].started >= timeout:
                # The oldest trial ran out of time: it failed, back then.
                overdue = running[0]
                await self._transition(version, _OPEN, overdue.started + timeout)
                if self._version == version:  # a store that answered nonsense
                    self._end_trial(overdue)
                continue
            if len(running) >= rules.half_open_calls:
                raise self._trials_taken()
            trial = _Trial(version, now)
            self._running = (*running, trial)  # taken before asking the store: local callers see it
            store = self._store
            if store is None:
                return trial
            try:
                limit = rules.half_open_calls
                if timeout is None:
                    refused = await store.acquire_trial(self._name, version, limit)
                else:
                    refused = await store.acquire_trial(self._name, version, limit, lease=timeout)
            except Exception as error:  # noqa: BLE001 - the call must not fail for the store
                self._store_failed(error)
                refused = None  # the local limit alone applies
            except BaseException:
                self._end_trial(trial)
                raise
            if refused is not None:
                self._end_trial(trial)
                self._on_answer(refused)
                raise self._trials_taken()
            if self._version == version:
                return trial
            # The state moved on while we asked: this permit is void; look again.

    def _store_failed(self, error: Exception) -> None:
        """The store did not answer: count it; log, once, a failure that is not an outage.

        `StoreUnavailable` is an outage the store reports itself; anything
        else (a key of the wrong type, a refused permission) is a fault
        that stays until someone fixes it, and the breaker would otherwise
        go on alone without a word.
        """
        metrics = self._metrics
        metrics.store_unavailable += 1
        if isinstance(error, StoreUnavailable) or metrics.store_fault_logged:
            return
        metrics.store_fault_logged = True
        _log.error(
            "circuit breaker %r decides alone: its store failed with %s (logged once)",
            self._name,
            type(error).__name__,
            exc_info=error,
        )

    def _end_trial(self, trial: _Trial) -> bool:
        """Free the local slot of ``trial``; False if its period is over."""
        if self._version != trial.version:
            return False
        self._running = tuple(t for t in self._running if t is not trial)
        return True

    async def _settle_trial(
        self, trial: _Trial, error: BaseException | None, start: float, failed: bool = False
    ) -> None:
        """``trial`` (begun at ``start``) ended: it returned or raised ``error``.

        ``failed``: it returned a result that counts as a failure.
        """
        rules = self._rules
        if failed:
            kind = _FAILURE
        else:
            kind = _SUCCESS if error is None else rules.classify(error)
        if not self._end_trial(trial):
            return  # the half-open period is over: its trials no longer count
        version, timeout = trial.version, rules.trial_timeout
        now = _clock.now()
        if timeout is not None and now - trial.started >= timeout:
            # Whatever its outcome, it was a failure once its time ran out.
            await self._transition(version, _OPEN, trial.started + timeout)
            return
        store = self._store
        if kind == _NEITHER:
            if store is not None:
                # Often a cancelled trial: without a shield the permit would
                # stay taken (fleet-wide) until the store let it lapse.
                with anyio.CancelScope(shield=True):
                    try:
                        await store.release_trial(self._name, version, False)
                    except Exception as error:  # noqa: BLE001 - the trial's own outcome goes on
                        self._store_failed(error)
            return
        if kind == _FAILURE or rules.is_slow(now - start):
            await self._transition(version, _OPEN)
            return
        self._successes += 1
        successes = self._successes  # what counts if the store is unreachable
        if store is not None:
            try:
                successes = await store.release_trial(self._name, version, True)
            except Exception as error:  # noqa: BLE001 - the call succeeded all the same
                self._store_failed(error)
        if successes >= rules.half_open_calls:
            await self._transition(version, _CLOSED)

    # -- decorator -----------------------------------------------------------

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        call: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        breaker, metrics, slot = self, self._metrics, self._telemetry.provider_slot
        rules, timer = self._rules, self.timer()
        # The start of a closed call or trial, when the breaker needs it (slow calls).
        starts = rules.slow_call_duration is not None
        # Both None/False unless asked for: one test each, off the rejection path.
        judge, observing = rules.failure_on_result, rules.observe
        # `_fast` (see `_record`) is only ever set on a counting-only CountRing.
        ring = self._ring
        counter = ring if isinstance(ring, CountRing) else None
        # The wrapper closes over what the express path (see `_record`) and the
        # rejection use, and reaches the rest through `breaker`: each name it
        # closes over is copied into every call's frame (the "CircuitBreaker
        # closed, success" row).

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await breaker.in_span(plain, args, kwargs)
                if breaker._express:
                    # CLOSED and counting only, with nothing to time nor judge.
                    try:
                        result = await (call(*args, **kwargs) if kwargs else call(*args))
                    except BaseException as exc:
                        metrics.failed(exc, None)
                        if breaker._failed(exc, 0.0):
                            await breaker._trip()
                        raise
                    # Still express: the await may have let the state change
                    # (mypy keeps its narrowing across an await, hence the ignores).
                    if breaker._express:
                        counter.pending += 1  # type: ignore[union-attr]
                    elif breaker._record(False, 0.0):  # type: ignore[unreachable]
                        await breaker._trip()
                    metrics.success += 1
                    return result
                start = None if timer is None else timer()
                trial: _Trial | None = None
                if not breaker._fast:
                    state = breaker._state
                    if state is _OPEN and not observing:
                        clock, until = breaker._open_clock, breaker._open_until
                        moment = _clock.now() if clock is None else clock()
                        if moment < until:
                            if start is not None:
                                metrics.took(REJECTED, start)
                            raise breaker._rejected(until - moment)
                    if state is not _CLOSED:
                        trial = await breaker._admit(start)
                        if trial is _LET_THROUGH:
                            return await (call(*args, **kwargs) if kwargs else call(*args))
                began = _clock.now() if starts else 0.0
                try:
                    result = await (call(*args, **kwargs) if kwargs else call(*args))
                    if judge is not None:  # a raising predicate is the call raising
                        bad = judge(result)
                except BaseException as exc:
                    metrics.failed(exc, start)
                    if trial is not None:
                        await breaker._settle_trial(trial, exc, began)
                    elif breaker._failed(exc, began):
                        await breaker._trip()
                    raise
                # (`bad` is set whenever `judge` is: the usual path tests one constant.)
                if judge is not None and bad:
                    if trial is not None:
                        await breaker._settle_trial(trial, None, began, True)
                    elif breaker._record(True, began):
                        await breaker._trip()
                elif trial is not None:
                    await breaker._settle_trial(trial, None, began)
                elif breaker._fast:
                    # Still fast (see above).
                    counter.pending += 1  # type: ignore[union-attr]
                elif breaker._record(False, began):
                    await breaker._trip()
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return guarded

        return self.build(make, binding)

    def __repr__(self) -> str:
        rules = self._rules
        backoff = rules.backoff
        parts = [
            rules.triggers(),
            f"window={self.window!r}",
            f"open_for={rules.open_for:g}" if backoff is None else f"open_for={backoff!r}",
        ]
        if rules.trial_timeout is not None:
            parts.append(f"trial_timeout={rules.trial_timeout:g}")
        if rules.failure_on_result is not None:
            judge = rules.failure_on_result
            label = getattr(judge, "__qualname__", None) or repr(judge)
            parts.append(f"failure_on_result={label}")
        if rules.observe:
            parts.append("mode='observe'")
        parts.append(f"name={self._name!r}")
        return f"CircuitBreaker({', '.join(parts)})"
