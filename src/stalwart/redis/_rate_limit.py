"""The rate limit store: one GCRA bucket per limiter name and key, shared through Redis.

`_RateLimits` is the part of `RedisStore` that serves the `RateLimitStore`
protocol of `stalwart.RateLimiter`: a reservation is one run of
``_lua/gcra.lua`` (one round trip, on Redis's clock), a turn given back is
sent from the background (see "Nothing left behind" in `RedisStore`).

Buckets are strings named ``{prefix}rate:<h>`` (a limiter without keys) or
``{prefix}rate:<h>:<k>``, where ``<h>`` and ``<k>`` are 128 bits of SHA-256
of the limiter's name and of the key: no user-chosen text reaches a key
name (on a Redis Cluster, the digests are the key's hash tag: see
`_Client._key`). Each holds the bucket's theoretical arrival time and expires when the
bucket would be full again: an idle limit leaves nothing behind.
"""

from __future__ import annotations

import math
from typing import Any, Final

from .._rate_limiter import StoredTurn
from ._client import _UNAVAILABLE, _Client, _digest, _Settlement
from ._scripts import Script

#: KEYS: the bucket. ARGV: "reserve", interval, tau, max_wait, now ('': the
#: server's). Or "cancel", before, after, now. See ``gcra.lua``.
GCRA: Final = Script("gcra")

_WHAT: Final = "rate limit"


class _RateLimits(_Client):
    """Reservations of turns in shared GCRA buckets (see `stalwart.RateLimiter`)."""

    __slots__ = ()

    def _bucket(self, limit: str, key: str | None) -> str:
        if key is None:
            return self._key("rate", _digest(limit))
        return self._key("rate", _digest(limit), _digest(key))

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
        """Reserve the next turn of ``limit``'s bucket for ``key``: one round trip.

        The turn is granted when it comes within ``max_wait`` seconds of
        Redis's clock (``TIME``); otherwise nothing changes and the reply
        says when a permit is free. Raises `StoreUnavailable` when Redis does
        not answer within ``within`` seconds (and the store's ``timeout``).
        A request cut short after it reached Redis leaves its turn taken: a
        turn lost, on the strict side.
        """
        bound = min(self._timeout, within)
        if bound <= 0.0:
            passed = TimeoutError("the ambient deadline has passed")
            raise self._unavailable(_WHAT, passed) from passed
        bucket = self._bucket(limit, key)
        wait = "inf" if max_wait == math.inf else repr(max_wait)
        args = ("reserve", repr(interval), repr(tau), wait, "")
        try:
            reply = await self._eval(GCRA, (bucket,), args, within=bound)
        except _UNAVAILABLE as exc:
            raise self._unavailable(_WHAT, exc, bound) from exc
        if reply[0] != 1:
            return StoredTurn(False, float(reply[1]))
        delay, after, now = float(reply[1]), float(reply[3]), float(reply[4])
        handle = (bucket, reply[2], reply[3])
        return StoredTurn(True, delay, after - now - delay, now + delay, handle)

    def give_back_turn(self, turn: StoredTurn, until: float) -> None:
        """Give ``turn`` back from the background: it is still the bucket's last, or lost.

        ``until``: the loop time of the turn, after which it does not matter.
        """
        handle: Any = turn.handle
        if not turn.granted or handle is None:
            return
        bucket, before, after = handle
        self._settle_later(
            _Settlement(
                "rate limit turn given back", GCRA, (bucket,), ("cancel", before, after, ""), until
            )
        )
