"""The transport and the middleware against a real uvicorn server over loopback.

A flaky upstream (503s, 429 with Retry-After, hangs, connection resets) and
services behind both middlewares run in uvicorn on its own thread; real
``httpx.AsyncClient``s talk to them over TCP on asyncio and trio. These tests
run on the real clock: their delays are tenths of a second at most.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
import pytest

import stalwart as sw
from stalwart.asgi import DeadlineMiddleware, IdempotencyMiddleware, Message, Receive, Scope, Send
from stalwart.httpx import ResilientTransport

from .http_support import read_body, respond, serve, wait_for_disconnect

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


@dataclass
class Ledger:
    """Behind IdempotencyMiddleware: records an entry per request it runs, by ``key``."""

    runs: dict[str, int] = field(default_factory=dict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        body = await read_body(receive)
        key = query.get("key", "")
        run = self.runs[key] = self.runs.get(key, 0) + 1
        await asyncio.sleep(float(query.get("seconds", "0")))
        headers = dict(scope["headers"])
        entry = {
            "run": run,
            "body": body.decode(),
            "auth": headers.get(b"authorization", b"").decode(),
        }
        await respond(send, int(query.get("status", "201")), json.dumps(entry).encode())


class LosesFirstResponses:
    """Lets the service run, then resets the connection instead of answering, once per key."""

    def __init__(self, app: IdempotencyMiddleware) -> None:
        self.app = app
        self.lost: set[str] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = parse_qs(scope["query_string"].decode())["key"][0]
        if key in self.lost:
            await self.app(scope, receive, send)
            return
        self.lost.add(key)

        async def nowhere(message: Message) -> None:
            pass

        await self.app(scope, receive, nowhere)
        await reset(receive)


class App:
    def __init__(self) -> None:
        self.upstream = Upstream()
        self.guarded = DeadlineMiddleware(guarded_app, max_timeout=5.0)
        self.ledger = Ledger()
        self.idempotent = IdempotencyMiddleware(self.ledger, max_body_size=1024)
        self.lossy = LosesFirstResponses(IdempotencyMiddleware(self.ledger))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"].startswith("/guarded/"):
            await self.guarded(scope, receive, send)
        elif scope["path"].startswith("/ledger/"):
            await self.idempotent(scope, receive, send)
        elif scope["path"].startswith("/lossy/"):
            await self.lossy(scope, receive, send)
        else:
            await self.upstream(scope, receive, send)


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
    with serve(app) as url:
        yield Running(app, url)


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
    hinted = sw.Retry(attempts=3, backoff=sw.Backoff(initial=0.0, maximum=1.0))
    async with client(server, hinted) as http:
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


# -- idempotency keys, end to end ------------------------------------------------------------


def plain(server: Running) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, verify=TLS, timeout=5.0)


async def test_a_repeated_post_is_replayed_over_the_wire(server: Running) -> None:
    key = server.key()
    async with plain(server) as http:
        headers = {"Idempotency-Key": key}
        first = await http.post(
            "/ledger/entries", params={"key": key}, content=b"42", headers=headers
        )
        again = await http.post(
            "/ledger/entries", params={"key": key}, content=b"42", headers=headers
        )
    assert first.status_code == again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() == {"run": 1, "body": "42", "auth": ""}
    assert server.app.ledger.runs[key] == 1


async def test_concurrent_duplicates_over_separate_connections_run_once(server: Running) -> None:
    key = server.key()
    statuses: list[int] = []

    async def post() -> None:
        async with plain(server) as http:  # a connection of its own
            response = await http.post(
                "/ledger/entries",
                params={"key": key, "seconds": 0.2},
                headers={"Idempotency-Key": key},
            )
            statuses.append(response.status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(post)
    assert server.app.ledger.runs[key] == 1
    assert statuses.count(201) >= 1
    assert set(statuses) <= {201, 409}


async def test_no_client_is_ever_served_anothers_response(server: Running) -> None:
    key = server.key()
    params = {"key": key}
    async with plain(server) as http:
        for token in ("alice", "mallory", "alice", "mallory"):
            await http.post(
                "/ledger/entries",
                params=params,
                headers={"Idempotency-Key": f"shared-{key}", "Authorization": f"Bearer {token}"},
            )
        mallory = await http.post(
            "/ledger/entries",
            params=params,
            headers={"Idempotency-Key": f"shared-{key}", "Authorization": "Bearer mallory"},
        )
    assert mallory.headers["idempotent-replayed"] == "true"
    assert mallory.json()["auth"] == "Bearer mallory"
    assert server.app.ledger.runs[key] == 2


async def test_a_key_reused_for_another_body_gets_422_over_the_wire(server: Running) -> None:
    key = server.key()
    async with plain(server) as http:
        headers = {"Idempotency-Key": key}
        await http.post("/ledger/entries", params={"key": key}, content=b"a", headers=headers)
        reused = await http.post(
            "/ledger/entries", params={"key": key}, content=b"b", headers=headers
        )
    assert reused.status_code == 422
    assert reused.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("value", [b"k" * 256, b"caf\xc3\xa9", b"", b'"unterminated', b"a\x7fb"])
async def test_a_malformed_key_gets_400_over_the_wire(server: Running, value: bytes) -> None:
    key = server.key()
    async with plain(server) as http:
        response = await http.post(
            "/ledger/entries", params={"key": key}, headers=[(b"Idempotency-Key", value)]
        )
    assert response.status_code == 400
    assert response.json()["title"] == "Bad Request"
    assert key not in server.app.ledger.runs


async def test_an_oversized_body_gets_413_over_the_wire(server: Running) -> None:
    key = server.key()
    async with plain(server) as http:
        response = await http.post(
            "/ledger/entries",
            params={"key": key},
            content=b"x" * 20_000,
            headers={"Idempotency-Key": key},
        )
        # The connection may have been closed; the client goes on regardless.
        fits = await http.post(
            "/ledger/entries",
            params={"key": key},
            content=b"x" * 1024,
            headers={"Idempotency-Key": key},
        )
    assert response.status_code == 413
    assert fits.status_code == 201
    assert server.app.ledger.runs[key] == 1


async def test_an_oversized_streamed_body_gets_413_over_the_wire(server: Running) -> None:
    key = server.key()

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"x" * 500

    async with plain(server) as http:
        response = await http.post(
            "/ledger/entries",
            params={"key": key},
            content=chunks(),
            headers={"Idempotency-Key": key},
        )
    assert response.status_code == 413
    assert key not in server.app.ledger.runs


async def test_a_5xx_is_not_stored_over_the_wire(server: Running) -> None:
    key = server.key()
    async with plain(server) as http:
        headers = {"Idempotency-Key": key}
        failed = await http.post(
            "/ledger/entries", params={"key": key, "status": 503}, headers=headers
        )
        retried = await http.post(
            "/ledger/entries", params={"key": key, "status": 503}, headers=headers
        )
    assert failed.status_code == retried.status_code == 503
    assert "idempotent-replayed" not in retried.headers
    assert server.app.ledger.runs[key] == 2


async def test_a_post_whose_response_was_lost_is_retried_and_replayed(server: Running) -> None:
    """The service ran, the connection dropped: the retry gets the stored response."""
    key = server.key()
    async with client(server, add_idempotency_keys=True) as http:
        response = await http.post("/lossy/entries", params={"key": key}, content=b"order")
    assert response.status_code == 201
    assert response.headers["idempotent-replayed"] == "true"
    assert response.json()["run"] == 1
    assert server.app.ledger.runs[key] == 1


# -- per-host breakers, end to end ----------------------------------------------------------


def closed_port() -> int:
    """A local port nobody listens on: connecting to it is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_refusing_host_opens_its_own_breaker_only(server: Running) -> None:
    key = server.key()
    down = f"http://127.0.0.1:{closed_port()}"
    breakers: dict[str, sw.CircuitBreaker] = {}

    def per_host(origin: str) -> sw.CircuitBreaker:
        breaker = breakers[origin] = sw.CircuitBreaker(consecutive_failures=2, name=origin)
        return breaker

    async with client(server, sw.Retry(attempts=1), per_host=per_host) as http:
        for _ in range(2):
            with pytest.raises(httpx.ConnectError):
                await http.get(f"{down}/items")
        with pytest.raises(sw.CircuitOpenError):
            await http.get(f"{down}/items")
        for _ in range(3):
            response = await http.get("/flaky", params={"key": key})
            assert response.status_code == 200
    assert breakers[down].state is sw.CircuitState.OPEN
    assert breakers[server.url].state is sw.CircuitState.CLOSED
    assert len(server.hits(key)) == 3
