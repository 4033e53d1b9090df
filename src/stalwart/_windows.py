"""Sliding windows of call outcomes, by count or by time, for the circuit breaker.

Both kinds keep running totals (calls, failures, slow calls), so reading a
rate is a division, and recording an outcome touches a fixed number of slots
whatever the window's size:

* `CountWindow` (the last *n* calls) is a ring of bits in one ``bytearray``:
  one bit per call for "failed", and one more for "slow" when the breaker
  times calls. A million-call window takes 125 KB, a hundred-call one 13
  bytes. A success needs no bit (a cleared bit *is* a success), so the
  breaker's fast path only counts successes (``pending``); they are laid into
  the ring in bulk, with C-level byte operations, before the next outcome
  that needs a bit, or before the counts are read. That work is bounded by
  the number of successes counted since, so every call costs O(1) amortised,
  and a window of 1,000,000 costs what a window of 10 does.
* `TimeWindow` (the calls of the last *t* seconds) is a ring of buckets, each
  counting the calls, failures and slow calls of ``seconds / buckets`` of
  time. Buckets that fall out of the window are emptied as time moves on
  (amortised O(1): at most ``buckets`` per call, usually none).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Final, Protocol, final

from . import _validate

__all__ = ["CountWindow", "TimeWindow"]

_DEFAULT_BUCKETS: Final = 10
_MIN_BUCKET_WIDTH: Final = 1e-6  # seconds


@final
@dataclass(frozen=True, slots=True)
class CountWindow:
    """The last ``size`` calls (``window=100`` means ``CountWindow(100)``).

    The failure and slow-call rates are shares of those calls. A breaker whose
    ``minimum_calls`` exceeds ``size`` uses ``size`` instead: the window can
    never hold more.
    """

    size: int

    def __post_init__(self) -> None:
        _validate.count("size", self.size, maximum=_validate.MAX_WINDOW_CALLS)


@final
@dataclass(frozen=True, slots=True)
class TimeWindow:
    """The calls that ended in the last ``seconds`` (fractions allowed: ``0.5``).

    Time is cut into ``buckets`` equal slices; the window is the current
    slice and the ``buckets - 1`` before it, so it covers between
    ``seconds * (1 - 1/buckets)`` and ``seconds`` of history, and old calls
    leave it one slice at a time. More buckets, finer edges; the cost per
    call does not change.
    """

    seconds: float
    buckets: int = _DEFAULT_BUCKETS

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "seconds", _validate.duration("seconds", self.seconds, positive=True)
        )
        _validate.count("buckets", self.buckets, maximum=_validate.MAX_BUCKETS)
        if self.seconds / self.buckets < _MIN_BUCKET_WIDTH:
            # Finer than any event loop's clock, and bucket numbers
            # (time / width) would overflow.
            raise ValueError(
                f"seconds / buckets must be at least {_MIN_BUCKET_WIDTH:g}, "
                f"got {self.seconds!r} / {self.buckets}"
            )


class Ring(Protocol):
    """What the breaker reads and writes of a window, whatever its kind.

    ``calls``, ``failures`` and ``slow`` are current after `refresh`;
    ``run`` is the number of failures in a row at the end (any success ends
    a run; it does not depend on the window's extent).
    """

    calls: int
    failures: int
    slow: int
    run: int

    @property
    def window(self) -> CountWindow | TimeWindow: ...

    def record(self, failure: bool, slow: bool, now: float) -> None:
        """Add an outcome that ended at ``now`` (count windows ignore ``now``)."""

    def refresh(self, now: float | None) -> None:
        """Bring the totals up to date (to ``now``, unless None: no clock)."""

    def clear(self) -> None:
        """Forget every outcome."""


def ring_for(window: CountWindow | TimeWindow, *, slow: bool) -> Ring:
    """The empty ring for ``window``; ``slow``: keep slow-call counts too."""
    if isinstance(window, CountWindow):
        return CountRing(window.size, slow=slow)
    return TimeRing(window)


@final
class CountRing:
    """The last ``size`` outcomes, as bits.

    The ring holds one bit plane of failures and, when ``slow``, one of slow
    calls, each ``ceil(size / 8)`` bytes of one ``bytearray``. Slot ``next``
    is the oldest outcome (or an empty slot, whose bits are clear) and is
    overwritten by the next one. ``pending`` successes have happened but
    are not laid into the ring yet (see the module docstring); anyone may
    add to it, and everything else first calls `refresh`.
    """

    __slots__ = ("_bits", "_planes", "calls", "failures", "next", "pending", "run", "size", "slow")

    def __init__(self, size: int, *, slow: bool) -> None:
        self.size = size
        plane = (size + 7) >> 3
        self._planes = 2 if slow else 1
        self._bits = bytearray(plane * self._planes)
        self.next = 0
        self.calls = 0
        self.failures = 0
        self.slow = 0
        self.run = 0
        self.pending = 0

    @property
    def window(self) -> CountWindow:
        return CountWindow(self.size)

    def record(self, failure: bool, slow: bool, now: float) -> None:
        if self.pending:
            self._lay_pending()
        i = self.next
        at, bit = i >> 3, 1 << (i & 7)
        bits = self._bits
        byte = bits[at]
        if byte & bit:
            self.failures -= 1
        bits[at] = (byte | bit) if failure else (byte & ~bit)
        if self._planes == 2:
            at += len(bits) >> 1
            byte = bits[at]
            if byte & bit:
                self.slow -= 1
            bits[at] = (byte | bit) if slow else (byte & ~bit)
        if failure:
            self.failures += 1
            self.run += 1
        else:
            self.run = 0
        if slow:
            self.slow += 1
        if self.calls < self.size:
            self.calls += 1
        self.next = 0 if i + 1 == self.size else i + 1

    def refresh(self, now: float | None) -> None:
        if self.pending:
            self._lay_pending()

    def _lay_pending(self) -> None:
        """Write the pending successes: clear their slots, evicting what was there."""
        count, size = self.pending, self.size
        self.pending = 0
        self.run = 0
        start = self.next
        self.next = (start + count) % size
        self.calls = min(size, self.calls + count)
        if not self.failures and not self.slow:
            return  # every bit is clear already
        if count >= size:
            self._bits[:] = bytes(len(self._bits))
            self.failures = self.slow = 0
            return
        end = start + count
        if end <= size:
            self._evict(start, end)
        else:
            self._evict(start, size)
            self._evict(0, end - size)

    def _evict(self, start: int, end: int) -> None:
        bits = self._bits
        self.failures -= _take_bits(bits, 0, start, end)
        if self._planes == 2:
            self.slow -= _take_bits(bits, len(bits) >> 1, start, end)

    def clear(self) -> None:
        if self.failures or self.slow:
            self._bits[:] = bytes(len(self._bits))
        self.next = self.calls = self.failures = self.slow = self.run = self.pending = 0


def _take_bits(bits: bytearray, base: int, start: int, end: int) -> int:
    """Clear bits ``start`` to ``end - 1`` of the plane at byte ``base``; count the set ones."""
    first, last = base + (start >> 3), base + ((end - 1) >> 3)
    low = (0xFF << (start & 7)) & 0xFF  # the bits of `first` from `start` on
    high = 0xFF >> (7 - ((end - 1) & 7))  # the bits of `last` up to `end - 1`
    if first == last:
        mask = low & high
        byte = bits[first]
        bits[first] = byte & ~mask
        return (byte & mask).bit_count()
    taken = (bits[first] & low).bit_count() + (bits[last] & high).bit_count()
    bits[first] &= ~low
    bits[last] &= ~high
    if last - first > 1:
        inner = int.from_bytes(bits[first + 1 : last], "little").bit_count()
        if inner:
            bits[first + 1 : last] = bytes(last - first - 1)
            taken += inner
    return taken


@final
class TimeRing:
    """Per-bucket counts of the last ``window.seconds``.

    ``_counts`` holds (calls, failures, slow) for each bucket; the bucket
    of time ``t`` is number ``t // width``, stored at ``number % buckets``.
    The window is the buckets ``current - buckets + 1`` to ``current``.
    """

    __slots__ = (
        "_at",
        "_counts",
        "_current",
        "_width",
        "calls",
        "failures",
        "run",
        "slow",
        "window",
    )

    def __init__(self, window: TimeWindow) -> None:
        self.window = window
        self._width = window.seconds / window.buckets
        self._counts = array("q", bytes(8 * 3 * window.buckets))
        self._current = -math.inf  # the current bucket's number (a whole float)
        self._at = 0  # where its counts are in `_counts`
        self.calls = self.failures = self.slow = self.run = 0

    def _advance(self, current: float) -> None:
        """Move the window on to bucket number ``current``."""
        last = self._current
        buckets = self.window.buckets
        counts = self._counts
        if current < last or current - last >= buckets:
            # First use, a long pause, or a new clock (another event loop).
            counts[:] = array("q", bytes(8 * 3 * buckets))
            self.calls = self.failures = self.slow = 0
        else:
            for k in range(int(last) + 1, int(current) + 1):
                at = 3 * (k % buckets)
                if counts[at]:
                    self.calls -= counts[at]
                    self.failures -= counts[at + 1]
                    self.slow -= counts[at + 2]
                    counts[at] = counts[at + 1] = counts[at + 2] = 0
        self._current = current
        self._at = 3 * (int(current) % buckets)

    def record(self, failure: bool, slow: bool, now: float) -> None:
        current = now // self._width
        if current != self._current:
            self._advance(current)
        at = self._at
        counts = self._counts
        counts[at] += 1
        self.calls += 1
        if failure:
            counts[at + 1] += 1
            self.failures += 1
            self.run += 1
        else:
            self.run = 0
        if slow:
            counts[at + 2] += 1
            self.slow += 1

    def refresh(self, now: float | None) -> None:
        if now is not None:
            current = now // self._width
            if current != self._current:
                self._advance(current)

    def clear(self) -> None:
        self._counts[:] = array("q", bytes(8 * 3 * self.window.buckets))
        self._current = -math.inf
        self._at = 0
        self.calls = self.failures = self.slow = self.run = 0
