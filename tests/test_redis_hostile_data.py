"""Records that stalwart did not write: written by hand, by other software, or damaged.

Whatever lies under the store's prefix, a call either gets a clear error or
is served safely: no call waits for ever, none spins against Redis, and one
damaged record does not stop the store from serving the others.

Tests that count requests start a private ``redis-server`` (its command
statistics are then this test's alone) and stop it by its process.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

import stalwart as sw
from stalwart.redis import RedisStore

from . import redis_support
from .redis_support import private_redis

pytestmark = [pytest.mark.redis, pytest.mark.realtime]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


runs: list[str] = []


async def charge(payment: str) -> str:
    runs.append(payment)
    return f"charged {payment}"


def scripts_run(port: int) -> int:
    """How many scripts the private server on ``port`` has run so far."""
    with redis.Redis(port=port, socket_timeout=5.0) as admin:
        stats: dict[str, Any] = admin.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0)) for cmd in ("evalsha", "eval"))


async def test_a_claim_that_never_expires_is_given_a_lease_instead_of_holding_the_key() -> None:
    """A running record without expiry (PERSIST, a hand-written record) frees itself in a lease.

    Its waiters look again at their usual pace: they do not spin against Redis.
    """
    lease = 0.5
    with private_redis() as server:
        client = redis_support.client(server.url)
        try:
            async with RedisStore(client) as store:
                scope = f"idempotency:{__name__}.charge"
                held = await store.claim(scope, "p-1", fingerprint=None, lease=lease)
                assert isinstance(held, sw.Lease)
                record = store._record_key(scope, "p-1")
                assert await client.persist(record)  # a claim now held for ever
                guarded = sw.Idempotency(key="payment", store=store, lease=lease)(charge)
                runs.clear()
                before = scripts_run(server.port)
                start = time.monotonic()
                with sw.deadline(10.0):
                    assert await guarded("p-1") == "charged p-1"
                elapsed = time.monotonic() - start
                scripts = scripts_run(server.port) - before
        finally:
            await client.aclose()
    assert runs == ["p-1"]
    assert lease * 0.9 <= elapsed < 10.0  # it waited for the lease it gave the claim
    # A claim, a look, a claim, and storing the result, give or take a few
    # looks and renewals: not one look per millisecond.
    assert scripts < 20, scripts
