"""Client-side adaptive throttling (Google SRE book): counts and the rejection probability.

`AdaptiveThrottle` wraps this; it does no I/O, reads no clock (``now`` is
given, in seconds) and draws from the `random.Random` it is handed.

The rule (*Site Reliability Engineering*, O'Reilly 2016, chapter 21,
"Handling Overload", section "Client-side throttling"): over the last
``window`` seconds a client counts

* ``requests``: calls the application tried, including those this throttle
  refused, and
* ``accepts``: calls the dependency accepted (did not reject for overload),

and refuses each new call locally with probability

    p = max(0, (requests - k * accepts) / (requests + 1)).

While the dependency accepts everything, ``requests <= accepts`` (plus the
calls in flight) and p is 0 for any ``k >= 1``. When it accepts at most
``C`` calls per second whatever it is sent, the client settles where the
calls that reach it are about ``k * C`` per second: ``requests - k *
accepts`` is the excess, refused locally at no cost to the dependency. A
larger ``k`` wastes more of the dependency's effort on calls it refuses but
reacts less to short blips; the book suggests 2. With ``k < 1`` a healthy
dependency would see calls refused and the refusals feed on themselves
(each one counts as a request and never as an accept) until almost every
call is refused, so ``k`` must be at least 1.

p is computed from the counts before the call is counted (``requests + 1``
counts the call being decided), and is below 1: one call in
``requests + 1`` at least still goes through, so the client notices the
dependency's recovery.

The window is a ring of ``buckets`` counters, each covering ``window /
buckets`` seconds; it holds the current slice and the ``buckets - 1``
before it (between ``window * (1 - 1/buckets)`` and ``window`` seconds of
history) and old counts leave it a slice at a time. Every operation is
O(1): at most ``buckets`` slices are emptied as time moves, whatever the
traffic. Time that goes back (a new clock) empties the window.
"""

from __future__ import annotations

import math
import random
from typing import final

from . import _validate

__all__ = ["ThrottleWindow"]


@final
class ThrottleWindow:
    """Requests and accepts over the last ``window`` seconds, and the SRE book's refusal rule.

    Args:
        k: how many calls per accepted one may reach the dependency, >= 1.
        window: seconds of history, > 0.
        buckets: slices of the window, >= 1 (more: smoother expiry, same cost per call).

    Example::

        window = ThrottleWindow(k=2.0, window=120.0)
        if not window.admit(now, rng):
            refuse()
        response = await call()
        if response.status_code not in (429, 503):  # the dependency accepted it
            window.accept(clock())
    """

    __slots__ = (
        "_accepts",
        "_buckets",
        "_current",
        "_k",
        "_requests",
        "_slot",
        "_width",
        "_window",
        "accepts",
        "requests",
    )

    def __init__(self, *, k: float = 2.0, window: float = 120.0, buckets: int = 20) -> None:
        self._k = _validate.number("k", k, minimum=1.0)
        self._window = _validate.duration("window", window, positive=True)
        self._buckets = _validate.count("buckets", buckets)
        self._width = self._window / buckets
        if self._width == 0.0:
            raise ValueError(f"window / buckets must be > 0, got {window!r} / {buckets}")
        # Lists, not arrays: an array's item assignment parses its argument,
        # which cost more than the rest of a count (the "AdaptiveThrottle" row
        # of benchmarks/hot_path.py).
        self._requests = [0] * buckets
        self._accepts = [0] * buckets
        self._current = -math.inf  # the current slice's number (a whole float)
        self._slot = 0  # its index in the ring
        #: requests in the window, as of the last call
        self.requests = 0
        #: accepts in the window, as of the last call
        self.accepts = 0

    @property
    def k(self) -> float:
        return self._k

    @property
    def window(self) -> float:
        return self._window

    def _advance(self, current: float) -> None:
        """Move the window on to slice number ``current``, emptying the slices it leaves."""
        last = self._current
        buckets = self._buckets
        requests, accepts = self._requests, self._accepts
        if current < last or current - last >= buckets:
            # First use, a pause longer than the window, or a new clock.
            for i in range(buckets):
                requests[i] = accepts[i] = 0
            self.requests = self.accepts = 0
        else:
            for number in range(int(last) + 1, int(current) + 1):
                i = number % buckets
                self.requests -= requests[i]
                self.accepts -= accepts[i]
                requests[i] = accepts[i] = 0
        self._current = current
        self._slot = int(current) % buckets

    def rejection_probability(self, now: float) -> float:
        """The probability that a call at ``now`` is refused: max(0, (R - k*A) / (R + 1))."""
        current = now // self._width
        if current != self._current:
            self._advance(current)
        excess = self.requests - self._k * self.accepts
        return excess / (self.requests + 1) if excess > 0.0 else 0.0

    def admit(self, now: float, rng: random.Random) -> bool:
        """Count a call at ``now``; False if it is refused locally (with the probability above).

        The random number is drawn only when the probability is above 0, so a
        healthy dependency costs no draw.
        """
        current = now // self._width
        if current != self._current:
            self._advance(current)
        requests = self.requests
        excess = requests - self._k * self.accepts
        self._requests[self._slot] += 1
        self.requests = requests + 1
        return excess <= 0.0 or rng.random() >= excess / (requests + 1)

    def accept(self, now: float) -> None:
        """Count, at ``now``, a call the dependency accepted."""
        current = now // self._width
        if current != self._current:
            self._advance(current)
        self._accepts[self._slot] += 1
        self.accepts += 1

    def accept_latest(self) -> None:
        """Count an accepted call in the slice of the latest count, without reading a clock.

        For a call admitted by `admit` and accepted as it ends: the accept
        lands in the slice of the latest `admit` or `accept`, never later
        than its own and at worst as early as the call's admission (when no
        other call was counted meanwhile), so it leaves the window at most
        the call's duration early. That is what `AdaptiveThrottle` does:
        one clock read per call instead of two.
        """
        self._accepts[self._slot] += 1
        self.accepts += 1

    def __repr__(self) -> str:
        return f"ThrottleWindow(k={self._k:g}, window={self._window:g}, buckets={self._buckets})"
