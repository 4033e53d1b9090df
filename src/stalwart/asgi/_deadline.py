"""The deadline a caller sent, as the ambient deadline of its request: `DeadlineMiddleware`."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Final, final

from .. import _clock, _propagation
from .._deadline import deadline
from .._errors import DeadlineExceeded
from .._http import (
    DEADLINE_HEADER,
    InboundDeadline,
    deadline_passed,
    header_name,
)
from .._transport import first_value
from ._types import ASGIApp, Message, Receive, Scope, Send, _send_problem

_TRACEPARENT: Final = _propagation.TRACEPARENT.encode()


@final
class DeadlineMiddleware:
    """Run each HTTP request under the deadline its caller sent.

    The request's time limit is read from ``header`` (milliseconds, as
    `stalwart.httpx.ResilientTransport` sends it) and, with
    ``grpc_timeout=True``, from ``grpc-timeout`` too (the nearer wins). It is
    capped at ``max_timeout``; a request without a usable value gets
    ``default_timeout`` (None: no deadline). A malformed value is ignored as
    if absent: a caller's typo never turns into a 500.

    The app then runs inside ``stalwart.deadline(limit)``: `stalwart.remaining`
    reports the time left, every stalwart policy respects it, and outbound
    calls through `stalwart.httpx.ResilientTransport` pass what remains on.
    When the deadline passes, the app is cancelled and:

    * if the response has not started, the client gets ``504 Gateway
      Timeout`` with a small ``application/problem+json`` body;
    * if it has, the response is left unfinished, so the server closes the
      connection and the client sees a truncated response rather than one
      that looks complete. (Servers log that, uvicorn as "ASGI callable
      returned without completing response".)

    The time a request spends on the network before it reaches the app is
    not deducted: the app gets the full limit from when it starts.

    The trace its caller sent (W3C ``traceparent``, or what the global
    OpenTelemetry propagator reads) is the current one while the app runs,
    so that stalwart's spans, and the ``traceparent`` that
    `stalwart.httpx.ResilientTransport` sends on, join the caller's trace.
    Where a span is already current (a server instrumentation such as
    ``opentelemetry-instrumentation-asgi`` made the request's span), it
    stays so.

    Args:
        app: the ASGI application to protect.
        header: the header carrying milliseconds, or None to ignore it.
        max_timeout: the longest deadline a caller may ask for, in seconds
            (> 0), or None for no cap.
        default_timeout: seconds allowed to requests that carry no usable
            value (> 0), or None to run them without a deadline. It is
            capped at ``max_timeout`` too.
        grpc_timeout: also read gRPC's ``grpc-timeout`` header.

    Example::

        app = DeadlineMiddleware(app, max_timeout=10.0, default_timeout=5.0)
    """

    __slots__ = ("_app", "_grpc", "_header", "_limits")

    def __init__(
        self,
        app: ASGIApp,
        *,
        header: str | None = DEADLINE_HEADER,
        max_timeout: float | None = 60.0,
        default_timeout: float | None = None,
        grpc_timeout: bool = False,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, not {type(app).__name__}")
        self._app = app
        self._header = None if header is None else header_name("header", header).lower().encode()
        self._limits = InboundDeadline(max_timeout=max_timeout, default_timeout=default_timeout)
        if not isinstance(grpc_timeout, bool):
            raise TypeError(f"grpc_timeout must be a bool, not {type(grpc_timeout).__name__}")
        self._grpc = grpc_timeout

    @property
    def app(self) -> ASGIApp:
        """The wrapped application."""
        return self._app

    def timeout_for(self, scope: Scope) -> float | None:
        """The deadline, in seconds, that this request gets (None: none)."""
        header = self._header
        return self._limits.limit(
            None if header is None else first_value(scope["headers"], header),
            first_value(scope["headers"], b"grpc-timeout") if self._grpc else None,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = scope["headers"]
        # Written out in one coroutine, not split in two: this runs per request.
        token = None
        if first_value(headers, _TRACEPARENT) is not None:
            token = _propagation.attach(
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in headers
            )
        try:
            seconds = self.timeout_for(scope)
            if seconds is None:
                await self._app(scope, receive, send)
                return
            started = False

            def watched(message: Message) -> Awaitable[None]:
                # A call per message, not a coroutine: the server's own awaitable.
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                return send(message)

            scope_deadline = deadline(seconds, name="DeadlineMiddleware")
            try:
                with scope_deadline:
                    await self._app(scope, receive, watched)
            except DeadlineExceeded:
                # The app's own errors (an inner Timeout it let through) are not
                # ours to answer: only the expiry of this request's deadline is.
                if _clock.now() < scope_deadline.when:
                    raise
                if not started:
                    await _send_problem(send, 504, "Gateway Timeout", deadline_passed(seconds))
        finally:
            if token is not None:
                _propagation.detach(token)

    def __repr__(self) -> str:
        return f"DeadlineMiddleware({self._app!r}, max_timeout={self._limits.max_timeout})"
