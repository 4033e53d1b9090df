"""The exceptions stalwart raises.

Every error carries ``policy``: the ``name`` of the policy that raised it, so a
handler (or a log line) can tell which of several breakers or bulkheads spoke.
All of them can be pickled, so they survive process pools and task queues.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "BulkheadFullError",
    "CircuitOpenError",
    "DeadlineExceeded",
    "IdempotencyConflict",
    "IdempotencyKeyReused",
    "RateLimitExceeded",
    "StalwartError",
    "StalwartWarning",
    "StoreUnavailable",
]


class StalwartError(Exception):
    """Base class of every error stalwart raises.

    ``policy`` is the ``name`` of the policy (or deadline) that raised it.
    """

    policy: str

    def __init__(self, message: str, *, policy: str) -> None:
        super().__init__(message)
        self.policy = policy

    def __reduce__(self) -> tuple[Any, ...]:
        state = dict(self.__dict__)
        for cls in type(self).__mro__:
            for slot in cls.__dict__.get("__slots__", ()):
                if hasattr(self, slot):
                    state[slot] = getattr(self, slot)
        return (_rebuild, (type(self), self.args, state))


def _rebuild(cls: type[StalwartError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls, *args)
    error.args = args
    for name, value in state.items():
        setattr(error, name, value)
    return error


def recast(error: StalwartError, cls: type[T]) -> T:
    """``error`` as an instance of ``cls``: same message, ``policy`` and attributes.

    ``cls`` subclasses ``type(error)``'s kind and an integration's own error
    type (``grpc.aio.AioRpcError``, ``aiohttp.ClientError``), so that the
    error an integration raises is caught by the handlers written for either.
    Built the way unpickling builds it: no constructor of either side runs.
    """
    _, (_, args, state) = error.__reduce__()
    return _rebuild(cls, args, state)  # type: ignore[arg-type, no-any-return]


class CircuitOpenError(StalwartError):
    """A circuit breaker rejected the call without running it.

    ``retry_after`` is the number of seconds until the breaker will admit a
    trial call (``0.0`` when it is half-open and its trial slots are taken).
    `Retry` reads it as a server hint, so a retried call waits the breaker out
    instead of hammering it, as far as the deadline and budget allow.
    """

    # An open breaker builds one per rejected call, against a budget of twice
    # the cost of raising a bare exception: slots, not a __dict__, and no
    # message. Its standard message is made from ``policy`` when ``args`` (or
    # str(), or repr()) is first read, so the error looks the same as one
    # built by the constructor.
    __slots__ = ("policy", "retry_after")
    retry_after: float

    def __init__(self, message: str, *, policy: str, retry_after: float) -> None:
        super().__init__(message, policy=policy)
        self.retry_after = retry_after

    @property
    def args(self) -> tuple[Any, ...]:
        return _args.__get__(self) or self._standard_args()

    @args.setter
    def args(self, value: tuple[Any, ...]) -> None:
        _args.__set__(self, value)

    def _standard_args(self) -> tuple[str]:
        args = (f"circuit breaker {self.policy!r} is open",)
        _args.__set__(self, args)
        return args

    def __str__(self) -> str:
        args = _args.__get__(self) or self._standard_args()
        return str(args[0]) if len(args) == 1 else str(args)  # as BaseException does

    def __repr__(self) -> str:
        if not _args.__get__(self):
            self._standard_args()
        return _repr(self)


# BaseException's own: the C-level args of every exception, and what reads them.
_args: Any = BaseException.__dict__["args"]
_repr = BaseException.__repr__


class BulkheadFullError(StalwartError):
    """A bulkhead had no free slot and no room (or time) left to queue for one."""


class DeadlineExceeded(StalwartError, TimeoutError):
    """A `Timeout` or `deadline` expired and the work under it was cancelled.

    ``timeout`` is the limit that applied, in seconds: for a `Timeout` nested
    in a nearer ambient deadline, the (shorter) time that was actually left.
    It is also a built-in `TimeoutError`, so existing handlers keep working.
    """

    timeout: float

    def __init__(self, message: str, *, policy: str, timeout: float) -> None:
        super().__init__(message, policy=policy)
        self.timeout = timeout


class IdempotencyConflict(StalwartError):
    """A call with the same idempotency key is in flight (``on_conflict="raise"``)."""


class IdempotencyKeyReused(StalwartError):
    """An idempotency key was reused with different arguments (another fingerprint)."""


class RateLimitExceeded(StalwartError):
    """A rate or concurrency limit refused the call without running it.

    ``retry_after`` is the number of seconds until the limit would admit the
    call, when the limiter knows it, else ``None``. A default `Retry` does
    not retry it: the limit is this process's own decision, and waiting it
    out belongs to the caller (or to the limiter's own ``max_wait``).
    """

    retry_after: float | None

    def __init__(self, message: str, *, policy: str, retry_after: float | None = None) -> None:
        super().__init__(message, policy=policy)
        self.retry_after = retry_after


class StoreUnavailable(StalwartError):
    """A shared store (Redis) could not be reached in time, so the call did not run.

    Raised by ``stalwart.redis.RedisStore`` when an idempotency key cannot
    be claimed or waited on: running the call without its record could run
    it twice, so by default the store refuses (pass
    ``on_unavailable="bypass"`` to run such calls without de-duplication
    instead). ``policy`` is the store's ``name``; the error from the Redis
    client, if any, is the ``__cause__``. Circuit breakers never raise it:
    they go on with their own state while their store is unreachable.
    """


class StalwartWarning(UserWarning):
    """A configuration that works, but is probably a mistake.

    Emitted when a policy is built (so ``-W error::stalwart.StalwartWarning``,
    or pytest's ``filterwarnings = ["error::stalwart.StalwartWarning"]``,
    turns it into a failure at startup). The message says what stalwart does
    instead and how to say what you meant.
    """


# Errors are part of the public API: name them by where users import them
# from (tracebacks, reprs, pickles and the spans' error.type all show this).
for _error in (
    StalwartError,
    CircuitOpenError,
    BulkheadFullError,
    DeadlineExceeded,
    IdempotencyConflict,
    IdempotencyKeyReused,
    RateLimitExceeded,
    StoreUnavailable,
    StalwartWarning,
):
    _error.__module__ = "stalwart"
del _error
