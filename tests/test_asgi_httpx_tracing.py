"""A trace across services: DeadlineMiddleware in, ResilientTransport out, over loopback.

A caller sends a ``traceparent`` to a service behind `DeadlineMiddleware`
(under uvicorn, with no OpenTelemetry instrumentation of its own); the
service calls an upstream through a `ResilientTransport`. The stalwart span
of the service's call joins the caller's trace, and every attempt carries
it on to the upstream, as the aiohttp and gRPC integrations do.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.trace import NoOpTracerProvider, SpanContext
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import DeadlineMiddleware, Receive, Scope, Send
from stalwart.httpx import ResilientTransport

from .conftest import Spans
from .http_support import read_body, respond, serve

pytestmark = pytest.mark.realtime

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = f"00-{TRACE_ID}-{CALLER_SPAN}-01"
OWN = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
NO_WAIT = sw.Backoff(initial=0.0, maximum=0.0)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The real clock here: the servers are real."""
    return str(request.param)


def ids(traceparent: str | None) -> str | None:
    """A traceparent without its flags: version, trace id and parent span id."""
    return None if traceparent is None else traceparent.rsplit("-", 1)[0]


@dataclass
class Upstream:
    """Answers 503 to the first request, then 200; keeps each request's traceparent."""

    traceparents: list[str | None] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        await read_body(receive)
        parent = dict(scope["headers"]).get(b"traceparent")
        self.traceparents.append(None if parent is None else parent.decode())
        first = len(self.traceparents) == 1
        await respond(send, 503 if first else 200, b"busy" if first else b"ok")


class Service:
    """Calls the upstream through a ResilientTransport whose Retry records spans."""

    def __init__(self, upstream_url: str, telemetry: sw.Telemetry) -> None:
        self.upstream_url = upstream_url
        self.policy = sw.Retry(attempts=3, backoff=NO_WAIT, name="upstream", telemetry=telemetry)
        self.current: list[SpanContext] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await read_body(receive)
        self.current.append(trace.get_current_span().get_span_context())
        headers = {"traceparent": OWN} if scope["path"] == "/own" else None
        transport = ResilientTransport(self.policy)
        async with httpx.AsyncClient(base_url=self.upstream_url, transport=transport) as client:
            response = await client.get("/items", headers=headers)
        await respond(send, response.status_code, response.content)


@dataclass
class Running:
    url: str
    upstream: Upstream
    service: Service
    spans: Spans


@pytest.fixture
def running() -> Iterator[Running]:
    spans = Spans()
    telemetry = sw.Telemetry(registry=CollectorRegistry(), tracer_provider=spans.provider)
    upstream = Upstream()
    with serve(upstream) as upstream_url:
        service = Service(upstream_url, telemetry)
        with serve(DeadlineMiddleware(service, default_timeout=5.0)) as url:
            yield Running(url, upstream, service, spans)
    spans.provider.shutdown()


@pytest.mark.anyio
async def test_the_callers_trace_reaches_the_upstream_through_every_attempt(
    running: Running,
) -> None:
    async with httpx.AsyncClient(base_url=running.url) as http:
        response = await http.get("/", headers={"traceparent": CALLER})
    assert response.status_code == 200
    (retry,) = running.spans.named("stalwart.retry upstream")
    assert f"{retry.context.trace_id:032x}" == TRACE_ID
    assert retry.parent is not None
    assert f"{retry.parent.span_id:016x}" == CALLER_SPAN
    # Both attempts (the 503 and the 200) carry the Retry's span on.
    sent = f"00-{TRACE_ID}-{retry.context.span_id:016x}"
    assert [ids(parent) for parent in running.upstream.traceparents] == [sent, sent]


@pytest.mark.anyio
async def test_a_request_without_a_trace_starts_none(running: Running) -> None:
    async with httpx.AsyncClient(base_url=running.url) as http:
        response = await http.get("/")
    assert response.status_code == 200
    (retry,) = running.spans.named("stalwart.retry upstream")
    assert retry.parent is None
    assert not running.service.current[0].is_valid
    sent = f"00-{retry.context.trace_id:032x}-{retry.context.span_id:016x}"
    assert [ids(parent) for parent in running.upstream.traceparents] == [sent, sent]


@pytest.mark.anyio
async def test_a_traceparent_the_request_carries_is_kept(running: Running) -> None:
    async with httpx.AsyncClient(base_url=running.url) as http:
        response = await http.get("/own", headers={"traceparent": CALLER})
    assert response.status_code == 200
    assert running.upstream.traceparents == [OWN, OWN]


@pytest.mark.anyio
async def test_the_caller_trace_is_current_in_the_app(running: Running) -> None:
    async with httpx.AsyncClient(base_url=running.url) as http:
        await http.get("/", headers={"traceparent": CALLER})
    (context,) = running.service.current
    assert (f"{context.trace_id:032x}", f"{context.span_id:016x}") == (TRACE_ID, CALLER_SPAN)
    assert context.is_remote


@pytest.mark.anyio
async def test_no_traceparent_is_sent_outside_a_trace() -> None:
    seen: list[str | None] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("traceparent"))
        return httpx.Response(200)

    untraced = sw.Telemetry(registry=CollectorRegistry(), tracer_provider=NoOpTracerProvider())
    transport = ResilientTransport(
        sw.Retry(attempts=1, telemetry=untraced), transport=httpx.MockTransport(upstream)
    )
    async with httpx.AsyncClient(transport=transport) as http:
        with sw.deadline(5.0):
            await http.get("http://upstream/items")
        await http.get("http://upstream/items")
    assert seen == [None, None]
