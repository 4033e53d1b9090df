"""Stalwart errors that escape an app, answered as 503s and 504s: `ErrorMiddleware`."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import final

from .._errors import StalwartError
from .._http import (
    ErrorRule,
    error_rule,
    retry_after_header,
)
from ._types import ASGIApp, Message, Receive, Scope, Send, _log, _send_problem


def _alone(error: BaseException) -> BaseException:
    """The one exception that (nested) groups of one hold, or ``error``."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _stalwart_error(exc: Exception) -> tuple[StalwartError, ErrorRule] | None:
    """The error of `ERROR_RULES` that ``exc`` is, or holds alone in (nested) groups."""
    error = _alone(exc)
    rule = error_rule(error)
    if rule is None or not isinstance(error, StalwartError):
        return None
    return error, rule


@final
class ErrorMiddleware:
    """Answer a stalwart error that escapes the app with a 503 or a 504, not a 500.

    An open circuit, a full bulkhead or a rate limit inside a request handler
    mean "the service cannot do this now", and a deadline that passed means
    "not in time": a client or a load balancer acts on a ``503 Service
    Unavailable`` (with a ``Retry-After`` when the error knows when to come
    back) or a ``504 Gateway Timeout``, not on a 500 with a traceback. When
    one of these errors escapes the app before its response has started, the
    client gets an ``application/problem+json`` answer (RFC 9457) instead:

    * `~stalwart.CircuitOpenError`: 503, with ``Retry-After`` from its
      ``retry_after``;
    * `~stalwart.RateLimitExceeded`: 503, with ``Retry-After`` from its
      ``retry_after`` when it knows one;
    * `~stalwart.BulkheadFullError`: 503;
    * `~stalwart.DeadlineExceeded`: 504.

    ``Retry-After`` is in whole seconds, rounded up. The body's ``title``
    is the status's phrase; ``detail`` is a sentence naming the policy;
    the extension members ``policy`` (the error's ``policy``) and ``kind``
    (``"circuit_open"``, ``"rate_limited"``, ``"bulkhead_full"``,
    ``"deadline_exceeded"``) are for programs. Nothing else of the error
    (its message, its traceback) reaches the client; the traceback is logged
    at DEBUG level on the ``stalwart.asgi`` logger.

    The errors are recognised by class, subclasses included: the httpx
    errors `stalwart.httpx.ResilientTransport` raises for them (a
    ``TransportCircuitOpenError`` is a `~stalwart.CircuitOpenError`) are
    answered alike, and so is an exception group holding one of them alone
    (an ``anyio`` task group's). Any other exception propagates, for the
    server (or the framework's error handling) to answer; so does every
    exception once the response has started, so that the server closes the
    connection on a truncated response rather than appending to it.

    Add it around the application: ``app = ErrorMiddleware(app)``, or with
    FastAPI and Starlette ``app.add_middleware(ErrorMiddleware)``, which puts
    it inside the framework's own 500 handler and outside the routes, so
    that exception handlers registered for these errors
    (``@app.exception_handler(sw.CircuitOpenError)``) still take precedence.
    Only ``http`` requests are handled; other scopes pass straight through.
    """

    __slots__ = ("_app",)

    def __init__(self, app: ASGIApp) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, not {type(app).__name__}")
        self._app = app

    @property
    def app(self) -> ASGIApp:
        """The wrapped application."""
        return self._app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        started = False

        def watched(message: Message) -> Awaitable[None]:
            # A call per message, not a coroutine: the server's own awaitable.
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            return send(message)

        try:
            await self._app(scope, receive, watched)
        except Exception as exc:
            found = None if started else _stalwart_error(exc)
            if found is None:
                raise
            error, rule = found
            _log.debug(
                "ErrorMiddleware: %s from %r answered %d",
                type(error).__name__,
                error.policy,
                rule.status,
                exc_info=True,
            )
            await _send_problem(
                send,
                rule.status,
                rule.status.phrase,
                rule.detail.format(policy=error.policy),
                retry_after=retry_after_header(error),
                extensions={"policy": error.policy, "kind": rule.kind},
            )

    def __repr__(self) -> str:
        return f"ErrorMiddleware({self._app!r})"
