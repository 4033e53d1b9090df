"""What every policy is: a decorator, a ``call()``, and a composable layer.

A policy turns an ``async`` callable into another one with the same signature.
Subclasses implement a single method, `Policy._bind`, which builds that wrapper
once per decorated function (never per call). `Pipeline` composes policies by
binding them inside one another with ``traced=False``: members then open no
spans of their own and the pipeline's single span carries their events.

Wrappers on the hot path call ``fn(*args)`` when no keyword arguments were
given: ``fn(*args, **kwargs)`` copies the (empty) dict on every call, which
costs a fifth of a bare ``await``.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, Self, TypeVar

from typing_extensions import ParamSpec

from . import _validate
from ._telemetry import POLICY_ATTRIBUTE, Telemetry, resolve

__all__ = ["AsyncCallable", "Policy", "ensure_async"]

P = ParamSpec("P")
T = TypeVar("T")

AsyncCallable = Callable[P, Coroutine[Any, Any, T]]

# ``call()`` binds the function it is given; remembering a few bindings keeps
# repeated ``policy.call(client.get, ...)`` from rebuilding the wrapper.
_CALL_CACHE_SIZE: Final = 64

# A policy only gets a cache of its own once ``call()`` is used.
_NO_BINDINGS: Final[Mapping[Callable[..., Any], Callable[..., Any]]] = MappingProxyType({})

# Span name and attributes per (kind, name): the same for every policy of that
# kind and name, and never mutated, so they are shared rather than built per
# policy (a service may build a policy per dependency, or per tenant).
_span_naming: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}


def is_async_callable(fn: object) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def ensure_async(fn: object, what: str = "the decorated function") -> None:
    if not callable(fn):
        raise TypeError(f"{what} must be an async callable, not {type(fn).__name__}")
    if not is_async_callable(fn):
        label = getattr(fn, "__qualname__", None) or repr(fn)
        raise TypeError(
            f"{what} must be an `async def` function; {label} is not "
            "(stalwart wraps coroutine functions only)"
        )


class Policy(ABC):
    """Base class of the resilience policies.

    A policy is reusable and safe to share between concurrent calls. Use it
    as a decorator::

        @sw.Retry(attempts=3)
        async def fetch(url: str) -> bytes: ...

    or around a single call::

        data = await sw.Retry(attempts=3).call(fetch, url)
    """

    kind: ClassVar[str]
    #: How to call the class to get a decorator (``"Retry()"``), for a class
    #: none of whose arguments is ever a function: used bare (``@sw.Retry``),
    #: it says so (see `__new__`). None: the class takes functions.
    _decorator_call: ClassVar[str | None] = None
    __slots__ = (
        "__weakref__",
        "_call_cache",
        "_name",
        "_span_attributes",
        "_span_name",
        "_telemetry",
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # `@sw.Retry` (no parentheses) is `Retry(fn)`: say that, rather than
        # "attempts must be an int, not function".
        call = cls._decorator_call
        if call is not None and len(args) == 1 and not kwargs and inspect.isroutine(args[0]):
            name = getattr(args[0], "__qualname__", None) or repr(args[0])
            raise TypeError(
                f"{cls.__name__} makes a decorator when called: write @sw.{call}, "
                f"not @sw.{cls.__name__} (it was given the function {name})"
            )
        return super().__new__(cls)

    def __init__(self, *, name: str, telemetry: Telemetry | None) -> None:
        self._name = _validate.name(name)
        self._telemetry = resolve(telemetry)
        key = (self.kind, self._name)
        naming = _span_naming.get(key)
        if naming is None:
            naming = _span_naming.setdefault(
                key, (f"stalwart.{self.kind} {self._name}", {POLICY_ATTRIBUTE: self._name})
            )
        self._span_name, self._span_attributes = naming
        self._call_cache: Mapping[Callable[..., Any], Callable[..., Any]] = _NO_BINDINGS

    @property
    def name(self) -> str:
        """The policy's name: its ``policy`` metric label and span attribute."""
        return self._name

    @property
    def telemetry(self) -> Telemetry:
        """Where the policy reports its metrics and spans."""
        return self._telemetry

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate ``fn``; the result has ``fn``'s signature and metadata."""
        ensure_async(fn)
        wrapper = self._bind(fn, origin=fn, traced=True)
        return _wraps(wrapper, fn)

    async def call(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``await fn(*args, **kwargs)`` under this policy."""
        bound = self._call_cache.get(fn)
        if bound is None:
            ensure_async(fn, "fn")
            bound = self._bind(fn, origin=fn, traced=True)
            cache = self._call_cache
            if not isinstance(cache, dict):
                cache = self._call_cache = {}
            if len(cache) >= _CALL_CACHE_SIZE:
                del cache[next(iter(cache))]
            cache[fn] = bound
        return await bound(*args, **kwargs)  # type: ignore[no-any-return]

    @abstractmethod
    def _bind(
        self,
        fn: Callable[P, Coroutine[Any, Any, T]],
        *,
        origin: Callable[..., Any],
        traced: bool,
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Build the wrapper applying this policy to ``fn``.

        ``origin`` is the user's function at the bottom of the stack (for
        policies that key state on it); with ``traced`` the wrapper opens the
        policy's span when a tracer listens, else it opens none.
        """

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r}>"


def _wraps(
    wrapper: Callable[P, Coroutine[Any, Any, T]], fn: Callable[..., Any]
) -> Callable[P, Coroutine[Any, Any, T]]:
    functools.update_wrapper(wrapper, fn)
    return wrapper
