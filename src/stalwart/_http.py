"""The HTTP rules every integration shares, as plain functions and tables.

What is retried, what a ``Retry-After`` means, which requests are safe to
repeat, and what each stalwart error stands for in HTTP: one place for the
rules, so that every client (httpx, aiohttp, ...) and every server
integration (ASGI, ...) applies the same ones. Nothing here imports httpx or
an ASGI framework: each integration needs only its own extra.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any, Final, final

from ._errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceeded,
    RateLimitExceeded,
    StalwartError,
)

__all__ = [
    "CONFLICT",
    "DEADLINE_HEADER",
    "DEFAULT_RETRY_STATUSES",
    "ERROR_RULES",
    "IDEMPOTENCY_HEADER",
    "IDEMPOTENT_METHODS",
    "ErrorRule",
    "error_rule",
    "header_name",
    "http_date",
    "parse_retry_after",
    "retry_after_header",
    "retryable_status",
    "safe_to_repeat",
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

# Header field names are tokens (RFC 9110, section 5.1).
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_DELTA_SECONDS: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*")


def header_name(param: str, value: Any) -> str:
    """A valid HTTP header name, as given (header names ignore case)."""
    if not isinstance(value, str):
        raise TypeError(f"{param} must be a header name (str), not {type(value).__name__}")
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{param} must be a valid HTTP header name, got {value!r}")
    return value


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
    for cls in type(error).__mro__:
        rule = ERROR_RULES.get(cls)
        if rule is not None:
            return rule
    return None


def retry_after_header(error: BaseException) -> int | None:
    """``error``'s ``retry_after`` as a ``Retry-After`` value: whole seconds, rounded up.

    None when the error does not know (no ``retry_after``, None, negative or
    not finite).
    """
    seconds = getattr(error, "retry_after", None)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return None
    if not (math.isfinite(seconds) and seconds >= 0):
        return None
    # To the millisecond first: a clock's rounding (30.000000000004) is not a second more.
    return math.ceil(round(seconds, 3))
