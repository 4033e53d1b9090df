"""The HTTP rules every integration shares, as plain functions and tables.

What is retried, what a ``Retry-After`` means, which requests are safe to
repeat, how a deadline travels in a header and how long an inbound request
may run, what each stalwart error stands for in HTTP and how a server
answers it: one place for the rules, so that every client (httpx, aiohttp,
...) and every server integration (ASGI, aiohttp, ...) applies the same
ones. Nothing here imports httpx, aiohttp or an ASGI framework: each
integration needs only its own extra. The rules gRPC shares too are in
`_transport`.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
import uuid
from collections.abc import Container, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any, Final, final

from . import _validate
from ._errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceeded,
    RateLimitExceeded,
    StalwartError,
)
from ._transport import collection_option, kind_of, retry_after_of

__all__ = [
    "CONFLICT",
    "DEADLINE_HEADER",
    "DEFAULT_RETRY_STATUSES",
    "ERROR_RULES",
    "IDEMPOTENCY_HEADER",
    "IDEMPOTENT_METHODS",
    "PROBLEM_JSON",
    "ClientRules",
    "ErrorRule",
    "InboundDeadline",
    "deadline_passed",
    "error_details",
    "error_rule",
    "header_name",
    "http_date",
    "is_token",
    "milliseconds",
    "new_idempotency_key",
    "parse_grpc_timeout",
    "parse_retry_after",
    "parse_timeout_ms",
    "problem_json",
    "rate_limit_field",
    "rate_limit_policy_field",
    "response_retry_after",
    "retry_after_header",
    "retryable_status",
    "safe_to_repeat",
    "seconds_after",
    "status_codes",
]

DEADLINE_HEADER: Final = "x-request-timeout-ms"
"""Where a caller's deadline travels: the milliseconds it has left."""

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
"""The IETF draft's header for a request's idempotency key."""

DEFAULT_RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
"""Statuses that mean "try again later": rate limited, or a gateway's upstream failed."""

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""Methods RFC 9110 defines as idempotent: repeating them is safe."""

CONFLICT: Final = 409
"""A server de-duplicating idempotency keys answers this while the key's
first request still runs (the IETF draft, and stalwart's own
``IdempotencyMiddleware``): "come back later for its response"."""

# Header field names and methods are tokens (RFC 9110, sections 5.1 and 9.1).
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DELTA_SECONDS: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*")


def is_token(value: str) -> bool:
    """Whether ``value`` is an HTTP token: what a header name or a method is made of."""
    return _TOKEN.fullmatch(value) is not None


def header_name(param: str, value: Any) -> str:
    """A valid HTTP header name, as given (header names ignore case)."""
    if not isinstance(value, str):
        raise TypeError(f"{param} must be a header name (str), not {type(value).__name__}")
    if not is_token(value):
        raise ValueError(f"{param} must be a valid HTTP header name, got {value!r}")
    return value


def status_codes(param: str, value: Any) -> frozenset[int]:
    """A collection of HTTP status codes (100-599), as a frozenset; it may be empty."""
    statuses = collection_option(param, value, "HTTP status codes")
    for status in statuses:
        if not isinstance(status, int) or isinstance(status, bool):
            raise TypeError(f"{param} must hold int status codes, got {type(status).__name__}")
        if not 100 <= status <= 599:
            raise ValueError(f"{param} must hold status codes in 100-599, got {status!r}")
    return statuses


# -- what a client retries ---------------------------------------------------------------


def safe_to_repeat(method: str, headers: Container[str], key_header: str) -> bool:
    """Whether a request may be sent again: an idempotent method, or it carries a key.

    ``headers`` is the request's (case-insensitive) header mapping.
    """
    return method in IDEMPOTENT_METHODS or key_header in headers


def retryable_status(
    status: int, retry_statuses: Container[int], headers: Container[str], key_header: str
) -> bool:
    """Whether an answer with ``status`` fails the attempt, so that it is retried.

    A status in ``retry_statuses``, or a 409 to a request carrying an
    idempotency key (``key_header`` in the request's ``headers``): the
    server is still running the key's first request, and a later attempt
    gets its response.
    """
    return status in retry_statuses or (status == CONFLICT and key_header in headers)


def new_idempotency_key(rng: random.Random | None) -> str:
    """A fresh ``Idempotency-Key``: a random UUID, drawn from ``rng`` when given.

    Without ``rng``, ``uuid.uuid4()``: the operating system's randomness.
    """
    if rng is None:
        return str(uuid.uuid4())
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def response_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait according to a response's ``Retry-After``, or None.

    ``headers`` is the response's (case-insensitive) header mapping; see
    `parse_retry_after`. An HTTP date is measured against the response's own
    ``Date`` when it has one, which makes the hint immune to the skew between
    the server's clock and ours; else against the wall clock.
    """
    value = headers.get("retry-after")
    if value is None:
        return None
    date = headers.get("date")
    return parse_retry_after(value, now=None if date is None else http_date(date))


def parse_retry_after(value: str, *, now: float | None = None) -> float | None:
    """Seconds to wait according to a ``Retry-After`` value, or None.

    ``value`` is delta-seconds (``"120"``; a decimal fraction is accepted) or
    an HTTP date (``"Wed, 21 Oct 2015 07:28:00 GMT"``), which is compared to
    ``now`` (a POSIX timestamp; default: the wall clock). A date in the past
    gives 0.0. Anything malformed or negative gives None: a hint that cannot
    be read is no hint. A very long wait is returned as it is: a
    `~stalwart.Retry` never waits longer than its backoff's ``maximum``
    (a longer hint stops the retries), so a server cannot park a client.

    Example::

        parse_retry_after("3")  # 3.0
        parse_retry_after("-1")  # None
    """
    match = _DELTA_SECONDS.fullmatch(value)
    if match is not None:
        seconds = float(match.group(1))
        return seconds if math.isfinite(seconds) else None
    when = http_date(value)
    if when is None:
        return None
    # A date needs the wall clock: the event loop's clock has no epoch.
    reference = time.time() if now is None else now
    return max(0.0, when - reference)


def http_date(value: str) -> float | None:
    """An HTTP date as a POSIX timestamp, or None if malformed."""
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP dates are always GMT
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@final
class ClientRules:
    """An HTTP client integration's options for what it retries and adds, checked once.

    `stalwart.httpx.ResilientTransport` and `stalwart.aiohttp.ResilientMiddleware`
    take the same options (see theirs for what each means) and apply them
    by these rules: `repeatable` before a request's first attempt,
    `retryable` on each answer, ``deadline_header`` on each attempt.
    """

    __slots__ = ("add_keys", "deadline_header", "key_header", "retry_statuses", "rng")

    def __init__(
        self,
        *,
        retry_statuses: Any,
        deadline_header: Any,
        add_idempotency_keys: Any,
        idempotency_header: Any,
        rng: Any,
    ) -> None:
        self.retry_statuses = status_codes("retry_statuses", retry_statuses)
        self.deadline_header: str | None = (
            None if deadline_header is None else header_name("deadline_header", deadline_header)
        )
        if not isinstance(add_idempotency_keys, bool):
            raise TypeError(
                f"add_idempotency_keys must be a bool, not {type(add_idempotency_keys).__name__}"
            )
        self.add_keys = add_idempotency_keys
        self.key_header = header_name("idempotency_header", idempotency_header)
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, not {type(rng).__name__}")
        self.rng: random.Random | None = rng

    def repeatable(self, method: str, headers: MutableMapping[str, str]) -> bool:
        """Whether a request may be sent again (see `safe_to_repeat`).

        With ``add_keys``, a request that may not gets a fresh key in its
        ``headers`` (see `new_idempotency_key`), and then it may.
        """
        if safe_to_repeat(method, headers, self.key_header):
            return True
        if not self.add_keys:
            return False
        headers[self.key_header] = new_idempotency_key(self.rng)
        return True

    def retryable(self, status: int, headers: Container[str]) -> bool:
        """Whether an answer of ``status`` to a request with these ``headers`` fails its attempt."""
        return retryable_status(status, self.retry_statuses, headers, self.key_header)


# -- a deadline in a header -------------------------------------------------------------

# At most 15 integer digits: longer values are not durations anyone means.
_MILLISECONDS: Final = re.compile(rb"\s*(\d{1,15}(?:\.\d+)?)\s*")
# gRPC over HTTP/2: "TimeoutValue TimeoutUnit", at most 8 digits.
_GRPC_TIMEOUT: Final = re.compile(rb"(\d{1,8})([HMSmun])")
_GRPC_UNITS: Final = {
    b"H": 3600.0,
    b"M": 60.0,
    b"S": 1.0,
    b"m": 1e-3,
    b"u": 1e-6,
    b"n": 1e-9,
}


def milliseconds(left: float) -> str:
    """``left`` seconds as a `DEADLINE_HEADER` value: the whole milliseconds."""
    return str(int(left * 1000.0))


def parse_timeout_ms(value: bytes) -> float | None:
    """Seconds from an ``x-request-timeout-ms`` value, or None if malformed.

    The value is a non-negative number of milliseconds (an integer as
    stalwart sends it; a decimal fraction is accepted).

    Example::

        parse_timeout_ms(b"1500")  # 1.5
        parse_timeout_ms(b"soon")  # None
    """
    if value.isdigit() and len(value) <= 15:  # the common case, without a regex
        return int(value) / 1000.0
    match = _MILLISECONDS.fullmatch(value)
    if match is None:
        return None
    return float(match.group(1)) / 1000.0


def parse_grpc_timeout(value: bytes) -> float | None:
    """Seconds from a ``grpc-timeout`` value (``"250m"``, ``"3S"``), or None.

    The gRPC format: at most 8 digits, then a unit: ``H`` hours, ``M``
    minutes, ``S`` seconds, ``m`` milliseconds, ``u`` microseconds, ``n``
    nanoseconds.
    """
    match = _GRPC_TIMEOUT.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)) * _GRPC_UNITS[match.group(2)]


@final
class InboundDeadline:
    """How long an inbound request may run: what its caller asked for, capped, or a default.

    The server half of `DEADLINE_HEADER`, for every server integration.
    ``max_timeout`` is the longest deadline a caller may ask for (None: no
    cap); ``default_timeout`` is the deadline of a request that asks for
    none usable (None: no deadline), capped at ``max_timeout`` too. Both are
    seconds, > 0.
    """

    __slots__ = ("default_timeout", "max_timeout")

    def __init__(self, *, max_timeout: float | None, default_timeout: float | None) -> None:
        self.max_timeout = _validate.optional_duration("max_timeout", max_timeout, positive=True)
        default = _validate.optional_duration("default_timeout", default_timeout, positive=True)
        if default is not None and self.max_timeout is not None:
            default = min(default, self.max_timeout)
        self.default_timeout = default

    def limit(self, timeout_ms: bytes | None, grpc_timeout: bytes | None = None) -> float | None:
        """The deadline, in seconds, of a request that sent these values (None: none).

        ``timeout_ms`` is its `DEADLINE_HEADER` value and ``grpc_timeout``
        its ``grpc-timeout``, each None when absent (the nearer of the two
        wins). A malformed value counts as absent: a caller's typo never
        turns into a 500.
        """
        limit = None if timeout_ms is None else parse_timeout_ms(timeout_ms)
        if grpc_timeout is not None:
            grpc = parse_grpc_timeout(grpc_timeout)
            if grpc is not None and (limit is None or grpc < limit):
                limit = grpc
        if limit is None:
            return self.default_timeout
        if self.max_timeout is not None and limit > self.max_timeout:
            return self.max_timeout
        return limit


def deadline_passed(seconds: float) -> str:
    """The ``detail`` of the 504 that a request whose own deadline (``seconds``) passed gets."""
    return f"The request's deadline of {seconds * 1000.0:g} ms passed before a response was ready."


# -- what each stalwart error stands for -------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class ErrorRule:
    """What a stalwart error stands for in HTTP, to a client and to a server.

    Attributes:
        kind: a short, stable name for the error (``"circuit_open"``), the
            ``reason`` of the matching ``CallRejected`` event where there is one.
        status: what a server answers when the error ends a request.
        timeout: to a client, the error is a timeout (the answer did not come
            in time) rather than a refusal to send the request at all.
        detail: a sentence for the client, formatted with ``policy``: it
            names the policy, and never says more about the service.
    """

    kind: str
    status: HTTPStatus
    timeout: bool
    detail: str


ERROR_RULES: Final[Mapping[type[StalwartError], ErrorRule]] = {
    DeadlineExceeded: ErrorRule(
        "deadline_exceeded",
        HTTPStatus.GATEWAY_TIMEOUT,
        timeout=True,
        detail="The deadline of {policy!r} passed before the work was done.",
    ),
    CircuitOpenError: ErrorRule(
        "circuit_open",
        HTTPStatus.SERVICE_UNAVAILABLE,
        timeout=False,
        detail="Circuit breaker {policy!r} is open: calls to a failing dependency fail fast.",
    ),
    BulkheadFullError: ErrorRule(
        "bulkhead_full",
        HTTPStatus.SERVICE_UNAVAILABLE,
        timeout=False,
        detail="Bulkhead {policy!r} is full: too much work is in flight.",
    ),
    RateLimitExceeded: ErrorRule(
        "rate_limited",
        HTTPStatus.SERVICE_UNAVAILABLE,
        timeout=False,
        detail="Rate limit {policy!r} refused the work: too many calls.",
    ),
}
"""The translation table: the stalwart errors that stand for an HTTP failure.

A subclass follows its nearest listed base, so the errors an integration
makes of these (``stalwart.httpx``'s, which are httpx errors too) are
recognised as what they stand for.
"""


def error_rule(error: BaseException) -> ErrorRule | None:
    """The rule of ``error``'s nearest class in `ERROR_RULES`, or None."""
    kind = kind_of(error, ERROR_RULES)
    return None if kind is None else ERROR_RULES[kind]


def retry_after_header(error: BaseException) -> int | None:
    """``error``'s ``retry_after`` as a ``Retry-After`` value: whole seconds, rounded up.

    None when the error does not know (no ``retry_after``, None, negative or
    not finite).
    """
    seconds = retry_after_of(error)
    if seconds is None:
        return None
    # To the millisecond first: a clock's rounding (30.000000000004) is not a second more.
    return math.ceil(round(seconds, 3))


PROBLEM_JSON: Final = "application/problem+json"
"""The media type of a problem answer (RFC 9457)."""


def problem_json(
    status: int, title: str, detail: str, extensions: Mapping[str, str] | None = None
) -> str:
    """The body of an ``application/problem+json`` answer (RFC 9457).

    Its ``type`` is ``about:blank`` (the status says it all), ``title`` the
    status's phrase and ``detail`` a sentence for this answer; ``extensions``
    are members of the answer's own.
    """
    problem = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if extensions:
        problem.update(extensions)
    return json.dumps(problem)


def error_details(kind: type[StalwartError], error: StalwartError) -> str:
    """What a server tells its caller of ``error``: its rule's sentence, naming its policy.

    Never the error's message: it may name internal hosts or keys (the rule
    every server side follows, `ErrorMiddleware` first).
    """
    return ERROR_RULES[kind].detail.format(policy=error.policy)


# -- rate limits: draft-ietf-httpapi-ratelimit-headers ------------------------------------


def seconds_after(seconds: float) -> int:
    """``seconds`` as whole seconds, rounded up: a client that waits them is not early.

    Unlike `retry_after_header`, no rounding to the millisecond first: a
    rate limit's "come back in 1.0004 s" must not become 1 s.
    """
    return max(0, math.ceil(seconds))


def rate_limit_policy_field(name: str, rate: float, per: float) -> str:
    """The ``RateLimit-Policy`` field of a limit of ``rate`` calls per ``per`` seconds.

    ``"<name>";q=<quota>;w=<window>`` (draft-ietf-httpapi-ratelimit-headers,
    a Structured Fields list of one item): the window is whole seconds, the
    shortest at least ``per`` long in which a steady client may make a call
    (1 call per 2 s: ``q=1;w=2``); the quota, the calls it may make in it
    (rounded down).
    """
    window = max(1, math.ceil(round(per, 6)), math.ceil(round(per / rate, 6)))
    quota = math.floor(round(rate * window / per, 6))
    return f"{_sf_string(name)};q={quota};w={window}"


def rate_limit_field(name: str, remaining: int, reset: float | None) -> str:
    """The ``RateLimit`` field: ``"<name>";r=<remaining>;t=<seconds>``.

    ``remaining``: calls the client may make at once now; ``reset``: seconds
    until it may make one more (rounded up), or None when it is at its full
    burst (then no ``t``: no more quota is coming).
    """
    field = f"{_sf_string(name)};r={max(0, remaining)}"
    return field if reset is None else f"{field};t={seconds_after(reset)}"


def _sf_string(text: str) -> str:
    """``text`` as a Structured Fields String (RFC 9651): printable ASCII, quoted."""
    shown = "".join(c if " " <= c <= "~" else "?" for c in text)
    return '"' + shown.replace("\\", "\\\\").replace('"', '\\"') + '"'
