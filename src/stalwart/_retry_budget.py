"""A retry budget shared by many calls: retries as a share of traffic.

In one process, or, with ``store=``, across a fleet: every process counts
its own first attempts and retries on the hot path (no round trip), and a
task of its own exchanges them with the store every ``sync_interval``
seconds, one round trip, learning the fleet's totals and how many processes
share them. Between exchanges a process may spend its share of what the
fleet has left (see `RetryBudget`, "Fleet-wide").
"""

from __future__ import annotations

import logging
import math
import secrets
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Protocol, final

import anyio

from . import _clock, _validate
from ._background import spawn
from ._errors import StoreUnavailable
from ._metrics import MetricFamily, PolicyMetrics
from ._telemetry import Telemetry, resolve

__all__ = ["BudgetTotals", "RetryBudget", "RetryBudgetStatistics", "RetryBudgetStore", "charged"]

# The window slides in this many steps: memory and work stay constant, and
# history leaves the window a tenth at a time.
_SLOTS: Final = 10

#: The default ``sync_interval``: half a second, or a tenth of a shorter window.
DEFAULT_SYNC_INTERVAL: Final = 0.5

# A fleet view older than this many sync intervals is stale: the process
# decides on its own window until its next exchange succeeds.
_STALE_AFTER: Final = 3.0

# While its store cannot be reached, a budget asks again after this long,
# doubling up to the maximum (as `RateLimiter` does).
_STORE_RETRY: Final = 0.25
_STORE_RETRY_MAX: Final = 5.0

_log = logging.getLogger("stalwart")


@final
@dataclass(frozen=True, slots=True)
class BudgetTotals:
    """What a `RetryBudgetStore` answers: the fleet's counts over the window."""

    #: first attempts the fleet made in the window
    requests: int
    #: retries the fleet made or reserved in the window
    retries: int
    #: processes that exchanged counts recently (this one included), >= 1
    processes: int
    #: retries reserved for this process until its next exchange
    granted: int


class RetryBudgetStore(Protocol):
    """Where a retry budget shared by many processes lives (`stalwart.redis.RedisStore` is one)."""

    @property
    def timeout(self) -> float:
        """Seconds a request to the store may take."""

    async def exchange_budget(
        self,
        budget: str,
        member: str,
        requests: int,
        retries: int,
        unsent: tuple[int, int],
        *,
        window: float,
        member_ttl: float,
        ratio: float,
        floor: float,
        want: int,
    ) -> BudgetTotals:
        """Add a process's counts to ``budget``'s window, and reserve its next retries.

        ``requests`` and ``retries``: the process's (``member``'s) running
        totals since it started; the store adds what it has not seen of them
        yet, so a request sent twice counts once. ``unsent``: what the
        process has not had acknowledged, added instead when the store no
        longer knows ``member`` (it was quiet for longer than the window).
        The member counts among the processes for ``member_ttl`` seconds.
        The retries reserved at the last exchange are given back (the ones
        made were just counted), and up to ``want`` are reserved anew: at
        most what is left (``ratio`` times the requests plus ``floor``,
        less the retries made or reserved, over the window), and at most
        the member's share of it (divided by the processes, rounded up).
        Counts leave the window ``window`` seconds after they arrived, a
        tenth of it at a time. Raises `StoreUnavailable` when the store does
        not answer in time.
        """


class RetryBudgetMetrics(PolicyMetrics):
    """A fleet-wide `RetryBudget`'s: its exchanges with its store."""

    __slots__ = ("store_unavailable", "syncs")

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.syncs = 0
        self.store_unavailable = 0

    families = (
        MetricFamily(
            "stalwart_retry_budget_syncs",
            "counter",
            "Exchanges of a fleet-wide retry budget's counts with its store.",
            "syncs",
        ),
        MetricFamily(
            "stalwart_retry_budget_store_unavailable",
            "counter",
            "Retries a fleet-wide retry budget decided on its own window: its store did "
            "not answer in time.",
            "store_unavailable",
        ),
    )


#: The budget in which the logical call running in this context has already
#: recorded its request: a `Retry` with a budget sets it around its attempts,
#: so that a `Hedge` inside it drawing on the same budget does not record each
#: retried attempt as a new request (which would earn hedges on retries).
charged: ContextVar[RetryBudget | None] = ContextVar("stalwart_budget_charged", default=None)


@final
@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    """A snapshot of a `RetryBudget`'s window."""

    #: first attempts seen in the window (by this process)
    requests: int
    #: retries made in the window (by this process)
    retries: int
    #: retries that would be allowed now (a fleet-wide budget: this process's share)
    available: int
    #: a fleet-wide budget: the fleet's first attempts in the window, as of the last exchange
    fleet_requests: int | None = None
    #: a fleet-wide budget: the fleet's retries in the window, as of the last exchange
    fleet_retries: int | None = None
    #: a fleet-wide budget: the processes sharing it, as of the last exchange
    processes: int | None = None


@final
class RetryBudget:
    """Caps retries at a share of first attempts, over a sliding window.

    Shared by the `Retry` (and `Hedge`) policies of many calls (Finagle's and
    Envoy's retry budgets): every first attempt earns ``ratio`` retries, and a
    floor of ``min_per_second`` retries per second is always allowed so that
    a quiet service can still retry. A retry the budget denies is simply not made;
    the call fails with its last error.

    Under a total outage, a steady stream of calls makes at most about
    ``1 + ratio`` attempts per call (plus ``min_per_second`` divided by the
    calls per second, for the floor), instead of the ``attempts``-fold load
    amplification that turns a blip into an outage. The floor is available
    from the start: a new budget allows ``min_per_second * window`` retries.

    **Fleet-wide.** With ``store=RedisStore(...)``, budgets of the same
    ``name`` on every process are one budget: the fleet's retries are capped
    at ``ratio`` times the fleet's first attempts plus ``min_per_second *
    window``, the floor shared by the whole fleet. Give every process the
    same ``ratio``, ``min_per_second`` and ``window``. A first attempt and a
    retry cost no round trip: each process counts its own, and a task of
    its own exchanges them with the store every ``sync_interval`` seconds
    (one round trip per process, while it makes calls). Each exchange also
    *reserves* the retries the process may make until the next one: as many
    as it asked for in the last interval (twice, plus one), at most its
    share of what the fleet has left (divided by the processes, rounded
    up), atomically in the store, so the processes' reservations never add
    up to more than the budget, whatever their timing. A process also
    spends ``ratio`` for each of its own first attempts at once (earned,
    so within the budget too). Hence, while the store answers, the fleet's
    retries stay within the budget; the price is on the strict side: a
    process whose need grows waits up to one interval for a larger
    reservation, and each keeps one retry reserved while it runs.

    Until its first exchange (one round trip after its first call), a
    process spends only what its own first attempts earn. A process whose
    store does not answer within the store's ``timeout``, or whose last
    reservation has left the window (it was idle), decides on its own
    window, as an in-process budget does, with its share of the floor
    (divided by the processes it last heard of), until an exchange
    succeeds: while the store cannot be reached, each process allows
    ``ratio`` of its own first attempts and its share of the floor (counted
    in ``stalwart_retry_budget_store_unavailable_total``, and logged once
    per outage by the store); the budget asks the store again a quarter of
    a second later (doubling up to 5 s), and rejoins the fleet by itself.
    A decision never waits for the store. Closing the store
    (`RedisStore.aclose`) stops the budget's task; the budget then decides
    on its own window, as above, and starts no task again.

    Args:
        ratio: retries earned per first attempt, >= 0 (may exceed 1).
        min_per_second: retries always allowed per second, >= 0 (with a
            store, for the whole fleet).
        window: seconds over which attempts are counted, > 0.
        store: where a fleet-wide budget lives (a `stalwart.redis.RedisStore`),
            or None: in this process.
        sync_interval: seconds between a process's exchanges with the store,
            > 0 and at most ``window`` (default: 0.5, or a tenth of a
            shorter window). Needs ``store``.
        name: which budget of the store this is; and, with a store, the
            ``policy`` label of its metrics.
        telemetry: where a fleet-wide budget reports (``None``: the default
            `Telemetry`).

    Example::

        budget = sw.RetryBudget(ratio=0.2)
        fetch_user = sw.Retry(attempts=4, budget=budget)(fetch_user)
        fetch_cart = sw.Retry(attempts=4, budget=budget)(fetch_cart)

        fleet = sw.RetryBudget(ratio=0.1, store=RedisStore(client), name="payments")
    """

    __slots__ = (
        "_fleet",
        "_last",
        "_min_per_second",
        "_name",
        "_ratio",
        "_requests",
        "_retries",
        "_slot_seconds",
        "_total_requests",
        "_total_retries",
        "_window",
    )

    def __init__(
        self,
        ratio: float = 0.1,
        min_per_second: float = 10.0,
        window: float = 10.0,
        *,
        store: RetryBudgetStore | None = None,
        sync_interval: float | None = None,
        name: str = "retry_budget",
        telemetry: Telemetry | None = None,
    ) -> None:
        self._ratio = _validate.number("ratio", ratio)
        self._min_per_second = _validate.number("min_per_second", min_per_second)
        self._window = _validate.duration("window", window, positive=True)
        self._name = _validate.name(name)
        self._slot_seconds = self._window / _SLOTS
        self._requests = [0] * _SLOTS
        self._retries = [0] * _SLOTS
        self._total_requests = 0
        self._total_retries = 0
        self._last: int | None = None
        self._fleet: _Fleet | None = None
        if store is None:
            if sync_interval is not None:
                raise ValueError("sync_interval needs a store: it is how often to exchange counts")
            return
        if not (
            callable(getattr(store, "exchange_budget", None))
            and isinstance(getattr(store, "timeout", None), (int, float))
        ):
            raise TypeError(
                "store must be a stalwart.redis.RedisStore (or another RetryBudgetStore) or "
                f"None, not {type(store).__name__}"
            )
        if sync_interval is None:
            interval = min(DEFAULT_SYNC_INTERVAL, self._window / _SLOTS)
        else:
            interval = _validate.duration(
                "sync_interval", sync_interval, positive=True, maximum=self._window
            )
        registration, _ = resolve(telemetry).register(
            "retry_budget", self._name, RetryBudgetMetrics, state=store
        )
        self._fleet = _Fleet(self, store, interval, registration)

    @property
    def ratio(self) -> float:
        """Retries earned per first attempt."""
        return self._ratio

    @property
    def min_per_second(self) -> float:
        """Retries always allowed per second."""
        return self._min_per_second

    @property
    def window(self) -> float:
        """Seconds over which attempts and retries are counted."""
        return self._window

    @property
    def name(self) -> str:
        """The budget's name (in its store, and as its metrics' ``policy`` label)."""
        return self._name

    @property
    def store(self) -> RetryBudgetStore | None:
        """Where a fleet-wide budget lives (None: in this process)."""
        fleet = self._fleet
        return None if fleet is None else fleet.store

    @property
    def sync_interval(self) -> float | None:
        """Seconds between exchanges with the store (None: no store)."""
        fleet = self._fleet
        return None if fleet is None else fleet.interval

    @property
    def metrics(self) -> RetryBudgetMetrics | None:
        """What a fleet-wide budget counts (None: no store)."""
        fleet = self._fleet
        return None if fleet is None else fleet.metrics

    def _advance(self, now: float) -> int:
        """Expire slots that left the window; return the current slot index."""
        current = math.floor(now / self._slot_seconds)
        last = self._last
        if last != current:
            if last is None or current < last or current - last >= _SLOTS:
                # First use, a new clock (another event loop), or a long pause.
                self._requests = [0] * _SLOTS
                self._retries = [0] * _SLOTS
                self._total_requests = self._total_retries = 0
            else:
                for slot in range(last + 1, current + 1):
                    i = slot % _SLOTS
                    self._total_requests -= self._requests[i]
                    self._total_retries -= self._retries[i]
                    self._requests[i] = self._retries[i] = 0
            self._last = current
        return current % _SLOTS

    def _available(self) -> float:
        floor = self._min_per_second * self._window
        fleet = self._fleet
        if fleet is not None:
            if fleet.totals is not None:
                floor /= fleet.totals.processes  # its share of the fleet's floor
            elif fleet.failing_since is None:
                floor = 0.0  # before its first exchange: only what it earned itself
        return self._ratio * self._total_requests + floor - self._total_retries

    def deposit(self) -> None:
        """Record a first attempt (`Retry` calls this for you)."""
        now = _clock.now()
        i = self._advance(now)
        self._requests[i] += 1
        self._total_requests += 1
        fleet = self._fleet
        if fleet is not None:
            fleet.requests += 1
            fleet.allowance += self._ratio
            if fleet.task is None:
                fleet.start()

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) if spent."""
        now = _clock.now()
        i = self._advance(now)
        fleet = self._fleet
        if fleet is None:
            if self._available() < 1.0:
                return False
        else:
            fleet.demand += 1
            if fleet.task is None:
                fleet.start()
            if now < fleet.fresh_until:  # what the store reserved for this process
                if fleet.allowance < 1.0:
                    return False
                fleet.allowance -= 1.0
            else:
                if self._available() < 1.0:
                    return False
                fleet.decided_alone()
            fleet.retries += 1
        self._retries[i] += 1
        self._total_retries += 1
        return True

    def statistics(self) -> RetryBudgetStatistics:
        """The window's counts as of now (needs a running event loop)."""
        now = _clock.now()
        self._advance(now)
        fleet = self._fleet
        shared: tuple[int | None, int | None, int | None] = (None, None, None)
        if fleet is not None and fleet.totals is not None:
            totals = fleet.totals
            shared = (totals.requests, totals.retries, totals.processes)
        if fleet is None or now >= fleet.fresh_until:
            available = self._available()
        else:
            available = fleet.allowance
        return RetryBudgetStatistics(
            self._total_requests, self._total_retries, max(0, math.floor(available)), *shared
        )

    def __repr__(self) -> str:
        fleet = self._fleet
        shared = "" if fleet is None else f", store={fleet.store!r}, name={self._name!r}"
        return (
            f"RetryBudget(ratio={self._ratio:g}, min_per_second={self._min_per_second:g}, "
            f"window={self._window:g}{shared})"
        )


@final
class _Fleet:
    """A fleet-wide budget's side: its running totals, its share, its exchanges."""

    __slots__ = (
        "acked",
        "allowance",
        "budget",
        "demand",
        "failing_since",
        "fresh_until",
        "interval",
        "member",
        "metrics",
        "registration",
        "requests",
        "retries",
        "retry_delay",
        "store",
        "task",
        "totals",
    )

    def __init__(
        self, budget: RetryBudget, store: RetryBudgetStore, interval: float, registration: Any
    ) -> None:
        self.budget = budget
        self.store = store
        self.interval = interval
        self.registration = registration  # holds the metrics live
        self.metrics: RetryBudgetMetrics = registration.metrics
        # Who this process is to the store, and its running totals (the
        # store adds what it has not seen of them: a repeat counts once).
        self.member = secrets.token_hex(8)
        self.requests = 0
        self.retries = 0
        self.acked = (0, 0)
        # Retries asked for (made or denied) since the last exchange.
        self.demand = 0
        # Retries reserved for this process (and earned since), and until
        # when (loop time) the reservation holds.
        self.allowance = 0.0
        self.fresh_until = -math.inf
        self.totals: BudgetTotals | None = None
        self.failing_since: float | None = None
        self.retry_delay = _STORE_RETRY
        self.task: Any = None

    def start(self) -> None:
        if getattr(self.store, "closed", False):
            # Closed for good (`RedisStore.aclose`): this process decides on
            # its own window from now on, and starts no task.
            self.failing_since = _clock.now()
            self.fresh_until = -math.inf
            return
        self.task = spawn(self.run, f"stalwart retry budget {self.budget.name!r}")

    def decided_alone(self) -> None:
        if self.failing_since is not None:
            self.metrics.store_unavailable += 1

    async def run(self) -> None:
        """Exchange counts every interval while the process makes calls; then end.

        It ends once nothing happened for as long as a view stays fresh
        (`_STALE_AFTER` intervals): the view then goes stale as it ends.
        """
        idle = 0
        try:
            while idle < _STALE_AFTER:
                seen = (self.requests, self.retries)
                delay = await self.exchange()
                await anyio.sleep(delay)
                if (self.requests, self.retries) == seen and self.acked == seen:
                    idle += 1
                else:
                    idle = 0
        except Exception:  # noqa: BLE001 - a bug in a store: never an error in the calls; logged
            if not getattr(self.store, "closed", False):
                _log.exception("retry budget %r: exchange with its store failed", self.budget.name)
            self.failing_since = _clock.now()
            self.fresh_until = -math.inf
        finally:
            self.task = None

    async def exchange(self) -> float:
        """One round trip: send the counts, reserve retries; the seconds until the next."""
        budget = self.budget
        sent = (self.requests, self.retries)
        unsent = (sent[0] - self.acked[0], sent[1] - self.acked[1])
        # Reserve what this process asked for last interval, with room to grow.
        want = 1 + 2 * self.demand
        self.demand = 0
        try:
            totals = await self.store.exchange_budget(
                budget.name,
                self.member,
                sent[0],
                sent[1],
                unsent,
                window=budget.window,
                member_ttl=_STALE_AFTER * self.interval,
                ratio=budget.ratio,
                floor=budget.min_per_second * budget.window,
                want=want,
            )
        except StoreUnavailable:
            now = _clock.now()
            if self.failing_since is None:
                self.failing_since = now
            elif now - self.failing_since >= budget.window:
                # Counts older than the window would leave it at once: drop them.
                self.acked = sent
            self.fresh_until = -math.inf
            delay, self.retry_delay = self.retry_delay, min(self.retry_delay * 2, _STORE_RETRY_MAX)
            return delay
        self.metrics.syncs += 1
        self.acked = sent
        self.failing_since = None
        self.retry_delay = _STORE_RETRY
        self.totals = totals
        # The reservation replaces what was left of the last one; what was
        # earned and spent during the round trip is this process's own.
        since = (self.requests - sent[0], self.retries - sent[1])
        self.allowance = totals.granted + budget.ratio * since[0] - since[1]
        # Reserved in the slot of the window this exchange landed in: it holds
        # until that slot leaves the window.
        self.fresh_until = _clock.now() + budget.window * (1.0 - 1.0 / _SLOTS)
        return self.interval
