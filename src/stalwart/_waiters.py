"""Calls waiting for a slot, in FIFO order: what `Bulkhead` and `ConcurrencyLimit` queue on.

A policy that bounds the calls in flight keeps its own count of them; when it
has no free slot for a call, the call waits here. A call that finishes hands
its slot to the longest waiter (`WaitQueue.grant`) instead of freeing it, so
newcomers never jump the queue: while anyone waits, every slot is taken.

A waiter that gives up (cancelled, or out of time) is not searched for and
removed: it is marked abandoned and skipped when its turn comes, and the
queue is rebuilt once abandoned waiters are most of it, so cancelled callers
never pile up. A waiter granted a slot at the moment it was cancelled passes
the slot on (the policy's ``pass_on``): a slot is never lost.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, final

import anyio

from . import _clock

__all__ = ["WaitQueue"]

# Abandoned waiters are dropped lazily; rebuild the queue once they are most
# of it, so cancelled callers never pile up.
_COMPACT_AT: Final = 64


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


@final
class WaitQueue:
    """Calls waiting for a slot, longest waiting first.

    ``waiters`` is true while anyone may be waiting (a policy's hot path
    tests it before calling `grant`); ``queued`` counts the live waiters.
    """

    __slots__ = ("_abandoned", "queued", "waiters")

    def __init__(self) -> None:
        self.waiters: deque[_Waiter] = deque()
        self.queued = 0
        self._abandoned = 0

    async def enter(
        self, max_queued: int | None, max_wait: float | None, pass_on: Callable[[], None]
    ) -> bool:
        """Wait in line for a slot, if fewer than ``max_queued`` wait (None: no limit).

        False when the call is to be refused: the line is full, ``max_wait``
        is 0, or it passed first. See `wait` for the rest.
        """
        if (max_queued is not None and self.queued >= max_queued) or max_wait == 0.0:
            return False
        return await self.wait(max_wait, pass_on)

    async def wait(self, max_wait: float | None, pass_on: Callable[[], None]) -> bool:
        """Wait for a slot, at most ``max_wait`` seconds (None: no limit of its own).

        True once a slot was handed over; False when ``max_wait`` passed
        first. Cancelled (or interrupted) while waiting, the call leaves the
        queue and the exception propagates; a slot granted at that very
        moment is given back through ``pass_on``.
        """
        waiter = _Waiter()
        self.waiters.append(waiter)
        self.queued += 1
        try:
            if max_wait is None:
                await waiter.wait()
            else:
                with anyio.move_on_after(max_wait):
                    await waiter.wait()
        except BaseException:
            if waiter.granted:
                pass_on()  # granted as we were cancelled: pass it on
            else:
                self._abandon(waiter)
            raise
        if not waiter.granted:
            self._abandon(waiter)
            return False
        return True

    def grant(self) -> bool:
        """Hand a slot to the longest live waiter; False when nobody waits."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.abandoned:
                self._abandoned -= 1
                continue
            waiter.granted = True
            self.queued -= 1
            waiter.wake()
            return True
        return False

    def _abandon(self, waiter: _Waiter) -> None:
        waiter.abandoned = True
        self.queued -= 1
        self._abandoned += 1
        waiters = self.waiters
        if self._abandoned >= _COMPACT_AT and self._abandoned * 2 > len(waiters):
            live = [w for w in waiters if not w.abandoned]
            waiters.clear()
            waiters.extend(live)
            self._abandoned = 0
