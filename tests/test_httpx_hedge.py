"""ResilientTransport(hedge=...): what is hedged, per host, and losing responses closed.

In virtual time on asyncio and trio, against an ``httpx.MockTransport`` whose
handler sleeps; the loopback tests (tests/test_hedge_loopback.py) check the
same over a real connection pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.httpx import ResilientTransport

from .conftest import sample

pytestmark = pytest.mark.anyio


class Body(httpx.AsyncByteStream):
    """A response body that records whether it was closed."""

    def __init__(self, closed: list[int], n: int) -> None:
        self.closed = closed
        self.n = n

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield str(self.n).encode()

    async def aclose(self) -> None:
        self.closed.append(self.n)


class Upstream:
    """Each request to a host takes that host's next latency; records what it saw."""

    def __init__(self, latencies: dict[str, list[float]], status: int = 200) -> None:
        self.latencies = latencies
        self.status = status
        self.seen: list[tuple[str, str, float]] = []
        self.cancelled = 0
        self.closed: list[int] = []
        self.gate: anyio.Event | None = None

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        n = sum(1 for h, _, _ in self.seen if h == host)
        self.seen.append((host, request.method, anyio.current_time()))
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                latencies = self.latencies[host]
                await anyio.sleep(latencies[min(n, len(latencies) - 1)])
        except BaseException:
            self.cancelled += 1
            raise
        return httpx.Response(self.status, stream=Body(self.closed, n))

    def sent(self, host: str = "a.test") -> int:
        return sum(1 for h, _, _ in self.seen if h == host)


def client(upstream: Upstream, **options: Any) -> httpx.AsyncClient:
    options.setdefault("hedge", sw.Hedge(delay=0.05, telemetry=quiet()))
    transport = ResilientTransport(
        sw.Retry(attempts=1, telemetry=quiet()), transport=httpx.MockTransport(upstream), **options
    )
    return httpx.AsyncClient(transport=transport)


def resilient(http: httpx.AsyncClient) -> ResilientTransport:
    transport = http._transport
    assert isinstance(transport, ResilientTransport)
    return transport


def quiet() -> sw.Telemetry:
    return sw.Telemetry(registry=CollectorRegistry())


def test_hedge_must_be_a_hedge() -> None:
    with pytest.raises(TypeError, match=r"hedge must be a stalwart\.Hedge or None, not Retry"):
        ResilientTransport(hedge=sw.Retry())  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "OPTIONS"])
async def test_a_slow_idempotent_request_is_hedged(method: str) -> None:
    upstream = Upstream({"a.test": [1.0, 0.01]})
    async with client(upstream) as http:
        response = await http.request(method, "http://a.test/item")
    assert response.status_code == 200
    assert upstream.sent() == 2
    assert upstream.cancelled == 1
    assert anyio.current_time() == pytest.approx(0.06)


async def test_a_fast_request_is_sent_once() -> None:
    upstream = Upstream({"a.test": [0.01]})
    async with client(upstream) as http:
        await http.get("http://a.test/item")
    assert upstream.sent() == 1


async def test_a_post_is_never_hedged() -> None:
    upstream = Upstream({"a.test": [1.0, 0.01]})
    async with client(upstream) as http:
        response = await http.post("http://a.test/orders", content=b"{}")
    assert response.status_code == 200
    assert upstream.sent() == 1
    assert anyio.current_time() == pytest.approx(1.0)


async def test_a_post_with_an_idempotency_key_is_hedged() -> None:
    upstream = Upstream({"a.test": [1.0, 0.01]})
    async with client(upstream) as http:
        response = await http.post(
            "http://a.test/orders", content=b"{}", headers={"Idempotency-Key": "order-7"}
        )
    assert response.status_code == 200
    assert upstream.sent() == 2


async def test_a_hedge_in_the_users_policy_is_not_used_for_a_post() -> None:
    upstream = Upstream({"a.test": [1.0, 1.0, 0.01]})
    transport = ResilientTransport(
        sw.Hedge(delay=0.05, telemetry=quiet()), transport=httpx.MockTransport(upstream)
    )
    async with httpx.AsyncClient(transport=transport) as http:
        await http.post("http://a.test/orders", content=b"{}")
        await http.get("http://a.test/orders/1")
    assert [method for _, method, _ in upstream.seen] == ["POST", "GET", "GET"]


async def test_the_losing_response_is_closed() -> None:
    upstream = Upstream({})
    upstream.gate = anyio.Event()

    async def open_gate() -> None:
        await anyio.sleep(0.1)
        assert upstream.gate is not None
        upstream.gate.set()

    hedge = sw.Hedge(delay=0.0, telemetry=quiet())
    async with client(upstream, hedge=hedge) as http, anyio.create_task_group() as group:
        group.start_soon(open_gate)
        response = await http.send(http.build_request("GET", "http://a.test/"), stream=True)
    assert upstream.sent() == 2
    # Both answered in one instant: the one not returned was closed unread.
    assert len(upstream.closed) == 1
    loser = upstream.closed[0]
    assert loser == 1 - int(await response.aread())


async def test_each_host_learns_its_own_delay() -> None:
    upstream = Upstream({"fast.test": [0.01], "slow.test": [0.2]})
    adaptive = sw.AdaptiveDelay(minimum=0.001, maximum=1.0, warmup=5)
    async with client(upstream, hedge=sw.Hedge(delay=adaptive, telemetry=quiet())) as http:
        for _ in range(10):
            await http.get("http://fast.test/")
            await http.get("http://slow.test/")
        hedges = resilient(http).host_hedges
        delays = {origin: hedge.current_delay() for origin, hedge in hedges.items()}
    assert delays == {
        "http://fast.test:80": pytest.approx(0.01, rel=0.03),
        "http://slow.test:80": pytest.approx(0.2, rel=0.03),
    }


async def test_a_retryable_status_starts_the_next_hedge_at_once() -> None:
    statuses = iter([503, 200])

    async def handler(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(0.01)
        return httpx.Response(next(statuses))

    transport = ResilientTransport(
        sw.Retry(attempts=1, telemetry=quiet()),
        transport=httpx.MockTransport(handler),
        hedge=sw.Hedge(delay=0.5, telemetry=quiet()),
    )
    async with httpx.AsyncClient(transport=transport) as http:
        response = await http.get("http://a.test/")
    assert response.status_code == 200
    assert anyio.current_time() == pytest.approx(0.02)


async def test_the_hosts_hedges_count_into_one_series(registry: CollectorRegistry) -> None:
    upstream = Upstream({"a.test": [1.0, 0.01], "b.test": [1.0, 0.01]})
    hedge = sw.Hedge(delay=0.05, name="upstreams", telemetry=sw.Telemetry(registry=registry))
    async with client(upstream, hedge=hedge) as http:
        await http.get("http://a.test/")
        await http.get("http://b.test/")
    assert sample(registry, "stalwart_hedges_total", policy="upstreams") == 2


async def test_per_host_policies_and_hedges_together() -> None:
    upstream = Upstream({"a.test": [1.0, 0.01]})
    breakers: dict[str, sw.CircuitBreaker] = {}

    def breaker(origin: str) -> sw.CircuitBreaker:
        breakers[origin] = sw.CircuitBreaker(name=origin, telemetry=quiet())
        return breakers[origin]

    async with client(upstream, per_host=breaker) as http:
        await http.get("http://a.test/")
        hosts = resilient(http)
        assert list(hosts.host_policies) == list(hosts.host_hedges) == ["http://a.test:80"]
    # The breaker saw both attempts: the winner counted, the cancelled loser not.
    stats = breakers["http://a.test:80"].statistics()
    assert (stats.calls, stats.failures) == (1, 0)
