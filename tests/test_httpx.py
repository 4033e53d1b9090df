"""ResilientTransport over httpx.MockTransport, on asyncio and trio, in virtual time."""

from __future__ import annotations

import gzip
import json
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.httpx import (
    DEFAULT_RETRY_ON,
    DEFAULT_RETRY_STATUSES,
    ResilientTransport,
    RetryableStatusError,
    parse_retry_after,
)

from .conftest import jump, sample

NO_WAIT = sw.Backoff(initial=0.0, maximum=0.0)
# No backoff of its own, and a server's hint waited up to a minute (a hint
# longer than the backoff's maximum stops the retrying).
HINTED = sw.Backoff(initial=0.0, maximum=60.0)
IDEMPOTENT = ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"]


class Seen:
    """One request as the upstream received it."""

    def __init__(self, request: httpx.Request) -> None:
        self.request = request
        self.at = anyio.current_time()
        self.method = request.method
        self.headers = request.headers
        self.content = request.content
        self.timeout: dict[str, float | None] = request.extensions.get("timeout", {})


class Upstream:
    """A scripted server: answers the n-th request with ``replies[n]`` (the last one repeats)."""

    def __init__(self, *replies: Callable[[], httpx.Response | BaseException] | int) -> None:
        self.replies = replies
        self.seen: list[Seen] = []
        self.latency = 0.0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(Seen(request))
        if self.latency:
            await anyio.sleep(self.latency)
        reply = self.replies[min(len(self.seen), len(self.replies)) - 1]
        outcome = (
            httpx.Response(reply, text=f"reply {len(self.seen)}")
            if isinstance(reply, int)
            else reply()
        )
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def client(
        self,
        policy: sw.Policy | None = None,
        *,
        timeout: httpx.Timeout | float = 5.0,
        **options: Any,
    ) -> httpx.AsyncClient:
        transport = ResilientTransport(policy, transport=httpx.MockTransport(self), **options)
        return httpx.AsyncClient(
            transport=transport, base_url="http://upstream.test", timeout=timeout
        )


def reply(
    status: int, headers: dict[str, str] | None = None, body: bytes = b""
) -> Callable[[], httpx.Response]:
    return lambda: httpx.Response(status, headers=headers, content=body)


def fail(exc: type[httpx.TransportError] = httpx.ConnectError) -> Callable[[], BaseException]:
    return lambda: exc("refused")


def retry(attempts: int = 3, **options: Any) -> sw.Retry:
    options.setdefault("backoff", NO_WAIT)
    return sw.Retry(attempts=attempts, **options)


# -- statuses ------------------------------------------------------------------


async def test_a_retryable_status_is_retried_until_a_success() -> None:
    upstream = Upstream(503, 502, 200)
    async with upstream.client(retry()) as client:
        response = await client.get("/items")
    assert response.status_code == 200
    assert response.text == "reply 3"
    assert len(upstream.seen) == 3


async def test_the_last_response_is_returned_when_the_attempts_run_out() -> None:
    upstream = Upstream(reply(503, {"x-try": "1"}, b"first"), reply(504, {"x-try": "2"}, b"last"))
    async with upstream.client(retry(2)) as client:
        response = await client.get("/items")
    assert len(upstream.seen) == 2
    assert response.status_code == 504
    assert response.headers["x-try"] == "2"
    assert response.content == b"last"
    assert response.request.url == "http://upstream.test/items"


async def test_a_status_outside_retry_statuses_is_returned_at_once() -> None:
    upstream = Upstream(500, 200)
    async with upstream.client(retry()) as client:
        response = await client.get("/items")
    assert response.status_code == 500
    assert len(upstream.seen) == 1


async def test_retry_statuses_can_be_chosen() -> None:
    upstream = Upstream(500, 503, 200)
    async with upstream.client(retry(), retry_statuses={500}) as client:
        response = await client.get("/items")
    assert response.status_code == 503
    assert len(upstream.seen) == 2


async def test_no_status_is_retried_with_empty_retry_statuses() -> None:
    upstream = Upstream(503, 200)
    async with upstream.client(retry(), retry_statuses=()) as client:
        assert (await client.get("/items")).status_code == 503
    assert len(upstream.seen) == 1


def test_the_default_retry_statuses() -> None:
    transport = ResilientTransport(transport=httpx.MockTransport(Upstream(200)))
    assert transport.retry_statuses == DEFAULT_RETRY_STATUSES == {429, 502, 503, 504}


async def test_a_retried_status_reaches_the_policy_as_a_retryable_status_error() -> None:
    failures: list[BaseException] = []

    def hint(failure: Any) -> None:
        failures.append(failure)

    upstream = Upstream(reply(429, {"retry-after": "0"}, b"slow down"), 200)
    async with upstream.client(retry(retry_after=hint)) as client:
        await client.get("/items")
    [failure] = failures
    assert isinstance(failure, RetryableStatusError)
    assert isinstance(failure, httpx.HTTPStatusError)
    assert failure.response.status_code == 429
    assert failure.response.content == b"slow down"
    assert failure.retry_after == 0.0
    assert failure.request.url == "http://upstream.test/items"


class Recorder(sw.Policy):
    """Records the outcome of every call it wraps, as a circuit breaker would count it."""

    kind = "recorder"

    def __init__(self) -> None:
        super().__init__(name="recorder", telemetry=None)
        self.outcomes: list[object] = []

    def wrap(self, fn: Any, binding: sw.Binding) -> Any:
        async def recorded(*args: Any, **kwargs: Any) -> Any:
            try:
                response = await fn(*args, **kwargs)
            except Exception as exc:
                self.outcomes.append(type(exc))
                raise
            self.outcomes.append(response.status_code)
            return response

        return recorded


async def test_a_policy_inside_the_retry_sees_every_attempts_outcome() -> None:
    recorder = Recorder()
    upstream = Upstream(503, fail(), 200)
    async with upstream.client(sw.Pipeline(retry(), recorder)) as client:
        await client.get("/items")
    assert recorder.outcomes == [RetryableStatusError, httpx.ConnectError, 200]


async def test_a_policy_that_does_not_retry_statuses_returns_the_first_response() -> None:
    upstream = Upstream(503, 200)
    async with upstream.client(retry(on=httpx.TransportError)) as client:
        assert (await client.get("/items")).status_code == 503
    assert len(upstream.seen) == 1


async def test_the_returned_response_can_be_streamed_raw() -> None:
    upstream = Upstream(reply(503, body=b"still unavailable"))
    async with upstream.client(retry(2)) as client, client.stream("GET", "/items") as response:
        chunks = [chunk async for chunk in response.aiter_raw()]
    assert b"".join(chunks) == b"still unavailable"


async def test_the_returned_response_can_be_streamed_and_is_decoded_by_the_client() -> None:
    body = gzip.compress(b"still unavailable")
    upstream = Upstream(reply(503, {"content-encoding": "gzip"}, body))
    async with upstream.client(retry(2)) as client, client.stream("GET", "/items") as response:
        chunks = [chunk async for chunk in response.aiter_bytes()]
    assert response.status_code == 503
    assert b"".join(chunks) == b"still unavailable"


async def test_a_body_that_does_not_decode_is_still_retried_and_returned() -> None:
    def garbled() -> httpx.Response:
        return httpx.Response(
            503, headers={"content-encoding": "gzip"}, stream=httpx.ByteStream(b"not gzip")
        )

    upstream = Upstream(garbled)
    async with upstream.client(retry(2)) as client, client.stream("GET", "/items") as response:
        assert response.status_code == 503
        assert b"".join([chunk async for chunk in response.aiter_raw()]) == b"not gzip"
    assert len(upstream.seen) == 2


# -- Retry-After -----------------------------------------------------------------


async def test_retry_after_in_seconds_is_waited_out() -> None:
    upstream = Upstream(reply(503, {"retry-after": "7"}), 200)
    async with upstream.client(retry(backoff=HINTED)) as client:
        await client.get("/items")
    first, second = upstream.seen
    assert second.at - first.at == 7.0


async def test_retry_after_is_a_minimum_the_backoff_can_exceed() -> None:
    upstream = Upstream(reply(503, {"retry-after": "1"}), 200)
    backoff = sw.Backoff(initial=3.0, maximum=3.0, jitter="none")
    async with upstream.client(retry(backoff=backoff)) as client:
        await client.get("/items")
    first, second = upstream.seen
    assert second.at - first.at == 3.0


async def test_retry_after_as_an_http_date_is_measured_from_the_servers_date() -> None:
    now = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    headers = {
        "date": format_datetime(now, usegmt=True),
        "retry-after": format_datetime(now + timedelta(seconds=30), usegmt=True),
    }
    upstream = Upstream(reply(503, headers), 200)
    async with upstream.client(retry(backoff=HINTED)) as client:
        await client.get("/items")
    first, second = upstream.seen
    assert second.at - first.at == 30.0


async def test_retry_after_as_an_http_date_without_a_date_uses_the_wall_clock() -> None:
    later = datetime.now(UTC) + timedelta(seconds=60)
    upstream = Upstream(reply(503, {"retry-after": format_datetime(later, usegmt=True)}), 200)
    async with upstream.client(retry(backoff=HINTED)) as client:
        await client.get("/items")
    first, second = upstream.seen
    assert 58.0 <= second.at - first.at <= 60.0


@pytest.mark.parametrize("value", ["soon", "-3", "1e3", "", "Mon, 99 Foo 2030 99:99:99 GMT"])
async def test_a_malformed_retry_after_is_ignored(value: str) -> None:
    upstream = Upstream(reply(503, {"retry-after": value}), 200)
    async with upstream.client(retry()) as client:
        await client.get("/items")
    first, second = upstream.seen
    assert second.at == first.at


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0.0),
        ("120", 120.0),
        (" 5 ", 5.0),
        ("1.5", 1.5),
        ("Thu, 01 Jan 1970 00:01:40 GMT", 50.0),
        ("Thursday, 01-Jan-70 00:01:40 GMT", 50.0),
        ("Thu, 01 Jan 1970 00:00:10 GMT", 0.0),  # in the past: retry now
        ("-1", None),
        ("+1", None),
        ("1 2", None),
        ("inf", None),
        ("nan", None),
        ("later", None),
        ("", None),
    ],
)
def test_parse_retry_after(value: str, expected: float | None) -> None:
    assert parse_retry_after(value, now=50.0) == expected  # 50 s after the epoch


def test_parse_retry_after_reads_dates_against_the_wall_clock_by_default() -> None:
    later = datetime.now(UTC) + timedelta(seconds=100)
    hint = parse_retry_after(format_datetime(later, usegmt=True))
    assert hint is not None
    assert 98.0 <= hint <= 100.0


# -- transport errors -------------------------------------------------------------


async def test_transport_errors_are_retried() -> None:
    upstream = Upstream(fail(httpx.ConnectError), fail(httpx.ReadTimeout), 200)
    async with upstream.client(retry()) as client:
        assert (await client.get("/items")).status_code == 200
    assert len(upstream.seen) == 3


async def test_the_last_transport_error_propagates_unchanged() -> None:
    errors: list[httpx.TransportError] = []

    def refuse() -> BaseException:
        errors.append(httpx.ConnectError(f"refused {len(errors) + 1}"))
        return errors[-1]

    upstream = Upstream(refuse)
    async with upstream.client(retry()) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get("/items")
    assert info.value is errors[-1]
    assert len(upstream.seen) == 3


async def test_the_default_policy_makes_three_attempts() -> None:
    upstream = Upstream(503)
    async with upstream.client() as client:
        assert (await client.get("/items")).status_code == 503
    assert len(upstream.seen) == 3


@pytest.mark.parametrize("error", [httpx.UnsupportedProtocol, httpx.LocalProtocolError])
async def test_the_default_policy_does_not_retry_what_a_retry_cannot_mend(
    error: type[httpx.TransportError],
) -> None:
    upstream = Upstream(fail(error), 200)
    async with upstream.client() as client:
        with pytest.raises(error):
            await client.get("/items")
    assert len(upstream.seen) == 1


async def test_cancellation_is_not_retried() -> None:
    upstream = Upstream(200)
    upstream.latency = 10.0
    async with upstream.client(retry(on=BaseException)) as client:
        with anyio.move_on_after(1.0) as scope:
            await client.get("/items")
    assert scope.cancelled_caught
    assert len(upstream.seen) == 1


# -- which requests are retried ---------------------------------------------------


@pytest.mark.parametrize("method", IDEMPOTENT)
async def test_idempotent_methods_are_retried(method: str) -> None:
    upstream = Upstream(503, fail(), 200)
    async with upstream.client(retry()) as client:
        assert (await client.request(method, "/items")).status_code == 200
    assert len(upstream.seen) == 3


@pytest.mark.parametrize("method", ["POST", "PATCH", "PURGE"])
async def test_other_methods_are_not_retried(method: str) -> None:
    upstream = Upstream(503, 200)
    async with upstream.client(retry()) as client:
        assert (await client.request(method, "/items")).status_code == 503
    assert len(upstream.seen) == 1


async def test_a_failing_unsafe_request_raises_after_one_attempt() -> None:
    upstream = Upstream(fail(), 200)
    async with upstream.client(retry()) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post("/orders", json={"sku": 42})
    assert len(upstream.seen) == 1


async def test_the_other_policies_still_apply_to_unsafe_requests() -> None:
    upstream = Upstream(200)
    upstream.latency = 10.0
    async with upstream.client(sw.Pipeline(retry(), sw.Timeout(2.0))) as client:
        start = anyio.current_time()
        with pytest.raises(sw.DeadlineExceeded):
            await client.post("/orders")
    assert anyio.current_time() - start == 2.0
    assert len(upstream.seen) == 1


async def test_a_request_with_an_idempotency_key_is_retried_with_that_key() -> None:
    upstream = Upstream(503, fail(), 201)
    async with upstream.client(retry()) as client:
        response = await client.post("/orders", headers={"Idempotency-Key": "order-7"})
    assert response.status_code == 201
    assert [seen.headers["idempotency-key"] for seen in upstream.seen] == ["order-7"] * 3


async def test_added_keys_are_one_per_request_and_kept_across_its_attempts() -> None:
    upstream = Upstream(503, 201, 503, 201)
    async with upstream.client(retry(), add_idempotency_keys=True) as client:
        first = await client.post("/orders")
        second = await client.post("/orders")
    keys = [seen.headers["idempotency-key"] for seen in upstream.seen]
    assert keys[0] == keys[1] != keys[2] == keys[3]
    assert first.request.headers["idempotency-key"] == keys[0]
    assert second.request.headers["idempotency-key"] == keys[2]
    assert uuid.UUID(keys[0]).version == 4


async def test_added_keys_leave_idempotent_methods_alone() -> None:
    upstream = Upstream(200)
    async with upstream.client(retry(), add_idempotency_keys=True) as client:
        await client.put("/items/1")
    assert "idempotency-key" not in upstream.seen[0].headers


async def test_added_keys_never_replace_the_callers_key() -> None:
    upstream = Upstream(200)
    async with upstream.client(retry(), add_idempotency_keys=True) as client:
        await client.post("/orders", headers={"Idempotency-Key": "mine"})
    assert upstream.seen[0].headers["idempotency-key"] == "mine"


async def test_added_keys_come_from_the_given_rng() -> None:
    keys = []
    for _ in range(2):
        upstream = Upstream(200)
        async with upstream.client(
            retry(), add_idempotency_keys=True, rng=random.Random(7)
        ) as client:
            await client.post("/orders")
        keys.append(upstream.seen[0].headers["idempotency-key"])
    assert keys[0] == keys[1]
    assert uuid.UUID(keys[0]).version == 4


async def test_the_idempotency_header_can_be_renamed() -> None:
    upstream = Upstream(503, 200)
    async with upstream.client(
        retry(), add_idempotency_keys=True, idempotency_header="X-Request-Id"
    ) as client:
        assert (await client.post("/orders")).status_code == 200
    assert upstream.seen[0].headers["x-request-id"] == upstream.seen[1].headers["x-request-id"]


# -- bodies and connections -----------------------------------------------------------


async def test_a_streamed_body_is_sent_identically_on_every_attempt() -> None:
    async def body() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part

    upstream = Upstream(503, fail(), 200)
    async with upstream.client(retry()) as client:
        await client.put("/items/1", content=body())
    assert [seen.content for seen in upstream.seen] == [b"one,two,three"] * 3


async def test_a_json_body_is_sent_identically_on_every_attempt() -> None:
    upstream = Upstream(503, 200)
    async with upstream.client(retry()) as client:
        await client.post("/orders", json={"sku": 42}, headers={"Idempotency-Key": "k"})
    first, second = upstream.seen
    assert json.loads(first.content) == {"sku": 42}
    assert second.content == first.content
    assert second.headers["content-length"] == first.headers["content-length"]


class TrackedBody(httpx.AsyncByteStream):
    """A response body that remembers whether it was read and closed."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = list(chunks)
        self.read = False
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        self.read = True

    async def aclose(self) -> None:
        self.closed = True


async def test_every_discarded_response_is_read_and_closed() -> None:
    bodies: list[TrackedBody] = []

    def tracked(status: int) -> Callable[[], httpx.Response]:
        def make() -> httpx.Response:
            bodies.append(TrackedBody([b"a", b"b"]))
            return httpx.Response(status, stream=bodies[-1])

        return make

    upstream = Upstream(tracked(503), tracked(503), tracked(200))
    async with upstream.client(retry()) as client, client.stream("GET", "/items") as response:
        assert [(b.read, b.closed) for b in bodies] == [(True, True), (True, True), (False, False)]
        assert await response.aread() == b"ab"
    assert bodies[-1].closed


async def test_the_last_retryable_response_is_read_and_closed_too() -> None:
    bodies: list[TrackedBody] = []

    def make() -> httpx.Response:
        bodies.append(TrackedBody([b"busy"]))
        return httpx.Response(503, stream=bodies[-1])

    upstream = Upstream(make)
    async with upstream.client(retry(2)) as client, client.stream("GET", "/items") as response:
        assert all(b.read and b.closed for b in bodies)
        assert await response.aread() == b"busy"


# -- deadlines ---------------------------------------------------------------------------


async def test_every_attempt_carries_the_whole_milliseconds_left() -> None:
    upstream = Upstream(reply(503, {"retry-after": "1"}), 200)
    upstream.latency = 0.25
    async with upstream.client(retry(backoff=HINTED)) as client:
        with sw.deadline(2.5):
            await client.get("/items")
    assert [seen.headers["x-request-timeout-ms"] for seen in upstream.seen] == ["2500", "1250"]


async def test_the_milliseconds_are_rounded_down() -> None:
    upstream = Upstream(200)
    async with upstream.client(retry()) as client:
        with sw.deadline(1.0):
            jump(0.0004)
            await client.get("/items")
    assert upstream.seen[0].headers["x-request-timeout-ms"] == "999"


async def test_no_deadline_header_is_sent_without_a_deadline() -> None:
    upstream = Upstream(200)
    async with upstream.client(retry()) as client:
        await client.get("/items")
    assert "x-request-timeout-ms" not in upstream.seen[0].headers


async def test_the_deadline_header_can_be_renamed_or_switched_off() -> None:
    upstream = Upstream(200)
    async with upstream.client(retry(), deadline_header="X-Deadline-Ms") as client:
        with sw.deadline(3.0):
            await client.get("/items")
    async with upstream.client(retry(), deadline_header=None) as client:
        with sw.deadline(3.0):
            await client.get("/items")
    first, second = upstream.seen
    assert first.headers["x-deadline-ms"] == "3000"
    assert "x-request-timeout-ms" not in first.headers
    assert "x-deadline-ms" not in second.headers
    assert "x-request-timeout-ms" not in second.headers
    assert second.timeout["read"] == 3.0


async def test_a_timeout_in_the_policy_is_a_deadline_for_each_attempt() -> None:
    upstream = Upstream(200)
    async with upstream.client(sw.Pipeline(retry(), sw.Timeout(0.75))) as client:
        await client.get("/items")
    assert upstream.seen[0].headers["x-request-timeout-ms"] == "750"


async def test_the_attempts_timeouts_are_narrowed_to_the_time_left() -> None:
    upstream = Upstream(200)
    async with upstream.client(
        retry(), timeout=httpx.Timeout(10.0, connect=1.0, pool=None)
    ) as client:
        with sw.deadline(2.5):
            await client.get("/items")
    assert upstream.seen[0].timeout == {"connect": 1.0, "read": 2.5, "write": 2.5, "pool": 2.5}


async def test_the_callers_request_keeps_its_own_timeouts() -> None:
    upstream = Upstream(200)
    async with upstream.client(retry(), timeout=10.0) as client:
        with sw.deadline(2.5):
            response = await client.get("/items")
    assert response.request.extensions["timeout"]["read"] == 10.0
    assert "x-request-timeout-ms" not in response.request.headers


async def test_a_request_sent_without_a_client_gets_timeouts_from_the_deadline() -> None:
    upstream = Upstream(200)
    transport = ResilientTransport(retry(), transport=httpx.MockTransport(upstream))
    with sw.deadline(4.0):
        await transport.handle_async_request(httpx.Request("GET", "http://upstream.test/"))
    assert upstream.seen[0].timeout == {"connect": 4.0, "read": 4.0, "write": 4.0, "pool": 4.0}


async def test_no_request_is_sent_when_no_time_is_left() -> None:
    upstream = Upstream(200)
    async with upstream.client(retry()) as client:
        with pytest.raises(sw.DeadlineExceeded) as info, sw.deadline(1.0):
            jump(1.0)
            await client.get("/items")
    assert upstream.seen == []
    assert info.value.policy == "httpx"


async def test_no_request_is_sent_with_less_than_a_millisecond_left() -> None:
    upstream = Upstream(200)
    async with upstream.client(retry(), name="inventory") as client:
        with pytest.raises(sw.DeadlineExceeded) as info, sw.deadline(0.0009):
            await client.get("/items")
    assert upstream.seen == []
    assert info.value.policy == "inventory"


async def test_a_retry_that_would_outlive_the_deadline_returns_the_last_response_now() -> None:
    upstream = Upstream(reply(503, {"retry-after": "5"}), 200)
    async with upstream.client(retry()) as client:
        with sw.deadline(3.0):
            response = await client.get("/items")
            assert anyio.current_time() - upstream.seen[0].at == 0.0
    assert response.status_code == 503
    assert len(upstream.seen) == 1


async def test_a_hanging_attempt_is_cut_by_a_per_attempt_timeout_and_retried() -> None:
    calls = 0

    async def hang_once(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await anyio.sleep(60)
        return httpx.Response(200)

    transport = ResilientTransport(
        sw.Pipeline(retry(), sw.Timeout(1.0)), transport=httpx.MockTransport(hang_once)
    )
    async with httpx.AsyncClient(transport=transport) as client:
        start = anyio.current_time()
        assert (await client.get("http://upstream.test/")).status_code == 200
    assert anyio.current_time() - start == 1.0
    assert calls == 2


# -- per-host policies ----------------------------------------------------------------------


class Hosts:
    """Upstreams by host: ``down`` hosts answer 503, the others 200; every request logged."""

    def __init__(self, *down: str) -> None:
        self.down = set(down)
        self.seen: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request.url.host)
        return httpx.Response(503 if request.url.host in self.down else 200)

    def client(self, policy: sw.Policy | None = None, **options: Any) -> httpx.AsyncClient:
        transport = ResilientTransport(
            policy or retry(attempts=1), transport=httpx.MockTransport(self), **options
        )
        return httpx.AsyncClient(transport=transport)


def breakers(**options: Any) -> Callable[[str], sw.CircuitBreaker]:
    options.setdefault("consecutive_failures", 2)
    options.setdefault("open_for", 30.0)
    return lambda origin: sw.CircuitBreaker(name=f"upstream {origin}", **options)


async def test_one_hosts_outage_opens_its_breaker_only() -> None:
    hosts = Hosts("sick.test")
    async with hosts.client(per_host=breakers()) as client:
        for _ in range(2):
            assert (await client.get("http://sick.test/")).status_code == 503
        with pytest.raises(sw.CircuitOpenError) as info:
            await client.get("http://sick.test/")
        for _ in range(5):
            assert (await client.get("http://well.test/")).status_code == 200
    assert info.value.policy == "upstream http://sick.test:80"
    assert hosts.seen == ["sick.test"] * 2 + ["well.test"] * 5
    transport = client._transport
    assert isinstance(transport, ResilientTransport)
    states = {
        origin: breaker.state
        for origin, breaker in transport.host_policies.items()
        if isinstance(breaker, sw.CircuitBreaker)
    }
    assert states == {
        "http://sick.test:80": sw.CircuitState.OPEN,
        "http://well.test:80": sw.CircuitState.CLOSED,
    }


# The longest DNS name: 253 characters, labels of at most 63.
LONGEST_HOST = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 56, "test"])


async def test_per_host_takes_the_longest_valid_host_name() -> None:
    assert len(LONGEST_HOST) == 253
    hosts = Hosts(LONGEST_HOST)
    made: list[str] = []

    def per_host(origin: str) -> sw.CircuitBreaker:
        made.append(origin)
        # A policy's name is at most 200 characters: not the whole origin.
        return sw.CircuitBreaker(name=f"upstream {origin[-60:]}", consecutive_failures=2)

    async with hosts.client(per_host=per_host) as client:
        for _ in range(2):
            assert (await client.get(f"https://{LONGEST_HOST}:65535/")).status_code == 503
        with pytest.raises(sw.CircuitOpenError) as info:
            await client.get(f"https://{LONGEST_HOST}:65535/")
        assert (await client.get("http://well.test/")).status_code == 200
    origin = f"https://{LONGEST_HOST}:65535"
    assert len(origin) == 267
    assert info.value.policy == f"upstream {origin[-60:]}"
    assert made == [origin, "http://well.test:80"]
    transport = client._transport
    assert isinstance(transport, ResilientTransport)
    assert list(transport.host_policies) == [origin, "http://well.test:80"]
    assert all(type(key) is str for key in transport.host_policies)


async def test_the_per_host_breaker_counts_every_attempt_inside_the_retry() -> None:
    hosts = Hosts("sick.test")
    per_host = breakers(consecutive_failures=3)
    async with hosts.client(retry(3, on=DEFAULT_RETRY_ON), per_host=per_host) as client:
        assert (await client.get("http://sick.test/")).status_code == 503
        with pytest.raises(sw.CircuitOpenError):
            await client.get("http://sick.test/")
    assert hosts.seen == ["sick.test"] * 3


async def test_an_open_breaker_fails_fast_under_the_default_policy() -> None:
    hosts = Hosts("sick.test")
    transport = ResilientTransport(transport=httpx.MockTransport(hosts), per_host=breakers())
    async with httpx.AsyncClient(transport=transport) as client:
        start = anyio.current_time()
        with pytest.raises(sw.CircuitOpenError) as info:
            await client.get("http://sick.test/")
        with pytest.raises(sw.CircuitOpenError):
            await client.get("http://sick.test/")
    # The default Retry does not retry CircuitOpenError: the second attempt
    # opened the breaker, the third was rejected and ended the request.
    assert len(hosts.seen) == 2
    assert 29.0 < info.value.retry_after <= 30.0
    assert anyio.current_time() - start < 1.0


async def test_the_retry_waits_out_an_open_breaker_when_the_deadline_allows() -> None:
    calls: list[float] = []

    async def recovering(request: httpx.Request) -> httpx.Response:
        calls.append(anyio.current_time())
        return httpx.Response(503 if len(calls) <= 2 else 200)

    # Waiting out a breaker is asked for: `on=` naming CircuitOpenError, and a
    # backoff whose maximum covers its open period.
    policy = sw.Retry(
        attempts=4, on=Exception, backoff=sw.Backoff(initial=0.0, maximum=5.0, jitter="none")
    )
    transport = ResilientTransport(
        policy, transport=httpx.MockTransport(recovering), per_host=breakers(open_for=5.0)
    )
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://upstream.test/")
    assert response.status_code == 200
    assert calls == [0.0, 0.0, 5.0]


async def test_the_breakers_trial_after_open_for_reaches_the_upstream_again() -> None:
    hosts = Hosts("sick.test")
    async with hosts.client(per_host=breakers(open_for=10.0)) as client:
        for _ in range(2):
            await client.get("http://sick.test/")
        with pytest.raises(sw.CircuitOpenError):
            await client.get("http://sick.test/")
        hosts.down.clear()
        jump(10.0)
        assert (await client.get("http://sick.test/")).status_code == 200
    assert len(hosts.seen) == 3


async def hang(request: httpx.Request) -> httpx.Response:
    await anyio.sleep(3600)
    return httpx.Response(200)


async def test_a_per_attempt_timeout_inside_the_per_host_policy_counts_hangs() -> None:
    breaker = sw.CircuitBreaker(consecutive_failures=2, name="upstream")
    transport = ResilientTransport(
        retry(2, on=(*DEFAULT_RETRY_ON, sw.DeadlineExceeded)),
        transport=httpx.MockTransport(hang),
        per_host=lambda origin: sw.Pipeline(breaker, sw.Timeout(1.0)),
    )
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(sw.DeadlineExceeded):
            await client.get("http://upstream.test/")
        assert breaker.state is sw.CircuitState.OPEN
        with pytest.raises(sw.CircuitOpenError):
            await client.get("http://upstream.test/")
    assert anyio.current_time() == 2.0


async def test_an_attempt_cancelled_by_a_timeout_of_the_shared_policy_is_not_counted() -> None:
    breaker = sw.CircuitBreaker(consecutive_failures=1, name="upstream")
    transport = ResilientTransport(
        sw.Pipeline(retry(2), sw.Timeout(1.0)),
        transport=httpx.MockTransport(hang),
        per_host=lambda origin: breaker,
    )
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(sw.DeadlineExceeded):
            await client.get("http://upstream.test/")
    # Cancelled from outside, the attempts are none of the breaker's business.
    assert breaker.state is sw.CircuitState.CLOSED
    assert breaker.statistics().calls == 0


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ("http://a.test/x", "http://a.test:80/y?q=1", True),
        ("http://a.test/", "http://A.TEST/", True),
        ("https://a.test/", "https://a.test:443/", True),
        ("http://a.test/", "https://a.test/", False),
        ("http://a.test/", "http://a.test:8080/", False),
        ("http://a.test/", "http://b.a.test/", False),
        ("http://[::1]:8000/", "http://[::1]:8001/", False),
    ],
)
async def test_one_policy_per_scheme_host_and_port(first: str, second: str, shared: bool) -> None:
    made: list[str] = []

    def per_host(origin: str) -> sw.Policy:
        made.append(origin)
        return sw.CircuitBreaker(name=origin)

    async with Hosts().client(per_host=per_host) as client:
        await client.get(first)
        await client.get(second)
    assert len(made) == (1 if shared else 2)


async def test_the_factory_gets_the_origin_with_the_port_spelt_out() -> None:
    made: list[str] = []

    def per_host(origin: str) -> sw.Policy:
        made.append(origin)
        return sw.CircuitBreaker(name=origin)

    async with Hosts().client(per_host=per_host) as client:
        for url in (
            "http://a.test/",
            "https://B.test/",
            "http://[::1]:8000/",
            "http://xn--bcher-kva.test/",
        ):
            await client.get(url)
        await client.get("http://bücher.test/")
    assert made == [
        "http://a.test:80",
        "https://b.test:443",
        "http://[::1]:8000",
        "http://xn--bcher-kva.test:80",
    ]


async def test_at_most_max_hosts_policies_are_kept_least_recently_used_out() -> None:
    made: list[str] = []

    def per_host(origin: str) -> sw.Policy:
        made.append(origin)
        return sw.CircuitBreaker(name=origin)

    transport = ResilientTransport(
        retry(attempts=1), transport=httpx.MockTransport(Hosts()), per_host=per_host, max_hosts=2
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for host in ("a", "b", "a", "c", "a", "b"):
            await client.get(f"http://{host}.test/")
    # c evicted b (least recently used: a had just been used); b came back afresh.
    assert made == ["http://a.test:80", "http://b.test:80", "http://c.test:80", "http://b.test:80"]
    assert list(transport.host_policies) == ["http://a.test:80", "http://b.test:80"]


async def test_an_evicted_hosts_breaker_starts_afresh() -> None:
    hosts = Hosts("sick.test")
    async with hosts.client(per_host=breakers(), max_hosts=1) as client:
        for _ in range(2):
            await client.get("http://sick.test/")
        with pytest.raises(sw.CircuitOpenError):
            await client.get("http://sick.test/")
        await client.get("http://well.test/")
        assert (await client.get("http://sick.test/")).status_code == 503
    assert hosts.seen == ["sick.test", "sick.test", "well.test", "sick.test"]


async def test_per_host_policies_apply_to_unsafe_requests_too() -> None:
    hosts = Hosts("sick.test")
    async with hosts.client(retry(attempts=3), per_host=breakers()) as client:
        assert (await client.post("http://sick.test/", content=b"x")).status_code == 503
        assert (await client.post("http://sick.test/", content=b"x")).status_code == 503
        with pytest.raises(sw.CircuitOpenError):
            await client.post("http://sick.test/", content=b"x")
    assert len(hosts.seen) == 2


async def test_a_per_host_bulkhead_limits_each_upstream_on_its_own() -> None:
    running: dict[str, int] = {}
    peak: dict[str, int] = {}

    async def slow(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        running[host] = running.get(host, 0) + 1
        peak[host] = max(peak.get(host, 0), running[host])
        await anyio.sleep(1.0)
        running[host] -= 1
        return httpx.Response(200)

    transport = ResilientTransport(
        retry(attempts=1),
        transport=httpx.MockTransport(slow),
        per_host=lambda origin: sw.Bulkhead(2, max_queued=None, name=origin),
    )
    async with httpx.AsyncClient(transport=transport) as client, anyio.create_task_group() as tg:
        for host in ("a", "b") * 4:
            tg.start_soon(client.get, f"http://{host}.test/")
    assert peak == {"a.test": 2, "b.test": 2}
    assert anyio.current_time() == 2.0


async def test_the_per_host_breaker_reports_on_the_policys_span(spans: Any) -> None:
    telemetry = sw.Telemetry(registry=CollectorRegistry(), tracer_provider=spans.provider)
    hosts = Hosts("sick.test")
    policy = sw.Retry(attempts=1, name="outbound", telemetry=telemetry)
    per_host = breakers(consecutive_failures=1, telemetry=telemetry)
    async with hosts.client(policy, per_host=per_host) as client:
        await client.get("http://sick.test/")
    span = spans.only()
    assert span.name == "stalwart.retry outbound"
    assert [e.name for e in span.events if e.name != "exception"] == [
        "stalwart.circuit.transition",
        "stalwart.retry.gave_up",
    ]


async def test_the_per_host_breakers_metrics_are_labelled_by_their_names() -> None:
    registry = CollectorRegistry()
    telemetry = sw.Telemetry(registry=registry)
    hosts = Hosts("sick.test")
    async with hosts.client(per_host=breakers(telemetry=telemetry)) as client:
        for host in ("sick", "sick", "well"):
            await client.get(f"http://{host}.test/")
    assert (
        sample(
            registry, "stalwart_circuit_state", policy="upstream http://sick.test:80", state="open"
        )
        == 1.0
    )
    assert (
        sample(
            registry,
            "stalwart_circuit_state",
            policy="upstream http://well.test:80",
            state="closed",
        )
        == 1.0
    )


async def test_a_factory_that_returns_no_policy_fails_the_request_naming_the_origin() -> None:
    not_a_policy: Any = lambda origin: "breaker"  # noqa: E731
    async with Hosts().client(per_host=not_a_policy) as client:
        with pytest.raises(
            TypeError, match=r"per_host must return a stalwart policy.*http://a.test:80"
        ):
            await client.get("http://a.test/")


async def test_without_per_host_no_policies_are_kept() -> None:
    transport = ResilientTransport(transport=httpx.MockTransport(Hosts()))
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://a.test/")
    assert transport.host_policies == {}
    assert transport.max_hosts == 100


# -- the transport itself ------------------------------------------------------------------


class RecordingTransport(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.events: list[str] = []

    async def __aenter__(self) -> RecordingTransport:
        self.events.append("enter")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.events.append("exit")

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.events.append("request")
        return httpx.Response(200)

    async def aclose(self) -> None:
        self.events.append("close")


async def test_the_client_enters_and_exits_the_inner_transport() -> None:
    inner = RecordingTransport()
    async with httpx.AsyncClient(transport=ResilientTransport(transport=inner)) as client:
        await client.get("http://upstream.test/")
    assert inner.events == ["enter", "request", "exit"]


async def test_closing_the_transport_closes_the_inner_one() -> None:
    inner = RecordingTransport()
    transport = ResilientTransport(transport=inner)
    await transport.aclose()
    assert inner.events == ["close"]


def test_the_default_inner_transport_is_an_http_transport() -> None:
    transport = ResilientTransport()
    assert isinstance(transport.transport, httpx.AsyncHTTPTransport)
    assert isinstance(transport.policy, sw.Retry)
    assert transport.policy.attempts == 3
    assert transport.policy.name == "httpx"


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "param"),
    [
        ({"policy": "retry"}, TypeError, "policy"),
        ({"policy": sw.Retry}, TypeError, "policy"),
        ({"transport": object()}, TypeError, "transport"),
        ({"transport": httpx.HTTPTransport()}, TypeError, "transport"),
        ({"retry_statuses": 503}, TypeError, "retry_statuses"),
        ({"retry_statuses": "503"}, TypeError, "retry_statuses"),
        ({"retry_statuses": ["503"]}, TypeError, "retry_statuses"),
        ({"retry_statuses": [True]}, TypeError, "retry_statuses"),
        ({"retry_statuses": [99]}, ValueError, "retry_statuses"),
        ({"retry_statuses": [600]}, ValueError, "retry_statuses"),
        ({"deadline_header": ""}, ValueError, "deadline_header"),
        ({"deadline_header": "x deadline"}, ValueError, "deadline_header"),
        ({"deadline_header": b"x-deadline"}, TypeError, "deadline_header"),
        ({"add_idempotency_keys": 1}, TypeError, "add_idempotency_keys"),
        ({"idempotency_header": "Idempotency:Key"}, ValueError, "idempotency_header"),
        ({"idempotency_header": None}, TypeError, "idempotency_header"),
        ({"name": ""}, ValueError, "name"),
        ({"rng": 42}, TypeError, "rng"),
        ({"per_host": sw.CircuitBreaker(name="not-a-factory")}, TypeError, "per_host"),
        ({"max_hosts": 0}, ValueError, "max_hosts"),
        ({"max_hosts": 1.5}, TypeError, "max_hosts"),
    ],
)
def test_bad_options_are_rejected_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], param: str
) -> None:
    with pytest.raises(error, match=param):
        ResilientTransport(**options)
