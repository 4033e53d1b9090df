"""Bounded concurrency with a bounded FIFO queue."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, ParamSpec, TypeVar, final

from . import _validate
from ._errors import BulkheadFullError
from ._metrics import MetricFamily, PolicyMetrics
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry, observed
from ._waiters import WaitQueue
from .events import CallRejected

__all__ = ["Bulkhead", "BulkheadStatistics"]

P = ParamSpec("P")
T = TypeVar("T")


@final
@dataclass(frozen=True, slots=True)
class BulkheadStatistics:
    """A snapshot of a `Bulkhead`."""

    max_concurrent: int
    max_queued: int | None
    in_flight: int
    queued: int


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
    __slots__ = ("_in_flight", "_max", "_max_queued", "_max_wait", "_queue")

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
        self._queue = WaitQueue()
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
        return self._queue.queued

    def statistics(self) -> BulkheadStatistics:
        """A snapshot of the limits and of the calls running and waiting now."""
        return BulkheadStatistics(self._max, self._max_queued, self._in_flight, self._queue.queued)

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        call: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        # The wrapper closes over what a call that finds a free slot uses, and
        # reaches the rest through `bulkhead`: each name it closes over is
        # copied into every call's frame (the "Bulkhead, uncontended" row).
        limit, waiters = self._max, self._queue.waiters
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
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return guarded

        return self.build(make, binding)

    async def _acquire(self, start: float | None) -> None:
        """Wait for a slot, or raise `BulkheadFullError` (the call's outcome is counted here)."""
        try:
            admitted = await self._queue.enter(self._max_queued, self._max_wait, self._hand_over)
        except BaseException as exc:
            self._metrics.failed(exc, start)
            raise
        if not admitted:
            self._reject(start)

    def _hand_over(self) -> None:
        """Give a finishing call's slot to the longest waiter, else free it."""
        if not self._queue.grant():
            self._in_flight -= 1

    def _reject(self, start: float | None) -> NoReturn:
        self._metrics.refused(start)
        if observed(self._telemetry):
            self.report(CallRejected, reason="bulkhead_full", retry_after=None)
        raise BulkheadFullError(
            f"bulkhead {self._name!r} is full: {self._in_flight} of {self._max} slots "
            f"taken, {self._queue.queued} calls queued",
            policy=self._name,
        )

    def __repr__(self) -> str:
        return (
            f"Bulkhead({self._max}, max_queued={self._max_queued}, max_wait={self._max_wait}, "
            f"name={self._name!r})"
        )
