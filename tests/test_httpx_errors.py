"""ResilientTransport's v2 defaults, over httpx.MockTransport, on asyncio and trio, in virtual time.

The errors that escape it (httpx errors that are still stalwart's), attempts
cut short by a per-attempt `Timeout` (retried), 409s to keyed requests
(retried after their Retry-After), and hints too long to wait.
"""

from __future__ import annotations

import contextlib
import pickle
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart._http import ERROR_RULES
from stalwart.httpx import (
    ResilientTransport,
    TransportBulkheadFullError,
    TransportCircuitOpenError,
    TransportDeadlineExceeded,
    TransportRateLimitExceeded,
)
from stalwart.testing import VirtualClockEventLoop

from .test_httpx import NO_WAIT, Upstream, reply, retry


def _retry_caps_hints() -> bool:
    """Whether `Retry` gives up on a hint longer than its backoff's maximum (contract v2).

    That rule lives in `Retry` (the ``defaults-core`` work); the transport's
    tests of it run once it is there.
    """
    attempts = 0

    async def main() -> None:
        @sw.Retry(
            attempts=2, backoff=sw.Backoff(initial=0.0, maximum=1.0), retry_after=lambda _: 5.0
        )
        async def fails() -> None:
            nonlocal attempts
            attempts += 1
            raise ValueError

        with contextlib.suppress(ValueError):
            await fails()

    anyio.run(main, backend="asyncio", backend_options={"loop_factory": VirtualClockEventLoop})
    return attempts == 1


RETRY_CAPS_HINTS = _retry_caps_hints()
needs_capped_hints = pytest.mark.skipif(
    not RETRY_CAPS_HINTS, reason="Retry's v2 cap on hints (backoff maximum) is not on this branch"
)


def private() -> sw.Telemetry:
    """A registry of its own: breakers of one name in several tests never meet."""
    return sw.Telemetry(registry=CollectorRegistry())


# Waits out the hints it gets (up to 10 s), with no backoff of its own.
HINTS_ONLY = sw.Backoff(initial=0.0, maximum=10.0)


# -- what escapes the transport --------------------------------------------------------------

ESCAPING = [
    (sw.DeadlineExceeded("late", policy="p", timeout=2.0), TransportDeadlineExceeded),
    (sw.CircuitOpenError("open", policy="p", retry_after=12.5), TransportCircuitOpenError),
    (sw.BulkheadFullError("full", policy="p"), TransportBulkheadFullError),
    (sw.RateLimitExceeded("limited", policy="p", retry_after=0.5), TransportRateLimitExceeded),
]


def test_every_error_of_the_translation_table_has_its_httpx_error() -> None:
    assert {type(error) for error, _ in ESCAPING} == set(ERROR_RULES)
    for error, translated in ESCAPING:
        timeout = ERROR_RULES[type(error)].timeout
        assert issubclass(translated, httpx.TimeoutException) is timeout
        assert issubclass(translated, httpx.TransportError)


@pytest.mark.parametrize(("error", "translated"), ESCAPING)
async def test_a_stalwart_error_escapes_as_an_httpx_error_that_is_still_itself(
    error: sw.StalwartError, translated: type[Exception]
) -> None:
    upstream = Upstream(lambda: error)
    async with upstream.client(retry(1)) as client:
        with pytest.raises(httpx.HTTPError) as info:
            await client.get("/items")
    escaped: Any = info.value
    assert escaped.__cause__ is error
    assert str(escaped) == str(error)
    assert escaped.request.url == "http://upstream.test/items"
    assert escaped.policy == "p"
    for attribute in ("retry_after", "timeout"):
        assert getattr(escaped, attribute, None) == getattr(error, attribute, None)
    assert type(escaped) is translated
    assert issubclass(translated, type(error))


@pytest.mark.parametrize(("error", "translated"), ESCAPING)
def test_the_httpx_errors_survive_pickling(
    error: sw.StalwartError, translated: type[Exception]
) -> None:
    from stalwart.httpx import _as_httpx_error

    request = httpx.Request("GET", "http://upstream.test/items")
    escaped = _as_httpx_error(error, request)
    copy: Any = pickle.loads(pickle.dumps(escaped))
    assert str(copy) == str(error)
    assert copy.policy == "p"
    assert copy.request.url == request.url
    assert getattr(copy, "retry_after", None) == getattr(error, "retry_after", None)
    assert type(copy) is translated


async def test_an_open_per_host_breaker_is_an_httpx_transport_error() -> None:
    upstream = Upstream(503)
    transport = ResilientTransport(
        transport=httpx.MockTransport(upstream),
        per_host=lambda origin: sw.CircuitBreaker(
            consecutive_failures=2, name=origin, telemetry=private()
        ),
    )
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(httpx.TransportError) as info:
            await client.get("http://upstream.test/")
    assert isinstance(info.value, sw.CircuitOpenError)
    assert info.value.policy == "http://upstream.test:80"
    assert 29.0 < info.value.retry_after <= 30.0
    assert len(upstream.seen) == 2


async def test_a_retry_budget_spent_escapes_as_an_httpx_timeout() -> None:
    upstream = Upstream(200)
    upstream.latency = 10.0
    async with upstream.client(sw.Retry(timeout=3.0, name="budget")) as client:
        with pytest.raises(httpx.TimeoutException) as info:
            await client.get("/items")
    assert isinstance(info.value, sw.DeadlineExceeded)
    assert info.value.policy == "budget"
    assert info.value.timeout == 3.0
    assert anyio.current_time() == 3.0


async def test_a_request_past_its_deadline_is_an_httpx_timeout() -> None:
    upstream = Upstream(200)
    async with upstream.client(retry()) as client:
        with pytest.raises(httpx.TimeoutException) as info, sw.deadline(0.0005):
            await client.get("/items")
    assert isinstance(info.value, sw.DeadlineExceeded)
    assert upstream.seen == []


async def test_other_stalwart_errors_are_left_as_they_are() -> None:
    error = sw.IdempotencyKeyReused("reused", policy="orders")
    upstream = Upstream(lambda: error)
    async with upstream.client(retry(1)) as client:
        with pytest.raises(sw.IdempotencyKeyReused) as info:
            await client.get("/items")
    assert info.value is error


# -- attempts cut short by a per-attempt Timeout ----------------------------------------------


class HangsFirst:
    """Hangs on the first ``hangs`` requests, then answers 200."""

    def __init__(self, hangs: int = 1) -> None:
        self.hangs = hangs
        self.starts: list[float] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.starts.append(anyio.current_time())
        if len(self.starts) <= self.hangs:
            await anyio.sleep(3600)
        return httpx.Response(200)


def documented(upstream: HangsFirst, **options: Any) -> httpx.AsyncClient:
    """The httpx how-to's recipe: a breaker and a per-attempt Timeout per host, default policy."""
    transport = ResilientTransport(
        transport=httpx.MockTransport(upstream),
        per_host=lambda origin: sw.Pipeline(
            sw.CircuitBreaker(name=origin, telemetry=private()), sw.Timeout(2)
        ),
        **options,
    )
    return httpx.AsyncClient(transport=transport)


async def test_an_attempt_cut_by_the_per_host_timeout_is_retried_by_default() -> None:
    upstream = HangsFirst()
    async with documented(upstream) as client:
        response = await client.get("http://upstream.test/items")
    assert response.status_code == 200
    assert len(upstream.starts) == 2
    assert upstream.starts[1] >= 2.0


async def test_attempts_that_all_time_out_end_in_an_httpx_timeout() -> None:
    upstream = HangsFirst(hangs=99)
    async with documented(upstream) as client:
        with pytest.raises(httpx.TimeoutException) as info:
            await client.get("http://upstream.test/items")
    assert isinstance(info.value, sw.DeadlineExceeded)
    assert info.value.timeout == 2.0
    assert len(upstream.starts) == 3


async def test_an_attempt_cut_by_a_timeout_in_the_policy_is_retried_by_default_rules() -> None:
    from stalwart.httpx import DEFAULT_RETRY_ON

    upstream = HangsFirst()
    policy = sw.Pipeline(sw.Retry(attempts=2, on=DEFAULT_RETRY_ON, backoff=NO_WAIT), sw.Timeout(1))
    transport = ResilientTransport(policy, transport=httpx.MockTransport(upstream))
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.get("http://upstream.test/items")
    assert response.status_code == 200
    assert upstream.starts == [0.0, 1.0]


async def test_no_attempt_is_retried_past_the_callers_deadline() -> None:
    upstream = HangsFirst(hangs=99)
    async with documented(upstream) as client:
        with pytest.raises(sw.DeadlineExceeded), sw.deadline(3.0):
            await client.get("http://upstream.test/items")
    assert anyio.current_time() <= 3.0
    assert len(upstream.starts) == 2  # the second, cut at the deadline, is the last


# -- 409s to keyed requests --------------------------------------------------------------------


async def test_a_409_to_a_keyed_request_is_retried_after_its_retry_after() -> None:
    upstream = Upstream(reply(409, {"retry-after": "2"}), 201)
    async with upstream.client(retry(backoff=HINTS_ONLY)) as client:
        response = await client.post("/orders", headers={"Idempotency-Key": "order-7"})
    assert response.status_code == 201
    first, second = upstream.seen
    assert second.at - first.at == 2.0
    assert second.headers["idempotency-key"] == "order-7"


async def test_a_409_to_a_request_keyed_by_the_transport_is_retried_by_default() -> None:
    upstream = Upstream(reply(409, {"retry-after": "1"}), 201)
    async with upstream.client(add_idempotency_keys=True) as client:
        response = await client.post("/orders", json={"sku": 42})
    assert response.status_code == 201
    first, second = upstream.seen
    assert second.at - first.at >= 1.0
    assert first.headers["idempotency-key"] == second.headers["idempotency-key"]


async def test_a_409_without_a_key_is_an_answer() -> None:
    upstream = Upstream(409, 200)
    async with upstream.client(retry()) as client:
        response = await client.put("/orders/7")
    assert response.status_code == 409
    assert len(upstream.seen) == 1


async def test_the_last_409_is_returned_when_the_attempts_run_out() -> None:
    upstream = Upstream(reply(409, {"retry-after": "1"}, b"still running"))
    async with upstream.client(retry(3, backoff=HINTS_ONLY)) as client:
        response = await client.post("/orders", headers={"Idempotency-Key": "order-7"})
    assert response.status_code == 409
    assert response.content == b"still running"
    assert len(upstream.seen) == 3


# -- hints too long to wait --------------------------------------------------------------------


@needs_capped_hints
@pytest.mark.parametrize("status", [429, 503])
async def test_a_default_transport_never_waits_out_a_huge_retry_after(status: int) -> None:
    upstream = Upstream(reply(status, {"retry-after": "999999999"}), 200)
    async with upstream.client() as client:
        response = await client.get("/items")
    assert response.status_code == status
    assert len(upstream.seen) == 1
    assert anyio.current_time() == 0.0


@needs_capped_hints
async def test_a_409s_huge_retry_after_is_not_waited_out_either() -> None:
    upstream = Upstream(reply(409, {"retry-after": "999999999"}), 201)
    async with upstream.client(add_idempotency_keys=True) as client:
        response = await client.post("/orders")
    assert response.status_code == 409
    assert anyio.current_time() == 0.0
