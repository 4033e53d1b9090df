"""The transport and the middleware against a real uvicorn server over loopback.

A flaky upstream (503s, 429 with Retry-After, hangs, connection resets) runs
in uvicorn on its own thread; real ``httpx.AsyncClient``s talk to it over TCP
on asyncio and trio. These tests run on the real clock: their delays are
tenths of a second at most.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
import pytest
import uvicorn

import stalwart as sw
from stalwart.asgi import DeadlineMiddleware, Receive, Scope, Send
from stalwart.httpx import ResilientTransport

pytestmark = pytest.mark.realtime

NO_WAIT = sw.Backoff(initial=0.0, maximum=0.0)
# Building an SSL context costs tens of milliseconds; plain HTTP needs none.
TLS = ssl.create_default_context()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The real clock here: the server is real."""
    return str(request.param)


@dataclass
class Hit:
    port: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """The flaky upstream's routes, and what it has seen, by ``key``."""

    hits: dict[str, list[Hit]] = field(default_factory=dict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        body = await read_body(receive)
        seen = self.hits.setdefault(query.get("key", ""), [])
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        seen.append(Hit(scope["client"][1], headers, body))
        failing = len(seen) <= int(query.get("fail", "0"))
        path = scope["path"]
        if path == "/flaky" and failing:
            extra = (
                [(b"retry-after", query["retry_after"].encode())] if "retry_after" in query else []
            )
            await respond(send, int(query.get("status", "503")), b"busy " * 200, extra)
        elif path == "/reset" and failing:
            await reset(receive)
        elif path == "/hang" and failing:
            await wait_for_disconnect(receive)
        else:
            await respond(send, 200, json.dumps({"hit": len(seen), "headers": headers}).encode())


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body", False):
            return body


async def respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or []})
    await send({"type": "http.response.body", "body": body})


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def reset(receive: Receive) -> None:
    """Drop the connection with a TCP reset, as a crashing upstream would."""
    # uvicorn's h11 protocol: `receive` is a method of the request's cycle,
    # which holds the connection's asyncio transport.
    transport = receive.__self__.transport  # type: ignore[attr-defined]
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    await wait_for_disconnect(receive)


async def guarded_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Behind DeadlineMiddleware: reports its deadline, or works for a while."""
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if scope["path"] == "/guarded/remaining":
        await respond(send, 200, json.dumps({"remaining": sw.remaining()}).encode())
    elif scope["path"] == "/guarded/slow":
        await asyncio.sleep(float(query["seconds"]))
        await respond(send, 200, b"done")
    elif scope["path"] == "/guarded/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first part", "more_body": True})
        await asyncio.sleep(float(query["seconds"]))
        await send({"type": "http.response.body", "body": b"the rest"})


class App:
    def __init__(self) -> None:
        self.upstream = Upstream()
        self.guarded = DeadlineMiddleware(guarded_app, max_timeout=5.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"].startswith("/guarded/"):
            await self.guarded(scope, receive, send)
        else:
            await self.upstream(scope, receive, send)


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


@dataclass
class Running:
    app: App
    url: str
    keys: Iterator[int] = field(default_factory=itertools.count)

    def key(self) -> str:
        """A fresh key: each test's requests have their own upstream state."""
        return f"k{next(self.keys)}"

    def hits(self, key: str) -> list[Hit]:
        return self.app.upstream.hits.get(key, [])


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    app = App()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Inherited by accepted connections: without it, uvicorn's separate writes
    # of head and body meet delayed ACKs, 40 ms per response.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http="h11",
        ws="none",
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    server = Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(10), "uvicorn did not start"
        yield Running(app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def client(
    server: Running,
    policy: sw.Policy | None = None,
    *,
    transport: httpx.AsyncHTTPTransport | None = None,
    **options: Any,
) -> httpx.AsyncClient:
    resilient = ResilientTransport(
        policy or sw.Retry(attempts=3, backoff=NO_WAIT),
        transport=transport or httpx.AsyncHTTPTransport(verify=TLS),
        **options,
    )
    return httpx.AsyncClient(transport=resilient, base_url=server.url, timeout=5.0)


# -- the transport ---------------------------------------------------------------------


async def test_503s_are_retried_until_the_upstream_answers(server: Running) -> None:
    key = server.key()
    async with client(server) as http:
        response = await http.get("/flaky", params={"key": key, "fail": 2})
    assert response.status_code == 200
    assert response.json()["hit"] == 3


async def test_the_last_503_is_returned_after_the_last_attempt(server: Running) -> None:
    key = server.key()
    async with client(server) as http:
        response = await http.get("/flaky", params={"key": key, "fail": 5})
    assert response.status_code == 503
    assert response.text.startswith("busy busy")
    assert len(server.hits(key)) == 3


async def test_a_429_with_retry_after_is_waited_out(server: Running) -> None:
    key = server.key()
    params: dict[str, str | int] = {"key": key, "fail": 1, "status": 429, "retry_after": "0.1"}
    async with client(server) as http:
        start = anyio.current_time()
        response = await http.get("/flaky", params=params)
    assert response.status_code == 200
    assert anyio.current_time() - start >= 0.1


async def test_connection_resets_are_retried(server: Running) -> None:
    key = server.key()
    async with client(server) as http:
        response = await http.get("/reset", params={"key": key, "fail": 2})
    assert response.status_code == 200
    assert len(server.hits(key)) == 3


async def test_a_connection_reset_propagates_after_the_last_attempt(server: Running) -> None:
    key = server.key()
    async with client(server) as http:
        with pytest.raises(httpx.TransportError):
            await http.get("/reset", params={"key": key, "fail": 5})
    assert len(server.hits(key)) == 3


async def test_a_reset_post_is_not_sent_twice(server: Running) -> None:
    key = server.key()
    async with client(server) as http:
        with pytest.raises(httpx.TransportError):
            await http.post("/reset", params={"key": key, "fail": 1}, content=b"order")
    assert len(server.hits(key)) == 1


async def test_a_hanging_attempt_is_cut_short_and_retried(server: Running) -> None:
    key = server.key()
    policy = sw.Pipeline(sw.Retry(attempts=2, backoff=NO_WAIT), sw.Timeout(0.1))
    async with client(server, policy) as http:
        start = anyio.current_time()
        response = await http.get("/hang", params={"key": key, "fail": 1})
    assert response.status_code == 200
    assert 0.1 <= anyio.current_time() - start < 2.0


async def test_a_hanging_upstream_is_given_up_on_at_the_deadline(server: Running) -> None:
    key = server.key()
    async with client(server) as http:
        start = anyio.current_time()
        with pytest.raises((sw.DeadlineExceeded, httpx.TimeoutException)), sw.deadline(0.1):
            await http.get("/hang", params={"key": key, "fail": 5})
    assert 0.1 <= anyio.current_time() - start < 2.0


async def test_the_same_body_is_sent_on_every_attempt(server: Running) -> None:
    key = server.key()

    async def body() -> AsyncIterator[bytes]:
        for part in (b"sku=42;", b"qty=3"):
            yield part

    async with client(server) as http:
        response = await http.post(
            "/flaky",
            params={"key": key, "fail": 2},
            content=body(),
            headers={"Idempotency-Key": "order-42"},
        )
    assert response.status_code == 200
    hits = server.hits(key)
    assert [h.body for h in hits] == [b"sku=42;qty=3"] * 3
    assert {h.headers["idempotency-key"] for h in hits} == {"order-42"}


async def test_added_idempotency_keys_travel_with_every_attempt(server: Running) -> None:
    key = server.key()
    async with client(server, add_idempotency_keys=True) as http:
        response = await http.post("/flaky", params={"key": key, "fail": 1}, json={"sku": 42})
    assert response.status_code == 200
    first, second = server.hits(key)
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]


async def test_no_connection_is_leaked_over_a_real_pool(server: Running) -> None:
    """Sixty 503s are read and given back: one pooled connection carries every attempt."""
    key = server.key()
    pool = httpx.AsyncHTTPTransport(verify=TLS, limits=httpx.Limits(max_connections=1))
    async with client(server, transport=pool) as http:
        for _ in range(20):
            flaky = server.key()
            response = await http.get("/flaky", params={"key": flaky, "fail": 2})
            assert response.status_code == 200
            server.app.upstream.hits.setdefault(key, []).extend(server.hits(flaky))
        connections = pool._pool.connections
        assert len(connections) == 1
        assert connections[0].is_idle()
    assert len(server.hits(key)) == 60
    assert len({hit.port for hit in server.hits(key)}) == 1


async def test_the_deadline_travels_in_a_header(server: Running) -> None:
    key = server.key()
    async with client(server) as http:
        with sw.deadline(3.0):
            response = await http.get("/flaky", params={"key": key})
    sent = int(response.json()["headers"]["x-request-timeout-ms"])
    assert 2000 < sent <= 3000


# -- the middleware, end to end ---------------------------------------------------------------


async def test_the_upstream_runs_under_the_deadline_the_caller_sent(server: Running) -> None:
    async with client(server) as http:
        with sw.deadline(3.0):
            response = await http.get("/guarded/remaining")
    assert 2.0 < response.json()["remaining"] <= 3.0


async def test_the_middleware_caps_the_deadline(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=TLS) as http:
        response = await http.get("/guarded/remaining", headers={"x-request-timeout-ms": "90000"})
    assert 4.0 < response.json()["remaining"] <= 5.0


async def test_a_malformed_deadline_header_is_ignored(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=TLS) as http:
        response = await http.get("/guarded/remaining", headers={"x-request-timeout-ms": "soon"})
    assert response.status_code == 200
    assert response.json()["remaining"] is None


async def test_an_expired_deadline_answers_504(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=TLS) as http:
        start = anyio.current_time()
        response = await http.get(
            "/guarded/slow", params={"seconds": 5}, headers={"x-request-timeout-ms": "100"}
        )
    assert anyio.current_time() - start < 2.0
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 504


async def test_a_deadline_that_passes_mid_response_closes_the_connection(server: Running) -> None:
    async with httpx.AsyncClient(base_url=server.url, verify=TLS) as http:
        headers = {"x-request-timeout-ms": "100"}
        async with http.stream(
            "GET", "/guarded/stream", params={"seconds": 5}, headers=headers
        ) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()
