"""Smooth rate limits: at most ``rate`` calls per ``per`` seconds, per key, with FIFO waits.

`RateLimiter` is the policy around the GCRA buckets of `_gcra` (read its
docstring for the maths and the proven bound). What this module adds:

* **time**: every call reads the running loop's clock (`_clock`), so the
  limiter runs in virtual time like every other policy;
* **waiting**: a call that finds no permit free reserves its FIFO turn and
  sleeps until it comes, if it comes within ``max_wait`` *and* before the
  ambient deadline; otherwise it is refused at once with
  `RateLimitExceeded`, whose ``retry_after`` says when a permit will be
  free. A waiter that is cancelled gives its turn back;
* **keys**: ``key=`` reads a key from each call's arguments, as
  `Idempotency`'s does, and each key has a bucket of its own;
* **a store**: with ``store=`` (`stalwart.redis.RedisStore`), each call
  reserves its turn in the store (one round trip, on the store's clock),
  and falls back on the limiter's own buckets while the store cannot be
  reached.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Final, NoReturn, ParamSpec, Protocol, TypeVar, final

import anyio

from . import _clock, _validate
from ._deadline import current_deadline
from ._errors import RateLimitExceeded, StoreUnavailable
from ._gauges import LiveMetrics, live_gauge, refuse
from ._gcra import GRANTED, Gcra, KeyedGcra, Turn
from ._keys import KEY_MAX_LENGTH, MISSING, Key, KeySpec, checked, key_option, key_reader, spec_text
from ._metrics import MetricFamily
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry

__all__ = ["RateLimitStore", "RateLimiter", "RateLimiterMetrics", "StoredTurn"]

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_MAX_KEYS: Final = 10_000
REJECTED_REASON: Final = "rate_limited"

_monotonic: Final = time.monotonic

# While its store cannot be reached, a limiter decides alone, and asks the
# store again after this long, doubling up to the maximum while it stays away.
_STORE_RETRY: Final = 0.25
_STORE_RETRY_MAX: Final = 5.0


@final
@dataclass(frozen=True, slots=True)
class StoredTurn:
    """A turn reserved in a `RateLimitStore`, or the store's refusal.

    Attributes:
        granted: the turn was reserved (else nothing changed in the store).
        delay: granted, the seconds until the turn (0.0: now); refused, the
            seconds until a permit is free.
        ahead: granted, how far the bucket is from full when the turn comes,
            in seconds (for the ``RateLimit`` header fields).
        at: granted, when the turn comes, on the store's clock.
        handle: what the store needs to give the turn back.
    """

    granted: bool
    delay: float
    ahead: float = 0.0
    at: float = 0.0
    handle: Any = None


class RateLimitStore(Protocol):
    """Where a limit shared by many processes lives (`stalwart.redis.RedisStore` is one).

    The limiter's arithmetic is the store's: a bucket per limiter name and
    key, on the store's clock, one request per reservation.
    """

    @property
    def timeout(self) -> float:
        """Seconds a request to the store may take."""

    async def reserve_turn(
        self,
        limit: str,
        key: str | None,
        interval: float,
        tau: float,
        max_wait: float,
        *,
        within: float,
    ) -> StoredTurn:
        """Reserve the next turn of ``limit``'s bucket for ``key`` if it comes within ``max_wait``.

        GCRA with ``interval`` (``per / rate``) and ``tau`` (``(burst - 1) *
        interval``). Raises `StoreUnavailable` when the store does not
        answer within ``within`` seconds (and the store's own timeout).
        """

    def give_back_turn(self, turn: StoredTurn, until: float) -> None:
        """Give ``turn`` back, in the background (never blocks, never raises).

        ``until``: the loop time of the turn, after which it does not matter.
        """


class RateLimiterMetrics(LiveMetrics["RateLimiter"]):
    """A `RateLimiter`'s: refusals, waits, and its state read from the live limiters."""

    __slots__ = ("store_unavailable", "waited", "waits")
    store_unavailable: int
    waited: float
    waits: int

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.waited = 0.0  # seconds

    def _available(self) -> Iterator[tuple[tuple[()], float]]:
        # Only where it is cheap: one in-process bucket, read on its loop's clock.
        for limiter in list(self.live):
            if limiter._key is None and limiter._store is None and limiter._reader is not None:
                yield (), limiter._bucket.available(limiter._reader())
                return

    families = (
        MetricFamily(
            "stalwart_rate_limiter_rejected",
            "counter",
            "Calls a rate limiter refused: no permit within max_wait or the deadline.",
            "rejected",
        ),
        MetricFamily(
            "stalwart_rate_limiter_waits",
            "counter",
            "Calls that waited for their turn at a rate limiter.",
            "waits",
        ),
        MetricFamily(
            "stalwart_rate_limiter_wait_seconds",
            "counter",
            "Seconds calls spent waiting for their turn at a rate limiter.",
            "waited",
        ),
        MetricFamily(
            "stalwart_rate_limiter_store_unavailable",
            "counter",
            "Calls a rate limiter decided on its own limit: its store did not answer in time.",
            "store_unavailable",
        ),
        live_gauge(
            "stalwart_rate_limiter_waiting",
            "Calls waiting for their turn at a rate limiter now.",
            lambda limiter: limiter._waiting,
        ),
        MetricFamily(
            "stalwart_rate_limiter_available",
            "gauge",
            "Calls an unkeyed in-process rate limiter would let through at once now.",
            _available,
        ),
        live_gauge(
            "stalwart_rate_limiter_keys",
            "Keys a rate limiter keeps a bucket for.",
            lambda limiter: len(limiter._keyed),
        ),
    )


@final
class RateLimiter(Policy):
    """At most ``rate`` calls per ``per`` seconds, smoothly, with bursts of up to ``burst``.

    A GCRA (a token bucket kept as one number): a full bucket lets ``burst``
    calls through at once, then one every ``per / rate`` seconds. Over any
    window of ``L`` seconds at most ``burst + floor(L * rate / per)`` calls
    start; over a window of ``per`` seconds, ``burst + floor(rate)``. Never a
    fixed window, which lets ``2 * rate`` through across its boundary.

    A call that finds no permit free waits for its turn, in FIFO order, if
    the turn comes within ``max_wait`` seconds **and before the ambient
    deadline** (`~stalwart.deadline`, a `~stalwart.Timeout`, a
    ``Retry(timeout=)``). Otherwise it is refused at once, without waiting
    in vain, with `~stalwart.RateLimitExceeded`, whose ``retry_after`` is the
    number of seconds until a permit is free. A waiting call that is
    cancelled gives its turn back. A call's permit is used whatever the
    call's outcome: the limit is on calls started.

    Keys: with ``key``, each key has a limit of its own: ``key`` is the name
    of a parameter of the decorated function, or a callable taking the
    call's arguments; the key is a ``str`` of 1-255 characters or an
    ``int``, and ``None`` lets the call through unlimited (an allow-list).
    At most ``max_keys`` keys keep their state (the least recently used is
    dropped, and comes back with a full bucket), and each call costs O(1)
    whatever their number.

    A limiter is meant to be shared: decorate several functions with one
    limiter and they share its limit (its keys included).

    **Fleet-wide.** With ``store=RedisStore(...)``, limiters of the same
    ``name`` on every process share one limit (per key): each call reserves
    its turn in Redis, one round trip running the same GCRA on Redis's clock
    (``TIME``), so processes whose clocks disagree share one schedule; only
    the wait, a duration, comes back. Give every process the same ``rate``,
    ``per`` and ``burst``. While Redis cannot be reached (it does not answer
    within the store's ``timeout``, nor within half the time left before the
    call's deadline), calls are decided by each process's own limit instead
    (the fleet then lets up to one limit per process through), counted in
    ``stalwart_rate_limiter_store_unavailable_total``; the limiter asks Redis
    again a quarter of a second later (doubling, up to 5 s, while it stays
    away), one call at a time. A call never waits for Redis past its
    deadline. A call cancelled while it waits for its turn gives the turn
    back (from the background, when Redis answers).

    Args:
        rate: calls allowed per ``per`` seconds, > 0 (fractions allowed).
        per: the period of ``rate``, in seconds, > 0.
        burst: calls a full bucket lets through at once, >= 1 (default:
            ``rate``, at least 1).
        max_wait: seconds a call may wait for its turn, >= 0 (``0``: never
            wait; ``None``: as long as its deadline allows).
        key: a parameter name or a callable of the call's arguments (see
            above), or None for one limit for every call.
        max_keys: keys kept at once, >= 1.
        store: where the limit lives: a `stalwart.redis.RedisStore` shares
            it with every process given the same store (prefix) and limiter
            ``name`` (see below); None: in this process.
        name: the ``policy`` label of its metrics and attribute of its spans.
        telemetry: where it reports (``None``: the default `Telemetry`).

    Example::

        @sw.RateLimiter(100, per=60, max_wait=5.0)  # a partner's quota: 100 a minute
        async def call_partner(order_id: str) -> dict[str, str]: ...

        @sw.RateLimiter(10, burst=20, key="user_id")  # 10 a second per user
        async def search(user_id: str, query: str) -> list[str]: ...
    """

    kind = "rate_limiter"
    metrics_type = RateLimiterMetrics
    _metrics: RateLimiterMetrics
    _decorator_call = "RateLimiter(rate)"
    __slots__ = (
        "_bucket",
        "_burst",
        "_key",
        "_keyed",
        "_max_wait",
        "_per",
        "_plain",
        "_probing",
        "_rate",
        "_reader",
        "_retry_store",
        "_store",
        "_store_at",
        "_waiting",
    )

    def __init__(
        self,
        rate: float,
        *,
        per: float = 1.0,
        burst: int | None = None,
        max_wait: float | None = 0.0,
        key: KeySpec | None = None,
        max_keys: int = DEFAULT_MAX_KEYS,
        store: RateLimitStore | None = None,
        name: str = "rate_limiter",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry, shared_state=store)
        rate = _validate.number("rate", rate)
        if rate <= 0.0:
            raise ValueError(f"rate must be > 0, got {rate!r}")
        if burst is None:
            burst = max(1, math.floor(rate))
        self._bucket = Gcra(rate, per=per, burst=burst)
        self._keyed = KeyedGcra(rate, per=per, burst=burst, max_keys=max_keys)
        self._rate = rate
        self._per = float(per)
        self._burst = burst
        wait = _validate.optional_duration("max_wait", max_wait)
        self._max_wait = math.inf if wait is None else wait
        self._key = key_option(key)
        if store is not None and not (
            callable(getattr(store, "reserve_turn", None))
            and callable(getattr(store, "give_back_turn", None))
        ):
            raise TypeError(
                "store must be a stalwart.redis.RedisStore (or another RateLimitStore) or None, "
                f"not {type(store).__name__}"
            )
        self._store = store
        # The store is asked again from this loop time on (it did not answer);
        # after this long if it still does not; one call asks at a time then.
        self._store_at = -math.inf
        self._retry_store = _STORE_RETRY
        self._probing = False
        self._waiting = 0
        # The running loop's clock, for the gauge; the loop while it is time.monotonic.
        self._reader: Callable[[], float] | None = None
        self._plain: Any = _NOT_PLAIN
        self._metrics.live.add(self)

    @property
    def rate(self) -> float:
        """Calls allowed per `per` seconds."""
        return self._rate

    @property
    def per(self) -> float:
        """The period of `rate`, in seconds."""
        return self._per

    @property
    def burst(self) -> int:
        """Calls a full bucket lets through at once."""
        return self._burst

    @property
    def max_wait(self) -> float | None:
        """Seconds a call may wait for its turn (None: as long as its deadline allows)."""
        return None if self._max_wait == math.inf else self._max_wait

    @property
    def store(self) -> RateLimitStore | None:
        """Where the limit lives (None: in this process)."""
        return self._store

    @property
    def max_keys(self) -> int:
        """Keys kept at once."""
        return self._keyed.max_keys

    @property
    def waiting(self) -> int:
        """Calls waiting for their turn now."""
        return self._waiting

    def available(self, key: Key | None = None) -> int:
        """Calls that would be let through at once now (0 to `burst`), for ``key``'s limit.

        Without ``key``, the limit of calls that have none. Call it from
        async code (it reads the running loop's clock).
        """
        now = self._now()
        if key is None:
            return self._bucket.available(now)
        return self._keyed.available(checked(key, "key"), now)

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        call: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        read = None if self._key is None else key_reader(self._key, binding.origin)
        # One body; what it closes over is chosen here. An unkeyed limit in
        # this process closes over its bucket, and grants a free permit
        # inline: one clock read, one number compared and moved on (the
        # granted branch of `Gcra.reserve`). Keys or a store: a gate whose
        # turn never comes, which sends every call to `_enter`. Each name the
        # wrapper closes over is copied into every call's frame, so it closes
        # over what the granted path uses and reaches the rest through
        # `limiter` (the "RateLimiter, permit available" benchmark row).
        gate: Gcra | _Gate = self._bucket if read is None and self._store is None else _Gate(read)
        interval = self._bucket.interval
        limiter, metrics = self, self._metrics
        slot, timer = self._telemetry.provider_slot, self.timer()

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def limited(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await limiter.in_span(plain, args, kwargs)
                start = None
                if timer is not None:
                    start = timer()
                # `_now`, inlined: a running plain loop's clock is time.monotonic().
                if limiter._plain._thread_id is None:
                    now = limiter._find_clock()
                else:
                    now = _monotonic()
                if gate._tat > now:
                    tat = gate._tat
                    if tat - gate._tau <= now:  # a permit is free: TAT += T
                        gate._tat = tat + interval
                    else:
                        entered = limiter._enter(gate, now, start, args, kwargs)
                        if entered is not None:
                            await entered
                else:  # a full bucket: TAT = max(TAT, now) + T
                    gate._tat = now + interval
                try:
                    result = await (call(*args, **kwargs) if kwargs else call(*args))
                except BaseException as exc:
                    metrics.failed(exc, start)
                    raise
                metrics.success += 1
                if start is None:
                    return result
                return metrics.returned(result, start)

            return limited

        return self.build(make, binding)

    def _enter(
        self,
        gate: Gcra | _Gate,
        now: float,
        start: float | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Coroutine[Any, Any, object] | None:
        """The wrapper's way in when no permit was granted inline: what to await, if anything.

        ``gate`` is the limiter's bucket (no permit free now: wait for the
        turn, or refuse: counted there), or the `_Gate` of a binding with
        keys or a store. None: the call goes through unlimited (its key is
        None, or missing: the function will say so).
        """
        if type(gate) is Gcra:
            return self._wait(gate.reserve(now, self._max_wait), None, now, start)
        assert isinstance(gate, _Gate)
        read = gate.read
        if read is None:
            return self._admit(None, start, now)
        key = read(args, kwargs)
        if key is None or key is MISSING:
            return None
        return self._admit(key, start, now)

    def _now(self) -> float:
        """Now, on the running loop's clock (see `_clock.sample`)."""
        if self._plain._thread_id is None:  # (LOOP_THREAD_ID: set while a plain loop runs)
            return self._find_clock()
        return _monotonic()

    def _find_clock(self) -> float:
        """Now, and what the next calls read: ``time.monotonic()`` while a plain loop runs.

        The wrapper grants permits without telling the unkeyed bucket the
        time it saw (`Gcra._seen`, by which a bucket knows a new clock): it
        is told here, where every clock but a running plain loop's is read.
        """
        bucket = self._bucket
        if self._plain is not _NOT_PLAIN:  # time.monotonic() may have been read since
            seen = _monotonic()
            if seen > bucket._seen:
                bucket._seen = seen
        now, self._reader, plain = _clock.sample()
        self._plain = _NOT_PLAIN if plain is None else plain
        if now < bucket._seen:
            bucket._restart()  # a new clock: a new limit
        bucket._seen = now
        return now

    async def _admit(
        self, key: object, start: float | None, now: float | None = None
    ) -> tuple[str | None, float | None]:
        """Let a call through, at its turn of ``key``'s limit, or refuse it (counted here).

        ``key`` None: the limit of calls without a key. ``now``: the time the
        caller read (None: read it here). Returns the key as
        its bucket knows it (an int made a str), and, when the store decided,
        how far its bucket is from full (see `StoredTurn.ahead`).
        """
        if key is not None and (type(key) is not str or not 0 < len(key) <= KEY_MAX_LENGTH):
            try:
                key = checked(key, "the rate limiter's key")
            except Exception as exc:
                self._metrics.failed(exc, start)
                raise
        if now is None:
            now = self._now()
        if self._store is not None and (now >= self._store_at and not self._probing):
            ahead = await self._admit_shared(key, now, start)
            if ahead is not None:
                return key, ahead
            now = self._now()
        elif self._store is not None:
            self._metrics.store_unavailable += 1
        if key is None:
            turn = self._bucket.reserve(now, self._max_wait)
        else:
            turn = self._keyed.reserve(key, now, self._max_wait)
        if turn is not GRANTED:
            await self._wait(turn, key, now, start)
        return key, None

    async def _admit_shared(self, key: str | None, now: float, start: float | None) -> float | None:
        """Take the call's turn in the store, and wait for it; or refuse the call (counted here).

        Returns how far the bucket is from full at the turn; None when the
        store did not answer in time: the call is then the local buckets'
        to decide (counted in ``store_unavailable``). A store that failed is
        asked again `_STORE_RETRY` seconds later (doubling), one call at a
        time, while the others decide locally.
        """
        store = self._store
        assert store is not None
        deadline = _deadline_of_call()
        left = deadline - now
        # A turn at or after the deadline is refused: ask for one before it.
        max_wait = max(0.0, min(self._max_wait, math.nextafter(left, -math.inf)))
        # Half the time left at most, for the store: the call needs the rest.
        within = max(0.0, min(store.timeout, left / 2.0))
        interval = self._bucket.interval
        probing = self._store_at > -math.inf
        self._probing = probing
        try:
            turn = await store.reserve_turn(
                self._name, key, interval, self._bucket._tau, max_wait, within=within
            )
        except StoreUnavailable:
            if probing:  # still away: ask less often (calls in flight together count once)
                self._retry_store = min(self._retry_store * 2.0, _STORE_RETRY_MAX)
            self._store_at = self._now() + self._retry_store
            self._metrics.store_unavailable += 1
            return None
        finally:
            if probing:
                self._probing = False
        self._store_at = -math.inf
        self._retry_store = _STORE_RETRY
        if not turn.granted:
            self._refuse(turn.delay, start)
        delay = turn.delay
        if delay <= 0.0:
            return turn.ahead
        until = self._now() + delay
        if until >= deadline:  # the round trip took the time that was left
            store.give_back_turn(turn, until)
            self._refuse(delay, start)
        await self._sleep_for_turn(delay, start, lambda: store.give_back_turn(turn, until))
        return turn.ahead

    def _headroom(self, key: str | None, ahead: float | None = None) -> tuple[int, float | None]:
        """Calls ``key`` may make at once now, and seconds until one more (None: it is full).

        ``ahead``: how far the bucket is from full, in seconds, as the store
        said (None: read the local bucket now).
        """
        if ahead is None:
            now = self._now()
            if key is None:
                ahead = self._bucket.refill_time(now)
            else:
                ahead = self._keyed.refill_time(key, now)
        if ahead <= 0.0:
            return self._burst, None
        interval = self._bucket.interval
        used = math.ceil(ahead / interval)
        return max(0, self._burst - used), ahead - (used - 1) * interval

    async def _wait(
        self, turn: Turn | None, key: str | None, now: float, start: float | None
    ) -> None:
        """Wait until ``turn`` (reserved at ``now``) comes, or refuse the call (counted here).

        ``turn`` None: it would come after ``max_wait``. A turn that would
        come at or after the call's deadline (the ambient deadline, or an
        enclosing cancel scope's) is given back and the call refused at once:
        waiting would be in vain.
        """
        if turn is GRANTED:
            return
        if turn is None:
            self._refuse(self._wait_time(key, now), start)
        delay = turn.delay
        if now + delay >= _deadline_of_call():
            turn.cancel(now)
            self._refuse(delay, start)
        await self._sleep_for_turn(delay, start, lambda: turn.cancel(self._now()))

    async def _sleep_for_turn(
        self, delay: float, start: float | None, give_back: Callable[[], object]
    ) -> None:
        """Sleep ``delay`` seconds, counted as a wait; cancelled, ``give_back`` the turn."""
        metrics = self._metrics
        metrics.waits += 1
        metrics.waited += delay
        self._waiting += 1
        try:
            await anyio.sleep(delay)
        except BaseException as exc:
            give_back()
            metrics.failed(exc, start)
            raise
        finally:
            self._waiting -= 1

    def _wait_time(self, key: str | None, now: float) -> float:
        if key is None:
            return self._bucket.wait_time(now)
        return self._keyed.wait_time(key, now)

    def _refuse(self, retry_after: float, start: float | None) -> NoReturn:
        message = (
            f"rate limiter {self._name!r} is at its limit of {self._limit_text()}: "
            f"a permit is free in {retry_after:.3g}s"
        )
        error = RateLimitExceeded(message, policy=self._name, retry_after=retry_after)
        refuse(self, start, REJECTED_REASON, retry_after, error)

    def _limit_text(self) -> str:
        per = "a second" if self._per == 1.0 else f"per {self._per:g}s"
        calls = "call" if self._rate == 1 else "calls"
        return f"{self._rate:g} {calls} {per} (bursts of {self._burst})"

    def __repr__(self) -> str:
        key = spec_text(self._key)
        return (
            f"RateLimiter({self._rate:g}, per={self._per:g}, burst={self._burst}, "
            f"max_wait={self.max_wait}, key={key!r}, name={self._name!r})"
        )


@final
class _NotPlain:
    """`RateLimiter._plain` while no plain asyncio loop is known: never running."""

    __slots__ = ()
    _thread_id = None


_NOT_PLAIN: Final = _NotPlain()


@final
class _Gate:
    """What a binding with keys or a store closes over instead of a bucket.

    Its turn never comes (its TAT is +inf), so the wrapper's inline grant
    never fires and every call goes to `RateLimiter._enter`, which reads
    the call's key with ``read`` (None: no key, a store's limit).
    """

    __slots__ = ("read",)
    _tat = math.inf
    _tau = 0.0

    def __init__(self, read: Callable[[tuple[Any, ...], dict[str, Any]], object] | None) -> None:
        self.read = read


def _deadline_of_call() -> float:
    """When the call must be over: the ambient deadline, or an enclosing cancel scope's."""
    deadline = current_deadline()
    scope = anyio.current_effective_deadline()
    return scope if deadline is None or scope < deadline else deadline
