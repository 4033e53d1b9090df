"""In-memory stand-ins for the fleet-wide limits' store, on the event loop's clock.

`FleetStore` serves `RetryBudget(store=)` and `Bulkhead(store=)` the way
``stalwart.redis.RedisStore`` does (the same arithmetic as ``budget.lua`` and
``bulkhead.lua``), so that the policies' local logic runs in virtual time on
asyncio and trio. Several policies sharing one `FleetStore` are several
processes sharing one Redis: each has a member token of its own. Every
request takes ``latency`` seconds; ``down`` makes the store unreachable (a
request fails after ``latency``, or hangs for the caller's bound when
``hang``); ``cut`` makes it unreachable for some members only.
"""

from __future__ import annotations

import math
from typing import Any

import anyio

from stalwart import StoreUnavailable
from stalwart._bulkhead import PermitGrant
from stalwart._clock import now
from stalwart._retry_budget import BudgetTotals

SLOTS = 10


class FleetStore:
    def __init__(self, *, latency: float = 0.001, timeout: float = 1.0) -> None:
        self.latency = latency
        self.timeout = timeout
        self.down = False
        self.hang = False
        self.cut: set[str] = set()
        self.requests: dict[str, int] = {}
        # budget name -> {"slots": {slot: [q, r]}, "members": {member: (q, r, seen)}}
        self.budgets: dict[str, dict[str, Any]] = {}
        # bulkhead name -> {member: [count, lapses_at]}
        self.permits: dict[str, dict[str, list[float]]] = {}
        # bulkhead name -> {member: when it last asked in vain}
        self.waiting: dict[str, dict[str, float]] = {}

    async def _round_trip(self, what: str, member: str, within: float | None = None) -> None:
        self.requests[what] = self.requests.get(what, 0) + 1
        bound = self.timeout if within is None else min(self.timeout, within)
        if (self.down or member in self.cut) and self.hang:
            await anyio.sleep(bound)
            raise StoreUnavailable(f"no answer within {bound:g}s", policy="fake")
        await anyio.sleep(min(self.latency, bound))
        if self.down or member in self.cut:
            raise StoreUnavailable("refused", policy="fake")
        if self.latency > bound:
            raise StoreUnavailable(f"no answer within {bound:g}s", policy="fake")

    # -- RetryBudgetStore -----------------------------------------------------------------

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
        await self._round_trip("exchange_budget", member)
        record = self.budgets.setdefault(budget, {"slots": {}, "members": {}, "held": {}})
        slots, members, held = record["slots"], record["members"], record["held"]
        t = now()
        current = math.floor(t / (window / SLOTS))
        for slot in [s for s in slots if s <= current - SLOTS]:
            del slots[slot]
        seen = members.get(member)
        if seen is not None:
            add = (max(0, requests - seen[0]), max(0, retries - seen[1]))
        else:
            add = unsent
        if member in held:
            slot, count = held.pop(member)
            if slot in slots:
                slots[slot][1] -= count
        counts = slots.setdefault(current, [0, 0])
        counts[0] += add[0]
        counts[1] += add[1]
        members[member] = (requests, retries, t)
        for gone in [m for m, (_, _, at) in members.items() if at < t - window - member_ttl]:
            del members[gone]
            held.pop(gone, None)
        processes = sum(1 for _, _, at in members.values() if at >= t - member_ttl)
        total_q = sum(q for q, _ in slots.values())
        total_r = sum(r for _, r in slots.values())
        left = max(0.0, ratio * total_q + floor - total_r)
        granted = max(0, min(want, math.floor(left), math.ceil(left / max(1, processes))))
        counts[1] += granted
        held[member] = (current, granted)
        return BudgetTotals(total_q, total_r + granted, processes, granted)

    # -- PermitStore ----------------------------------------------------------------------

    def held(self, bulkhead: str) -> int:
        """Permits the fleet holds now (lapsed leases left out)."""
        t = now()
        return sum(int(c) for c, until in self.permits.get(bulkhead, {}).values() if until > t)

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
        if within <= 0.0:
            raise StoreUnavailable("the ambient deadline has passed", policy="fake")
        await self._round_trip("adjust_permits", member, within)
        leases = self.permits.setdefault(bulkhead, {})
        t = now()
        for gone in [m for m, (_, until) in leases.items() if until <= t]:
            del leases[gone]
        mine = int(leases.get(member, [0, 0.0])[0])
        total = sum(int(c) for c, _ in leases.values())
        granted = 0
        if delta < 0:
            granted = -min(-delta, mine)
        elif delta > 0:
            granted = max(0, min(delta, limit - total))
            if granted == delta and total + granted + extra <= far:
                granted += extra
        mine += granted
        total += granted
        if mine > 0:
            leases[member] = [mine, t + lease]
        else:
            leases.pop(member, None)
        waiting = self.waiting.setdefault(bulkhead, {})
        if delta > 0 and granted < delta:
            waiting[member] = t
        else:
            waiting.pop(member, None)
        for gone in [m for m, at in waiting.items() if at < t - 1.0]:
            del waiting[gone]
        contenders = len(set(leases) | set(waiting))
        others = any(m != member for m in waiting)
        return PermitGrant(granted, mine, total, max(1, contenders), others)
