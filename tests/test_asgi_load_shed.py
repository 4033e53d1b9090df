"""LoadShedMiddleware: 503 + Retry-After past the limit, 504 for doomed requests (virtual time)."""

from __future__ import annotations

import re
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import DeadlineMiddleware, LoadShedMiddleware, Message, Receive, Scope, Send
from stalwart.events import CallRejected, Event

from .test_concurrency_limit import Scripted


class Slow:
    """An app that takes ``seconds`` per request (or waits for ``gate``), counting its starts."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.gate: anyio.Event | None = None
        self.started = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.started += 1
        if self.gate is not None:
            await self.gate.wait()
        await anyio.sleep(self.seconds)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


def private(listeners: list[Event] | None = None) -> sw.Telemetry:
    return sw.Telemetry(
        registry=CollectorRegistry(), listeners=[] if listeners is None else [listeners.append]
    )


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service")


def limits(size: int) -> list[sw.ConcurrencyLimit | sw.Bulkhead]:
    return [
        sw.ConcurrencyLimit(algorithm=Scripted(size), name="shed", telemetry=private()),
        sw.Bulkhead(size, name="shed", telemetry=private()),
    ]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"limit": 8}, TypeError, "limit must be a stalwart.ConcurrencyLimit or a stalwart.Bulk"),
        ({"limit": sw.RetryBudget()}, TypeError, "not RetryBudget"),
        ({"retry_after": 0.0}, ValueError, "retry_after must be > 0"),
        ({"refuse_doomed": 1}, TypeError, "refuse_doomed must be a bool"),
    ],
)
def test_options_are_validated_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    options.setdefault("limit", sw.Bulkhead(1, telemetry=private()))
    with pytest.raises(error, match=message):
        LoadShedMiddleware(Slow(), **options)


def test_the_app_must_be_callable() -> None:
    with pytest.raises(TypeError, match="app must be an ASGI application, not int"):
        LoadShedMiddleware(3, limit=sw.Bulkhead(1, telemetry=private()))  # type: ignore[arg-type]


@pytest.mark.parametrize(("index", "kind"), [(0, "rate_limited"), (1, "bulkhead_full")])
async def test_requests_past_the_limit_get_a_503_with_retry_after_at_once(
    index: int, kind: str
) -> None:
    limit = limits(2)[index]
    app = Slow()
    app.gate = anyio.Event()
    async with client(LoadShedMiddleware(app, limit=limit)) as http:
        answers: list[httpx.Response] = []

        async def get() -> None:
            answers.append(await http.get("/"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(get)
            tg.start_soon(get)
            await anyio.sleep(0.01)
            before = anyio.current_time()
            shed = await http.get("/")
            assert anyio.current_time() == before  # at once: no waiting in line
            app.gate.set()
    assert [a.status_code for a in answers] == [200, 200]
    assert app.started == 2
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "1"
    assert shed.headers["content-type"] == "application/problem+json"
    body = shed.json()
    assert (body["policy"], body["kind"], body["status"]) == ("shed", kind, 503)
    assert "shed" in body["detail"]
    assert limit.in_flight == 0


async def test_retry_after_is_whole_seconds_rounded_up() -> None:
    limit = sw.Bulkhead(1, telemetry=private())
    app = Slow()
    app.gate = anyio.Event()
    middleware = LoadShedMiddleware(app, limit=limit, retry_after=2.5)
    async with client(middleware) as http, anyio.create_task_group() as tg:
        tg.start_soon(http.get, "/")
        await anyio.sleep(0.01)
        shed = await http.get("/")
        app.gate.set()
    assert shed.headers["retry-after"] == "3"


async def test_a_rate_limit_error_of_the_app_itself_is_not_answered_as_shedding() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise sw.RateLimitExceeded("inner", policy="inner")

    middleware = LoadShedMiddleware(app, limit=sw.Bulkhead(4, telemetry=private()))
    async with client(middleware) as http:
        with pytest.raises(sw.RateLimitExceeded, match="inner"):
            await http.get("/")


async def test_the_typical_service_time_is_the_median_of_admitted_requests() -> None:
    app = Slow(seconds=0.2)
    middleware = LoadShedMiddleware(app, limit=sw.Bulkhead(4, telemetry=private()))
    async with client(middleware) as http:
        for _ in range(5):
            await http.get("/")
        assert middleware.typical_service_time is None  # not enough requests yet
        for _ in range(10):
            await http.get("/")
    assert middleware.typical_service_time == pytest.approx(0.2, rel=0.02)


async def warmed(seconds: float, **options: Any) -> tuple[LoadShedMiddleware, Slow]:
    """A middleware that has seen 30 requests of ``seconds``."""
    app = Slow(seconds=seconds)
    middleware = LoadShedMiddleware(app, **options)
    async with client(middleware) as http:
        for _ in range(30):
            await http.get("/")
    app.started = 0
    return middleware, app


async def test_a_request_whose_deadline_is_shorter_than_the_typical_time_gets_a_504_unstarted() -> (
    None
):
    seen: list[Event] = []
    limit = sw.ConcurrencyLimit(algorithm=Scripted(8), name="api", telemetry=private(seen))
    middleware, app = await warmed(1.0, limit=limit)
    async with client(DeadlineMiddleware(middleware)) as http:
        before = anyio.current_time()
        doomed = await http.get("/", headers={"x-request-timeout-ms": "600"})
        assert anyio.current_time() == before
        admitted = await http.get("/", headers={"x-request-timeout-ms": "1500"})
        unbounded = await http.get("/")
    assert doomed.status_code == 504
    assert doomed.headers["content-type"] == "application/problem+json"
    assert "retry-after" not in doomed.headers
    body = doomed.json()
    assert (body["policy"], body["kind"]) == ("api", "deadline_exceeded")
    assert "600 ms" in body["detail"]
    typical = re.search(r"the (\d+) ms a request typically takes", body["detail"])
    assert typical is not None
    assert int(typical.group(1)) == pytest.approx(1000, rel=0.02)
    assert (admitted.status_code, unbounded.status_code) == (200, 200)
    assert app.started == 2
    [event] = [e for e in seen if isinstance(e, CallRejected)]
    assert (event.reason, event.policy, event.kind) == ("deadline_too_short", "api", "concurrency")


async def test_doomed_requests_are_admitted_when_refuse_doomed_is_off() -> None:
    middleware, app = await warmed(
        1.0, limit=sw.Bulkhead(4, telemetry=private()), refuse_doomed=False
    )
    async with client(DeadlineMiddleware(middleware)) as http:
        answer = await http.get("/", headers={"x-request-timeout-ms": "600"})
    assert answer.status_code == 504  # it ran, and its deadline passed
    assert app.started == 1


async def test_a_request_its_deadline_cuts_short_is_a_drop_of_the_concurrency_limit() -> None:
    algorithm = Scripted(4)
    limit = sw.ConcurrencyLimit(algorithm=algorithm, telemetry=private())
    app = Slow(seconds=5.0)
    async with client(DeadlineMiddleware(LoadShedMiddleware(app, limit=limit))) as http:
        answer = await http.get("/", headers={"x-request-timeout-ms": "1000"})
    assert answer.status_code == 504
    assert [(round(rtt, 3), dropped) for _, rtt, _, dropped in algorithm.samples] == [(1.0, True)]
    assert limit.in_flight == 0


async def test_other_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    limit = sw.Bulkhead(1, telemetry=private())
    middleware = LoadShedMiddleware(app, limit=limit)

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    await middleware({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]
    assert repr(middleware).startswith("LoadShedMiddleware(")
    assert middleware.app is app
    assert middleware.limit is limit
