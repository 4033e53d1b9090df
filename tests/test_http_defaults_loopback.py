"""The v2 HTTP defaults against a real uvicorn server, with real httpx clients.

A FastAPI service calls a flaky upstream through the httpx how-to's recipe
(a breaker and a per-attempt `Timeout` per host) behind `ErrorMiddleware`;
a ledger sits behind `IdempotencyMiddleware`; the observability how-to's
``/metrics`` route is served as written. Everything runs in uvicorn on its
own thread, on the real clock; tests wait on conditions (polled, with bounds
of seconds), never on fixed sleeps.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anyio
import httpx
import prometheus_client
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import ErrorMiddleware, IdempotencyMiddleware, Receive, Scope, Send
from stalwart.httpx import ResilientTransport

from .docs_examples import ROOT, blocks
from .http_support import read_body, respond, serve, wait_for_disconnect
from .test_httpx_errors import needs_capped_hints

pytestmark = pytest.mark.realtime

# The how-to's per-attempt limit is 2 s; 1 s keeps these tests short and is
# still far beyond what a loopback answer takes on a loaded machine. Where
# every attempt hangs, none has to succeed in time: a quarter of a second.
ATTEMPT = 1.0
HOPELESS_ATTEMPT = 0.25


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The real clock here: the server is real."""
    return str(request.param)


def query(scope: Scope) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}


@dataclass
class Upstream:
    """``/upstream/hang`` hangs on a key's first ``hangs`` requests; ``/upstream/status`` answers
    ``status`` with ``retry_after``. Requests are counted by ``key``."""

    hits: dict[str, int] = field(default_factory=dict)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = query(scope)
        key = params["key"]
        hit = self.hits[key] = self.hits.get(key, 0) + 1
        if scope["path"] == "/upstream/hang" and hit <= int(params.get("hangs", "0")):
            await wait_for_disconnect(receive)  # until the client gives up on this attempt
            return
        if scope["path"] == "/upstream/status":
            hint = [(b"retry-after", params["retry_after"].encode())]
            await respond(send, int(params["status"]), b"busy", hint)
            return
        await respond(send, 200, json.dumps({"hit": hit}).encode())


@dataclass
class Ledger:
    """Runs an entry per request, by ``key``; a request with ``gate=1`` waits for ``gate``."""

    runs: dict[str, int] = field(default_factory=dict)
    gate: threading.Event = field(default_factory=threading.Event)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = query(scope)
        await read_body(receive)
        key = params["key"]
        run = self.runs[key] = self.runs.get(key, 0) + 1
        if params.get("gate") == "1":
            while not self.gate.is_set():  # noqa: ASYNC110 - set from the test's thread
                await anyio.sleep(0.01)
        cookie = dict(scope["headers"]).get(b"cookie", b"").decode()
        await respond(send, 201, json.dumps({"run": run, "cookie": cookie}).encode())


class Service:
    """A FastAPI service that calls the upstream through the httpx how-to's recipe."""

    def __init__(self, base: Callable[[], str]) -> None:
        self.base = base
        # As the how-to writes it: the default policy, a breaker and a
        # per-attempt Timeout per host.
        self.documented = httpx.AsyncClient(
            transport=ResilientTransport(
                per_host=lambda origin: sw.Pipeline(
                    sw.CircuitBreaker(name=origin), sw.Timeout(ATTEMPT)
                )
            ),
            timeout=10.0,
        )
        # The same, for an upstream that never answers.
        self.impatient = httpx.AsyncClient(
            transport=ResilientTransport(
                per_host=lambda origin: sw.Pipeline(
                    sw.CircuitBreaker(name=f"impatient {origin}"), sw.Timeout(HOPELESS_ATTEMPT)
                )
            ),
            timeout=10.0,
        )
        # A breaker that opens on one failure (reporting to a registry of its own).
        self.fragile = httpx.AsyncClient(
            transport=ResilientTransport(
                per_host=lambda origin: sw.Pipeline(
                    sw.CircuitBreaker(
                        consecutive_failures=1,
                        open_for=30.0,
                        name=f"fragile {origin}",
                        telemetry=sw.Telemetry(registry=CollectorRegistry()),
                    ),
                    sw.Timeout(HOPELESS_ATTEMPT),
                )
            ),
            timeout=10.0,
        )
        self.app = app = FastAPI()

        @app.get("/service/quote")
        async def quote(key: str, hangs: int = 0) -> Any:
            response = await self.documented.get(
                f"{self.base()}/upstream/hang", params={"key": key, "hangs": hangs}
            )
            return response.json()

        @app.get("/service/hopeless")
        async def hopeless(key: str) -> Any:
            response = await self.impatient.get(
                f"{self.base()}/upstream/hang", params={"key": key, "hangs": 99}
            )
            return response.json()

        @app.get("/service/fragile")
        async def fragile(key: str) -> Any:
            response = await self.fragile.get(
                f"{self.base()}/upstream/hang", params={"key": key, "hangs": 99}
            )
            return response.json()

        @app.get("/service/careful")
        async def careful(key: str) -> Any:
            try:
                response = await self.fragile.get(
                    f"{self.base()}/upstream/hang", params={"key": key, "hangs": 99}
                )
            except httpx.HTTPError as exc:
                return JSONResponse({"error": type(exc).__name__}, status_code=502)
            return response.json()

        app.add_middleware(ErrorMiddleware)


class App:
    def __init__(self) -> None:
        self.url = ""
        self.keys = itertools.count()
        self.upstream = Upstream()
        self.service = Service(lambda: self.url)
        self.ledger = Ledger()
        self.registry = CollectorRegistry()
        self.idempotent = IdempotencyMiddleware(
            self.ledger, telemetry=sw.Telemetry(registry=self.registry)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path.startswith("/upstream/"):
            await self.upstream(scope, receive, send)
        elif path.startswith("/ledger/"):
            await self.idempotent(scope, receive, send)
        else:
            await self.service.app(scope, receive, send)

    def key(self) -> str:
        """A fresh key: each test's requests have their own upstream state."""
        return f"k{next(self.keys)}"

    def conflicts(self) -> float:
        value = self.registry.get_sample_value(
            "stalwart_idempotency_conflicts_total", {"policy": "idempotency"}
        )
        return value or 0.0


@pytest.fixture(scope="module")
def server() -> Iterator[App]:
    app = App()
    with serve(app) as url:
        app.url = url
        yield app


@pytest.fixture
async def http(server: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as client:
        yield client


async def until(condition: Callable[[], bool], *, within: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within`` seconds."""
    with anyio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - it changes on the server's thread
            await anyio.sleep(0.01)


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert "Traceback" not in response.text
    return body


# -- the httpx how-to's recipe, inside a FastAPI endpoint --------------------------------------


async def test_an_attempt_cut_short_by_the_per_host_timeout_is_retried(
    server: App, http: httpx.AsyncClient
) -> None:
    key = server.key()
    response = await http.get("/service/quote", params={"key": key, "hangs": 1})
    assert response.status_code == 200
    assert response.json() == {"hit": 2}


async def test_an_upstream_that_always_hangs_makes_a_504_not_a_500(
    server: App, http: httpx.AsyncClient
) -> None:
    key = server.key()
    start = anyio.current_time()
    response = await http.get("/service/hopeless", params={"key": key})
    body = problem(response, 504)
    assert body["kind"] == "deadline_exceeded"
    assert server.upstream.hits[key] == 3  # the default policy's three attempts
    assert anyio.current_time() - start >= 3 * HOPELESS_ATTEMPT


async def test_an_open_breaker_makes_a_503_with_retry_after(
    server: App, http: httpx.AsyncClient
) -> None:
    response = await http.get("/service/fragile", params={"key": server.key()})
    body = problem(response, 503)
    assert body["kind"] == "circuit_open"
    assert body["policy"] == f"fragile {server.url}"
    assert 1 <= int(response.headers["retry-after"]) <= 30


async def test_an_endpoint_catching_httpx_errors_catches_the_open_breaker(
    server: App, http: httpx.AsyncClient
) -> None:
    response = await http.get("/service/careful", params={"key": server.key()})
    assert response.status_code == 502
    assert response.json() == {"error": "TransportCircuitOpenError"}


# -- Retry-After: honoured on 409s, never waited for years ---------------------------------------


async def test_a_409_from_the_idempotency_middleware_is_retried_until_the_replay(
    server: App, http: httpx.AsyncClient
) -> None:
    key = server.key()
    ledger, params = server.ledger, {"key": key, "gate": "1"}
    headers = {"Idempotency-Key": f"order-{key}"}
    ledger.gate.clear()
    resilient = httpx.AsyncClient(
        transport=ResilientTransport(sw.Retry(attempts=6)), base_url=server.url, timeout=30.0
    )
    results: dict[str, httpx.Response] = {}
    waited: list[float] = []

    async def post(label: str, client: httpx.AsyncClient) -> None:
        start = anyio.current_time()
        results[label] = await client.post("/ledger/orders", params=params, headers=headers)
        waited.append(anyio.current_time() - start)

    async with resilient, anyio.create_task_group() as tg:
        tg.start_soon(post, "first", http)
        await until(lambda: ledger.runs.get(key) == 1)
        duplicate = await http.post("/ledger/orders", params=params, headers=headers)
        before = server.conflicts()
        tg.start_soon(post, "retried", resilient)
        await until(lambda: server.conflicts() > before)  # it got its 409
        ledger.gate.set()
    assert problem(duplicate, 409)["title"] == "Conflict"
    assert duplicate.headers["retry-after"] == "1"
    assert results["first"].status_code == results["retried"].status_code == 201
    assert results["retried"].headers["idempotent-replayed"] == "true"
    assert results["retried"].json() == results["first"].json()
    assert ledger.runs[key] == 1
    assert max(waited) >= 1.0  # the retried request waited out the Retry-After


@needs_capped_hints
@pytest.mark.parametrize("status", [429, 503])
async def test_a_default_transport_does_not_wait_out_a_huge_retry_after(
    server: App, status: int
) -> None:
    key = server.key()
    params: dict[str, str | int] = {"key": key, "status": status, "retry_after": "999999999"}
    async with httpx.AsyncClient(transport=ResilientTransport(), base_url=server.url) as client:
        with anyio.fail_after(10):
            response = await client.get("/upstream/status", params=params)
    assert response.status_code == status
    assert response.headers["retry-after"] == "999999999"
    assert server.upstream.hits[key] == 1


# -- idempotency keys and cookies ---------------------------------------------------------------


async def test_a_cookie_authenticated_client_never_gets_anothers_response(
    server: App, http: httpx.AsyncClient
) -> None:
    key = server.key()
    headers = {"Idempotency-Key": f"shared-{key}"}
    alice = await http.post(
        "/ledger/orders", params={"key": key}, headers={**headers, "Cookie": "session=alice"}
    )
    bob = await http.post(
        "/ledger/orders", params={"key": key}, headers={**headers, "Cookie": "session=bob"}
    )
    alice_again = await http.post(
        "/ledger/orders", params={"key": key}, headers={**headers, "Cookie": "session=alice"}
    )
    assert "idempotent-replayed" not in bob.headers
    assert bob.json() == {"run": 2, "cookie": "session=bob"}
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert alice_again.json() == alice.json() == {"run": 1, "cookie": "session=alice"}


# -- the observability how-to's /metrics route -------------------------------------------------


def documented_metrics_app() -> Any:
    """The ``/metrics`` app of docs/how-to/observability.md, built by its own code."""
    page = ROOT / "docs" / "how-to" / "observability.md"
    (block,) = [b for b in blocks(page) if b.executed and '@app.get("/metrics"' in b.code]
    namespace: dict[str, Any] = {"__name__": "observability_example"}
    exec(block.compile(), namespace)
    return namespace["app"]


async def test_the_documented_metrics_route_serves_stalwarts_series() -> None:
    name = f"scraped-{uuid.uuid4()}"  # the global registry outlives this test
    retry = sw.Retry(attempts=2, backoff=sw.Backoff(initial=0.0, maximum=0.0), name=name)
    failures = iter([ConnectionError("reset")])

    @retry
    async def flaky() -> str:
        for error in failures:
            raise error
        return "ok"

    assert await flaky() == "ok"
    with serve(documented_metrics_app()) as url:
        async with httpx.AsyncClient(base_url=url, follow_redirects=False) as http:
            response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert f'stalwart_retry_attempts_total{{policy="{name}"}} 1.0' in response.text.splitlines()
