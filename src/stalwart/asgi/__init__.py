"""ASGI middleware: the inbound end of stalwart's deadlines, errors, idempotency keys and load.

`DeadlineMiddleware` reads the deadline a caller sent (``x-request-timeout-ms``,
as `stalwart.httpx.ResilientTransport` sends it, or gRPC's ``grpc-timeout``)
and runs the request under `stalwart.deadline`, so every policy and every
outbound call inside it knows how long it has left. `ErrorMiddleware` answers
an open circuit, a full bulkhead or a rate limit with a 503 and a passed
deadline with a 504, instead of a 500. `IdempotencyMiddleware` runs each
request that carries an ``Idempotency-Key`` once, and answers its repeats
with the stored response. `RateLimitMiddleware` gives each client a
`stalwart.RateLimiter`'s limit, and answers a client over it with a 429 that
says when to come back. `LoadShedMiddleware` admits requests through a
concurrency limit and refuses the rest at once, with those that would time
out anyway::

    from stalwart.asgi import DeadlineMiddleware, ErrorMiddleware, IdempotencyMiddleware

    app = IdempotencyMiddleware(DeadlineMiddleware(ErrorMiddleware(app), max_timeout=30.0))

`BreakerHealth` is an app of its own, to mount where a readiness probe looks:
it answers with the states of the service's circuit breakers, as JSON.

Plain ASGI 3: they work under any server and around any framework (Starlette,
FastAPI, Django, Quart, ...). Only ``http`` requests are handled; lifespan and
websocket scopes pass straight through.
"""

from __future__ import annotations

from .._http import parse_grpc_timeout, parse_timeout_ms
from ._deadline import DeadlineMiddleware
from ._errors import ErrorMiddleware
from ._health import BreakerHealth
from ._idempotency import (
    DEFAULT_CREDENTIALS,
    Credentials,
    IdempotencyMiddleware,
    parse_idempotency_key,
)
from ._load_shed import LoadShedMiddleware
from ._rate_limit import RateLimitMiddleware, client_address
from ._types import ASGIApp, Message, Receive, Scope, Send

__all__ = [  # noqa: RUF022 - plainly sorted, as the other modules (tests/test_public_api.py)
    "ASGIApp",
    "BreakerHealth",
    "Credentials",
    "DEFAULT_CREDENTIALS",
    "DeadlineMiddleware",
    "ErrorMiddleware",
    "IdempotencyMiddleware",
    "LoadShedMiddleware",
    "Message",
    "RateLimitMiddleware",
    "Receive",
    "Scope",
    "Send",
    "client_address",
    "parse_grpc_timeout",
    "parse_idempotency_key",
    "parse_timeout_ms",
]
