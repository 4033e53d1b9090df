"""The one seam through which stalwart reads time and waits.

stalwart never calls ``time.monotonic()`` or ``time.sleep()``: it reads the
clock of the running event loop and sleeps on it. That single choice is what
makes every policy testable in virtual time, and what lets
``python -m stalwart tune`` simulate an hour of traffic in seconds:

* on trio, install ``trio.testing.MockClock(autojump_threshold=0)``;
* on asyncio, run on `stalwart.testing.VirtualClockEventLoop`.

Timers (`Timeout`, `deadline`), backoff sleeps, breaker windows and
idempotency TTLs then all agree on one notion of "now", whichever it is.
"""

from __future__ import annotations

import sys
from asyncio import AbstractEventLoop
from asyncio.events import _get_running_loop

import anyio

__all__ = ["now", "running_asyncio_loop", "sleep"]


def running_asyncio_loop() -> AbstractEventLoop | None:
    """The running asyncio loop, or None (on trio, or outside any loop)."""
    return _get_running_loop()


def now() -> float:
    """Seconds on the running event loop's clock (asyncio or trio)."""
    loop = _get_running_loop()
    if loop is not None:
        return loop.time()
    return _trio_now()


def _trio_now() -> float:
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            return float(trio.current_time())
        except RuntimeError:
            pass
    raise RuntimeError(
        "stalwart reads time from the running event loop: call it from async code "
        "running on asyncio or trio"
    )


async def sleep(seconds: float) -> None:
    """Sleep on the running loop's clock; a zero sleep does not yield."""
    if seconds > 0:
        await anyio.sleep(seconds)
