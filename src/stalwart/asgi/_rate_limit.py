"""Each client's request rate, limited: `RateLimitMiddleware`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import final

from .._errors import RateLimitExceeded
from .._http import rate_limit_field, rate_limit_policy_field, seconds_after
from .._keys import KEY_MAX_LENGTH, Key
from .._rate_limiter import RateLimiter
from ._types import ASGIApp, Message, Receive, Scope, Send, _send_problem

__all__ = ["RateLimitMiddleware", "client_address"]

ScopeKey = Callable[[Scope], Key | None]

_POLICY_HEADER = b"ratelimit-policy"
_STATE_HEADER = b"ratelimit"


def client_address(scope: Scope) -> str:
    """The default key: the client's address (``scope["client"]``'s host), or ``"unknown"``.

    Behind a reverse proxy every request comes from the proxy: run the
    server so that it sets the client from the header the proxy sends
    (uvicorn's ``--proxy-headers`` with ``--forwarded-allow-ips``), or pass
    a ``key`` that reads the address you trust.
    """
    client = scope.get("client")
    if client:
        host = client[0]
        if isinstance(host, str) and host:
            return host
    return "unknown"


@final
class RateLimitMiddleware:
    """Limit each client's requests with a `~stalwart.RateLimiter`; 429 when over.

    Every HTTP request takes a turn of its client's limit (``key``: by
    default the client's address). A request over the limit gets ``429 Too
    Many Requests`` at once, with:

    * ``Retry-After``: whole seconds (rounded up) until its client may send
      one: a client that waits that long is let through (unless it spent the
      permit meanwhile, or shares its key with others);
    * ``RateLimit-Policy`` and ``RateLimit``, the fields of the IETF draft
      (draft-ietf-httpapi-ratelimit-headers): ``"<limiter name>";q=<calls>;w=<seconds>``
      (the quota a steady client may use per window) and
      ``"<limiter name>";r=0;t=<seconds>``;
    * an ``application/problem+json`` body naming the limiter.

    Requests let through carry the same two fields on their response, with
    ``r`` the requests the client may still make at once and ``t`` the
    seconds until it may make one more (no ``t`` when it is at its full
    burst). With the limiter's ``max_wait``, a request over the limit waits
    for its turn instead, as far as its deadline allows (put this middleware
    inside `DeadlineMiddleware` to give it the caller's deadline).

    Each request is a call through the limiter: its metrics count the
    requests refused (``rejected``) and how the others ended.

    Args:
        app: the ASGI application to protect.
        limiter: the `~stalwart.RateLimiter` whose limit each client gets
            (built without ``key=``: this middleware says which key a
            request has).
        key: a callable of the ASGI scope returning the request's key (a
            ``str``, or an ``int``), or None to let the request through
            unlimited; default `client_address`. A ``str`` that is empty or
            longer than 255 characters (read from a header, say) counts as
            its SHA-256.
        headers: also add ``RateLimit-Policy`` and ``RateLimit`` to the
            responses of requests let through.

    Example::

        limiter = sw.RateLimiter(10, burst=20, name="api")  # 10 requests a second per client
        app = RateLimitMiddleware(app, limiter=limiter)
    """

    __slots__ = ("_app", "_headers", "_key", "_limiter", "_policy_field")

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter,
        key: ScopeKey | None = None,
        headers: bool = True,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, not {type(app).__name__}")
        if not isinstance(limiter, RateLimiter):
            raise TypeError(f"limiter must be a stalwart.RateLimiter, not {type(limiter).__name__}")
        if limiter._key is not None:
            raise ValueError(
                "limiter must be built without key=: its key= reads a function's arguments, "
                "while the middleware's key= reads the request (pass key= to the middleware)"
            )
        if key is not None and not callable(key):
            raise TypeError(
                f"key must be a callable of the ASGI scope or None, not {type(key).__name__}"
            )
        if not isinstance(headers, bool):
            raise TypeError(f"headers must be a bool, not {type(headers).__name__}")
        self._app = app
        self._limiter = limiter
        self._key: ScopeKey = client_address if key is None else key
        self._headers = headers
        self._policy_field = rate_limit_policy_field(
            limiter.name, limiter.rate, limiter.per
        ).encode()

    @property
    def app(self) -> ASGIApp:
        """The wrapped application."""
        return self._app

    @property
    def limiter(self) -> RateLimiter:
        return self._limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        key = _bounded(self._key(scope))
        if key is None:
            await self._app(scope, receive, send)
            return
        limiter = self._limiter
        metrics = limiter.metrics
        timer = limiter.timer()
        start = None if timer is None else timer()
        try:
            checked, ahead = await limiter._admit(key, start)
        except RateLimitExceeded as exc:
            await self._refuse(send, exc)
            return
        if self._headers:
            send = self._with_fields(send, checked, ahead)
        try:
            await self._app(scope, receive, send)
        except BaseException as exc:
            metrics.failed(exc, start)
            raise
        metrics.succeeded(start)

    def _with_fields(self, send: Send, key: str | None, ahead: float | None) -> Send:
        """``send``, adding the limit's fields to the response's headers."""
        remaining, reset = self._limiter._headroom(key, ahead)
        fields = [
            (_POLICY_HEADER, self._policy_field),
            (_STATE_HEADER, rate_limit_field(self._limiter.name, remaining, reset).encode()),
        ]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *fields]
            await send(message)

        return sending

    async def _refuse(self, send: Send, error: RateLimitExceeded) -> None:
        retry_after = 0.0 if error.retry_after is None else error.retry_after
        name = self._limiter.name
        await _send_problem(
            send,
            429,
            "Too Many Requests",
            f"Rate limit {name!r}: too many requests from this client; retry later.",
            retry_after=seconds_after(retry_after),
            extensions={"policy": name, "kind": "rate_limited"},
            headers=[
                (_POLICY_HEADER, self._policy_field),
                (_STATE_HEADER, rate_limit_field(name, 0, retry_after).encode()),
            ],
        )

    def __repr__(self) -> str:
        return f"RateLimitMiddleware({self._app!r}, limiter={self._limiter!r})"


def _bounded(key: object) -> object:
    """A key read from a request, bounded: an empty or long ``str`` becomes its SHA-256."""
    if type(key) is str and not 0 < len(key) <= KEY_MAX_LENGTH:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return key
