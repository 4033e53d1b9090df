"""Bounded concurrency with a bounded FIFO queue, in one process or across a fleet.

With ``store=``, the limit is the fleet's: permits are leased from the store
by a task of the bulkhead's own (`_Permits`), in batches while the fleet is
far from its limit, and handed to calls without a round trip (see
`Bulkhead`, "Fleet-wide").
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, NoReturn, ParamSpec, Protocol, TypeVar, final

import anyio

from . import _clock, _validate
from ._background import spawn
from ._deadline import current_deadline
from ._errors import BulkheadFullError, StoreUnavailable
from ._gauges import LiveMetrics, live_gauge, refuse
from ._metrics import MetricFamily
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry
from ._waiters import WaitQueue

__all__ = ["Bulkhead", "BulkheadStatistics", "PermitGrant", "PermitStore"]

P = ParamSpec("P")
T = TypeVar("T")

#: The default ``lease`` of a fleet-wide bulkhead's permits, in seconds.
DEFAULT_LEASE: Final = 10.0

# A process waiting for permits of a full fleet asks again this often
# (doubling up to the maximum while the fleet stays full).
_POLL: Final = 0.02
_POLL_MAX: Final = 0.2
# While its store cannot be reached, a bulkhead asks again after this long,
# doubling up to the maximum (as `RateLimiter` does).
_STORE_RETRY: Final = 0.25
_STORE_RETRY_MAX: Final = 5.0
# However close a waiting call's deadline, the store gets this long to answer
# before the bulkhead decides alone.
_STORE_MIN_BOUND: Final = 0.05

_log = logging.getLogger("stalwart")


@final
@dataclass(frozen=True, slots=True)
class PermitGrant:
    """What a `PermitStore` answers."""

    #: permits taken (< 0: given back)
    granted: int
    #: permits the process holds now (0 if its lease had lapsed)
    held: int
    #: permits the whole fleet holds now
    total: int
    #: processes holding or waiting for permits (this one included), >= 1
    contenders: int = 1
    #: another process waits for permits: keep no more than a fair share
    others_waiting: bool = False


class PermitStore(Protocol):
    """Where a fleet-wide bulkhead's permits live (`stalwart.redis.RedisStore` is one)."""

    @property
    def timeout(self) -> float:
        """Seconds a request to the store may take."""

    async def adjust_permits(
        self,
        bulkhead: str,
        member: str,
        delta: int,
        *,
        extra: int,
        limit: int,
        far: int,
        lease: float,
        within: float,
    ) -> PermitGrant:
        """Change what ``member`` holds of ``bulkhead``'s ``limit`` permits, and renew its lease.

        ``delta`` > 0 asks for that many more (granted as far as the limit
        allows, plus ``extra`` when all were granted and the fleet then
        holds at most ``far``); < 0 gives that many back; 0 only renews.
        The member's permits lapse ``lease`` seconds after its last request.
        Raises `StoreUnavailable` when the store does not answer within
        ``within`` seconds (and its own timeout).
        """


@final
@dataclass(frozen=True, slots=True)
class BulkheadStatistics:
    """A snapshot of a `Bulkhead`."""

    max_concurrent: int
    max_queued: int | None
    in_flight: int
    queued: int
    #: a fleet-wide bulkhead: the permits this process holds (None: in-process)
    held: int | None = None
    #: a fleet-wide bulkhead: the permits the fleet held, as of the last reply
    fleet_held: int | None = None
    #: a fleet-wide bulkhead: deciding on ``local_limit`` (its store is away)
    degraded: bool = False


class BulkheadMetrics(LiveMetrics["Bulkhead"]):
    """A `Bulkhead`'s: its rejections, and its occupancy read from the live bulkheads."""

    __slots__ = ("store_unavailable",)
    store_unavailable: int

    families = (
        live_gauge(
            "stalwart_bulkhead_in_flight",
            "Calls running inside a bulkhead.",
            lambda bulkhead: bulkhead.in_flight,
        ),
        live_gauge(
            "stalwart_bulkhead_queued",
            "Calls waiting for a bulkhead slot.",
            lambda bulkhead: bulkhead.queued,
        ),
        MetricFamily(
            "stalwart_bulkhead_rejected", "counter", "Calls a bulkhead turned away.", "rejected"
        ),
        MetricFamily(
            "stalwart_bulkhead_store_unavailable",
            "counter",
            "Requests of a fleet-wide bulkhead to its store that failed (it then decides on "
            "its local limit).",
            "store_unavailable",
        ),
    )


@final
class Bulkhead(Policy):
    """Run at most ``max_concurrent`` calls at once; queue a bounded few more.

    A call that finds every slot taken waits in FIFO order, if fewer than
    ``max_queued`` calls are already waiting (``None``: no limit), for at most
    ``max_wait`` seconds (``None``: as long as its deadline allows). Anything
    else fails at once with `BulkheadFullError`, which is the point: a slow
    dependency then costs a bounded number of tasks, not the whole service.

    A freed slot goes straight to the longest waiter, so newcomers never jump
    the queue. Slots are given back whatever happens: success, error,
    cancellation, or cancellation while still queued.

    **Fleet-wide.** With ``store=RedisStore(...)``, bulkheads of the same
    ``name`` on every process share one limit: at most ``max_concurrent``
    calls run at once in the whole fleet. Each process leases permits from
    the store, from a task of its own, and hands them to its calls without
    a round trip: while the fleet holds at most half its limit, a process
    asks for ``batch`` permits more than it needs and keeps up to ``batch``
    spare, so that most calls cost no round trip at all; nearer the limit it
    takes permits one call at a time and gives each back when its call ends
    (from the background: a call never waits for a give-back). A call that
    finds no permit waits while its process asks the store (one round
    trip), then as above: queued, or refused. The queue is FIFO within a
    process; across processes, a process whose calls wait asks again every
    20 ms to 200 ms, and while any process waits, each keeps no more than
    its share of the limit (divided by the processes holding or waiting
    for permits): a finishing call's permit above that share goes back to
    the fleet instead of to the next call in its own queue. Give every
    process the same ``max_concurrent`` and ``lease``.

    A process holds its permits under a lease of ``lease`` seconds, renewed
    every third of it while it holds any; an idle process gives its spare
    permits back at the next renewal. A process that dies or hangs stops
    renewing: its permits return to the fleet when its lease lapses. The
    limit holds exactly while every process can reach the store; the fleet
    can exceed it only when a process keeps running calls after its lease
    lapsed (it could not renew for ``lease`` seconds: a partition, or a
    process paused that long), by that process's calls, until they end.

    While the store cannot be reached (it does not answer within its
    ``timeout``, nor before the process's lease lapses, nor within half the
    time left before the deadline of the earliest waiting call; never in
    less than 50 ms), each process decides on ``local_limit`` alone:
    the fleet then runs up to ``local_limit`` calls per process. Failed
    requests are counted in ``stalwart_bulkhead_store_unavailable_total``
    and the store logs the outage once; the bulkhead asks again a quarter of
    a second later (doubling up to 5 s) and rejoins the fleet by itself,
    taking permits for the calls it runs.

    Args:
        max_concurrent: calls allowed to run at once, >= 1 (with a store:
            in the whole fleet).
        max_queued: calls allowed to wait for a slot, >= 0 (``None``: no
            limit); per process.
        max_wait: seconds a call may wait for a slot, >= 0 (``None``: until
            its deadline, if any; ``0``: never wait).
        store: where a fleet-wide limit lives (a `stalwart.redis.RedisStore`),
            or None: in this process.
        lease: seconds a fleet-wide bulkhead's permits outlive their
            process, > 0 (default 10). Needs ``store``.
        batch: permits a process takes ahead while the fleet is far from
            its limit, >= 0 (default: a sixteenth of ``max_concurrent``,
            at least 1). Needs ``store``.
        local_limit: calls each process may run while its store cannot be
            reached, >= 1 (default ``max_concurrent``). Needs ``store``.
        name: the ``policy`` label of its metrics and attribute of its spans
            (with a store, also which limit of the store this is).
        telemetry: where it reports (``None``: the default `Telemetry`).

    Example::

        @sw.Bulkhead(8, max_queued=32, max_wait=0.5)
        async def render_pdf(doc_id: str) -> bytes: ...

        @sw.Bulkhead(40, max_wait=2.0, store=store, name="ledger")  # 40 in the fleet
        async def post_entry(entry: dict[str, str]) -> None: ...
    """

    kind = "bulkhead"
    metrics_type = BulkheadMetrics
    _metrics: BulkheadMetrics
    _decorator_call = "Bulkhead(max_concurrent)"
    __slots__ = ("_allowed", "_fleet", "_in_flight", "_max", "_max_queued", "_max_wait", "_queue")

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_queued: int | None = 0,
        max_wait: float | None = None,
        store: PermitStore | None = None,
        lease: float | None = None,
        batch: int | None = None,
        local_limit: int | None = None,
        name: str = "bulkhead",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry, shared_state=store)
        self._max = _validate.count("max_concurrent", max_concurrent)
        self._max_queued = _validate.optional_count("max_queued", max_queued, minimum=0)
        self._max_wait = _validate.optional_duration("max_wait", max_wait)
        self._in_flight = 0
        self._queue = WaitQueue()
        # The fast path's limit: max_concurrent; with a store, the permits
        # this process holds (or local_limit while the store is away).
        self._allowed = self._max
        self._fleet: _Permits | None = None
        if store is None:
            for param, value in (("lease", lease), ("batch", batch), ("local_limit", local_limit)):
                if value is not None:
                    raise ValueError(f"{param} needs a store: it configures a fleet-wide limit")
        else:
            if not (
                callable(getattr(store, "adjust_permits", None))
                and isinstance(getattr(store, "timeout", None), (int, float))
            ):
                raise TypeError(
                    "store must be a stalwart.redis.RedisStore (or another PermitStore) or None, "
                    f"not {type(store).__name__}"
                )
            lease = DEFAULT_LEASE if lease is None else lease
            lease = _validate.stored_duration(
                "lease", _validate.duration("lease", lease, positive=True), store
            )
            if batch is None:
                batch = max(1, math.ceil(self._max / 16))
            batch = _validate.count("batch", batch, minimum=0)
            local = self._max if local_limit is None else local_limit
            local = _validate.count("local_limit", local)
            self._fleet = _Permits(self, store, lease, batch, local)
            self._allowed = 0
        self._metrics.live.add(self)

    @property
    def max_concurrent(self) -> int:
        """Calls allowed to run at once (with a store: in the whole fleet)."""
        return self._max

    @property
    def max_queued(self) -> int | None:
        """Calls allowed to wait for a slot (None: no limit)."""
        return self._max_queued

    @property
    def max_wait(self) -> float | None:
        """Seconds a call may wait for a slot (None: no limit of its own)."""
        return self._max_wait

    @property
    def store(self) -> PermitStore | None:
        """Where a fleet-wide limit lives (None: in this process)."""
        fleet = self._fleet
        return None if fleet is None else fleet.store

    @property
    def in_flight(self) -> int:
        """Calls running now (slots taken), in this process."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now, in this process."""
        return self._queue.queued

    def statistics(self) -> BulkheadStatistics:
        """A snapshot of the limits and of the calls running and waiting now."""
        fleet = self._fleet
        if fleet is None:
            return BulkheadStatistics(
                self._max, self._max_queued, self._in_flight, self._queue.queued
            )
        return BulkheadStatistics(
            self._max,
            self._max_queued,
            self._in_flight,
            self._queue.queued,
            fleet.held,
            fleet.fleet_held,
            fleet.degraded,
        )

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        call: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        # The wrapper closes over what a call that finds a free slot uses, and
        # reaches the rest through `bulkhead`: each name it closes over is
        # copied into every call's frame (the "Bulkhead, uncontended" row).
        waiters = self._queue.waiters
        bulkhead, metrics, fleet = self, self._metrics, self._fleet
        slot, timer = self._telemetry.provider_slot, self.timer()

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await bulkhead.in_span(plain, args, kwargs)
                start = None if timer is None else timer()
                # While any caller waits, every slot is taken (a freed slot is
                # handed over, not released): this check alone keeps FIFO order.
                if bulkhead._in_flight < bulkhead._allowed:
                    bulkhead._in_flight += 1
                else:
                    await bulkhead._acquire(start)
                try:
                    result = await (call(*args, **kwargs) if kwargs else call(*args))
                except BaseException as exc:
                    metrics.failed(exc, start)
                    raise
                finally:
                    if waiters:
                        bulkhead._hand_over()
                    else:
                        bulkhead._in_flight -= 1
                        # (More spare permits than it keeps: give some back.)
                        if (
                            fleet is not None
                            and fleet.held - bulkhead._in_flight > fleet.spare_limit
                        ):
                            fleet.wake()
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return guarded

        return self.build(make, binding)

    async def _acquire(self, start: float | None) -> None:
        """Wait for a slot, or raise `BulkheadFullError` (the call's outcome is counted here)."""
        fleet = self._fleet
        try:
            if fleet is None:
                admitted = await self._queue.enter(
                    self._max_queued, self._max_wait, self._hand_over
                )
            else:
                admitted = await fleet.admit(self._max_queued, self._max_wait)
        except BaseException as exc:
            self._metrics.failed(exc, start)
            raise
        if not admitted:
            self._reject(start)

    def _hand_over(self) -> None:
        """Give a finishing call's slot to the longest waiter, else free it.

        A fleet-wide bulkhead that runs more calls than it holds permits
        (it lost some with its lease) frees the slot instead.
        """
        if self._in_flight > self._allowed or not self._queue.grant():
            self._in_flight -= 1
            fleet = self._fleet
            if fleet is not None and fleet.held - self._in_flight > fleet.spare_limit:
                fleet.wake()

    def _reject(self, start: float | None) -> NoReturn:
        queued = self._queue.queued
        waiting = f"{queued} call{'' if queued == 1 else 's'} queued"
        fleet = self._fleet
        if fleet is None:
            taken = f"slot{'' if self._max == 1 else 's'} taken"
            message = f"bulkhead {self._name!r} is full: {self._in_flight} of {self._max} {taken}"
        elif fleet.degraded:
            message = (
                f"bulkhead {self._name!r} is full: its store is away, and this process runs "
                f"{self._in_flight} of the {fleet.local_limit} calls it may run alone"
            )
        else:
            message = (
                f"bulkhead {self._name!r} is full: the fleet's limit of {self._max} is reached "
                f"({self._in_flight} running here)"
            )
        message = f"{message}, {waiting}"
        refuse(self, start, "bulkhead_full", None, BulkheadFullError(message, policy=self._name))

    def __repr__(self) -> str:
        fleet = self._fleet
        shared = (
            ""
            if fleet is None
            else f", store={fleet.store!r}, lease={fleet.lease:g}, batch={fleet.batch}, "
            f"local_limit={fleet.local_limit}"
        )
        return (
            f"Bulkhead({self._max}, max_queued={self._max_queued}, max_wait={self._max_wait}"
            f"{shared}, name={self._name!r})"
        )


@final
class _Permits:
    """A fleet-wide bulkhead's permits: leased from its store by a task of its own (the keeper).

    Only the keeper talks to the store, one request at a time, and only it
    changes ``held``; calls read ``bulkhead._allowed`` (``held``, or
    ``local_limit`` while degraded) on the fast path. A call that finds no
    permit wakes the keeper and waits: in the bulkhead's queue (FIFO) if it
    may queue, else for the keeper's next reply (``asking``).
    """

    __slots__ = (
        "asking",
        "batch",
        "bulkhead",
        "degraded",
        "earliest",
        "fleet_held",
        "full_until",
        "held",
        "lease",
        "lease_until",
        "local_limit",
        "member",
        "reply",
        "retry_delay",
        "share",
        "spare_limit",
        "store",
        "task",
        "wakeup",
    )

    def __init__(
        self, bulkhead: Bulkhead, store: PermitStore, lease: float, batch: int, local_limit: int
    ) -> None:
        self.bulkhead = bulkhead
        self.store = store
        self.lease = lease
        self.batch = batch
        self.local_limit = local_limit
        self.member = secrets.token_hex(8)
        self.held = 0
        # When (loop time) the lease of the permits held lapses at the
        # earliest: a lease after the last request the store answered was sent.
        self.lease_until = -math.inf
        self.fleet_held: int | None = None
        # Until when (loop time) the fleet is known to be full: a call that may
        # not wait is refused without asking.
        self.full_until = -math.inf
        self.degraded = False
        # Spare permits the calls leave before they wake the keeper to give
        # some back (what the fast path reads: see `spare`; none while degraded).
        self.spare_limit = 0
        # Permits it may keep: a fair share while other processes wait, else all.
        self.share = bulkhead._max
        self.asking = 0
        # The earliest deadline of the calls waiting for the keeper (loop time).
        self.earliest = math.inf
        self.retry_delay = _STORE_RETRY
        self.task: Any = None
        self.wakeup: anyio.Event | None = None
        # Set when the keeper's next reply (or failure) is in: what askers wait for.
        self.reply: anyio.Event | None = None

    # -- the calls' side -------------------------------------------------------------

    def spare(self) -> int:
        """Permits to keep beyond the calls' needs: a batch while the fleet is far from full."""
        total = self.fleet_held
        if total is None or total > self.bulkhead._max // 2:
            return 0
        return self.batch

    def wake(self) -> None:
        """Have the keeper look at what the calls need now (starting it if need be)."""
        if self.task is None:
            self.task = spawn(self.keep, f"stalwart bulkhead {self.bulkhead.name!r}")
        else:
            wakeup = self.wakeup
            if wakeup is not None:
                wakeup.set()

    async def admit(self, max_queued: int | None, max_wait: float | None) -> bool:
        """A call found no permit: wait for one, as far as the bulkhead's rules allow."""
        bulkhead = self.bulkhead
        queue = bulkhead._queue
        deadline = _deadline_of_call()
        if deadline < self.earliest:
            self.earliest = deadline
        may_queue = (max_queued is None or queue.queued < max_queued) and max_wait != 0.0
        if may_queue:
            self.wake()
            return await queue.wait(max_wait, bulkhead._hand_over)
        if self.degraded or _clock.now() < self.full_until:
            return False  # the fleet is full (as just heard), and the call may not wait
        # It may not queue, but the fleet may have room: wait for one reply.
        reply = self.reply
        if reply is None:
            reply = self.reply = anyio.Event()
        self.asking += 1
        try:
            self.wake()
            with anyio.move_on_after(self.store.timeout * 2.0):
                await reply.wait()
        finally:
            self.asking -= 1
        if queue.queued or bulkhead._in_flight >= bulkhead._allowed:
            return False
        bulkhead._in_flight += 1
        return True

    # -- the keeper --------------------------------------------------------------------

    async def keep(self) -> None:
        """Lease what the calls need, give back what they do not, renew; end when idle."""
        bulkhead = self.bulkhead
        poll = _POLL
        renew_at = _clock.now() + self.lease / 3.0
        try:
            while True:
                in_flight = bulkhead._in_flight
                want = in_flight + bulkhead._queue.queued + self.asking
                held = self.held
                now = _clock.now()
                if not self.degraded and held == 0 and want == 0:
                    return
                # While other processes wait, keep no more than a fair share.
                target = want if self.degraded else min(want, self.share)
                keepable = max(in_flight, target) + self.spare_limit
                if self.degraded or target > held:
                    delta = target - held
                elif now >= renew_at:  # renew; an idle process gives everything back
                    delta = -held if want == 0 else min(0, keepable - held)
                elif held > keepable:
                    delta = keepable - held
                elif want > held:
                    delta = 0  # held back to its share: hear whether the others still wait
                else:
                    await self.sleep(renew_at - now)
                    continue
                if delta < 0:
                    # Not the calls' any more, from now on: the fast path must not take them.
                    self.held += delta
                    bulkhead._allowed = min(self.held, self.share)
                ok = await self.ask(delta)
                renew_at = _clock.now() + self.lease / 3.0
                self.announce()
                if not ok:
                    await anyio.sleep(self.retry_delay)
                    self.retry_delay = min(self.retry_delay * 2.0, _STORE_RETRY_MAX)
                elif bulkhead._in_flight + bulkhead._queue.queued + self.asking > self.held:
                    await anyio.sleep(poll)  # calls wait: ask again soon
                    poll = min(poll * 2.0, _POLL_MAX)
                else:
                    poll = _POLL
        except Exception:  # noqa: BLE001 - a bug in a store: never an error in the calls; logged
            _log.exception("bulkhead %r: its keeper failed", bulkhead.name)
            self.degrade()
            self.announce()
        finally:
            self.task = None

    async def ask(self, delta: int) -> bool:
        """One request to the store; apply its answer, or degrade. False: it failed."""
        bulkhead = self.bulkhead
        store = self.store
        within = store.timeout
        sent = _clock.now()
        left = self.earliest - sent
        if left <= 0.0:
            self.earliest = math.inf  # that call is over (cancelled, or out of time)
        else:
            # Half the time the earliest waiting call has left, so that it
            # can still run on the local limit if the store does not answer;
            # never so little that a healthy store could not.
            within = min(within, max(left / 2.0, _STORE_MIN_BOUND))
        if self.held > 0 and not self.degraded:
            # No longer than its lease holds: a process whose store answers
            # too late (a failover, a stalled Redis) must not go on running
            # calls on permits that lapsed meanwhile (which the others may
            # have taken), but on its local limit.
            within = min(within, max(self.lease_until - sent, _STORE_MIN_BOUND))
        try:
            grant = await store.adjust_permits(
                bulkhead.name,
                self.member,
                delta,
                extra=self.batch,
                limit=bulkhead._max,
                far=bulkhead._max // 2,
                lease=self.lease,
                within=within,
            )
        except StoreUnavailable:
            bulkhead._metrics.store_unavailable += 1
            self.degrade()
            return False
        if not self.degraded and bulkhead._in_flight > grant.held:
            _log.warning(
                "bulkhead %r: this process runs %d calls but holds %d permits (its lease "
                "lapsed): the fleet may run that many calls over its limit until they end",
                bulkhead.name,
                bulkhead._in_flight,
                grant.held,
            )
        self.held = grant.held
        self.lease_until = sent + self.lease
        self.fleet_held = grant.total
        self.full_until = _clock.now() + _POLL if grant.total >= bulkhead._max else -math.inf
        if grant.others_waiting:
            self.share = max(1, math.ceil(bulkhead._max / grant.contenders))
            self.spare_limit = 0
        else:
            self.share = bulkhead._max
            self.spare_limit = self.spare()
        if self.degraded:
            self.degraded = False
            self.retry_delay = _STORE_RETRY
        bulkhead._allowed = min(self.held, self.share)
        self.grant_waiters()
        return True

    def degrade(self) -> None:
        """The store is away: decide on the local limit until it answers again."""
        self.degraded = True
        self.share = bulkhead_max = self.bulkhead._max
        self.spare_limit = bulkhead_max + self.local_limit  # never woken to give back
        self.earliest = math.inf
        self.bulkhead._allowed = self.local_limit
        self.grant_waiters()

    def grant_waiters(self) -> None:
        """Hand the permits now free to the queued calls, longest waiting first."""
        bulkhead = self.bulkhead
        queue = bulkhead._queue
        while bulkhead._in_flight < bulkhead._allowed and queue.waiters:
            bulkhead._in_flight += 1
            if not queue.grant():
                bulkhead._in_flight -= 1
                break
        if not queue.queued and not self.asking:
            self.earliest = math.inf

    def announce(self) -> None:
        """Wake the calls waiting for a reply (they look at what it left them)."""
        reply, self.reply = self.reply, None
        if reply is not None:
            reply.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, or until a call wakes the keeper."""
        wakeup = self.wakeup = anyio.Event()
        with anyio.move_on_after(seconds):
            await wakeup.wait()
        self.wakeup = None


def _deadline_of_call() -> float:
    """When the call must be over: the ambient deadline, or an enclosing cancel scope's."""
    deadline = current_deadline()
    scope = anyio.current_effective_deadline()
    return scope if deadline is None or scope < deadline else deadline
