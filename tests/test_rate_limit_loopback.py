"""RateLimitMiddleware behind a real uvicorn server, real httpx clients over loopback.

The server runs its own asyncio loop on a thread (the limiter reads the real
clock there); the clients run on asyncio and on trio. Limits are a few
requests a second, so these tests take a few seconds of real time.
"""

from __future__ import annotations

import itertools
import re

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import RateLimitMiddleware, Receive, Scope, Send
from stalwart.httpx import ResilientTransport

from .http_support import respond, serve

pytestmark = pytest.mark.realtime


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The real clock here: the server is real."""
    return str(request.param)


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await respond(send, 200, b"hello")


def client_header(scope: Scope) -> str | None:
    """Each test client says who it is (a test's stand-in for an API key)."""
    for name, value in scope["headers"]:
        if name == b"x-client":
            return str(value.decode())
    return None


def limited(rate: float, burst: int, name: str) -> RateLimitMiddleware:
    limiter = sw.RateLimiter(
        rate, burst=burst, name=name, telemetry=sw.Telemetry(registry=CollectorRegistry())
    )
    return RateLimitMiddleware(hello, limiter=limiter, key=client_header)


async def test_a_client_over_its_limit_gets_a_429_that_says_when_to_return() -> None:
    with serve(limited(2, 2, "api")) as url:
        async with httpx.AsyncClient(base_url=url, headers={"x-client": "a"}) as client:
            answers = [await client.get("/") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert re.fullmatch(r'"api";r=1;t=1', answers[0].headers["ratelimit"])
    refused = answers[2]
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["ratelimit-policy"] == '"api";q=2;w=1'
    assert refused.headers["ratelimit"] == '"api";r=0;t=1'
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["kind"] == "rate_limited"


async def test_a_client_that_honours_retry_after_is_never_refused_twice_in_a_row() -> None:
    statuses: dict[str, list[int]] = {}

    async def polite(client: httpx.AsyncClient, who: str, wanted: int) -> None:
        seen = statuses.setdefault(who, [])
        while seen.count(200) < wanted:
            answer = await client.get("/", headers={"x-client": who})
            seen.append(answer.status_code)
            if answer.status_code == 429:
                await anyio.sleep(int(answer.headers["retry-after"]))

    with serve(limited(4, 2, "polite")) as url:
        async with httpx.AsyncClient(base_url=url) as client, anyio.create_task_group() as tg:
            for who in ("a", "b", "c"):
                tg.start_soon(polite, client, who, 6)
    for who, seen in statuses.items():
        assert seen.count(200) == 6, (who, seen)
        assert 429 in seen, (who, seen)  # the limit was reached: the test tested something
        assert (429, 429) not in itertools.pairwise(seen), (who, seen)


class Attempts(httpx.AsyncBaseTransport):
    """The inner transport: remembers every attempt's status."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.statuses.append(response.status_code)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_resilient_transport_waits_out_the_429s_it_gets() -> None:
    attempts = Attempts()
    retry = sw.Retry(attempts=3, backoff=sw.Backoff(initial=0.01, maximum=2.0))
    transport = ResilientTransport(retry, transport=attempts)
    with serve(limited(2, 1, "transport")) as url:
        async with httpx.AsyncClient(
            transport=transport, base_url=url, headers={"x-client": "t"}
        ) as client:
            answers = [await client.get("/") for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert 429 in attempts.statuses
    assert (429, 429) not in itertools.pairwise(attempts.statuses)
