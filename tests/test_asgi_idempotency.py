"""IdempotencyMiddleware as plain ASGI, on asyncio and trio, in virtual time.

Most tests talk to it through ``httpx.ASGITransport`` (a real client, in
process); those that need to misbehave at the ASGI level (a client that
disconnects, a body sent in chunks, headers no real server would pass on)
call it directly with scripted ``receive``/``send``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import (
    DeadlineMiddleware,
    IdempotencyMiddleware,
    Message,
    Receive,
    Scope,
    Send,
    parse_idempotency_key,
)
from stalwart.httpx import ResilientTransport

from .conftest import Spans, jump, sample
from .shared_store import SharedStore

NO_WAIT = sw.Backoff(initial=0.0, maximum=0.0)


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        body += bytes(message.get("body", b""))
        if not message.get("more_body", False):
            return body


class Orders:
    """Places an order per request it runs: answers ``status`` with the order's number."""

    def __init__(
        self,
        status: int = 201,
        *,
        work: float = 0.0,
        headers: Iterable[tuple[bytes, bytes]] = (),
        chunks: int = 1,
        size: int = 0,
    ) -> None:
        self.status = status
        self.work = work
        self.headers = list(headers)
        self.chunks = chunks
        self.size = size
        self.runs = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        self.runs += 1
        number = self.runs
        await anyio.sleep(self.work)
        payload = json.dumps(
            {"order": number, "path": scope["path"], "body": body.decode(), "pad": "x" * self.size}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"x-order", str(number).encode()),
            *self.headers,
        ]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        step = -(-len(payload) // self.chunks)
        for i in range(self.chunks):
            part = payload[i * step : (i + 1) * step]
            last = i == self.chunks - 1
            await send({"type": "http.response.body", "body": part, "more_body": not last})


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://orders")


def keyed(key: str = "order-7", **headers: str) -> dict[str, str]:
    return {"Idempotency-Key": key, **headers}


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"] == "about:blank"
    return body


def replayed(response: httpx.Response) -> bool:
    return bool(response.headers.get("idempotent-replayed") == "true")


# -- replays ---------------------------------------------------------------------------------


async def test_a_repeat_gets_the_stored_response_without_running_the_app() -> None:
    app = Orders(headers=[(b"location", b"/orders/1")])
    async with client(IdempotencyMiddleware(app)) as http:
        first = await http.post("/orders", content=b"sku=42", headers=keyed())
        again = await http.post("/orders", content=b"sku=42", headers=keyed())
    assert app.runs == 1
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.json()["order"] == 1
    assert again.headers["location"] == "/orders/1"
    assert again.headers["x-order"] == "1"
    assert again.headers["content-type"] == "application/json"


async def test_only_the_replay_says_it_is_one() -> None:
    async with client(IdempotencyMiddleware(Orders())) as http:
        first = await http.post("/orders", headers=keyed())
        again = await http.post("/orders", headers=keyed())
    assert "idempotent-replayed" not in first.headers
    assert replayed(again)


async def test_each_key_runs_once() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app)) as http:
        for key in ("a", "b", "a", "b", "c"):
            await http.post("/orders", headers=keyed(key))
    assert app.runs == 3


async def test_requests_without_a_key_run_every_time() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app)) as http:
        for _ in range(3):
            assert (await http.post("/orders")).status_code == 201
    assert app.runs == 3


async def test_the_quoted_and_the_bare_key_are_one_key() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app)) as http:
        await http.post("/orders", headers=keyed('"order-7"'))
        again = await http.post("/orders", headers=keyed("order-7"))
    assert replayed(again)
    assert app.runs == 1


async def test_a_streamed_response_is_replayed_whole() -> None:
    app = Orders(chunks=4)
    async with client(IdempotencyMiddleware(app)) as http:
        first = await http.post("/orders", headers=keyed())
        again = await http.post("/orders", headers=keyed())
    assert replayed(again)
    assert again.content == first.content
    assert app.runs == 1


async def test_a_client_error_is_stored_too() -> None:
    app = Orders(status=404)
    async with client(IdempotencyMiddleware(app)) as http:
        await http.post("/orders", headers=keyed())
        again = await http.post("/orders", headers=keyed())
    assert again.status_code == 404
    assert replayed(again)
    assert app.runs == 1


async def test_the_response_is_replayed_until_the_ttl_runs_out() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app, ttl=60.0)) as http:
        await http.post("/orders", headers=keyed())
        jump(59.0)
        assert replayed(await http.post("/orders", headers=keyed()))
        jump(1.0)
        fresh = await http.post("/orders", headers=keyed())
    assert not replayed(fresh)
    assert fresh.json()["order"] == 2


async def test_hop_by_hop_headers_are_not_stored() -> None:
    app = Orders(headers=[(b"connection", b"close"), (b"x-kept", b"yes")])
    middleware = IdempotencyMiddleware(app)
    sent = await call(middleware, headers=keyed())
    again = await call(middleware, headers=keyed())
    assert (b"connection", b"close") in sent[0]["headers"]
    names = [name for name, _ in again[0]["headers"]]
    assert b"connection" not in names
    assert b"x-kept" in names


# -- what is not stored ---------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 425, 429])
async def test_try_again_answers_are_not_stored_and_free_the_key(status: int) -> None:
    app = Orders(status=status)
    async with client(IdempotencyMiddleware(app)) as http:
        first = await http.post("/orders", headers=keyed())
        app.status = 201
        retried = await http.post("/orders", headers=keyed())
        again = await http.post("/orders", headers=keyed())
    assert first.status_code == status
    assert retried.status_code == 201
    assert not replayed(retried)
    assert replayed(again)
    assert app.runs == 2


async def test_a_response_that_sets_a_cookie_is_not_stored() -> None:
    app = Orders(headers=[(b"set-cookie", b"session=s3cr3t; HttpOnly")])
    async with client(IdempotencyMiddleware(app)) as http:
        await http.post("/orders", headers=keyed())
        second = await http.post("/orders", headers=keyed())
    assert not replayed(second)
    assert app.runs == 2


async def test_a_response_too_large_to_store_is_passed_through_whole() -> None:
    app = Orders(size=5000, chunks=10)
    async with client(IdempotencyMiddleware(app, max_response_size=4096)) as http:
        first = await http.post("/orders", headers=keyed())
        second = await http.post("/orders", headers=keyed())
    assert first.status_code == 201
    assert len(first.json()["pad"]) == 5000
    assert not replayed(second)
    assert second.json()["order"] == 2


async def test_a_response_at_the_size_limit_is_stored() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app)) as http:
        size = len((await http.post("/orders", headers=keyed("probe"))).content)
    async with client(IdempotencyMiddleware(Orders(), max_response_size=size)) as http:
        await http.post("/orders", headers=keyed())
        assert replayed(await http.post("/orders", headers=keyed()))


async def test_a_large_response_is_not_held_back() -> None:
    """Each chunk reaches the client as the app sends it, stored or not."""
    seen: list[tuple[str, float]] = []

    async def slow_stream(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(3):
            await send({"type": "http.response.body", "body": b"x" * 10, "more_body": True})
            await anyio.sleep(1.0)
        await send({"type": "http.response.body", "body": b""})

    async def send(message: Message) -> None:
        seen.append((message["type"], anyio.current_time()))

    await call(IdempotencyMiddleware(slow_stream, max_response_size=15), headers=keyed(), send=send)
    assert [t for _, t in seen] == [0.0, 0.0, 1.0, 2.0, 3.0]


async def test_an_app_that_raises_stores_nothing_and_frees_the_key() -> None:
    runs = 0

    async def failing_once(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise RuntimeError("database unreachable")
        await Orders()(scope, receive, send)

    middleware = IdempotencyMiddleware(failing_once)
    with pytest.raises(RuntimeError, match="database"):
        await call(middleware, headers=keyed())
    sent = await call(middleware, headers=keyed())
    assert sent[0]["status"] == 201
    assert runs == 2


async def test_an_app_that_ends_without_finishing_its_response_stores_nothing() -> None:
    runs = 0

    async def truncating(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})

    middleware = IdempotencyMiddleware(truncating)
    await call(middleware, headers=keyed())
    await call(middleware, headers=keyed())
    assert runs == 2


async def test_a_response_with_trailers_is_not_stored() -> None:
    runs = 0

    async def with_trailers(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"data"})
        await send({"type": "http.response.trailers", "headers": [(b"x-sum", b"1")]})

    middleware = IdempotencyMiddleware(with_trailers)
    await call(middleware, headers=keyed())
    await call(middleware, headers=keyed())
    assert runs == 2


async def test_a_response_whose_trailers_never_came_is_not_stored() -> None:
    runs = 0

    async def without_trailers(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal runs
        runs += 1
        await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
        await send({"type": "http.response.body", "body": b"data"})

    middleware = IdempotencyMiddleware(without_trailers)
    await call(middleware, headers=keyed())
    await call(middleware, headers=keyed())
    assert runs == 2


async def test_a_request_cancelled_by_its_deadline_frees_the_key() -> None:
    app = Orders(work=10.0)
    service = DeadlineMiddleware(IdempotencyMiddleware(app))
    async with client(service) as http:
        late = await http.post("/orders", headers=keyed(**{"x-request-timeout-ms": "500"}))
        app.work = 0.0
        retried = await http.post("/orders", headers=keyed())
    assert late.status_code == 504
    assert retried.status_code == 201
    assert not replayed(retried)
    assert app.runs == 2


# -- conflicts and reuse ------------------------------------------------------------------


async def test_a_repeat_while_the_first_runs_gets_409_then_the_replay() -> None:
    app = Orders(work=1.0)
    responses: dict[str, httpx.Response] = {}
    async with client(IdempotencyMiddleware(app)) as http:

        async def post(label: str, delay: float) -> None:
            await anyio.sleep(delay)
            responses[label] = await http.post("/orders", headers=keyed())

        async with anyio.create_task_group() as tg:
            tg.start_soon(post, "first", 0.0)
            tg.start_soon(post, "duplicate", 0.5)
        later = await http.post("/orders", headers=keyed())
    assert responses["first"].status_code == 201
    body = problem(responses["duplicate"], 409)
    assert body["title"] == "Conflict"
    assert responses["duplicate"].headers["retry-after"] == "1"
    assert replayed(later)
    assert later.content == responses["first"].content
    assert app.runs == 1


async def test_concurrent_duplicates_run_exactly_once() -> None:
    app = Orders(work=0.1)
    statuses: list[int] = []
    async with client(IdempotencyMiddleware(app)) as http:

        async def post() -> None:
            statuses.append((await http.post("/orders", headers=keyed())).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(post)
    assert app.runs == 1
    assert sorted(statuses) == [201] + [409] * 9


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/orders", b"sku=43"),  # another body
        ("POST", "/refunds", b"sku=42"),  # another path
        ("POST", "/orders?express=1", b"sku=42"),  # another query
        ("PATCH", "/orders", b"sku=42"),  # another method
    ],
)
async def test_a_key_reused_for_another_request_gets_422(
    method: str, path: str, body: bytes
) -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app)) as http:
        await http.post("/orders", content=b"sku=42", headers=keyed())
        reused = await http.request(method, path, content=body, headers=keyed())
    assert problem(reused, 422)["title"] == "Unprocessable Content"
    assert app.runs == 1


async def test_a_key_reused_while_the_first_runs_gets_422_not_409() -> None:
    app = Orders(work=1.0)
    async with client(IdempotencyMiddleware(app)) as http, anyio.create_task_group() as tg:
        tg.start_soon(lambda: http.post("/orders", content=b"a", headers=keyed()))
        await anyio.sleep(0.5)
        reused = await http.post("/orders", content=b"b", headers=keyed())
    problem(reused, 422)


async def test_replays_and_conflicts_are_counted(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    app = Orders(work=1.0)
    middleware = IdempotencyMiddleware(app, name="orders", telemetry=telemetry)
    async with client(middleware) as http:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: http.post("/orders", headers=keyed()))
            await anyio.sleep(0.5)
            await http.post("/orders", headers=keyed())
        await http.post("/orders", headers=keyed())
        await http.post("/orders", headers=keyed())
    assert sample(registry, "stalwart_idempotency_conflicts_total", policy="orders") == 1
    assert sample(registry, "stalwart_idempotency_replays_total", policy="orders") == 2


async def test_a_replay_is_an_event_on_the_current_span(spans: Spans) -> None:
    tracer = spans.provider.get_tracer("test")
    telemetry = sw.Telemetry(registry=CollectorRegistry(), tracer_provider=spans.provider)
    middleware = IdempotencyMiddleware(Orders(), name="orders", telemetry=telemetry)
    await call(middleware, headers=keyed())
    with tracer.start_as_current_span("request"):
        await call(middleware, headers=keyed())
    (span,) = spans.finished
    (event,) = span.events
    assert event.name == "stalwart.idempotency.replayed"
    assert dict(event.attributes or {}) == {"stalwart.policy": "orders"}


# -- keys ------------------------------------------------------------------------------------


async def test_a_missing_key_is_a_400_when_required() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app, required=True)) as http:
        response = await http.post("/orders")
    assert "Idempotency-Key" in problem(response, 400)["detail"]
    assert app.runs == 0


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "a" * 256,
        '"' + "a" * 256 + '"',
        '""',
        '"unbalanced',
        '"a"b"',
        "caf\u00e9",
        "tab\there",
        "bell\x07",
        "nul\x00",
        "line\nbreak",
        "order-7\r\nSet-Cookie: session=stolen",
    ],
)
async def test_a_malformed_key_is_a_400(value: str) -> None:
    app = Orders()
    raw = [(b"idempotency-key", value.encode("utf-8"))]
    sent = await call(IdempotencyMiddleware(app), raw_headers=raw)
    assert sent[0]["status"] == 400
    body = json.loads(sent[1]["body"])
    assert body["title"] == "Bad Request"
    assert app.runs == 0


async def test_the_longest_key_is_accepted() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app)) as http:
        await http.post("/orders", headers=keyed("k" * 255))
        again = await http.post("/orders", headers=keyed("k" * 255))
    assert replayed(again)


async def test_two_key_headers_are_a_400() -> None:
    app = Orders()
    raw = [(b"idempotency-key", b"order-7"), (b"idempotency-key", b"order-8")]
    sent = await call(IdempotencyMiddleware(app), raw_headers=raw)
    assert sent[0]["status"] == 400
    assert "more than one" in json.loads(sent[1]["body"])["detail"]
    assert app.runs == 0


async def test_error_bodies_never_echo_the_key() -> None:
    app = Orders(work=1.0)
    async with client(IdempotencyMiddleware(app)) as http, anyio.create_task_group() as tg:
        tg.start_soon(lambda: http.post("/orders", headers=keyed("s3cr3t-key")))
        await anyio.sleep(0.5)
        conflict = await http.post("/orders", headers=keyed("s3cr3t-key"))
        reused = await http.post("/orders", content=b"x", headers=keyed("s3cr3t-key"))
    for response in (conflict, reused):
        assert "s3cr3t" not in response.text
        assert all("s3cr3t" not in value for value in response.headers.values())


async def test_methods_not_listed_pass_straight_through() -> None:
    app = Orders()
    middleware = IdempotencyMiddleware(app, required=True)
    async with client(middleware) as http:
        for _ in range(2):
            assert (await http.put("/orders/7", headers=keyed())).status_code == 201
        assert (await http.get("/orders")).status_code == 201
    assert app.runs == 3


async def test_the_methods_and_the_header_can_be_chosen() -> None:
    app = Orders()
    middleware = IdempotencyMiddleware(app, methods=["put", "POST"], header="X-Request-Id")
    async with client(middleware) as http:
        await http.put("/orders/7", headers={"X-Request-Id": "r1"})
        again = await http.put("/orders/7", headers={"X-Request-Id": "r1"})
        await http.post("/orders", headers=keyed())
        await http.post("/orders", headers=keyed())
    assert replayed(again)
    assert app.runs == 3
    assert middleware.methods == {"PUT", "POST"}


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
async def test_other_scopes_pass_straight_through(scope_type: str) -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    middleware = IdempotencyMiddleware(app, required=True)
    await middleware({"type": scope_type}, call_receive([]), call_send([]))
    assert seen == [scope_type]


# -- credentials ---------------------------------------------------------------------------------


async def test_the_same_key_under_other_credentials_is_another_record() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app)) as http:
        alice = await http.post("/orders", headers=keyed(Authorization="Bearer alice"))
        mallory = await http.post("/orders", headers=keyed(Authorization="Bearer mallory"))
        anonymous = await http.post("/orders", headers=keyed())
        alice_again = await http.post("/orders", headers=keyed(Authorization="Bearer alice"))
    assert [r.json()["order"] for r in (alice, mallory, anonymous)] == [1, 2, 3]
    assert not any(replayed(r) for r in (alice, mallory, anonymous))
    assert replayed(alice_again)
    assert alice_again.json()["order"] == 1


async def test_credentials_only_differing_in_case_are_others() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app)) as http:
        await http.post("/orders", headers=keyed(Authorization="Bearer abc"))
        other = await http.post("/orders", headers=keyed(Authorization="Bearer ABC"))
    assert not replayed(other)


async def test_a_second_authorization_header_never_reaches_the_first_ones_records() -> None:
    middleware = IdempotencyMiddleware(Orders())
    victim = [(b"authorization", b"Bearer alice")]
    await call(middleware, headers=keyed(), raw_headers=victim)
    for smuggled in (
        [(b"authorization", b"Bearer alice"), (b"authorization", b"Bearer mallory")],
        [(b"authorization", b"Bearer mallory"), (b"authorization", b"Bearer alice")],
        [(b"authorization", b"Bearer alice"), (b"authorization", b"")],
    ):
        sent = await call(middleware, headers=keyed(), raw_headers=smuggled)
        assert (b"idempotent-replayed", b"true") not in sent[0]["headers"]
    assert (b"idempotent-replayed", b"true") in (
        await call(middleware, headers=keyed(), raw_headers=victim)
    )[0]["headers"]


async def test_an_empty_authorization_is_not_anonymous() -> None:
    middleware = IdempotencyMiddleware(Orders())
    await call(middleware, headers=keyed())
    sent = await call(middleware, headers=keyed(), raw_headers=[(b"authorization", b"")])
    assert (b"idempotent-replayed", b"true") not in sent[0]["headers"]


async def test_credentials_can_come_from_another_header() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app, credentials="X-API-Key")) as http:
        await http.post("/orders", headers=keyed(**{"X-API-Key": "k1", "Authorization": "a"}))
        same = await http.post(
            "/orders", headers=keyed(**{"X-API-Key": "k1", "Authorization": "b"})
        )
        other = await http.post("/orders", headers=keyed(**{"X-API-Key": "k2"}))
    assert replayed(same)
    assert not replayed(other)


async def test_credentials_can_come_from_a_callable_of_the_scope() -> None:
    def session(scope: Scope) -> str | None:
        for name, value in scope["headers"]:
            if name == b"cookie" and value.startswith(b"session="):
                return str(value[len(b"session=") :].decode())
        return None

    app = Orders()
    async with client(IdempotencyMiddleware(app, credentials=session)) as http:
        await http.post("/orders", headers=keyed(Cookie="session=alice"))
        alice = await http.post("/orders", headers=keyed(Cookie="session=alice"))
        bob = await http.post("/orders", headers=keyed(Cookie="session=bob"))
        await http.post("/orders", headers=keyed())
        anonymous = await http.post("/orders", headers=keyed())
    assert replayed(alice)
    assert not replayed(bob)
    assert replayed(anonymous)
    assert app.runs == 3


async def test_a_credentials_callable_returning_bytes_works_too() -> None:
    middleware = IdempotencyMiddleware(Orders(), credentials=lambda scope: b"tenant-1")
    await call(middleware, headers=keyed())
    sent = await call(middleware, headers=keyed())
    assert (b"idempotent-replayed", b"true") in sent[0]["headers"]


async def test_a_credentials_callable_returning_something_else_fails_loudly() -> None:
    bad: Any = lambda scope: 42  # noqa: E731
    with pytest.raises(TypeError, match="must return str, bytes or None, not int"):
        await call(IdempotencyMiddleware(Orders(), credentials=bad), headers=keyed())


async def test_callers_with_other_session_cookies_never_share_a_response_by_default() -> None:
    """An app that authenticates with a cookie is safe with the default options."""
    app = Orders()
    async with client(IdempotencyMiddleware(app)) as http:
        alice = await http.post("/orders", headers=keyed(Cookie="session=alice"))
        bob = await http.post("/orders", headers=keyed(Cookie="session=bob"))
        alice_again = await http.post("/orders", headers=keyed(Cookie="session=alice"))
    assert [alice.json()["order"], bob.json()["order"]] == [1, 2]
    assert not replayed(bob)
    assert replayed(alice_again)
    assert alice_again.json()["order"] == 1


async def test_cookies_are_a_set_however_they_are_ordered_or_split() -> None:
    middleware = IdempotencyMiddleware(Orders())
    await call(middleware, headers=keyed(), raw_headers=[(b"cookie", b"session=alice; theme=dark")])
    for same in (
        [(b"cookie", b"theme=dark; session=alice")],
        [(b"cookie", b"session=alice"), (b"cookie", b"theme=dark")],  # HTTP/2 crumbs
        [(b"cookie", b"session=alice;theme=dark;")],
    ):
        sent = await call(middleware, headers=keyed(), raw_headers=same)
        assert (b"idempotent-replayed", b"true") in sent[0]["headers"], same
    for other in (
        [(b"cookie", b"session=alice")],
        [(b"cookie", b"session=alice; theme=dark; session=mallory")],
        [(b"cookie", b"session=alice; theme=dark"), (b"authorization", b"Bearer alice")],
    ):
        sent = await call(middleware, headers=keyed(), raw_headers=other)
        assert (b"idempotent-replayed", b"true") not in sent[0]["headers"], other


async def test_a_cookie_cannot_pass_for_an_authorization_header() -> None:
    middleware = IdempotencyMiddleware(Orders())
    await call(middleware, headers=keyed(), raw_headers=[(b"authorization", b"Bearer alice")])
    sent = await call(middleware, headers=keyed(), raw_headers=[(b"cookie", b"Bearer alice")])
    assert (b"idempotent-replayed", b"true") not in sent[0]["headers"]


async def test_records_stored_with_authorization_alone_are_found_by_the_default() -> None:
    """Records stored before cookies counted stay reachable by the same token."""
    store = sw.MemoryStore()
    app = Orders()
    before = IdempotencyMiddleware(app, store=store, credentials="Authorization")
    after = IdempotencyMiddleware(app, store=store)
    token = [(b"authorization", b"Bearer alice")]
    await call(before, headers=keyed(), raw_headers=token)
    sent = await call(after, headers=keyed(), raw_headers=token)
    assert (b"idempotent-replayed", b"true") in sent[0]["headers"]
    assert app.runs == 1


async def test_credentials_can_name_several_headers() -> None:
    app = Orders()
    middleware = IdempotencyMiddleware(app, credentials=["X-API-Key", "X-Tenant"])
    async with client(middleware) as http:
        await http.post("/orders", headers=keyed(**{"X-API-Key": "k1", "X-Tenant": "t1"}))
        same = await http.post(
            "/orders", headers=keyed(**{"X-API-Key": "k1", "X-Tenant": "t1", "Cookie": "a=b"})
        )
        other_tenant = await http.post(
            "/orders", headers=keyed(**{"X-API-Key": "k1", "X-Tenant": "t2"})
        )
        key_alone = await http.post("/orders", headers=keyed(**{"X-API-Key": "k1"}))
    assert replayed(same)
    assert not replayed(other_tenant)
    assert not replayed(key_alone)
    assert app.runs == 3


async def test_credentials_are_hashed_before_they_reach_the_store() -> None:
    store = SharedStore()
    middleware = IdempotencyMiddleware(Orders(), store=store)
    await call(middleware, headers=keyed(), raw_headers=[(b"authorization", b"Bearer s3cr3t")])
    assert len(store.data) == 1
    assert "s3cr3t" not in repr(store.data)


# -- request bodies ------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_a_413_before_the_app_runs() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app, max_body_size=100)) as http:
        response = await http.post("/orders", content=b"x" * 101, headers=keyed())
        fits = await http.post("/orders", content=b"x" * 100, headers=keyed("other"))
    assert problem(response, 413)["title"] == "Content Too Large"
    assert fits.status_code == 201
    assert app.runs == 1


async def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    app = Orders()
    received: list[Message] = []
    raw = [(b"content-length", b"1000000")]
    sent = await call(
        IdempotencyMiddleware(app, max_body_size=100),
        headers=keyed(),
        raw_headers=raw,
        messages=[{"type": "http.request", "body": b"x", "more_body": True}],
        received=received,
    )
    assert sent[0]["status"] == 413
    assert received == []


async def test_a_chunked_body_is_counted_as_it_arrives_and_refused_past_the_limit() -> None:
    app = Orders()
    received: list[Message] = []
    chunk = {"type": "http.request", "body": b"x" * 40, "more_body": True}
    sent = await call(
        IdempotencyMiddleware(app, max_body_size=100),
        headers=keyed(),
        messages=[chunk] * 10,
        received=received,
    )
    assert sent[0]["status"] == 413
    assert len(received) == 3  # it stopped reading at 120 bytes
    assert app.runs == 0


async def test_a_body_in_chunks_reaches_the_app_whole() -> None:
    app = Orders()
    parts: list[Message] = [
        {"type": "http.request", "body": b"sku=", "more_body": True},
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": b"42", "more_body": False},
    ]
    sent = await call(IdempotencyMiddleware(app), headers=keyed(), messages=parts)
    assert json.loads(sent[1]["body"])["body"] == "sku=42"


async def test_requests_without_a_key_are_not_buffered_or_limited() -> None:
    app = Orders()
    async with client(IdempotencyMiddleware(app, max_body_size=10)) as http:
        response = await http.post("/orders", content=b"x" * 1000)
    assert response.status_code == 201


# -- the client going away ------------------------------------------------------------------


async def test_a_client_gone_before_its_body_arrived_runs_nothing() -> None:
    app = Orders()
    middleware = IdempotencyMiddleware(app)
    parts: list[Message] = [
        {"type": "http.request", "body": b"sku=", "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent = await call(middleware, headers=keyed(), messages=parts)
    assert sent == []
    assert app.runs == 0
    # Nothing was claimed: the retry runs.
    assert (await call(middleware, headers=keyed()))[0]["status"] == 201


async def test_a_response_finished_after_the_client_left_is_stored_for_its_retry() -> None:
    gone = False

    async def send(message: Message) -> None:
        if gone:
            return  # as servers do: a response to a closed connection goes nowhere

    app = Orders(work=5.0)
    middleware = IdempotencyMiddleware(app)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: call(middleware, headers=keyed(), send=send))
        await anyio.sleep(1.0)
        gone = True
    retried = await call(middleware, headers=keyed())
    assert (b"idempotent-replayed", b"true") in retried[0]["headers"]
    assert app.runs == 1


async def test_the_app_hears_the_clients_disconnect_after_its_body() -> None:
    heard: list[tuple[str, float]] = []

    async def listener(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(2):
            message = await receive()
            heard.append((message["type"], anyio.current_time()))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    # The scripted client sends its body, then leaves an hour later.
    await call(IdempotencyMiddleware(listener), headers=keyed())
    assert heard == [("http.request", 0.0), ("http.disconnect", 3600.0)]


# -- shared stores ---------------------------------------------------------------------------------


async def test_replicas_sharing_a_store_replay_each_others_responses() -> None:
    store = SharedStore()
    first, second = Orders(), Orders()
    async with (
        client(IdempotencyMiddleware(first, store=store)) as one,
        client(IdempotencyMiddleware(second, store=store)) as two,
    ):
        created = await one.post("/orders", content=b"sku=42", headers=keyed())
        again = await two.post("/orders", content=b"sku=42", headers=keyed())
    assert replayed(again)
    assert again.content == created.content
    assert (first.runs, second.runs) == (1, 0)


async def test_records_cross_a_json_store_intact() -> None:
    binary = bytes(range(256))

    async def raw_bytes(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/octet-stream"), (b"x-l1", b"caf\xe9")],
            }
        )
        await send({"type": "http.response.body", "body": binary})

    middleware = IdempotencyMiddleware(raw_bytes, store=sw.MemoryStore(codec=sw.JSONCodec()))
    await call(middleware, headers=keyed())
    sent = await call(middleware, headers=keyed())
    assert sent[1]["body"] == binary
    assert (b"x-l1", b"caf\xe9") in sent[0]["headers"]


async def test_a_long_request_keeps_its_lease_in_a_shared_store() -> None:
    store = SharedStore()
    app = Orders(work=100.0)
    middleware = IdempotencyMiddleware(app, store=store, lease=30.0)
    async with client(middleware) as http, anyio.create_task_group() as tg:
        tg.start_soon(lambda: http.post("/orders", headers=keyed()))
        await anyio.sleep(75.0)  # long past the first lease
        duplicate = await http.post("/orders", headers=keyed())
    problem(duplicate, 409)
    assert store.calls["renew"] >= 3
    assert app.runs == 1


async def test_a_failed_request_releases_its_key_in_a_shared_store() -> None:
    store = SharedStore()

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await call(IdempotencyMiddleware(failing, store=store), headers=keyed())
    assert store.calls["release"] == 1
    assert store.data == {}


async def test_a_cancelled_request_still_releases_its_key_in_a_shared_store() -> None:
    app = Orders(work=10.0)
    service = DeadlineMiddleware(IdempotencyMiddleware(app, store=SharedStore()))
    async with client(service) as http:
        late = await http.post("/orders", headers=keyed(**{"x-request-timeout-ms": "500"}))
        app.work = 0.0
        retried = await http.post("/orders", headers=keyed())
    assert late.status_code == 504
    assert retried.status_code == 201  # not a 409 until the lease ran out


async def test_a_failing_store_fails_the_request_without_running_it() -> None:
    class Broken(SharedStore):
        async def claim(self, *args: Any, **kwargs: Any) -> Any:
            raise ConnectionError("store unreachable")

    app = Orders()
    with pytest.raises(ConnectionError):
        await call(IdempotencyMiddleware(app, store=Broken()), headers=keyed())
    assert app.runs == 0


async def test_an_unavailable_store_is_a_503_with_retry_after_and_the_app_does_not_run() -> None:
    class Unavailable(SharedStore):
        async def claim(self, *args: Any, **kwargs: Any) -> Any:
            raise sw.StoreUnavailable("redis did not answer", policy="redis")

    app = Orders()
    async with client(IdempotencyMiddleware(app, store=Unavailable())) as http:
        response = await http.post("/orders", headers=keyed())
    problem(response, 503)
    assert response.headers["retry-after"] == "1"
    assert app.runs == 0


async def test_a_store_that_breaks_the_protocol_is_named() -> None:
    class Broken(SharedStore):
        async def claim(self, *args: Any, **kwargs: Any) -> Any:
            return "yes"

    with pytest.raises(TypeError, match="claim"):
        await call(IdempotencyMiddleware(Orders(), store=Broken()), headers=keyed())


async def test_a_record_it_did_not_write_is_refused() -> None:
    class Foreign(SharedStore):
        async def claim(self, *args: Any, **kwargs: Any) -> Any:
            return sw.Completed({"status": 200}, kwargs["fingerprint"])

    with pytest.raises(ValueError, match="cannot read"):
        await call(IdempotencyMiddleware(Orders(), store=Foreign()), headers=keyed())


# -- with the transport --------------------------------------------------------------------------


class LossyProxy:
    """Between client and service: loses the first ``losses`` responses, answering 502."""

    def __init__(self, app: Any, losses: int = 1) -> None:
        self.app = app
        self.losses = losses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.losses <= 0:
            await self.app(scope, receive, send)
            return
        self.losses -= 1

        async def drop(message: Message) -> None:
            pass

        await self.app(scope, receive, drop)
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b"upstream connection reset"})


async def test_a_retried_post_whose_response_was_lost_is_replayed_not_rerun() -> None:
    app = Orders()
    service = LossyProxy(IdempotencyMiddleware(app))
    transport = ResilientTransport(
        sw.Retry(attempts=3, backoff=NO_WAIT),
        transport=httpx.ASGITransport(service),
        add_idempotency_keys=True,
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://orders") as http:
        response = await http.post("/orders", json={"sku": 42})
    assert response.status_code == 201
    assert replayed(response)
    assert app.runs == 1


async def test_a_retried_post_after_a_503_runs_again() -> None:
    app = Orders(status=503)
    transport = ResilientTransport(
        sw.Retry(attempts=2, backoff=NO_WAIT),
        transport=httpx.ASGITransport(IdempotencyMiddleware(app)),
        add_idempotency_keys=True,
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://orders") as http:
        response = await http.post("/orders", json={"sku": 42})
    assert response.status_code == 503
    assert app.runs == 2


# -- parsing keys ----------------------------------------------------------------------------------

_printable = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=255
)


@given(_printable)
def test_a_quoted_key_parses_back_to_itself(key: str) -> None:
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert parse_idempotency_key(quoted.encode()) == key


@given(_printable.filter(lambda k: k == k.strip(" ") and not k.startswith('"')))
def test_a_bare_key_parses_back_to_itself(key: str) -> None:
    assert parse_idempotency_key(key.encode()) == key


@given(st.binary(max_size=600))
def test_parsing_never_yields_a_key_that_is_not_printable_ascii(value: bytes) -> None:
    key = parse_idempotency_key(value)
    if key is not None:
        assert 1 <= len(key) <= 255
        assert all(0x20 <= ord(c) <= 0x7E for c in key)


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "param"),
    [
        ({"store": object()}, TypeError, "store"),
        ({"store": sw.MemoryStore(), "max_entries": 5}, ValueError, "max_entries"),
        ({"max_entries": 0}, ValueError, "max_entries"),
        ({"header": "Idempotency Key"}, ValueError, "header"),
        ({"header": None}, TypeError, "header"),
        ({"methods": "POST"}, TypeError, "methods"),
        ({"methods": []}, ValueError, "methods"),
        ({"methods": ["PO ST"]}, ValueError, "methods"),
        ({"methods": [1]}, TypeError, "methods"),
        ({"ttl": 0}, ValueError, "ttl"),
        ({"ttl": float("inf")}, ValueError, "ttl"),
        ({"required": "yes"}, TypeError, "required"),
        ({"credentials": "bad header"}, ValueError, "credentials"),
        ({"credentials": 5}, TypeError, "credentials"),
        ({"credentials": ()}, ValueError, "credentials"),
        ({"credentials": ["Authorization", 5]}, TypeError, "credentials"),
        ({"credentials": ["Authorization", "bad header"]}, ValueError, "credentials"),
        ({"max_body_size": -1}, ValueError, "max_body_size"),
        ({"max_body_size": 1.5}, TypeError, "max_body_size"),
        ({"max_response_size": -1}, ValueError, "max_response_size"),
        ({"lease": 0}, ValueError, "lease"),
        ({"name": ""}, ValueError, "name"),
        ({"telemetry": "default"}, TypeError, "telemetry"),
    ],
)
def test_bad_options_are_rejected_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], param: str
) -> None:
    with pytest.raises(error, match=param):
        IdempotencyMiddleware(Orders(), **options)


def test_the_app_must_be_callable() -> None:
    with pytest.raises(TypeError, match="app"):
        IdempotencyMiddleware("app")  # type: ignore[arg-type]


def test_the_defaults() -> None:
    middleware = IdempotencyMiddleware(Orders())
    assert middleware.methods == {"POST", "PATCH"}
    assert middleware.ttl == 86400.0
    assert middleware.name == "idempotency"
    assert isinstance(middleware.store, sw.MemoryStore)
    assert middleware.store.max_entries == 10_000


# -- plain ASGI calls ------------------------------------------------------------------------------


def call_receive(
    messages: list[Message], received: list[Message] | None = None
) -> Callable[[], Any]:
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            message = queue.pop(0)
        else:
            await anyio.sleep(3600)  # a client that sends nothing more, then leaves
            message = {"type": "http.disconnect"}
        if received is not None:
            received.append(message)
        return message

    return receive


def call_send(sent: list[Message]) -> Callable[[Message], Any]:
    async def send(message: Message) -> None:
        sent.append(message)

    return send


async def call(
    app: Any,
    *,
    headers: dict[str, str] | None = None,
    raw_headers: list[tuple[bytes, bytes]] | None = None,
    messages: list[Message] | None = None,
    received: list[Message] | None = None,
    send: Callable[[Message], Any] | None = None,
    method: str = "POST",
    path: str = "/orders",
) -> list[Message]:
    """Call ``app`` with one request; the messages it sent."""
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw += raw_headers or []
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": raw,
    }
    if messages is None:
        messages = [{"type": "http.request", "body": b"", "more_body": False}]
    sent: list[Message] = []
    recorder = call_send(sent)

    async def both(message: Message) -> None:
        await recorder(message)
        if send is not None:
            await send(message)

    await app(scope, call_receive(messages, received), both)
    return sent
