"""The retry budget store: one window of counts per budget name, shared through Redis.

`_Budgets` is the part of `RedisStore` that serves the `RetryBudgetStore`
protocol of `stalwart.RetryBudget`: each process sends its running totals
every sync interval with one run of ``_lua/budget.lua`` (one round trip),
reserves its share of the retries the fleet has left, and reads the fleet's
totals back.

A budget is one hash, ``{prefix}budget:{<h>}``, where ``<h>`` is 128 bits of
SHA-256 of the budget's name in a hash tag: the script touches that one key,
so under Redis Cluster it lives in one slot. It expires when no process has
written it for a window: an idle budget leaves nothing behind.
"""

from __future__ import annotations

import math
from typing import Final

from .._retry_budget import BudgetTotals
from ._client import _UNAVAILABLE, _Client, _digest
from ._scripts import Script

#: KEYS: the budget. ARGV: member, requests, retries, unsent requests, unsent
#: retries, slot ms, slots, member TTL ms, ratio, floor, want. See ``budget.lua``.
BUDGET: Final = Script("budget")

_WHAT: Final = "retry budget"
_SLOTS: Final = 10


class _Budgets(_Client):
    """Windows of first attempts and retries shared by a fleet (see `stalwart.RetryBudget`)."""

    __slots__ = ()

    def _budget_key(self, budget: str) -> str:
        return self._key("budget", _digest(budget))

    async def exchange_budget(
        self,
        budget: str,
        member: str,
        requests: int,
        retries: int,
        unsent: tuple[int, int],
        *,
        window: float,
        member_ttl: float,
        ratio: float,
        floor: float,
        want: int,
    ) -> BudgetTotals:
        """Add ``member``'s counts to ``budget``'s window, reserve its share: one round trip.

        Raises `StoreUnavailable` when Redis does not answer within the
        store's ``timeout``, `RuntimeError` once the store is closed. Called
        from the budget's own task, which `RedisStore.aclose` stops.
        """
        if self._closed:
            raise self._closed_error()
        self._serve_user()
        slot_ms = max(1, math.ceil(window * 1000.0 / _SLOTS))
        ttl_ms = max(1, math.ceil(member_ttl * 1000.0))
        args = (
            member,
            requests,
            retries,
            unsent[0],
            unsent[1],
            slot_ms,
            _SLOTS,
            ttl_ms,
            repr(ratio),
            repr(floor),
            want,
        )
        try:
            reply = await self._eval(BUDGET, (self._budget_key(budget),), args)
        except _UNAVAILABLE as exc:
            raise self._unavailable(_WHAT, exc) from exc
        return BudgetTotals(int(reply[0]), int(reply[1]), max(1, int(reply[2])), int(reply[3]))
