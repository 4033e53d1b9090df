"""The gRPC interceptors against a real ``grpc.aio`` server on a free port.

Each test starts its own server in its own event loop (grpc.aio is asyncio
only, so these tests run on asyncio, on the real clock): a service whose
methods fail, push back, hang or stream as each request asks, and record
what they saw. Waits are tenths of a second; anything the test waits for it
polls for with a bound of seconds.
"""

from __future__ import annotations

import asyncio
import json
import math
import pickle
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc import aio
from opentelemetry.trace import SpanKind

import stalwart as sw
from stalwart.grpc import (
    BidiStreamingInterceptor,
    ClientInterceptor,
    ClientStreamingInterceptor,
    RetryableRpcError,
    RpcBulkheadFull,
    RpcCircuitOpen,
    RpcDeadlineExceeded,
    RpcRateLimited,
    ServerInterceptor,
    parse_pushback,
    service_of,
)

from .conftest import Spans

pytestmark = pytest.mark.realtime

# No backoff of its own, but room for the server's hints: a hint longer than
# the backoff's maximum stops the retries (contract v2).
NO_WAIT = sw.Backoff(initial=0.0, maximum=5.0)
# A server's time_remaining() can exceed the timeout its caller set by a few
# milliseconds (grpc measures the two ends against different clocks).
SKEW = 0.05
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def anyio_backend() -> str:
    """grpc.aio runs on asyncio only; the real clock: the server is real."""
    return "asyncio"


@dataclass
class Hit:
    remaining: float | None
    time_remaining: float | None
    metadata: dict[str, str]
    at: float


@dataclass
class Service:
    """What the server saw, by request ``key``; and the calls it saw cancelled."""

    hits: dict[str, list[Hit]] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    downstream: Any = None  # a channel's method, for the middle hop

    def record(self, ask: dict[str, Any], context: aio.ServicerContext[Any, Any]) -> int:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        seen = self.hits.setdefault(ask["key"], [])
        hit = Hit(
            sw.remaining(), context.time_remaining(), metadata, asyncio.get_running_loop().time()
        )
        seen.append(hit)
        return len(seen)

    async def unary(self, request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        ask = json.loads(request)
        hit = self.record(ask, context)
        if hit <= ask.get("fail", 0):
            trailing = [("grpc-retry-pushback-ms", ask["pushback"])] if "pushback" in ask else []
            await context.abort(
                grpc.StatusCode[ask.get("code", "UNAVAILABLE")], "busy", tuple(trailing)
            )
        if "raise" in ask:
            raise _ERRORS[ask["raise"]]()
        if "sleep" in ask:
            try:
                await asyncio.sleep(ask["sleep"])
            except asyncio.CancelledError:
                self.cancelled.add(ask["key"])
                raise
        if "forward" in ask and self.downstream is not None:
            answer = await self.downstream(json.dumps(ask["forward"]).encode())
            return bytes(answer)
        return json.dumps(
            {"hit": hit, "remaining": sw.remaining(), "pad": "x" * ask.get("pad", 0)}
        ).encode()

    async def stream(
        self, request: bytes, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        ask = json.loads(request)
        hit = self.record(ask, context)
        if hit <= ask.get("fail", 0):
            await context.abort(UNAVAILABLE, "busy before the first message")
        if hit <= ask.get("slow", 0):
            await asyncio.sleep(30)  # until the caller gives up on this attempt
        for i in range(ask.get("messages", 3)):
            if i == ask.get("break_at"):
                await context.abort(UNAVAILABLE, "broke mid-stream")
            if i:
                await asyncio.sleep(ask.get("pause", 0))
            yield f"{hit}:{i}".encode()

    async def collect(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Client-streaming: every request read, then one answer."""
        asks = [json.loads(request) async for request in requests]
        hit = self.record(asks[0], context)
        if hit <= asks[0].get("fail", 0):
            await context.abort(UNAVAILABLE, "busy")
        return json.dumps({"hit": hit, "count": len(asks)}).encode()

    async def chat(
        self, requests: AsyncIterator[bytes], context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Bidirectional: an answer to each request."""
        async for request in requests:
            hit = self.record(json.loads(request), context)
            yield f"{hit}".encode()


_ERRORS: dict[str, Callable[[], Exception]] = {
    "circuit": lambda: sw.CircuitOpenError("db is down", policy="db", retry_after=1.25),
    "bulkhead": lambda: sw.BulkheadFullError("no slot", policy="pool"),
    "rate": lambda: sw.RateLimitExceeded("slow down", policy="limit", retry_after=None),
    "timeout": lambda: sw.DeadlineExceeded("too slow", policy="db-timeout", timeout=0.5),
    "other": lambda: LookupError("not a stalwart error"),
}


@dataclass
class Server:
    service: Service
    target: str
    keys: int = 0

    def key(self) -> str:
        self.keys += 1
        return f"k{self.keys}"

    def hits(self, key: str) -> list[Hit]:
        return self.service.hits.get(key, [])


def _handlers(service: Service, name: str) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        name,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(service.unary),
            "Stream": grpc.unary_stream_rpc_method_handler(service.stream),
            "Collect": grpc.stream_unary_rpc_method_handler(service.collect),
            "Chat": grpc.stream_stream_rpc_method_handler(service.chat),
        },
    )


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    service = Service()
    grpc_server = aio.server(interceptors=[ServerInterceptor()])
    grpc_server.add_generic_rpc_handlers(
        (_handlers(service, "test.Flaky"), _handlers(service, "test.Other"))
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield Server(service, f"127.0.0.1:{port}")
    finally:
        await grpc_server.stop(None)


def call_details(method: str) -> aio.ClientCallDetails:
    """What grpc gives an interceptor (the method as bytes, as grpc itself sends it)."""
    raw: Any = method.encode()
    return aio.ClientCallDetails(raw, None, None, None, None)


def ask(key: str, **options: Any) -> bytes:
    return json.dumps({"key": key, **options}).encode()


def channel(server: Server, interceptor: ClientInterceptor | None = None) -> aio.Channel:
    interceptors = [] if interceptor is None else [interceptor, interceptor.streaming]
    return aio.insecure_channel(server.target, interceptors=interceptors)


def unary(ch: aio.Channel, service: str = "test.Flaky") -> Callable[..., Any]:
    return ch.unary_unary(f"/{service}/Unary")


def stream(ch: aio.Channel) -> Callable[..., Any]:
    return ch.unary_stream("/test.Flaky/Stream")


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``condition`` until it holds, for at most ``within`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not condition():
        assert loop.time() < end, "the condition never held"
        await asyncio.sleep(0.01)


# -- retries and pushback --------------------------------------------------------------


async def test_unavailable_is_retried_until_the_server_answers(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor(sw.Retry(attempts=3, backoff=NO_WAIT))) as ch:
        answer = json.loads(await unary(ch)(ask(key, fail=2)))
    assert answer["hit"] == 3


async def test_resource_exhausted_is_retried_by_default(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor(sw.Retry(attempts=2, backoff=NO_WAIT))) as ch:
        answer = json.loads(await unary(ch)(ask(key, fail=1, code="RESOURCE_EXHAUSTED")))
    assert answer["hit"] == 2


async def test_the_last_status_reaches_the_caller_after_the_last_attempt(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor(sw.Retry(attempts=3, backoff=NO_WAIT))) as ch:
        call = unary(ch)(ask(key, fail=5, pushback="0"))
        with pytest.raises(aio.AioRpcError) as failed:
            await call
        assert await call.code() == UNAVAILABLE
        assert ("grpc-retry-pushback-ms", "0") in tuple(await call.trailing_metadata())
    assert failed.value.code() == UNAVAILABLE
    assert failed.value.details() == "busy"
    assert not isinstance(failed.value, sw.StalwartError)
    assert len(server.hits(key)) == 3


async def test_a_status_not_in_retry_codes_is_the_answer(server: Server) -> None:
    key = server.key()
    breaker = sw.CircuitBreaker(consecutive_failures=1, name="grpc-not-found")
    policy = sw.Pipeline(sw.Retry(attempts=3, backoff=NO_WAIT), breaker)
    async with channel(server, ClientInterceptor(policy)) as ch:
        with pytest.raises(aio.AioRpcError) as failed:
            await unary(ch)(ask(key, fail=1, code="NOT_FOUND"))
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(server.hits(key)) == 1
    assert breaker.state is sw.CircuitState.CLOSED  # the server answered: not a failure


async def test_a_message_too_large_is_not_retried(server: Server) -> None:
    # grpc says RESOURCE_EXHAUSTED for it, but another attempt fails the same way.
    key = server.key()
    interceptor = ClientInterceptor(sw.Retry(attempts=3, backoff=NO_WAIT))
    small = [("grpc.max_receive_message_length", 1000)]
    async with aio.insecure_channel(server.target, interceptors=[interceptor], options=small) as ch:
        with pytest.raises(aio.AioRpcError) as failed:
            await unary(ch)(ask(key, pad=5000))
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (failed.value.details() or "")
    assert len(server.hits(key)) == 1


async def test_retry_codes_are_configurable(server: Server) -> None:
    key = server.key()
    interceptor = ClientInterceptor(
        sw.Retry(attempts=2, backoff=NO_WAIT), retry_codes={grpc.StatusCode.INTERNAL}
    )
    async with channel(server, interceptor) as ch:
        answer = json.loads(await unary(ch)(ask(key, fail=1, code="INTERNAL")))
        assert answer["hit"] == 2
        with pytest.raises(aio.AioRpcError):
            await unary(ch)(ask(other := server.key(), fail=1))
    assert len(server.hits(other)) == 1  # UNAVAILABLE is no longer retried


async def test_the_pushback_is_waited_out(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor(sw.Retry(attempts=2, backoff=NO_WAIT))) as ch:
        await unary(ch)(ask(key, fail=1, pushback="200"))
    first, second = server.hits(key)
    assert second.at - first.at >= 0.2


async def test_a_negative_pushback_means_do_not_retry(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor()) as ch:
        with pytest.raises(aio.AioRpcError) as failed:
            await unary(ch)(ask(key, fail=5, pushback="-1"))
    assert failed.value.code() == UNAVAILABLE
    assert len(server.hits(key)) == 1


async def test_a_malformed_pushback_means_do_not_retry(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor()) as ch:
        with pytest.raises(aio.AioRpcError):
            await unary(ch)(ask(key, fail=5, pushback="soon"))
    assert len(server.hits(key)) == 1


async def test_the_default_policy_retries_three_times(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor()) as ch:
        answer = json.loads(await unary(ch)(ask(key, fail=2, pushback="1")))
    assert answer["hit"] == 3


async def test_the_pushback_reaches_a_policy_as_retry_after(server: Server) -> None:
    key = server.key()
    seen: list[RetryableRpcError] = []

    def retry_on(error: BaseException) -> bool:
        assert isinstance(error, RetryableRpcError)
        seen.append(error)
        return True

    interceptor = ClientInterceptor(sw.Retry(attempts=2, on=retry_on, backoff=NO_WAIT))
    async with channel(server, interceptor) as ch:
        await unary(ch)(ask(key, fail=1, pushback="30"))
    [error] = seen
    assert error.retry_after == 0.03
    assert error.code() == UNAVAILABLE
    assert isinstance(error, aio.AioRpcError)


# -- per-target breakers ---------------------------------------------------------------


async def test_each_service_gets_its_own_breaker(server: Server) -> None:
    breakers: dict[str, sw.CircuitBreaker] = {}

    def per_target(target: str) -> sw.CircuitBreaker:
        breaker = breakers[target] = sw.CircuitBreaker(
            consecutive_failures=2, name=f"grpc-test {target}"
        )
        return breaker

    interceptor = ClientInterceptor(sw.Retry(attempts=1), per_target=per_target)
    down, up = server.key(), server.key()
    async with channel(server, interceptor) as ch:
        for _ in range(2):
            with pytest.raises(aio.AioRpcError):
                await unary(ch)(ask(down, fail=99))
        with pytest.raises(sw.CircuitOpenError) as rejected:
            await unary(ch)(ask(down, fail=99))
        for _ in range(3):
            await unary(ch, "test.Other")(ask(up))
    assert isinstance(rejected.value, aio.AioRpcError)
    assert rejected.value.code() == UNAVAILABLE
    assert breakers["test.Flaky"].state is sw.CircuitState.OPEN
    assert breakers["test.Other"].state is sw.CircuitState.CLOSED
    assert len(server.hits(down)) == 2  # the open breaker sent nothing
    assert len(server.hits(up)) == 3
    assert set(interceptor.target_policies) == {"test.Flaky", "test.Other"}


async def test_a_target_longer_than_a_call_key_gets_its_policy(server: Server) -> None:
    service = "test." + "a" * 300  # a proto package and service name: no bound on either
    made: list[str] = []

    def per_target(target: str) -> sw.Policy:
        made.append(target)
        return sw.Bulkhead(4, name="grpc-long")

    interceptor = ClientInterceptor(sw.Retry(attempts=1), per_target=per_target)
    async with channel(server, interceptor) as ch:
        with pytest.raises(aio.AioRpcError) as info:
            await unary(ch, service)(ask(server.key()))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # the server's, not a ValueError
    assert made == [service]
    assert list(interceptor.target_policies) == [service]


async def test_targets_can_be_keyed_per_method(server: Server) -> None:
    made: list[str] = []

    def per_target(target: str) -> sw.Policy:
        made.append(target)
        return sw.Bulkhead(4, name=f"grpc-test {target}")

    interceptor = ClientInterceptor(per_target=per_target, target=lambda method: method)
    async with channel(server, interceptor) as ch:
        await unary(ch)(ask(server.key()))
        await unary(ch)(ask(server.key()))
        async for _ in stream(ch)(ask(server.key())):
            pass
    assert made == ["/test.Flaky/Unary", "/test.Flaky/Stream"]


async def test_the_least_recently_used_target_is_dropped(server: Server) -> None:
    interceptor = ClientInterceptor(
        per_target=lambda target: sw.Bulkhead(4, name=f"grpc-lru {target}"), max_targets=1
    )
    async with channel(server, interceptor) as ch:
        await unary(ch)(ask(server.key()))
        await unary(ch, "test.Other")(ask(server.key()))
    assert list(interceptor.target_policies) == ["test.Other"]
    assert isinstance(interceptor.per_target, sw.PerKey)
    assert [target for target, _ in interceptor.per_target.items()] == ["test.Other"]
    assert ClientInterceptor().per_target is None


# -- deadlines -------------------------------------------------------------------------


async def test_the_ambient_deadline_is_the_calls_timeout(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor()) as ch:
        with sw.deadline(2.0):
            await unary(ch)(ask(key))
    [hit] = server.hits(key)
    assert hit.time_remaining is not None
    assert hit.remaining is not None
    assert 1.0 < hit.remaining <= 2.0 + SKEW  # the server's handler runs under it
    assert abs(hit.remaining - hit.time_remaining) < 0.5


async def test_a_nearer_explicit_timeout_wins(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor()) as ch:
        with sw.deadline(30.0):
            await unary(ch)(ask(key), timeout=1.0)
    [hit] = server.hits(key)
    assert hit.remaining is not None
    assert hit.remaining <= 1.0 + SKEW


async def test_without_a_deadline_the_server_runs_without_one(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor()) as ch:
        await unary(ch)(ask(key))
    [hit] = server.hits(key)
    assert hit.remaining is None


async def test_a_middle_service_passes_the_deadline_on(server: Server) -> None:
    first, second = server.key(), server.key()
    async with channel(server, ClientInterceptor()) as onward:
        server.service.downstream = unary(onward)
        async with channel(server, ClientInterceptor()) as ch:
            with sw.deadline(3.0):
                await unary(ch)(ask(first, sleep=0.2, forward={"key": second}))
    [outer], [inner] = server.hits(first), server.hits(second)
    assert outer.remaining is not None
    assert inner.remaining is not None
    # What was left after the middle's work (the clocks agree to a millisecond).
    assert inner.remaining < outer.remaining - 0.19
    assert inner.remaining > 1.0


async def test_the_server_sees_the_call_cancelled_when_the_deadline_passes(
    server: Server,
) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor()) as ch:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(sw.DeadlineExceeded), sw.deadline(0.3):
            await unary(ch)(ask(key, sleep=30))
        assert loop.time() - start < 5.0
        await eventually(lambda: key in server.service.cancelled)


async def test_an_attempt_cut_by_a_timeout_is_retried(server: Server) -> None:
    key = server.key()
    policy = sw.Pipeline(sw.Retry(attempts=2, backoff=NO_WAIT), sw.Timeout(0.2))
    async with channel(server, ClientInterceptor(policy)) as ch:
        with pytest.raises(RpcDeadlineExceeded) as failed:
            await unary(ch)(ask(key, sleep=30))
        await eventually(lambda: len(server.hits(key)) == 2 and key in server.service.cancelled)
    assert isinstance(failed.value, sw.DeadlineExceeded)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failed.value.policy == "timeout"


async def test_a_caller_whose_deadline_passed_sends_nothing() -> None:
    sent: list[Any] = []

    async def continuation(details: Any, request: Any) -> Any:
        sent.append(details)

    details = call_details("/test.Flaky/Unary")
    interceptor = ClientInterceptor()
    with pytest.raises(RpcDeadlineExceeded) as failed, sw.deadline(0.0):
        await interceptor.intercept_unary_unary(continuation, details, b"")
    assert sent == []
    assert failed.value.policy == "grpc"
    assert "not called" in (failed.value.details() or "")


# -- streaming -------------------------------------------------------------------------


async def test_a_stream_failing_before_its_first_message_is_retried(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor(sw.Retry(attempts=3, backoff=NO_WAIT))) as ch:
        messages = [m async for m in stream(ch)(ask(key, fail=2))]
    assert messages == [b"3:0", b"3:1", b"3:2"]


async def test_a_stream_is_never_retried_after_its_first_message(server: Server) -> None:
    key = server.key()
    received: list[bytes] = []
    async with channel(server, ClientInterceptor(sw.Retry(attempts=3, backoff=NO_WAIT))) as ch:
        call = stream(ch)(ask(key, break_at=1))
        with pytest.raises(aio.AioRpcError) as failed:
            async for message in call:
                received.append(message)  # noqa: PERF401 - kept when the stream breaks
        assert await call.code() == UNAVAILABLE
    assert received == [b"1:0"]
    assert failed.value.details() == "broke mid-stream"
    assert len(server.hits(key)) == 1


async def test_a_stream_read_with_read_gives_every_message(server: Server) -> None:
    async with channel(server, ClientInterceptor()) as ch:
        call = stream(ch)(ask(server.key(), messages=2))
        got = [await call.read(), await call.read(), await call.read()]
        assert await call.code() == grpc.StatusCode.OK
    assert got == [b"1:0", b"1:1", aio.EOF]


async def test_an_empty_stream_ends_at_once(server: Server) -> None:
    async with channel(server, ClientInterceptor()) as ch:
        assert [m async for m in stream(ch)(ask(server.key(), messages=0))] == []


async def test_a_stream_carries_the_deadline(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor()) as ch:
        with sw.deadline(2.0):
            [m async for m in stream(ch)(ask(key))]
    [hit] = server.hits(key)
    assert hit.time_remaining is not None
    assert hit.time_remaining <= 2.0 + SKEW


async def test_a_streams_timeout_is_the_callers_deadline_not_the_policys(
    server: Server,
) -> None:
    # The policy's Timeout bounds an attempt, which ends with the first
    # message: the stream itself is the caller's, under the caller's deadline.
    first, second = server.key(), server.key()
    policy = sw.Pipeline(sw.Retry(attempts=2, backoff=NO_WAIT), sw.Timeout(0.5))
    async with channel(server, ClientInterceptor(policy)) as ch:
        [m async for m in stream(ch)(ask(first))]
        with sw.deadline(3.0):
            [m async for m in stream(ch)(ask(second))]
    [without], [under] = server.hits(first), server.hits(second)
    assert without.time_remaining is None
    assert without.remaining is None
    assert under.remaining is not None
    assert 1.0 < under.remaining <= 3.0 + SKEW  # not the Timeout's 0.5 s


async def test_a_stream_outlives_the_policys_timeout(server: Server) -> None:
    key = server.key()
    policy = sw.Pipeline(sw.Retry(attempts=2, backoff=NO_WAIT), sw.Timeout(0.5))
    async with channel(server, ClientInterceptor(policy)) as ch:
        messages = [m async for m in stream(ch)(ask(key, pause=0.35))]
    assert messages == [b"1:0", b"1:1", b"1:2"]  # 0.7 s of stream, past the Timeout


async def test_a_stream_that_has_not_begun_within_the_timeout_is_retried(
    server: Server,
) -> None:
    key = server.key()
    policy = sw.Pipeline(sw.Retry(attempts=2, backoff=NO_WAIT), sw.Timeout(0.5))
    async with channel(server, ClientInterceptor(policy)) as ch:
        messages = [m async for m in stream(ch)(ask(key, slow=1))]
    assert messages == [b"2:0", b"2:1", b"2:2"]


async def test_a_stream_whose_retries_run_out_fails_with_its_status(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor(sw.Retry(attempts=2, backoff=NO_WAIT))) as ch:
        with pytest.raises(aio.AioRpcError) as failed:
            [m async for m in stream(ch)(ask(key, fail=9))]
    assert failed.value.code() == UNAVAILABLE
    assert len(server.hits(key)) == 2


async def test_a_retried_streams_attempt_is_sent_with_what_is_left_of_the_deadline(
    server: Server,
) -> None:
    key = server.key()
    wait = sw.Backoff(initial=0.5, maximum=0.5, jitter="none")
    async with channel(server, ClientInterceptor(sw.Retry(attempts=2, backoff=wait))) as ch:
        with sw.deadline(3.0):
            assert [m async for m in stream(ch)(ask(key, fail=1))] == [b"2:0", b"2:1", b"2:2"]
    first, second = server.hits(key)
    assert first.time_remaining is not None
    assert second.time_remaining is not None
    waited = second.at - first.at
    assert waited >= 0.5
    # Not the 3 s the first attempt had: what was left of them when it was sent.
    assert second.time_remaining <= 3.0 - waited + SKEW


async def test_a_stream_whose_deadline_passes_before_its_first_message_raises_it() -> None:
    # As for a unary call: when grpc's timer ends the stream at the caller's
    # deadline (a hair before stalwart's), the caller's deadline reports it.
    late = aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED, aio.Metadata(), aio.Metadata(), "Deadline Exceeded"
    )

    class TimedOutStream:
        ended = False

        async def read(self) -> Any:
            if not self.ended:  # then a done call: its status at once
                self.ended = True
                await asyncio.sleep(0.28)  # grpc's timer, for a timeout of 0.3 s
            raise late

        def cancel(self) -> None:
            return None

        def done(self) -> bool:
            return True

    async def continuation(details: Any, request: Any) -> Any:
        return TimedOutStream()

    interceptor = ClientInterceptor(sw.Retry(attempts=1))
    details = call_details("/test.Flaky/Stream")
    with pytest.raises(sw.DeadlineExceeded), sw.deadline(0.3):
        messages = await interceptor.streaming.intercept_unary_stream(continuation, details, b"")
        [m async for m in messages]


# -- stalwart's errors both ways -------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code", "pushback"),
    [
        ("circuit", grpc.StatusCode.UNAVAILABLE, "1250"),
        ("bulkhead", grpc.StatusCode.RESOURCE_EXHAUSTED, None),
        ("rate", grpc.StatusCode.RESOURCE_EXHAUSTED, None),
        ("timeout", grpc.StatusCode.DEADLINE_EXCEEDED, None),
    ],
)
async def test_a_stalwart_error_escaping_a_handler_becomes_its_status(
    server: Server, error: str, code: grpc.StatusCode, pushback: str | None
) -> None:
    async with channel(server) as ch:
        call = unary(ch)(ask(server.key(), **{"raise": error}))
        with pytest.raises(aio.AioRpcError) as failed:
            await call
    assert failed.value.code() == code
    details = failed.value.details() or ""
    raised = _ERRORS[error]()
    assert repr(raised.policy) in details  # type: ignore[attr-defined]
    assert str(raised) not in details  # the message may name internal hosts
    assert "Traceback" not in details
    trailing = dict(failed.value.trailing_metadata() or ())
    assert trailing.get("grpc-retry-pushback-ms") == pushback


async def test_other_errors_escaping_a_handler_are_left_to_grpc(server: Server) -> None:
    async with channel(server) as ch:
        with pytest.raises(aio.AioRpcError) as failed:
            await unary(ch)(ask(server.key(), **{"raise": "other"}))
    assert failed.value.code() == grpc.StatusCode.UNKNOWN


async def test_a_handler_past_its_deadline_ends_with_deadline_exceeded(server: Server) -> None:
    key = server.key()
    async with channel(server) as ch:
        with pytest.raises(aio.AioRpcError) as failed:
            await unary(ch)(ask(key, sleep=30), timeout=0.3)
        await eventually(lambda: key in server.service.cancelled)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_a_servers_refusal_is_retried_after_its_pushback(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor(sw.Retry(attempts=2, backoff=NO_WAIT))) as ch:
        with pytest.raises(aio.AioRpcError) as failed:
            await unary(ch)(ask(key, **{"raise": "circuit"}))
    first, second = server.hits(key)
    assert second.at - first.at >= 1.25
    assert failed.value.code() == UNAVAILABLE


async def test_an_open_breaker_is_an_unavailable_call_error() -> None:
    breaker = sw.CircuitBreaker(name="grpc-forced")
    breaker.force_open()
    interceptor = ClientInterceptor(breaker)

    async def never(details: Any, request: Any) -> Any:
        raise AssertionError("the breaker is open: nothing is sent")

    details = call_details("/test.Flaky/Unary")
    with pytest.raises(RpcCircuitOpen) as rejected:
        await interceptor.intercept_unary_unary(never, details, b"")
    error = rejected.value
    assert isinstance(error, sw.CircuitOpenError)
    assert isinstance(error, aio.AioRpcError)
    assert error.code() == UNAVAILABLE
    assert error.policy == "grpc-forced"
    assert error.retry_after > 0
    assert error.details() == str(error.__cause__) == "circuit breaker 'grpc-forced' is open"


@pytest.mark.parametrize(
    ("raised", "kind", "code"),
    [
        (sw.BulkheadFullError("full", policy="b"), RpcBulkheadFull, "RESOURCE_EXHAUSTED"),
        (
            sw.RateLimitExceeded("slow", policy="r", retry_after=2.0),
            RpcRateLimited,
            "RESOURCE_EXHAUSTED",
        ),
        (
            sw.DeadlineExceeded("late", policy="t", timeout=1.0),
            RpcDeadlineExceeded,
            "DEADLINE_EXCEEDED",
        ),
    ],
)
async def test_stalwart_errors_escape_as_call_errors(
    raised: sw.StalwartError, kind: type[aio.AioRpcError], code: str
) -> None:
    async def refuses(details: Any, request: Any) -> Any:
        raise raised  # as a policy inside the channel's own would

    details = call_details("/test.Flaky/Unary")
    with pytest.raises(kind) as escaped:
        await ClientInterceptor(sw.Retry(attempts=1)).intercept_unary_unary(refuses, details, b"")
    error = escaped.value
    assert isinstance(error, type(raised))
    assert error.code() == grpc.StatusCode[code]
    assert error.policy == raised.policy
    assert error.__cause__ is raised
    assert error.debug_error_string() == f"{code}:{raised} (stalwart {kind.__name__})"
    assert "None" not in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is kind
    assert isinstance(copy, sw.StalwartError)
    assert copy.code() == error.code()
    assert copy.policy == raised.policy


# -- trace context ---------------------------------------------------------------------


async def test_the_servers_spans_join_the_callers_trace(
    server: Server, spans: Spans, telemetry: sw.Telemetry
) -> None:
    tracer = spans.provider.get_tracer("test")
    seen: list[Any] = []

    async def traced(request: bytes, context: aio.ServicerContext[Any, Any]) -> bytes:
        with tracer.start_as_current_span("handler", kind=SpanKind.SERVER) as span:
            seen.append(span.get_span_context())
        return b"ok"

    grpc_server = aio.server(interceptors=[ServerInterceptor()])
    grpc_server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Traced", {"Unary": grpc.unary_unary_rpc_method_handler(traced)}
            ),
        )
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        interceptor = ClientInterceptor(sw.Retry(attempts=2, name="traced", telemetry=telemetry))
        async with aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[interceptor]) as ch:
            with tracer.start_as_current_span("caller") as caller:
                method: Any = ch.unary_unary("/test.Traced/Unary")
                await method(b"")
    finally:
        await grpc_server.stop(None)
    [handler] = seen
    assert handler.trace_id == caller.get_span_context().trace_id
    [retry_span] = spans.named("stalwart.retry traced")
    assert retry_span.context is not None
    [handler_span] = spans.named("handler")
    assert handler_span.parent is not None
    assert handler_span.parent.span_id == retry_span.context.span_id


async def test_a_call_that_carries_a_traceparent_keeps_it(server: Server, spans: Spans) -> None:
    key = server.key()
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    tracer = spans.provider.get_tracer("test")
    async with channel(server, ClientInterceptor()) as ch:
        with tracer.start_as_current_span("caller"):
            await unary(ch)(ask(key), metadata=(("traceparent", given),))
    [hit] = server.hits(key)
    assert hit.metadata["traceparent"] == given


async def test_no_trace_no_metadata(server: Server) -> None:
    key = server.key()
    async with channel(server, ClientInterceptor()) as ch:
        await unary(ch)(ask(key))
    [hit] = server.hits(key)
    assert "traceparent" not in hit.metadata


# -- calls that stream requests --------------------------------------------------------


async def requests(*asks: bytes) -> AsyncIterator[bytes]:
    for one in asks:
        yield one


async def test_every_kind_of_call_is_intercepted_by_the_channel_interceptors(
    server: Server, spans: Spans
) -> None:
    interceptor = ClientInterceptor()
    kinds = [type(half).__name__ for half in interceptor.channel_interceptors]
    assert kinds == [
        "ClientInterceptor",
        "StreamingInterceptor",
        "ClientStreamingInterceptor",
        "BidiStreamingInterceptor",
    ]
    assert repr(interceptor.client_streaming).endswith(".client_streaming")
    assert repr(interceptor.bidi_streaming).endswith(".bidi_streaming")
    collected, chatted = server.key(), server.key()
    tracer = spans.provider.get_tracer("test")
    async with aio.insecure_channel(
        server.target, interceptors=interceptor.channel_interceptors
    ) as ch:
        collect: Any = ch.stream_unary("/test.Flaky/Collect")
        chat: Any = ch.stream_stream("/test.Flaky/Chat")
        with sw.deadline(3.0), tracer.start_as_current_span("caller") as caller:
            answer = await collect(requests(ask(collected), ask(collected)))
            replies = [reply async for reply in chat(requests(ask(chatted), ask(chatted)))]
    assert json.loads(answer) == {"hit": 1, "count": 2}
    assert replies == [b"1", b"2"]
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    for key in (collected, chatted):
        hit = server.hits(key)[0]
        assert hit.remaining is not None
        assert 1.0 < hit.remaining <= 3.0 + SKEW  # the caller's deadline, on the server
        assert hit.metadata["traceparent"].split("-")[1] == trace_id


async def test_a_call_that_streams_requests_is_sent_once_never_retried(server: Server) -> None:
    key = server.key()
    interceptor = ClientInterceptor(sw.Retry(attempts=3, backoff=NO_WAIT))
    async with aio.insecure_channel(
        server.target, interceptors=interceptor.channel_interceptors
    ) as ch:
        collect: Any = ch.stream_unary("/test.Flaky/Collect")
        with pytest.raises(aio.AioRpcError) as failed:
            await collect(requests(ask(key, fail=1)))
    assert failed.value.code() == UNAVAILABLE
    assert len(server.hits(key)) == 1


@pytest.mark.parametrize(
    ("half", "method"),
    [("client_streaming", "intercept_stream_unary"), ("bidi_streaming", "intercept_stream_stream")],
)
async def test_a_call_that_streams_requests_is_not_sent_with_no_time_left(
    half: str, method: str
) -> None:
    sent: list[Any] = []

    async def continuation(details: Any, request: Any) -> Any:
        sent.append(details)

    details = call_details("/test.Flaky/Chat")
    intercept = getattr(getattr(ClientInterceptor(name="orders"), half), method)
    with pytest.raises(RpcDeadlineExceeded) as refused, sw.deadline(0.0):
        await intercept(continuation, details, requests())
    assert sent == []
    assert refused.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert refused.value.policy == "orders"
    assert "not called" in (refused.value.details() or "")


def test_the_request_streaming_halves_take_only_a_client_interceptor() -> None:
    for half in (ClientStreamingInterceptor, BidiStreamingInterceptor):
        with pytest.raises(TypeError, match="must be a ClientInterceptor, not str"):
            half("policy")  # type: ignore[arg-type]


# -- the pieces ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("250", 0.25),
        (b"1000", 1.0),
        ("-1", math.inf),
        ("1.5", math.inf),
        ("soon", math.inf),
        ("", math.inf),
        (" 5", math.inf),
        ("12345678901", math.inf),
        (b"\xff", math.inf),
    ],
)
def test_parse_pushback(value: str | bytes, seconds: float) -> None:
    assert parse_pushback(value) == seconds


def test_service_of() -> None:
    assert service_of("/shop.Inventory/Reserve") == "shop.Inventory"
    assert service_of("odd") == "odd"


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"retry_codes": [grpc.StatusCode.OK]}, ValueError, "retry_codes"),
        ({"retry_codes": ["UNAVAILABLE"]}, TypeError, "retry_codes"),
        ({"retry_codes": "UNAVAILABLE"}, TypeError, "retry_codes"),
        ({"per_target": sw.Retry()}, TypeError, "per_target"),
        ({"per_target": 3}, TypeError, "per_target"),
        ({"target": "service"}, TypeError, "target"),
        ({"max_targets": 0}, ValueError, "max_targets"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_bad_options_are_refused_at_construction(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ClientInterceptor(**options)


def test_a_policy_must_be_a_policy() -> None:
    with pytest.raises(TypeError, match="policy"):
        ClientInterceptor("retry")  # type: ignore[arg-type]


async def test_a_per_target_factory_must_return_a_policy() -> None:
    interceptor = ClientInterceptor(per_target=lambda target: "breaker")  # type: ignore[arg-type,return-value]

    async def continuation(details: Any, request: Any) -> Any:
        raise AssertionError("no call is made")

    with pytest.raises(TypeError, match=r"per_target must return a stalwart policy.*a\.B"):
        await interceptor.intercept_unary_unary(continuation, call_details("/a.B/C"), b"")


def test_the_server_interceptors_default_timeout_is_validated() -> None:
    with pytest.raises(ValueError, match="default_timeout"):
        ServerInterceptor(default_timeout=0)


async def test_a_default_timeout_applies_to_calls_without_a_deadline() -> None:
    service = Service()
    grpc_server = aio.server(interceptors=[ServerInterceptor(default_timeout=5.0)])
    grpc_server.add_generic_rpc_handlers((_handlers(service, "test.Flaky"),))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await unary(ch)(ask("k"))
    finally:
        await grpc_server.stop(None)
    [hit] = service.hits["k"]
    assert hit.remaining is not None
    assert 4.0 < hit.remaining <= 5.0


# -- a server's own DEADLINE_EXCEEDED ----------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [
        pytest.param(None, id="default-policy"),
        pytest.param(
            sw.Pipeline(sw.Retry(attempts=2, backoff=NO_WAIT), sw.Timeout(3.0)), id="with-timeout"
        ),
    ],
)
async def test_a_servers_deadline_exceeded_with_time_left_is_its_answer(
    server: Server, policy: sw.Policy | None
) -> None:
    # The server's own deadline passed (a downstream call's, say) long before
    # the caller's: the caller gets that answer at once, not after waiting
    # out its own deadline.
    key = server.key()
    async with channel(server, ClientInterceptor(policy)) as ch:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with sw.deadline(3.0), pytest.raises(aio.AioRpcError) as failed:
            await unary(ch)(ask(key, fail=1, code="DEADLINE_EXCEEDED"))
        assert loop.time() - start < 1.0
    assert not isinstance(failed.value, sw.DeadlineExceeded)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert failed.value.details() == "busy"
    assert len(server.hits(key)) == 1


@pytest.mark.parametrize(
    ("retry_after", "text"),
    [
        (None, "UNAVAILABLE: down"),
        (0.25, "UNAVAILABLE: down (pushback 0.25s)"),
        (math.inf, "UNAVAILABLE: down (pushback: do not retry)"),
    ],
)
def test_a_retryable_rpc_error_reads_in_one_line(retry_after: float | None, text: str) -> None:
    # What a retry event (and `stalwart.events.log_to`) shows of it.
    error = aio.AioRpcError(UNAVAILABLE, aio.Metadata(), aio.Metadata(), "down", "debug")
    retryable = RetryableRpcError(error, call=None, retry_after=retry_after)
    assert str(retryable) == text
    assert retryable.code() == UNAVAILABLE
    assert retryable.details() == "down"


def test_a_retryable_rpc_error_pickles_without_its_call() -> None:
    # A RetryGaveUp event carrying it can be sent to another process.
    metadata = aio.Metadata(("retry-hint", "1"))
    error = aio.AioRpcError(UNAVAILABLE, metadata, aio.Metadata(), "down", "debug")
    retryable = RetryableRpcError(error, call=object(), retry_after=0.25)
    copy = pickle.loads(pickle.dumps(retryable))
    assert type(copy) is RetryableRpcError
    assert copy.call is None
    assert copy.retry_after == 0.25
    assert (copy.code(), copy.details(), copy.debug_error_string()) == (
        UNAVAILABLE,
        "down",
        "debug",
    )
    assert copy.initial_metadata() == metadata
    assert str(copy) == str(retryable)
