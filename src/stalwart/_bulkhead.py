"""Bounded concurrency with a bounded FIFO queue."""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Final, NoReturn, ParamSpec, TypeVar, final

import anyio

from . import _clock, _validate
from ._errors import BulkheadFullError
from ._metrics import MetricFamily, PolicyMetrics
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry, observed
from .events import CallRejected

__all__ = ["Bulkhead", "BulkheadStatistics"]

P = ParamSpec("P")
T = TypeVar("T")

# Abandoned waiters are dropped lazily; rebuild the queue once they are most
# of it, so cancelled callers never pile up.
_COMPACT_AT: Final = 64


@final
@dataclass(frozen=True, slots=True)
class BulkheadStatistics:
    """A snapshot of a `Bulkhead`."""

    max_concurrent: int
    max_queued: int | None
    in_flight: int
    queued: int


class _Waiter:
    """A queued call: woken once, when a slot is handed to it.

    On asyncio it waits on a bare future of the running loop (an
    ``anyio.Event`` costs eight times as much to make, which was most of a
    contended call's cost); elsewhere (trio) on an ``anyio.Event``.
    """

    __slots__ = ("abandoned", "event", "future", "granted")

    def __init__(self) -> None:
        info = _clock.asyncio_loop()
        self.future: asyncio.Future[None] | None = None
        self.event: anyio.Event | None = None
        if info is not None:
            self.future = info.loop.create_future()
        else:
            self.event = anyio.Event()
        self.granted = False
        self.abandoned = False

    def wait(self) -> Awaitable[Any]:
        if self.future is not None:
            return self.future
        assert self.event is not None
        return self.event.wait()

    def wake(self) -> None:
        future = self.future
        if future is None:
            assert self.event is not None
            self.event.set()
        elif not future.done():
            # (Done: cancelled with its task, which has yet to run; being
            # granted, that task hands the slot on.)
            future.set_result(None)


class BulkheadMetrics(PolicyMetrics):
    """A `Bulkhead`'s: its rejections, and its occupancy read from the live bulkheads."""

    exclusive = True
    __slots__ = ("live",)

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.live: weakref.WeakSet[Bulkhead] = weakref.WeakSet()

    def _in_flight(self) -> Iterator[tuple[tuple[()], float]]:
        yield (), sum(b.in_flight for b in list(self.live))

    def _queued(self) -> Iterator[tuple[tuple[()], float]]:
        yield (), sum(b.queued for b in list(self.live))

    families = (
        MetricFamily(
            "stalwart_bulkhead_in_flight", "gauge", "Calls running inside a bulkhead.", _in_flight
        ),
        MetricFamily(
            "stalwart_bulkhead_queued", "gauge", "Calls waiting for a bulkhead slot.", _queued
        ),
        MetricFamily(
            "stalwart_bulkhead_rejected", "counter", "Calls a bulkhead turned away.", "rejected"
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

    Args:
        max_concurrent: calls allowed to run at once, >= 1.
        max_queued: calls allowed to wait for a slot, >= 0 (``None``: no limit).
        max_wait: seconds a call may wait for a slot, >= 0 (``None``: until
            its deadline, if any; ``0``: never wait).
        name: the ``policy`` label of its metrics and attribute of its spans.
        telemetry: where it reports (``None``: the default `Telemetry`).

    Example::

        @sw.Bulkhead(8, max_queued=32, max_wait=0.5)
        async def render_pdf(doc_id: str) -> bytes: ...
    """

    kind = "bulkhead"
    metrics_type = BulkheadMetrics
    _metrics: BulkheadMetrics
    _decorator_call = "Bulkhead(max_concurrent)"
    __slots__ = (
        "_abandoned",
        "_in_flight",
        "_max",
        "_max_queued",
        "_max_wait",
        "_queued",
        "_waiters",
    )

    def __init__(
        self,
        max_concurrent: int,
        *,
        max_queued: int | None = 0,
        max_wait: float | None = None,
        name: str = "bulkhead",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        self._max = _validate.count("max_concurrent", max_concurrent)
        self._max_queued = _validate.optional_count("max_queued", max_queued, minimum=0)
        self._max_wait = _validate.optional_duration("max_wait", max_wait)
        self._in_flight = 0
        self._queued = 0
        self._abandoned = 0
        self._waiters: deque[_Waiter] = deque()
        self._metrics.live.add(self)

    @property
    def max_concurrent(self) -> int:
        """Calls allowed to run at once."""
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
    def in_flight(self) -> int:
        """Calls running now (slots taken)."""
        return self._in_flight

    @property
    def queued(self) -> int:
        """Calls waiting for a slot now."""
        return self._queued

    def statistics(self) -> BulkheadStatistics:
        """A snapshot of the limits and of the calls running and waiting now."""
        return BulkheadStatistics(self._max, self._max_queued, self._in_flight, self._queued)

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        positional: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        limit, waiters, acquire, hand_over = (
            self._max,
            self._waiters,
            self._acquire,
            self._hand_over,
        )
        bulkhead, metrics = self, self._metrics
        slot, span, timer = self._telemetry.provider_slot, self.in_span, self.timer()

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await span(plain, args, kwargs)
                start = None if timer is None else timer()
                # While any caller waits, every slot is taken (a freed slot is
                # handed over, not released): this check alone keeps FIFO order.
                if bulkhead._in_flight < limit:
                    bulkhead._in_flight += 1
                else:
                    await acquire(start)
                try:
                    result = await (fn(*args, **kwargs) if kwargs else positional(*args))
                except BaseException as exc:
                    metrics.failed(exc, start)
                    raise
                finally:
                    if waiters:
                        hand_over()
                    else:
                        bulkhead._in_flight -= 1
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return guarded

        return self.build(make, binding)

    async def _acquire(self, start: float | None) -> None:
        """Wait for a slot, or raise `BulkheadFullError` (the call's outcome is counted here)."""
        max_queued, max_wait = self._max_queued, self._max_wait
        if (max_queued is not None and self._queued >= max_queued) or max_wait == 0.0:
            self._reject(start)
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._queued += 1
        try:
            if max_wait is None:
                await waiter.wait()
            else:
                with anyio.move_on_after(max_wait):
                    await waiter.wait()
        except BaseException as exc:
            if waiter.granted:
                self._hand_over()  # granted as we were cancelled: pass it on
            else:
                self._abandon(waiter)
            self._metrics.failed(exc, start)
            raise
        if not waiter.granted:
            self._abandon(waiter)
            self._reject(start)

    def _hand_over(self) -> None:
        """Give a finishing call's slot to the longest waiter, else free it."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.abandoned:
                self._abandoned -= 1
                continue
            waiter.granted = True
            self._queued -= 1
            waiter.wake()
            return
        self._in_flight -= 1

    def _abandon(self, waiter: _Waiter) -> None:
        waiter.abandoned = True
        self._queued -= 1
        self._abandoned += 1
        waiters = self._waiters
        if self._abandoned >= _COMPACT_AT and self._abandoned * 2 > len(waiters):
            live = [w for w in waiters if not w.abandoned]
            waiters.clear()
            waiters.extend(live)
            self._abandoned = 0

    def _reject(self, start: float | None) -> NoReturn:
        self._metrics.refused(start)
        if observed(self._telemetry):
            self.report(CallRejected, reason="bulkhead_full", retry_after=None)
        raise BulkheadFullError(
            f"bulkhead {self._name!r} is full: {self._in_flight} of {self._max} slots "
            f"taken, {self._queued} calls queued",
            policy=self._name,
        )

    def __repr__(self) -> str:
        return (
            f"Bulkhead({self._max}, max_queued={self._max_queued}, max_wait={self._max_wait}, "
            f"name={self._name!r})"
        )
