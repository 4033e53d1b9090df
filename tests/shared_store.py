"""A stand-in for a store shared between processes, to test the protocol's other half.

`SharedStore` keeps its data in memory but behaves the way a shared store
(``stalwart.redis.RedisStore``) must, and unlike `stalwart.MemoryStore`:

* every method awaits once, like a network round trip, and does its work
  atomically after it (a Redis command or Lua script);
* values cross as bytes through a codec (JSON by default);
* the holder of a claim is recognised by a random token, not by identity;
* claims are leases that expire unless renewed (a holder may die silently);
* waiters poll at a bounded interval instead of being notified;
* (scope, key) pairs are escaped into one flat namespace, as Redis keys are.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

import anyio
import anyio.lowlevel

from stalwart import Codec, Completed, InFlight, JSONCodec, Lease
from stalwart._clock import now


class SharedStore:
    def __init__(self, codec: Codec | None = None, *, poll: float = 0.05) -> None:
        self.codec: Codec = JSONCodec() if codec is None else codec
        self.poll = poll
        # name -> ["claim", token, fingerprint, expires] | ["done", payload, fingerprint, expires]
        self.data: dict[str, list[Any]] = {}
        self.calls: dict[str, int] = {}

    @staticmethod
    def _name(scope: str, key: str) -> str:
        return "idem:" + json.dumps([scope, key])

    def _live(self, name: str) -> list[Any] | None:
        entry = self.data.get(name)
        if entry is not None and now() >= entry[3]:
            del self.data[name]
            return None
        return entry

    async def _round_trip(self, method: str) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        await anyio.lowlevel.checkpoint()

    async def claim(
        self, scope: str, key: str, *, fingerprint: str | None, lease: float
    ) -> Lease | Completed | InFlight:
        await self._round_trip("claim")
        name = self._name(scope, key)
        entry = self._live(name)
        if entry is None:
            token = secrets.token_hex(16)
            self.data[name] = ["claim", token, fingerprint, now() + lease]
            return Lease(scope, key, fingerprint, token, lease)
        if entry[0] == "done":
            return Completed(self.codec.decode(entry[1]), entry[2])
        return InFlight(entry[2])

    def _held(self, lease: Lease) -> list[Any] | None:
        entry = self._live(self._name(lease.scope, lease.key))
        if entry is None or entry[0] != "claim" or entry[1] != lease.token:
            return None
        return entry

    async def complete(self, lease: Lease, value: Any, *, ttl: float) -> bool:
        await self._round_trip("complete")
        if self._held(lease) is None:
            return False
        payload = self.codec.encode(value)
        self.data[self._name(lease.scope, lease.key)] = [
            "done",
            payload,
            lease.fingerprint,
            now() + ttl,
        ]
        return True

    async def release(self, lease: Lease) -> None:
        await self._round_trip("release")
        if self._held(lease) is not None:
            del self.data[self._name(lease.scope, lease.key)]

    async def renew(self, lease: Lease) -> bool:
        await self._round_trip("renew")
        entry = self._held(lease)
        if entry is None:
            return False
        assert lease.duration is not None
        entry[3] = now() + lease.duration
        return True

    async def wait(self, scope: str, key: str, *, timeout: float) -> Completed | None:
        await self._round_trip("wait")
        name = self._name(scope, key)
        end = now() + timeout
        while True:
            entry = self._live(name)
            if entry is None:
                return None
            if entry[0] == "done":
                return Completed(self.codec.decode(entry[1]), entry[2])
            left = end - now()
            if left <= 0:
                return None
            await anyio.sleep(min(self.poll, left))
