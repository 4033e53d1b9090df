"""The Fallback policy: an answer of its own when the call fails."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypedDict, TypeVar, Unpack, final, overload

from ._matchers import ExceptionMatcher, Matcher, matcher_text
from ._metrics import Counted, MetricFamily, PolicyMetrics
from ._policy import AsyncCallable, Binding, Policy, is_async_callable
from ._telemetry import Telemetry, observed
from .events import FellBack

__all__ = ["Fallback", "FallbackMetrics"]

P = ParamSpec("P")
T = TypeVar("T")
# Covariant: a Fallback[int] is a Fallback[int | None], so it may guard a
# function returning ``int | None`` (see `Fallback.__call__`).
R_co = TypeVar("R_co", covariant=True)


class FallbackMetrics(PolicyMetrics):
    """A `Fallback`'s: ``stalwart_fallbacks_total``, the calls it answered instead."""

    __slots__ = ("fallbacks",)

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.fallbacks = 0

    families = (
        MetricFamily(
            "stalwart_fallbacks",
            "counter",
            "Calls a fallback answered instead: the call raised an exception it falls back on, "
            "or returned a result it does.",
            "fallbacks",
        ),
    )


class _Options(TypedDict, total=False):
    """`Fallback`'s keyword arguments, for its overloads (see its ``__init__``)."""

    on: ExceptionMatcher
    on_result: Callable[[Any], bool] | None
    name: str
    telemetry: Telemetry | None


@final
class Fallback(Policy, Generic[R_co]):
    """Answer with a fallback when the call fails, instead of failing.

    When the wrapped call raises an exception matching ``on``, or returns a
    result for which ``on_result`` is true, the call returns the fallback
    instead: ``fallback`` itself, or, when ``fallback`` is callable, what it
    returns when given that exception or result (a sync function, or an
    ``async def`` one, awaited). A callable is always called: to fall back on
    a callable *value*, return it from one (``lambda _: handler``). A value
    is the same object on every fallback: for a fresh mutable one (a list a
    caller may append to), give a callable (``lambda _: []``).

    Only `Exception` subclasses ever fall back: cancellation,
    ``KeyboardInterrupt`` and ``SystemExit`` propagate, even with
    ``on=BaseException``. An exception the fallback itself raises
    propagates (with the call's exception as its ``__context__``). A call
    that fell back counts as a ``success`` in ``stalwart_calls_total`` and
    once in ``stalwart_fallbacks_total``; the event `FellBack` says why.

    Typing: ``Fallback(x)`` is a ``Fallback[type of x]`` (of what the
    callable returns, awaited), and it only decorates a function whose
    return type accepts it: ``@Fallback(b"")`` keeps ``async def f() ->
    bytes`` a function returning ``bytes`` for ``mypy --strict``, and is an
    error on one returning ``str``. ``Fallback(None)`` needs a function
    returning an ``Optional``.

    Put it outermost, so that it answers for whatever the policies inside
    gave up on (a retry's last error, an open breaker's rejection, a
    timeout)::

        @sw.Fallback(lambda exc: cached_prices(), on=(httpx.HTTPError, sw.StalwartError))
        @sw.Retry(attempts=3)
        @sw.CircuitBreaker(name="prices")
        async def prices() -> dict[str, Decimal]: ...

    Args:
        fallback: the value returned instead, or a callable given the
            exception (or the result) and returning it, sync or async.
        on: which exceptions fall back: a type, a tuple of types, or a
            predicate ``exc -> bool`` (default: every `Exception`).
        on_result: ``result -> bool``, True to fall back instead of a
            returned value; the callable is then given that result.
        name: the ``policy`` label of its metrics and attribute of its spans.
        telemetry: where it reports (``None``: the default `Telemetry`).
    """

    kind = "fallback"
    metrics_type = FallbackMetrics
    _metrics: FallbackMetrics
    __slots__ = ("_answer", "_fallback", "_matches", "_on", "_on_result")

    @overload
    def __init__(
        self, fallback: Callable[[Any], Awaitable[R_co]], **options: Unpack[_Options]
    ) -> None: ...

    @overload
    def __init__(self, fallback: Callable[[Any], R_co], **options: Unpack[_Options]) -> None: ...

    @overload
    def __init__(self, fallback: R_co, **options: Unpack[_Options]) -> None: ...

    def __init__(
        self,
        fallback: Any,
        *,
        on: ExceptionMatcher = Exception,
        on_result: Callable[[Any], bool] | None = None,
        name: str = "fallback",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        self._on = on
        self._matches = Matcher("on", on)
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result must be callable, not {type(on_result).__name__}")
        self._on_result = on_result
        if callable(fallback):
            _check_takes_one_argument(fallback)
        self._fallback = fallback
        self._answer = _answer_of(fallback)

    @property
    def fallback(self) -> Any:
        """The value, or the callable, it answers with."""
        return self._fallback

    # The self-types below make the fallback's type ``R_co`` the function's
    # return type ``T``: mypy reports a fallback of another type at the
    # decorator. ``None`` is the exception: it makes the result Optional.

    @overload  # type: ignore[override]
    def __call__(
        self: Fallback[None], fn: Callable[P, Coroutine[Any, Any, T | None]]
    ) -> Callable[P, Coroutine[Any, Any, T | None]]: ...

    @overload
    def __call__(
        self: Fallback[T], fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __call__(self, fn: Any) -> Any:
        """Decorate ``fn``; the result has ``fn``'s signature and metadata."""
        return Policy.__call__(self, fn)

    @overload  # type: ignore[override]
    async def call(
        self: Fallback[None],
        fn: Callable[P, Coroutine[Any, Any, T | None]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T | None: ...

    @overload
    async def call(
        self: Fallback[T],
        fn: Callable[P, Coroutine[Any, Any, T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T: ...

    async def call(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run ``await fn(*args, **kwargs)``, falling back as the policy says."""
        return await Policy.call(self, fn, *args, **kwargs)

    def wrap(  # type: ignore[override]
        self: Fallback[T], fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        call: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        slot, metrics, owner = self._telemetry.provider_slot, self._metrics, self
        # A result predicate or latency to measure: `_judged` makes the call.
        # Otherwise there is nothing to judge nor time on success, and the
        # call is made inline (the "Fallback, success" row): the wrapper
        # closes over what that path uses, and reaches the rest through
        # `owner` (each name it closes over is copied into every call's frame).
        if self._on_result is not None or self.timer() is not None:
            return self.build_through(self._judged, call, binding)

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def falling_back(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await owner.in_span(plain, args, kwargs)
                try:
                    result = await (call(*args, **kwargs) if kwargs else call(*args))
                except Exception as exc:
                    if not owner._matches(exc):
                        metrics.failed(exc, None)
                        raise
                    try:
                        result = await owner._fell_back(exc, None)
                    except BaseException as error:
                        metrics.failed(error, None)
                        raise
                except BaseException as exc:  # cancellation and exits never fall back
                    metrics.failed(exc, None)
                    raise
                metrics.success += 1
                return result

            return falling_back

        return self.build(make, binding)

    async def _judged(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        """A call with a result predicate or latency to measure."""
        timer = self.timer()
        with Counted(self._metrics, None if timer is None else timer()):
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                if not self._matches(exc):
                    raise
                return await self._fell_back(exc, None)  # type: ignore[no-any-return]
            on_result = self._on_result
            if on_result is not None and on_result(result):
                return await self._fell_back(None, result)  # type: ignore[no-any-return]
            return result

    async def _fell_back(self, error: Exception | None, result: Any) -> Any:
        """The fallback's answer for ``error`` (or ``result``), counted and reported."""
        self._metrics.fallbacks += 1
        if observed(self._telemetry):
            self.report(FellBack, error=error, result=result)
        return await self._answer(result if error is None else error)

    def __repr__(self) -> str:
        fallback = self._fallback
        shown = (
            getattr(fallback, "__qualname__", None) or repr(fallback)
            if callable(fallback)
            else repr(fallback)
        )
        if len(shown) > 60:
            shown = shown[:57] + "..."
        parts = [shown, f"on={matcher_text(self._on)}"]
        if self._on_result is not None:
            parts.append(f"on_result={matcher_text(self._on_result)}")
        parts.append(f"name={self._name!r}")
        return f"Fallback({', '.join(parts)})"


def _answer_of(fallback: Any) -> Callable[[Any], Awaitable[Any]]:
    """The fallback as one coroutine function of the exception or result."""
    if not callable(fallback):
        value = fallback

        async def constant(_: Any) -> Any:
            return value

        return constant
    if is_async_callable(fallback):
        return fallback  # type: ignore[no-any-return]
    function = fallback

    async def called(cause: Any) -> Any:
        answer = function(cause)
        # A sync callable may return an awaitable (``lambda exc: refresh()``): await it.
        return await answer if inspect.isawaitable(answer) else answer

    return called


def _check_takes_one_argument(fallback: Callable[..., Any]) -> None:
    """A callable fallback is given one argument: say so now if it cannot take it."""
    try:
        signature = inspect.signature(fallback)
    except (TypeError, ValueError):
        return  # (a builtin without a signature: trusted)
    try:
        signature.bind(None)
    except TypeError:
        label = getattr(fallback, "__qualname__", None) or repr(fallback)
        raise TypeError(
            f"fallback must be a value or a callable taking one argument (the exception or "
            f"the result it answers for); {label}{signature} cannot take one"
        ) from None
