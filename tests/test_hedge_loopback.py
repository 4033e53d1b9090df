"""Hedged requests over a real connection pool, against uvicorn over loopback.

The upstream's first request for each key hangs until its client goes away;
a hedge answers at once. Nothing may leak: every losing connection is closed
(the upstream sees the disconnect), every winning one goes back to the pool,
and a pool of two connections serves any number of hedged requests. On the
real clock: delays are tenths of a second at most, and waits for the
upstream poll with generous bounds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import Receive, Scope, Send
from stalwart.httpx import ResilientTransport

from .http_support import respond, serve, wait_for_disconnect

pytestmark = pytest.mark.realtime


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The real clock here: the server is real."""
    return str(request.param)


@dataclass
class LongTail:
    """``/tail?key=k``: the first request of a key hangs until its client leaves."""

    seen: dict[str, int] = field(default_factory=dict)
    hung: set[str] = field(default_factory=set)
    left: set[str] = field(default_factory=set)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        key = query["key"]
        self.seen[key] = self.seen.get(key, 0) + 1
        if scope["path"] == "/tail" and self.seen[key] == 1:
            self.hung.add(key)
            await wait_for_disconnect(receive)
            self.left.add(key)
            return
        if scope["path"] == "/both":
            await asyncio.sleep(0.05)  # both attempts answer, one turn apart at most
        await respond(send, 200, key.encode(), [(b"content-length", str(len(key)).encode())])


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[LongTail, str]]:
    app = LongTail()
    with serve(app) as url:
        yield app, url


def client(url: str, pool: httpx.AsyncHTTPTransport, delay: float) -> httpx.AsyncClient:
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    transport = ResilientTransport(
        sw.Retry(attempts=1, telemetry=telemetry),
        transport=pool,
        hedge=sw.Hedge(delay=delay, telemetry=telemetry),
    )
    return httpx.AsyncClient(transport=transport, base_url=url, timeout=5.0)


async def test_a_hung_request_is_hedged_and_its_connection_closed(
    upstream: tuple[LongTail, str], anyio_backend: str
) -> None:
    app, url = upstream
    keys = [f"{anyio_backend}-hung-{i}" for i in range(10)]
    pool = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=4))
    async with client(url, pool, delay=0.05) as http:
        with anyio.fail_after(5):
            for key in keys:
                response = await http.get("/tail", params={"key": key})
                assert response.text == key
        # Every winner's connection is back in the pool, idle.
        assert all(connection.is_idle() for connection in pool._pool.connections)
        assert len(pool._pool.connections) <= 4
    assert all(app.seen[key] == 2 for key in keys)
    # Every hung attempt was cancelled and its connection closed: the upstream saw it go.
    with anyio.fail_after(10):
        while not app.left >= set(keys):  # noqa: ASYNC110 - the upstream's thread sets it
            await anyio.sleep(0.01)


async def test_losing_responses_are_closed_so_a_small_pool_never_runs_dry(
    upstream: tuple[LongTail, str], anyio_backend: str
) -> None:
    _, url = upstream
    # Both attempts start at once and both answer: every call has a loser whose
    # connection must be given back (or closed), else two connections run out.
    pool = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=2))
    async with client(url, pool, delay=0.0) as http:
        with anyio.fail_after(10):
            for i in range(20):
                key = f"{anyio_backend}-both-{i}"
                response = await http.get("/both", params={"key": key}, timeout=2.0)
                assert response.text == key
        assert len(pool._pool.connections) <= 2
        assert all(connection.is_idle() for connection in pool._pool.connections)
