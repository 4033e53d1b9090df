"""Requests to Redis: the client, the store's bound on every request, errors, give-backs.

`_Client` is the part of `RedisStore` that every other part sends its
requests through: it checks the client, runs a script within the store's
``timeout`` (or the ambient deadline), maps Redis being away to
`StoreUnavailable`, takes things for fresh tokens (`_Client._take`) and gives
them back in the background when a request that may have reached Redis fails
(`_Client._settle`, `_Client._settle_later`): see "Nothing left behind" in
`RedisStore`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import re
import secrets
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, cast, final

import redis.asyncio as _aioredis
from redis import exceptions as _rx

from .. import _clock, _validate
from .._deadline import remaining
from .._errors import StoreUnavailable
from ._scripts import Script

_within: Final = asyncio.timeout

#: The longest duration a `RedisStore` keeps in Redis (a TTL, a lease, an
#: open period): 10**12 seconds, some 31,700 years. Redis keeps expiry times
#: as milliseconds in 64-bit integers, and the scripts reckon with Lua's
#: numbers, exact up to 2**53: this keeps every sum exact.
MAX_DURATION: Final = 1e12

_log = logging.getLogger("stalwart.redis")

#: The clients a store takes: redis-py's asyncio client of one Redis (also
#: the one a ``Sentinel`` gives for its master), or of a Redis Cluster.
AnyClient = _aioredis.Redis | _aioredis.RedisCluster


class RedisCannotServe(_rx.ConnectionError):
    """Redis answered that it cannot serve now (BUSY, NOREPLICAS, MISCONF): unavailable.

    redis-py raises those replies as a plain ``ResponseError``, as it does a
    bug's; `_Client._eval` raises this instead (see `_CANNOT_SERVE`).
    """


# Errors that mean "Redis cannot be reached or cannot serve now", as opposed
# to a bug (a script error, a key of the wrong type): the first kind makes a
# store unavailable, the second propagates as it is.
_UNAVAILABLE: Final = (
    _rx.ConnectionError,  # also refused, reset, auth, loading, too many connections,
    # and RedisCannotServe
    _rx.TimeoutError,
    TimeoutError,  # our own bound on every request
    OSError,
    _rx.ReadOnlyError,  # a replica promoted late, or a failover in progress
    _rx.OutOfMemoryError,
    _rx.TryAgainError,  # a cluster slot migrating: a script's keys on two nodes for now
    # A cluster failing over (CLUSTERDOWN, a master down) or one that the
    # client could not follow (MOVED after its retries); and a plain client
    # given a cluster node (MOVED and ASK for keys served elsewhere,
    # CROSSSLOT): the store cannot serve, as with a Redis that is down; the
    # first one is logged with why.
    _rx.ClusterError,
    _rx.AskError,  # MOVED too
    _rx.ClusterCrossSlotError,
    _rx.RedisClusterException,
)
# Error replies by which a Redis that runs says that it cannot serve now, as
# a Redis that is down cannot: it is running a script that went on too long
# (BUSY), it refuses writes for want of replicas (NOREPLICAS, with
# min-replicas-to-write) or because its last snapshot failed (MISCONF, with
# stop-writes-on-bgsave-error). Read from the reply's text, which redis-py
# prefixes with "Command # <n> (...) of pipeline caused error: " when it
# comes from a pipeline (a script loaded again after NOSCRIPT).
_CANNOT_SERVE: Final = re.compile(r"(?:^|caused error: )(BUSY|NOREPLICAS|MISCONF)\b")
_DEADLINE_PASSED: Final = TimeoutError("the ambient deadline has passed")
_CLUSTER_HINT: Final = (
    " (this Redis is a cluster node: give RedisStore a redis.asyncio.RedisCluster client)"
)
_CLUSTER_ERRORS: Final = (
    _rx.ClusterError,
    _rx.AskError,
    _rx.ClusterCrossSlotError,
    _rx.RedisClusterException,
)

# Reconnection delays (the follower's, and the give-backs'): doubling, with
# jitter, up to a cap.
_RECONNECT_MIN: Final = 0.05
_RECONNECT_MAX: Final = 2.0

# A request that takes something (a claim, a trial permit) carries the
# latest time, on Redis's clock, at which it may still run: twice the
# store's timeout after it was sent, plus this margin for clock drift; before
# the store has learnt how Redis's clock differs from its own, a margin of a
# minute (see `_Client._not_after`).
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


class _Client:
    """The client of a `RedisStore`: bounded requests, errors, tokens and give-backs."""

    __slots__ = (
        "_client",
        "_closed",
        "_closing",
        "_cluster",
        "_giver",
        "_healthy",
        "_leased",
        "_name",
        "_pending",
        "_prefix",
        "_skew",
        "_timeout",
        "_told_trio",
        "_users",
    )

    def __init__(self, client: AnyClient, *, prefix: str, timeout: float, name: str) -> None:
        if not isinstance(cast(object, client), (_aioredis.Redis, _aioredis.RedisCluster)):
            raise TypeError(
                "client must be a redis.asyncio.Redis client (redis-py's asyncio API: of a "
                "standalone Redis, or the master_for() of a redis.asyncio.sentinel.Sentinel) "
                "or a redis.asyncio.RedisCluster client, "
                f"not {type(client).__module__}.{type(client).__qualname__}"
            )
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, not {type(prefix).__name__}")
        self._client = client
        self._cluster = isinstance(client, _aioredis.RedisCluster)
        self._prefix = prefix
        self._timeout = _validate.duration("timeout", timeout, positive=True)
        self._name = _validate.name(name)
        self._healthy = True
        self._told_trio = False  # the error of a use from trio was logged
        # Redis's clock minus the loop's, in milliseconds, as last seen in a
        # reply (None: not yet; see `_not_after`).
        self._skew: float | None = None
        # Give-backs, releases and completions waiting for Redis, in order,
        # and the task that sends them (see `_settle_later`).
        self._pending: collections.deque[_Settlement] = collections.deque()
        self._giver: asyncio.Task[None] | None = None
        # The tasks of the policies that talk to the store from a task of
        # their own (a fleet-wide bulkhead's keeper, a retry budget's
        # exchanges): `aclose` stops them (see `_serve_user`).
        self._users: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        # What `aclose` gives back: the bulkhead permits a member of this
        # store may hold, by bulkhead and member (see `_Bulkheads`).
        self._leased: dict[tuple[str, str], _Settlement] = {}
        # Closed (see `RedisStore.aclose`): no more requests, no more tasks;
        # and the event set once the first `aclose` is over.
        self._closed = False
        self._closing: asyncio.Event | None = None

    def _closed_error(self) -> RuntimeError:
        return RuntimeError(
            f"Redis store {self._name!r} is closed: RedisStore.aclose() was called, and a "
            "closed store sends no more requests to Redis"
        )

    def _serve_user(self) -> None:
        """Keep the running task, a policy's own (a keeper, an exchanger), for `aclose` to stop.

        Called by the protocol methods that only such tasks call
        (`adjust_permits`, `exchange_budget`).
        """
        task = asyncio.current_task()
        if task is not None:
            self._users.add(task)

    async def _stop_users(self) -> None:
        """Cancel the tasks of the policies that use the store, and wait for them to end."""
        current = asyncio.current_task()
        users = [t for t in self._users if t is not current and not t.done() and _ours(t)]
        self._users.clear()
        for task in users:
            task.cancel()
        for task in users:
            await _stop(task)

    async def _stop_giving_back(self) -> None:
        """Give pending settlements ``timeout`` seconds more, then stop the task sending them."""
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

    # -- key names ---------------------------------------------------------------

    def _key(self, kind: str, *parts: str) -> str:
        """The name of one record's key: ``<prefix><kind>:<parts joined by ':'>``.

        Every key a script touches is such a name, or one followed by a
        suffix (``:trials``, ``:void:<token>``). On a Redis Cluster the parts
        are a hash tag, ``<prefix><kind>:{<parts>}``, so that a record and
        its suffixed keys share a slot (one script may touch them all) while
        records spread over the cluster. On a single Redis the names stay
        as they always were, so that replicas of an older version, running
        beside newer ones during a rolling upgrade, share the same records.
        ``parts``: digests (hex), never user-chosen text.
        """
        joined = ":".join(parts)
        if self._cluster:
            return f"{self._prefix}{kind}:{{{joined}}}"
        return f"{self._prefix}{kind}:{joined}"

    # -- requests ----------------------------------------------------------------

    async def _eval(
        self,
        script: Script,
        keys: Sequence[str],
        args: Iterable[Any],
        *,
        within: float | None = None,
        closing: bool = False,
    ) -> Any:
        """Run ``script`` (by SHA, loading it on NOSCRIPT), within the store's timeout.

        ``within``: a shorter bound (an ambient deadline's time left).
        ``closing``: a give-back that `aclose` still lets through; any other
        request to a closed store raises `RuntimeError`.
        """
        if self._closed and not closing:
            raise self._closed_error()
        if _clock.asyncio_loop() is None:
            self._refuse_trio()
        try:
            try:
                async with _within(self._timeout if within is None else within):
                    reply = await script.run(self._client, keys, args, cluster=self._cluster)
            except _rx.ResponseError as exc:
                refusal = _cannot_serve(exc)
                if refusal is not None:
                    raise refusal from exc
                if type(exc) is not _rx.ResponseError:
                    raise
                raise self._script_failed(script, keys, exc) from exc
        except _UNAVAILABLE as exc:
            if self._healthy:
                self._healthy = False
                _log.warning(
                    "Redis store %r: Redis unreachable: %s%s",
                    self._name,
                    _describe(exc),
                    self._hint(exc),
                )
            raise
        if not self._healthy:
            self._healthy = True
            _log.info("Redis store %r: Redis reachable again", self._name)
        return reply

    def _script_failed(
        self, script: Script, keys: Sequence[str], exc: _rx.ResponseError
    ) -> _rx.ResponseError:
        """``exc``, an error of ``script``'s, saying which store, script and record it is."""
        where = f" on {keys[0]!r}" if keys else ""
        hint = ""
        if "WRONGTYPE" in str(exc):  # also as a pipeline reports it (after NOSCRIPT)
            hint = (
                " (that key holds something that stalwart did not write: does another "
                f"program use the prefix {self._prefix!r}? Delete the key, or give the store "
                "a prefix of its own)"
            )
        return _rx.ResponseError(
            f"Redis store {self._name!r}: the {script.name} script failed{where}: {exc}{hint}"
        )

    def _refuse_trio(self) -> None:
        """Raise `RuntimeError` if trio runs the calling task (and log it, the first time).

        Logged once, loudly: a breaker keeps its own state when its store
        fails, and would otherwise go on unshared without a word.
        """
        try:
            _raise_if_trio()
        except RuntimeError:
            if not self._told_trio:
                self._told_trio = True
                _log.error(
                    "Redis store %r: used from trio; it runs on asyncio only, so the "
                    "breakers, limits and idempotency records given it are not shared",
                    self._name,
                )
            raise

    def _hint(self, exc: BaseException) -> str:
        """Why a cluster's answer makes a plain client's store unavailable ("" otherwise)."""
        return _CLUSTER_HINT if not self._cluster and isinstance(exc, _CLUSTER_ERRORS) else ""

    def _unavailable(
        self, operation: str, exc: BaseException, within: float | None = None
    ) -> StoreUnavailable:
        reason = (
            f"no answer within {self._timeout if within is None else within:g}s"
            if isinstance(exc, TimeoutError) and not str(exc)
            else _describe(exc)
        )
        reason += self._hint(exc)
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
            skew = (time.time() - sent) * 1000.0  # the wall clock (see also `_redis_now_ms`)
            margin = _UNLEARNT_MARGIN
        else:
            margin = _LATE_MARGIN
        last = sent + 2.0 * self._timeout + margin
        return math.ceil(last * 1000.0 + skew), last

    def _redis_now_ms(self) -> float:
        """Redis's clock now, in ms: as the last reply taught it, else this host's wall clock."""
        if self._skew is None:
            return time.time() * 1000.0
        return _clock.now() * 1000.0 + self._skew

    def _learn_clock(self, server_ms: Any) -> None:
        """Redis said its time was ``server_ms`` just now: keep how its clock differs."""
        self._skew = float(server_ms) - _clock.now() * 1000.0

    def _settle_later(self, settlement: _Settlement) -> None:
        """Send ``settlement`` from the background until Redis takes it (or it is moot).

        Never blocks and never raises: callers run it while they fail or are
        cancelled. Needs the store's running event loop. A closed store
        drops it (the lease frees what it would give back).
        """
        if self._closed:
            _log.debug(
                "Redis store %r: closed; a %s is left to its lease", self._name, settlement.what
            )
            return
        self._queue_settlement(settlement)

    def _queue_settlement(self, settlement: _Settlement) -> None:
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
                await self._eval(settlement.script, settlement.keys, settlement.args, closing=True)
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


def _cannot_serve(exc: _rx.ResponseError) -> RedisCannotServe | None:
    """``exc`` as Redis saying it cannot serve now, or None if it says something else.

    From the reply's text: redis-py before 8 keeps no error code.
    """
    text = str(exc)
    found = _CANNOT_SERVE.search(text)
    if found is None:
        return None
    return RedisCannotServe(text[found.start(1) :])


def _is_unavailable(exc: BaseException) -> bool:
    return all(
        isinstance(one, _UNAVAILABLE)
        or (isinstance(one, _rx.ResponseError) and _cannot_serve(one) is not None)
        for one in _leaves(exc)
    )


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
