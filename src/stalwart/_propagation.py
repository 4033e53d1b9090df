"""W3C trace context across the wire, for the integrations that own both ends.

The gRPC interceptors, the aiohttp middlewares, and httpx's
``ResilientTransport`` with the ASGI ``DeadlineMiddleware``, carry the
current trace from a caller to the service it calls, so that the spans of every hop of a
request (stalwart's own and any others) share one trace id. They use
OpenTelemetry's propagation API, so the global propagator decides what
travels (W3C ``traceparent``/``tracestate`` and baggage by default, or
whatever ``OTEL_PROPAGATORS`` names).

Both ends stay out of the way of OpenTelemetry's own instrumentations:
nothing is injected into a request that already carries a ``traceparent``,
and nothing is extracted where a span is already current (a server
instrumentation got there first and made the request's span).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import Token
from typing import Final

from opentelemetry import context as _context
from opentelemetry import propagate as _propagate
from opentelemetry import trace as _trace
from opentelemetry.context import Context

__all__ = ["TRACEPARENT", "extracted", "outgoing"]

TRACEPARENT: Final = "traceparent"


def outgoing() -> dict[str, str]:
    """The headers (lower case) that carry the current trace, or {} without one.

    Empty unless a valid span context is current: with no tracer configured
    and no trace received, a request carries nothing extra and this costs
    one look-up.
    """
    if not _trace.get_current_span().get_span_context().is_valid:
        return {}
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return carrier


@contextmanager
def extracted(headers: Iterable[tuple[str, str]]) -> Iterator[None]:
    """Within the block, the trace context the caller sent is the current one.

    ``headers`` are (lower-case name, value) pairs. Does nothing when they
    carry no ``traceparent`` or when a valid span is already current.
    """
    token = attach(headers)
    try:
        yield
    finally:
        if token is not None:
            _context.detach(token)


def attach(headers: Iterable[tuple[str, str]]) -> Token[Context] | None:
    """What `extracted` does on entering: the token to `detach` with, or None if nothing was."""
    headers = list(headers)
    if (
        not any(name == TRACEPARENT for name, _ in headers)
        or _trace.get_current_span().get_span_context().is_valid
    ):
        return None
    carrier: dict[str, str] = {}
    for name, value in headers:
        if isinstance(value, str):  # binary gRPC metadata ("-bin") carries no trace context
            carrier.setdefault(name, value)
    return _context.attach(_propagate.extract(carrier))


def detach(token: Token[Context]) -> None:
    """Undo an `attach` that returned ``token``."""
    _context.detach(token)
