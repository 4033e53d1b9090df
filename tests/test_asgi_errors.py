"""ErrorMiddleware: stalwart errors answered as 503s and 504s (asyncio and trio, virtual time)."""

from __future__ import annotations

import math
import sys
from typing import Any

import anyio
import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import DeadlineMiddleware, ErrorMiddleware, Message, Receive, Scope, Send
from stalwart.httpx import ResilientTransport


class Raises:
    """An app that raises ``error`` (after starting its response, if ``started``)."""

    def __init__(self, error: BaseException, *, started: bool = False) -> None:
        self.error = error
        self.started = started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise self.error


def private() -> sw.Telemetry:
    """A registry of its own: breakers of one name in several tests never meet."""
    return sw.Telemetry(registry=CollectorRegistry())


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service")


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == "about:blank"
    assert body["status"] == status
    return body


@pytest.mark.parametrize(
    ("error", "status", "kind", "retry_after"),
    [
        (sw.CircuitOpenError("x", policy="inventory", retry_after=29.2), 503, "circuit_open", "30"),
        (sw.CircuitOpenError("x", policy="inventory", retry_after=0.0), 503, "circuit_open", "0"),
        # A clock's rounding is not a second more.
        (
            sw.CircuitOpenError("x", policy="inventory", retry_after=30.000000004),
            503,
            "circuit_open",
            "30",
        ),
        # A breaker forced open: no time to tell.
        (
            sw.CircuitOpenError("x", policy="inventory", retry_after=math.inf),
            503,
            "circuit_open",
            None,
        ),
        (sw.RateLimitExceeded("x", policy="inventory", retry_after=0.25), 503, "rate_limited", "1"),
        (
            sw.RateLimitExceeded("x", policy="inventory", retry_after=None),
            503,
            "rate_limited",
            None,
        ),
        (sw.BulkheadFullError("x", policy="inventory"), 503, "bulkhead_full", None),
        (sw.DeadlineExceeded("x", policy="inventory", timeout=2.0), 504, "deadline_exceeded", None),
    ],
)
async def test_each_error_gets_its_status_kind_and_retry_after(
    error: sw.StalwartError, status: int, kind: str, retry_after: str | None
) -> None:
    async with client(ErrorMiddleware(Raises(error))) as http:
        response = await http.get("/items")
    body = problem(response, status)
    assert body["kind"] == kind
    assert body["policy"] == "inventory"
    assert "'inventory'" in body["detail"]
    assert body["title"] == {503: "Service Unavailable", 504: "Gateway Timeout"}[status]
    assert response.headers.get("retry-after") == retry_after


async def test_the_answer_tells_nothing_else_of_the_error() -> None:
    error = sw.BulkheadFullError("db-7.internal:5432 pool exhausted", policy="db")
    async with client(ErrorMiddleware(Raises(error))) as http:
        response = await http.get("/items")
    assert set(problem(response, 503)) == {"type", "title", "status", "detail", "policy", "kind"}
    assert "db-7.internal" not in response.text
    assert "Traceback" not in response.text


async def test_an_open_breaker_in_a_handler_is_a_503_to_come_back_when_it_half_opens() -> None:
    breaker = sw.CircuitBreaker(
        consecutive_failures=1, open_for=30.0, name="pricing", telemetry=private()
    )

    @breaker
    async def price() -> int:
        raise ConnectionError("pricing is down")

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await price()

    async with client(ErrorMiddleware(app)) as http:
        with pytest.raises(ConnectionError):
            await http.get("/price")
        await anyio.sleep(10.5)
        response = await http.get("/price")
    assert problem(response, 503)["policy"] == "pricing"
    assert response.headers["retry-after"] == "20"  # 19.5 s, rounded up


async def test_a_timeout_in_a_handler_is_a_504() -> None:
    @sw.Timeout(0.5, name="report")
    async def report() -> None:
        await anyio.sleep(10)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await report()

    async with client(ErrorMiddleware(app)) as http:
        start = anyio.current_time()
        response = await http.get("/report")
    assert problem(response, 504)["policy"] == "report"
    assert anyio.current_time() - start == pytest.approx(0.5)


async def hangs(request: httpx.Request) -> httpx.Response:
    await anyio.sleep(3600)
    raise AssertionError("unreachable")  # pragma: no cover


async def test_the_errors_the_httpx_transport_raises_are_recognised() -> None:
    """An outbound call failing inside a handler: the httpx errors that are stalwart's too."""
    breakers: list[sw.CircuitBreaker] = []

    def per_host(origin: str) -> sw.Pipeline:
        breakers.append(sw.CircuitBreaker(consecutive_failures=2, name=origin, telemetry=private()))
        return sw.Pipeline(breakers[-1], sw.Timeout(1.0, name="attempt"))

    upstream = httpx.AsyncClient(
        transport=ResilientTransport(
            sw.Retry(attempts=1), transport=httpx.MockTransport(hangs), per_host=per_host
        )
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await upstream.get("http://pricing.internal/price")

    async with upstream, client(ErrorMiddleware(app)) as http:
        timed_out = await http.get("/price")
        await http.get("/price")
        rejected = await http.get("/price")
    assert problem(timed_out, 504)["kind"] == "deadline_exceeded"
    assert problem(rejected, 503)["policy"] == "http://pricing.internal:80"
    assert breakers[0].state is sw.CircuitState.OPEN


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are built in from 3.11")
async def test_an_error_alone_in_task_groups_is_answered() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def refused() -> None:
            raise sw.BulkheadFullError("full", policy="fan-out")

        async with anyio.create_task_group() as tg:
            tg.start_soon(refused)

    async with client(ErrorMiddleware(app)) as http:
        response = await http.get("/fan-out")
    assert problem(response, 503)["policy"] == "fan-out"


async def test_a_group_of_several_errors_propagates() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def refused(policy: str) -> None:
            raise sw.BulkheadFullError("full", policy=policy)

        async with anyio.create_task_group() as tg:
            tg.start_soon(refused, "a")
            tg.start_soon(refused, "b")

    with pytest.raises(BaseException) as raised:
        await call(ErrorMiddleware(app))
    assert len(getattr(raised.value, "exceptions", ())) == 2


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("a bug"),
        sw.IdempotencyConflict("in flight", policy="orders"),
        sw.StalwartError("some other", policy="p"),
    ],
)
async def test_other_errors_propagate_unchanged(error: Exception) -> None:
    with pytest.raises(type(error)) as raised:
        await call(ErrorMiddleware(Raises(error)))
    assert raised.value is error


async def test_an_error_after_the_response_started_propagates() -> None:
    error = sw.CircuitOpenError("open", policy="p", retry_after=1.0)
    sent: list[Message] = []
    with pytest.raises(sw.CircuitOpenError):
        await call(ErrorMiddleware(Raises(error, started=True)), sent=sent)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 200


async def test_cancellation_passes_through() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(3600)

    with anyio.move_on_after(1.0) as cancelled:
        await call(ErrorMiddleware(app))
    assert cancelled.cancelled_caught


async def test_a_deadline_middleware_outside_still_answers_its_own_expiry() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(10)

    service = DeadlineMiddleware(ErrorMiddleware(app))
    async with client(service) as http:
        response = await http.get("/slow", headers={"x-request-timeout-ms": "200"})
    assert problem(response, 504)["detail"].startswith("The request's deadline of 200 ms")


async def test_a_timeout_cut_short_by_the_requests_deadline_is_answered_once() -> None:
    """The request's deadline is nearer than the handler's Timeout: one 504, whoever sends it."""

    @sw.Timeout(10.0, name="report")
    async def report() -> None:
        await anyio.sleep(60)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await report()

    sent: list[Message] = []
    service = DeadlineMiddleware(ErrorMiddleware(app))
    await call(service, sent=sent, headers=[(b"x-request-timeout-ms", b"200")])
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 504
    assert anyio.current_time() == pytest.approx(0.2)


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
async def test_other_scopes_pass_straight_through(scope_type: str) -> None:
    error = sw.BulkheadFullError("full", policy="p")
    with pytest.raises(sw.BulkheadFullError):
        await call(ErrorMiddleware(Raises(error)), scope_type=scope_type)


def test_the_app_must_be_callable() -> None:
    with pytest.raises(TypeError, match="app"):
        ErrorMiddleware("app")  # type: ignore[arg-type]


# -- with FastAPI --------------------------------------------------------------------------


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/open")
    async def open_circuit() -> None:
        raise sw.CircuitOpenError("open", policy="inventory", retry_after=5.0)

    @app.get("/full")
    async def full() -> None:
        raise sw.BulkheadFullError("full", policy="workers")

    @app.get("/missing")
    async def missing() -> None:
        raise HTTPException(status_code=404, detail="no such item")

    app.add_middleware(ErrorMiddleware)
    return app


async def test_fastapi_answers_a_503_instead_of_a_500() -> None:
    async with client(fastapi_app()) as http:
        response = await http.get("/open")
    assert problem(response, 503)["policy"] == "inventory"
    assert response.headers["retry-after"] == "5"


async def test_fastapi_exception_handlers_take_precedence() -> None:
    app = fastapi_app()

    @app.exception_handler(sw.CircuitOpenError)
    async def degrade(request: Request, exc: sw.CircuitOpenError) -> JSONResponse:
        return JSONResponse({"items": [], "degraded": True})

    async with client(app) as http:
        handled = await http.get("/open")
        unhandled = await http.get("/full")
        missing = await http.get("/missing")
    assert handled.status_code == 200
    assert handled.json() == {"items": [], "degraded": True}
    assert problem(unhandled, 503)["kind"] == "bulkhead_full"
    assert missing.status_code == 404


# -- plain ASGI calls ------------------------------------------------------------------------


async def call(
    app: Any,
    *,
    scope_type: str = "http",
    sent: list[Message] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if sent is not None:
            sent.append(message)

    scope = {"type": scope_type, "method": "GET", "path": "/", "headers": headers or []}
    await app(scope, receive, send)
