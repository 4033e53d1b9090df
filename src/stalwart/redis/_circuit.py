"""The circuit store: breakers sharing a name open, close and take trials together.

`_Circuits` is the part of `RedisStore` that serves the `CircuitStore`
protocol: transitions are compare-and-set scripts published to every
replica, half-open trial permits are counted fleet-wide (each named by a
token, given back whatever happens to its request), and forced states are
written in order by the follower. `_Circuit` is what a store knows of one
breaker name: its last record and the breakers listening to it.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import _clock
from .._circuit_store import CircuitRecord, CircuitState, Listener, _weakly
from . import _scripts
from ._client import (
    _DEADLINE_PASSED,
    _UNAVAILABLE,
    _digest,
    _log,
    _ms,
    _now_or_none,
    _Settlement,
    _void_key,
)
from ._follower import _Follower

_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN


class _Circuit:
    """What a store knows of one breaker name."""

    __slots__ = (
        "channel",
        "foreign",
        "key",
        "learned_at",
        "listeners",
        "name",
        "needs_read",
        "permits",
        "record",
        "trials",
    )

    def __init__(self, name: str, key: str) -> None:
        self.name = name
        self.key = key
        self.trials = key + ":trials"
        # The trial permits this store holds in Redis: (version, token).
        self.permits: list[tuple[int, str]] = []
        self.channel = key
        self.listeners: list[Callable[[], Listener | None]] = []
        self.record = CircuitRecord(_CLOSED, 0)
        self.learned_at: float | None = None  # loop time at which `record` was current
        self.needs_read = False  # subscribed anew: read the record, messages may be missed
        self.foreign = False  # its key holds something else than a record (logged once)

    def cached(self, now: float | None) -> CircuitRecord:
        """The last record known, its open period counted down to ``now``."""
        record = self.record
        if record.state is _CLOSED or record.forced:
            return record
        if now is None or self.learned_at is None:
            # The store refuses trial permits until the period is really over.
            return CircuitRecord(_OPEN, record.version, 0.0)
        return CircuitRecord(_OPEN, record.version, record.open_for - (now - self.learned_at))

    def learn(self, record: CircuitRecord) -> None:
        """Keep ``record`` if it is the newest known, and push it to the listeners."""
        if record.version >= self.record.version:
            self.record = record
            self.learned_at = _now_or_none()
        self.push(record)

    def push(self, record: CircuitRecord) -> None:
        alive = []
        for ref in self.listeners:
            listener = ref()
            if listener is None:
                continue
            alive.append(ref)
            try:
                listener(record)
            except Exception:  # noqa: BLE001 - one broken listener must not starve the others
                _log.exception("a circuit store listener failed on %r", record)
        self.listeners[:] = alive


class _Circuits(_Follower):
    """The `CircuitStore` protocol of `RedisStore`."""

    __slots__ = ()

    _trial_lease: float

    def _circuit(self, name: str) -> _Circuit:
        circuit = self._circuits.get(name)
        if circuit is None:
            key = self._key("circuit", _digest(name))
            circuit = self._circuits[name] = self._by_channel[key] = _Circuit(name, key)
        return circuit

    def attach(self, key: str, listener: Listener) -> CircuitRecord:
        """See `CircuitStore.attach`: no I/O; the real record is pushed once read."""
        circuit = self._circuit(key)
        circuit.listeners.append(_weakly(listener))
        now = _now_or_none()
        if now is not None:
            self._kick()
        return circuit.cached(now)

    async def transition(
        self, key: str, expected_version: int, state: CircuitState, open_for: float
    ) -> CircuitRecord:
        """See `CircuitStore.transition`: one script, published to every replica.

        Raises `StoreUnavailable` if Redis cannot be reached (the breaker
        then decides alone, and counts it).
        """
        circuit = self._circuit(key)
        self._follow_soon()
        opening = state is _OPEN
        try:
            if self._assignments:
                await self._flush_assignments()
            reply = await self._eval(
                _scripts.TRANSITION,
                (circuit.key, circuit.trials),
                (
                    expected_version,
                    "open" if opening else "closed",
                    _ms("open_for", open_for) if opening and open_for > 0 else 0,
                    circuit.channel,
                    circuit.name,
                ),
            )
        except _UNAVAILABLE as exc:
            raise self._unavailable("transition", exc) from exc
        record = _scripts.circuit_record(*reply)
        circuit.learn(record)
        return record

    async def acquire_trial(
        self, key: str, version: int, limit: int, *, lease: float | None = None
    ) -> CircuitRecord | None:
        """See `CircuitStore.acquire_trial`: permits are counted fleet-wide and lapse.

        A permit lapses after ``lease`` seconds (the breaker's
        ``trial_timeout``) when given, else after the store's ``trial_lease``.
        The permit is named by a token of this store's choosing; a request
        that fails or is cancelled after it may have reached Redis has its
        token given back in the background (see "Nothing left behind").
        """
        circuit = self._circuit(key)
        self._follow_soon()
        if self._assignments:
            try:
                await self._flush_assignments()
            except _UNAVAILABLE as exc:
                raise self._unavailable("trial permit", exc) from exc
        held = self._trial_lease if lease is None else lease
        lease_ms = _ms("trial_lease", held)
        reply, token = await self._take(
            "trial permit",
            _scripts.ACQUIRE_TRIAL,
            lambda token: (circuit.key, circuit.trials, _void_key(circuit.key, token)),
            lambda token, not_after: (version, limit, lease_ms, token, not_after),
            lambda keys, token, not_after, last: _Settlement(
                "trial permit given back",
                _scripts.RELEASE_TRIAL,
                keys,
                (version, "0", token, not_after + 1000),
                last + held,
            ),
        )
        if reply[0] == b"granted":
            circuit.permits = [p for p in circuit.permits if p[0] == version]
            circuit.permits.append((version, token))
            return None
        record = _scripts.circuit_record(*reply[2:7])
        circuit.learn(record)
        return record

    async def release_trial(self, key: str, version: int, succeeded: bool) -> int:
        """See `CircuitStore.release_trial`: gives back a permit this store holds.

        Within ``timeout`` or the ambient deadline, whichever is nearer; if
        Redis does not answer by then, the permit is given back (and the
        success counted, once) in the background, and this raises
        `StoreUnavailable`.
        """
        circuit = self._circuit(key)
        token = ""
        for i, (held, one) in enumerate(circuit.permits):
            if held == version:
                token = one
                del circuit.permits[i]
                break
        settlement = _Settlement(
            "trial permit given back",
            _scripts.RELEASE_TRIAL,
            (circuit.key, circuit.trials, _void_key(circuit.key, token)),
            (version, "1" if succeeded else "0", token, 0),
            _clock.now() + self._trial_lease,
        )
        if token:
            return int(await self._settle(settlement))
        # No permit of ours in Redis (it was granted while Redis was away):
        # count the success if Redis answers now; there is nothing to give back.
        within = self._time_left()
        if within <= 0.0:
            raise self._unavailable(settlement.what, _DEADLINE_PASSED)
        try:
            reply = await self._eval(
                settlement.script, settlement.keys, settlement.args, within=within
            )
        except _UNAVAILABLE as exc:
            raise self._unavailable(settlement.what, exc, within) from exc
        return int(reply)

    def assign(self, key: str, state: CircuitState) -> None:
        """See `CircuitStore.assign`: written by the background task, in order.

        The task (started if need be) keeps pending writes, in order, until
        Redis takes them; every breaker sharing ``key`` then gets the new
        record. A `transition` or trial request of this store writes pending
        ones first, so that it never acts on a state they replace.
        """
        self._assignments.append((self._circuit(key), _OPEN if state is _OPEN else _CLOSED))
        self._kick()
