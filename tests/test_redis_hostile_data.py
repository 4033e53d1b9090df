"""Records that stalwart did not write: written by hand, by other software, or damaged.

Whatever lies under the store's prefix, a call either gets a clear error or
is served safely: no call waits for ever, none spins against Redis, and one
damaged record does not stop the store from serving the others.

Tests that count requests start a private ``redis-server`` (its command
statistics are then this test's alone) and stop it by its process.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import pytest
import redis

import stalwart as sw
from stalwart import CircuitState
from stalwart.redis import RedisStore
from stalwart.redis._client import _digest

from . import redis_support
from .redis_support import Boom, breaker, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.realtime]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


CLOSED, OPEN = CircuitState.CLOSED, CircuitState.OPEN

runs: list[str] = []


async def charge(payment: str) -> str:
    runs.append(payment)
    return f"charged {payment}"


async def boom() -> str:
    raise Boom


async def ok() -> str:
    return "ok"


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


async def test_a_key_of_another_type_fails_a_call_with_an_error_naming_it_and_the_fix() -> None:
    """The same error whether the script was known (EVALSHA) or loaded again (a pipeline)."""
    with private_redis() as server:
        client = redis_support.client(server.url)
        try:
            store = RedisStore(client, name="orders-redis", prefix="orders:")
            scope = f"idempotency:{__name__}.charge"
            record = store._record_key(scope, "p-1")
            await client.set(record, "written by another program")
            guarded = sw.Idempotency(key="payment", store=store)(charge)
            runs.clear()
            messages = []
            for _ in range(2):  # the first loads the script (NOSCRIPT), the second knows it
                with pytest.raises(redis.ResponseError) as info:
                    await guarded("p-1")
                messages.append(str(info.value))
            await store.aclose()
        finally:
            await client.aclose()
    assert runs == []
    for message in messages:
        assert message.startswith("Redis store 'orders-redis': the claim script failed on ")
        assert record in message
        assert "WRONGTYPE" in message
        assert "does another program use the prefix 'orders:'?" in message


async def test_a_breaker_key_of_another_type_does_not_stop_the_others_being_followed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="stalwart.redis")
    async with (
        redis_support.opened_store(reconcile_interval=0.05) as first,
        RedisStore(first.client, prefix=first.prefix, reconcile_interval=0.05) as second,
    ):
        damaged = first._key("circuit", _digest("damaged"))
        await first.client.set(damaged, "written by another program")
        mine = [breaker(first, "damaged"), breaker(first, "healthy", open_for=30.0)]
        theirs = [breaker(second, "damaged"), breaker(second, "healthy", open_for=30.0)]
        await first.sync()  # reads every record, the damaged one too
        await second.sync()
        with pytest.raises(Boom):
            await mine[1](boom)()
        assert mine[1].state is OPEN
        await redis_support.until(lambda: theirs[1].state is OPEN)  # by pub/sub
        # Re-read every 50 ms, and still followed: the damaged key is
        # reported once by each store, and its breakers go on alone.
        await asyncio.sleep(0.3)
        assert theirs[1].state is OPEN
        assert theirs[0].state is CLOSED
        warned = [r for r in caplog.records if "did not write (not a hash)" in r.getMessage()]
        assert len(warned) == 2
        assert "'damaged'" in warned[0].getMessage()
        # Deleted: the key holds a record again once a breaker writes one.
        await first.client.delete(damaged)
        with pytest.raises(Boom):
            await mine[0](boom)()
        await redis_support.until(lambda: theirs[0].state is OPEN)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "foreign",
    [
        "inf",
        "nan",
        "1e300",
        "not a number",
        "1800000000000.125",  # a time in milliseconds: ages ahead, read in seconds
    ],
)
async def test_a_rate_limit_bucket_that_stalwart_did_not_write_is_read_as_empty(
    foreign: str,
) -> None:
    """Such a value, kept without an expiry, would refuse every call for ever; it is replaced."""
    async with redis_support.opened_store() as store:
        limiter = sw.RateLimiter(rate=1, per=3600, store=store, name="partner")
        bucket = store._bucket("partner", None)
        await store.client.set(bucket, foreign)
        assert await limiter(ok)() == "ok"
        with pytest.raises(sw.RateLimitExceeded):  # and the limit holds again
            await limiter(ok)()
        assert 0 < await store.client.pttl(bucket) <= 3600 * 1000
        written = await store.client.get(bucket)
        assert written is not None
        assert math.isfinite(float(written))


@pytest.mark.parametrize("held", ["2", "many", "-5"])
async def test_a_bulkhead_holder_without_a_lease_holds_no_permit(held: str) -> None:
    """Permits are always leased: one held without a lease would keep the fleet full for ever."""
    async with redis_support.opened_store() as store:
        bulkhead = sw.Bulkhead(2, max_queued=0, store=store, name="ledger", batch=0)
        counts, _, _ = store._bulkhead_keys("ledger")
        await store.client.hset(counts, "written-by-hand", held)
        with sw.deadline(5.0):
            assert list(await asyncio.gather(bulkhead(ok)(), bulkhead(ok)())) == ["ok", "ok"]
        assert await store.client.hget(counts, "written-by-hand") is None


@pytest.mark.parametrize(
    "forged",
    [
        b"open 99999999999999 60000 0 0",  # a version of the year 5138
        b"open 5 1000000000000000000000000000000 0 0",  # opened for 10**27 seconds
    ],
)
async def test_a_forged_message_cannot_open_the_fleets_breakers_beyond_repair(
    forged: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Adopted, it would keep every replica open: none would ask Redis again, nor heed a reset."""
    async with redis_support.opened_store(reconcile_interval=0.05) as store:
        cb = breaker(store)
        await store.sync()
        await store.client.publish(store._key("circuit", _digest("dep")), forged)
        await redis_support.until(
            lambda: any("ignored a message" in r.getMessage() for r in caplog.records)
        )
        assert cb.state is CLOSED
        assert await cb(ok)() == "ok"
        await store.transition("dep", 0, OPEN, 10.0)  # a real one still gets through
        await redis_support.until(lambda: cb.state is OPEN)
