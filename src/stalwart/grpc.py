"""gRPC with stalwart: `ClientInterceptor` and `ServerInterceptor` for ``grpc.aio``.

The client interceptor sends every unary call (and every server-streaming
call, up to its first message) through a stalwart policy, and the ambient
deadline along with it (with every call that streams requests too, which
cannot be replayed, so is sent once); the server interceptor turns the time a call has
left into the ambient deadline of its handler. Together they carry one
deadline through any number of services::

    import grpc
    import stalwart as sw
    from stalwart.grpc import ClientInterceptor, ServerInterceptor

    server = grpc.aio.server(interceptors=[ServerInterceptor()])
    interceptor = ClientInterceptor(sw.Retry(attempts=4))
    channel = grpc.aio.insecure_channel(
        "inventory:50051", interceptors=interceptor.channel_interceptors
    )

What the client interceptor adds to the policy:

* a call that ends with a status in ``retry_codes`` (``UNAVAILABLE`` and
  ``RESOURCE_EXHAUSTED`` by default) fails the attempt, so it is retried and
  counted by breakers; when the policy gives up, the caller gets the last
  attempt's call, whose status it sees as it would without the interceptor;
* the server's ``grpc-retry-pushback-ms`` is the retry's delay, and a
  negative or malformed one means "do not retry" (gRPC's retry design, A6);
* the ambient deadline (`stalwart.remaining`) is every attempt's timeout,
  or the call's own ``timeout`` when that is nearer (a stream's is the
  caller's deadline: the policy's bounds only the wait for its first message);
* with ``per_target=``, each target (a gRPC service, by default) gets a
  policy of its own inside the shared one, typically a circuit breaker;
* the current trace travels in the call's metadata (W3C trace context).

Only ``grpc.aio`` (asyncio) is supported: grpcio has no trio backend.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any, ClassVar, Final, final

try:
    import grpc
    from grpc import aio
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "stalwart.grpc needs grpcio: install it with `pip install 'stalwart[grpc]'`"
    ) from exc

from . import _clock, _propagation, _validate
from ._deadline import deadline, remaining
from ._errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceeded,
    RateLimitExceeded,
    StalwartError,
    recast,
)
from ._http import error_details
from ._keys import validated_key
from ._per_key import PerKey
from ._pipeline import Pipeline
from ._policy import Policy
from ._transport import (
    by_kind,
    client_policy,
    collection_option,
    first_value,
    kind_of,
    policy_factory,
    retry_after_of,
    time_left,
)

__all__ = [  # noqa: RUF022 - in sorted() order, as the public API test checks
    "BidiStreamingInterceptor",
    "ClientInterceptor",
    "ClientStreamingInterceptor",
    "DEFAULT_MAX_TARGETS",
    "DEFAULT_RETRY_CODES",
    "PUSHBACK_KEY",
    "RetryableRpcError",
    "RpcBulkheadFull",
    "RpcCircuitOpen",
    "RpcDeadlineExceeded",
    "RpcRateLimited",
    "STATUS_FOR_ERROR",
    "ServerInterceptor",
    "StreamingInterceptor",
    "parse_pushback",
    "service_of",
]

DEFAULT_RETRY_CODES: Final = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
"""Statuses that mean "try again": the server is down, or overloaded."""

PUSHBACK_KEY: Final = "grpc-retry-pushback-ms"
"""Trailing metadata in which a server says when to retry, in milliseconds."""

DEFAULT_MAX_TARGETS: Final = 100
"""How many targets keep a ``per_target`` policy at once, by default."""

STATUS_FOR_ERROR: Final[dict[type[StalwartError], grpc.StatusCode]] = {
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    CircuitOpenError: grpc.StatusCode.UNAVAILABLE,
    BulkheadFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RateLimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""The status that stands for each of stalwart's errors, on both sides.

A dependency behind an open breaker is unavailable (another replica may
serve the call); a full bulkhead or a rate limit is a resource exhausted
(the caller should slow down); a deadline is a deadline. Both kinds of
refusal are in `DEFAULT_RETRY_CODES`, so a caller's interceptor retries
them after the pushback the server sent.
"""

# At most 10 digits: over a hundred days, longer than anyone waits to retry.
_PUSHBACK: Final = re.compile(r"\d{1,10}")
# How long to let stalwart's own deadline catch up with grpc's timer (below).
_DEADLINE_GRACE: Final = 0.05

# The deadline of the caller of a server-streaming call, on the loop's clock
# (None: none), for its attempts, which run inside the policy's own deadlines.
_STREAM_END: Final[ContextVar[float | None]] = ContextVar("stalwart_grpc_stream_end", default=None)

# A stream whose first message is still to be read (or whose status is the answer).
_UNREAD: Final = object()
# Where the unary and the streaming send are in a `_sends` pair.
_UNARY: Final = 0
_STREAM: Final = 1

_Continuation = Callable[[aio.ClientCallDetails, Any], Awaitable[Any]]
_Send = Callable[[_Continuation, aio.ClientCallDetails, Any], Awaitable[Any]]


def parse_pushback(value: str | bytes) -> float:
    """Seconds to wait before a retry, from a ``grpc-retry-pushback-ms`` value.

    A non-negative integer number of milliseconds gives that many seconds
    / 1000. Anything else (negative, fractional, malformed) gives ``inf``:
    gRPC's retry design reads such a pushback as "do not retry", and so does
    `~stalwart.Retry` with a hint longer than its backoff's ``maximum``.

    Example::

        parse_pushback("250")  # 0.25
        parse_pushback("-1")  # inf: do not retry
    """
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return math.inf
    if _PUSHBACK.fullmatch(value) is None:
        return math.inf
    return int(value) / 1000.0


def service_of(method: str) -> str:
    """The service of a full method name: ``"/shop.Inventory/Reserve"`` → ``"shop.Inventory"``."""
    service, _, _ = method.lstrip("/").rpartition("/")
    return service or method


class RetryableRpcError(aio.AioRpcError):
    """An attempt ended with a status in ``retry_codes``.

    `ClientInterceptor` raises it inside the policy, so a `~stalwart.Retry`
    retries it and a circuit breaker counts it as a failure; it never reaches
    the caller, who gets ``call`` back when the policy gives up. As an
    ``AioRpcError`` it has the attempt's ``code()``, ``details()`` and
    metadata, and ``Retry(on=grpc.aio.AioRpcError)`` matches it.

    Attributes:
        call: the attempt's call (done); None in a copy unpickled elsewhere
            (an event sent to another process: the call stays behind).
        retry_after: the server's pushback in seconds, ``inf`` when the
            server said not to retry, or None when it said nothing.
    """

    call: Any
    retry_after: float | None

    def __init__(self, error: aio.AioRpcError, *, call: Any, retry_after: float | None) -> None:
        super().__init__(
            error.code(),
            error.initial_metadata(),
            error.trailing_metadata(),
            error.details(),
            error.debug_error_string(),
        )
        self.call = call
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        # AioRpcError pickles its five fields as constructor arguments, which
        # this constructor does not take; the call (a channel's) stays here.
        fields = (
            self.code(),
            self.initial_metadata(),
            self.trailing_metadata(),
            self.details(),
            self.debug_error_string(),
        )
        return (_unpickled_retryable, (*fields, self.retry_after))

    def __str__(self) -> str:
        # One line, for the retry events and logs that show it (grpc's own
        # text spans five, with its debug string).
        text = f"{self.code().name}: {self.details()}"
        if self.retry_after is None:
            return text
        if self.retry_after == math.inf:
            return f"{text} (pushback: do not retry)"
        return f"{text} (pushback {self.retry_after:g}s)"


def _unpickled_retryable(
    code: grpc.StatusCode,
    initial_metadata: aio.Metadata,
    trailing_metadata: aio.Metadata,
    details: str | None,
    debug_error_string: str | None,
    retry_after: float | None,
) -> RetryableRpcError:
    error = aio.AioRpcError(code, initial_metadata, trailing_metadata, details, debug_error_string)
    return RetryableRpcError(error, call=None, retry_after=retry_after)


class _RpcRefusal(aio.AioRpcError):
    """A stalwart error that escaped the client interceptor, as an ``AioRpcError``."""

    def _as_status(self, code: grpc.StatusCode) -> None:
        # AioRpcError's own constructor cannot run here (its super().__init__()
        # would reach the stalwart error's); these are the fields it sets.
        self._code = code
        self._details = str(self.args[0]) if self.args else ""
        self._initial_metadata = aio.Metadata()
        self._trailing_metadata = aio.Metadata()
        # Shown in the error's text: say where it came from ("None" otherwise).
        self._debug_error_string = f"{code.name}:{self._details} (stalwart {type(self).__name__})"

    def __reduce__(self) -> tuple[Any, ...]:
        # AioRpcError's own would call its constructor (see above).
        return StalwartError.__reduce__(self)  # type: ignore[arg-type]


class RpcDeadlineExceeded(_RpcRefusal, DeadlineExceeded):
    """`~stalwart.DeadlineExceeded` from a policy, as a ``DEADLINE_EXCEEDED`` call error."""


class RpcCircuitOpen(_RpcRefusal, CircuitOpenError):
    """`~stalwart.CircuitOpenError` from a breaker, as an ``UNAVAILABLE`` call error."""


class RpcBulkheadFull(_RpcRefusal, BulkheadFullError):
    """`~stalwart.BulkheadFullError` from a bulkhead, as a ``RESOURCE_EXHAUSTED`` call error."""


class RpcRateLimited(_RpcRefusal, RateLimitExceeded):
    """`~stalwart.RateLimitExceeded` from a limiter, as a ``RESOURCE_EXHAUSTED`` call error."""


_RPC_ERROR_FOR: Final[dict[type[StalwartError], type[_RpcRefusal]]] = by_kind(
    RpcDeadlineExceeded, RpcCircuitOpen, RpcBulkheadFull, RpcRateLimited
)


def _status_for(error: BaseException) -> tuple[type[StalwartError], grpc.StatusCode] | None:
    """The class of `STATUS_FOR_ERROR` that ``error`` is, and its status; or None."""
    kind = kind_of(error, STATUS_FOR_ERROR)
    return None if kind is None else (kind, STATUS_FOR_ERROR[kind])


def _as_rpc_error(error: StalwartError) -> aio.AioRpcError | None:
    """The error a caller sees for ``error``, or None to let it through as it is."""
    if isinstance(error, aio.AioRpcError):
        return None  # one already (a nested interceptor's)
    found = _status_for(error)
    if found is None:
        return None
    kind, code = found
    rpc_error = recast(error, _RPC_ERROR_FOR[kind])
    rpc_error._as_status(code)
    return rpc_error


def _retry_codes(value: Any) -> frozenset[grpc.StatusCode]:
    codes = collection_option("retry_codes", value, "grpc.StatusCode")
    for code in codes:
        if not isinstance(code, grpc.StatusCode):
            raise TypeError(f"retry_codes must hold grpc.StatusCode members, got {code!r}")
        if code is grpc.StatusCode.OK:
            raise ValueError("retry_codes cannot hold grpc.StatusCode.OK: it is not a failure")
    return codes


def _retried_by_default(error: BaseException) -> bool:
    """The default policy's ``on``: retryable statuses the server did not refuse to see again."""
    return isinstance(error, RetryableRpcError) and error.retry_after != math.inf


@final
class ClientInterceptor(aio.UnaryUnaryClientInterceptor):
    """A ``grpc.aio`` client interceptor that sends each call through a stalwart policy.

    Give it to a channel with its halves for the other kinds of call (a
    channel files each interceptor under one kind of call only)::

        interceptor = ClientInterceptor(sw.Pipeline(sw.Retry(attempts=4), sw.Timeout(1)))
        channel = grpc.aio.insecure_channel(
            "inventory:50051", interceptors=interceptor.channel_interceptors
        )

    Unary-unary calls are one call of ``policy`` each, every attempt a real
    call down the channel. Unary-stream calls too, up to their first message:
    a stream that fails before it (the server is down, overloaded, or says
    ``UNAVAILABLE`` at once) is retried like a unary call, but once a message
    has been received the stream is the caller's, and a failure later on
    reaches the caller as it is, never retried (the caller has seen part of
    the answer) and not counted by a breaker (the policy's call ended with
    the first message). So a stream is sent with the caller's deadline (or
    its own ``timeout``) as its timeout: a `~stalwart.Timeout` or a
    ``Retry(timeout=)`` in the policy bounds the wait for the first message
    (a stream not begun by then is cancelled, and retried), not the stream.
    Calls that stream requests (client-streaming, bidirectional) cannot be
    replayed, so they do not go through the policy: each is sent once, with
    the ambient deadline as its timeout (when nearer than its own) and the
    trace context, and not made when no time is left (`RpcDeadlineExceeded`).

    * A call that ends with a status in ``retry_codes`` fails the attempt
      with `RetryableRpcError`; its ``retry_after`` is the server's
      ``grpc-retry-pushback-ms`` (see `parse_pushback`), which
      `~stalwart.Retry` honours as a minimum delay, as far as the deadline
      allows. A pushback that says "do not retry" (negative or malformed)
      ends the retrying: the default policy does not retry it, and a
      `~stalwart.Retry` of your own stops on it as on any hint longer than
      its backoff's ``maximum``. When the policy gives up, the caller gets
      the last attempt's call: awaiting it raises its ``grpc.aio.AioRpcError``
      and ``code()``, ``details()`` and the metadata are that attempt's.
    * Any other status is the answer: the policy sees a success (a breaker
      does not count ``NOT_FOUND`` against the server) and the caller gets
      the call with its status. So is the ``RESOURCE_EXHAUSTED`` grpc gives
      a message larger than the limit (``Received message larger than
      max``, on either side): it would fail the same way on every attempt.
    * Under an ambient deadline (`~stalwart.deadline`, a ``Retry(timeout=)``,
      a `~stalwart.Timeout` in the policy), every attempt's timeout is the
      time left (or the call's own ``timeout``, when nearer): the server gets
      it as ``grpc-timeout`` and, behind a `ServerInterceptor`, runs under
      it. With less than a millisecond left the call is not made:
      `~stalwart.DeadlineExceeded` is raised. When grpc's own timer ends a
      call at that deadline, the interceptor lets stalwart's deadline report
      it, so the caller sees the same error whichever clock ran first: the
      ``DeadlineExceeded`` of the deadline that passed. A ``DEADLINE_EXCEEDED``
      that comes back while that deadline still has time left is the
      server's answer (a deadline of its own passed), like any other status.
    * The current trace context travels in the call's metadata (unless the
      call already carries a ``traceparent``), so the server's spans join
      the caller's trace.

    **What a caller sees for stalwart's own errors.** An error a policy
    raises instead of calling the server escapes as an error that is both a
    ``grpc.aio.AioRpcError`` (so ``except grpc.aio.AioRpcError`` and
    ``error.code()`` still work) and the stalwart error (so ``except
    sw.CircuitOpenError`` works), with the status of `STATUS_FOR_ERROR`:

    | stalwart error | raised as | ``code()`` |
    |---|---|---|
    | ``DeadlineExceeded`` | `RpcDeadlineExceeded` | ``DEADLINE_EXCEEDED`` |
    | ``CircuitOpenError`` | `RpcCircuitOpen` | ``UNAVAILABLE`` |
    | ``BulkheadFullError`` | `RpcBulkheadFull` | ``RESOURCE_EXHAUSTED`` |
    | ``RateLimitExceeded`` | `RpcRateLimited` | ``RESOURCE_EXHAUSTED`` |

    Their ``details()`` is the stalwart error's message and ``policy``,
    ``retry_after`` and ``timeout`` are the original's. The caller's own
    ``with sw.deadline(...)`` raises its plain `~stalwart.DeadlineExceeded`
    when it passes, as it always does.

    **Per-target policies.** ``per_target`` builds a policy for each target
    the channel calls, typically a `~stalwart.CircuitBreaker`::

        ClientInterceptor(
            sw.Retry(attempts=3),
            per_target=lambda target: sw.CircuitBreaker(name=f"grpc {target}"),
        )

    An interceptor does not see its channel: what it sees of a call is the
    method, so a **target is the gRPC service** of the method by default
    (``"shop.Inventory"`` for ``/shop.Inventory/Reserve``): give every
    channel its own interceptor and a target is one service on one server,
    whose methods share their fate (the same process serves them). Pass
    ``target=`` (a function of the full method name) to key them otherwise,
    per method say. The target's policy runs **inside** ``policy``, around
    each attempt, the two as one `~stalwart.Pipeline`: a breaker counts
    every attempt, and its `~stalwart.CircuitOpenError` reaches ``policy``.
    At most ``max_targets`` targets keep their policy; beyond that the least
    recently used one is dropped. Name each breaker after its target, as
    above: the name is its metrics' ``policy`` label (a dropped target's
    series stop being exported: the policies are kept by a
    `~stalwart.PerKey`, `per_target`).

    Args:
        policy: the policy each call goes through. Default:
            ``Retry(attempts=3, on=...)`` retrying `RetryableRpcError` unless
            its pushback said not to, with the default `~stalwart.Backoff`.
        retry_codes: statuses that fail an attempt (``grpc.StatusCode``
            members, not ``OK``; may be empty).
        per_target: a callable taking a target (a ``str``) and returning a
            new policy for it, or None.
        target: the target of a method: a callable taking the full method
            name (``"/shop.Inventory/Reserve"``) and returning a ``str``;
            default `service_of`.
        max_targets: how many targets keep their ``per_target`` policy at
            once, >= 1 (default 100).
        name: reported as the ``policy`` of the interceptor's own errors,
            and the name of the default policy.
    """

    __slots__ = (
        "_bidi_streaming",
        "_client_streaming",
        "_codes",
        "_max_targets",
        "_name",
        "_per_target",
        "_policy",
        "_sends",
        "_streaming",
        "_target",
    )

    def __init__(
        self,
        policy: Policy | None = None,
        *,
        retry_codes: Iterable[grpc.StatusCode] = DEFAULT_RETRY_CODES,
        per_target: Callable[[str], Policy] | None = None,
        target: Callable[[str], str] = service_of,
        max_targets: int = DEFAULT_MAX_TARGETS,
        name: str = "grpc",
    ) -> None:
        self._name, policy = client_policy(policy, name=name, retry_on=_retried_by_default)
        self._policy = policy
        self._codes = _retry_codes(retry_codes)
        factory = policy_factory(
            "per_target", per_target, key="target", a_key="a target", each="target"
        )
        if not callable(target):
            raise TypeError(
                "target must be a callable taking a method name and returning a str, "
                f"not {type(target).__name__}"
            )
        self._target = target
        self._max_targets = _validate.count("max_targets", max_targets)
        self._per_target: PerKey[Policy] | None = None
        if factory is not None:
            # The target's policy inside `policy`, the two as one Pipeline.
            self._per_target = PerKey(
                factory,
                key=self._target_of,
                max_keys=self._max_targets,
                name=self._name,
                telemetry=policy.telemetry,
            )
            policy = Pipeline(
                policy, self._per_target, name=policy.name, telemetry=policy.telemetry
            )
        # Decorated once: the policy's per-function set-up is not paid per call.
        self._sends: tuple[_Send, _Send] = (policy(self._unary), policy(self._stream))
        self._streaming = StreamingInterceptor(self)
        self._client_streaming = ClientStreamingInterceptor(self)
        self._bidi_streaming = BidiStreamingInterceptor(self)

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def streaming(self) -> StreamingInterceptor:
        """The same interceptor for server-streaming (unary-stream) calls.

        Give both to the channel (``interceptors=[interceptor,
        interceptor.streaming]``), or all four: `channel_interceptors`.
        They share the policy and the per-target policies.
        """
        return self._streaming

    @property
    def client_streaming(self) -> ClientStreamingInterceptor:
        """The same interceptor for client-streaming (stream-unary) calls.

        A stream of requests cannot be replayed, so these calls do not go
        through the policy: they are sent once, with the ambient deadline as
        their timeout (when nearer than their own) and the trace context.
        """
        return self._client_streaming

    @property
    def bidi_streaming(self) -> BidiStreamingInterceptor:
        """The same interceptor for bidirectional (stream-stream) calls.

        As `client_streaming`: sent once, with the deadline and the trace.
        """
        return self._bidi_streaming

    @property
    def channel_interceptors(
        self,
    ) -> tuple[
        ClientInterceptor,
        StreamingInterceptor,
        ClientStreamingInterceptor,
        BidiStreamingInterceptor,
    ]:
        """The four interceptors a channel takes, one per kind of call.

        ``grpc.aio.insecure_channel(target, interceptors=interceptor.channel_interceptors)``:
        every call of the channel then goes through this interceptor.
        """
        return self, self._streaming, self._client_streaming, self._bidi_streaming

    @property
    def retry_codes(self) -> frozenset[grpc.StatusCode]:
        return self._codes

    @property
    def max_targets(self) -> int:
        return self._max_targets

    @property
    def target_policies(self) -> dict[str, Policy]:
        """The ``per_target`` policies kept now, by target, least recently used first.

        A snapshot (empty without ``per_target``), for a health page, say.
        """
        return {} if self._per_target is None else dict(self._per_target.items())

    @property
    def per_target(self) -> PerKey[Policy] | None:
        """The `~stalwart.PerKey` keeping the ``per_target`` policies by target (None without).

        Hand it to a health check: ``stalwart.asgi.BreakerHealth(interceptor.per_target)``.
        """
        return self._per_target

    async def intercept_unary_unary(
        self,
        continuation: _Continuation,
        client_call_details: aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        try:
            return await self._through(_UNARY, continuation, client_call_details, request)
        except RetryableRpcError as failed:
            return failed.call  # awaiting it raises the attempt's own AioRpcError

    async def _intercept_stream(
        self, continuation: _Continuation, details: aio.ClientCallDetails, request: Any
    ) -> Any:
        # The stream's timeout is the caller's deadline, read here, outside the
        # policy: a Timeout in the policy bounds an attempt, which ends with
        # the first message, not the stream the caller reads after it. Kept
        # as a moment, so that each attempt is sent with what is left of it.
        left = remaining()
        token = _STREAM_END.set(None if left is None else _clock.now() + left)
        try:
            call, first = await self._through(_STREAM, continuation, details, request)
        except RetryableRpcError as failed:
            call, first = failed.call, _UNREAD
        finally:
            _STREAM_END.reset(token)
        # The caller meets a failed call's AioRpcError reading it. (Not the call
        # itself: once read() has been used, grpc forbids iterating it.)
        return _messages(call, first)

    async def _intercept_request_stream(
        self, continuation: _Continuation, details: aio.ClientCallDetails, requests: Any
    ) -> Any:
        """A call that streams its requests: sent once, under the deadline, with the trace."""
        try:
            sent, _ = self._outgoing(details)
        except StalwartError as error:  # no time left: the call is not made
            rpc_error = _as_rpc_error(error)
            if rpc_error is None:
                raise
            raise rpc_error from error
        return await continuation(sent, requests)

    async def _through(
        self, kind: int, continuation: _Continuation, details: aio.ClientCallDetails, request: Any
    ) -> Any:
        """A call through the policy (and its target's): the ``kind`` of `_sends`.

        Stalwart's errors escape as the call errors that stand for them.
        """
        try:
            return await self._sends[kind](continuation, details, request)
        except StalwartError as error:
            rpc_error = _as_rpc_error(error)
            if rpc_error is None:
                raise
            raise rpc_error from error

    def _target_of(
        self, continuation: _Continuation, details: aio.ClientCallDetails, request: Any
    ) -> str:
        """The target of a call: its ``per_target`` key.

        Made from the method's name, which gRPC checked: a service's full
        name may be longer than a key read from a call's arguments may be.
        """
        method: Any = details.method  # bytes from grpc itself, str from some interceptors
        if isinstance(method, bytes):
            method = method.decode("utf-8", "replace")
        target = self._target(method)
        return validated_key(target) if type(target) is str else target

    async def _unary(
        self, continuation: _Continuation, details: aio.ClientCallDetails, request: Any
    ) -> Any:
        """One attempt of a unary call: what the policy calls, retries and times."""
        sent, ours = self._outgoing(details)
        call = await continuation(sent, request)
        try:
            await call
        except aio.AioRpcError as error:
            await self._failed(call, error, ours)
        except asyncio.CancelledError:
            call.cancel()
            raise
        return call

    async def _stream(
        self, continuation: _Continuation, details: aio.ClientCallDetails, request: Any
    ) -> tuple[Any, Any]:
        """One attempt of a server-streaming call, up to its first message."""
        sent, ours = self._outgoing(details, stream=True)
        call = await continuation(sent, request)
        try:
            first = await call.read()
        except aio.AioRpcError as error:
            await self._failed(call, error, ours, stream=True)
            return call, _UNREAD  # a status that is the answer: the caller meets it reading
        except asyncio.CancelledError:
            call.cancel()
            raise
        return call, first

    def _outgoing(
        self, details: aio.ClientCallDetails, *, stream: bool = False
    ) -> tuple[aio.ClientCallDetails, bool]:
        """The call's details for one attempt; and whether its timeout is the ambient deadline.

        The attempt's timeout is the time left of the ambient deadline, when
        nearer than the call's own; for a ``stream``, of the caller's
        deadline as of the call (see `_intercept_stream`), not of a deadline
        of the policy's, which bounds its first message only.
        """
        timeout = details.timeout
        ours = False
        left = time_left(self._name, "{!r} not called", details.method)
        if stream:
            end = _STREAM_END.get()
            left = None if end is None else end - _clock.now()
        if left is not None and (timeout is None or left < timeout):
            timeout, ours = left, True
        metadata = details.metadata
        trace = _propagation.outgoing()
        if trace and first_value(metadata, _propagation.TRACEPARENT) is None:
            metadata = aio.Metadata(*(metadata or ()))
            for key, value in trace.items():
                metadata.add(key, value)
        if timeout is details.timeout and metadata is details.metadata:
            return details, ours
        return details._replace(timeout=timeout, metadata=metadata), ours  # type: ignore[attr-defined]

    async def _failed(
        self, call: Any, error: aio.AioRpcError, ours: bool, *, stream: bool = False
    ) -> None:
        """Raise what a failed attempt means to the policy; return if the status is the answer."""
        code = error.code()
        if code in self._codes and not _too_large(code, error):
            pushback = first_value(error.trailing_metadata(), PUSHBACK_KEY)
            raise RetryableRpcError(
                error, call=call, retry_after=None if pushback is None else parse_pushback(pushback)
            ) from None
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and ours and _passing(stream):
            # grpc's timer and stalwart's deadline end the call at the same
            # instant; when grpc's ran first, stalwart's fires in a moment
            # and cancels this attempt, so the deadline that passed reports
            # it (a Timeout in the policy, a deadline around the caller).
            # (With time left, the status is the server's answer: a deadline
            # of its own passed, one of its downstream calls', say.)
            waited = 0.0
            while waited < _DEADLINE_GRACE:
                step = min(max(remaining() or 0.0, 0.001), _DEADLINE_GRACE)
                await asyncio.sleep(step)
                waited += step
            raise DeadlineExceeded(
                f"the deadline passed during {error.details()!r}",
                policy=self._name,
                timeout=0.0,
            ) from error

    def __repr__(self) -> str:
        codes = sorted(code.name for code in self._codes)
        return f"ClientInterceptor({self._policy!r}, retry_codes={codes})"


def _too_large(code: grpc.StatusCode, error: aio.AioRpcError) -> bool:
    """Did grpc end the call because a message was larger than the limit?

    grpc reports it as ``RESOURCE_EXHAUSTED`` (on either side, for the
    request or the response), a status that otherwise means "overloaded":
    this one fails the same way on every attempt.
    """
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in (
        error.details() or ""
    )


def _passing(stream: bool = False) -> bool:
    """Is the deadline an attempt was sent with (the ambient one; a stream's caller's) passing?"""
    if stream:
        end = _STREAM_END.get()
        left = None if end is None else end - _clock.now()
    else:
        left = remaining()
    return left is not None and left <= _DEADLINE_GRACE


class _Half:
    """What each half of a `ClientInterceptor` is: that interceptor, for another kind of call."""

    __slots__ = ("_interceptor",)
    _named: ClassVar[str]  # the ClientInterceptor property that gives it

    def __init__(self, interceptor: ClientInterceptor) -> None:
        if not isinstance(interceptor, ClientInterceptor):
            raise TypeError(
                f"interceptor must be a ClientInterceptor, not {type(interceptor).__name__}"
            )
        self._interceptor = interceptor

    def __repr__(self) -> str:
        return f"{self._interceptor!r}.{self._named}"


@final
class StreamingInterceptor(_Half, aio.UnaryStreamClientInterceptor):
    """The unary-stream half of a `ClientInterceptor`: see `ClientInterceptor.streaming`."""

    __slots__ = ()
    _named = "streaming"

    async def intercept_unary_stream(
        self,
        continuation: _Continuation,
        client_call_details: aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await self._interceptor._intercept_stream(continuation, client_call_details, request)


@final
class ClientStreamingInterceptor(_Half, aio.StreamUnaryClientInterceptor):
    """The stream-unary half of a `ClientInterceptor`: see `ClientInterceptor.client_streaming`."""

    __slots__ = ()
    _named = "client_streaming"

    async def intercept_stream_unary(
        self, continuation: _Continuation, client_call_details: aio.ClientCallDetails, requests: Any
    ) -> Any:
        interceptor = self._interceptor
        return await interceptor._intercept_request_stream(
            continuation, client_call_details, requests
        )


@final
class BidiStreamingInterceptor(_Half, aio.StreamStreamClientInterceptor):
    """The stream-stream half of a `ClientInterceptor`: see `ClientInterceptor.bidi_streaming`."""

    __slots__ = ()
    _named = "bidi_streaming"

    async def intercept_stream_stream(
        self, continuation: _Continuation, client_call_details: aio.ClientCallDetails, requests: Any
    ) -> Any:
        interceptor = self._interceptor
        return await interceptor._intercept_request_stream(
            continuation, client_call_details, requests
        )


async def _messages(call: Any, first: Any) -> AsyncIterator[Any]:
    """The stream's messages: the first one (already read) and the rest, as they come."""
    try:
        message = await call.read() if first is _UNREAD else first
        while message is not aio.EOF:
            yield message
            message = await call.read()
    finally:
        if not call.done():
            call.cancel()  # the caller stopped reading


@final
class ServerInterceptor(aio.ServerInterceptor):
    """A ``grpc.aio`` server interceptor: each handler runs under its call's deadline.

    Give it to the server::

        server = grpc.aio.server(interceptors=[ServerInterceptor()])

    The time the call has left (``context.time_remaining()``, from the
    caller's ``grpc-timeout``) becomes the handler's ambient deadline
    (`~stalwart.deadline`): `~stalwart.remaining` reports it, every policy
    respects it, and a `ClientInterceptor` on an outgoing channel sends what
    is left on, so a service in the middle of a chain passes the deadline on
    without a line of code. A call that came without a deadline runs without
    one, or under ``default_timeout`` when given.

    A stalwart error that escapes the handler ends the call with the status
    of `STATUS_FOR_ERROR` instead of ``UNKNOWN``: ``DEADLINE_EXCEEDED`` for
    `~stalwart.DeadlineExceeded` (the handler's deadline passed, or a
    `~stalwart.Timeout` inside it), ``UNAVAILABLE`` for an open breaker,
    ``RESOURCE_EXHAUSTED`` for a full bulkhead or a rate limit. When the
    error knows when to come back (``retry_after``), the trailing metadata
    carries it as ``grpc-retry-pushback-ms`` (rounded up), which a
    `ClientInterceptor` upstream waits out before its retry. The details
    name the error's kind and policy, never a traceback.

    The trace context the caller sent (W3C ``traceparent``) becomes the
    handler's current context, unless a span is already current (an
    OpenTelemetry server instrumentation made the call's span): the
    handler's spans join the caller's trace.

    Handlers written as ``async def`` functions and async generators are
    wrapped; plain (synchronous) handlers run in grpc's thread pool, where
    no deadline can follow them, and pass through untouched.

    Args:
        default_timeout: seconds allowed to calls that came without a
            deadline (> 0), or None to run them without one.
    """

    __slots__ = ("_default", "_wrapped")

    def __init__(self, *, default_timeout: float | None = None) -> None:
        self._default = _validate.optional_duration(
            "default_timeout", default_timeout, positive=True
        )
        # The wrapped handler of each handler seen: a service's handlers are
        # the same objects call after call.
        self._wrapped: dict[Any, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        try:
            wrapped = self._wrapped.get(handler)
        except TypeError:  # an unhashable handler of someone's own making
            return self._wrap(handler)
        if wrapped is None:
            wrapped = self._wrap(handler)
            if len(self._wrapped) >= 1024:
                self._wrapped.clear()
            self._wrapped[handler] = wrapped
        return wrapped

    def _wrap(self, handler: Any) -> Any:
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._guard(handler.unary_unary), **options)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard(handler.unary_stream), **options
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._guard(handler.stream_unary), **options
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._guard(handler.stream_stream), **options
            )
        return handler

    def _guard(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        """``behavior`` run under its call's deadline and trace, its errors as statuses."""
        default = self._default

        if inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                seconds = _seconds_left(context, default)
                with _propagation.extracted(_metadata(context)):
                    try:
                        if seconds is None:
                            async for message in behavior(request, context):
                                yield message
                        else:
                            with deadline(seconds, name="grpc"):
                                async for message in behavior(request, context):
                                    yield message
                    except StalwartError as error:
                        await _abort(context, error)
                        raise

            return streaming

        if not inspect.iscoroutinefunction(behavior):
            return behavior

        async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            seconds = _seconds_left(context, default)
            with _propagation.extracted(_metadata(context)):
                try:
                    if seconds is None:
                        return await behavior(request, context)
                    with deadline(seconds, name="grpc"):
                        return await behavior(request, context)
                except StalwartError as error:
                    await _abort(context, error)
                    raise

        return unary

    def __repr__(self) -> str:
        return f"ServerInterceptor(default_timeout={self._default})"


def _seconds_left(context: aio.ServicerContext[Any, Any], default: float | None) -> float | None:
    left = context.time_remaining()
    if left is None or left > 1e9:  # no deadline (grpc reports none as None or a vast number)
        return default
    return max(0.0, left)


def _metadata(context: aio.ServicerContext[Any, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(context.invocation_metadata() or ())


async def _abort(context: aio.ServicerContext[Any, Any], error: StalwartError) -> None:
    """End the call with the status that stands for ``error`` (returns if none does)."""
    found = _status_for(error)
    if found is None:
        return
    kind, code = found
    seconds = retry_after_of(error)
    trailing = () if seconds is None else ((PUSHBACK_KEY, str(math.ceil(seconds * 1000.0))),)
    await context.abort(code, error_details(kind, error), trailing)
