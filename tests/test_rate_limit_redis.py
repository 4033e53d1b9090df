"""RateLimiter(store=RedisStore): one limit for every process, one round trip per call.

On a real Redis (the shared one, under a prefix of its own), and on private
``redis-server`` processes that the tests count, stop or pause. The
processes' side is in ``test_rate_limit_processes.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
import redis.asyncio
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart._rate_limiter import StoredTurn
from stalwart.asgi import RateLimitMiddleware, Receive, Scope, Send
from stalwart.redis import RedisStore

from . import redis_support
from .redis_support import opened_store, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.realtime]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


@pytest.fixture
async def store() -> AsyncIterator[RedisStore]:
    async with opened_store() as opened:
        yield opened


def limiter(store: RedisStore | Recording, rate: float = 10, **options: Any) -> sw.RateLimiter:
    """A replica's limiter: on a registry of its own, as in a process of its own."""
    options.setdefault("name", "shared")
    options.setdefault("telemetry", sw.Telemetry(registry=CollectorRegistry()))
    return sw.RateLimiter(rate, store=store, **options)


async def ok(tag: Any = None) -> Any:
    return tag


class Recording:
    """A store that remembers when each turn it granted comes, on Redis's clock."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.turns: list[float] = []

    @property
    def timeout(self) -> float:
        return self.store.timeout

    async def reserve_turn(self, *args: Any, **kwargs: Any) -> StoredTurn:
        turn = await self.store.reserve_turn(*args, **kwargs)
        if turn.granted:
            self.turns.append(turn.at)
        return turn

    def give_back_turn(self, turn: StoredTurn, until: float) -> None:
        self.store.give_back_turn(turn, until)


async def outcomes(limited: Any, calls: int) -> list[str]:
    results = []
    for _ in range(calls):
        try:
            await limited()
        except sw.RateLimitExceeded:
            results.append("refused")
        else:
            results.append("ok")
    return results


# -- one limit ------------------------------------------------------------------------------


async def test_limiters_of_one_name_on_one_store_share_one_limit(store: RedisStore) -> None:
    replicas = [limiter(store, 1, burst=3, per=3600)(ok) for _ in range(3)]
    seen = [await outcomes(replica, 2) for replica in replicas]
    assert seen == [["ok", "ok"], ["ok", "refused"], ["refused", "refused"]]


async def test_limiters_of_another_name_or_prefix_do_not_share(store: RedisStore) -> None:
    await outcomes(limiter(store, 1, per=3600)(ok), 1)
    assert await outcomes(limiter(store, 1, per=3600, name="other")(ok), 1) == ["ok"]
    async with opened_store() as elsewhere:
        assert await outcomes(limiter(elsewhere, 1, per=3600)(ok), 1) == ["ok"]


async def test_a_refusal_says_when_a_permit_is_free_on_the_stores_clock(
    store: RedisStore,
) -> None:
    limited = limiter(store, 1, per=60)(ok)
    await limited()
    with pytest.raises(sw.RateLimitExceeded) as info:
        await limited()
    assert info.value.retry_after is not None
    assert 55.0 < info.value.retry_after <= 60.0


async def test_waiters_take_turns_one_interval_apart(store: RedisStore) -> None:
    recording = Recording(store)
    limited = limiter(recording, 4, burst=1, max_wait=5.0)(ok)
    start = time.monotonic()
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(limited)
    turns = sorted(recording.turns)  # (replies may come back in any order)
    assert [round(b - a, 6) for a, b in itertools.pairwise(turns)] == [0.25, 0.25, 0.25]
    assert time.monotonic() - start >= 0.7  # and each call waited for its turn


async def test_each_key_has_its_own_bucket_and_no_key_text_reaches_redis(
    store: RedisStore,
) -> None:
    shared = limiter(store, 1, per=3600, key="user")

    @shared
    async def fetch(user: str) -> str:
        return user

    await fetch("alice@example.com")
    await fetch("bob@example.com")
    with pytest.raises(sw.RateLimitExceeded):
        await fetch("alice@example.com")
    names = [k async for k in store.client.scan_iter(match=store.prefix + "*")]
    assert len(names) == 2
    assert all(b"example" not in name and b"shared" not in name for name in names)
    ttls = [await store.client.pttl(name) for name in names]
    assert all(0 < ttl <= 3600_000 for ttl in ttls)  # gone once they would be full again


async def test_a_cancelled_waiter_gives_its_turn_back_in_redis(store: RedisStore) -> None:
    shared = limiter(store, 1, per=10, max_wait=60)
    limited = shared(ok)
    await limited()
    async with anyio.create_task_group() as tg:
        tg.start_soon(limited)  # its turn is 10 s away
        await redis_support.until(lambda: shared.waiting == 1)
        tg.cancel_scope.cancel()
    (bucket,) = [k async for k in store.client.scan_iter(match=store.prefix + "*")]

    async def given_back() -> bool:
        ttl = await store.client.pttl(bucket)
        return 0 < ttl <= 10_000  # one turn ahead again, not two

    await redis_support.until(given_back)
    with pytest.raises(sw.RateLimitExceeded) as info:
        await limiter(store, 1, per=10)(ok)()
    assert info.value.retry_after is not None
    assert info.value.retry_after <= 10.0


async def test_a_turn_after_the_deadline_is_refused_without_waiting(store: RedisStore) -> None:
    limited = limiter(store, 1, per=10, max_wait=60)(ok)
    await limited()
    start = time.monotonic()
    with sw.deadline(1.0), pytest.raises(sw.RateLimitExceeded):
        await limited()
    assert time.monotonic() - start < 1.0


async def test_the_middleware_reports_the_fleets_headroom(store: RedisStore) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = [
        RateLimitMiddleware(app, limiter=limiter(store, 2, burst=4, per=60, name="api"))
        for _ in range(2)
    ]
    states = []
    for replica in (0, 1, 0):
        sent: list[dict[str, Any]] = []

        async def send(message: Any, sent: list[dict[str, Any]] = sent) -> None:
            sent.append(message)

        scope = {"type": "http", "client": ("10.0.0.9", 1), "headers": []}
        await middleware[replica](scope, None, send)  # type: ignore[arg-type]
        states.append(dict(sent[0]["headers"])[b"ratelimit"].decode())
    assert states == ['"api";r=3;t=30', '"api";r=2;t=30', '"api";r=1;t=30']


# -- one round trip -------------------------------------------------------------------------


class Counting(redis.asyncio.Redis):
    """A client that counts the requests it sends (one per command or pipeline)."""

    sent = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent += 1
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    def pipeline(self, *args: Any, **options: Any) -> Any:
        self.sent += 1
        return super().pipeline(*args, **options)


async def test_each_call_is_one_round_trip() -> None:
    with private_redis() as server:
        client = Counting(host="127.0.0.1", port=server.port)
        admin = redis.asyncio.Redis.from_url(server.url)
        store = RedisStore(client, prefix="rt:")
        patient = limiter(store, 20, burst=3, max_wait=0.2)
        impatient = limiter(store, 20, burst=3)  # the same limit, without waiting
        await patient(ok)()  # the script is loaded now
        await admin.config_resetstat()
        client.sent = 0
        seen = []
        for _ in range(20):
            seen += await outcomes(patient(ok), 1)  # at once, then after a wait
            seen += await outcomes(impatient(ok), 1)  # at once, then refused
        stats = await admin.info("commandstats")
        await store.aclose()
        await client.aclose()
        await admin.aclose()
    assert {"ok", "refused"} <= set(seen)
    assert patient.metrics.waits > 0  # type: ignore[attr-defined]
    assert client.sent == 40
    calls = {name.removeprefix("cmdstat_"): row["calls"] for name, row in stats.items()}
    assert calls.pop("evalsha") == 40
    # What else Redis ran, the script ran (INFO and CONFIG are the test's own).
    assert set(calls) <= {"get", "set", "del", "time", "pttl", "info", "config|resetstat"}


# -- Redis away -----------------------------------------------------------------------------


async def test_redis_down_falls_back_on_the_local_limit_within_the_deadline() -> None:
    registry = CollectorRegistry()
    with private_redis() as server:
        client = redis.asyncio.Redis.from_url(server.url)
        async with RedisStore(client, prefix="down:") as store:
            shared = limiter(store, 1, burst=2, per=3600, telemetry=sw.Telemetry(registry=registry))
            limited = shared(ok)
            assert await outcomes(limited, 1) == ["ok"]  # in Redis
            server.stop()
            start = time.monotonic()
            with sw.deadline(1.0):
                seen = await outcomes(limited, 4)  # the local bucket is full: 2 then refusals
            elapsed = time.monotonic() - start
        await client.aclose()
    assert seen == ["ok", "ok", "refused", "refused"]
    assert elapsed < 1.0
    assert (
        registry.get_sample_value(
            "stalwart_rate_limiter_store_unavailable_total", {"policy": "shared"}
        )
        == 4
    )


async def test_a_hung_redis_costs_at_most_half_the_time_left_then_none() -> None:
    with private_redis() as server:
        client = redis.asyncio.Redis.from_url(server.url)
        async with RedisStore(client, prefix="hung:", timeout=5.0) as store:
            limited = limiter(store, 100, per=1)(ok)
            await limited()
            server.pause()
            try:
                first = time.monotonic()
                with sw.deadline(1.0):
                    await limited()  # waits half its time left, then decides alone
                second = time.monotonic()
                with sw.deadline(1.0):
                    await limited()  # Redis known away: decided at once
                end = time.monotonic()
            finally:
                server.resume()
        await client.aclose()
    assert 0.45 < second - first < 1.0
    assert end - second < 0.25


async def test_the_store_is_asked_again_once_redis_is_back() -> None:
    registry = CollectorRegistry()
    with private_redis() as server:
        client = redis.asyncio.Redis.from_url(server.url)
        async with RedisStore(client, prefix="back:") as store:
            shared = limiter(store, 1, per=3600, telemetry=sw.Telemetry(registry=registry))
            limited = shared(ok)
            server.stop()
            assert await outcomes(limited, 2) == ["ok", "refused"]  # the local limit
            server.start()  # empty: a Redis that lost its data

            async def shared_again() -> bool:
                await asyncio.sleep(0.05)
                return await outcomes(limited, 1) == ["ok"]  # Redis's bucket is full

            await redis_support.until(shared_again, within=15.0)
            assert await outcomes(limited, 1) == ["refused"]  # and Redis decides again
        await client.aclose()
    unavailable = registry.get_sample_value(
        "stalwart_rate_limiter_store_unavailable_total", {"policy": "shared"}
    )
    assert unavailable is not None
    assert unavailable >= 2


class Asked(Recording):
    """A store that remembers when it was asked for a turn."""

    def __init__(self, store: RedisStore) -> None:
        super().__init__(store)
        self.asked: list[float] = []

    async def reserve_turn(self, *args: Any, **kwargs: Any) -> StoredTurn:
        self.asked.append(time.monotonic())
        return await super().reserve_turn(*args, **kwargs)


async def test_while_redis_stays_away_it_is_asked_less_and_less_often() -> None:
    with private_redis() as server:
        client = redis.asyncio.Redis.from_url(server.url)
        async with RedisStore(client, prefix="backoff:") as store:
            asking = Asked(store)
            limited = limiter(asking, 1000)(ok)
            server.stop()
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                async with anyio.create_task_group() as tg:
                    for _ in range(8):  # calls in flight together
                        tg.start_soon(limited)
                await asyncio.sleep(0.01)
        await client.aclose()
    first, probes = asking.asked[:8], asking.asked[8:]
    assert first[-1] - first[0] < 0.25  # the first calls, together, found it away
    # Then one call at a time asks again: 0.25 s later, then 0.5 s, then 1 s.
    gaps = [b - a for a, b in itertools.pairwise([first[-1], *probes])]
    assert 2 <= len(probes) <= 4, gaps
    assert gaps == sorted(gaps), gaps
    assert gaps[0] >= 0.2, gaps
