"""The bulkhead store: permits of one fleet-wide limit, leased to processes through Redis.

`_Bulkheads` is the part of `RedisStore` that serves the `PermitStore`
protocol of `stalwart.Bulkhead`: a process asks for permits, gives them back
and renews its lease with one run of ``_lua/bulkhead.lua`` (one round trip),
from a task of its own; its calls take the permits it holds without a round
trip.

A bulkhead is a hash of the permits each process holds,
``{prefix}bulkhead:{<h>}``, a sorted set of their leases,
``{prefix}bulkhead:{<h>}:leases``, and a hash of the processes waiting for
permits, ``{prefix}bulkhead:{<h>}:waiting``, where ``<h>`` is 128 bits of
SHA-256 of the bulkhead's name in a hash tag: under Redis Cluster the three
live in one slot. A process that dies stops renewing; its permits lapse with its lease.
"""

from __future__ import annotations

from typing import Final

from .. import _clock
from .._bulkhead import PermitGrant
from ._client import _UNAVAILABLE, _Client, _digest, _ms, _Settlement
from ._scripts import Script

#: KEYS: the permits held, the leases, the processes waiting. ARGV: member,
#: delta, extra, limit, far, lease ms, waiting ms. See ``bulkhead.lua``.
BULKHEAD: Final = Script("bulkhead")

_WHAT: Final = "bulkhead permits"
# A process counts as waiting this long after it last asked in vain (it asks
# again every 20 to 200 ms while it waits).
_WAITING_MS: Final = 1000


class _Bulkheads(_Client):
    """Permits of fleet-wide bulkheads, leased to processes (see `stalwart.Bulkhead`)."""

    __slots__ = ()

    def _bulkhead_keys(self, bulkhead: str) -> tuple[str, str, str]:
        name = self._key("bulkhead", _digest(bulkhead))
        return name, f"{name}:leases", f"{name}:waiting"

    async def adjust_permits(
        self,
        bulkhead: str,
        member: str,
        delta: int,
        *,
        extra: int,
        limit: int,
        far: int,
        lease: float,
        within: float,
    ) -> PermitGrant:
        """Take ``delta`` more permits (or give ``-delta`` back, or renew): one round trip.

        Raises `StoreUnavailable` when Redis does not answer within
        ``within`` seconds (and the store's ``timeout``), `RuntimeError`
        once the store is closed. Called from the bulkhead's own task (its
        keeper), which `RedisStore.aclose` stops; ``member``'s permits are
        then given back.
        """
        if self._closed:
            raise self._closed_error()
        self._serve_user()
        bound = min(self._timeout, within)
        if bound <= 0.0:
            passed = TimeoutError("the ambient deadline has passed")
            raise self._unavailable(_WHAT, passed) from passed
        keys = self._bulkhead_keys(bulkhead)
        lease_ms = _ms("lease", lease)
        args = (member, delta, extra, limit, far, lease_ms, _WAITING_MS)
        held = (bulkhead, member)
        if delta > 0 and held not in self._leased:
            # It may hold permits from now on, whatever becomes of the
            # request: what `aclose` gives back (all it holds, at most the limit).
            self._leased[held] = _Settlement(
                "bulkhead's permits given back",
                BULKHEAD,
                keys,
                (member, -limit, 0, limit, 0, lease_ms, _WAITING_MS),
                _clock.now() + lease,
            )
        try:
            reply = await self._eval(BULKHEAD, keys, args, within=bound)
        except _UNAVAILABLE as exc:
            raise self._unavailable(_WHAT, exc, bound) from exc
        if int(reply[1]) == 0:
            self._leased.pop(held, None)
        else:
            settlement = self._leased.get(held)
            if settlement is not None:
                settlement.until = _clock.now() + lease
        return PermitGrant(
            int(reply[0]), int(reply[1]), int(reply[2]), max(1, int(reply[4])), reply[5] == 1
        )
