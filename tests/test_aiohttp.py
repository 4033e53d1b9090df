"""The aiohttp middlewares against a real aiohttp server on a free port.

Each test starts its own ``web.Application`` in its own event loop (aiohttp
is asyncio only, so these tests run on asyncio, on the real clock): a flaky
upstream that answers as each request asks and records what it saw, and
routes behind `DeadlineMiddleware`. Waits are tenths of a second.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import pickle
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

import stalwart as sw
from stalwart.aiohttp import (
    ClientBulkheadFull,
    ClientCircuitOpen,
    ClientDeadlineExceeded,
    ClientRateLimited,
    DeadlineMiddleware,
    ResilientMiddleware,
    RetryableStatusError,
    _as_client_error,
    is_retryable,
)

from .conftest import Spans

pytestmark = pytest.mark.realtime

# No backoff of its own, but room for the server's hints: a hint longer than
# the backoff's maximum stops the retries (contract v2).
NO_WAIT = sw.Backoff(initial=0.0, maximum=5.0)


@pytest.fixture
def anyio_backend() -> str:
    """aiohttp runs on asyncio only; the real clock: the server is real."""
    return "asyncio"


@dataclass
class Hit:
    method: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Upstream:
    hits: dict[str, list[Hit]] = field(default_factory=dict)
    remaining: dict[str, float | None] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)

    async def flaky(self, request: web.Request) -> web.StreamResponse:
        query = request.query
        key = query["key"]
        seen = self.hits.setdefault(key, [])
        body = await request.read()
        seen.append(Hit(request.method, dict(request.headers), body, time.monotonic()))
        if len(seen) <= int(query.get("fail", "0")):
            if "dribble" in query:  # the start of a body, and the rest that late
                dribbled = web.StreamResponse(status=503)
                dribbled.content_length = len(b"busy busy")  # stated: the client reads it
                await dribbled.prepare(request)
                await dribbled.write(b"busy ")
                await asyncio.sleep(float(query["dribble"]))
                await dribbled.write(b"busy")
                return dribbled
            if "endless" in query:  # a 503 whose body never ends (no stated length)
                endless = web.StreamResponse(status=503)
                await endless.prepare(request)
                while True:
                    await endless.write(b"busy " * 1000)
                    await asyncio.sleep(0.01)
            if "big" in query:  # a 503 with a stated length over what the client keeps
                return web.Response(status=503, body=b"b" * int(query["big"]))
            headers = {"Retry-After": query["retry_after"]} if "retry_after" in query else {}
            return web.Response(
                status=int(query.get("status", "503")), text="busy " * 100, headers=headers
            )
        if "sleep" in query and len(seen) <= int(query.get("sleepy", "99")):
            await asyncio.sleep(float(query["sleep"]))
        return web.json_response({"hit": len(seen)})

    async def guarded(self, request: web.Request) -> web.StreamResponse:
        key = request.query.get("key", "")
        self.remaining[key] = sw.remaining()
        if "raise" in request.query:
            raise ERRORS[request.query["raise"]]()
        if "sleep" in request.query:
            try:
                await asyncio.sleep(float(request.query["sleep"]))
            except asyncio.CancelledError:
                self.cancelled.add(key)
                raise
        if "stream" in request.query:
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"first part")
            await asyncio.sleep(float(request.query["stream"]))
            await response.write(b"the rest")
            return response
        return web.json_response({"remaining": sw.remaining()})


ERRORS: dict[str, Callable[[], Exception]] = {
    "circuit": lambda: sw.CircuitOpenError("db is down", policy="db", retry_after=1.2),
    "bulkhead": lambda: sw.BulkheadFullError("no slot", policy="pool"),
    "rate": lambda: sw.RateLimitExceeded("slow down", policy="limit", retry_after=None),
    "timeout": lambda: sw.DeadlineExceeded("too slow", policy="db-timeout", timeout=0.5),
}


@dataclass
class Server:
    upstream: Upstream
    url: str
    keys: int = 0

    def key(self) -> str:
        self.keys += 1
        return f"k{self.keys}"

    def hits(self, key: str) -> list[Hit]:
        return self.upstream.hits.get(key, [])


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("*", "/flaky", upstream.flaky)
    guarded = web.Application(middlewares=[DeadlineMiddleware(max_timeout=5.0)])
    guarded.router.add_get("/", upstream.guarded)
    app.add_subapp("/guarded", guarded)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Server(upstream, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def session(
    server: Server, policy: sw.Policy | None = None, **options: Any
) -> aiohttp.ClientSession:
    middleware = ResilientMiddleware(policy or sw.Retry(attempts=3, backoff=NO_WAIT), **options)
    return aiohttp.ClientSession(base_url=server.url, middlewares=[middleware])


def one_connection(server: Server, *, attempts: int) -> aiohttp.ClientSession:
    """A session with one connection at most: what holds it blocks the next request."""
    middleware = ResilientMiddleware(sw.Retry(attempts=attempts, backoff=NO_WAIT))
    return aiohttp.ClientSession(
        base_url=server.url, connector=aiohttp.TCPConnector(limit=1), middlewares=[middleware]
    )


# -- the client middleware --------------------------------------------------------------


async def test_503s_are_retried_until_the_upstream_answers(server: Server) -> None:
    key = server.key()
    async with session(server) as http, http.get("/flaky", params={"key": key, "fail": 2}) as r:
        assert r.status == 200
        assert (await r.json())["hit"] == 3


async def test_the_last_503_is_returned_after_the_last_attempt(server: Server) -> None:
    key = server.key()
    async with session(server) as http, http.get("/flaky", params={"key": key, "fail": 9}) as r:
        assert r.status == 503
        assert (await r.text()).startswith("busy busy")
        assert (await r.read()).startswith(b"busy busy")  # as without the middleware
    assert len(server.hits(key)) == 3


async def test_the_last_503s_body_reads_with_every_method(server: Server) -> None:
    key = server.key()
    policy = sw.Pipeline(sw.Retry(attempts=2, backoff=NO_WAIT), sw.Timeout(5.0))
    async with session(server, policy) as http:
        async with http.get("/flaky", params={"key": key, "fail": 9}) as r:
            assert r.status == 503
            assert await r.read() == b"busy " * 100
            assert await r.text() == "busy " * 100
        assert len(http.connector._acquired) == 0  # type: ignore[union-attr]


async def test_a_429_with_retry_after_is_waited_out(server: Server) -> None:
    key = server.key()
    params: dict[str, str | int] = {"key": key, "fail": 1, "status": 429, "retry_after": "0.2"}
    async with session(server) as http, http.get("/flaky", params=params) as r:
        assert r.status == 200
    first, second = server.hits(key)
    assert second.at - first.at >= 0.2


async def test_a_retry_after_date_is_read(server: Server) -> None:
    key = server.key()
    seen: list[RetryableStatusError] = []

    def on(error: BaseException) -> bool:
        if isinstance(error, RetryableStatusError):
            seen.append(error)
        return False

    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    params: dict[str, str | int] = {"key": key, "fail": 1, "retry_after": when}
    async with session(server, sw.Retry(on=on)) as http, http.get("/flaky", params=params) as r:
        assert r.status == 503
    [error] = seen
    assert error.retry_after is not None
    assert 100 < error.retry_after <= 121
    assert error.status == 503


async def test_a_post_is_not_retried(server: Server) -> None:
    key = server.key()
    async with session(server) as http, http.post("/flaky", params={"key": key, "fail": 1}) as r:
        assert r.status == 503
    assert len(server.hits(key)) == 1


async def test_a_post_with_an_idempotency_key_is_retried(server: Server) -> None:
    key = server.key()
    headers = {"Idempotency-Key": "order-7"}
    async with (
        session(server) as http,
        http.post("/flaky", params={"key": key, "fail": 1}, headers=headers, data=b"x") as r,
    ):
        assert r.status == 200
    assert [hit.body for hit in server.hits(key)] == [b"x", b"x"]


async def test_a_409_to_a_keyed_request_is_retried(server: Server) -> None:
    key, unkeyed = server.key(), server.key()
    headers = {"Idempotency-Key": "order-8"}
    params: dict[str, Any] = {"key": key, "fail": 1, "status": 409, "retry_after": "0.1"}
    async with session(server) as http:
        async with http.post("/flaky", params=params, headers=headers) as r:
            assert r.status == 200
        async with http.get("/flaky", params={**params, "key": unkeyed}) as r:
            assert r.status == 409  # no key: a 409 is an answer like any other
    first, second = server.hits(key)
    assert second.at - first.at >= 0.1
    assert len(server.hits(unkeyed)) == 1


async def test_added_idempotency_keys_travel_with_every_attempt(server: Server) -> None:
    key = server.key()
    options: dict[str, Any] = {"add_idempotency_keys": True, "rng": random.Random(7)}
    async with (
        session(server, **options) as http,
        http.post("/flaky", params={"key": key, "fail": 2}, json={"sku": 1}) as r,
    ):
        assert r.status == 200
    keys = {hit.headers["Idempotency-Key"] for hit in server.hits(key)}
    assert len(keys) == 1
    assert len(server.hits(key)) == 3


async def test_a_streamed_body_is_sent_whole_on_every_attempt(server: Server) -> None:
    key = server.key()

    async def body() -> AsyncIterator[bytes]:
        yield b"part one, "
        yield b"part two"

    async with (
        session(server) as http,
        http.put("/flaky", params={"key": key, "fail": 1}, data=body()) as r,
    ):
        assert r.status == 200
    assert [hit.body for hit in server.hits(key)] == [b"part one, part two"] * 2


async def test_the_deadline_travels_on_every_attempt(server: Server) -> None:
    key = server.key()
    async with session(server) as http:
        with sw.deadline(3.0):
            async with http.get("/flaky", params={"key": key, "fail": 1}) as r:
                assert r.status == 200
    sent = [int(hit.headers["x-request-timeout-ms"]) for hit in server.hits(key)]
    assert len(sent) == 2
    assert 2000 < sent[1] <= sent[0] <= 3000


async def test_without_a_deadline_no_header_is_sent(server: Server) -> None:
    key = server.key()
    async with session(server) as http, http.get("/flaky", params={"key": key}) as r:
        assert r.status == 200
    assert "x-request-timeout-ms" not in server.hits(key)[0].headers


async def test_an_attempt_cut_by_a_timeout_is_retried(server: Server) -> None:
    key = server.key()
    policy = sw.Pipeline(sw.Retry(attempts=2, on=is_retryable, backoff=NO_WAIT), sw.Timeout(0.2))
    params: dict[str, str | int] = {"key": key, "sleep": 30, "sleepy": 1}
    async with session(server, policy) as http, http.get("/flaky", params=params) as r:
        assert r.status == 200
    assert len(server.hits(key)) == 2


async def test_a_deadline_from_the_policy_escapes_as_a_client_timeout(server: Server) -> None:
    key = server.key()
    policy = sw.Pipeline(sw.Retry(attempts=2, backoff=NO_WAIT), sw.Timeout(0.1))
    async with session(server, policy) as http:
        with pytest.raises(ClientDeadlineExceeded) as failed:
            await http.get("/flaky", params={"key": key, "sleep": 30})
    error = failed.value
    assert isinstance(error, aiohttp.ServerTimeoutError)
    assert isinstance(error, aiohttp.ClientError)
    assert isinstance(error, sw.DeadlineExceeded)
    assert error.policy == "timeout"
    assert error.timeout == pytest.approx(0.1)


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(sw.Retry(attempts=4, backoff=NO_WAIT), id="retry-everything"),
        pytest.param(sw.Retry(attempts=4, on=TimeoutError, backoff=NO_WAIT), id="on-timeouts"),
    ],
)
@pytest.mark.parametrize(
    "slow",
    [
        pytest.param({"sleep": 30}, id="waiting-for-the-answer"),
        pytest.param({"fail": 1, "dribble": 30}, id="reading-a-503s-body"),
    ],
)
async def test_aiohttps_total_timeout_ends_the_retrying(
    server: Server, policy: sw.Retry, slow: dict[str, int]
) -> None:
    # ClientTimeout.total bounds the whole request: once it has passed, any
    # other attempt would be sent only to fail before its answer.
    attempts: list[str] = []

    async def count(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        attempts.append(request.method)
        return await handler(request)

    key = server.key()
    async with aiohttp.ClientSession(
        base_url=server.url, middlewares=[ResilientMiddleware(policy), count]
    ) as http:
        with pytest.raises(TimeoutError) as failed:
            await http.get(
                "/flaky", params={"key": key, **slow}, timeout=aiohttp.ClientTimeout(total=0.2)
            )
        assert type(failed.value) is TimeoutError  # aiohttp's own, as without the middleware
        assert attempts == ["GET"]
        assert len(http.connector._acquired) == 0  # type: ignore[union-attr]


async def test_an_open_breaker_escapes_as_a_client_connection_error(server: Server) -> None:
    key = server.key()
    breaker = sw.CircuitBreaker(consecutive_failures=2, name="aiohttp-test breaker")
    policy = sw.Pipeline(sw.Retry(attempts=1), breaker)
    async with session(server, policy) as http:
        for _ in range(2):
            async with http.get("/flaky", params={"key": key, "fail": 9}) as r:
                assert r.status == 503
        with pytest.raises(ClientCircuitOpen) as rejected:
            await http.get("/flaky", params={"key": key})
    error = rejected.value
    assert isinstance(error, aiohttp.ClientConnectionError)
    assert isinstance(error, sw.CircuitOpenError)
    assert error.policy == "aiohttp-test breaker"
    assert error.retry_after > 0
    assert len(server.hits(key)) == 2
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is ClientCircuitOpen
    assert copy.retry_after == error.retry_after


@pytest.mark.parametrize(
    ("raised", "kind"),
    [
        (sw.BulkheadFullError("full", policy="b"), ClientBulkheadFull),
        (sw.RateLimitExceeded("slow", policy="r", retry_after=2.0), ClientRateLimited),
    ],
)
async def test_refusals_escape_as_client_connection_errors(
    raised: sw.StalwartError, kind: type[aiohttp.ClientError]
) -> None:
    async def handler(request: Any) -> Any:
        raise raised  # as a policy inside the session's own would

    request: Any = type("Request", (), {"method": "GET", "headers": {}, "body": b"", "url": "/"})()
    with pytest.raises(kind) as escaped:
        await ResilientMiddleware(sw.Retry(attempts=1))(request, handler)
    error: Any = escaped.value
    assert isinstance(error, type(raised))
    assert isinstance(error, aiohttp.ClientConnectionError)
    assert error.policy == raised.policy
    assert error.__cause__ is raised


async def fetch_status(http: aiohttp.ClientSession, key: str) -> int:
    async with http.get("/flaky", params={"key": key, "fail": 2}) as r:
        return r.status


async def test_no_connection_is_leaked(server: Server) -> None:
    async with one_connection(server, attempts=3) as http:
        for _ in range(3):  # one connection for all: a leaked one would block the next
            status = await asyncio.wait_for(fetch_status(http, server.key()), 5)
            assert status == 200
        assert len(http.connector._acquired) == 0  # type: ignore[union-attr]


async def test_a_503_whose_body_never_ends_is_not_read_and_its_connection_not_kept(
    server: Server,
) -> None:
    key = server.key()
    async with one_connection(server, attempts=2) as http:  # the retry needs that one
        with anyio.fail_after(5):
            async with http.get("/flaky", params={"key": key, "fail": 1, "endless": 1}) as r:
                assert r.status == 200
        assert len(http.connector._acquired) == 0  # type: ignore[union-attr]
    assert len(server.hits(key)) == 2


async def test_a_503_over_a_mebibyte_is_read_by_the_caller_only_if_it_is_the_last(
    server: Server,
) -> None:
    size = 3 * 1024 * 1024
    key = server.key()
    async with one_connection(server, attempts=3) as http:
        with anyio.fail_after(10):
            async with http.get("/flaky", params={"key": key, "fail": 9, "big": size}) as r:
                assert r.status == 503
                assert len(await r.read()) == size  # whole, as without the middleware
        assert len(http.connector._acquired) == 0  # type: ignore[union-attr]
    assert len(server.hits(key)) == 3


async def test_the_servers_span_joins_the_callers_trace(
    server: Server, spans: Spans, telemetry: sw.Telemetry
) -> None:
    key = server.key()
    tracer = spans.provider.get_tracer("test")
    policy = sw.Retry(attempts=2, backoff=NO_WAIT, name="traced", telemetry=telemetry)
    async with session(server, policy) as http:
        with tracer.start_as_current_span("caller") as caller:
            async with http.get("/flaky", params={"key": key, "fail": 1}) as r:
                assert r.status == 200
    parents = [hit.headers["traceparent"] for hit in server.hits(key)]
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    assert all(p.split("-")[1] == trace_id for p in parents)
    [retry_span] = spans.named("stalwart.retry traced")
    assert retry_span.context is not None
    assert parents[0].split("-")[2] == f"{retry_span.context.span_id:016x}"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"retry_statuses": [99]}, ValueError, "retry_statuses"),
        ({"retry_statuses": "503"}, TypeError, "retry_statuses"),
        ({"deadline_header": "bad header"}, ValueError, "deadline_header"),
        ({"add_idempotency_keys": 1}, TypeError, "add_idempotency_keys"),
        ({"rng": 3}, TypeError, "rng"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_bad_options_are_refused_at_construction(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ResilientMiddleware(**options)


def test_is_retryable() -> None:
    assert is_retryable(aiohttp.ServerDisconnectedError())
    assert is_retryable(aiohttp.ClientPayloadError())
    assert is_retryable(sw.DeadlineExceeded("attempt", policy="t", timeout=1.0))
    assert not is_retryable(aiohttp.InvalidURL("x"))
    refused = _as_client_error(sw.CircuitOpenError("open", policy="p", retry_after=1.0))
    assert refused is not None
    assert not is_retryable(refused)
    assert not is_retryable(LookupError())


# -- the server middleware --------------------------------------------------------------


async def get_guarded(
    server: Server, headers: dict[str, str] | None = None, /, **query: Any
) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{server.url}/guarded/", params=query, headers=headers) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def test_the_handler_runs_under_the_deadline_the_caller_sent(server: Server) -> None:
    status, _, body = await get_guarded(server, {"x-request-timeout-ms": "1500"}, key="a")
    assert status == 200
    assert 1.0 < json.loads(body)["remaining"] <= 1.5


async def test_the_middleware_caps_the_deadline(server: Server) -> None:
    await get_guarded(server, {"x-request-timeout-ms": "900000"}, key="b")
    remaining = server.upstream.remaining["b"]
    assert remaining is not None
    assert remaining <= 5.0


@pytest.mark.parametrize("value", ["soon", "-5", "1e3", "١٢٣"])
async def test_a_malformed_deadline_header_is_ignored(server: Server, value: str) -> None:
    status, _, _ = await get_guarded(server, {"x-request-timeout-ms": value}, key="c")
    assert status == 200
    assert server.upstream.remaining["c"] is None


async def test_an_expired_deadline_answers_504(server: Server) -> None:
    status, headers, body = await get_guarded(
        server, {"x-request-timeout-ms": "200"}, key="d", sleep=30
    )
    assert status == 504
    assert headers["Content-Type"].startswith("application/problem+json")
    problem = json.loads(body)
    assert problem["status"] == 504
    assert "200 ms" in problem["detail"]
    assert "d" in server.upstream.cancelled


async def test_a_deadline_that_passes_mid_response_truncates_it(server: Server) -> None:
    with pytest.raises(aiohttp.ClientPayloadError):
        await get_guarded(server, {"x-request-timeout-ms": "200"}, stream=30)


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [("circuit", 503, "2"), ("bulkhead", 503, None), ("rate", 503, None), ("timeout", 504, None)],
)
async def test_stalwart_errors_are_answered_like_error_middleware(
    server: Server, error: str, status: int, retry_after: str | None
) -> None:
    got, headers, body = await get_guarded(server, **{"raise": error})
    assert got == status
    assert headers.get("Retry-After") == retry_after
    problem = json.loads(body)
    assert problem["status"] == status
    raised = ERRORS[error]()
    assert repr(raised.policy) in problem["detail"]  # type: ignore[attr-defined]
    assert str(raised) not in problem["detail"]  # the message may name internal hosts
    assert "Traceback" not in problem["detail"]
    assert (problem["policy"], problem["kind"]) == (
        raised.policy,  # type: ignore[attr-defined]
        {"circuit": "circuit_open", "bulkhead": "bulkhead_full", "rate": "rate_limited"}.get(
            error, "deadline_exceeded"
        ),
    )


async def test_the_callers_trace_is_the_handlers_context(server: Server) -> None:
    from opentelemetry import trace

    seen: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(trace.get_current_span().get_span_context().trace_id)
        return web.Response()

    app = web.Application(middlewares=[DeadlineMiddleware()])
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/", headers={"traceparent": parent}),
        ):
            pass
    finally:
        await runner.cleanup()
    assert seen == [0x0AF7651916CD43DD8448EB211C80319C]


@pytest.mark.parametrize("header", [{}, {"x-request-timeout-ms": "200"}])
async def test_a_websocket_runs_without_a_deadline(header: dict[str, str]) -> None:
    # A deadline bounds a request: a default_timeout (or a caller's header)
    # must not cut every WebSocket connection after that long.
    seen: list[float | None] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            seen.append(sw.remaining())
            await socket.send_str(f"echo {message.data}")
        return socket

    app = web.Application(middlewares=[DeadlineMiddleware(default_timeout=0.2)])
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"http://127.0.0.1:{port}/ws", headers=header) as socket,
        ):
            await socket.send_str("hello")
            assert await socket.receive_str() == "echo hello"
    finally:
        await runner.cleanup()
    assert seen == [None]
    handshake = {
        "Upgrade": "WebSocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    middleware = DeadlineMiddleware(default_timeout=0.2)
    assert middleware.timeout_for(make_mocked_request("GET", "/", headers=handshake)) is None


@pytest.mark.parametrize(
    ("method", "headers"),
    [
        ("POST", {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "x"}),
        ("GET", {"Upgrade": "websocket"}),  # no Connection: upgrade, no key
        ("GET", {"Upgrade": "websocket", "Connection": "Upgrade"}),  # no key
    ],
)
def test_a_request_that_only_claims_to_be_a_websocket_keeps_its_deadline(
    method: str, headers: dict[str, str]
) -> None:
    middleware = DeadlineMiddleware(default_timeout=5.0, max_timeout=10.0)
    request = make_mocked_request(method, "/charge", headers=headers)
    assert middleware.timeout_for(request) == 5.0


def test_the_server_middlewares_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_timeout"):
        DeadlineMiddleware(max_timeout=0)
    with pytest.raises(ValueError, match="default_timeout"):
        DeadlineMiddleware(default_timeout=-1)
    with pytest.raises(ValueError, match="header"):
        DeadlineMiddleware(header="not a header")


# -- a partner's quota ------------------------------------------------------------------


async def test_rate_limit_spaces_the_attempts(server: Server) -> None:
    key = server.key()
    limiter = sw.RateLimiter(10, burst=1, max_wait=5.0, name="aiohttp quota")
    start = time.monotonic()
    async with session(server, rate_limit=limiter) as client:
        for _ in range(3):
            async with client.get(f"/flaky?key={key}") as response:
                assert response.status == 200
    assert time.monotonic() - start >= 0.19  # the third turn comes 0.2 s after the first
    assert len(server.hits(key)) == 3
    assert limiter.metrics.waits == 2  # type: ignore[attr-defined]


async def test_a_rate_limit_refusal_is_a_client_error(server: Server) -> None:
    key = server.key()
    limiter = sw.RateLimiter(1, name="aiohttp refusal")
    async with session(server, rate_limit=limiter) as client:
        async with client.get(f"/flaky?key={key}") as response:
            assert response.status == 200
        with pytest.raises(ClientRateLimited) as info:
            await client.get(f"/flaky?key={key}")
    assert isinstance(info.value, aiohttp.ClientConnectionError)
    assert info.value.policy == "aiohttp refusal"
    assert len(server.hits(key)) == 1
    with pytest.raises(TypeError, match="rate_limit must be"):
        ResilientMiddleware(rate_limit=1)  # type: ignore[arg-type]
