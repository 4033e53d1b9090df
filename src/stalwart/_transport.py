"""The rules every transport integration shares, HTTP or gRPC, as plain functions.

How a client integration checks its options, which value of a repeated
header or metadata key counts, when an attempt has no time left to be sent,
which of stalwart's errors a transport has an error of its own for and how
it becomes that error, and how a server integration tells its caller about
one: one place for the rules, so that `stalwart.httpx`, `stalwart.aiohttp`,
`stalwart.grpc` and `stalwart.asgi` apply the same ones. The HTTP-only rules
(statuses, headers, problem answers) are in `_http`.
Nothing here imports a transport's library.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Coroutine, Iterable, Mapping
from typing import Any, Final, ParamSpec, TypeVar

from . import _validate
from ._deadline import remaining
from ._errors import DeadlineExceeded, StalwartError, recast
from ._hedge import Hedge
from ._matchers import ExceptionMatcher
from ._policy import Binding, Policy
from ._rate_limiter import RateLimiter
from ._retry import Retry

__all__ = [
    "LEAST_TIME_LEFT",
    "bind_attempts",
    "by_kind",
    "client_policy",
    "collection_option",
    "first_value",
    "hedge_option",
    "kind_of",
    "made_policy",
    "policy_factory",
    "policy_option",
    "rate_limit_option",
    "retry_after_of",
    "time_left",
    "translated",
]

T = TypeVar("T")
V = TypeVar("V")
P = ParamSpec("P")

LEAST_TIME_LEFT: Final = 0.001
"""Seconds: an attempt with less time left than this is not sent, it could only time out."""


# -- a client's options ------------------------------------------------------------------


def policy_option(value: Any) -> Policy:
    """``value``, checked to be a stalwart policy (the ``policy`` option, once defaulted)."""
    if not isinstance(value, Policy):
        raise TypeError(f"policy must be a stalwart policy or None, not {type(value).__name__}")
    return value


def rate_limit_option(value: Any) -> RateLimiter | None:
    """``value``, checked to be a `RateLimiter` or None (the ``rate_limit`` option)."""
    if value is not None and not isinstance(value, RateLimiter):
        raise TypeError(
            f"rate_limit must be a stalwart.RateLimiter or None, not {type(value).__name__}"
        )
    return value


def hedge_option(value: Any) -> Hedge | None:
    """``value``, checked to be a `Hedge` or None (the ``hedge`` option)."""
    if value is not None and not isinstance(value, Hedge):
        raise TypeError(f"hedge must be a stalwart.Hedge or None, not {type(value).__name__}")
    return value


def bind_attempts(
    policy: Policy,
    attempt: Callable[P, Coroutine[Any, Any, T]],
    rate_limit: RateLimiter | None,
    origin: Callable[..., Any],
    hedge: Hedge | None = None,
) -> Callable[P, Coroutine[Any, Any, T]]:
    """``policy`` around ``attempt``, with ``rate_limit`` (if any) around each attempt.

    The limiter sits inside the policy: every attempt, a retry's too, takes
    a turn, and its refusal reaches the policy (a default `Retry` does not
    retry it). A ``hedge`` sits between the two: each of the policy's
    attempts is hedged, and each hedge is an attempt that takes its turn.
    Neither opens a span of its own: the policy's carries their events.
    ``origin`` is the client's own attempt function (its signature is what
    a limiter's ``key=`` parameter name reads).
    """
    if rate_limit is not None:
        attempt = rate_limit.wrap(attempt, Binding(origin, traced=False))
    if hedge is not None:
        attempt = hedge.wrap(attempt, Binding(origin, traced=False))
    return policy.wrap(attempt, Binding(origin))


def collection_option(param: str, value: Any, what: str) -> frozenset[Any]:
    """The members of a collection of ``what`` (not a lone str or bytes), as a frozenset."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{param} must be a collection of {what}, not {type(value).__name__}")
    try:
        return frozenset(value)
    except TypeError:
        raise TypeError(f"{param} must be a collection of {what}, got an unhashable one") from None


def policy_factory(
    param: str, value: Any, *, key: str, a_key: str, each: str
) -> Callable[[str], Policy] | None:
    """``value``, checked to be None or a callable making a policy per ``key``.

    A policy given instead is refused with a hint: it would be shared by
    every ``each``, which is what the ``policy`` option is for. Returns the
    factory for a `PerKey`: ``value``, whose every result is checked to be
    a policy (`made_policy`).
    """
    if isinstance(value, Policy):
        raise TypeError(
            f"{param} must be a callable making a new policy for each {key} "
            f"(`{param}=lambda {key}: sw.CircuitBreaker(...)`), not a policy: "
            f"one policy for every {each} is what `policy` is for"
        )
    if value is not None and not callable(value):
        raise TypeError(
            f"{param} must be a callable taking {a_key} and returning a policy, "
            f"not {type(value).__name__}"
        )
    if value is None:
        return None
    user: Callable[[str], Any] = value

    def make(made_for: str) -> Policy:
        return made_policy(param, user(made_for), made_for)

    return make


def client_policy(policy: Any, *, name: Any, retry_on: ExceptionMatcher) -> tuple[str, Policy]:
    """A client integration's ``name`` and ``policy``, checked.

    The default policy (``policy`` None) is a `Retry` of 3 attempts of the
    errors ``retry_on`` accepts, named after the client.
    """
    checked = _validate.name(name)
    if policy is None:
        policy = Retry(attempts=3, on=retry_on, name=checked)
    return checked, policy_option(policy)


def made_policy(param: str, made: Any, key: str) -> Policy:
    """``made``, the policy that ``param`` returned for ``key``, checked to be one."""
    if not isinstance(made, Policy):
        raise TypeError(
            f"{param} must return a stalwart policy, returned {type(made).__name__} for {key}"
        )
    return made


# -- headers and metadata ----------------------------------------------------------------


def first_value(pairs: Iterable[tuple[object, V]] | None, key: object) -> V | None:
    """The value of the first of ``pairs`` named ``key`` (None: there is none).

    ``pairs`` are a request's headers or a call's metadata, as (name, value)
    pairs; a name that comes more than once counts as its first.
    """
    if pairs:
        for name, value in pairs:
            if name == key:
                return value
    return None


# -- an attempt's deadline ---------------------------------------------------------------


def time_left(policy: str, unsent: str, *args: object) -> float | None:
    """Seconds left before the ambient deadline, or None without one.

    With less than `LEAST_TIME_LEFT`, raises `DeadlineExceeded` instead
    (``policy`` is its ``policy``): an attempt sent now could only time out.
    Its message says what was not sent, ``unsent.format(*args)``, formatted
    only then.
    """
    left = remaining()
    if left is not None and left < LEAST_TIME_LEFT:
        raise DeadlineExceeded(
            "no time left before the deadline: " + unsent.format(*args),
            policy=policy,
            timeout=left,
        )
    return left


# -- stalwart's errors in a transport's terms --------------------------------------------


def kind_of(
    error: BaseException, table: Container[type[StalwartError]]
) -> type[StalwartError] | None:
    """The class of ``table`` nearest to ``error``'s own in its MRO, or None.

    A subclass follows its nearest listed base: an error an integration
    made of a listed one (``stalwart.httpx``'s, which are httpx errors too)
    is recognised as what it stands for.
    """
    for cls in type(error).__mro__:
        if cls in table:
            return cls
    return None


def by_kind(*classes: type[T]) -> dict[type[StalwartError], type[T]]:
    """A transport's own error classes by the stalwart error each stands for: its last base."""
    table: dict[type[StalwartError], type[T]] = {}
    for cls in classes:
        kind = cls.__bases__[-1]
        if not issubclass(kind, StalwartError):
            raise TypeError(f"{cls.__name__}'s last base must be a stalwart error")
        table[kind] = cls
    return table


def translated(
    error: StalwartError,
    table: Mapping[type[StalwartError], type[T]],
    *,
    unless: type[BaseException],
) -> T | None:
    """``error`` as the transport's error of ``table`` that stands for it, or None.

    None when it is a transport error already (an ``unless``: a nested
    client's) or when nothing in ``table`` stands for it. The copy keeps the
    original's message, ``policy`` and other attributes (see `recast`).
    """
    if isinstance(error, unless):
        return None
    kind = kind_of(error, table)
    return None if kind is None else recast(error, table[kind])


def retry_after_of(error: BaseException) -> float | None:
    """``error``'s ``retry_after`` in seconds, or None when it does not know.

    None when it has none, or it is None, negative or not finite (a breaker
    forced open has no time to tell).
    """
    seconds = getattr(error, "retry_after", None)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return None
    if not (math.isfinite(seconds) and seconds >= 0):
        return None
    return seconds
