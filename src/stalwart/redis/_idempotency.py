"""The idempotency store: claims, results and waiters of a fleet, through Redis.

`_Idempotency` is the part of `RedisStore` that serves the `IdempotencyStore`
protocol: a claim is one script taking the key for a fresh token as a lease
(given back whatever happens to its request), a result is stored with its
fingerprint for the TTL, and waiters are woken by pub/sub (through the
follower) and look again on their own when a notification may be lost.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from .. import _clock
from .._codec import Codec
from .._errors import StoreUnavailable
from .._idempotency_store import Completed, InFlight, Lease
from . import _scripts
from ._client import _UNAVAILABLE, _bytes, _digest, _ms, _Settlement, _text, _void_key
from ._follower import _Follower, _Signal

#: What idempotency calls do when Redis cannot be reached (see `RedisStore`).
OnUnavailable = Literal["raise", "bypass"]

# Waiters look at a record this often when the notification that should wake
# them is not known to be subscribed; and at least this often in any case, so
# that a notification lost to a reconnection delays them by that much at most.
_UNCONFIRMED_POLL: Final = 0.05
_SAFETY_POLL: Final = 1.0


class _Watch:
    """The local waiters on one idempotency key, and its notification channel."""

    __slots__ = ("changed", "confirmed", "count")

    def __init__(self, confirmed: bool) -> None:
        self.count = 0
        self.changed = _Signal()  # fired by every notification, and when subscribed
        self.confirmed = confirmed  # the channel's subscription is confirmed


class _Idempotency(_Follower):
    """The `IdempotencyStore` protocol of `RedisStore`."""

    __slots__ = ()

    _codec: Codec
    _on_unavailable: OnUnavailable

    def _record_key(self, scope: str, key: str) -> str:
        return self._key("idem", _digest(f"{len(scope)}:{scope}{key}"))

    async def claim(
        self, scope: str, key: str, *, fingerprint: str | None, lease: float
    ) -> Lease | Completed | InFlight:
        """See `IdempotencyStore.claim`: one script, one round trip.

        Raises `StoreUnavailable` if Redis cannot be reached (or, with
        ``on_unavailable="bypass"``, returns a lease that holds nothing: the
        call runs, and nothing is stored). A claim that fails or is cancelled
        after it may have reached Redis is given back in the background
        (see "Nothing left behind").
        """
        lease_ms = _ms("lease", lease)
        name = self._record_key(scope, key)
        flag = "0" if fingerprint is None else "1"
        mark = b"" if fingerprint is None else _bytes(fingerprint)
        try:
            reply, token = await self._take(
                "claim",
                _scripts.CLAIM,
                lambda token: (name, _void_key(name, token)),
                lambda token, not_after: (token, flag, mark, lease_ms, not_after),
                lambda keys, token, not_after, last: _Settlement(
                    "claim given back",
                    _scripts.RELEASE,
                    keys,
                    (token, name, not_after + 1000),
                    last + lease,
                ),
            )
        except StoreUnavailable:
            if self._on_unavailable == "bypass":
                return Lease(scope, key, fingerprint, "", None, bypassed=True)
            raise
        status = reply[0]
        if status == b"leased":
            return Lease(scope, key, fingerprint, token, lease)
        if status == b"done":
            return Completed(self._decode(reply[3], scope), _text(reply[2]))
        return InFlight(_text(reply[2]))

    def _decode(self, data: Any, scope: str) -> Any:
        try:
            return self._codec.decode(bytes(data))
        except Exception as exc:
            raise ValueError(
                f"Redis store {self._name!r}: a stored result of {scope!r} cannot be decoded "
                f"by {self._codec!r} (written by another codec, or tampered with): {exc}"
            ) from exc

    async def complete(self, lease: Lease, value: Any, *, ttl: float) -> bool:
        """See `IdempotencyStore.complete`; wakes the key's waiters by pub/sub.

        Waits for Redis for at most ``timeout`` seconds, or until the
        ambient deadline, whichever is nearer (a caller's shield does not
        lift that bound). If Redis has not answered by then, the result is
        stored in the background as soon as it does, while the lease holds,
        and this returns False: the call has run, its caller gets its
        result, and its retries get it too once it is stored.
        """
        payload = self._codec.encode(value)  # before any I/O: a TypeError keeps the claim
        ttl_ms = _ms("ttl", ttl)
        if not lease.token:
            return False  # bypassed: this lease never held the key
        name = self._record_key(lease.scope, lease.key)
        try:
            stored = await self._settle(
                _Settlement(
                    "result stored",
                    _scripts.COMPLETE,
                    (name,),
                    (lease.token, payload, ttl_ms, name),
                    _clock.now() + (lease.duration or 0.0),
                )
            )
        except StoreUnavailable:
            return False
        return bool(stored)

    async def release(self, lease: Lease) -> None:
        """See `IdempotencyStore.release`.

        Waits for Redis for at most ``timeout`` seconds, or until the
        ambient deadline, whichever is nearer; if Redis has not answered by
        then, the key is released in the background as soon as it does, and
        this raises `StoreUnavailable` (which the policies log).
        """
        if not lease.token:
            return
        name = self._record_key(lease.scope, lease.key)
        await self._settle(
            _Settlement(
                "claim released",
                _scripts.RELEASE,
                (name, _void_key(name, lease.token)),
                (lease.token, name, 0),
                _clock.now() + (lease.duration or 0.0),
            )
        )

    async def renew(self, lease: Lease) -> bool:
        """See `IdempotencyStore.renew`; raises `StoreUnavailable` if Redis cannot be reached."""
        if not lease.token or lease.duration is None:
            return False
        name = self._record_key(lease.scope, lease.key)
        try:
            held = await self._eval(
                _scripts.RENEW, (name,), (lease.token, _ms("lease", lease.duration))
            )
        except _UNAVAILABLE as exc:
            raise self._unavailable("renew", exc) from exc
        return bool(held)

    async def wait(self, scope: str, key: str, *, timeout: float) -> Completed | None:
        """See `IdempotencyStore.wait`: woken by pub/sub, and when the lease lapses.

        Looks at the record again at least every second, in case a
        notification was lost. Raises `StoreUnavailable` if Redis cannot be
        reached (returns None with ``on_unavailable="bypass"``).
        """
        name = self._record_key(scope, key)
        end = _clock.now() + timeout
        watch = self._watch(name)
        try:
            if not watch.confirmed:
                subscribed = watch.changed.arm()
                if not watch.confirmed:
                    await watch.changed.wait(subscribed, min(timeout, self._timeout))
            while True:
                changed = watch.changed.arm()
                try:
                    reply = await self._eval(_scripts.PEEK, (name,), ())
                except _UNAVAILABLE as exc:
                    if self._on_unavailable == "bypass":
                        return None
                    raise self._unavailable("wait", exc) from exc
                if reply is None:
                    return None
                if reply[0] == b"done":
                    return Completed(self._decode(reply[2], scope), _text(reply[1]))
                left = end - _clock.now()
                if left <= 0:
                    return None
                pause = min(left, _SAFETY_POLL if watch.confirmed else _UNCONFIRMED_POLL)
                lease_left = int(reply[2])
                if lease_left >= 0:  # PTTL: -1 for a claim that never expires (not ours)
                    pause = min(pause, lease_left / 1000.0 + 0.001)
                await watch.changed.wait(changed, pause)
        finally:
            self._unwatch(name, watch)

    def _watch(self, name: str) -> _Watch:
        watch = self._watches.get(name)
        if watch is None:
            watch = self._watches[name] = _Watch(confirmed=name in self._confirmed)
            self._kick()
        watch.count += 1
        return watch

    def _unwatch(self, name: str, watch: _Watch) -> None:
        watch.count -= 1
        if watch.count == 0 and self._watches.get(name) is watch:
            del self._watches[name]
            self._wake.fire()  # to unsubscribe; a stopped follower stays stopped
