"""RateLimitMiddleware as plain ASGI, on asyncio and trio, in virtual time."""

from __future__ import annotations

import json
import re
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.asgi import (
    DeadlineMiddleware,
    Message,
    RateLimitMiddleware,
    Receive,
    Scope,
    Send,
    client_address,
)

from .conftest import jump, sample


class App:
    """Answers 200 ``b"ok"``, or raises ``error``; counts its requests."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.requests = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.requests += 1
        if self.error is not None:
            raise self.error
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b"ok"})


class Answer:
    """What the middleware sent for one request."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        start = messages[0]
        assert start["type"] == "http.response.start"
        self.status: int = start["status"]
        self.headers = {k.decode(): v.decode() for k, v in start["headers"]}
        self.body = b"".join(m.get("body", b"") for m in messages[1:])


async def request(
    app: Any,
    *,
    client: str | None = "10.0.0.1",
    headers: dict[str, str] | None = None,
    scope_type: str = "http",
) -> Answer:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": scope_type,
        "method": "GET",
        "path": "/",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    if client is not None:
        scope["client"] = (client, 50000)
    await app(scope, receive, send)
    return Answer(sent)


POLICY = re.compile(r'"(?P<name>[^"]*)";q=(?P<q>\d+);w=(?P<w>\d+)')
STATE = re.compile(r'"(?P<name>[^"]*)";r=(?P<r>\d+)(?:;t=(?P<t>\d+))?')


def fields(answer: Answer) -> tuple[dict[str, str], dict[str, str | None]]:
    policy = POLICY.fullmatch(answer.headers["ratelimit-policy"])
    state = STATE.fullmatch(answer.headers["ratelimit"])
    assert policy is not None, answer.headers
    assert state is not None, answer.headers
    return policy.groupdict(), state.groupdict()


# -- refusals ---------------------------------------------------------------------------------


async def test_a_client_over_its_limit_gets_429_with_retry_after_and_the_fields() -> None:
    app = App()
    limited = RateLimitMiddleware(app, limiter=sw.RateLimiter(2, burst=2, name="api"))
    assert (await request(limited)).status == 200
    assert (await request(limited)).status == 200
    refused = await request(limited)
    assert refused.status == 429
    assert app.requests == 2
    assert refused.headers["retry-after"] == "1"  # 0.5 s, rounded up
    assert fields(refused) == (
        {"name": "api", "q": "2", "w": "1"},
        {"name": "api", "r": "0", "t": "1"},
    )
    assert refused.headers["content-type"] == "application/problem+json"
    problem = json.loads(refused.body)
    assert problem["status"] == 429
    assert problem["title"] == "Too Many Requests"
    assert (problem["policy"], problem["kind"]) == ("api", "rate_limited")
    assert "'api'" in problem["detail"]


async def test_retry_after_is_never_early() -> None:
    limited = RateLimitMiddleware(App(), limiter=sw.RateLimiter(1, per=2.5))
    await request(limited)
    jump(0.25)
    refused = await request(limited)
    assert refused.headers["retry-after"] == "3"  # 2.25 s, rounded up
    jump(3 - 1 / 1024)
    assert (await request(limited)).status == 200


async def test_each_client_address_has_its_own_limit() -> None:
    limited = RateLimitMiddleware(App(), limiter=sw.RateLimiter(1))
    assert (await request(limited, client="10.0.0.1")).status == 200
    assert (await request(limited, client="10.0.0.2")).status == 200
    assert (await request(limited, client="10.0.0.1")).status == 429
    assert (await request(limited, client=None)).status == 200  # "unknown"
    assert (await request(limited, client=None)).status == 429


async def test_the_key_can_be_read_from_the_request_and_none_is_not_limited() -> None:
    def api_key(scope: Scope) -> str | None:
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                return str(value.decode())
        return None

    app = App()
    limited = RateLimitMiddleware(app, limiter=sw.RateLimiter(1), key=api_key)
    assert (await request(limited, headers={"x-api-key": "a"})).status == 200
    assert (await request(limited, headers={"x-api-key": "a"})).status == 429
    assert (await request(limited, headers={"x-api-key": "b"})).status == 200
    unlimited = await request(limited)
    assert unlimited.status == 200
    assert "ratelimit" not in unlimited.headers


async def test_a_long_key_from_a_request_is_bounded_not_refused() -> None:
    limited = RateLimitMiddleware(
        App(), limiter=sw.RateLimiter(1), key=lambda scope: scope["path"] * 1000
    )
    assert (await request(limited)).status == 200
    assert (await request(limited)).status == 429  # the same (hashed) key


async def test_a_request_over_the_limit_waits_its_turn_within_max_wait() -> None:
    app = App()
    limited = RateLimitMiddleware(app, limiter=sw.RateLimiter(2, burst=1, max_wait=1.0))
    start = anyio.current_time()
    await request(limited)
    answer = await request(limited)
    assert answer.status == 200
    assert anyio.current_time() - start == 0.5


async def test_a_turn_after_the_callers_deadline_is_refused_at_once() -> None:
    app = App()
    limiter = sw.RateLimiter(1, burst=1, max_wait=10)
    limited = DeadlineMiddleware(RateLimitMiddleware(app, limiter=limiter))
    await request(limited)
    start = anyio.current_time()
    refused = await request(limited, headers={"x-request-timeout-ms": "500"})
    assert refused.status == 429
    assert anyio.current_time() == start
    assert refused.headers["retry-after"] == "1"


# -- requests let through ---------------------------------------------------------------------


async def test_a_response_carries_the_remaining_quota_and_when_more_comes() -> None:
    limited = RateLimitMiddleware(App(), limiter=sw.RateLimiter(10, per=60, burst=3, name="q"))
    first = await request(limited)
    assert first.headers["x-app"] == "1"
    assert fields(first) == ({"name": "q", "q": "10", "w": "60"}, {"name": "q", "r": "2", "t": "6"})
    second = await request(limited)
    assert fields(second)[1] == {"name": "q", "r": "1", "t": "6"}
    jump(60)
    third = await request(limited)
    assert fields(third)[1] == {"name": "q", "r": "2", "t": "6"}


async def test_a_full_bucket_says_no_reset() -> None:
    limited = RateLimitMiddleware(App(), limiter=sw.RateLimiter(1, burst=2, name="q"))
    await request(limited)
    jump(5)
    assert fields(await request(limited))[1] == {"name": "q", "r": "1", "t": "1"}
    jump(5)
    limiter = sw.RateLimiter(1, burst=1, name="single")
    assert limiter._headroom(None) == (1, None)


async def test_the_fields_can_be_left_out_of_responses() -> None:
    limited = RateLimitMiddleware(App(), limiter=sw.RateLimiter(1), headers=False)
    answer = await request(limited)
    assert "ratelimit" not in answer.headers
    assert "ratelimit-policy" in (await request(limited)).headers  # still on a 429


@pytest.mark.parametrize(
    ("rate", "per", "expected"),
    [
        (100, 60, "q=100;w=60"),
        (5, 0.5, "q=10;w=1"),
        (3, 1.5, "q=4;w=2"),
        (0.5, 1, "q=1;w=2"),
        (0.25, 0.5, "q=1;w=2"),
    ],
)
async def test_the_policy_field_is_whole_seconds_and_calls(
    rate: float, per: float, expected: str
) -> None:
    limited = RateLimitMiddleware(App(), limiter=sw.RateLimiter(rate, per=per, name="p"))
    assert (await request(limited)).headers["ratelimit-policy"] == f'"p";{expected}'


async def test_a_name_is_quoted_as_a_structured_field_string() -> None:
    limiter = sw.RateLimiter(1, name='tier "gold" \\ é')
    answer = await request(RateLimitMiddleware(App(), limiter=limiter))
    assert answer.headers["ratelimit-policy"] == '"tier \\"gold\\" \\\\ ?";q=1;w=1'


# -- counting, other scopes, options ----------------------------------------------------------


async def test_requests_are_counted_as_calls_through_the_limiter(
    registry: CollectorRegistry,
) -> None:
    telemetry = sw.Telemetry(registry=registry)
    limiter = sw.RateLimiter(2, name="api", telemetry=telemetry)
    await request(RateLimitMiddleware(App(), limiter=limiter))
    with pytest.raises(RuntimeError, match="boom"):
        await request(RateLimitMiddleware(App(RuntimeError("boom")), limiter=limiter))
    await request(RateLimitMiddleware(App(), limiter=limiter))
    calls = {"policy": "api", "kind": "rate_limiter"}
    assert sample(registry, "stalwart_calls_total", outcome="success", **calls) == 1
    assert sample(registry, "stalwart_calls_total", outcome="error", **calls) == 1
    assert sample(registry, "stalwart_calls_total", outcome="rejected", **calls) == 1


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
async def test_other_scopes_pass_straight_through(scope_type: str) -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    limited = RateLimitMiddleware(app, limiter=sw.RateLimiter(1))
    for _ in range(3):
        await limited({"type": scope_type}, None, None)  # type: ignore[arg-type]
    assert seen == [scope_type] * 3


def test_client_address_reads_the_scope() -> None:
    assert client_address({"client": ("192.0.2.7", 1234)}) == "192.0.2.7"
    assert client_address({"client": None}) == "unknown"
    assert client_address({}) == "unknown"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"limiter": None}, TypeError, "limiter must be a stalwart.RateLimiter"),
        ({"limiter": "keyed"}, ValueError, "built without key="),
        ({"key": "client"}, TypeError, "key must be a callable of the ASGI scope"),
        ({"headers": 1}, TypeError, "headers must be a bool"),
    ],
)
def test_bad_options_are_refused_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    options: dict[str, Any] = {"limiter": sw.RateLimiter(1), **kwargs}
    if options["limiter"] == "keyed":
        options["limiter"] = sw.RateLimiter(1, key="user", name="keyed")
    with pytest.raises(error, match=message):
        RateLimitMiddleware(App(), **options)
    with pytest.raises(TypeError, match="app must be an ASGI application"):
        RateLimitMiddleware(None, limiter=sw.RateLimiter(1, name="app"))  # type: ignore[arg-type]
