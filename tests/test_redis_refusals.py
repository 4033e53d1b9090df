"""A Redis that runs but refuses to serve (BUSY, NOREPLICAS, MISCONF) is unavailable.

Such a Redis answers at once, with an error instead of a result: it is
running a script that went on too long (BUSY), refuses writes for want of
replicas (NOREPLICAS, with ``min-replicas-to-write``) or because its last
snapshot failed (MISCONF). For the policies it is a Redis that cannot be
reached, not a bug: idempotent calls fail with `StoreUnavailable` (or run,
with ``on_unavailable="bypass"``), rate limiters decide on their local
limit, and the follower logs the outage once instead of failing.

Every test starts a private ``redis-server`` and stops it by its process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from redis import exceptions as rx

import stalwart as sw
from stalwart.redis import RedisStore
from stalwart.redis._client import _cannot_serve, _is_unavailable

from . import redis_support
from .redis_support import PrivateRedis, private_redis

pytestmark = [pytest.mark.redis, pytest.mark.realtime]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


runs: list[str] = []


async def charge(payment: str) -> str:
    runs.append(payment)
    return f"charged {payment}"


async def ok() -> str:
    return "ok"


def refuse_writes(server: PrivateRedis) -> None:
    """Have ``server`` refuse every write with NOREPLICAS (it has no replica)."""
    with redis.Redis(port=server.port, socket_timeout=5.0) as admin:
        admin.config_set("min-replicas-to-write", 1)


@contextmanager
def busy(server: PrivateRedis) -> Iterator[None]:
    """Keep ``server`` running someone else's script, answering BUSY, for the block.

    The script spins for 30 s at most; the block's end kills it (SCRIPT KILL).
    """

    def spin() -> None:
        with (
            redis.Redis(port=server.port, socket_timeout=60.0) as other,
            contextlib.suppress(rx.ResponseError),  # killed: what the block's end does
        ):
            other.eval(
                "local t = redis.call('TIME') "
                "while true do local n = redis.call('TIME') "
                "if tonumber(n[1]) - tonumber(t[1]) > 30 then break end end",
                0,
            )

    spinner = threading.Thread(target=spin, name="busy redis", daemon=True)
    spinner.start()
    try:
        with redis.Redis(port=server.port, socket_timeout=5.0) as probe:
            deadline = time.monotonic() + 20.0
            while not _is_busy(probe):
                assert time.monotonic() < deadline, "the server never became busy"
                time.sleep(0.01)
        yield
    finally:
        with redis.Redis(port=server.port, socket_timeout=5.0) as admin:
            deadline = time.monotonic() + 20.0
            while spinner.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(rx.ResponseError):  # NOTBUSY: not started, or over
                    admin.script_kill()
                spinner.join(0.05)


def _is_busy(probe: redis.Redis) -> bool:
    try:
        probe.ping()
    except rx.ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


def test_the_refusals_of_a_running_redis_are_recognised_also_from_a_pipeline() -> None:
    for reply in (
        "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
        "NOREPLICAS Not enough good replicas to write. script: 82061045, on @user_script:24.",
        "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
        "Command # 2 (EVALSHA 8206 2 p:idem:919a...) of pipeline caused error: NOREPLICAS Not "
        "enough good replicas to write.",
    ):
        refusal = _cannot_serve(rx.ResponseError(reply))
        assert refusal is not None, reply
        assert str(refusal).split()[0] in ("BUSY", "NOREPLICAS", "MISCONF")
        assert _is_unavailable(rx.ResponseError(reply))
    for reply in (
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "ERR Error running script: BUSY is not a command",
        "NOREPLICASX not a refusal",
    ):
        assert _cannot_serve(rx.ResponseError(reply)) is None, reply
        assert not _is_unavailable(rx.ResponseError(reply))


async def test_a_redis_refusing_writes_fails_an_idempotent_call_with_store_unavailable() -> None:
    with private_redis() as server:
        client = redis_support.client(server.url)
        try:
            async with RedisStore(client, timeout=0.5, name="orders-redis") as store:
                guarded = sw.Idempotency(key="payment", store=store)(charge)
                runs.clear()
                refuse_writes(server)
                with pytest.raises(sw.StoreUnavailable, match="NOREPLICAS") as info:
                    await guarded("p-1")
                assert info.value.policy == "orders-redis"
                assert runs == []  # the call did not run
        finally:
            await client.aclose()


async def test_a_redis_refusing_writes_lets_bypass_run_the_call() -> None:
    with private_redis() as server:
        client = redis_support.client(server.url)
        try:
            async with RedisStore(client, timeout=0.5, on_unavailable="bypass") as store:
                guarded = sw.Idempotency(key="payment", store=store)(charge)
                runs.clear()
                refuse_writes(server)
                assert await guarded("p-1") == "charged p-1"
                assert runs == ["p-1"]
        finally:
            await client.aclose()


async def test_a_redis_refusing_writes_leaves_a_rate_limiter_on_its_local_limit() -> None:
    registry = CollectorRegistry()
    with private_redis() as server:
        client = redis_support.client(server.url)
        try:
            async with RedisStore(client, timeout=0.5, prefix="refusing:") as store:
                limiter = sw.RateLimiter(
                    rate=1,
                    per=3600,
                    store=store,
                    name="shared",
                    telemetry=sw.Telemetry(registry=registry),
                )
                limited = limiter(ok)
                refuse_writes(server)
                assert await limited() == "ok"  # decided on the local bucket
                with pytest.raises(sw.RateLimitExceeded):
                    await limited()
        finally:
            await client.aclose()
    assert (
        registry.get_sample_value(
            "stalwart_rate_limiter_store_unavailable_total", {"policy": "shared"}
        )
        == 2
    )


async def test_a_busy_redis_is_unavailable_to_calls_and_to_the_follower(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with private_redis("--busy-reply-threshold", "50") as server:
        client = redis_support.client(server.url)
        try:
            async with RedisStore(
                client, timeout=0.5, on_unavailable="bypass", reconcile_interval=0.05
            ) as store:
                cb = sw.CircuitBreaker(
                    name="dep", store=store, telemetry=sw.Telemetry(registry=CollectorRegistry())
                )
                await store.sync()
                guarded = sw.Idempotency(key="payment", store=store)(charge)
                runs.clear()
                caplog.set_level(logging.WARNING, logger="stalwart.redis")
                with busy(server):
                    assert await guarded("p-1") == "charged p-1"  # bypassed: Redis is busy
                    # The follower's re-reads and PINGs meet BUSY too.
                    await redis_support.until(
                        lambda: any("BUSY" in r.getMessage() for r in caplog.records)
                    )
                assert runs == ["p-1"]
                assert cb.state is sw.CircuitState.CLOSED
        finally:
            await client.aclose()
    # An outage, logged as such: not "the follower failed" with a traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
