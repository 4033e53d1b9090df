"""`RedisStore`: its options and lifecycle, over the parts that serve each protocol.

The class is assembled from one part per concern: `_Client` (requests,
errors, give-backs), `_Follower` (pub/sub and reconciliation), `_Circuits`
(the `CircuitStore` protocol) and `_Idempotency` (the `IdempotencyStore`
protocol). What it adds is the user's side: options, properties,
``async with``, `RedisStore.aclose` and `RedisStore.sync`.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import ClassVar, Final, cast, final

from redis.asyncio import RedisCluster

from .. import _clock, _validate
from .._codec import Codec, JSONCodec
from ._budget import _Budgets
from ._bulkhead import _Bulkheads
from ._circuit import _Circuits
from ._client import _UNAVAILABLE, MAX_DURATION, AnyClient
from ._idempotency import OnUnavailable, _Idempotency
from ._rate_limit import _RateLimits

DEFAULT_PREFIX: Final = "stalwart:"
DEFAULT_TIMEOUT: Final = 1.0
DEFAULT_RECONCILE_INTERVAL: Final = 5.0
DEFAULT_TRIAL_LEASE: Final = 30.0


@final
class RedisStore(_Idempotency, _Circuits, _RateLimits, _Budgets, _Bulkheads):
    """Circuit breaker state, rate limits and idempotency records shared through Redis.

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
    * **Rate limiters** (`RateLimiter`) sharing a ``name`` share one limit
      (per key): each call reserves its turn with one Lua script, one round
      trip, on Redis's clock.
    * **Retry budgets** (`RetryBudget`) sharing a ``name`` are one budget:
      each process counts locally and exchanges its counts (and reserves
      its share of the retries left) every ``sync_interval``, one round
      trip, from a task of the budget's own.
    * **Bulkheads** (`Bulkhead`) sharing a ``name`` share one concurrency
      limit: each process leases permits (in batches while the fleet is
      far from its limit) and hands them to its calls without a round
      trip; a dead process's permits lapse with its lease.
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
    the loop ends. The fleet-wide `RetryBudget` and `Bulkhead` of a store
    run tasks of their own, which `aclose` stops too (a bulkhead's permits
    are given back). Either way nothing is left behind: no task, no
    connection, no subscription. Closing is final: a closed store raises
    `RuntimeError`, naming it, at every request (see `aclose` for what
    each policy then does). The store never closes ``client``: that is
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
    * rate limiters decide each call on their own, in-process limit, and
      count it (see `RateLimiter`, "Fleet-wide");
    * retry budgets decide on each process's own window, and bulkheads on
      each process's ``local_limit`` (see `RetryBudget` and `Bulkhead`,
      "Fleet-wide"), and rejoin the fleet when Redis answers again.

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
    idempotency scope and key, ``{prefix}rate:<h>`` (and ``...:<k>`` per
    key) per rate limiter, ``{prefix}budget:{<h>}`` per retry budget and
    ``{prefix}bulkhead:{<h>}`` (and ``...:leases``, ``...:waiting``) per
    bulkhead, where ``<h>`` is 128 bits of SHA-256 of the name (or of the
    scope and key): no user-chosen text reaches a key name, so none can
    collide with or reach into another. Pub/sub channels carry the same
    names. Breaker records never expire (there is one per breaker name);
    idempotency records expire with their lease or TTL; the markers of
    requests given up (``...:void:<token>``) within seconds; rate limit
    buckets when they would be full again; a retry budget a window after
    its last exchange, a bulkhead's records a lease after the last
    request.

    On a Redis Cluster, the digests are hash tags (``{prefix}circuit:{<h>}``,
    ``{prefix}idem:{<h>}``, ...), so that every key one script touches
    shares a slot while records spread over the cluster; on a single Redis
    (and behind Sentinel) the names are as they always were, so that older
    and newer replicas share records during a rolling upgrade.

    **Redis Cluster and Sentinel.** ``client`` may be a
    ``redis.asyncio.RedisCluster``: scripts go to the node serving their
    keys' slot (a node that does not know a script gets it whole, once),
    breaker records are re-read one script per slot, and the pub/sub
    connection is held on any node (a cluster delivers every message to
    every node), moving to the next one when it fails, after which every
    record is re-read. The client that a
    ``redis.asyncio.sentinel.Sentinel`` gives for a primary
    (``master_for``) finds the new primary after a failover by itself. In
    both, while no primary serves, Redis is unavailable (below); writes
    acknowledged just before a primary died and not yet replicated are lost
    with it (Redis replicates asynchronously). See the how-to, "Redis
    Cluster", "Sentinel" and "During a failover".

    **Limits.** Durations kept in Redis (the policies' ``ttl``, ``lease``,
    ``open_for``, and ``trial_lease``) are at most `max_duration` seconds:
    policies given this store check theirs when they are built.

    **Values** cross Redis through ``codec`` (`JSONCodec` by default): never
    pickle. A stored value that does not decode raises `ValueError`; it is
    never executed.

    Args:
        client: a ``redis.asyncio.Redis`` client (any ``decode_responses``)
            of a standalone Redis, the ``master_for()`` client of a
            ``redis.asyncio.sentinel.Sentinel``, or a
            ``redis.asyncio.RedisCluster`` client.
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

    #: ``complete`` and ``release`` of an idempotency record, cancelled, finish
    #: in the background (see `IdempotencyStore`): callers need not shield them.
    settles_in_background: ClassVar[bool] = True

    __slots__ = ("_codec", "_on_unavailable", "_trial_lease")

    def __init__(
        self,
        client: AnyClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        codec: Codec | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        on_unavailable: OnUnavailable = "raise",
        reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL,
        trial_lease: float = DEFAULT_TRIAL_LEASE,
        name: str = "redis",
    ) -> None:
        super().__init__(
            client,
            prefix=prefix,
            timeout=timeout,
            name=name,
            reconcile_interval=reconcile_interval,
        )
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
        self._codec = codec
        self._on_unavailable: OnUnavailable = on_unavailable
        self._trial_lease = _validate.duration(
            "trial_lease", trial_lease, positive=True, maximum=MAX_DURATION
        )

    # -- options ---------------------------------------------------------------

    @property
    def client(self) -> AnyClient:
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

    @property
    def closed(self) -> bool:
        """True once `aclose` was called: the store sends no more requests."""
        return self._closed

    async def __aenter__(self) -> RedisStore:
        """Start following shared breaker state; `aclose` on exit.

        Raises `RuntimeError` if the store is closed.
        """
        if self._closed:
            raise self._closed_error()
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
        """Close the store: stop every task it and its policies run, give back what they hold.

        Stops, and waits for, the follower (it unsubscribes and closes its
        pub/sub connection), the tasks of the fleet-wide policies using the
        store (each `Bulkhead`'s keeper, each `RetryBudget`'s exchanges) and
        the give-backs: those still pending (Redis did not answer), and the
        permits of every fleet-wide bulkhead of this store, get up to
        ``timeout`` seconds; what does not get through then is left to its
        lease. When it returns, no task of the store's is left and none of
        its requests holds a connection of the client. The client itself is
        not closed: it is yours.

        Closing is final, and idempotent (a second call waits for the
        first). From the moment it is called, every request to the store
        raises `RuntimeError` naming it, also for calls in flight (at their
        next request; an idempotency wait at once); a request already sent
        gets its answer. So, after close: breakers go on with their own
        state, as they do when Redis is away; idempotency calls and
        rate-limited calls raise that error; retry budgets and bulkheads
        decide on each process's own limits (a bulkhead that must wait logs
        its keeper's error); ``async with store`` and `sync` raise it.
        """
        closing = self._closing
        if closing is not None:
            await closing.wait()
            return
        self._closed = True
        closing = self._closing = asyncio.Event()
        try:
            self._wake_waiters()
            await self._stop_users()
            await self._stop_following()
            leased, self._leased = self._leased, {}
            for settlement in leased.values():
                self._queue_settlement(settlement)
            await self._stop_giving_back()
        finally:
            closing.set()

    async def sync(self) -> None:
        """Re-read every breaker record this store follows, and push it now.

        Returns once the store is subscribed to every breaker name attached
        so far and each breaker holds Redis's current record: call it after
        building your breakers to serve the first request with the fleet's
        state. On a Redis Cluster it first has the client learn the nodes
        and slots (within ``timeout``, before the rest). Raises
        `StoreUnavailable` if Redis does not answer in time, `RuntimeError` if
        the store is closed.
        """
        if self._closed:
            raise self._closed_error()
        self._follow_soon()
        if self._cluster:
            # Learn the cluster's nodes and slots first, in its own time:
            # the follower's pub/sub connection needs them (it waits for
            # this, the client initialising once).
            try:
                async with asyncio.timeout(self._timeout):
                    await cast(RedisCluster, self._client).initialize()
            except _UNAVAILABLE as exc:
                raise self._unavailable("cluster nodes", exc) from exc
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

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        else:
            state = "following" if self._task is not None and not self._task.done() else "idle"
        return (
            f"<RedisStore {self._name!r} prefix={self._prefix!r}: {len(self._circuits)} "
            f"circuits, {state}>"
        )
