"""DeadlineMiddleware as plain ASGI, on asyncio and trio, in virtual time."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

import stalwart as sw
from stalwart.asgi import (
    DeadlineMiddleware,
    Message,
    Receive,
    Scope,
    Send,
    parse_grpc_timeout,
    parse_timeout_ms,
)
from stalwart.httpx import ResilientTransport


class App:
    """Answers 200 after ``work`` seconds; remembers the deadline it ran under."""

    def __init__(self, work: float = 0.0) -> None:
        self.work = work
        self.remaining: list[float | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.remaining.append(sw.remaining())
        await anyio.sleep(self.work)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


async def call(
    app: Any, headers: dict[str, str] | None = None, scope_type: str = "http"
) -> list[Message]:
    """Call ``app`` with one request; the messages it sent."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {"type": scope_type, "method": "GET", "path": "/", "headers": raw}
    await app(scope, receive, send)
    return sent


# -- the deadline ------------------------------------------------------------------------


async def test_the_app_runs_under_the_deadline_in_the_header() -> None:
    app = App()
    await call(DeadlineMiddleware(app), {"x-request-timeout-ms": "1500"})
    assert app.remaining == [1.5]


async def test_a_request_without_the_header_runs_without_a_deadline() -> None:
    app = App()
    await call(DeadlineMiddleware(app))
    assert app.remaining == [None]


async def test_the_deadline_is_capped_at_max_timeout() -> None:
    app = App()
    await call(DeadlineMiddleware(app, max_timeout=2.0), {"x-request-timeout-ms": "90000"})
    assert app.remaining == [2.0]


async def test_the_default_cap_is_a_minute() -> None:
    app = App()
    await call(DeadlineMiddleware(app), {"x-request-timeout-ms": "3600000"})
    assert app.remaining == [60.0]


async def test_no_cap_with_max_timeout_none() -> None:
    app = App()
    await call(DeadlineMiddleware(app, max_timeout=None), {"x-request-timeout-ms": "3600000"})
    assert app.remaining == [3600.0]


@pytest.mark.parametrize(
    "value", ["", "soon", "-5", "1e3", "NaN", "inf", "12ms", "1,5", "0x10", "9" * 16, "١٢"]
)
async def test_a_malformed_header_is_ignored(value: str) -> None:
    app = App()
    sent = await call(DeadlineMiddleware(app), {"x-request-timeout-ms": value})
    assert app.remaining == [None]
    assert sent[0]["status"] == 200


async def test_requests_without_a_usable_header_get_the_default_timeout() -> None:
    app = App()
    middleware = DeadlineMiddleware(app, default_timeout=5.0)
    await call(middleware)
    await call(middleware, {"x-request-timeout-ms": "garbage"})
    await call(middleware, {"x-request-timeout-ms": "250"})
    assert app.remaining == [5.0, 5.0, 0.25]


async def test_the_default_timeout_is_capped_too() -> None:
    app = App()
    await call(DeadlineMiddleware(app, max_timeout=2.0, default_timeout=30.0))
    assert app.remaining == [2.0]


async def test_the_header_can_be_renamed() -> None:
    app = App()
    middleware = DeadlineMiddleware(app, header="X-Deadline-Ms")
    await call(middleware, {"x-deadline-ms": "700", "x-request-timeout-ms": "100"})
    assert app.remaining == [0.7]


async def test_grpc_timeout_is_read_when_configured() -> None:
    app = App()
    await call(DeadlineMiddleware(app, grpc_timeout=True), {"grpc-timeout": "250m"})
    await call(DeadlineMiddleware(app), {"grpc-timeout": "250m"})
    assert app.remaining == [0.25, None]


async def test_the_nearer_of_both_headers_wins() -> None:
    app = App()
    middleware = DeadlineMiddleware(app, grpc_timeout=True)
    await call(middleware, {"grpc-timeout": "2S", "x-request-timeout-ms": "3000"})
    await call(middleware, {"grpc-timeout": "4S", "x-request-timeout-ms": "3000"})
    await call(middleware, {"grpc-timeout": "4 S", "x-request-timeout-ms": "3000"})
    assert app.remaining == [2.0, 3.0, 3.0]


async def test_the_header_alone_can_be_switched_off() -> None:
    app = App()
    middleware = DeadlineMiddleware(app, header=None, grpc_timeout=True)
    await call(middleware, {"x-request-timeout-ms": "3000"})
    await call(middleware, {"x-request-timeout-ms": "3000", "grpc-timeout": "1S"})
    assert app.remaining == [None, 1.0]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"0", 0.0), (b"1500", 1.5), (b" 20 ", 0.02), (b"2.5", 0.0025), (b"-1", None), (b"x", None)],
)
def test_parse_timeout_ms(value: bytes, seconds: float | None) -> None:
    assert parse_timeout_ms(value) == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"250m", 0.25),
        (b"500u", 0.0005),
        (b"99999999n", 0.099999999),
        (b"123456789S", None),  # more than 8 digits
        (b"5", None),
        (b"5s", None),
        (b"S", None),
        (b"-5S", None),
    ],
)
def test_parse_grpc_timeout(value: bytes, seconds: float | None) -> None:
    result = parse_grpc_timeout(value)
    assert result == (pytest.approx(seconds) if seconds is not None else None)


# -- expiry --------------------------------------------------------------------------------


async def test_expiry_before_the_response_starts_answers_504() -> None:
    app = App(work=10.0)
    start = anyio.current_time()
    sent = await call(DeadlineMiddleware(app), {"x-request-timeout-ms": "300"})
    assert anyio.current_time() - start == 0.3
    head, body = sent
    assert head["status"] == 504
    headers = dict(head["headers"])
    assert headers[b"content-type"] == b"application/problem+json"
    assert int(headers[b"content-length"]) == len(body["body"])
    problem = json.loads(body["body"])
    assert problem["status"] == 504
    assert problem["title"] == "Gateway Timeout"
    assert "300 ms" in problem["detail"]
    assert body.get("more_body", False) is False


async def test_a_zero_deadline_answers_504_without_running_the_app_to_completion() -> None:
    app = App(work=1.0)
    sent = await call(DeadlineMiddleware(app), {"x-request-timeout-ms": "0"})
    assert sent[0]["status"] == 504


async def test_expiry_after_the_response_started_leaves_it_unfinished() -> None:
    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        await anyio.sleep(10)
        await send({"type": "http.response.body", "body": b"rest"})

    sent = await call(DeadlineMiddleware(streaming), {"x-request-timeout-ms": "500"})
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[-1]["more_body"] is True


async def test_a_deadline_that_is_met_changes_nothing() -> None:
    app = App(work=0.2)
    sent = await call(DeadlineMiddleware(app), {"x-request-timeout-ms": "300"})
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"done"


async def test_the_apps_own_deadline_errors_are_not_answered_for_it() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await sw.Timeout(0.1).call(anyio.sleep, 10)

    with pytest.raises(sw.DeadlineExceeded) as info:
        await call(DeadlineMiddleware(app), {"x-request-timeout-ms": "5000"})
    assert info.value.policy == "timeout"


async def test_an_inner_timeout_cut_short_by_the_request_deadline_still_answers_504() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await sw.Timeout(30.0).call(anyio.sleep, 10)

    sent = await call(DeadlineMiddleware(app), {"x-request-timeout-ms": "100"})
    assert sent[0]["status"] == 504


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
async def test_other_scopes_pass_straight_through(scope_type: str) -> None:
    app = App()
    await call(
        DeadlineMiddleware(app, default_timeout=1.0), {"x-request-timeout-ms": "5"}, scope_type
    )
    assert app.remaining == [None]


# -- with the transport, in process ---------------------------------------------------


async def test_the_transport_and_the_middleware_agree_on_the_header() -> None:
    app = App()
    upstream = ResilientTransport(transport=httpx.ASGITransport(DeadlineMiddleware(app)))
    async with httpx.AsyncClient(transport=upstream, base_url="http://inventory") as client:
        with sw.deadline(1.25):
            response = await client.get("/")
    assert response.status_code == 200
    assert app.remaining == [1.25]


async def test_a_504_from_the_middleware_is_retried_by_the_transport() -> None:
    app = App(work=10.0)
    calls: list[float | None] = app.remaining
    middleware = DeadlineMiddleware(app, default_timeout=1.0)
    policy = sw.Retry(attempts=2, backoff=sw.Backoff(initial=0.0, maximum=0.0))
    transport = ResilientTransport(policy, transport=httpx.ASGITransport(middleware))
    async with httpx.AsyncClient(transport=transport, base_url="http://inventory") as client:
        response = await client.get("/")
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert len(calls) == 2


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "param"),
    [
        ({"header": ""}, ValueError, "header"),
        ({"header": "x timeout"}, ValueError, "header"),
        ({"header": 5}, TypeError, "header"),
        ({"max_timeout": 0}, ValueError, "max_timeout"),
        ({"max_timeout": -1}, ValueError, "max_timeout"),
        ({"max_timeout": float("nan")}, ValueError, "max_timeout"),
        ({"max_timeout": "60"}, TypeError, "max_timeout"),
        ({"default_timeout": 0}, ValueError, "default_timeout"),
        ({"default_timeout": float("inf")}, ValueError, "default_timeout"),
        ({"grpc_timeout": "yes"}, TypeError, "grpc_timeout"),
    ],
)
def test_bad_options_are_rejected_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], param: str
) -> None:
    with pytest.raises(error, match=param):
        DeadlineMiddleware(App(), **options)


def test_the_app_must_be_callable() -> None:
    with pytest.raises(TypeError, match="app"):
        DeadlineMiddleware("app")  # type: ignore[arg-type]
