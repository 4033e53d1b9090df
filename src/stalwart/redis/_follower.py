"""The follower: one background task, one pub/sub connection, the fleet's news.

Breakers learn of other replicas' transitions, and idempotency waiters of
results stored, through Redis pub/sub. `_Follower` is the part of
`RedisStore` that runs the task doing it: it subscribes to the channels that
something local follows (a live breaker, a waiter), applies each message,
re-reads the breaker records every ``reconcile_interval`` and after every
reconnection (so that a lost message cannot leave a replica stuck), checks
that the connection still answers, and writes the breakers' pending
`CircuitStore.assign` calls in order. It reconnects after failures, and ends
its session (closing the connection) when nothing needs following.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import redis.asyncio as _aioredis
from redis import exceptions as _rx

from .. import _clock, _validate
from .._circuit_store import CircuitRecord, CircuitState
from . import _scripts
from ._client import (
    _RECONNECT_MAX,
    _RECONNECT_MIN,
    MAX_DURATION,
    AnyClient,
    _Client,
    _describe,
    _is_unavailable,
    _leaf,
    _log,
    _ours,
    _stop,
    _text,
    _within,
)

if TYPE_CHECKING:
    from ._circuit import _Circuit
    from ._idempotency import _Watch

_READ_BATCH: Final = 500
# How far ahead of Redis's clock (as this store knows it) a record's version
# may be in a message: a day, far more than clocks and bursts of changes
# move it (see `_Follower._plausible`).
_AHEAD_MS: Final = 86_400_000.0
# On a cluster: at most this many slots' reads in flight at once (each takes
# a connection of its node's pool).
_READ_FANOUT: Final = 32


class _Signal:
    """Wakes the tasks waiting on it, each of which may also give up after a delay.

    Plain asyncio futures, not anyio cancel scopes: the store's waits run in
    its callers' tasks and in its own, and must never mistake a cancellation
    of the task for the end of a delay (or the other way round). A waiter
    arms a future *before* looking at what it waits for, so that a signal
    fired in between is not lost.
    """

    __slots__ = ("_armed",)

    def __init__(self) -> None:
        self._armed: set[asyncio.Future[None]] = set()

    def arm(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._armed.add(future)
        return future

    def fire(self) -> None:
        armed, self._armed = self._armed, set()
        for future in armed:
            if not future.done():
                future.set_result(None)

    async def wait(self, future: asyncio.Future[None], delay: float) -> None:
        """Until ``future`` is fired, or ``delay`` seconds have passed."""
        timer = asyncio.get_running_loop().call_later(max(0.0, delay), _settle, future)
        try:
            await future
        finally:
            timer.cancel()
            self._armed.discard(future)


async def _finish(closing: asyncio.Future[None]) -> None:
    """Wait for ``closing`` even if cancelled meanwhile (then re-raise the cancellation).

    Closing a connection half way leaves its socket to the garbage
    collector; ``closing`` is bounded (`_Follower._close_pubsub`), so the
    cancellation is only delayed, never lost.
    """
    cancelled: BaseException | None = None
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Follower(_Client):
    """What a `RedisStore` follows (breakers, idempotency waiters), and the task following it."""

    __slots__ = (
        "_acks",
        "_assign_lock",
        "_assignments",
        "_by_channel",
        "_circuits",
        "_confirmed",
        "_node_turn",
        "_ping_sent",
        "_pong",
        "_pubsub",
        "_reconcile_interval",
        "_reconcile_soon",
        "_subscribed",
        "_task",
        "_wake",
        "_watches",
    )

    def __init__(
        self,
        client: AnyClient,
        *,
        prefix: str,
        timeout: float,
        name: str,
        reconcile_interval: float,
    ) -> None:
        super().__init__(client, prefix=prefix, timeout=timeout, name=name)
        self._reconcile_interval = _validate.duration(
            "reconcile_interval", reconcile_interval, positive=True
        )
        self._circuits: dict[str, _Circuit] = {}
        self._by_channel: dict[str, _Circuit] = {}
        self._watches: dict[str, _Watch] = {}
        self._assignments: collections.deque[tuple[_Circuit, CircuitState]] = collections.deque()
        self._task: asyncio.Task[None] | None = None
        self._wake = _Signal()  # the follower has something to do
        self._acks = _Signal()  # a subscription was confirmed
        self._assign_lock: asyncio.Lock | None = None
        self._pubsub: Any = None
        self._subscribed: set[str] = set()  # SUBSCRIBE sent on this connection
        self._confirmed: set[str] = set()  # ...and confirmed by Redis
        self._ping_sent: float | None = None
        self._pong = 0.0
        self._reconcile_soon = False
        # On a cluster: which node the next pub/sub connection goes to (a
        # random start spreads a fleet's connections over the nodes).
        self._node_turn = secrets.randbelow(1 << 16)

    # -- starting and stopping -----------------------------------------------------

    def _follow_soon(self) -> None:
        """Start the follower task if it is not running (needs a running asyncio loop).

        A closed store starts nothing.
        """
        if self._closed:
            return
        task = self._task
        info = _clock.asyncio_loop()
        if info is None:
            self._refuse_trio()
            return
        if task is not None and not task.done() and task.get_loop() is info.loop:
            self._wake.fire()
            return
        self._wake = _Signal()
        self._acks = _Signal()
        self._assign_lock = asyncio.Lock()
        self._task = info.loop.create_task(
            self._follow(), name=f"stalwart.redis follower ({self._prefix})"
        )

    def _kick(self) -> None:
        if self._task is not None and not self._task.done():
            self._wake.fire()
        else:
            self._follow_soon()

    def _wake_waiters(self) -> None:
        """Have every idempotency wait look again (at a closed store: it raises at once)."""
        for watch in self._watches.values():
            watch.changed.fire()

    async def _stop_following(self) -> None:
        """Stop the follower task (it unsubscribes and closes its connection)."""
        task, self._task = self._task, None
        if task is None or task.done() or not _ours(task):
            return
        await _stop(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("the Redis store's follower failed", exc_info=task.exception())

    # -- breaker records: re-read, and written in order -----------------------------

    async def _flush_assignments(self) -> None:
        """Write pending `assign` calls, in order (a failure leaves the rest pending)."""
        lock = self._assign_lock
        if lock is None:
            lock = self._assign_lock = asyncio.Lock()
        async with lock:
            while self._assignments:
                circuit, state = self._assignments[0]
                reply = await self._eval(
                    _scripts.ASSIGN,
                    (circuit.key, circuit.trials),
                    (
                        "open" if state is CircuitState.OPEN else "closed",
                        circuit.channel,
                        circuit.name,
                    ),
                )
                self._assignments.popleft()
                circuit.learn(_scripts.circuit_record(*reply))

    async def _read_circuits(self, circuits: Sequence[_Circuit]) -> None:
        if self._cluster:
            await self._read_circuits_by_slot(circuits)
            return
        for start in range(0, len(circuits), _READ_BATCH):
            await self._read_batch(circuits[start : start + _READ_BATCH])

    async def _read_batch(self, batch: Sequence[_Circuit]) -> None:
        reply = await self._eval(_scripts.READ_CIRCUITS, [c.key for c in batch], ())
        for i, circuit in enumerate(batch):
            fields = reply[5 * i : 5 * i + 5]
            if fields[0] == b"foreign":
                if not circuit.foreign:
                    circuit.foreign = True
                    _log.warning(
                        "Redis store %r: the key of breaker %r (%s) holds something that "
                        "stalwart did not write (not a hash): the breakers of that name go on "
                        "alone until it is deleted",
                        self._name,
                        circuit.name,
                        circuit.key,
                    )
                continue
            if circuit.foreign:
                circuit.foreign = False
                _log.info(
                    "Redis store %r: the key of breaker %r holds its record again",
                    self._name,
                    circuit.name,
                )
            circuit.learn(_scripts.circuit_record(*fields))

    async def _read_circuits_by_slot(self, circuits: Sequence[_Circuit]) -> None:
        """Read records on a cluster: one script per hash slot, `_READ_FANOUT` at once.

        A script may only touch keys of one slot; the client sends each to
        the node serving that slot, so the reads of different nodes overlap.
        """
        slot_of = cast(_aioredis.RedisCluster, self._client).keyslot
        groups: dict[int, list[_Circuit]] = {}
        for circuit in circuits:
            groups.setdefault(slot_of(circuit.key), []).append(circuit)
        batches = [
            group[start : start + _READ_BATCH]
            for group in groups.values()
            for start in range(0, len(group), _READ_BATCH)
        ]
        for start in range(0, len(batches), _READ_FANOUT):
            try:
                async with asyncio.TaskGroup() as tasks:
                    for batch in batches[start : start + _READ_FANOUT]:
                        tasks.create_task(self._read_batch(batch))
            except BaseExceptionGroup as group:
                # One read failed (the others were cancelled): raise it as
                # a single read would, so that callers tell Redis being
                # away from a bug the same way on every client.
                raise _leaf(group) from group

    # -- the task: sessions, subscriptions, messages ----------------------------------

    async def _follow(self) -> None:
        """Run sessions with Redis until cancelled, reconnecting after failures."""
        delay = _RECONNECT_MIN
        while True:
            began = _clock.now()
            try:
                await self._session()
            except Exception as exc:  # noqa: BLE001 - logged; the follower must go on
                self._node_turn += 1  # on a cluster, the next session tries another node
                if not _is_unavailable(exc):
                    _log.error(
                        "Redis store %r: the follower failed; restarting", self._name, exc_info=True
                    )
                elif self._healthy:
                    self._healthy = False
                    _log.warning(
                        "Redis store %r: Redis unreachable: %s", self._name, _describe(_leaf(exc))
                    )
            else:
                delay = _RECONNECT_MIN
                continue  # nothing left to follow: the next session waits for something
            if _clock.now() - began > 10 * _RECONNECT_MAX:
                delay = _RECONNECT_MIN
            await asyncio.sleep(delay * (0.5 + secrets.randbelow(500) / 1000.0))
            delay = min(delay * 2.0, _RECONNECT_MAX)

    def _desired(self) -> set[str]:
        channels = set(self._watches)
        for circuit in self._circuits.values():
            if circuit.listeners:
                # A breaker that is gone needs no more news.
                circuit.listeners[:] = [ref for ref in circuit.listeners if ref() is not None]
                if circuit.listeners:
                    channels.add(circuit.channel)
        return channels

    async def _session(self) -> None:
        """Follow through one pub/sub connection, opened when something needs it.

        Returns when nothing needs it any more (the connection is closed);
        raises when Redis fails.
        """
        wake = self._wake
        pubsub: Any = None
        own: Any = None  # a client of a cluster node, opened for the pub/sub connection
        reader: asyncio.Task[None] | None = None
        next_check = _clock.now() + self._reconcile_interval
        try:
            while True:
                woken = wake.arm()
                if reader is not None and reader.done():
                    reader.result()  # its error ends the session
                    raise _rx.ConnectionError("the pub/sub reader stopped")
                if self._assignments:
                    await self._flush_assignments()
                desired = self._desired()
                if pubsub is None and desired:
                    pubsub, own = await self._open_pubsub()
                    self._pubsub = pubsub
                    self._ping_sent = None
                    await self._subscriptions(pubsub, desired)
                    reader = asyncio.get_running_loop().create_task(
                        self._read(pubsub), name=f"stalwart.redis reader ({self._prefix})"
                    )
                    reader.add_done_callback(lambda _: wake.fire())
                elif pubsub is not None:
                    if not desired:
                        return
                    await self._subscriptions(pubsub, desired)
                now = _clock.now()
                due = now >= next_check or self._reconcile_soon
                stale = [
                    c for c in self._circuits.values() if c.needs_read or (due and c.listeners)
                ]
                if stale:
                    for circuit in stale:
                        circuit.needs_read = False
                    self._reconcile_soon = False
                    await self._read_circuits(stale)
                if now >= next_check:
                    next_check = now + self._reconcile_interval
                    if pubsub is not None:
                        await self._check_pubsub(pubsub)
                await wake.wait(woken, next_check - _clock.now())
        finally:
            self._pubsub = None
            self._subscribed.clear()
            self._confirmed.clear()
            for watch in self._watches.values():
                watch.confirmed = False
            if reader is not None:
                await _stop(reader)
                if not reader.cancelled():
                    reader.exception()  # retrieved: it was raised above, or is moot
            if pubsub is not None or own is not None:
                await _finish(asyncio.ensure_future(self._close_pubsub(pubsub, own)))

    async def _close_pubsub(self, pubsub: Any, own: _aioredis.Redis | None) -> None:
        """Close the pub/sub connection (and the node's client it came from), within `timeout`."""
        with contextlib.suppress(Exception):
            async with _within(self._timeout):
                if pubsub is not None:
                    await pubsub.aclose()
                if own is not None:
                    await own.aclose(close_connection_pool=True)

    async def _open_pubsub(self) -> tuple[Any, _aioredis.Redis | None]:
        """A pub/sub connection, and the client to close with it (None: the store's own).

        On a cluster, a plain client of one of its nodes: Redis Cluster sends
        every ``PUBLISH`` to every node (primaries and replicas), so any node
        hears every channel, whatever the slots it serves and however they
        move. After a failed session the next session takes the next node,
        so that a node that died (or was failed over) is left behind.
        """
        if not self._cluster:
            return self._client.pubsub(), None
        cluster = cast(_aioredis.RedisCluster, self._client)
        async with _within(self._timeout):
            await cluster.initialize()
        nodes = sorted(cluster.get_nodes(), key=lambda node: node.name)
        if not nodes:
            raise _rx.ConnectionError("the cluster client knows no node")
        node = nodes[self._node_turn % len(nodes)]
        pool = _aioredis.ConnectionPool(
            connection_class=node.connection_class, **node.connection_kwargs
        )
        single = _aioredis.Redis(connection_pool=pool)
        return single.pubsub(), single

    async def _subscriptions(self, pubsub: Any, desired: set[str]) -> None:
        """Subscribe to the channels wanted and not yet asked for; drop the others."""
        new = desired - self._subscribed
        old = self._subscribed - desired
        async with _within(self._timeout):
            if new:
                self._subscribed |= new
                await pubsub.subscribe(*sorted(new))
            if old:
                self._subscribed -= old
                self._confirmed -= old
                await pubsub.unsubscribe(*sorted(old))

    async def _check_pubsub(self, pubsub: Any) -> None:
        """Raise if the last PING went unanswered (a silent connection); PING again."""
        if self._ping_sent is not None and self._pong < self._ping_sent:
            raise _rx.ConnectionError("the pub/sub connection stopped answering")
        self._ping_sent = _clock.now()
        async with _within(self._timeout):
            await pubsub.ping()

    async def _read(self, pubsub: Any) -> None:
        while True:
            message = await pubsub.get_message(timeout=self._reconcile_interval)
            if message is not None:
                self._dispatch(message)

    def _plausible(self, record: CircuitRecord) -> bool:
        """Could ``record``, from a message, have been written by a store's script?

        Its version is the time of the change on Redis's clock, in ms (or
        one more than the version before, when that is later), and its open
        period at most `MAX_DURATION`. A message naming a version far ahead
        would make every replica ignore the true records after it (they all
        have older versions) until it restarts; so would one with an
        unending open period, during which a breaker never asks Redis again.
        """
        return (
            record.version <= self._redis_now_ms() + _AHEAD_MS and record.open_for <= MAX_DURATION
        )

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if isinstance(kind, bytes):
            kind = kind.decode()
        if kind == "pong":
            self._pong = _clock.now()
            return
        channel = _text(message["channel"])
        if channel is None:
            return
        if kind == "message":
            circuit = self._by_channel.get(channel)
            if circuit is not None:
                data = message["data"]
                try:
                    record = _scripts.circuit_record(
                        *(data.encode() if isinstance(data, str) else data).split()
                    )
                except (TypeError, ValueError):
                    # Not one of ours: someone else published on the channel.
                    _log.warning("Redis store %r: ignored a message %r", self._name, data)
                    return
                if not self._plausible(record):
                    _log.warning(
                        "Redis store %r: ignored a message %r: its version is ahead of Redis's "
                        "clock, or its open period longer than a store keeps (not one of "
                        "stalwart's)",
                        self._name,
                        data,
                    )
                    return
                circuit.learn(record)
                return
            watch = self._watches.get(channel)
            if watch is not None:
                watch.changed.fire()
        elif kind == "subscribe":
            if channel in self._confirmed:
                # Subscribed again without asking: the client reconnected on
                # its own, and messages may have been lost in between.
                self._reconcile_soon = True
            self._confirmed.add(channel)
            circuit = self._by_channel.get(channel)
            if circuit is not None:
                circuit.needs_read = True
            watch = self._watches.get(channel)
            if watch is not None:
                watch.confirmed = True
                watch.changed.fire()
            self._acks.fire()
            self._wake.fire()
        elif kind == "unsubscribe":
            self._confirmed.discard(channel)
