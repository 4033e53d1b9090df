"""opentelemetry-instrumentation-httpx with ResilientTransport, against a real server.

The instrumentation's transport wraps the inner one, so each attempt is an
HTTP client span of its own, under the span of the transport's policy, and
carries its own ``traceparent`` downstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.httpx import AsyncOpenTelemetryTransport
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.httpx import ResilientTransport

from .conftest import Spans
from .http_support import read_body, respond, serve

pytestmark = pytest.mark.realtime


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The real clock here: the server is real."""
    return str(request.param)


class Flaky:
    """Answers 503 to the first request, then 200; keeps each request's traceparent."""

    def __init__(self) -> None:
        self.traceparents: list[str | None] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await read_body(receive)
        headers = dict(scope["headers"])
        parent = headers.get(b"traceparent")
        self.traceparents.append(None if parent is None else parent.decode())
        status = 503 if len(self.traceparents) == 1 else 200
        await respond(send, status, b"ok" if status == 200 else b"busy")


@pytest.fixture
def upstream() -> Iterator[tuple[str, Flaky]]:
    app = Flaky()
    with serve(app) as url:
        yield url, app


async def test_each_attempt_is_a_client_span_under_the_retrys_span(
    upstream: tuple[str, Flaky], spans: Spans
) -> None:
    url, app = upstream
    telemetry = sw.Telemetry(registry=CollectorRegistry(), tracer_provider=spans.provider)
    transport = ResilientTransport(
        sw.Retry(
            attempts=3, backoff=sw.Backoff(0.0, maximum=0.0), name="outbound", telemetry=telemetry
        ),
        transport=AsyncOpenTelemetryTransport(
            httpx.AsyncHTTPTransport(), tracer_provider=spans.provider
        ),
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get(f"{url}/items")
    assert response.status_code == 200

    retry = spans.named("stalwart.retry outbound")
    assert len(retry) == 1
    attempts = [s for s in spans.finished if s.kind is SpanKind.CLIENT]
    assert len(attempts) == 2  # the 503, and the 200
    statuses = []
    for attempt in attempts:
        attributes = dict(attempt.attributes or {})
        statuses.append(
            attributes.get("http.response.status_code", attributes.get("http.status_code"))
        )
    assert statuses == [503, 200]
    parent = retry[0].context
    for attempt in attempts:
        assert attempt.parent is not None
        assert attempt.parent.span_id == parent.span_id
        assert attempt.context.trace_id == parent.trace_id
    # The retry's span says why it retried.
    (retrying,) = [e for e in retry[0].events if e.name == "stalwart.retry"]
    assert retrying.attributes is not None
    assert retrying.attributes["error.type"] == "stalwart.httpx.RetryableStatusError"

    # Downstream, each attempt carries its own span as the parent.
    sent = [p.split("-") for p in app.traceparents if p is not None]
    assert len(sent) == 2
    assert {trace for _, trace, _, _ in sent} == {f"{parent.trace_id:032x}"}
    assert [span for _, _, span, _ in sent] == [f"{a.context.span_id:016x}" for a in attempts]
