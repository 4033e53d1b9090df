"""ResilientTransport(rate_limit=...): a client kept under a partner's quota.

Over httpx.MockTransport, on asyncio and trio, in virtual time.
"""

from __future__ import annotations

import anyio
import httpx
import pytest

import stalwart as sw
from stalwart.httpx import ResilientTransport, TransportRateLimitExceeded

from .test_httpx import Upstream, retry


def started(upstream: Upstream) -> list[float]:
    first = upstream.seen[0].at
    return [round(seen.at - first, 6) for seen in upstream.seen]


async def test_requests_are_spaced_to_the_quota() -> None:
    upstream = Upstream(200)
    limiter = sw.RateLimiter(2, burst=1, max_wait=10)
    async with upstream.client(retry(), rate_limit=limiter) as client:
        for _ in range(4):
            assert (await client.get("/")).status_code == 200
    assert started(upstream) == [0.0, 0.5, 1.0, 1.5]


async def test_concurrent_requests_queue_for_their_turns_in_order() -> None:
    upstream = Upstream(200)
    limiter = sw.RateLimiter(4, burst=2, max_wait=10)
    async with (
        upstream.client(retry(), rate_limit=limiter) as client,
        anyio.create_task_group() as tg,
    ):
        for i in range(6):
            tg.start_soon(client.get, f"/{i}")
    assert started(upstream) == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]


async def test_every_attempt_takes_a_turn_retries_too() -> None:
    upstream = Upstream(503, 503, 200)
    limiter = sw.RateLimiter(2, burst=1, max_wait=10)
    async with upstream.client(retry(3), rate_limit=limiter) as client:
        assert (await client.get("/")).status_code == 200
    assert started(upstream) == [0.0, 0.5, 1.0]


async def test_a_refusal_is_not_retried_and_leaves_as_an_httpx_error() -> None:
    upstream = Upstream(200)
    limiter = sw.RateLimiter(1, name="partner")  # no waiting
    async with upstream.client(retry(5), rate_limit=limiter) as client:
        await client.get("/")
        with pytest.raises(TransportRateLimitExceeded) as info:
            await client.get("/")
    error = info.value
    assert isinstance(error, httpx.TransportError)
    assert isinstance(error, sw.RateLimitExceeded)
    assert (error.policy, error.retry_after) == ("partner", 1.0)
    assert len(upstream.seen) == 1


async def test_a_turn_after_the_deadline_is_refused_at_once() -> None:
    upstream = Upstream(200)
    limiter = sw.RateLimiter(1, max_wait=10)
    async with upstream.client(retry(), rate_limit=limiter) as client:
        await client.get("/")
        start = anyio.current_time()
        with sw.deadline(0.5), pytest.raises(sw.RateLimitExceeded):
            await client.get("/")
        assert anyio.current_time() == start
    assert len(upstream.seen) == 1


async def test_a_key_callable_limits_each_upstream_apart() -> None:
    upstream = Upstream(200)
    limiter = sw.RateLimiter(1, key=lambda request: request.url.host)
    transport = ResilientTransport(
        retry(), transport=httpx.MockTransport(upstream), rate_limit=limiter
    )
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://a.test/")
        await client.get("http://b.test/")
        with pytest.raises(sw.RateLimitExceeded):
            await client.get("http://a.test/again")
    assert [seen.request.url.host for seen in upstream.seen] == ["a.test", "b.test"]


async def test_the_limiter_is_outside_the_per_host_policy() -> None:
    upstream = Upstream(200)
    breakers: list[sw.CircuitBreaker] = []

    def breaker(origin: str) -> sw.CircuitBreaker:
        made = sw.CircuitBreaker(consecutive_failures=1, name=f"cb {origin}")
        breakers.append(made)
        return made

    limiter = sw.RateLimiter(1)
    async with upstream.client(retry(), rate_limit=limiter, per_host=breaker) as client:
        await client.get("/")
        for _ in range(3):
            with pytest.raises(sw.RateLimitExceeded):
                await client.get("/")
    # A refusal never reached the breaker: it is no failure of the upstream.
    assert [b.state for b in breakers] == [sw.CircuitState.CLOSED]


def test_rate_limit_is_checked_and_readable() -> None:
    with pytest.raises(TypeError, match=r"rate_limit must be a stalwart\.RateLimiter or None"):
        ResilientTransport(rate_limit="10/s")  # type: ignore[arg-type]
    limiter = sw.RateLimiter(1, name="readable")
    assert ResilientTransport(rate_limit=limiter).rate_limit is limiter
    assert ResilientTransport().rate_limit is None
