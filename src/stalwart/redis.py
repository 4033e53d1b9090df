"""Redis as the shared store: breaker state and idempotency records across replicas.

One `RedisStore` serves as the ``store=`` of `CircuitBreaker`, of `Idempotency`
and of the ASGI ``IdempotencyMiddleware``, so that a service running as many
replicas (processes, pods, hosts) learns of an outage once and runs a
duplicated request once. ``pip install 'stalwart[redis]'``; it runs on asyncio
(redis-py's ``redis.asyncio`` client), not on trio. Example::

    import redis.asyncio
    import stalwart as sw
    from stalwart.redis import RedisStore

    client = redis.asyncio.Redis.from_url("redis://redis:6379/0", socket_timeout=0.5)
    store = RedisStore(client, prefix="payments:")
    breaker = sw.CircuitBreaker(name="bank", store=store)
    charge_once = sw.Idempotency(key="payment_id", store=store)

    async def lifespan():
        async with store:  # follows the breakers' shared state until closed
            yield

``docs/how-to/redis.md`` covers running many replicas: the lifecycle of the
store, its guarantees, its failure modes and its tuning.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import math
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Final, Literal, cast, final

try:
    import redis.asyncio as _aioredis
    from redis import exceptions as _rx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "stalwart.redis needs redis-py: install it with `pip install 'stalwart[redis]'`"
    ) from exc

from . import _clock, _redis_scripts, _validate
from ._circuit_store import CircuitRecord, CircuitState, Listener, _weakly
from ._codec import Codec, JSONCodec
from ._deadline import remaining
from ._errors import StoreUnavailable
from ._idempotency_store import Completed, InFlight, Lease
from ._redis_scripts import Script

__all__ = ["OnUnavailable", "RedisStore"]

_within: Final = asyncio.timeout


#: What idempotency calls do when Redis cannot be reached (see `RedisStore`).
OnUnavailable = Literal["raise", "bypass"]

DEFAULT_PREFIX: Final = "stalwart:"
DEFAULT_TIMEOUT: Final = 1.0
DEFAULT_RECONCILE_INTERVAL: Final = 5.0
DEFAULT_TRIAL_LEASE: Final = 30.0
#: The longest duration a `RedisStore` keeps in Redis (a TTL, a lease, an
#: open period): 10**12 seconds, some 31,700 years. Redis keeps expiry times
#: as milliseconds in 64-bit integers, and the scripts reckon with Lua's
#: numbers, exact up to 2**53: this keeps every sum exact.
MAX_DURATION: Final = 1e12

_log = logging.getLogger("stalwart.redis")

_CLOSED: Final = CircuitState.CLOSED
_OPEN: Final = CircuitState.OPEN

# Replies as bytes whatever the client's ``decode_responses``: results are
# the codec's bytes, and must reach it untouched.
_RAW: Final[dict[str, Any]] = {"NEVER_DECODE": True}

# Errors that mean "Redis cannot be reached or cannot serve now", as opposed
# to a bug (a script error, a key of the wrong type): the first kind makes a
# store unavailable, the second propagates as it is.
_UNAVAILABLE: Final = (
    _rx.ConnectionError,  # also refused, reset, auth, loading, too many connections
    _rx.TimeoutError,
    TimeoutError,  # our own bound on every request
    OSError,
    _rx.ReadOnlyError,  # a replica promoted late, or a failover in progress
    _rx.OutOfMemoryError,
    _rx.TryAgainError,
    # A cluster (not supported yet) answering a plain client: MOVED and ASK
    # for keys served elsewhere, CLUSTERDOWN, CROSSSLOT. The store cannot
    # serve, as with a Redis that is down; the first one is logged with why.
    _rx.ClusterError,  # CLUSTERDOWN, and a master down
    _rx.AskError,  # MOVED too
    _rx.ClusterCrossSlotError,
    _rx.RedisClusterException,
)
_DEADLINE_PASSED: Final = TimeoutError("the ambient deadline has passed")
_CLUSTER_HINT: Final = (
    " (this Redis is a cluster node: RedisStore does not support Redis Cluster yet)"
)
_CLUSTER_ERRORS: Final = (
    _rx.ClusterError,
    _rx.AskError,
    _rx.ClusterCrossSlotError,
    _rx.RedisClusterException,
)

# Waiters look at a record this often when the notification that should wake
# them is not known to be subscribed; and at least this often in any case, so
# that a notification lost to a reconnection delays them by that much at most.
_UNCONFIRMED_POLL: Final = 0.05
_SAFETY_POLL: Final = 1.0
# The follower's reconnection delays: doubling, with jitter, up to a cap.
_RECONNECT_MIN: Final = 0.05
_RECONNECT_MAX: Final = 2.0
_READ_BATCH: Final = 500

# A request that takes something (a claim, a trial permit) carries the
# latest time, on Redis's clock, at which it may still run: twice the
# store's timeout after it was sent, plus this margin for clock drift; before
# the store has learnt how Redis's clock differs from its own, a margin of a
# minute (see `RedisStore._not_after`).
_LATE_MARGIN: Final = 1.0
_UNLEARNT_MARGIN: Final = 60.0
# Settlements (give-backs, releases, completions) waiting for Redis: at most
# this many, the oldest dropped first (their leases free their keys); tried
# again at most this many seconds apart while Redis does not answer, so that
# they go through soon after it does (an attempt against a Redis that is down
# costs little: a refused connection, or one request queued in a stalled one).
_MAX_PENDING: Final = 10_000
_GIVE_BACK_MAX: Final = 0.5


def _digest(text: str) -> str:
    """128 bits of SHA-256: what user-chosen names become in Redis keys."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _ms(param: str, seconds: float) -> int:
    """``seconds`` as whole milliseconds for Redis (at least 1), checked against its limit."""
    if not 0.0 <= seconds <= MAX_DURATION:  # also NaN
        raise ValueError(
            f"{param} must be between 0 and {MAX_DURATION:g} seconds with a RedisStore, "
            f"got {seconds!r}"
        )
    return max(1, math.ceil(seconds * 1000.0))


def _void_key(key: str, token: str) -> str:
    """The marker that makes a late request naming ``token`` do nothing."""
    return f"{key}:void:{token}"


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogatepass")
    return str(value)


def _bytes(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


def _record(state: Any, version: Any, left_ms: Any, forced: Any) -> CircuitRecord:
    """A circuit record from a script's reply or a pub/sub message."""
    if isinstance(state, str):
        state = state.encode()
    if state == b"open":
        if int(forced):
            return CircuitRecord(_OPEN, int(version), forced=True)
        return CircuitRecord(_OPEN, int(version), int(left_ms) / 1000.0)
    return CircuitRecord(_CLOSED, int(version))


class _Circuit:
    """What a store knows of one breaker name."""

    __slots__ = (
        "channel",
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

    def cached(self, now: float | None) -> CircuitRecord:
        """The last record known, its open period counted down to ``now``."""
        record = self.record
        if record.state is _CLOSED or record.forced:
            return record
        if now is None or self.learned_at is None:
            # The store refuses trial permits until the period is really over.
            return CircuitRecord(_OPEN, record.version, 0.0)
        return CircuitRecord(_OPEN, record.version, record.open_for - (now - self.learned_at))

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


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@final
class _Settlement:
    """A request that gives something back, waiting for Redis to answer it.

    Idempotent by construction (it names its token), so it may be sent
    again however many times it was sent before; moot after ``until`` (loop
    time), when whatever it gives back has lapsed in Redis anyway.
    """

    __slots__ = ("args", "keys", "script", "until", "what")

    def __init__(
        self, what: str, script: Script, keys: tuple[str, ...], args: tuple[Any, ...], until: float
    ) -> None:
        self.what = what
        self.script = script
        self.keys = keys
        self.args = args
        self.until = until


class _Watch:
    """The local waiters on one idempotency key, and its notification channel."""

    __slots__ = ("changed", "confirmed", "count")

    def __init__(self, confirmed: bool) -> None:
        self.count = 0
        self.changed = _Signal()  # fired by every notification, and when subscribed
        self.confirmed = confirmed  # the channel's subscription is confirmed


@final
class RedisStore:
    """Circuit breaker state and idempotency records shared through Redis.

    Give the same store (or stores with the same ``prefix`` on the same Redis)
    to the breakers and idempotency policies of every replica:

    * **Breakers** sharing a ``name`` open, close and take half-open trials
      together. Each still decides from its own window, and reads the state
      from its own memory: a closed breaker's successful call and an open
      breaker's rejection never touch Redis. Transitions (open, half-open
      trials, close, `CircuitBreaker.force_open`, `CircuitBreaker.reset`)
      are compare-and-set Lua scripts, published on Redis pub/sub and applied
      by every replica as soon as the message arrives (a millisecond on a
      local network); every ``reconcile_interval`` seconds, and whenever the
      connection comes back, the store re-reads the records it follows, so a
      lost message cannot leave a replica stuck. Half-open trial permits are
      counted in Redis: ``half_open_calls`` limits the whole fleet's trials.
    * **Idempotency records** are claimed atomically by a Lua script, as a
      lease of the policy's ``lease`` seconds that the running call renews:
      if its process dies, the key frees itself when the lease lapses. The
      result is stored with its fingerprint for the TTL, encoded by
      ``codec``; waiters are woken by pub/sub (and look again at least every
      second, and when the lease lapses). A replay is one round trip; a
      first execution two (claim, then store the result).

    **Lifecycle.** Breakers learn of other replicas' transitions through a
    background task that holds one pub/sub connection. Run it for the life
    of your application with ``async with store:`` (a lifespan, a task
    group); `aclose` stops it. Without that, the store starts it on first
    need (a breaker built inside the running loop, a transition, a wait for
    an idempotency key), and then you must ``await store.aclose()`` before
    the loop ends. Either way nothing is left behind: no task, no
    connection, no subscription. The store never closes ``client``: that is
    yours. It runs on asyncio only (the client is asyncio's), from one event
    loop at a time.

    **Failure.** Every request to Redis is bounded by ``timeout`` seconds,
    whatever the client's own socket timeouts and retries; an ambient
    deadline (`deadline`, a `Timeout`) cuts it shorter, also for the
    completions and releases that callers shield from cancellation. When
    Redis cannot be reached:

    * breakers go on alone: each trips, half-opens and closes on its own
      state, admitting its own trials; when Redis answers again the store
      reconnects, re-reads every record it follows and pushes it, and the
      breakers fall back in line with the fleet;
    * idempotency claims and waits raise `StoreUnavailable` (the call does
      not run, ``on_unavailable="raise"``, the default), or run the call
      without de-duplication (``on_unavailable="bypass"``: nothing is
      stored, and a duplicate may run twice). A result that cannot be
      stored at once after the call ran is not an error: the caller gets
      it, and the store stores it in the background (below). Renewals that
      fail raise `StoreUnavailable` to the policy, which logs them.

    **Nothing left behind.** Each claim and trial permit is named by a
    token the store chooses, so the store can give it back whatever happens
    to the request that took it. A request that times out, is cancelled
    (the caller's deadline) or loses its connection may still reach Redis
    and run later (a stalled Redis runs what was queued when it resumes):
    the store then gives its token back in the background, retrying until
    Redis answers (a late request finds the key or permit given back, or
    finds a marker that makes it do nothing). A request that reaches Redis
    more than ``2 * timeout + 1`` seconds after it was sent does nothing.
    Releases, completions and trial permits given back that do not get
    through in time (``timeout``, or the ambient deadline) are finished the
    same way, in the background, for as long as the lease or permit would
    hold: when Redis answers again, no key stays claimed and no permit
    stays taken by a request that gave up. The background task ends when
    nothing is pending; `aclose` gives it ``timeout`` seconds to finish.

    **Keys.** Everything lives under ``prefix``: ``{prefix}circuit:<h>``
    (and ``...:trials``) per breaker name, ``{prefix}idem:<h>`` per
    idempotency scope and key, where ``<h>`` is 128 bits of SHA-256 of the
    name (or of the scope and key): no user-chosen text reaches a key name,
    so none can collide with or reach into another. Pub/sub channels carry
    the same names. Breaker records never expire (there is one per breaker
    name); idempotency records expire with their lease or TTL; the markers
    of requests given up (``...:void:<token>``) within seconds.

    **Limits.** Durations kept in Redis (the policies' ``ttl``, ``lease``,
    ``open_for``, and ``trial_lease``) are at most `max_duration` seconds:
    policies given this store check theirs when they are built. A Redis
    Cluster client (``redis.asyncio.RedisCluster``) is not supported yet:
    the constructor refuses it, and a plain client of a cluster node finds
    the store unavailable (``MOVED``, ``CLUSTERDOWN``).

    **Values** cross Redis through ``codec`` (`JSONCodec` by default): never
    pickle. A stored value that does not decode raises `ValueError`; it is
    never executed.

    Args:
        client: a ``redis.asyncio.Redis`` client (any ``decode_responses``)
            of a standalone Redis (or one managed by Sentinel); not a
            cluster client, yet.
        prefix: the namespace of every key and channel; stores with the same
            prefix on the same Redis share everything.
        codec: how idempotency results become bytes (default `JSONCodec`).
        timeout: seconds any request to Redis may take, > 0 (default 1.0).
        on_unavailable: idempotency without Redis: ``"raise"`` (default)
            or ``"bypass"``.
        reconcile_interval: seconds between re-reads of the breaker records
            followed, and health checks of the pub/sub connection, > 0
            (default 5.0).
        trial_lease: seconds after which a half-open trial permit that was
            never given back (its process died) lapses, > 0, at most
            `max_duration` (default 30.0). A trial that runs longer loses
            its permit, and its success does not count.
        name: the store's name, reported as ``policy`` by `StoreUnavailable`.
    """

    __slots__ = (
        "_acks",
        "_assign_lock",
        "_assignments",
        "_by_channel",
        "_circuits",
        "_client",
        "_codec",
        "_confirmed",
        "_giver",
        "_healthy",
        "_name",
        "_on_unavailable",
        "_pending",
        "_ping_sent",
        "_pong",
        "_prefix",
        "_pubsub",
        "_reconcile_interval",
        "_reconcile_soon",
        "_skew",
        "_subscribed",
        "_task",
        "_timeout",
        "_trial_lease",
        "_wake",
        "_watches",
    )

    def __init__(
        self,
        client: _aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        codec: Codec | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        on_unavailable: OnUnavailable = "raise",
        reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL,
        trial_lease: float = DEFAULT_TRIAL_LEASE,
        name: str = "redis",
    ) -> None:
        if isinstance(cast(object, client), _aioredis.RedisCluster):
            raise TypeError(
                "client is a Redis Cluster client (redis.asyncio.RedisCluster): RedisStore "
                "does not support Redis Cluster yet. Give it a redis.asyncio.Redis client of "
                "a standalone Redis (or of the master that Sentinel names)"
            )
        if not isinstance(client, _aioredis.Redis):
            raise TypeError(
                "client must be a redis.asyncio.Redis client (redis-py's asyncio API), "
                f"not {type(client).__module__}.{type(client).__qualname__}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        if codec is None:
            codec = JSONCodec()
        elif not (
            callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))
        ):
            raise TypeError(
                f"codec must have encode() and decode() methods, not {type(codec).__name__}"
            )
        if on_unavailable not in ("raise", "bypass"):
            raise ValueError(f"on_unavailable must be 'raise' or 'bypass', got {on_unavailable!r}")
        self._client = client
        self._prefix = prefix
        self._codec = codec
        self._timeout = _validate.duration("timeout", timeout, positive=True)
        self._on_unavailable: OnUnavailable = on_unavailable
        self._reconcile_interval = _validate.duration(
            "reconcile_interval", reconcile_interval, positive=True
        )
        self._trial_lease = _validate.duration(
            "trial_lease", trial_lease, positive=True, maximum=MAX_DURATION
        )
        self._name = _validate.name(name)
        self._circuits: dict[str, _Circuit] = {}
        self._by_channel: dict[str, _Circuit] = {}
        self._watches: dict[str, _Watch] = {}
        self._assignments: collections.deque[tuple[_Circuit, CircuitState]] = collections.deque()
        self._healthy = True
        # The follower's state: see `_follow`.
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
        # Redis's clock minus the loop's, in milliseconds, as last seen in a
        # reply (None: not yet; see `_not_after`).
        self._skew: float | None = None
        # Give-backs, releases and completions waiting for Redis, in order,
        # and the task that sends them (see `_settle_later`).
        self._pending: collections.deque[_Settlement] = collections.deque()
        self._giver: asyncio.Task[None] | None = None

    # -- options ---------------------------------------------------------------

    @property
    def client(self) -> _aioredis.Redis:
        return self._client

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def codec(self) -> Codec:
        return self._codec

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def on_unavailable(self) -> OnUnavailable:
        return self._on_unavailable

    @property
    def name(self) -> str:
        return self._name

    @property
    def max_duration(self) -> float:
        """The longest duration, in seconds, this store keeps in Redis (`MAX_DURATION`).

        Policies given the store refuse a longer ``ttl``, ``lease`` or
        ``open_for`` when they are built.
        """
        return MAX_DURATION

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> RedisStore:
        """Start following shared breaker state; `aclose` on exit."""
        self._follow_soon()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the background tasks: unsubscribe, close the pub/sub connection.

        Idempotent. Give-backs still pending (Redis did not answer) get up
        to ``timeout`` seconds more; those that do not get through then are
        dropped, and their leases free their keys. Breakers attached to the
        store keep their state but hear of no more transitions until the
        store is used (or entered) again, which starts the task anew. The
        client is not closed.
        """
        giver, self._giver = self._giver, None
        if giver is not None and _ours(giver):
            if not giver.done():
                await asyncio.wait({giver}, timeout=self._timeout)
            await _stop(giver)
            if self._pending:
                _log.warning(
                    "Redis store %r: closed with %d give-backs that Redis did not take; "
                    "their leases will free them",
                    self._name,
                    len(self._pending),
                )
        self._pending.clear()
        task, self._task = self._task, None
        if task is None or task.done() or not _ours(task):
            return
        await _stop(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("the Redis store's follower failed", exc_info=task.exception())

    async def sync(self) -> None:
        """Re-read every breaker record this store follows, and push it now.

        Returns once the store is subscribed to every breaker name attached
        so far and each breaker holds Redis's current record: call it after
        building your breakers to serve the first request with the fleet's
        state. Raises `StoreUnavailable` if Redis does not answer in time.
        """
        self._follow_soon()
        circuits = [c for c in self._circuits.values() if any(ref() for ref in c.listeners)]
        end = _clock.now() + self._timeout
        while True:
            acked = self._acks.arm()
            if all(c.channel in self._confirmed for c in circuits):
                break
            if _clock.now() >= end:
                raise self._unavailable("subscribe", TimeoutError())
            await self._acks.wait(acked, end - _clock.now())
        for circuit in circuits:
            # Subscribed: this read is as fresh as the one the follower was
            # about to make, which it need not make now.
            circuit.needs_read = False
        try:
            await self._read_circuits(circuits)
        except BaseException as exc:
            for circuit in circuits:
                circuit.needs_read = True  # the follower reads them, then
            self._wake.fire()
            if isinstance(exc, _UNAVAILABLE):
                raise self._unavailable("read", exc) from exc
            raise

    def _follow_soon(self) -> None:
        """Start the follower task if it is not running (needs a running asyncio loop)."""
        task = self._task
        info = _clock.asyncio_loop()
        if info is None:
            _raise_if_trio()
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

    # -- requests ----------------------------------------------------------------

    async def _eval(
        self,
        script: Script,
        keys: Sequence[str],
        args: Iterable[Any],
        *,
        within: float | None = None,
    ) -> Any:
        """Run ``script`` (by SHA, loading it on NOSCRIPT), within the store's timeout.

        ``within``: a shorter bound (an ambient deadline's time left).
        """
        if _clock.asyncio_loop() is None:
            _raise_if_trio()
        client: Any = self._client  # redis-py's command methods are untyped
        argv = (script.sha, len(keys), *keys, *args)
        try:
            async with _within(self._timeout if within is None else within):
                try:
                    reply = await client.execute_command("EVALSHA", *argv, **_RAW)
                except _rx.NoScriptError:
                    pipe = client.pipeline(transaction=False)
                    pipe.script_load(script.body)
                    pipe.execute_command("EVALSHA", *argv, **_RAW)
                    reply = (await pipe.execute())[1]
        except _UNAVAILABLE as exc:
            if self._healthy:
                self._healthy = False
                _log.warning(
                    "Redis store %r: Redis unreachable: %s%s",
                    self._name,
                    _describe(exc),
                    _CLUSTER_HINT if isinstance(exc, _CLUSTER_ERRORS) else "",
                )
            raise
        if not self._healthy:
            self._healthy = True
            _log.info("Redis store %r: Redis reachable again", self._name)
        return reply

    def _unavailable(
        self, operation: str, exc: BaseException, within: float | None = None
    ) -> StoreUnavailable:
        reason = (
            f"no answer within {self._timeout if within is None else within:g}s"
            if isinstance(exc, TimeoutError) and not str(exc)
            else _describe(exc)
        )
        if isinstance(exc, _CLUSTER_ERRORS):
            reason += _CLUSTER_HINT
        return StoreUnavailable(
            f"Redis store {self._name!r} is unavailable ({operation}: {reason})",
            policy=self._name,
        )

    # -- taking and giving back: tokens, late requests, settlements in the background --

    def _not_after(self, sent: float) -> tuple[int, float]:
        """The latest time at which a request sent at ``sent`` may run.

        On Redis's clock, in milliseconds (for the request), and on the
        loop's (for the store: when a give-back of it may stop caring).

        Twice the timeout after it was sent, plus a margin: the client gives
        up after one timeout, and its estimate of Redis's clock (learnt from
        the last reply) errs by at most that reply's round trip, itself under
        one timeout. Until a reply has taught it, the store takes Redis's
        clock to be its host's wall clock, with a margin of a minute.
        """
        skew = self._skew
        if skew is None:
            skew = (time.time() - sent) * 1000.0  # the wall clock, read only here
            margin = _UNLEARNT_MARGIN
        else:
            margin = _LATE_MARGIN
        last = sent + 2.0 * self._timeout + margin
        return math.ceil(last * 1000.0 + skew), last

    def _learn_clock(self, server_ms: Any) -> None:
        """Redis said its time was ``server_ms`` just now: keep how its clock differs."""
        self._skew = float(server_ms) - _clock.now() * 1000.0

    def _settle_later(self, settlement: _Settlement) -> None:
        """Send ``settlement`` from the background until Redis takes it (or it is moot).

        Never blocks and never raises: callers run it while they fail or are
        cancelled. Needs the store's running event loop.
        """
        pending = self._pending
        if len(pending) >= _MAX_PENDING:
            dropped = pending.popleft()
            _log.warning(
                "Redis store %r: too many give-backs pending; dropped a %s (its lease will "
                "free it)",
                self._name,
                dropped.what,
            )
        pending.append(settlement)
        giver = self._giver
        info = _clock.asyncio_loop()
        if info is None:
            return  # no loop (it is closing): the leases will free the keys
        if giver is None or giver.done() or giver.get_loop() is not info.loop:
            self._giver = info.loop.create_task(
                self._give_back(), name=f"stalwart.redis give-backs ({self._prefix})"
            )

    async def _give_back(self) -> None:
        """Send the pending settlements, in order, until none is left."""
        pending = self._pending
        delay = _RECONNECT_MIN
        dropped = 0
        while pending:
            settlement = pending[0]
            if _clock.now() >= settlement.until:
                pending.popleft()
                dropped += 1
                continue
            try:
                await self._eval(settlement.script, settlement.keys, settlement.args)
            except _UNAVAILABLE:
                await asyncio.sleep(delay * (0.5 + secrets.randbelow(500) / 1000.0))
                delay = min(delay * 2.0, _GIVE_BACK_MAX)
                continue
            except Exception:  # noqa: BLE001 - logged; the others must still go
                _log.exception("Redis store %r: a %s failed", self._name, settlement.what)
            if pending and pending[0] is settlement:
                pending.popleft()
            delay = _RECONNECT_MIN
        if dropped:
            _log.warning(
                "Redis store %r: Redis did not answer in time for %d give-backs; their "
                "leases freed them",
                self._name,
                dropped,
            )

    def _time_left(self) -> float:
        """How long a settlement may wait for Redis: the timeout, or the deadline's time left."""
        left = remaining()
        return self._timeout if left is None else min(self._timeout, left)

    async def _settle(self, settlement: _Settlement) -> Any:
        """Send ``settlement`` now, within `_time_left`; if it does not get through, later.

        Returns the script's reply, or raises `StoreUnavailable` (or the
        cancellation) once the settlement is left to the background.
        """
        within = self._time_left()
        if within <= 0.0:
            self._settle_later(settlement)
            raise self._unavailable(settlement.what, _DEADLINE_PASSED)
        try:
            return await self._eval(
                settlement.script, settlement.keys, settlement.args, within=within
            )
        except _UNAVAILABLE as exc:
            self._settle_later(settlement)
            raise self._unavailable(settlement.what, exc, within) from exc
        except Exception:
            raise  # a bug, not Redis being away: sending it again would not help
        except BaseException:
            self._settle_later(settlement)  # cancelled: it may have reached Redis
            raise

    async def _take(
        self,
        what: str,
        script: Script,
        keys: Callable[[str], tuple[str, ...]],
        args: Callable[[str, int], tuple[Any, ...]],
        give_back: Callable[[tuple[str, ...], str, int, float], _Settlement],
    ) -> tuple[Any, str]:
        """Run ``script``, which takes something (a claim, a permit) for a fresh token.

        ``keys(token)`` and ``args(token, not_after)`` make the request; the
        script answers ``[status, Redis's time in ms, ...]``, or ``["late",
        ...]`` when it ran too late to take anything. If the request fails
        or is cancelled after it may have reached Redis, ``give_back(keys,
        token, not_after, last)`` is sent from the background (see
        `_not_after` for ``last``). Returns the reply and the token; raises
        `StoreUnavailable` if Redis cannot be reached.
        """
        for _ in range(2):
            token = secrets.token_hex(16)
            names = keys(token)
            not_after, last = self._not_after(_clock.now())
            try:
                reply = await self._eval(script, names, args(token, not_after))
            except BaseException as exc:
                unavailable = isinstance(exc, Exception) and _is_unavailable(exc)
                if not isinstance(exc, Exception) or (unavailable and not _never_sent(exc)):
                    self._settle_later(give_back(names, token, not_after, last))
                if unavailable:
                    raise self._unavailable(what, exc) from exc
                raise
            self._learn_clock(reply[1])
            if reply[0] != b"late":
                return reply, token
            # Taken for a late request, though Redis answered in time: its
            # clock moved. Learnt now: ask again, once.
        raise self._unavailable(what, TimeoutError("Redis's clock keeps moving"))

    # -- circuit breakers: the CircuitStore protocol -----------------------------

    def _circuit(self, name: str) -> _Circuit:
        circuit = self._circuits.get(name)
        if circuit is None:
            key = f"{self._prefix}circuit:{_digest(name)}"
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
        """See `CircuitStore.transition`: one script, published to every replica."""
        circuit = self._circuit(key)
        self._follow_soon()
        if self._assignments:
            await self._flush_assignments()
        opening = state is _OPEN
        reply = await self._eval(
            _redis_scripts.TRANSITION,
            (circuit.key, circuit.trials),
            (
                expected_version,
                "open" if opening else "closed",
                _ms("open_for", open_for) if opening and open_for > 0 else 0,
                circuit.channel,
                circuit.name,
            ),
        )
        record = _record(*reply)
        self._learn(circuit, record)
        return record

    async def acquire_trial(self, key: str, version: int, limit: int) -> CircuitRecord | None:
        """See `CircuitStore.acquire_trial`: permits are counted fleet-wide and lapse.

        The permit is named by a token of this store's choosing; a request
        that fails or is cancelled after it may have reached Redis has its
        token given back in the background (see "Nothing left behind").
        """
        circuit = self._circuit(key)
        self._follow_soon()
        if self._assignments:
            await self._flush_assignments()
        lease_ms = _ms("trial_lease", self._trial_lease)
        reply, token = await self._take(
            "trial permit",
            _redis_scripts.ACQUIRE_TRIAL,
            lambda token: (circuit.key, circuit.trials, _void_key(circuit.key, token)),
            lambda token, not_after: (version, limit, lease_ms, token, not_after),
            lambda keys, token, not_after, last: _Settlement(
                "trial permit given back",
                _redis_scripts.RELEASE_TRIAL,
                keys,
                (version, "0", token, not_after + 1000),
                last + self._trial_lease,
            ),
        )
        if reply[0] == b"granted":
            circuit.permits = [p for p in circuit.permits if p[0] == version]
            circuit.permits.append((version, token))
            return None
        record = _record(*reply[2:6])
        self._learn(circuit, record)
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
            _redis_scripts.RELEASE_TRIAL,
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
        return int(
            await self._eval(settlement.script, settlement.keys, settlement.args, within=within)
        )

    def assign(self, key: str, state: CircuitState) -> None:
        """See `CircuitStore.assign`: written by the background task, in order.

        The task (started if need be) keeps pending writes, in order, until
        Redis takes them; every breaker sharing ``key`` then gets the new
        record. A `transition` or trial request of this store writes pending
        ones first, so that it never acts on a state they replace.
        """
        self._assignments.append((self._circuit(key), _OPEN if state is _OPEN else _CLOSED))
        self._kick()

    async def _flush_assignments(self) -> None:
        """Write pending `assign` calls, in order (a failure leaves the rest pending)."""
        lock = self._assign_lock
        if lock is None:
            lock = self._assign_lock = asyncio.Lock()
        async with lock:
            while self._assignments:
                circuit, state = self._assignments[0]
                reply = await self._eval(
                    _redis_scripts.ASSIGN,
                    (circuit.key, circuit.trials),
                    ("open" if state is _OPEN else "closed", circuit.channel, circuit.name),
                )
                self._assignments.popleft()
                self._learn(circuit, _record(*reply))

    def _learn(self, circuit: _Circuit, record: CircuitRecord) -> None:
        """Keep ``record`` if it is the newest known, and push it to the listeners."""
        if record.version >= circuit.record.version:
            circuit.record = record
            circuit.learned_at = _now_or_none()
        circuit.push(record)

    async def _read_circuits(self, circuits: Sequence[_Circuit]) -> None:
        for start in range(0, len(circuits), _READ_BATCH):
            batch = circuits[start : start + _READ_BATCH]
            reply = await self._eval(_redis_scripts.READ_CIRCUITS, [c.key for c in batch], ())
            for i, circuit in enumerate(batch):
                self._learn(circuit, _record(*reply[4 * i : 4 * i + 4]))

    # -- idempotency: the IdempotencyStore protocol ----------------------------------

    def _record_key(self, scope: str, key: str) -> str:
        return f"{self._prefix}idem:{_digest(f'{len(scope)}:{scope}{key}')}"

    async def claim(
        self, scope: str, key: str, *, fingerprint: str | None, lease: float
    ) -> Lease | Completed | InFlight:
        """See `IdempotencyStore.claim`: one script, one round trip.

        Raises `StoreUnavailable` if Redis cannot be reached (or, with
        ``on_unavailable="bypass"``, returns a lease that holds nothing: the
        call runs, and nothing is stored). A claim that fails or is cancelled
        after it may have reached Redis is given back in the background
        (see "Nothing left behind").
        """
        lease_ms = _ms("lease", lease)
        name = self._record_key(scope, key)
        flag = "0" if fingerprint is None else "1"
        mark = b"" if fingerprint is None else _bytes(fingerprint)
        try:
            reply, token = await self._take(
                "claim",
                _redis_scripts.CLAIM,
                lambda token: (name, _void_key(name, token)),
                lambda token, not_after: (token, flag, mark, lease_ms, not_after),
                lambda keys, token, not_after, last: _Settlement(
                    "claim given back",
                    _redis_scripts.RELEASE,
                    keys,
                    (token, name, not_after + 1000),
                    last + lease,
                ),
            )
        except StoreUnavailable:
            if self._on_unavailable == "bypass":
                return Lease(scope, key, fingerprint, "", None)
            raise
        status = reply[0]
        if status == b"leased":
            return Lease(scope, key, fingerprint, token, lease)
        if status == b"done":
            return Completed(self._decode(reply[3], scope), _text(reply[2]))
        return InFlight(_text(reply[2]))

    def _decode(self, data: Any, scope: str) -> Any:
        try:
            return self._codec.decode(bytes(data))
        except Exception as exc:
            raise ValueError(
                f"Redis store {self._name!r}: a stored result of {scope!r} cannot be decoded "
                f"by {self._codec!r} (written by another codec, or tampered with): {exc}"
            ) from exc

    async def complete(self, lease: Lease, value: Any, *, ttl: float) -> bool:
        """See `IdempotencyStore.complete`; wakes the key's waiters by pub/sub.

        Waits for Redis for at most ``timeout`` seconds, or until the
        ambient deadline, whichever is nearer (a caller's shield does not
        lift that bound). If Redis has not answered by then, the result is
        stored in the background as soon as it does, while the lease holds,
        and this returns False: the call has run, its caller gets its
        result, and its retries get it too once it is stored.
        """
        payload = self._codec.encode(value)  # before any I/O: a TypeError keeps the claim
        ttl_ms = _ms("ttl", ttl)
        if not lease.token:
            return False  # bypassed: this lease never held the key
        name = self._record_key(lease.scope, lease.key)
        try:
            stored = await self._settle(
                _Settlement(
                    "result stored",
                    _redis_scripts.COMPLETE,
                    (name,),
                    (lease.token, payload, ttl_ms, name),
                    _clock.now() + (lease.duration or 0.0),
                )
            )
        except StoreUnavailable:
            return False
        return bool(stored)

    async def release(self, lease: Lease) -> None:
        """See `IdempotencyStore.release`.

        Waits for Redis for at most ``timeout`` seconds, or until the
        ambient deadline, whichever is nearer; if Redis has not answered by
        then, the key is released in the background as soon as it does, and
        this raises `StoreUnavailable` (which the policies log).
        """
        if not lease.token:
            return
        name = self._record_key(lease.scope, lease.key)
        await self._settle(
            _Settlement(
                "claim released",
                _redis_scripts.RELEASE,
                (name, _void_key(name, lease.token)),
                (lease.token, name, 0),
                _clock.now() + (lease.duration or 0.0),
            )
        )

    async def renew(self, lease: Lease) -> bool:
        """See `IdempotencyStore.renew`; raises `StoreUnavailable` if Redis cannot be reached."""
        if not lease.token or lease.duration is None:
            return False
        name = self._record_key(lease.scope, lease.key)
        try:
            held = await self._eval(
                _redis_scripts.RENEW, (name,), (lease.token, _ms("lease", lease.duration))
            )
        except _UNAVAILABLE as exc:
            raise self._unavailable("renew", exc) from exc
        return bool(held)

    async def wait(self, scope: str, key: str, *, timeout: float) -> Completed | None:
        """See `IdempotencyStore.wait`: woken by pub/sub, and when the lease lapses.

        Looks at the record again at least every second, in case a
        notification was lost. Raises `StoreUnavailable` if Redis cannot be
        reached (returns None with ``on_unavailable="bypass"``).
        """
        name = self._record_key(scope, key)
        end = _clock.now() + timeout
        watch = self._watch(name)
        try:
            if not watch.confirmed:
                subscribed = watch.changed.arm()
                if not watch.confirmed:
                    await watch.changed.wait(subscribed, min(timeout, self._timeout))
            while True:
                changed = watch.changed.arm()
                try:
                    reply = await self._eval(_redis_scripts.PEEK, (name,), ())
                except _UNAVAILABLE as exc:
                    if self._on_unavailable == "bypass":
                        return None
                    raise self._unavailable("wait", exc) from exc
                if reply is None:
                    return None
                if reply[0] == b"done":
                    return Completed(self._decode(reply[2], scope), _text(reply[1]))
                left = end - _clock.now()
                if left <= 0:
                    return None
                lease_left = int(reply[2]) / 1000.0
                pause = min(
                    left,
                    lease_left + 0.001 if lease_left > 0 else 0.001,
                    _SAFETY_POLL if watch.confirmed else _UNCONFIRMED_POLL,
                )
                await watch.changed.wait(changed, pause)
        finally:
            self._unwatch(name, watch)

    def _watch(self, name: str) -> _Watch:
        watch = self._watches.get(name)
        if watch is None:
            watch = self._watches[name] = _Watch(confirmed=name in self._confirmed)
            self._kick()
        watch.count += 1
        return watch

    def _unwatch(self, name: str, watch: _Watch) -> None:
        watch.count -= 1
        if watch.count == 0 and self._watches.get(name) is watch:
            del self._watches[name]
            self._wake.fire()  # to unsubscribe; a stopped follower stays stopped

    # -- the follower: pub/sub, reconciliation, background writes ------------------

    async def _follow(self) -> None:
        """Run sessions with Redis until cancelled, reconnecting after failures."""
        delay = _RECONNECT_MIN
        while True:
            began = _clock.now()
            try:
                await self._session()
            except Exception as exc:  # noqa: BLE001 - logged; the follower must go on
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
                    pubsub = self._pubsub = self._client.pubsub()
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
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    async with _within(self._timeout):
                        await pubsub.aclose()

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
                    record = _record(*(data.encode() if isinstance(data, str) else data).split())
                except (TypeError, ValueError):
                    # Not one of ours: someone else published on the channel.
                    _log.warning("Redis store %r: ignored a message %r", self._name, data)
                    return
                self._learn(circuit, record)
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

    def __repr__(self) -> str:
        state = "following" if self._task is not None and not self._task.done() else "idle"
        return (
            f"<RedisStore {self._name!r} prefix={self._prefix!r}: {len(self._circuits)} "
            f"circuits, {state}>"
        )


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end.

    Cancelled again and again: on Python 3.11, ``asyncio.wait_for`` (which
    redis-py uses for socket writes) swallows a cancellation that arrives
    just as the write completes, and the task would go on.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)


def _ours(task: asyncio.Task[Any]) -> bool:
    """Is ``task`` on the running loop (not on one that is gone)?"""
    try:
        return task.get_loop() is asyncio.get_running_loop()
    except RuntimeError:
        return False


def _now_or_none() -> float | None:
    try:
        return _clock.now()
    except RuntimeError:
        return None


def _raise_if_trio() -> None:
    trio = sys.modules.get("trio")
    if trio is None:
        return
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return
    raise RuntimeError(
        "stalwart.redis.RedisStore runs on asyncio (redis-py's asyncio client), not on trio"
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _leaves(exc: BaseException) -> Iterable[BaseException]:
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple):  # an exception group (from a task group)
        for one in inner:
            yield from _leaves(one)
    else:
        yield exc


def _leaf(exc: BaseException) -> BaseException:
    return next(iter(_leaves(exc)), exc)


def _is_unavailable(exc: BaseException) -> bool:
    return all(isinstance(one, _UNAVAILABLE) for one in _leaves(exc))


def _never_sent(exc: BaseException) -> bool:
    """Did ``exc`` come from a connection refused, so the request never left this process?

    Then there is nothing to give back. (redis-py wraps the socket's error
    in its own ``ConnectionError``, raised while handling it.)
    """
    seen: BaseException | None = _leaf(exc)
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, (ConnectionRefusedError, socket.gaierror)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
