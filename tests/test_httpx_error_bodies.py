"""ResilientTransport against an upstream whose retryable answers have huge bodies.

A real uvicorn server over loopback answers 503s whose bodies are larger
than the transport keeps in memory (some endlessly long), on asyncio and
trio. The transport must neither read such a body to its end (it would hold
it all in memory, or read forever) nor leak its connection, and must still
hand the caller an intact response when it gives up.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.lowlevel
import httpx
import pytest

import stalwart as sw
from stalwart.asgi import Receive, Scope, Send
from stalwart.httpx import _MAX_KEPT_BODY as MAX_KEPT_BODY
from stalwart.httpx import ResilientTransport, RetryableStatusError

from .http_support import respond, serve, wait_for_disconnect

pytestmark = pytest.mark.realtime

NO_WAIT = sw.Backoff(initial=0.0, maximum=0.0)
CHUNK = b"0123456789abcdef" * 4096  # 64 KiB
# A body left part-read is closed with its connection; trio then reports the
# generators httpcore was reading it with as collected unexhausted, as it does
# for any httpx response closed before its end.
PART_READ = pytest.mark.filterwarnings(
    "ignore:Async generator 'httpcore.*garbage collected:ResourceWarning"
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The real clock here: the server is real."""
    return str(request.param)


@dataclass
class Upstream:
    """``/huge``: ``fail`` 503s (``size`` bytes of body, or endless), then a 200.

    ``streams`` counts, by key, the 503 bodies started and those whose
    sending ended (the client read them to the end or closed the connection).
    """

    hits: dict[str, int] = field(default_factory=dict)
    started: dict[str, int] = field(default_factory=dict)
    ended: dict[str, int] = field(default_factory=dict)
    keys: Iterator[int] = field(default_factory=itertools.count)

    def key(self) -> str:
        return f"k{next(self.keys)}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        key = query["key"]
        hit = self.hits[key] = self.hits.get(key, 0) + 1
        if hit > int(query.get("fail", "1")):
            await respond(send, 200, b"fine", [(b"content-length", b"4")])
            return
        size = int(query["size"]) if "size" in query else None
        headers = [] if size is None or "chunked" in query else [(b"content-length", b"%d" % size)]
        self.started[key] = self.started.get(key, 0) + 1
        try:
            async with anyio.create_task_group() as tg:
                # uvicorn ignores what is sent after a disconnect: watch for it.
                tg.start_soon(_cancel_on_disconnect, receive, tg.cancel_scope)
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                sent = 0
                while size is None or sent < size:
                    chunk = CHUNK if size is None else CHUNK[: size - sent]
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    sent += len(chunk)
                    await anyio.lowlevel.checkpoint()
                await send({"type": "http.response.body", "body": b""})
                tg.cancel_scope.cancel()
        finally:
            self.ended[key] = self.ended.get(key, 0) + 1


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    await wait_for_disconnect(receive)
    scope.cancel()


@dataclass
class Running:
    upstream: Upstream
    url: str


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    upstream = Upstream()
    with serve(upstream) as url:
        yield Running(upstream, url)


def client(server: Running, policy: sw.Policy, **options: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=ResilientTransport(policy, **options), base_url=server.url, timeout=10.0
    )


def expected_body(size: int) -> bytes:
    return (CHUNK * (size // len(CHUNK) + 1))[:size]


async def until(condition: Any, what: str) -> None:
    """Poll ``condition`` (a generous bound: the machine may be loaded)."""
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110 - set by the server, on its own thread
            await anyio.sleep(0.01)
    assert condition(), what


@PART_READ
@pytest.mark.anyio
async def test_an_endless_retryable_body_is_not_read_to_its_end(server: Running) -> None:
    key = server.upstream.key()
    async with client(server, sw.Retry(attempts=2, backoff=NO_WAIT)) as http:
        with anyio.fail_after(20):
            response = await http.get("/huge", params={"key": key})
    assert (response.status_code, response.text) == (200, "fine")
    assert server.upstream.hits[key] == 2


@PART_READ
@pytest.mark.anyio
async def test_a_discarded_oversized_response_has_its_connection_closed(server: Running) -> None:
    key = server.upstream.key()
    async with client(server, sw.Retry(attempts=2, backoff=NO_WAIT)) as http:
        with anyio.fail_after(20):
            response = await http.get("/huge", params={"key": key})
        assert response.status_code == 200
        # While the client is still open: the 503's connection was not left
        # to the pool (nor kept open by a reference).
        await until(lambda: server.upstream.ended.get(key) == 1, "the 503's sending ended")


@pytest.mark.anyio
async def test_the_last_oversized_response_comes_back_whole(server: Running) -> None:
    key = server.upstream.key()
    size = 3 * MAX_KEPT_BODY + 12345
    params = {"key": key, "fail": "9", "size": str(size)}
    async with client(server, sw.Retry(attempts=3, backoff=NO_WAIT)) as http:
        response = await http.get("/huge", params=params)
        assert response.status_code == 503
        assert response.content == expected_body(size)
        await until(lambda: server.upstream.ended.get(key) == 3, "every 503's sending ended")
    assert server.upstream.hits[key] == 3


@PART_READ
@pytest.mark.anyio
async def test_the_last_oversized_chunked_response_comes_back_whole(server: Running) -> None:
    key = server.upstream.key()
    size = 2 * MAX_KEPT_BODY + 777
    params = {"key": key, "fail": "9", "size": str(size), "chunked": "1"}
    async with client(server, sw.Retry(attempts=2, backoff=NO_WAIT)) as http:
        response = await http.get("/huge", params=params)
        assert "content-length" not in response.headers
        assert (response.status_code, response.content) == (503, expected_body(size))
        await until(lambda: server.upstream.ended.get(key) == 2, "every 503's sending ended")


@pytest.mark.anyio
async def test_the_last_oversized_response_can_be_streamed(server: Running) -> None:
    key = server.upstream.key()
    size = 2 * MAX_KEPT_BODY
    params = {"key": key, "fail": "9", "size": str(size)}
    async with client(server, sw.Retry(attempts=2, backoff=NO_WAIT)) as http:
        async with http.stream("GET", "/huge", params=params) as response:
            received = 0
            async for chunk in response.aiter_raw():
                received += len(chunk)
        assert (response.status_code, received) == (503, size)


@pytest.mark.anyio
async def test_a_body_within_the_limit_is_read_for_predicates(server: Running) -> None:
    key = server.upstream.key()
    seen: list[bytes] = []

    def on(exc: BaseException) -> bool:
        assert isinstance(exc, RetryableStatusError)
        seen.append(exc.response.content)
        return True

    params = {"key": key, "size": str(MAX_KEPT_BODY)}
    async with client(server, sw.Retry(attempts=2, on=on, backoff=NO_WAIT)) as http:
        response = await http.get("/huge", params=params)
    assert response.status_code == 200
    assert seen == [expected_body(MAX_KEPT_BODY)]


@pytest.mark.anyio
async def test_an_oversized_body_is_left_unread_for_predicates(server: Running) -> None:
    key = server.upstream.key()
    seen: list[tuple[int, bool]] = []

    def on(exc: BaseException) -> bool:
        assert isinstance(exc, RetryableStatusError)
        seen.append((exc.response.status_code, exc.response.is_stream_consumed))
        return True

    params = {"key": key, "size": str(MAX_KEPT_BODY + 1)}
    async with client(server, sw.Retry(attempts=2, on=on, backoff=NO_WAIT)) as http:
        response = await http.get("/huge", params=params)
    assert response.status_code == 200
    assert seen == [(503, False)]


@pytest.mark.anyio
async def test_a_cancelled_request_closes_its_oversized_responses(server: Running) -> None:
    key = server.upstream.key()
    started = server.upstream.started
    # Waits (a long backoff) after an oversized 503: cancelled meanwhile.
    patient = sw.Retry(attempts=2, backoff=sw.Backoff(initial=60.0, maximum=60.0, jitter="none"))
    async with client(server, patient) as http:
        async with anyio.create_task_group() as tg:
            params = {"key": key, "size": str(100 * MAX_KEPT_BODY)}
            tg.start_soon(partial(http.get, "/huge", params=params))
            await until(lambda: started.get(key) == 1, "the 503 started")
            tg.cancel_scope.cancel()
        await until(lambda: server.upstream.ended.get(key) == 1, "the 503's sending ended")


@PART_READ
@pytest.mark.anyio
async def test_a_hedged_request_closes_its_oversized_responses(server: Running) -> None:
    key = server.upstream.key()
    hedged = sw.Hedge(delay=0.0, name="huge hedge")
    async with client(server, sw.Retry(attempts=3, backoff=NO_WAIT), hedge=hedged) as http:
        with anyio.fail_after(20):
            response = await http.get("/huge", params={"key": key, "fail": "2"})
        assert (response.status_code, response.text) == (200, "fine")
        await until(lambda: server.upstream.ended.get(key) == 2, "both 503s' sending ended")


@PART_READ
@pytest.mark.anyio
async def test_a_retry_gets_the_connection_an_oversized_response_held(server: Running) -> None:
    key = server.upstream.key()
    one = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    async with httpx.AsyncClient(
        transport=ResilientTransport(sw.Retry(attempts=2, backoff=NO_WAIT), transport=one),
        base_url=server.url,
        timeout=httpx.Timeout(10.0, pool=2.0),
    ) as http:
        with anyio.fail_after(20):
            response = await http.get("/huge", params={"key": key})
    assert (response.status_code, response.text) == (200, "fine")


@PART_READ
@pytest.mark.anyio
async def test_a_hedge_gets_the_connection_an_oversized_response_held(server: Running) -> None:
    # A failed attempt starts the hedge at once; the hedge needs the one
    # connection the failed attempt's unread 503 holds.
    key = server.upstream.key()
    one = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    hedged = sw.Hedge(hedges=1, delay=30.0, name="huge hedge, one connection")
    async with httpx.AsyncClient(
        transport=ResilientTransport(
            sw.Retry(attempts=2, backoff=NO_WAIT), transport=one, hedge=hedged
        ),
        base_url=server.url,
        timeout=httpx.Timeout(10.0, pool=2.0),
    ) as http:
        with anyio.fail_after(20):
            response = await http.get("/huge", params={"key": key, "fail": "2"})
    assert (response.status_code, response.text) == (200, "fine")
    assert server.upstream.hits[key] == 3
