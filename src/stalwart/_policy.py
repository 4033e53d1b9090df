"""What every policy is: a decorator, a ``call()``, and a composable layer.

This is stalwart's extension seam. A policy is a subclass of `Policy` that

* names its **kind** (``kind = "retry"``): its spans are ``stalwart.<kind>
  <name>``, its events and its ``stalwart_calls_total`` rows say it;
* declares its **metrics** (``metrics_type``, a `PolicyMetrics` subclass
  listing its metric families; by default the outcome counters alone);
* implements **one method**, `Policy.wrap`, which builds, once per decorated
  function, the wrapper that applies the policy to it.

Everything else is the seam's: decorating, ``call()``, composition in a
`Pipeline`, the integrations (which bind policies through `wrap` as well),
the shared metrics and their retirement, events for listeners and spans.
The how-to "Write your own policy" builds one end to end.

The wrapper's body is written once. What varies per binding (open a span or
not; time the call or not) is a constant the body closes over, and a body
that opens a span runs its own untraced twin inside it: see any built-in
policy's ``wrap``. Wrappers on the hot path call ``fn(*args)`` when no
keyword arguments were given: ``fn(*args, **kwargs)`` copies the (empty)
dict on every call, which costs a fifth of a bare ``await`` (the "Retry,
success" benchmark row).
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Final, ParamSpec, Self, TypeVar, final

from . import _clock, _telemetry, _validate
from ._metrics import PolicyMetrics
from ._telemetry import Telemetry, resolve, run_in_span
from ._warnings import warn
from .events import Event

__all__ = ["AsyncCallable", "Binding", "Policy", "ensure_async"]

P = ParamSpec("P")
T = TypeVar("T")
E = TypeVar("E", bound=Event)

AsyncCallable = Callable[P, Coroutine[Any, Any, T]]

# ``call()`` binds the function it is given; remembering a few bindings keeps
# repeated ``policy.call(client.get, ...)`` from rebuilding the wrapper.
_CALL_CACHE_SIZE: Final = 64

# A policy only gets a cache of its own once ``call()`` is used.
_NO_BINDINGS: Final[Mapping[Callable[..., Any], Callable[..., Any]]] = MappingProxyType({})


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


@final
@dataclass(frozen=True, slots=True)
class Binding:
    """How `Policy.wrap` is asked to apply a policy to a function.

    Attributes:
        origin: the user's function at the bottom of the stack (the function
            being wrapped may already be another policy's wrapper): a policy
            that keys state on the function (`Idempotency`) reads it.
        traced: True when the wrapper should open the policy's span (when a
            tracer listens); False inside a `Pipeline` or an integration
            that opens the span of an outer policy instead.
    """

    origin: Callable[..., Any]
    traced: bool = True


class Policy(ABC):
    """Base class of the resilience policies, built-in or your own.

    A policy is reusable and safe to share between concurrent calls. Use it
    as a decorator::

        @sw.Retry(attempts=3)
        async def fetch(url: str) -> bytes: ...

    or around a single call::

        data = await sw.Retry(attempts=3).call(fetch, url)

    **Writing a policy.** Subclass it, set `kind`, optionally `metrics_type`,
    call ``super().__init__(name=name, telemetry=telemetry)`` and implement
    `wrap`. The how-to "Write your own policy" shows one end to end.

    A policy whose metrics are ``exclusive`` (they describe one live object)
    and that shares its state with others of its name through a store passes
    that store as ``shared_state``: policies sharing one state do not clash.
    """

    #: the policy's kind: span ``stalwart.<kind> <name>``, label ``kind``, `Event.kind`
    kind: ClassVar[str]
    #: the class of its metrics: `PolicyMetrics`, or a subclass declaring more families
    metrics_type: ClassVar[type[PolicyMetrics]] = PolicyMetrics

    #: How to call the class to get a decorator (``"Retry()"``), for a class
    #: none of whose arguments is ever a function: used bare (``@sw.Retry``),
    #: it says so (see `__new__`). None: the class takes functions.
    _decorator_call: ClassVar[str | None] = None
    __slots__ = (
        "__weakref__",
        "_call_cache",
        "_metrics",
        "_name",
        "_registration",
        "_shared_state",
        "_suspect",
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

    def __init__(
        self, *, name: str, telemetry: Telemetry | None, shared_state: object = None
    ) -> None:
        self._name = _validate.name(name)
        self._telemetry = resolve(telemetry)
        kind = getattr(type(self), "kind", None)
        if not isinstance(kind, str) or not kind.isidentifier():
            raise TypeError(
                f"{type(self).__qualname__}.kind must be a str naming the policy's kind "
                f"(an identifier, such as 'retry'), not {kind!r}"
            )
        self._shared_state = shared_state
        self._registration, self._suspect = self._telemetry.register(
            kind, self._name, self.metrics_type, state=shared_state
        )
        self._metrics = self._registration.metrics
        self._call_cache: Mapping[Callable[..., Any], Callable[..., Any]] = _NO_BINDINGS
        if self._suspect and type(self).__init__ is Policy.__init__:
            self._confirm_clash()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Check a new policy's name once its construction is over (see `_confirm_clash`)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return

        @functools.wraps(init)
        def __init__(self: Policy, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            init(self, *args, **kwargs)
            if self._suspect and type(self).__init__ is __init__:
                self._confirm_clash()

        cls.__init__ = __init__  # type: ignore[method-assign]

    def _confirm_clash(self) -> None:
        """Warn if another live policy of this kind and name holds exclusive metrics.

        Two such policies would merge their series (a breaker's state gauge
        would show both states). Checked when the outermost constructor
        returns, so that a policy whose options are refused never warns.
        """
        self._suspect = False
        kind, name, state = self.kind, self._name, self._shared_state
        # Let go of the registration while garbage is collected: only the
        # other holder's hold is in question.
        del self._registration
        try:
            clash = self._telemetry._collector.confirm(kind, name, state)
        finally:
            self._registration, _ = self._telemetry.register(
                kind, name, self.metrics_type, state=state
            )
        self._metrics = self._registration.metrics
        if clash:
            warn(
                f"another live {kind} named {name!r} reports to this registry: their "
                "series would merge (a state gauge would show both states). Give each a "
                "name of its own, or a Telemetry with a registry of its own"
            )

    @property
    def name(self) -> str:
        """The policy's name: its ``policy`` metric label and span attribute."""
        return self._name

    @property
    def telemetry(self) -> Telemetry:
        """Where the policy reports its metrics, spans and events."""
        return self._telemetry

    @property
    def metrics(self) -> PolicyMetrics:
        """The counters it shares with the policies of its kind and name on its registry."""
        return self._metrics

    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, T]]
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate ``fn``; the result has ``fn``'s signature and metadata."""
        ensure_async(fn)
        wrapper = self.wrap(fn, Binding(fn))
        return _wraps(wrapper, fn)

    async def call(
        self, fn: Callable[P, Coroutine[Any, Any, T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``await fn(*args, **kwargs)`` under this policy."""
        bound = self._call_cache.get(fn)
        if bound is None:
            ensure_async(fn, "fn")
            bound = self.wrap(fn, Binding(fn))
            cache = self._call_cache
            if not isinstance(cache, dict):
                cache = self._call_cache = {}
            if len(cache) >= _CALL_CACHE_SIZE:
                del cache[next(iter(cache))]
            cache[fn] = bound
        return await bound(*args, **kwargs)  # type: ignore[no-any-return]

    @abstractmethod
    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        """Build the wrapper applying this policy to ``fn``: once per function, not per call.

        The wrapper awaits ``fn`` (or refuses to), and reports on the way:

        * **outcomes**, into `metrics`: ``metrics.success += 1`` when it
          returns, ``metrics.failed(exc, start)`` when ``fn`` raised,
          ``metrics.refused(start)`` when the policy refused the call itself,
          ``metrics.timed_out(start)`` when it raised `DeadlineExceeded`
          itself. ``start`` is `start` (``None`` unless the telemetry
          measures latency);
        * **a span**, when ``binding.traced``: if `tracing` says a tracer
          listens, the wrapper runs an untraced twin of itself inside
          `in_span` instead of doing the work itself;
        * **events**, through `report`.

        ``binding.origin`` is the user's function, for policies that key
        state on it. Integrations and `Pipeline` bind through this method.
        """

    # -- for wrappers ---------------------------------------------------------

    def build(
        self,
        make: Callable[[AsyncCallable[P, T] | None], AsyncCallable[P, T]],
        binding: Binding,
    ) -> AsyncCallable[P, T]:
        """The wrapper ``make`` writes, traced as ``binding`` asks.

        ``make(None)`` must return the untraced wrapper; ``make(plain)`` the
        traced one, which runs ``plain`` inside the policy's span (`in_span`)
        when a tracer listens (`tracing`), and does the work itself otherwise.
        One body, written once, closed over the choice.
        """
        plain = make(None)
        return make(plain) if binding.traced else plain

    def build_through(
        self,
        body: Callable[
            [Callable[..., Coroutine[Any, Any, T]], tuple[Any, ...], dict[str, Any]],
            Coroutine[Any, Any, T],
        ],
        fn: Callable[..., Coroutine[Any, Any, T]],
        binding: Binding,
    ) -> AsyncCallable[P, T]:
        """The wrapper that awaits ``body(fn, args, kwargs)``, traced as ``binding`` asks.

        For a policy whose work on a call, in its general form, is a method
        (a Retry with a budget, a Fallback judging results): the wrapper
        only gates the span (see `build`) and hands the call over.
        """
        slot, owner = self._telemetry.provider_slot, self

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def through(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await owner.in_span(plain, args, kwargs)
                return await body(fn, args, kwargs)

            return through

        return self.build(make, binding)

    def tracing(self) -> bool:
        """Might a call be traced now? The gate of a traced wrapper.

        Built-in wrappers read ``telemetry.provider_slot`` inline instead:
        the call costs a tenth of a bare ``await`` (the "Retry, success" row).
        """
        return self._telemetry._slot._TRACER_PROVIDER is not None

    def in_span(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Coroutine[Any, Any, T]:
        """``fn(*args, **kwargs)``, to await in the policy's span (``stalwart.<kind> <name>``).

        The span ends with status ERROR and the exception recorded when
        ``fn`` raises; its ``stalwart.policy`` attribute is the policy's name.
        """
        registration = self._registration
        return run_in_span(
            self._telemetry, registration.span_name, registration.span_attributes, fn, args, kwargs
        )

    def timer(self) -> Callable[[], float] | None:
        """The clock to time calls with, or None when the telemetry does not measure latency.

        A wrapper takes ``start = None if timer is None else timer()`` and
        hands ``start`` to its `PolicyMetrics`, which fill
        ``stalwart_call_duration_seconds`` when it is not None.
        """
        return _clock.now if self._telemetry._buckets is not None else None

    @property
    def observed(self) -> bool:
        """Would an event reach anyone (a listener, a recording span)? See `report`."""
        return _telemetry.observed(self._telemetry)

    def report(self, event_type: type[E], /, **fields: Any) -> None:
        """Report an event of ``event_type``: to the telemetry's listeners and the current span.

        ``policy``, ``kind`` and ``time`` are filled in; ``fields`` are the
        event's own. Nothing is built when nobody listens; on a path where
        even this call counts, test `observed` first.

        Example::

            self.report(CallRejected, reason="maintenance", retry_after=None)
        """
        _telemetry.report(self._telemetry, event_type, self._name, self.kind, **fields)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._name!r}>"


def _wraps(
    wrapper: Callable[P, Coroutine[Any, Any, T]], fn: Callable[..., Any]
) -> Callable[P, Coroutine[Any, Any, T]]:
    functools.update_wrapper(wrapper, fn)
    return wrapper
