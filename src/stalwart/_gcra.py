"""GCRA: the state of a smooth rate limit, with no clock, no event loop and no I/O.

`RateLimiter` wraps these; they only do arithmetic on the times they are given
(``now``, in seconds, from whatever clock the caller uses, never going back).

The generic cell rate algorithm
-------------------------------
GCRA (ITU-T I.371; the ATM Forum's Traffic Management Specification 4.0,
"virtual scheduling") is a token bucket kept as one number. With ``rate``
calls per ``per`` seconds and bursts of ``burst`` calls:

* the emission interval ``T = per / rate`` is the spacing of calls at the
  sustained rate;
* the tolerance ``tau = (burst - 1) * T`` is how far ahead of schedule a call
  may come;
* the state is the theoretical arrival time ``TAT`` (initially -inf): when the
  next call would be due if calls had come exactly every ``T``.

A call that arrives at ``now`` gets its turn at ``g = max(now, TAT - tau)``
and moves the schedule on: ``TAT = max(TAT, now) + T``. `Gcra.reserve` grants
the turn when ``g - now <= max_wait`` (``g == now``: at once; later: after
that delay, the caller's place in the queue) and otherwise refuses and
changes nothing. A fresh bucket grants ``burst`` calls at once; after that,
one every ``T``.

Why the turns are FIFO. Turns are granted in the order reservations are
made: if the call before had to wait (``g_k = TAT_{k-1} - tau > now_k``) then
``TAT_k = TAT_{k-1} + T`` and ``g_{k+1} >= TAT_k - tau = g_k + T``; if it did
not (``g_k = now_k``) then ``g_{k+1} >= now_{k+1} >= now_k``. So
``g_{k+1} >= g_k`` always, and turns that wait are exactly ``T`` apart.

The rate bound (stated exactly, and tested exactly). Number the grants in
order; ``TAT_k = max(TAT_{k-1}, now_k) + T`` is at least ``TAT_{k-1} + T``
and at least ``g_k + T`` (as ``g_k <= max(now_k, TAT_{k-1})``). For grants
``i < j``: ``g_j >= TAT_{j-1} - tau >= g_i + (j - i) * T - (burst - 1) * T``,
so the ``n = j - i + 1`` grants from ``g_i`` to ``g_j`` satisfy
``n <= burst + (g_j - g_i) / T``. Hence, in any closed window of ``L``
seconds, at most ``burst + floor(L / T)`` turns are granted; over a window of
``per`` seconds, at most ``burst + floor(rate)``. The bound is reached:
``burst`` calls at 0, then one every ``T`` up to and including ``per``. (A
fixed window lets ``2 * rate`` through across a boundary; GCRA never does.)

Giving a turn back
------------------
A caller that stops waiting (cancelled, or its deadline moved) gives its turn
back with `Turn.cancel`. The turns reserved after it were computed from a
``TAT`` that includes it, and they are already promised: moving ``TAT`` back
by ``T`` while they stand would let a new call share a turn with one of them
and break the bound. So:

* a cancelled turn that is the *last* reservation of its bucket restores
  ``TAT`` to exactly what it was before that reservation (the value is
  kept, so there is no rounding drift);
* a cancelled turn with later reservations behind it is marked, and its
  slot is lost capacity for now (the bucket behaves as if the call had
  happened: it only ever errs on the strict side);
* when the last reservation is given back, the marked turns directly before
  it are given back too, down to the first turn that still stands (so turns
  cancelled in any order are all returned once the queue's tail is).

Why this keeps both properties: giving back a tail of cancelled
reservations restores the exact state before the first of them, so what
follows is the GCRA schedule of the arrivals without them (FIFO and the
bound hold, by the arguments above). A marked turn that is never given back
stays in the schedule as a phantom: the real grants are a subset of a GCRA
schedule, which has at most as many grants in any window. A turn whose time
has come (``now >= g``) is not given back: its caller was let through.

Only waiting turns can be given back, and only they are objects: a turn
granted at once is the shared `GRANTED`, so the fast path allocates nothing.

Keys
----
`KeyedGcra` keeps one bucket per key, at most ``max_keys``, the least
recently used dropped first (an ``OrderedDict``: O(1) per call whatever the
number of keys). A dropped key's state is lost: its next call finds a full
bucket. That only ever makes the limit more permissive, never stricter, and
by at most the tokens the key had used up when it was dropped: at most
``burst`` calls when none of its calls was still waiting (always so with
``max_wait=0``), plus one per turn still queued when it was dropped. Since
the key dropped is the one used least recently, a key in steady use is
dropped only when more than ``max_keys`` keys are active at once.

The Redis script ``_lua/gcra.lua`` is the same computation on the server's
clock, for a limit shared by a fleet (see the script's header).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Final, final

from . import _validate
from ._keys import Lru

__all__ = ["GRANTED", "Gcra", "KeyedGcra", "Turn"]


@final
class Turn:
    """A caller's place in a bucket's FIFO order, from `Gcra.reserve`.

    ``delay`` is how long the caller waits before its call may start (0.0
    for `GRANTED`). A caller that stops waiting calls `cancel`.
    """

    __slots__ = ("_at", "_before", "_bucket", "_cancelled", "_previous", "delay")

    def __init__(
        self,
        bucket: Gcra | None,
        delay: float,
        at: float,
        before: float,
        previous: Turn | None,
    ) -> None:
        self._bucket = bucket
        self.delay = delay
        self._at = at  # when the turn comes, on the caller's clock
        self._before = before  # the bucket's TAT before this reservation
        self._previous = previous  # the waiting turn reserved just before, if any
        self._cancelled = False

    def cancel(self, now: float) -> bool:
        """Give the turn back, at ``now``, if its time has not come yet.

        True if the turn was given back at once (it was the bucket's last
        reservation, or every reservation after it had been given back);
        False if its time has come (``now >= the turn``), it was granted at
        once, it was cancelled before, or reservations made after it still
        stand (then it is marked, and given back with them if they all are).
        """
        bucket = self._bucket
        if bucket is None or self._cancelled or now >= self._at:
            return False
        self._cancelled = True
        if bucket._last is not self:
            return False
        turn: Turn | None = self
        while turn is not None and turn._cancelled:
            bucket._tat = turn._before
            previous = turn._previous
            turn._bucket = turn._previous = None
            turn = previous
        bucket._last = turn
        return True

    def __repr__(self) -> str:
        state = " cancelled" if self._cancelled else ""
        return f"<Turn delay={self.delay:g}{state}>"


#: The turn of a call granted at once (shared: nothing to give back).
GRANTED: Final = Turn(None, 0.0, -math.inf, -math.inf, None)


@final
class Gcra:
    """One GCRA bucket: ``rate`` calls per ``per`` seconds, in bursts of up to ``burst``.

    Args:
        rate: calls per ``per`` seconds, > 0 (fractions allowed: 0.5 per second).
        per: seconds, > 0.
        burst: calls that may pass at once from a full bucket, >= 1.

    Every method is O(1) and takes the time as ``now`` (seconds on the
    caller's clock). A ``now`` earlier than one seen before means a new
    clock (a limiter that outlived its event loop): the bucket starts again
    full, as if new.

    Example::

        bucket = Gcra(10, per=1.0, burst=2)
        turn = bucket.reserve(now, max_wait=0.5)
        if turn is None:
            refuse(retry_after=bucket.wait_time(now))
        elif turn.delay:
            sleep(turn.delay)  # on cancellation: turn.cancel(current time)
    """

    __slots__ = ("_burst", "_interval", "_last", "_seen", "_tat", "_tau")

    def __init__(self, rate: float, *, per: float = 1.0, burst: int = 1) -> None:
        rate = _validate.number("rate", rate)
        if rate <= 0.0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        per = _validate.duration("per", per, positive=True)
        self._burst = _validate.count("burst", burst)
        interval = per / rate
        if not 0.0 < interval < math.inf:
            raise ValueError(f"per / rate must be a finite number > 0, got {per!r} / {rate!r}")
        self._interval = interval
        self._tau = (burst - 1) * interval
        self._tat = -math.inf
        self._seen = -math.inf
        self._last: Turn | None = None

    @property
    def interval(self) -> float:
        """Seconds between calls at the sustained rate (``per / rate``)."""
        return self._interval

    @property
    def burst(self) -> int:
        """Calls a full bucket lets through at once."""
        return self._burst

    def reserve(self, now: float, max_wait: float = 0.0) -> Turn | None:
        """Reserve the next turn at ``now`` if it comes within ``max_wait`` seconds.

        Returns `GRANTED` when a permit is free now (whatever ``max_wait``),
        a new `Turn` whose ``delay`` (> 0, at most ``max_wait``) is the wait
        for the caller's FIFO turn, or None when the turn would come later
        than ``max_wait`` (nothing reserved; `wait_time` says when a permit
        will be free).
        The caller passes the smaller of its own ``max_wait`` and what is
        left of its deadline; ``math.inf`` waits as long as it takes.
        (`RateLimiter`'s wrapper inlines the branch that grants at once,
        and tells the bucket the time it saw only when its clock changes:
        keep the two alike.)
        """
        if now < self._seen:
            self._restart()
        self._seen = now
        tat = self._tat
        turn = tat - self._tau
        if turn <= now:
            self._tat = (tat if tat > now else now) + self._interval
            self._last = None  # every earlier turn has come: none can be given back
            return GRANTED
        delay = turn - now
        if delay > max_wait:
            return None
        last = self._last
        if last is not None and last._at <= now:
            last = None  # its time has come: it can no longer be given back
        reserved = Turn(self, delay, turn, tat, last)
        self._tat = tat + self._interval
        self._last = reserved
        return reserved

    def wait_time(self, now: float) -> float:
        """Seconds from ``now`` until a permit is free (0.0 if one is now).

        The ``retry_after`` of a refused call: a call made then, with no
        other call in between, is granted at once.
        """
        if now < self._seen:
            return 0.0
        wait = self._tat - self._tau - now
        return wait if wait > 0.0 else 0.0

    def available(self, now: float) -> int:
        """Calls that ``now`` would be granted at once, one after the other (0 to ``burst``)."""
        if now < self._seen:
            return self._burst
        ahead = self._tat - now
        if ahead <= 0.0:
            return self._burst
        return max(0, self._burst - math.ceil(ahead / self._interval))

    def refill_time(self, now: float) -> float:
        """Seconds from ``now`` until the bucket is full again (0.0 if it is)."""
        if now < self._seen:
            return 0.0
        ahead = self._tat - now
        return ahead if ahead > 0.0 else 0.0

    def _restart(self) -> None:
        self._tat = -math.inf
        self._seen = -math.inf
        self._last = None

    def _fresh(self) -> Gcra:
        """An empty bucket with the same parameters (no validation: they were checked)."""
        bucket = object.__new__(Gcra)
        bucket._interval = self._interval
        bucket._tau = self._tau
        bucket._burst = self._burst
        bucket._tat = -math.inf
        bucket._seen = -math.inf
        bucket._last = None
        return bucket

    def __repr__(self) -> str:
        return f"Gcra(interval={self._interval:g}, burst={self._burst})"


@final
class KeyedGcra:
    """One `Gcra` bucket per key, at most ``max_keys`` (least recently used dropped first).

    Args:
        rate, per, burst: as for `Gcra`, for every key.
        max_keys: buckets kept, >= 1.

    O(1) per call whatever the number of keys. Keys are any hashable
    values; the caller bounds and validates untrusted ones. A dropped key
    comes back with a full bucket: at most ``burst`` calls of leniency, plus
    one per turn it still had queued (see the module docstring).
    """

    __slots__ = ("_buckets", "_template")

    def __init__(
        self, rate: float, *, per: float = 1.0, burst: int = 1, max_keys: int = 10_000
    ) -> None:
        self._template = Gcra(rate, per=per, burst=burst)
        self._buckets: Lru[Hashable, Gcra] = Lru(max_keys)

    @property
    def max_keys(self) -> int:
        """Buckets kept at once."""
        return self._buckets.max_keys

    def reserve(self, key: Hashable, now: float, max_wait: float = 0.0) -> Turn | None:
        """`Gcra.reserve` on ``key``'s bucket (made, or dropping the oldest key, if new)."""
        return self._buckets.use(key, self._fresh).reserve(now, max_wait)

    def _fresh(self, key: Hashable) -> Gcra:
        return self._template._fresh()

    def wait_time(self, key: Hashable, now: float) -> float:
        """`Gcra.wait_time` of ``key`` (0.0 for a key without a bucket); does not touch it."""
        bucket = self._buckets.peek(key)
        return 0.0 if bucket is None else bucket.wait_time(now)

    def available(self, key: Hashable, now: float) -> int:
        """`Gcra.available` of ``key`` (``burst`` for a key without a bucket)."""
        bucket = self._buckets.peek(key)
        return self._template._burst if bucket is None else bucket.available(now)

    def refill_time(self, key: Hashable, now: float) -> float:
        """`Gcra.refill_time` of ``key`` (0.0 for a key without a bucket)."""
        bucket = self._buckets.peek(key)
        return 0.0 if bucket is None else bucket.refill_time(now)

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: object) -> bool:
        return key in self._buckets

    def __repr__(self) -> str:
        t = self._template
        return f"KeyedGcra(interval={t._interval:g}, burst={t._burst}, max_keys={self.max_keys})"
