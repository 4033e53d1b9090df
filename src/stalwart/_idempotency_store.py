"""Where idempotency records live: the store protocol and the in-process store.

The protocol is what `Idempotency`, the ASGI ``IdempotencyMiddleware`` and any
shared store (``stalwart.redis.RedisStore``) agree on. It is small on purpose:
one atomic *claim* that answers "run it", "here is the stored result" or
"someone is running it"; *complete* and *release* for the claim's holder;
*renew* to keep a claim alive; and *wait* for an in-flight call to end.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeAlias, cast, final, runtime_checkable

import anyio

from . import _clock, _validate
from ._codec import Codec

__all__ = [
    "ClaimOutcome",
    "Completed",
    "IdempotencyStore",
    "InFlight",
    "Lease",
    "MemoryStore",
]

DEFAULT_MAX_ENTRIES: Final = 10_000

Slot = tuple[str, str]  # (scope, key)
Record: TypeAlias = tuple[float, Any, str | None]  # (expires, value, fingerprint)


@final
@dataclass(slots=True, eq=False)
class Lease:
    """A claim on a key: its holder must run the call, then complete or release.

    Returned by `IdempotencyStore.claim` when the key was free. Pass it back
    to ``complete``, ``release`` and ``renew``; treat it as read-only.

    Attributes:
        scope: the scope the key was claimed in.
        key: the idempotency key.
        fingerprint: the claimer's fingerprint (others see it in `InFlight`).
        token: an opaque string by which a shared store recognises the holder
            (a random value unique to this claim). The in-process
            `MemoryStore` recognises the `Lease` object itself and leaves it
            empty.
        duration: seconds the claim lasts unless renewed (the holder's
            `Idempotency` renews it every ``duration / 3`` seconds while the
            call runs), or ``None`` when it lasts until completed or
            released, because its holder cannot vanish without the store
            knowing (an in-process store).
        bypassed: the lease holds nothing: the store could not be reached
            and let the call run without de-duplication (``RedisStore(...,
            on_unavailable="bypass")``); nothing is stored for it, and the
            store reports its outage itself, not each call it let through.
    """

    scope: str
    key: str
    fingerprint: str | None
    token: str = ""
    duration: float | None = None
    bypassed: bool = False


@final
@dataclass(slots=True)
class Completed:
    """A stored result: the key's call succeeded and ``value`` is what it returned.

    ``fingerprint`` is the one the call was claimed with (``None`` if it had
    none). A store built on a codec returns a freshly decoded ``value`` each
    time; the in-process `MemoryStore` (without a codec) returns the very
    object the call returned. Treat it as read-only.
    """

    value: Any
    fingerprint: str | None


@final
@dataclass(slots=True)
class InFlight:
    """The key is claimed by a call still running; ``fingerprint`` is that call's."""

    fingerprint: str | None


ClaimOutcome: TypeAlias = Lease | Completed | InFlight


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where idempotency records live; implement it to keep them elsewhere.

    `Idempotency`, the ASGI ``IdempotencyMiddleware`` and
    ``stalwart.redis.RedisStore`` all speak this protocol. Its methods are
    specified precisely below; `MemoryStore` is the in-process reference,
    and the project's ``tests/test_idempotency_store.py`` is a conformance
    suite that any store can be run through.

    **Scopes and keys.** Records live under a *scope* and a *key*, both
    opaque strings: ``scope`` says whose records they are (`Idempotency`
    uses its ``name`` and the decorated function's module and qualified
    name; the ASGI middleware a hash of the caller's credentials), ``key`` is
    the user's idempotency key (1-255 printable characters, any of them). A
    store must keep every (scope, key) pair apart, ``("a:b", "c")`` from
    ``("a", "b:c")`` (escape or hash them), and no key may address anything
    outside its own record.

    **States.** A key is **free** (never claimed, released, expired or
    evicted), **in flight** (claimed by the holder of a `Lease`), or
    **completed** (it holds a value, until its TTL runs out). Every method
    is safe to call concurrently from many tasks and, for a shared store,
    from many processes: ``claim`` in particular must be atomic.

    **Values** are whatever the holder passes to ``complete``. A store that
    keeps them outside the process encodes them with a `Codec` (JSON by
    default, never pickle) and raises the codec's `TypeError` from
    ``complete`` for a value it cannot encode, keeping the claim (the caller
    then releases it). A store may keep the objects themselves (in process).

    **Leases.** A claim made by a process that can die without telling the
    store (anything shared) is a lease of ``lease`` seconds (reported as
    `Lease.duration`): its holder renews it every third of that while the
    call runs, and if the holder dies the key frees itself when the lease
    runs out. A store that knows when its holders are gone (in process) may
    grant claims that last until completed or released (``duration=None``).

    **Cancellation.** Callers run ``complete`` and ``release`` shielded from
    cancellation, for at most a few seconds, so that a cancelled holder
    still frees its key; a shared store should still bound its own network
    waits, by the ambient deadline too (`stalwart.remaining`), and may
    finish in the background what did not get through in time (as
    ``RedisStore`` does). A store that finishes them in the background
    when they are cancelled, too, says so with a true
    ``settles_in_background`` attribute: callers then do not shield them,
    and a cancelled caller goes at once instead of waiting for the store.
    A claim whose request fails or is cancelled after it may have reached
    a shared store must not stay held: ``RedisStore`` names each claim by
    a token of its own choosing and gives it back. If ``release`` never
    gets through (the process died, the network is down),
    the lease's expiry frees the key.

    **Limits.** A store that keeps durations where they are bounded says so
    with a ``max_duration`` attribute (seconds); `Idempotency` and the ASGI
    middleware refuse a longer ``ttl`` or ``lease`` when they are built.

    **Costs.** `Idempotency` makes one ``claim`` per call, plus one
    ``complete`` (success) or ``release`` (failure) when it ran the call,
    ``renew`` every ``lease / 3`` seconds while a call runs, and ``wait`` +
    ``claim`` rounds while it waits for another call. A replay is therefore
    one ``claim``: make it one round trip.
    """

    async def claim(
        self, scope: str, key: str, *, fingerprint: str | None, lease: float
    ) -> Lease | Completed | InFlight:
        """Claim a free key, or report its stored result or its holder.

        Atomically: if the key is free, claim it for the caller and return a
        `Lease` (recording ``fingerprint``, lasting ``lease`` seconds unless
        renewed, or until completed or released where the store can tell
        that its holder is gone); if it holds an unexpired value, return
        `Completed` (the value and the fingerprint it was claimed with); if a
        live lease holds it, return `InFlight` with the holder's
        fingerprint. Of many concurrent claims of a free key exactly one gets
        the `Lease`. Fingerprints are not compared here: the caller does it.
        """
        ...

    async def complete(self, lease: Lease, value: Any, *, ttl: float) -> bool:
        """Store the call's result under the key for ``ttl`` seconds, if ``lease`` holds it.

        If ``lease`` still holds the key: store ``value`` with the lease's
        fingerprint for ``ttl`` seconds, end the claim, wake the key's
        waiters and return True. If it does not (it lapsed or was released,
        and someone else may have claimed the key since): change nothing and
        return False. A value the store's codec cannot encode raises
        `TypeError` and changes nothing.
        """
        ...

    async def release(self, lease: Lease) -> None:
        """Free the key, if ``lease`` holds it: its call failed or was cancelled.

        Ends the claim and wakes the key's waiters. Does nothing (and does
        not raise) for a lease that no longer holds the key.
        """
        ...

    async def renew(self, lease: Lease) -> bool:
        """Extend the claim by ``lease.duration`` seconds from now, if ``lease`` holds it.

        Returns True if it does, False otherwise (the holder has lost the key
        and must not expect ``complete`` to succeed). For a lease whose
        ``duration`` is None, just reports whether it still holds the key.
        """
        ...

    async def wait(self, scope: str, key: str, *, timeout: float) -> Completed | None:
        """Wait for the key's call in flight to end; its result, or None.

        Returns when the key stops being in flight (its holder completed or
        released it, or its lease lapsed) or ``timeout`` seconds have
        passed, whichever comes first; at once if the key is not in flight.
        Returns the key's `Completed` record if it has one, else None (free,
        or still in flight at the timeout): the caller then claims again, and
        when a failed holder frees a key, every waiter wakes and the atomic
        ``claim`` picks the one that runs next. Waiters may be woken by
        notification (in process; Redis pub/sub) or by polling at a bounded
        interval, but a lapsed lease must be noticed by the next poll.
        """
        ...


@final
class MemoryStore:
    """The in-process idempotency store: bounded, least recently used first out.

    Holds at most ``max_entries`` stored results (least recently used evicted
    first; a replay counts as a use) and drops each when its TTL has passed,
    so memory stays flat however many distinct keys go through it. Calls in
    flight are tracked separately and never evicted (there are as many as
    calls running at once). Time is read from the running event loop's
    clock, so TTLs follow virtual time in tests.

    Without a ``codec`` (the default), results are kept as the Python objects
    the calls returned, and every replay returns **that same object**: a
    caller that mutates it changes what later replays see. Return immutable
    values (or copies), or pass ``codec=sw.JSONCodec()``: results are then
    encoded when stored and decoded on each replay, so each caller gets a
    fresh copy, and a result that could not cross a shared store (Redis)
    fails here too, early.

    The store is not shared between processes: each replica of a service
    has its own records, and a retry that reaches another replica runs
    again (``stalwart.redis.RedisStore`` shares them). Use it from one event
    loop thread.

    Args:
        max_entries: the most results kept, >= 1 (default 10,000).
        codec: encode results (see above); default: keep the objects.

    Example::

        store = sw.MemoryStore(max_entries=50_000)
        charge = sw.Idempotency(key="payment_id", store=store, ttl=3600)
    """

    __slots__ = ("_claims", "_codec", "_events", "_max", "_records")

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, *, codec: Codec | None = None
    ) -> None:
        self._max = _validate.count("max_entries", max_entries)
        if codec is not None and not (
            callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))
        ):
            raise TypeError(
                f"codec must have encode() and decode() methods, not {type(codec).__name__}"
            )
        self._codec = codec
        # Plain tuples and lists, not `Completed`/`Lease` objects: building
        # an object per call is a large share of a decorated call's budget.
        # (scope, key) -> (expires, value, fingerprint); least recently used first.
        self._records: OrderedDict[Slot, Record] = OrderedDict()
        # (scope, key) -> the holder: a `Lease` (claimed through the
        # protocol) or a one-item list of the fingerprint (claimed by
        # `Idempotency` directly); either way recognised by identity.
        self._claims: dict[Slot, Lease | list[str | None]] = {}
        # Created only when someone waits on a key in flight.
        self._events: dict[Slot, anyio.Event] = {}

    @property
    def max_entries(self) -> int:
        return self._max

    @property
    def codec(self) -> Codec | None:
        return self._codec

    def __len__(self) -> int:
        """Stored results (expired ones are dropped lazily and may still count)."""
        return len(self._records)

    def clear(self) -> None:
        """Forget every stored result (calls in flight keep their claims)."""
        self._records.clear()

    # -- the protocol ---------------------------------------------------------

    async def claim(
        self, scope: str, key: str, *, fingerprint: str | None, lease: float
    ) -> Lease | Completed | InFlight:
        """See `IdempotencyStore`; ``lease`` is unused: claims here end with
        their holder (``Lease.duration`` is None)."""
        slot = (scope, key)
        found = self._fresh(slot)
        if found is not None:
            return Completed(found[1], found[2])
        holder = self._claims.get(slot)
        if holder is not None:
            return InFlight(_fingerprint_of(holder))
        claimed = self._claims[slot] = Lease(scope, key, fingerprint)
        return claimed

    async def complete(self, lease: Lease, value: Any, *, ttl: float) -> bool:
        """See `IdempotencyStore`."""
        return self._complete_now((lease.scope, lease.key), lease, value, ttl)

    async def release(self, lease: Lease) -> None:
        """See `IdempotencyStore`."""
        self._release_now((lease.scope, lease.key), lease)

    async def renew(self, lease: Lease) -> bool:
        """See `IdempotencyStore`: True while ``lease`` holds its key."""
        return self._claims.get((lease.scope, lease.key)) is lease

    async def wait(self, scope: str, key: str, *, timeout: float) -> Completed | None:
        """See `IdempotencyStore`; woken by the holder's complete or release."""
        slot = (scope, key)
        if slot in self._claims:
            event = self._events.get(slot)
            if event is None:
                event = self._events[slot] = anyio.Event()
            with anyio.move_on_after(timeout):
                await event.wait()
        found = self._fresh(slot)
        return None if found is None else Completed(found[1], found[2])

    # -- synchronous core: `Idempotency` calls these directly (no awaits) -----

    def _claim_now(self, slot: Slot, fingerprint: str | None) -> Record | InFlight | list[Any]:
        """A fresh record (a replay), the holder's `InFlight`, or a new claim
        (a one-item list holding ``fingerprint``: the claim's identity)."""
        found = self._records.get(slot)
        if found is not None:
            if _clock.now() < found[0]:
                self._records.move_to_end(slot)
                if self._codec is None:
                    return found
                return (found[0], self._codec.decode(found[1]), found[2])
            del self._records[slot]
        holder = self._claims.get(slot)
        if holder is not None:
            return InFlight(_fingerprint_of(holder))
        claim = self._claims[slot] = [fingerprint]
        return claim

    def _complete_now(self, slot: Slot, holder: Lease | list[Any], value: Any, ttl: float) -> bool:
        claims = self._claims
        if claims.get(slot) is not holder:
            return False
        if self._codec is not None:
            value = self._codec.encode(value)  # may raise: the caller releases
        del claims[slot]
        now = _clock.now()
        records = self._records
        records[slot] = (
            now + ttl,
            value,
            holder[0] if type(holder) is list else holder.fingerprint,  # type: ignore[union-attr]
        )
        if len(records) > self._max:
            records.popitem(last=False)
        else:
            # Not full: drop the least recently used record if it expired,
            # so stale results do not linger until the store fills up.
            for oldest in records.values():
                if oldest[0] <= now:
                    records.popitem(last=False)
                break
        if self._events:
            event = self._events.pop(slot, None)
            if event is not None:
                event.set()
        return True

    def _release_now(self, slot: Slot, holder: Lease | list[Any]) -> None:
        if self._claims.get(slot) is holder:
            del self._claims[slot]
            event = self._events.pop(slot, None)
            if event is not None:
                event.set()

    def _fresh(self, slot: Slot) -> Record | None:
        """The unexpired record for ``slot``, decoded (a use, for the LRU order)."""
        found = self._records.get(slot)
        if found is None:
            return None
        if _clock.now() >= found[0]:
            del self._records[slot]
            return None
        self._records.move_to_end(slot)
        if self._codec is None:
            return found
        return (found[0], self._codec.decode(found[1]), found[2])

    def __repr__(self) -> str:
        codec = "" if self._codec is None else f", codec={self._codec!r}"
        return f"MemoryStore(max_entries={self._max}{codec})"


def _fingerprint_of(holder: Lease | list[Any]) -> str | None:
    fingerprint: str | None = holder.fingerprint if type(holder) is Lease else holder[0]
    return fingerprint


def resolve_store(store: IdempotencyStore | None, max_entries: int | None) -> IdempotencyStore:
    """The ``store=`` of the decorator or the middleware, checked; None: a new `MemoryStore`."""
    if store is None:
        return MemoryStore(
            DEFAULT_MAX_ENTRIES
            if max_entries is None
            else _validate.count("max_entries", max_entries)
        )
    if max_entries is not None:
        raise ValueError(
            "max_entries sizes the default in-process store; with store=..., "
            "size that store instead (MemoryStore(max_entries=...))"
        )
    if not isinstance(cast(object, store), IdempotencyStore):
        raise TypeError(
            "store must implement stalwart.IdempotencyStore (claim, complete, release, "
            f"renew, wait), not {type(store).__name__}"
        )
    return store
