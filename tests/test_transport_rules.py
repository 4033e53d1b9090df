"""The rules the integrations share, at the edges only one transport's tests reached.

`stalwart.httpx`, `stalwart.aiohttp`, `stalwart.grpc` and `stalwart.asgi`
apply one copy of each rule (`stalwart._transport`, `stalwart._http`); their
own tests show each rule at work through a real client or server. These
tests pin the edges that only one of them used to reach.
"""

from __future__ import annotations

import email.utils
import math
import time
from typing import Any

import anyio
import pytest

import stalwart as sw
from stalwart._http import response_retry_after, retry_after_header
from stalwart._transport import (
    by_kind,
    collection_option,
    first_value,
    kind_of,
    retry_after_of,
    time_left,
)
from stalwart.httpx import ResilientTransport


class Hint(Exception):
    def __init__(self, retry_after: Any) -> None:
        super().__init__("hint")
        self.retry_after = retry_after


# -- what an error's retry_after tells a caller (ErrorMiddleware, aiohttp, grpc) --------


@pytest.mark.parametrize("value", [None, -0.5, math.inf, -math.inf, math.nan, True, "3"])
def test_a_retry_after_that_cannot_be_told_is_none(value: Any) -> None:
    assert retry_after_of(Hint(value)) is None
    assert retry_after_header(Hint(value)) is None


def test_an_error_without_retry_after_tells_none() -> None:
    assert retry_after_of(sw.BulkheadFullError("full", policy="b")) is None


@pytest.mark.parametrize(
    ("seconds", "header"), [(0, 0), (0.0, 0), (0.25, 1), (2, 2), (19.5, 20), (30.000000004, 30)]
)
def test_retry_after_is_whole_seconds_rounded_up_from_the_millisecond(
    seconds: float, header: int
) -> None:
    assert retry_after_of(Hint(seconds)) == seconds
    assert retry_after_header(Hint(seconds)) == header


# -- which entry of a translation table an error is -------------------------------------


class Shed(sw.RateLimitExceeded):
    """A subclass listed after its base."""


def test_an_error_is_its_nearest_listed_class() -> None:
    table = {sw.RateLimitExceeded: "limited", Shed: "shed"}
    assert kind_of(Shed("x", policy="p", retry_after=None), table) is Shed
    assert kind_of(sw.RateLimitExceeded("x", policy="p", retry_after=None), table) is (
        sw.RateLimitExceeded
    )
    assert kind_of(sw.BulkheadFullError("x", policy="p"), table) is None
    assert kind_of(LookupError(), table) is None


def test_a_transports_errors_are_keyed_by_the_stalwart_error_they_stand_for() -> None:
    class Refused(ConnectionError, sw.BulkheadFullError):
        pass

    assert by_kind(Refused) == {sw.BulkheadFullError: Refused}


def test_a_transport_error_that_stands_for_no_stalwart_error_is_refused() -> None:
    class Stray(sw.BulkheadFullError, ConnectionError):
        pass

    with pytest.raises(TypeError, match="Stray"):
        by_kind(Stray)


# -- the first value of a repeated header or metadata key -------------------------------


def test_the_first_value_of_a_key_counts() -> None:
    pairs = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert first_value(pairs, b"a") == b"1"
    assert first_value(pairs, b"c") is None
    assert first_value([], b"a") is None
    assert first_value(None, b"a") is None  # a call without metadata


# -- collection options ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["GET", b"GET", 3, None])
def test_a_collection_option_is_not_a_lone_str_or_a_scalar(value: Any) -> None:
    with pytest.raises(TypeError, match=r"^methods must be a collection of HTTP method names"):
        collection_option("methods", value, "HTTP method names")


def test_a_collection_option_with_unhashable_members_names_the_parameter() -> None:
    with pytest.raises(TypeError, match=r"^retry_statuses must be a collection"):
        collection_option("retry_statuses", [[503]], "HTTP status codes")
    with pytest.raises(TypeError, match=r"^retry_statuses"):
        ResilientTransport(retry_statuses=[[503]])  # type: ignore[list-item]


# -- an attempt's time left ---------------------------------------------------------------


async def test_without_a_deadline_there_is_no_time_left_to_tell() -> None:
    assert time_left("client", "{} not sent", "GET /") is None


async def test_an_attempt_with_less_than_a_millisecond_left_is_not_sent() -> None:
    with sw.deadline(1.0):
        await anyio.sleep(0.9995)
        with pytest.raises(sw.DeadlineExceeded) as refused:
            time_left("client", "{} {} not sent", "GET", "http://a.test/")
    assert str(refused.value) == "no time left before the deadline: GET http://a.test/ not sent"
    assert refused.value.policy == "client"


async def test_a_few_milliseconds_left_are_told() -> None:
    with sw.deadline(1.0):
        await anyio.sleep(0.998)
        left = time_left("client", "{} not sent", "GET /")
    assert left == pytest.approx(0.002)


# -- a response's Retry-After ------------------------------------------------------------


def test_a_retry_after_date_with_an_unreadable_date_is_measured_by_the_wall_clock() -> None:
    later = email.utils.formatdate(time.time() + 60.0, usegmt=True)
    hint = response_retry_after({"retry-after": later, "date": "not a date"})
    assert hint is not None
    assert 50.0 < hint <= 60.0


# -- a client integration's policy, and its policies per host or target -------------------


def test_every_client_defaults_to_three_attempts_named_after_it() -> None:
    from stalwart.aiohttp import ResilientMiddleware
    from stalwart.grpc import ClientInterceptor

    policies: list[tuple[sw.Policy, str]] = [
        (ResilientTransport(name="up").policy, "up"),
        (ResilientMiddleware(name="aio").policy, "aio"),
        (ClientInterceptor(name="rpc").policy, "rpc"),
    ]
    for policy, name in policies:
        assert isinstance(policy, sw.Retry)
        assert (policy.attempts, policy.name) == (3, name)
    with pytest.raises(ValueError, match="name must be"):
        ResilientMiddleware(name="")
    with pytest.raises(TypeError, match="policy must be a stalwart policy or None, not int"):
        ClientInterceptor(3)  # type: ignore[arg-type]


def test_policies_per_key_are_checked_to_be_policies_when_made() -> None:
    from stalwart._transport import policy_factory

    made = policy_factory(
        "per_host", lambda origin: origin, key="origin", a_key="an origin", each="host"
    )
    assert made is not None
    with pytest.raises(
        TypeError, match="per_host must return a stalwart policy, returned str for x"
    ):
        made("x")
    breaker = sw.CircuitBreaker(name="per-key-check")
    assert policy_factory("p", lambda k: breaker, key="k", a_key="a k", each="k")("k") is breaker  # type: ignore[misc]
    assert policy_factory("p", None, key="k", a_key="a k", each="k") is None
