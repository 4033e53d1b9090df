"""Where a circuit breaker's state lives: the store protocol, and an in-process store.

A breaker splits what it knows in two, "local decisions, shared transitions":

* **The window is always local.** Each breaker counts the outcomes of its
  own calls and decides from them, alone, when to trip. Recording an outcome
  never leaves the process.
* **The state is shared** through a `CircuitStore`: CLOSED or OPEN, until
  when, forced or not, and the half-open trial permits. Every breaker keeps a
  copy of it in its own memory and reads only that copy on its hot path, so
  a closed breaker's successful call costs no I/O and no ``await``, whatever
  the store. The store is asked only to *change* the state (a rare event),
  and it pushes every change it knows of into the copies of all breakers
  sharing that state (a remote store learns of them by pub/sub).

With ``store=None`` (the default) the state lives in the breaker itself, and
transitions apply at once. `InProcessCircuitStore` shares it between breakers of
one process; ``stalwart.redis.RedisStore`` between processes and hosts. Both
implement the protocol documented on `CircuitStore`, which is all a new
store needs to follow.
"""

from __future__ import annotations

import enum
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol, final, runtime_checkable

from . import _clock

__all__ = ["CircuitRecord", "CircuitState", "CircuitStore", "InProcessCircuitStore", "Listener"]


class CircuitState(enum.Enum):
    """The state of a circuit breaker.

    * ``CLOSED``: calls run; their outcomes fill the window.
    * ``OPEN``: calls are rejected at once with `CircuitOpenError`.
    * ``HALF_OPEN``: the open period is over; a few trial calls run, and
      decide between CLOSED and OPEN.
    """

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@final
@dataclass(frozen=True, slots=True)
class CircuitRecord:
    """The shared state of one circuit, as a store hands it to breakers.

    Attributes:
        state: ``CLOSED`` or ``OPEN``, never ``HALF_OPEN``: a circuit is
            half-open when it is OPEN, not forced, and its open period is
            over. Every breaker derives that from its own clock, so the move
            from OPEN to HALF_OPEN needs no write and no message.
        version: bumped by every change of the record; the token of
            `CircuitStore.transition`'s compare-and-set. Versions of one key
            never decrease, not even when a store loses its data (a store
            that can lose data should derive new versions from a clock, for
            example ``max(old + 1, milliseconds since the epoch)``).
        open_for: for a non-forced OPEN record, the seconds left of its
            open period at the moment it is delivered (0.0 or less: the
            period is over and the circuit is half-open). Ignored otherwise.
        forced: OPEN by `CircuitBreaker.force_open`: no open period, no
            trials; it stays OPEN until a reset.
        openings: for a non-forced OPEN record, how many times in a row
            the circuit has opened, this time included (1 for an opening
            from CLOSED, one more for each failed half-open period); 0
            otherwise. A breaker whose ``open_for`` is a `Backoff` makes its
            next opening last the backoff's delay number ``openings + 1``.
    """

    state: CircuitState
    version: int
    open_for: float = 0.0
    forced: bool = False
    openings: int = 0


#: Called by a store with every record it learns of (see `CircuitStore.attach`).
Listener = Callable[[CircuitRecord], None]


@runtime_checkable
class CircuitStore(Protocol):
    """Where the shared state of circuit breakers lives.

    A store keeps one record per *key* (the breakers' ``name``): its
    `CircuitRecord` (state, version, end of the open period, forced) plus,
    for the current version, how many half-open trial permits are held and
    how many trials succeeded. All breakers given the same store and the same
    name share that record. A fresh key starts as ``CircuitRecord(CLOSED, 0)``
    with no permits and no successes.

    The breaker calls the store only off its hot path: at construction
    (`attach`), to change the state (`transition`, `assign`), and in
    half-open for trial permits (`acquire_trial`, `release_trial`). It never
    reads the store to admit a call in CLOSED or OPEN: it reads its own copy,
    which the store keeps current by calling the listener given to `attach`.

    Rules every implementation follows:

    * **Pushes and answers.** Whenever the record of a key changes (by this
      process or another), the store calls every listener attached to that
      key with the new record, from the event loop's thread, without
      blocking. A listener ignores pushed records whose version is not newer
      than its copy, so pushing the same record twice, or out of order, is
      harmless. A remote store should also re-read the records it follows
      now and then, so that a lost message cannot leave a breaker stuck. The
      records a store *returns* (from `attach`, `transition` and a refused
      `acquire_trial`) are taken as the truth whatever their version: that
      is how a breaker that went on alone while the store was unreachable
      (see Failure) comes back to it.
    * **Time.** Open periods cross the protocol as durations (``open_for``,
      seconds left when delivered), never as timestamps: clocks differ between
      processes. A store keeps the end of each open period on a clock of its
      own (Redis: ``TIME``) and says how much is left when it hands a record
      over.
    * **Trial permits** belong to one version: a transition resets their
      count and the successes to 0, and permits or successes reported for any
      other version than the current one are ignored. Trials are short, but a
      process can die holding a permit: a remote store should let permits
      lapse (for instance after the open period's length), so that a lost
      release cannot keep the circuit half-open forever. A permit whose
      request failed or was cancelled after it may have reached a remote
      store must be given back by the store (``RedisStore`` names permits
      by tokens of its own choosing for that).
    * **Cancellation.** A trial that is cancelled gives its permit back with
      `release_trial` from the cancelled task, inside a shielded cancel scope:
      the call is not interrupted, so it must bound its own time (a remote
      store's requests have short timeouts). Other calls to the store are not
      shielded, and a cancelled caller may not see them through: the next
      outcome that needs the transition asks again.
    * **Limits.** A store that keeps durations where they are bounded says
      so with a ``max_duration`` attribute (seconds): a breaker refuses a
      longer ``open_for`` when it is built.
    * **Failure.** A store that cannot reach its backend must not hang the
      call: it raises (any `Exception`) or answers from what it knows. The
      breaker never lets a store's error replace the outcome of a call: when
      `transition` raises it makes the transition alone, on its own copy (so
      it still protects its process); when `acquire_trial` raises it grants
      the trial under its own ``half_open_calls`` limit; when `release_trial`
      raises it counts its own successes. It catches up with the store's
      state at the next push of a newer version.
    """

    def attach(self, key: str, listener: Listener) -> CircuitRecord:
        """Start following ``key``; return its record as far as known now.

        Called from the breaker's constructor, possibly outside any event
        loop: do no I/O and do not block. A remote store returns what it has
        cached (or ``CircuitRecord(CLOSED, 0)``), starts following the key
        when it next can, and pushes the real record to ``listener`` once
        it arrives. Hold ``listener`` weakly (`weakref.WeakMethod`: it is a
        bound method of the breaker), so that attaching never keeps a
        breaker alive.
        """
        ...

    async def transition(
        self, key: str, expected_version: int, state: CircuitState, open_for: float
    ) -> CircuitRecord:
        """Compare-and-set: move ``key`` to ``state`` if its version is ``expected_version``.

        ``state`` is ``CLOSED`` or ``OPEN``; for ``OPEN``, ``open_for`` is the
        length of the open period in seconds, which starts now (it may be 0).
        If the current version is ``expected_version``, replace the record by
        ``CircuitRecord(state, a newer version, open_for, forced=False,
        openings)``, where ``openings`` is the current record's plus one for
        ``OPEN`` and 0 for ``CLOSED``; reset the trial permits and successes,
        push it to every listener, and return it. Otherwise change nothing
        and return the current record: another breaker moved first, and the
        caller adopts its decision.
        """
        ...

    async def acquire_trial(
        self, key: str, version: int, limit: int, *, lease: float | None = None
    ) -> CircuitRecord | None:
        """Take a half-open trial permit for ``version``: None if granted.

        Grant (and count) a permit only if ``version`` is the current one, the
        record is OPEN, not forced, its open period is over on the store's
        clock, and fewer than ``limit`` permits are held. Otherwise return the
        current record: the caller is rejected, and adopts it.

        ``lease``: the breaker's ``trial_timeout``, when it has one (it is
        passed only then): the permit lapses after that many seconds, so that
        a trial whose process stopped answering frees its slot when a live
        one would have been failed. Without it, the store's own lease applies.
        """
        ...

    async def release_trial(self, key: str, version: int, succeeded: bool) -> int:
        """Give back a trial permit of ``version``; return the successes so far.

        If ``version`` is current: free one permit, add one success when
        ``succeeded``, and return the number of successful trials of this
        version (the caller closes the circuit once it reaches the breaker's
        ``half_open_calls``). If ``version`` is not current, change nothing
        and return 0. A failed trial is not released: the caller makes a
        `transition` to OPEN instead.
        """
        ...

    def assign(self, key: str, state: CircuitState) -> None:
        """Set ``key`` unconditionally: ``OPEN`` forced open, or ``CLOSED``.

        For `CircuitBreaker.force_open` and `CircuitBreaker.reset`, which are
        plain methods: do not block. The new record gets a version newer than
        the current one, is forced for ``OPEN``, has its permits and successes
        reset, and is pushed to every listener, the caller's included: the
        caller has already applied the change to its own copy (at its own
        version + 1, which the store's version then overtakes or equals). A
        remote store writes it in the background, and must apply such writes
        in the order they were made.
        """
        ...


class _Circuit:
    """The state of one key of an `InProcessCircuitStore`."""

    __slots__ = (
        "forced",
        "listeners",
        "open_until",
        "openings",
        "state",
        "successes",
        "trials",
        "version",
    )

    def __init__(self) -> None:
        self.state = CircuitState.CLOSED
        self.version = 0
        self.open_until = 0.0  # on the event loop's clock
        self.forced = False
        self.openings = 0
        # The permits held, as the times they lapse (inf: no lease).
        self.trials: list[float] = []
        self.successes = 0
        self.listeners: list[Callable[[], Listener | None]] = []

    def record(self, now: float | None) -> CircuitRecord:
        if self.state is CircuitState.CLOSED:
            return CircuitRecord(CircuitState.CLOSED, self.version)
        if self.forced:
            return CircuitRecord(CircuitState.OPEN, self.version, forced=True)
        # Without a running clock, say the period is over: a trial permit is
        # asked of the store, which knows better and refuses until it is.
        left = 0.0 if now is None else self.open_until - now
        return CircuitRecord(CircuitState.OPEN, self.version, left, openings=self.openings)

    def change(self, state: CircuitState, open_until: float, forced: bool) -> None:
        self.openings = self.openings + 1 if state is CircuitState.OPEN and not forced else 0
        self.state = state
        self.version += 1
        self.open_until = open_until
        self.forced = forced
        self.trials = []
        self.successes = 0

    def push(self, record: CircuitRecord) -> None:
        alive = []
        for ref in self.listeners:
            listener = ref()
            if listener is not None:
                alive.append(ref)
                listener(record)
        self.listeners[:] = alive


_CLOSED: Final = CircuitState.CLOSED
_OPEN: Final = CircuitState.OPEN


@final
class InProcessCircuitStore:
    """Shares circuit state between the breakers of one process, by name.

    Breakers given the same `InProcessCircuitStore` and the same ``name`` open,
    close and take half-open trials together, while each keeps its own window
    of outcomes: one breaker per module or per client object can guard the
    same dependency. It is also the reference implementation of
    `CircuitStore`. Use it from one event loop.

    Example::

        store = sw.InProcessCircuitStore()
        reads = sw.CircuitBreaker(name="inventory", store=store)
        writes = sw.CircuitBreaker(name="inventory", store=store)
        # when `writes` trips, `reads` rejects too
    """

    __slots__ = ("_circuits",)

    def __init__(self) -> None:
        self._circuits: dict[str, _Circuit] = {}

    def _circuit(self, key: str) -> _Circuit:
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = _Circuit()
        return circuit

    def attach(self, key: str, listener: Listener) -> CircuitRecord:
        circuit = self._circuit(key)
        circuit.listeners.append(_weakly(listener))
        return circuit.record(_now_or_none())

    async def transition(
        self, key: str, expected_version: int, state: CircuitState, open_for: float
    ) -> CircuitRecord:
        circuit = self._circuit(key)
        now = _clock.now()
        if circuit.version == expected_version:
            circuit.change(state, now + open_for if state is _OPEN else 0.0, forced=False)
            record = circuit.record(now)
            circuit.push(record)
            return record
        return circuit.record(now)

    async def acquire_trial(
        self, key: str, version: int, limit: int, *, lease: float | None = None
    ) -> CircuitRecord | None:
        circuit = self._circuit(key)
        now = _clock.now()
        if (
            circuit.version == version
            and circuit.state is _OPEN
            and not circuit.forced
            and now >= circuit.open_until
        ):
            trials = circuit.trials
            trials[:] = [until for until in trials if until > now]
            if len(trials) < limit:
                trials.append(math.inf if lease is None else now + lease)
                return None
        return circuit.record(now)

    async def release_trial(self, key: str, version: int, succeeded: bool) -> int:
        circuit = self._circuit(key)
        if circuit.version != version:
            return 0
        if circuit.trials:
            # The permit given back is the one that would lapse first: those
            # left hold at least as long as they would have.
            circuit.trials.remove(min(circuit.trials))
        if succeeded:
            circuit.successes += 1
        return circuit.successes

    def assign(self, key: str, state: CircuitState) -> None:
        circuit = self._circuit(key)
        forced = state is _OPEN
        circuit.change(_OPEN if forced else _CLOSED, math.inf if forced else 0.0, forced)
        circuit.push(circuit.record(None))

    def __repr__(self) -> str:
        return f"<InProcessCircuitStore: {len(self._circuits)} circuits>"


def _weakly(listener: Listener) -> Callable[[], Listener | None]:
    """A weak reference to a bound method; other callables are held as they are."""
    try:
        return weakref.WeakMethod(listener)
    except TypeError:
        return lambda: listener


def _now_or_none() -> float | None:
    try:
        return _clock.now()
    except RuntimeError:
        return None
