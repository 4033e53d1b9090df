"""The one seam through which stalwart reads time and waits.

stalwart never calls ``time.monotonic()`` or ``time.sleep()`` on its own: it
reads the clock of the running event loop and sleeps on it. That single choice
is what makes every policy testable in virtual time, and what lets
``python -m stalwart tune`` simulate an hour of traffic in seconds:

* on trio, install ``trio.testing.MockClock(autojump_threshold=0)``;
* on asyncio, run on `stalwart.testing.VirtualClockEventLoop`.

Timers (`Timeout`, `deadline`), backoff sleeps, breaker windows and
idempotency TTLs then all agree on one notion of "now", whichever it is.
"""

from __future__ import annotations

import asyncio
import sys
import time
from asyncio import AbstractEventLoop, Task
from collections.abc import Callable
from threading import get_ident
from typing import Any, Final

import anyio

from ._privates import LOOP_THREAD_ID, current_task, loop_thread_missing, running_loop

__all__ = ["LoopInfo", "asyncio_loop", "monotonic_or_none", "now", "reader", "sample", "sleep"]


class LoopInfo:
    """What stalwart needs of one running asyncio loop, looked up once."""

    __slots__ = ("loop", "thread_id", "time", "timers")

    def __init__(self, loop: AbstractEventLoop) -> None:
        self.loop = loop
        self.thread_id = get_ident()
        # BaseEventLoop.time() is time.monotonic() behind a Python call;
        # subclasses (virtual clocks) override it and must be asked.
        plain = type(loop).time is asyncio.BaseEventLoop.time
        self.time: Callable[[], float] = time.monotonic if plain else loop.time
        self.timers: Any = None  # the loop's deadline timers, set by _timeout

    def current_task(self) -> Task[Any] | None:
        task: Task[Any] | None = current_task(self.loop)
        return task


_cached: LoopInfo | None = None


def asyncio_loop() -> LoopInfo | None:
    """The running asyncio loop's info, or None (trio, or no loop).

    ``asyncio._get_running_loop()`` costs ~200 ns on Python 3.11 (it checks
    the process id every time), which is more than a whole decorated call may
    cost. A loop that is running in this thread *is* this thread's running
    loop, so the last one seen is reused while that still holds; anything
    unusual falls back to the official lookup.
    """
    info = _cached
    if (
        info is not None
        and info.thread_id == get_ident()
        and getattr(info.loop, LOOP_THREAD_ID, None) == info.thread_id
    ):
        return info
    return _lookup()


def _lookup() -> LoopInfo | None:
    global _cached
    loop = running_loop()
    if loop is None:
        _cached = None  # do not keep a finished loop alive
        return None
    info = _cached
    if info is None or info.loop is not loop or info.thread_id != get_ident():
        info = _cached = LoopInfo(loop)
        if getattr(loop, LOOP_THREAD_ID, None) is None:
            loop_thread_missing(loop)  # every read will take this lookup: say so once
    return info


def now() -> float:
    """Seconds on the running event loop's clock (asyncio or trio)."""
    # asyncio_loop(), inlined and cut to one test (a loop running in this
    # thread is this thread's running loop): a breaker's rejection reads the
    # clock, and must cost at most twice raising an exception.
    info = _cached
    if info is None or getattr(info.loop, LOOP_THREAD_ID, None) != get_ident():
        info = _lookup()
        if info is None:
            return _trio_now()
    return info.time()


def reader() -> Callable[[], float]:
    """The running loop's clock, as a function: for a task that reads it several times.

    Calling it reads the same clock as `now`, without looking the loop up
    again: a policy that times a call (a start and an end) looks up once.
    Valid in the task that asked, while its loop runs.
    """
    info = _cached
    if info is None or getattr(info.loop, LOOP_THREAD_ID, None) != get_ident():
        info = _lookup()
        if info is None:
            _trio_now()  # raises outside any loop
            return _trio_now
    return info.time


def monotonic_or_none() -> Callable[[], float] | None:
    """``time.monotonic`` if the running loop's clock is exactly that, else None.

    A plain asyncio loop reads ``time.monotonic()``, a process-wide clock that
    stays valid after the loop is gone; a caller that took a time from such a
    loop may compare later readings of ``time.monotonic()`` with it directly,
    skipping the loop lookup of `now` (an open breaker's rejection does).
    Virtual clocks, trio, or no running loop: None, ask `now`.
    """
    info = _cached
    if info is None or getattr(info.loop, LOOP_THREAD_ID, None) != get_ident():
        info = _lookup()
        if info is None:
            return None
    return time.monotonic if info.time is time.monotonic else None


def sample() -> tuple[float, Callable[[], float], AbstractEventLoop | None]:
    """Now; a reader of the running loop's clock; the loop, if that clock is ``time.monotonic``.

    The reader stays valid later and from any thread: it is for what is read
    outside the loop on the loop's time scale (a gauge, at scrape time).

    The loop is returned only for a plain asyncio loop that records its
    thread (``LOOP_THREAD_ID``): while ``loop._thread_id`` is not None (it
    runs), its clock *is* ``time.monotonic()``, which a hot path may call
    directly, skipping the lookup of `now` (the "RateLimiter, permit
    available" benchmark row). Anything else (trio, a virtual clock) gives
    None: ask again next time.
    """
    info = asyncio_loop()
    if info is not None:
        plain = info.time is time.monotonic and getattr(info.loop, LOOP_THREAD_ID, None) is not None
        return info.time(), info.time, info.loop if plain else None
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            clock = trio.lowlevel.current_clock()
        except RuntimeError:
            pass
        else:
            current: Callable[[], float] = clock.current_time
            return current(), current, None
    raise RuntimeError(_NO_LOOP)


_NO_LOOP: Final = (
    "stalwart reads time from the running event loop: call it from async code "
    "running on asyncio or trio"
)


def _trio_now() -> float:
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return float(trio.current_time())
        except RuntimeError:
            pass
    raise RuntimeError(_NO_LOOP)


async def sleep(seconds: float) -> None:
    """Sleep on the running loop's clock; a zero sleep does not yield."""
    if seconds > 0:
        await anyio.sleep(seconds)
