"""The deadline a caller sent, as the ambient deadline of its request: `DeadlineMiddleware`."""

from __future__ import annotations

import re
from typing import Final, final

from .. import _clock, _validate
from .._deadline import deadline
from .._errors import DeadlineExceeded
from .._http import (
    DEADLINE_HEADER,
    header_name,
)
from ._types import ASGIApp, Receive, Scope, Send, _header_value, _send_problem, _Watched

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

    __slots__ = ("_app", "_default", "_grpc", "_header", "_max")

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
        self._max = _validate.optional_duration("max_timeout", max_timeout, positive=True)
        default = _validate.optional_duration("default_timeout", default_timeout, positive=True)
        if default is not None and self._max is not None:
            default = min(default, self._max)
        self._default = default
        if not isinstance(grpc_timeout, bool):
            raise TypeError(f"grpc_timeout must be a bool, not {type(grpc_timeout).__name__}")
        self._grpc = grpc_timeout

    @property
    def app(self) -> ASGIApp:
        """The wrapped application."""
        return self._app

    def timeout_for(self, scope: Scope) -> float | None:
        """The deadline, in seconds, that this request gets (None: none)."""
        limit: float | None = None
        if self._header is not None:
            value = _header_value(scope, self._header)
            if value is not None:
                limit = parse_timeout_ms(value)
        if self._grpc:
            value = _header_value(scope, b"grpc-timeout")
            if value is not None:
                grpc = parse_grpc_timeout(value)
                if grpc is not None and (limit is None or grpc < limit):
                    limit = grpc
        if limit is None:
            return self._default
        if self._max is not None and limit > self._max:
            return self._max
        return limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        seconds = self.timeout_for(scope)
        if seconds is None:
            await self._app(scope, receive, send)
            return
        watched = _Watched(send)
        scope_deadline = deadline(seconds, name="DeadlineMiddleware")
        try:
            with scope_deadline:
                await self._app(scope, receive, watched)
        except DeadlineExceeded:
            # The app's own errors (an inner Timeout it let through) are not
            # ours to answer: only the expiry of this request's deadline is.
            if _clock.now() < scope_deadline.when:
                raise
            if not watched.started:
                await _send_problem(
                    send,
                    504,
                    "Gateway Timeout",
                    f"The request's deadline of {seconds * 1000.0:g} ms passed "
                    "before a response was ready.",
                )

    def __repr__(self) -> str:
        return f"DeadlineMiddleware({self._app!r}, max_timeout={self._max})"
