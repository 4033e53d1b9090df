"""Helpers for testing code that uses stalwart.

Three tools, for three kinds of test:

* **Instant retries** (`set_testing` / `instant_retries`): your test suite does not
  wait out backoff delays, and can cap attempts, without touching the
  policies your code builds. The spirit of stamina's ``set_testing``.
* **Virtual time** (`VirtualClockEventLoop` for asyncio; trio's own
  ``MockClock(autojump_threshold=0)``): timeouts, deadlines, backoff sleeps,
  breaker windows and TTLs all run on a clock that jumps straight to the next
  timer whenever every task is waiting, so an hour of retries takes
  milliseconds and timing tests are exact.
* **Fault injection** (`FaultInjection`): a scenario's ``[downstream]``
  profile (latency, errors, hangs, capacity, timeline) played on a real
  service as ASGI middleware, or around any call as a policy, for the
  requests that switch it on.

With pytest and anyio's plugin, one fixture runs every test on both::

    import pytest, trio.testing
    from stalwart.testing import VirtualClockEventLoop

    @pytest.fixture(params=["asyncio", "trio"])
    def anyio_backend(request):
        if request.param == "asyncio":
            return ("asyncio", {"loop_factory": VirtualClockEventLoop})
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from . import _retry, _validate
from ._faults import FAULTS_HEADER, FaultInjection, FaultStatistics, InjectedFault
from ._privates import scheduled_timers

__all__ = [
    "FAULTS_HEADER",
    "FaultInjection",
    "FaultStatistics",
    "InjectedFault",
    "VirtualClockEventLoop",
    "instant_retries",
    "is_testing",
    "set_testing",
]


def set_testing(enabled: bool, *, attempts: int | None = None) -> None:
    """Switch testing mode on or off for the whole process.

    While on, every `Retry` retries at once (no backoff, no server-hinted
    waits) and, if ``attempts`` is given, makes at most that many attempts
    (``attempts=1`` switches retrying off). Policies need not be rebuilt.
    Which retries are made does not change: a hint longer than the backoff's
    ``maximum`` still stops retrying, as it would in production.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, not {type(enabled).__name__}")
    if enabled:
        _retry._testing = _retry._TestingMode(_validate.optional_count("attempts", attempts))
    else:
        _retry._testing = None


def is_testing() -> bool:
    """Is testing mode on?"""
    return _retry._testing is not None


@contextmanager
def instant_retries(*, attempts: int | None = None) -> Iterator[None]:
    """Testing mode for a block (see `set_testing`); restores the previous mode.

    Example::

        with stalwart.testing.instant_retries(attempts=2):
            await client.fetch()  # fails after two immediate attempts
    """
    previous = _retry._testing
    set_testing(True, attempts=attempts)
    try:
        yield
    finally:
        _retry._testing = previous


class _AutojumpSelector(selectors.BaseSelector):
    """Polls real I/O without blocking; when idle, jumps the virtual clock to the next timer.

    Without I/O (the tuner's simulations), "waiting" is only ever jumping.
    The clock lands exactly on the next timer's time rather than on now plus
    the timeout the loop computed from it: that sum is off by a rounding
    error, and over an hour of jumps the errors add up.
    """

    def __init__(self, loop: VirtualClockEventLoop, threshold: float, *, io: bool) -> None:
        self._loop = loop
        self._threshold = threshold
        self._inner: selectors.BaseSelector | None = selectors.DefaultSelector() if io else None
        self._keys: dict[Any, selectors.SelectorKey] = {}  # without I/O: registered, never ready

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if self._inner is not None:
            return self._inner.register(fileobj, events, data)
        fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
        key = self._keys[fileobj] = selectors.SelectorKey(fileobj, fd, events, data)
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        if self._inner is not None:
            return self._inner.unregister(fileobj)
        return self._keys.pop(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if self._inner is not None:
            return self._inner.modify(fileobj, events, data)
        self.unregister(fileobj)
        return self.register(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        inner = self._inner
        if timeout is None:  # no timer pending: only real I/O can wake the loop
            if inner is None:
                raise RuntimeError("the loop is stuck: no timer is pending and no task can run")
            return inner.select(None)
        if timeout <= 0:
            return [] if inner is None else inner.select(0)
        if inner is not None:
            # A timer is pending: real I/O first, for up to the threshold...
            ready = inner.select(min(timeout, self._threshold))
            if ready:
                return ready
        # ...then nothing can happen before that timer: jump to it.
        loop = self._loop
        scheduled = scheduled_timers(loop)
        if scheduled:
            loop._virtual_time = max(loop._virtual_time, scheduled[0].when())
        else:
            loop.advance(timeout)
        return []

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()
        self._keys.clear()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        if self._inner is not None:
            return self._inner.get_key(fileobj)
        try:
            return self._keys[fileobj]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None

    def get_map(self) -> Any:
        return self._keys if self._inner is None else self._inner.get_map()


class VirtualClockEventLoop(asyncio.SelectorEventLoop):
    """An asyncio event loop on a virtual clock that jumps when idle.

    ``loop.time()`` starts at 0.0 and only moves when every task waits on a
    timer: then it jumps to the next one (or by ``advance``). Real I/O still
    works: it is polled first, and for ``autojump_threshold`` seconds of real
    time (default 0) before the clock jumps. Use a small positive threshold
    when a test waits on a real socket and also has timers pending.

    Use with ``asyncio.run(main(), loop_factory=VirtualClockEventLoop)``
    (Python 3.12+), ``asyncio.Runner(loop_factory=...)``, or anyio's
    ``backend_options={"loop_factory": VirtualClockEventLoop}``.
    """

    def __new__(cls, *, autojump_threshold: float = 0.0) -> VirtualClockEventLoop:
        # Validate before the loop exists: a half-built loop complains when collected.
        _validate.duration("autojump_threshold", autojump_threshold)
        return super().__new__(cls)

    #: whether it polls real I/O (the tuner's simulations do none: `_tune.engine`)
    _io: ClassVar[bool] = True

    def __init__(self, *, autojump_threshold: float = 0.0) -> None:
        self._virtual_time = 0.0
        selector = _AutojumpSelector(self, float(autojump_threshold), io=self._io)
        super().__init__(selector=selector)

    def time(self) -> float:
        return self._virtual_time

    def advance(self, seconds: float) -> None:
        """Move the virtual clock forward by ``seconds`` (>= 0)."""
        self._virtual_time += _validate.duration("seconds", seconds)
