"""A store used from trio: it runs on asyncio only, and says so, also when nobody raises.

A breaker goes on with its own state when its store fails, which is right
when Redis is away but would hide a store that can never work: one built
before trio runs (at import time) and used from trio. The store logs that
once, as an error naming it. No Redis is needed: the store refuses before
any request.
"""

from __future__ import annotations

import logging

import pytest
import redis.asyncio
import trio

import stalwart as sw
from stalwart.redis import RedisStore


async def boom() -> str:
    raise ConnectionError("the dependency is down")


def test_a_breaker_built_before_trio_runs_says_once_that_its_store_is_not_shared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = RedisStore(redis.asyncio.Redis(), name="quotes-redis")
    breaker = sw.CircuitBreaker(name="quotes", consecutive_failures=1, open_for=0.01, store=store)

    async def main() -> None:
        for _ in range(3):
            with pytest.raises(ConnectionError):
                await breaker(boom)()  # it trips alone, as with Redis away
            await trio.sleep(0.02)

    caplog.set_level(logging.ERROR, logger="stalwart.redis")
    trio.run(main)
    told = [r.getMessage() for r in caplog.records if r.name == "stalwart.redis"]
    assert told == [
        "Redis store 'quotes-redis': used from trio; it runs on asyncio only, so the "
        "breakers, limits and idempotency records given it are not shared"
    ]
