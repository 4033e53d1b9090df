"""One RedisStore behind a breaker, an Idempotency policy and the ASGI IdempotencyMiddleware.

Two replicas of one ASGI service, each with its own Redis client and store on
the same prefix: a request retried on the other replica is replayed there.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import IdempotencyMiddleware
from stalwart.redis import RedisStore

from . import redis_support
from .redis_support import opened_store

pytestmark = [pytest.mark.redis, pytest.mark.realtime]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("asyncio", {})


class Service:
    """A replica: its ASGI app, with every policy on the one store."""

    orders: ClassVar[list[str]] = []  # shared by the replicas: the side effect

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        # A registry of its own, as a replica in a process of its own.
        telemetry = sw.Telemetry(registry=CollectorRegistry())
        self.breaker = sw.CircuitBreaker(
            name="bank", consecutive_failures=1, store=store, telemetry=telemetry
        )
        self.notify = sw.Idempotency(key="order", store=store)(self._notify)
        self.app = IdempotencyMiddleware(self._app, store=store)

    @staticmethod
    async def _notify(order: str) -> str:
        return f"notified {order}"

    async def _app(self, scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        order = f"order-{len(self.orders) + 1}"
        self.orders.append(order)
        await asyncio.sleep(0.05)
        body = json.dumps({"order": order, "note": await self.notify(order)}).encode()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def replicas() -> AsyncIterator[tuple[Service, Service]]:
    Service.orders = []
    async with opened_store() as one, opened_store(prefix=one.prefix) as two:
        yield Service(one), Service(two)


def client(service: Service) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(service.app)
    return httpx.AsyncClient(transport=transport, base_url="http://shop")


async def test_a_retry_on_another_replica_is_replayed(replicas: tuple[Service, Service]) -> None:
    a, b = replicas
    headers = {"Idempotency-Key": "k-1", "Authorization": "Bearer ann"}
    async with client(a) as on_a, client(b) as on_b:
        first = await on_a.post("/orders", json={"item": "book"}, headers=headers)
        retry = await on_b.post("/orders", json={"item": "book"}, headers=headers)
    assert (first.status_code, retry.status_code) == (201, 201)
    assert retry.json() == first.json() == {"order": "order-1", "note": "notified order-1"}
    assert retry.headers.get("idempotent-replayed") == "true"
    assert Service.orders == ["order-1"]


async def test_concurrent_duplicates_on_two_replicas_run_once(
    replicas: tuple[Service, Service],
) -> None:
    a, b = replicas
    headers = {"Idempotency-Key": "k-2", "Authorization": "Bearer ann"}
    async with client(a) as on_a, client(b) as on_b:
        responses = await asyncio.gather(
            on_a.post("/orders", json={}, headers=headers),
            on_b.post("/orders", json={}, headers=headers),
        )
    assert Service.orders == ["order-1"]
    statuses = sorted(r.status_code for r in responses)
    assert statuses in ([201, 201], [201, 409])  # replayed, or refused while in flight


async def test_the_same_store_shares_the_breakers(replicas: tuple[Service, Service]) -> None:
    a, b = replicas
    await b.store.sync()

    async def bank_down() -> None:
        raise ConnectionError

    with pytest.raises(ConnectionError):
        await a.breaker(bank_down)()
    await b.store.sync()
    assert b.breaker.state is sw.CircuitState.OPEN


async def test_requests_bypassed_while_redis_is_down_are_not_each_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = redis_support.client(redis_support.closed_port_url())
    try:
        store = RedisStore(client, timeout=0.2, on_unavailable="bypass")

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": b"made"})

        transport = httpx.ASGITransport(app=IdempotencyMiddleware(app, store=store))
        async with httpx.AsyncClient(transport=transport, base_url="http://shop") as http:
            with caplog.at_level(logging.INFO, logger="stalwart"):
                for _ in range(3):
                    answer = await http.post("/orders", headers={"Idempotency-Key": "k-1"})
                    assert answer.status_code == 201  # run, without de-duplication
        assert [r.getMessage() for r in caplog.records if "not stored" in r.getMessage()] == []
        assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1
    finally:
        await client.aclose()


async def test_a_request_cancelled_while_redis_hangs_goes_at_once_and_frees_its_key() -> None:
    with redis_support.private_redis() as server:
        client = redis_support.client(server.url)
        try:
            async with RedisStore(client, timeout=5.0) as store:
                started = asyncio.Event()
                runs: list[int] = []

                async def app(scope: Any, receive: Any, send: Any) -> None:
                    runs.append(1)
                    if not started.is_set():
                        started.set()
                        server.pause()  # Redis hangs while the request runs
                        await asyncio.sleep(30)
                    await send({"type": "http.response.start", "status": 201, "headers": []})
                    await send({"type": "http.response.body", "body": b"made"})

                middleware = IdempotencyMiddleware(app, store=store)
                scope = {
                    "type": "http",
                    "method": "POST",
                    "path": "/orders",
                    "headers": [(b"idempotency-key", b"k-7")],
                }

                async def receive() -> dict[str, Any]:
                    return {"type": "http.request", "body": b"", "more_body": False}

                async def send(message: Any) -> None:
                    return None

                task = asyncio.create_task(middleware(scope, receive, send))
                await started.wait()
                start = asyncio.get_running_loop().time()
                task.cancel()  # the client went away, say
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert asyncio.get_running_loop().time() - start < 1.0  # not the store's 5 s
                server.resume()
                await redis_support.until(lambda: not store._pending, within=10.0)
                await middleware(scope, receive, send)  # the key was freed: it runs
                assert runs == [1, 1]
        finally:
            server.resume()
            await client.aclose()
