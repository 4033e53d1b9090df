"""Make any ``httpx.AsyncClient`` resilient: `ResilientTransport`.

Wrap the client's transport and every request it sends goes through a
stalwart policy (a `~stalwart.Retry`, a `~stalwart.Pipeline`, any policy) as
one logical call, each attempt a real round trip::

    import httpx
    import stalwart as sw
    from stalwart.httpx import ResilientTransport

    client = httpx.AsyncClient(
        transport=ResilientTransport(sw.Pipeline(sw.Retry(attempts=4), sw.Timeout(2)))
    )

What the transport adds to the policy:

* responses whose status is in ``retry_statuses`` (429, 502, 503, 504 by
  default) fail the attempt with `RetryableStatusError`, so they are retried
  and counted by breakers; when the policy gives up on one, the caller gets
  that last response back, not an exception;
* a ``Retry-After`` header (seconds or an HTTP date) becomes the error's
  ``retry_after``, which `~stalwart.Retry` waits out;
* only requests that are safe to repeat are retried: idempotent methods and
  requests carrying an ``Idempotency-Key`` (which it can add for you), also
  when the server answers 409 because the key's first request still runs;
* every error that leaves it is an ``httpx.HTTPError``, and the stalwart
  error it stands for too (`TransportCircuitOpenError`, ...);
* under an ambient deadline (`~stalwart.deadline`) every attempt tells the
  server how long it has left, in ``x-request-timeout-ms``, and never waits on
  the network longer than that itself;
* within a trace, every attempt carries it downstream (W3C ``traceparent``,
  or what the global OpenTelemetry propagator writes), unless the request
  already carries a ``traceparent`` of its own;
* with ``per_host=``, every upstream (scheme, host and port) gets a policy of
  its own inside the shared one, typically a `~stalwart.CircuitBreaker`, so
  that one sick upstream does not open the circuit for all;
* with ``hedge=``, a request safe to repeat that is slow to answer is sent
  again beside the first (a `~stalwart.Hedge`, learning each upstream's
  latency apart), the first response wins and the others are closed.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Final, final

import anyio

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "stalwart.httpx needs httpx: install it with `pip install 'stalwart[httpx]'`"
    ) from exc

from . import _propagation, _validate
from ._errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceeded,
    RateLimitExceeded,
    StalwartError,
)
from ._hedge import Hedge
from ._http import (
    DEADLINE_HEADER,
    DEFAULT_RETRY_STATUSES,
    IDEMPOTENCY_HEADER,
    IDEMPOTENT_METHODS,
    ClientRules,
    milliseconds,
    parse_retry_after,
    response_retry_after,
)
from ._keys import validated_key
from ._per_key import PerKey
from ._policy import Binding, Policy
from ._rate_limiter import RateLimiter
from ._retry import retries_disabled
from ._transport import (
    bind_attempts,
    by_kind,
    client_policy,
    hedge_option,
    policy_factory,
    rate_limit_option,
    time_left,
    translated,
)

__all__ = [
    "DEFAULT_MAX_HOSTS",
    "DEFAULT_RETRY_ON",
    "DEFAULT_RETRY_STATUSES",
    "IDEMPOTENT_METHODS",
    "ResilientTransport",
    "RetryableStatusError",
    "TransportBulkheadFullError",
    "TransportCircuitOpenError",
    "TransportDeadlineExceeded",
    "TransportRateLimitExceeded",
    "parse_retry_after",
]

DEFAULT_MAX_HOSTS: Final = 100
"""How many upstreams keep a ``per_host`` policy at once, by default."""

_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}

_MAX_KEPT_BODY: Final = 1_048_576
"""Bytes of a retryable response's body read into memory, at most.

A longer body is left unread, its connection open, until the request's next
attempt starts (a hedge's too): its response is closed then, or when the
request ends, unless it is the one the caller gets back."""

# The oversized retryable responses of the request being sent (None outside
# `handle_async_request`): a list shared with the tasks its policy starts.
_unread: ContextVar[list[httpx.Response] | None] = ContextVar(
    "stalwart.httpx unread responses", default=None
)

_Send = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]
_Origin = tuple[str, bytes, int | None]  # scheme, raw host, port (None: the default)
# An upstream's own hedge, and `policy` bound around it (its `per_host` policy
# is kept by a `PerKey`, inside).
_Host = tuple[Hedge, _Send]


async def _close(response: httpx.Response) -> None:
    """Release a response that lost a hedged race: its connection goes back to the pool."""
    await response.aclose()


# Seconds a response's closing may take when its task is being cancelled (an
# HTTP/1.1 connection closes at once; an HTTP/2 stream sends a reset first).
_CLOSE_TIMEOUT: Final = 5.0


async def _close_unread(responses: list[httpx.Response], kept: httpx.Response | None) -> None:
    """Close the retryable responses a request discarded (all but ``kept``), also when cancelled.

    An oversized one still holds its connection, with the rest of its body
    unread: closing it closes the connection (reading the rest could take
    long, or forever).
    """
    with anyio.move_on_after(_CLOSE_TIMEOUT, shield=True):
        for response in responses:
            if response is not kept:
                await response.aclose()


class RetryableStatusError(httpx.HTTPStatusError):
    """An attempt got a response whose status is in ``retry_statuses``.

    (Or a 409 to a request carrying an ``Idempotency-Key``: the server is
    still running that key's first request.)

    `ResilientTransport` raises it inside the policy, so a `~stalwart.Retry`
    retries it and a circuit breaker counts it as a failure; it never reaches
    the caller, who gets ``response`` back when the policy gives up. Name it in
    a policy's options to single it out, for instance
    ``Retry(on=(httpx.TransportError, RetryableStatusError))``. As an
    ``httpx.HTTPStatusError`` it is also matched by ``on=httpx.HTTPError``.

    Attributes:
        request: the caller's request.
        response: the response, read into memory: ``response.content``,
            ``.text`` and ``.json()`` work (its connection is already back
            in the pool). A body longer than 1 MiB is not read: that
            response is left unread (``.aread()`` it to see the body), and
            closed, with its connection, when the next attempt starts or
            the request ends, unless it is the response returned.
        retry_after: the server's ``Retry-After`` in seconds, or None.
    """

    retry_after: float | None
    _body: bytes | None = None  # the body as it came (still encoded), when the transport made it

    def __init__(
        self,
        message: str,
        *,
        request: httpx.Request,
        response: httpx.Response,
        retry_after: float | None,
    ) -> None:
        super().__init__(message, request=request, response=response)
        self.retry_after = retry_after


DEFAULT_RETRY_ON: Final[tuple[type[Exception], ...]] = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProxyError,
    RetryableStatusError,
    DeadlineExceeded,
)
"""What the default policy retries: every ``httpx.TransportError`` a retry can
mend (not ``UnsupportedProtocol`` or ``LocalProtocolError``),
`RetryableStatusError`, and an attempt cut short by a `~stalwart.Timeout`
(`~stalwart.DeadlineExceeded`), like httpx's own timeouts. (A deadline
that has passed leaves no time for another attempt: the retry stops.)"""


# -- the errors that escape the transport ----------------------------------------------
#
# Each is the stalwart error it stands for and an httpx error, so that
# `except httpx.HTTPError` and `except sw.CircuitOpenError` both catch it. Which
# httpx error follows `_http.ERROR_RULES`: a timeout, or a request not sent.


@final
class TransportDeadlineExceeded(httpx.TimeoutException, DeadlineExceeded):
    """An ``httpx.TimeoutException`` that is a `~stalwart.DeadlineExceeded`.

    Raised instead of it when a deadline, a `~stalwart.Timeout` or a
    ``Retry(timeout=)`` in the policy ends a request: ``except
    httpx.TimeoutException``, ``except httpx.HTTPError`` and ``except
    sw.DeadlineExceeded`` all catch it. ``timeout``, ``policy`` and
    ``request`` are set; the original error is its ``__cause__``.
    """


@final
class TransportCircuitOpenError(httpx.TransportError, CircuitOpenError):
    """An ``httpx.TransportError`` that is a `~stalwart.CircuitOpenError`.

    Raised instead of it when an open circuit breaker in the policy refuses
    a request (or its next attempt): ``except httpx.HTTPError`` and
    ``except sw.CircuitOpenError`` both catch it. ``retry_after``, ``policy`` and
    ``request`` are set; the original error is its ``__cause__``.
    """


@final
class TransportBulkheadFullError(httpx.TransportError, BulkheadFullError):
    """An ``httpx.TransportError`` that is a `~stalwart.BulkheadFullError`.

    Raised instead of it when a full bulkhead in the policy refuses a request
    (or its next attempt): ``except httpx.HTTPError`` and ``except
    sw.BulkheadFullError`` both catch it. ``policy`` and ``request`` are set;
    the original error is its ``__cause__``.
    """


@final
class TransportRateLimitExceeded(httpx.TransportError, RateLimitExceeded):
    """An ``httpx.TransportError`` that is a `~stalwart.RateLimitExceeded`.

    Raised instead of it when a rate limit in the policy refuses a request
    (or its next attempt): ``except httpx.HTTPError`` and ``except
    sw.RateLimitExceeded`` both catch it. ``retry_after``, ``policy`` and
    ``request`` are set; the original error is its ``__cause__``.
    """


_AS_HTTPX: Final[dict[type[StalwartError], type[StalwartError]]] = by_kind(
    TransportDeadlineExceeded,
    TransportCircuitOpenError,
    TransportBulkheadFullError,
    TransportRateLimitExceeded,
)


def _as_httpx_error(error: StalwartError, request: httpx.Request) -> StalwartError | None:
    """``error`` made the httpx error it stands for (see `_AS_HTTPX`), or None if none.

    The copy keeps the original's message, ``policy`` and other attributes,
    and pickles as they do.
    """
    copy = translated(error, _AS_HTTPX, unless=httpx.HTTPError)  # None for one already
    if copy is not None:
        copy.request = request  # type: ignore[attr-defined]
    return copy


def _origin_of(request: httpx.Request) -> str:
    """The origin a request goes to: its ``per_host`` key (a host name may make it long)."""
    url = request.url
    return validated_key(_origin_text((url.scheme, url.raw_host, url.port)))


def _origin_text(origin: _Origin) -> str:
    """``scheme://host:port``, the default port spelt out, an IPv6 host in brackets."""
    scheme, raw_host, port = origin
    host = raw_host.decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    if port is None:
        port = _DEFAULT_PORTS.get(scheme)
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


@final
class _Unread(httpx.AsyncByteStream):
    """A response's body: the chunks already read, then the rest, still on the wire."""

    __slots__ = ("_head", "_response", "_rest")

    def __init__(
        self, head: list[bytes], rest: AsyncIterator[bytes], response: httpx.Response
    ) -> None:
        self._head = head
        self._rest = rest
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        head, self._head = self._head, []
        for chunk in head:
            yield chunk
        async for chunk in self._rest:
            yield chunk

    async def aclose(self) -> None:
        try:
            close = getattr(self._rest, "aclose", None)
            if close is not None:
                await close()
        finally:
            await self._response.aclose()


def _in_memory(response: httpx.Response, body: bytes, request: httpx.Request) -> httpx.Response:
    """A copy of ``response`` whose (still encoded) body is ``body``."""
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(body),
        extensions=response.extensions,
        request=request,
    )


@final
class ResilientTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends each request through a stalwart policy.

    Use it as any client's transport; it wraps another one (by default a new
    ``httpx.AsyncHTTPTransport()``), delegates to it and closes it with itself::

        async with httpx.AsyncClient(
            transport=ResilientTransport(sw.Retry(attempts=4, timeout=10))
        ) as client:
            response = await client.get("https://inventory.internal/items/42")

    Each request is one call of ``policy``, and each attempt one round trip to
    the inner transport:

    * A response whose status is in ``retry_statuses`` fails the attempt with
      `RetryableStatusError` (after its body is read, so the connection goes
      back to the pool; a body longer than 1 MiB is left unread instead, and
      its connection closed before the next attempt, so that a huge or
      endless error page is never held in memory). Its ``retry_after`` is the
      server's ``Retry-After``
      (see `parse_retry_after`), which `~stalwart.Retry` honours as a minimum
      delay, as far as the deadline allows. When the policy gives up on it,
      the last response is returned, as it would be without the transport.
    * A 409 to a request that carries an ``Idempotency-Key`` fails the
      attempt in the same way: the server is still running the key's first
      request (stalwart's ``IdempotencyMiddleware`` answers so), and a later
      attempt, after its ``Retry-After``, gets that request's response.
    * ``httpx.TransportError`` (connection refused or reset, timeouts, ...)
      fail the attempt too; after the last attempt the error propagates.
    * Every error that leaves the transport is an ``httpx.HTTPError``: the
      stalwart errors a policy raises become httpx errors that are still
      what they were (`TransportDeadlineExceeded` is an
      ``httpx.TimeoutException`` and a `~stalwart.DeadlineExceeded`;
      `TransportCircuitOpenError`, `TransportBulkheadFullError` and
      `TransportRateLimitExceeded` are ``httpx.TransportError``), so that
      ``except httpx.HTTPError`` and ``except sw.CircuitOpenError`` both work.
    * Only requests safe to repeat are retried: the idempotent methods (GET,
      HEAD, OPTIONS, PUT, DELETE, TRACE) and requests that carry an
      ``Idempotency-Key`` header. With ``add_idempotency_keys=True`` every
      other request gets a fresh random key (on the caller's request, so
      ``response.request.headers["Idempotency-Key"]`` shows it), the same on
      all its attempts. Any other request makes one attempt whatever the
      policy says (`~stalwart.Retry` is switched off for it); breakers,
      timeouts and bulkheads still apply.
    * The request body is read into memory once, so every attempt sends the
      same bytes, streamed bodies included.
    * Within a trace (a span is current: the policy's, or the request's of
      your server), every attempt carries it downstream, as the global
      OpenTelemetry propagator writes it (W3C ``traceparent`` by default), so
      that the upstream's spans join the trace. A request that already
      carries a ``traceparent`` (set by an instrumentation of the client)
      keeps it.
    * Under an ambient deadline (`~stalwart.deadline`, a ``Retry(timeout=)``,
      a `~stalwart.Timeout`), every attempt carries ``deadline_header`` with
      the whole milliseconds left, and its own httpx timeouts (connect, read,
      write, pool) are cut to the time left. With less than a millisecond
      left the request is not sent: `~stalwart.DeadlineExceeded` is raised.

    Only ``handle_async_request`` runs under the policy: it returns when the
    response's headers have arrived, so reading a large body later is not
    retried (nor limited by a ``Timeout`` in the policy).

    **A partner's quota.** ``rate_limit`` puts a `~stalwart.RateLimiter`
    in front of the upstream: every attempt (a retry's too) takes a turn,
    inside ``policy`` and outside the ``per_host`` policy, waiting for it up
    to the limiter's ``max_wait`` and never past the deadline; a refusal
    reaches ``policy`` (a default `~stalwart.Retry` does not retry it) and
    leaves the transport as a `TransportRateLimitExceeded`. A limiter with
    a ``key`` callable limits each upstream apart (it is given the
    attempt's ``httpx.Request``)::

        ResilientTransport(
            sw.Retry(attempts=3),
            rate_limit=sw.RateLimiter(100, per=60, max_wait=30, key=lambda r: r.url.host),
        )

    **Per-host policies.** ``per_host`` builds a policy for each upstream the
    client talks to, typically a `~stalwart.CircuitBreaker`::

        ResilientTransport(
            sw.Retry(attempts=3),
            per_host=lambda origin: sw.CircuitBreaker(name=f"upstream {origin}"),
        )

    It is called with the upstream's origin (``"https://api.example.com:443"``:
    scheme, host and port, the default port spelt out) the first time a
    request goes there, and the policy it returns runs **inside** ``policy``,
    around each attempt: a breaker counts every attempt's outcome, and when
    it is open the `~stalwart.CircuitOpenError` it raises reaches ``policy``
    (which waits it out only if it retries that error and the wait fits in
    its backoff's ``maximum`` and the deadline, else lets it propagate, as a
    `TransportCircuitOpenError`). One upstream failing opens its own breaker
    only; requests to the others go on. At most ``max_hosts`` upstreams keep
    their policy; beyond that the least recently used one is dropped (an
    upstream that comes back later starts afresh, with a closed breaker).

    Name each breaker after its origin, as above: the name is its metrics'
    ``policy`` label (breakers sharing a name share one state gauge) and,
    with a shared ``store``, the key of its shared state (breakers sharing a
    name share one circuit). The labels stay bounded: the policies are kept
    by a `~stalwart.PerKey` (`per_host`), and a dropped upstream's series
    stop being exported. Every valid origin is a key, however long (a host
    name of 253 characters makes an origin of 267, beyond the 255 of keys
    read from a call's arguments); a policy's name holds at most 200
    characters, so name the breakers of such hosts after a shorter form.

    **Hedged requests.** ``hedge`` sends a request that is safe to repeat
    (an idempotent method, or one carrying an ``Idempotency-Key``) again
    when it has not answered after the hedge's delay, and returns the first
    response; every other attempt is cancelled (its connection closed) or,
    if its response came in the same instant, closed unread. Any other
    request is never hedged. Each upstream gets a hedge of its own with the
    options of the one given, so that an `~stalwart.AdaptiveDelay` learns
    each host's latency apart (and their budget, if any, is the one given,
    shared)::

        ResilientTransport(
            sw.Retry(attempts=3),
            hedge=sw.Hedge(delay=sw.AdaptiveDelay(quantile=0.95, maximum=0.5)),
        )

    The hedge runs inside ``policy`` (every attempt it makes is hedged) and
    outside ``rate_limit`` and the ``per_host`` policy: each hedged attempt
    takes a turn, and a host's breaker counts it (a cancelled loser counts
    as neither success nor failure). A hedged attempt that fails, a
    retryable status included, starts the next one at once.

    Args:
        policy: the policy each request goes through. Default:
            ``Retry(attempts=3, on=DEFAULT_RETRY_ON, name=name)``, which
            retries transport failures, retryable statuses and attempts cut
            short by a `~stalwart.Timeout` with the default
            `~stalwart.Backoff`, but not errors that a retry cannot mend
            (``httpx.UnsupportedProtocol``, ``httpx.LocalProtocolError``) nor
            an open circuit.
        transport: the inner transport (an ``httpx.AsyncBaseTransport``).
        retry_statuses: statuses that fail an attempt (may be empty).
        deadline_header: the header carrying the deadline downstream, or None
            to send none (timeouts are still narrowed).
        add_idempotency_keys: give non-idempotent requests an
            ``Idempotency-Key`` so that they can be retried.
        idempotency_header: the name of that header.
        name: reported as the ``policy`` of the transport's own errors, and
            the name of the default policy.
        rng: the ``random.Random`` keys are drawn from (default:
            ``uuid.uuid4()``, from the operating system's randomness).
        per_host: a callable taking an upstream's origin (a ``str``) and
            returning a new policy for that upstream (see above), or None.
        max_hosts: how many upstreams keep their ``per_host`` policy (and hedge) at once,
            >= 1 (default 100).
        rate_limit: a `~stalwart.RateLimiter` every attempt goes through (see
            above), or None.
        hedge: a `~stalwart.Hedge` for the requests safe to repeat (see
            above), one per upstream, or None.
    """

    __slots__ = (
        "_hedge",
        "_hosts",
        "_inner",
        "_max_hosts",
        "_name",
        "_per_host",
        "_policy",
        "_rate_limit",
        "_rules",
        "_send",
        "_transport",
    )

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        retry_statuses: Iterable[int] = DEFAULT_RETRY_STATUSES,
        deadline_header: str | None = DEADLINE_HEADER,
        add_idempotency_keys: bool = False,
        idempotency_header: str = IDEMPOTENCY_HEADER,
        name: str = "httpx",
        rng: random.Random | None = None,
        per_host: Callable[[str], Policy] | None = None,
        max_hosts: int = DEFAULT_MAX_HOSTS,
        rate_limit: RateLimiter | None = None,
        hedge: Hedge | None = None,
    ) -> None:
        self._name, policy = client_policy(policy, name=name, retry_on=DEFAULT_RETRY_ON)
        if transport is None:
            transport = httpx.AsyncHTTPTransport()
        elif not isinstance(transport, httpx.AsyncBaseTransport):
            raise TypeError(
                f"transport must be an httpx.AsyncBaseTransport, not {type(transport).__name__}"
            )
        self._policy = policy
        self._transport = transport
        self._rules = ClientRules(
            retry_statuses=retry_statuses,
            deadline_header=deadline_header,
            add_idempotency_keys=add_idempotency_keys,
            idempotency_header=idempotency_header,
            rng=rng,
        )
        factory = policy_factory("per_host", per_host, key="origin", a_key="an origin", each="host")
        self._max_hosts = _validate.count("max_hosts", max_hosts)
        # Each upstream's own hedge and `policy` bound around it (with `hedge`
        # only); least recently used first.
        self._hosts: OrderedDict[_Origin, _Host] = OrderedDict()
        self._rate_limit = rate_limit_option(rate_limit)
        self._hedge = hedge_option(hedge)
        # Bound once: the policy's per-function setup is not paid per request.
        attempt = self._attempt
        self._per_host: PerKey[Policy] | None = None
        if factory is not None:
            # The policy of each attempt's origin, inside `policy` and the limiter,
            # without a span of its own: `policy`'s carries its events.
            self._per_host = PerKey(
                factory,
                key=_origin_of,
                max_keys=self._max_hosts,
                name=self._name,
                telemetry=policy.telemetry,
            )
            attempt = self._per_host.wrap(attempt, Binding(self._attempt, traced=False))
        self._inner: _Send = attempt
        self._send: _Send = bind_attempts(policy, attempt, self._rate_limit, self._attempt)

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def rate_limit(self) -> RateLimiter | None:
        """The limiter every attempt goes through, or None."""
        return self._rate_limit

    @property
    def hedge(self) -> Hedge | None:
        """The hedge whose options each upstream's own hedge takes, or None."""
        return self._hedge

    @property
    def transport(self) -> httpx.AsyncBaseTransport:
        """The inner transport."""
        return self._transport

    @property
    def retry_statuses(self) -> frozenset[int]:
        return self._rules.retry_statuses

    @property
    def max_hosts(self) -> int:
        return self._max_hosts

    @property
    def host_policies(self) -> dict[str, Policy]:
        """The ``per_host`` policies kept now, by origin, least recently used first.

        A snapshot (empty without ``per_host``): for a health page, say::

            {origin: breaker.state for origin, breaker in transport.host_policies.items()}
        """
        return {} if self._per_host is None else dict(self._per_host.items())

    @property
    def per_host(self) -> PerKey[Policy] | None:
        """The `~stalwart.PerKey` keeping the ``per_host`` policies by origin (None without).

        Hand it to a health check: ``stalwart.asgi.BreakerHealth(transport.per_host)``.
        """
        return self._per_host

    @property
    def host_hedges(self) -> dict[str, Hedge]:
        """Each upstream's hedge kept now, by origin (empty without ``hedge``).

        ``hedge.current_delay()`` tells what an adaptive delay has learned of it.
        """
        return {_origin_text(origin): entry[0] for origin, entry in self._hosts.items()}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the policy; see the class documentation."""
        await request.aread()
        retryable = self._rules.repeatable(request.method, request.headers)
        send = self._send if self._hedge is None else self._send_to(request.url)
        unread: list[httpx.Response] = []
        token = _unread.set(unread)
        kept: httpx.Response | None = None
        try:
            if retryable:
                return await send(request)
            with retries_disabled():
                return await send(request)
        except RetryableStatusError as exc:
            if exc.request is not request:
                raise
            if exc._body is None:
                kept = exc.response  # its body too long to read: left on the wire
                return kept
            # A fresh copy, unread: the caller may stream it, raw or decoded.
            return _in_memory(exc.response, exc._body, request)
        except StalwartError as exc:
            translated = _as_httpx_error(exc, request)
            if translated is None:
                raise
            raise translated from exc
        finally:
            _unread.reset(token)
            if unread:
                await _close_unread(unread, kept)

    def _send_to(self, url: httpx.URL) -> _Send:
        """``policy`` around the hedge of ``url``'s origin (made on first use)."""
        origin = (url.scheme, url.raw_host, url.port)
        hosts = self._hosts
        entry = hosts.get(origin)
        if entry is not None:
            hosts.move_to_end(origin)
            return entry[1]
        assert self._hedge is not None
        hedge = self._hedge._twin(discard=_close)
        send: _Send = bind_attempts(
            self._policy, self._inner, self._rate_limit, self._attempt, hedge
        )
        hosts[origin] = (hedge, send)
        if len(hosts) > self._max_hosts:
            hosts.popitem(last=False)
        return send

    async def _attempt(self, request: httpx.Request) -> httpx.Response:
        """One round trip: what the policy calls, retries and times."""
        left = time_left(self._name, "{} {} not sent", request.method, request.url)
        earlier = _unread.get()
        if earlier:
            # Superseded by this attempt: their connections go now, not when
            # the request ends, or a pool of few connections would starve it.
            # (Hedged too: an attempt that failed before this one started can
            # no longer be the last failure.) Taken before awaiting: a hedge
            # running beside this attempt may add its own meanwhile.
            superseded = earlier[:]
            earlier.clear()
            await _close_unread(superseded, None)
        trace = _propagation.outgoing()
        if trace and _propagation.TRACEPARENT in request.headers:
            trace = {}  # the caller's own (an instrumentation's, say) stands
        sent = request if left is None and not trace else self._copy(request, left, trace)
        response = await self._transport.handle_async_request(sent)
        if self._rules.retryable(response.status_code, request.headers):
            raise await self._failed(request, response)
        return response

    def _copy(
        self, request: httpx.Request, left: float | None, trace: dict[str, str]
    ) -> httpx.Request:
        """A copy of ``request`` that tells the server, and httpx, the time left.

        It also carries ``trace``, the headers of the current trace context.
        """
        headers = request.headers.copy()
        headers.update(trace)
        extensions = dict(request.extensions)
        if left is not None:
            header = self._rules.deadline_header
            if header is not None:
                headers[header] = milliseconds(left)
            timeouts: dict[str, float | None] = dict(extensions.get("timeout") or {})
            for phase in ("connect", "read", "write", "pool"):
                limit = timeouts.get(phase)
                if limit is None or limit > left:
                    timeouts[phase] = left
            extensions["timeout"] = timeouts
        # `stream=` keeps the buffered body and adds no headers of its own.
        return httpx.Request(
            request.method,
            request.url,
            headers=headers,
            stream=request.stream,
            extensions=extensions,
        )

    async def _failed(
        self, request: httpx.Request, response: httpx.Response
    ) -> RetryableStatusError:
        """Read and close a retryable response; the error that carries it.

        ``request`` is the caller's: the error and the kept response name it,
        whichever copy of it this attempt sent.
        """
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)  # as httpx.AsyncClient asserts
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > _MAX_KEPT_BODY:
            return self._oversized(request, response, stream)  # not even started
        # The stream itself, not `aiter_raw()`: a response built in memory
        # (a MockTransport's) counts as consumed yet still yields its bytes.
        chunks = stream.__aiter__()
        head: list[bytes] = []
        size = 0
        try:
            async for chunk in chunks:
                head.append(chunk)
                size += len(chunk)
                if size > _MAX_KEPT_BODY:
                    return self._oversized(request, response, _Unread(head, chunks, response))
        except BaseException:
            await _close_unread([response], None)
            raise
        await _close_unread([response], None)
        body = b"".join(head)
        kept = _in_memory(response, body, request)
        try:
            kept.read()  # so that `.content`, `.text` and `.json()` work in predicates
        except httpx.DecodingError:
            # Left unread for the caller to meet, if this is the response it gets.
            kept = _in_memory(response, body, request)
        error = RetryableStatusError(
            f"{response.status_code} {response.reason_phrase} from {request.method} {request.url}",
            request=request,
            response=kept,
            retry_after=response_retry_after(response.headers),
        )
        error._body = body
        return error

    def _oversized(
        self, request: httpx.Request, response: httpx.Response, body: httpx.AsyncByteStream
    ) -> RetryableStatusError:
        """The error of a retryable response whose body is too long to keep in memory.

        Its response is left unread (``body`` is its stream, with any chunks
        already read put back in front): it is closed (`_close_unread`) when
        the request's next attempt starts or the request ends, unless it is
        the response the caller gets.
        """
        unread = httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=body,
            extensions=response.extensions,
            request=request,
        )
        pending = _unread.get()
        # Outside `handle_async_request` (a subclass's own call): nobody would close it.
        assert pending is not None, "ResilientTransport._attempt runs in handle_async_request"
        pending.append(unread)
        return RetryableStatusError(
            f"{response.status_code} {response.reason_phrase} from {request.method} {request.url}",
            request=request,
            response=unread,
            retry_after=response_retry_after(response.headers),
        )

    async def __aenter__(self) -> ResilientTransport:
        await self._transport.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self._transport.__aexit__(exc_type, exc_value, traceback)

    async def aclose(self) -> None:
        """Close the inner transport (and its connection pool)."""
        await self._transport.aclose()

    def __repr__(self) -> str:
        return f"ResilientTransport({self._policy!r}, transport={self._transport!r})"
