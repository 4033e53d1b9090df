"""aiohttp with stalwart: `ResilientMiddleware` for clients, `DeadlineMiddleware` for servers.

The client middleware sends every request of an ``aiohttp.ClientSession``
through a stalwart policy, with the same rules as
`stalwart.httpx.ResilientTransport`; the server middleware runs every
request of a ``web.Application`` under the deadline its caller sent::

    import aiohttp
    from aiohttp import web
    import stalwart as sw
    from stalwart.aiohttp import DeadlineMiddleware, ResilientMiddleware

    session = aiohttp.ClientSession(middlewares=[ResilientMiddleware(sw.Retry(attempts=4))])
    app = web.Application(middlewares=[DeadlineMiddleware(max_timeout=30.0)])

Client middlewares need aiohttp 3.12 or later. aiohttp runs on asyncio only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, ClassVar, Final, final

try:
    import aiohttp
    from aiohttp import payload, web
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "stalwart.aiohttp needs aiohttp: install it with `pip install 'stalwart[aiohttp]'`"
    ) from exc

from . import _clock, _propagation
from ._deadline import deadline
from ._errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceeded,
    RateLimitExceeded,
    StalwartError,
)
from ._http import (
    DEADLINE_HEADER,
    DEFAULT_RETRY_STATUSES,
    ERROR_RULES,
    IDEMPOTENCY_HEADER,
    IDEMPOTENT_METHODS,
    PROBLEM_JSON,
    ClientRules,
    InboundDeadline,
    deadline_passed,
    error_details,
    header_name,
    milliseconds,
    problem_json,
    response_retry_after,
    retry_after_header,
)
from ._policy import Policy
from ._rate_limiter import RateLimiter
from ._retry import retries_disabled
from ._transport import (
    bind_attempts,
    by_kind,
    client_policy,
    kind_of,
    rate_limit_option,
    time_left,
    translated,
)

__all__ = [  # noqa: RUF022 - in sorted() order, as the public API test checks
    "ClientBulkheadFull",
    "ClientCircuitOpen",
    "ClientDeadlineExceeded",
    "ClientRateLimited",
    "DEFAULT_RETRY_STATUSES",
    "DeadlineMiddleware",
    "HTTP_STATUS_FOR_ERROR",
    "IDEMPOTENT_METHODS",
    "ResilientMiddleware",
    "RetryableStatusError",
    "is_retryable",
]

HTTP_STATUS_FOR_ERROR: Final[dict[type[StalwartError], int]] = {
    kind: int(rule.status) for kind, rule in ERROR_RULES.items()
}
"""The answer `DeadlineMiddleware` gives for each stalwart error a handler lets escape.

(A view of the translation table that `stalwart.asgi.ErrorMiddleware` answers by too.)
"""

_Handler = Callable[[aiohttp.ClientRequest], Awaitable[aiohttp.ClientResponse]]
_Send = Callable[
    [aiohttp.ClientRequest, _Handler, list[aiohttp.ClientResponse]],
    Coroutine[Any, Any, aiohttp.ClientResponse],
]


class RetryableStatusError(aiohttp.ClientResponseError):
    """An attempt got a response whose status is in ``retry_statuses``.

    `ResilientMiddleware` raises it inside the policy, so a `~stalwart.Retry`
    retries it and a circuit breaker counts it as a failure; it never reaches
    the caller, who gets ``response`` back when the policy gives up. As an
    ``aiohttp.ClientResponseError`` it has ``status``, ``headers`` and
    ``request_info``, and ``Retry(on=aiohttp.ClientError)`` matches it.

    Attributes:
        response: the response. Its body is read into memory when it states
            a length of at most 1 MiB (``await response.text()`` and
            ``.json()`` work; its connection is back in the pool); a longer
            one, or one of no stated length, is left unread: the caller
            reads it whole if it gets this response, else its connection is
            closed when the next attempt starts.
        retry_after: the server's ``Retry-After`` in seconds, or None.
    """

    response: aiohttp.ClientResponse
    retry_after: float | None

    def __init__(self, response: aiohttp.ClientResponse, *, retry_after: float | None) -> None:
        super().__init__(
            response.request_info,
            response.history,
            status=response.status,
            message=response.reason or "",
            headers=response.headers,
        )
        self.response = response
        self.retry_after = retry_after


def is_retryable(error: BaseException) -> bool:
    """What the default policy retries: failures that another attempt can mend.

    Connection failures, resets and timeouts (``aiohttp.ClientConnectionError``
    and its kind), a broken response (``aiohttp.ClientPayloadError``),
    `RetryableStatusError`, and an attempt cut short by a `~stalwart.Timeout`
    in the policy. Not TLS and certificate failures, nor a server whose
    certificate fingerprint does not match: those fail the same way again.
    """
    if isinstance(error, (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch)):
        return False
    if isinstance(error, (CircuitOpenError, BulkheadFullError, RateLimitExceeded)):
        return False  # stalwart's own refusals, which are `ClientConnectionError`s here too
    return isinstance(
        error,
        (
            aiohttp.ClientConnectionError,
            aiohttp.ClientPayloadError,
            RetryableStatusError,
            DeadlineExceeded,
        ),
    )


class ClientDeadlineExceeded(aiohttp.ServerTimeoutError, DeadlineExceeded):
    """`~stalwart.DeadlineExceeded` from the policy, as an ``aiohttp.ServerTimeoutError``."""


class ClientCircuitOpen(aiohttp.ClientConnectionError, CircuitOpenError):
    """`~stalwart.CircuitOpenError` from the policy, as an ``aiohttp.ClientConnectionError``."""


class ClientBulkheadFull(aiohttp.ClientConnectionError, BulkheadFullError):
    """`~stalwart.BulkheadFullError` from the policy, as an ``aiohttp.ClientConnectionError``."""


class ClientRateLimited(aiohttp.ClientConnectionError, RateLimitExceeded):
    """`~stalwart.RateLimitExceeded` from the policy, as an ``aiohttp.ClientConnectionError``."""


_MAX_KEPT_BODY: Final = 1_048_576
"""Bytes of a retryable response's body read into memory, at most (its stated length)."""

_CLIENT_ERROR_FOR: Final[dict[type[StalwartError], type[aiohttp.ClientError]]] = by_kind(
    ClientDeadlineExceeded, ClientCircuitOpen, ClientBulkheadFull, ClientRateLimited
)


def _as_client_error(error: StalwartError) -> aiohttp.ClientError | None:
    """The error a caller sees for ``error``, or None to let it through as it is.

    None for an ``aiohttp.ClientError`` already (a nested session's).
    """
    return translated(error, _CLIENT_ERROR_FOR, unless=aiohttp.ClientError)


@final
class ResilientMiddleware:
    """An aiohttp client middleware that sends each request through a stalwart policy.

    Give it to a session (or to one request, ``session.get(url,
    middlewares=[...])``)::

        async with aiohttp.ClientSession(
            middlewares=[ResilientMiddleware(sw.Retry(attempts=4, timeout=10))]
        ) as session:
            async with session.get("https://inventory.internal/items/42") as response:
                item = await response.json()

    Each request is one call of ``policy``, each attempt one real round trip
    (redirects are followed outside the middleware: each hop is a request of
    its own). The rules are those of `stalwart.httpx.ResilientTransport`:

    * A response whose status is in ``retry_statuses`` fails the attempt with
      `RetryableStatusError` after its body is read (its connection goes
      back to the pool). Its ``retry_after`` is the server's ``Retry-After``
      (seconds, or an HTTP date measured against the response's ``Date``),
      which `~stalwart.Retry` honours as a minimum delay, as far as the
      deadline allows. When the policy gives up on it, the last response is
      returned, its body still readable, as it would be without the
      middleware.
    * Connection failures and timeouts fail the attempt too (see
      `is_retryable` for the default policy's choice); after the last attempt
      the error propagates. So does an attempt that a `~stalwart.Timeout` in
      the policy cut short: the default policy retries it too.
    * A ``409 Conflict`` to a request that carries an ``Idempotency-Key``
      (the original request with that key is still running) fails the
      attempt the same way, so it is retried after its ``Retry-After``.
    * Only requests safe to repeat are retried: the idempotent methods (GET,
      HEAD, OPTIONS, PUT, DELETE, TRACE) and requests that carry an
      ``Idempotency-Key`` header. With ``add_idempotency_keys=True`` every
      other request gets a fresh random key, the same on all its attempts.
      Any other request makes one attempt whatever the policy says
      (`~stalwart.Retry` is switched off for it); breakers, timeouts and
      bulkheads still apply.
    * A streamed request body (an async iterable) of a request that may be
      retried is read into memory once, so every attempt sends the same
      bytes; files are re-read from where they started (aiohttp rewinds them).
    * Under an ambient deadline (`~stalwart.deadline`, a ``Retry(timeout=)``,
      a `~stalwart.Timeout`), every attempt carries ``deadline_header`` with
      the whole milliseconds left, and is cancelled when the deadline passes.
      With less than a millisecond left the request is not sent:
      `~stalwart.DeadlineExceeded` is raised.
    * aiohttp's ``ClientTimeout(total=...)`` covers the whole request, every
      attempt and wait: when it passes, retrying stops and the caller gets
      aiohttp's own ``asyncio.TimeoutError`` (with ``retry_after = inf``,
      which stops any `~stalwart.Retry` that reads hints). Its other
      timeouts (``sock_read``, ``connect``, ...) fail one attempt each.
    * Every response an attempt got and the caller does not get back is
      released, its connection returned to the pool.
    * The current trace context travels in the request's headers (unless it
      already carries a ``traceparent``), so the server's spans join the
      caller's trace.

    Only sending the request and receiving the response's headers runs under
    the policy: reading a large body later is not retried.

    aiohttp itself sends an idempotent request once more, around its
    middlewares, when it fails with a dropped connection
    (``aiohttp.ServerDisconnectedError``, ``aiohttp.ClientOSError``): then
    the policy runs a second time, so a server that drops every connection
    sees up to twice its attempts (aiohttp has no public switch for that
    retry).

    **A partner's quota.** ``rate_limit`` puts a `~stalwart.RateLimiter` in
    front of the upstream, as `stalwart.httpx.ResilientTransport`'s does:
    every attempt takes a turn, inside ``policy``; a limiter's ``key``
    callable is given the attempt's ``aiohttp.ClientRequest`` first (``key=
    lambda request, *_: request.url.host`` limits each upstream apart).

    **Errors.** Every error that escapes the middleware is an
    ``aiohttp.ClientError`` (so ``except aiohttp.ClientError`` still works);
    one that stands for a stalwart error is also that error (so ``except
    sw.CircuitOpenError`` works), with the same ``policy`` and attributes:
    `~stalwart.DeadlineExceeded` escapes as `ClientDeadlineExceeded` (an
    ``aiohttp.ServerTimeoutError``), `~stalwart.CircuitOpenError`,
    `~stalwart.BulkheadFullError` and `~stalwart.RateLimitExceeded` as
    `ClientCircuitOpen`, `ClientBulkheadFull` and `ClientRateLimited` (each
    an ``aiohttp.ClientConnectionError``: the request was not sent).

    Args:
        policy: the policy each request goes through. Default:
            ``Retry(attempts=3, on=is_retryable, name=name)``.
        retry_statuses: statuses that fail an attempt (may be empty).
        deadline_header: the header carrying the deadline downstream, or
            None to send none.
        add_idempotency_keys: give non-idempotent requests an
            ``Idempotency-Key`` so that they can be retried.
        idempotency_header: the name of that header.
        name: reported as the ``policy`` of the middleware's own errors,
            and the name of the default policy.
        rng: the ``random.Random`` keys are drawn from (default:
            ``uuid.uuid4()``, from the operating system's randomness).
        rate_limit: a `~stalwart.RateLimiter` every attempt goes through, or None.
    """

    __slots__ = (
        "_name",
        "_policy",
        "_rate_limit",
        "_rules",
        "_send",
    )

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        retry_statuses: Iterable[int] = DEFAULT_RETRY_STATUSES,
        deadline_header: str | None = DEADLINE_HEADER,
        add_idempotency_keys: bool = False,
        idempotency_header: str = IDEMPOTENCY_HEADER,
        name: str = "aiohttp",
        rng: random.Random | None = None,
        rate_limit: RateLimiter | None = None,
    ) -> None:
        self._name, policy = client_policy(policy, name=name, retry_on=is_retryable)
        self._policy = policy
        self._rules = ClientRules(
            retry_statuses=retry_statuses,
            deadline_header=deadline_header,
            add_idempotency_keys=add_idempotency_keys,
            idempotency_header=idempotency_header,
            rng=rng,
        )
        self._rate_limit = rate_limit_option(rate_limit)
        # Bound once: the policy's per-function set-up is not paid per request.
        self._send: _Send = bind_attempts(policy, self._attempt, self._rate_limit, self._attempt)

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def rate_limit(self) -> RateLimiter | None:
        """The limiter every attempt goes through, or None."""
        return self._rate_limit

    @property
    def retry_statuses(self) -> frozenset[int]:
        return self._rules.retry_statuses

    async def __call__(
        self, request: aiohttp.ClientRequest, handler: _Handler
    ) -> aiohttp.ClientResponse:
        """Send ``request`` through the policy; see the class documentation."""
        retryable = self._rules.repeatable(request.method, request.headers)
        body = request.body
        if retryable and isinstance(body, payload.AsyncIterablePayload):
            await body.as_bytes()  # kept by the payload: every attempt sends it again
        received: list[aiohttp.ClientResponse] = []
        try:
            if retryable:
                response = await self._send(request, handler, received)
            else:
                with retries_disabled():
                    response = await self._send(request, handler, received)
        except RetryableStatusError as failed:
            if failed.response not in received:
                raise  # a nested middleware's, for its own caller
            response = failed.response
        except StalwartError as error:
            _release(received, None)
            client_error = _as_client_error(error)
            if client_error is None:
                raise
            raise client_error from error
        except BaseException:
            _release(received, None)
            raise
        _release(received, response)
        return response

    async def _attempt(
        self,
        request: aiohttp.ClientRequest,
        handler: _Handler,
        received: list[aiohttp.ClientResponse],
    ) -> aiohttp.ClientResponse:
        """One round trip: what the policy calls, retries and times."""
        left = time_left(self._name, "{} {} not sent", request.method, request.url)
        header = self._rules.deadline_header
        if left is not None and header is not None:
            request.headers[header] = milliseconds(left)
        trace = _propagation.outgoing()
        if trace and _propagation.TRACEPARENT not in request.headers:
            request.headers.update(trace)
        # A new attempt: no earlier response is handed back to the caller now,
        # so give back their connections (closing those whose body is unread).
        for earlier in received:
            earlier.release()
        try:
            response = await handler(request)
            received.append(response)
            if self._rules.retryable(response.status, request.headers):
                length = response.content_length
                if length is not None and length <= _MAX_KEPT_BODY:
                    # Read whole, so that the caller can read it: its end gives
                    # the connection back to the pool. (Not release(): a
                    # released response's read() fails, and the caller may
                    # get it.) Longer, or of no stated length (an endless
                    # one hung the request): left unread, for the caller if
                    # it is the last, else closed when the next attempt starts.
                    await response.read()
                retry_after = response_retry_after(response.headers)
                raise RetryableStatusError(response, retry_after=retry_after)
        except TimeoutError as error:
            if type(error) is TimeoutError:
                # aiohttp's own timer, ``ClientTimeout.total`` (its other
                # timeouts are ClientErrors): it covers every attempt and,
                # once passed, fails any other before its answer, after
                # sending it. A hint longer than any backoff stops a Retry.
                error.retry_after = math.inf  # type: ignore[attr-defined]
            raise
        return response

    def __repr__(self) -> str:
        return f"ResilientMiddleware({self._policy!r})"


def _release(received: list[aiohttp.ClientResponse], kept: aiohttp.ClientResponse | None) -> None:
    """Give back the connection of every response the caller will not get."""
    for response in received:
        if response is not kept:
            response.release()


# -- the server side --------------------------------------------------------------------


def _websocket_handshake(request: web.BaseRequest) -> bool:
    """Is ``request`` a WebSocket handshake (RFC 6455, 4.1), not one that merely says so?

    A header alone is the client's word: any request could claim ``Upgrade:
    websocket`` to run without a deadline.
    """
    headers = request.headers
    connection = (part.strip().lower() for part in headers.get("Connection", "").split(","))
    return (
        request.method == "GET"
        and headers.get("Upgrade", "").strip().lower() == "websocket"
        and "upgrade" in connection
        and bool(headers.get("Sec-WebSocket-Key"))
    )


def _problem(
    status: int,
    title: str,
    detail: str,
    *,
    retry_after: int | None,
    extensions: Mapping[str, str] | None = None,
) -> web.Response:
    """An ``application/problem+json`` answer (RFC 9457), as `stalwart.asgi` gives."""
    response = web.Response(
        status=status,
        text=problem_json(status, title, detail, extensions),
        content_type=PROBLEM_JSON,
    )
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


@final
class DeadlineMiddleware:
    """An aiohttp server middleware: each request runs under the deadline its caller sent.

    Give it to the application::

        app = web.Application(middlewares=[DeadlineMiddleware(max_timeout=10.0)])

    The request's time limit is read from ``header`` (milliseconds, as
    `ResilientMiddleware` and `stalwart.httpx.ResilientTransport` send it),
    capped at ``max_timeout``; a request without a usable value gets
    ``default_timeout`` (None: no deadline). A malformed value is ignored as
    if absent: a caller's typo never turns into a 500. A WebSocket handshake
    (a ``GET`` with ``Connection: upgrade``, ``Upgrade: websocket`` and a
    ``Sec-WebSocket-Key``) gets no deadline: a deadline bounds a request,
    not a connection that stays open as long as its peers want (as
    `stalwart.asgi` leaves ``websocket`` scopes alone). Any other request
    keeps its deadline, whatever ``Upgrade`` header it carries.

    The handler then runs inside ``stalwart.deadline(limit)``:
    `stalwart.remaining` reports the time left, every stalwart policy
    respects it, and outbound calls through `ResilientMiddleware` (or a gRPC
    channel with `stalwart.grpc.ClientInterceptor`) pass what remains on.
    When the deadline passes, the handler is cancelled and, if its response
    has not started, the client gets ``504 Gateway Timeout``; one that has
    started streaming is left unfinished and its connection closed, so that
    the client sees a truncated response rather than one that looks
    complete.

    A stalwart error that escapes the handler is answered as
    `stalwart.asgi`'s ``ErrorMiddleware`` answers it, with a small
    ``application/problem+json`` body naming the error's kind and policy
    (never a traceback): `~stalwart.DeadlineExceeded` → 504,
    `~stalwart.CircuitOpenError`, `~stalwart.BulkheadFullError`,
    `~stalwart.RateLimitExceeded` → 503 with ``Retry-After`` (whole seconds,
    rounded up) when the error knows it.

    The trace context the caller sent (W3C ``traceparent``) is the
    handler's current context, unless a span is already current (an
    OpenTelemetry server instrumentation made the request's span).

    Args:
        header: the header carrying milliseconds, or None to ignore it.
        max_timeout: the longest deadline a caller may ask for, in seconds
            (> 0), or None for no cap.
        default_timeout: seconds allowed to requests that carry no usable
            value (> 0), or None to run them without a deadline. It is
            capped at ``max_timeout`` too.
    """

    # aiohttp calls a middleware marked so as `middleware(request, handler)`.
    __middleware_version__: ClassVar[int] = 1
    __slots__ = ("_header", "_limits")

    def __init__(
        self,
        *,
        header: str | None = DEADLINE_HEADER,
        max_timeout: float | None = 60.0,
        default_timeout: float | None = None,
    ) -> None:
        self._header = None if header is None else header_name("header", header)
        self._limits = InboundDeadline(max_timeout=max_timeout, default_timeout=default_timeout)

    def timeout_for(self, request: web.BaseRequest) -> float | None:
        """The deadline, in seconds, that this request gets (None: none)."""
        if _websocket_handshake(request):
            return None  # a connection that lasts as long as its peers want
        value = None if self._header is None else request.headers.get(self._header)
        # A character beyond ASCII becomes "?", which makes the value malformed.
        return self._limits.limit(None if value is None else value.encode("ascii", "replace"))

    async def __call__(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        seconds = self.timeout_for(request)
        headers = [(name.lower(), value) for name, value in request.headers.items()]
        with _propagation.extracted(headers):
            if seconds is None:
                try:
                    return await handler(request)
                except StalwartError as error:
                    return self._answer(request, error, None)
            scope = deadline(seconds, name="DeadlineMiddleware")
            try:
                with scope:
                    return await handler(request)
            except StalwartError as error:
                expired = isinstance(error, DeadlineExceeded) and _clock.now() >= scope.when
                return self._answer(request, error, seconds if expired else None)

    def _answer(
        self, request: web.Request, error: StalwartError, expired: float | None
    ) -> web.StreamResponse:
        """The problem answer for ``error`` (``expired``: this request's deadline passed)."""
        kind = kind_of(error, ERROR_RULES)
        if kind is None or request.writer.output_size > 0:
            # Not ours, or too late for an answer: aiohttp closes the connection
            # of a response that has started.
            raise error
        rule = ERROR_RULES[kind]
        detail = error_details(kind, error) if expired is None else deadline_passed(expired)
        return _problem(
            rule.status,
            rule.status.phrase,
            detail,
            retry_after=retry_after_header(error),
            extensions={"policy": error.policy, "kind": rule.kind},
        )

    def __repr__(self) -> str:
        return f"DeadlineMiddleware(max_timeout={self._limits.max_timeout})"
