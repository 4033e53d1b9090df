"""Metrics, traces and events, cheap when nobody listens.

Three decisions keep the hot path free of telemetry cost:

* **Metrics are read at scrape time.** A policy counts into plain integer
  slots of its `PolicyMetrics` (see `_metrics`), shared by the policies of
  one kind and name on one registry, and turned into Prometheus families
  only when the registry is scraped.
* **Spans are opened only when a real tracer provider is configured.** The
  OpenTelemetry API's no-op path still costs ~50x a bare ``await``, so each
  decorated call first reads one attribute of its telemetry's *provider
  slot* (`Telemetry.provider_slot`): with no SDK installed, that read is all
  the tracing work there is.
* **Events are built only for someone.** A policy builds an event (see
  `stalwart.events`) only when its telemetry has listeners or a span may be
  recording (`observed`); otherwise reporting it costs one test.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any, Final, TypeVar, final

import opentelemetry.trace as _ot
from opentelemetry.context import attach as _attach
from opentelemetry.context import detach as _detach
from opentelemetry.context import get_current as _get_current
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Status, StatusCode
from opentelemetry.util.types import AttributeValue
from prometheus_client import REGISTRY, CollectorRegistry

from . import _clock, _metrics
from ._metrics import POLICY_ATTRIBUTE, PolicyMetrics, Registration
from ._privates import ProviderSlot, otel_probe
from ._version import __version__
from .events import Event, Listener

__all__ = ["POLICY_ATTRIBUTE", "Telemetry"]

T = TypeVar("T")
M = TypeVar("M", bound=PolicyMetrics)

_INSTRUMENTATION = "stalwart"
_log = logging.getLogger("stalwart")


class _Fixed:
    """The provider slot of a telemetry given its own provider: it never changes."""

    __slots__ = ("_TRACER_PROVIDER",)

    def __init__(self, provider: object) -> None:
        self._TRACER_PROVIDER = provider


_NO_PROVIDER: Final = _Fixed(None)

# True once any Telemetry was given an explicit, real tracer provider: events
# must then be looked for even while the global provider is unset.
_explicit_tracing = False


def observed(telemetry: Telemetry) -> bool:
    """Would an event of a policy on ``telemetry`` reach anyone?"""
    return (
        bool(telemetry._listeners) or _explicit_tracing or otel_probe._TRACER_PROVIDER is not None
    )


def event_time() -> float:
    """Now, on the running loop's clock; outside a loop, ``time.monotonic()``."""
    try:
        return _clock.now()
    except RuntimeError:
        return time.monotonic()


def report(
    telemetry: Telemetry, event_type: type[Event], policy: str, kind: str, **fields: Any
) -> None:
    """Build an event of ``policy`` (of ``kind``) and `emit` it, if anyone listens."""
    if telemetry._listeners or _explicit_tracing or otel_probe._TRACER_PROVIDER is not None:
        emit(telemetry, event_type(policy=policy, kind=kind, time=event_time(), **fields))


def emit(telemetry: Telemetry, event: Event) -> None:
    """Record ``event`` on the current span and hand it to every listener.

    Build the event only when `observed` says someone is there. A listener
    that raises is logged, and the next one still called.
    """
    if _explicit_tracing or otel_probe._TRACER_PROVIDER is not None:
        span = _ot.get_current_span()
        if span.is_recording():
            span.add_event(event.span_event, event.span_attributes())
    for listener in telemetry._listeners:
        try:
            listener(event)
        except Exception:  # noqa: BLE001 - a listener's failure must not reach the call
            _log.exception("a stalwart event listener (%r) raised on %s", listener, event)


@final
class Telemetry:
    """Where a policy reports: a Prometheus registry and an OpenTelemetry tracer.

    Args:
        registry: a ``prometheus_client.CollectorRegistry``; default: the
            global ``REGISTRY``. Policies sharing a registry and a name share
            their series.
        tracer_provider: an OpenTelemetry ``TracerProvider``; default: the
            global one, as soon as the application installs it (policies
            created at import time pick it up later without any change).
            Pass ``opentelemetry.trace.NoOpTracerProvider()`` to switch
            tracing off for a policy.

        listeners: callables ``(event) -> None`` given every event (see
            `stalwart.events`) of every policy reporting here, in order and
            synchronously. One that raises is logged on the ``stalwart``
            logger and never reaches the call.
        latency: also measure how long calls take, in the histogram
            ``stalwart_call_duration_seconds`` (labelled ``kind`` and
            ``outcome``): ``True`` for the default buckets (5 ms to 5 s),
            or a tuple of bucket bounds in seconds. One registry has one set
            of buckets. Off by default: it reads the clock twice per call.

    Metric series exist from the construction of each policy; they are
    computed at scrape time, so the per-call cost is an integer increment.
    Metrics of policies that no longer exist are kept (counters only, not
    gauges) for the last 1,000 names per registry, so that a service that
    makes policies per request or per host keeps bounded metric state.
    """

    __slots__ = (
        "_buckets",
        "_collector",
        "_follow_global",
        "_listeners",
        "_registry",
        "_slot",
        "_tracer",
        "_tracer_provider",
    )

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        tracer_provider: _ot.TracerProvider | None = None,
        listeners: Iterable[Listener] = (),
        latency: bool | tuple[float, ...] = False,
    ) -> None:
        global _explicit_tracing
        if registry is None:
            registry = REGISTRY
        if not callable(getattr(registry, "register", None)):
            raise TypeError(
                "registry must be a prometheus_client.CollectorRegistry, "
                f"not {type(registry).__name__}"
            )
        if tracer_provider is not None and not callable(
            getattr(tracer_provider, "get_tracer", None)
        ):
            raise TypeError(
                "tracer_provider must be an opentelemetry TracerProvider, "
                f"not {type(tracer_provider).__name__}"
            )
        if not isinstance(listeners, Iterable) or isinstance(listeners, (str, bytes)):  # type: ignore[unreachable]
            raise TypeError(
                f"listeners must be an iterable of callables, not {type(listeners).__name__}"
            )
        self._listeners: tuple[Listener, ...] = tuple(listeners)
        for listener in self._listeners:
            if not callable(listener):
                raise TypeError(f"listeners must hold callables, got {type(listener).__name__}")
        self._buckets = _metrics.buckets(latency)
        self._registry = registry
        self._tracer_provider = tracer_provider
        self._collector = _metrics.collector_for(registry)
        self._tracer: _ot.Tracer | None = None
        self._follow_global = tracer_provider is None or isinstance(
            tracer_provider, ProxyTracerProvider
        )
        self._slot: ProviderSlot = otel_probe
        if self._follow_global:
            if OTEL_PYTHON_TRACER_PROVIDER in os.environ:
                _ot.get_tracer_provider()  # loads the provider named by the environment
        elif isinstance(tracer_provider, NoOpTracerProvider):
            self._slot = _NO_PROVIDER
        else:
            assert tracer_provider is not None
            self._tracer = tracer_provider.get_tracer(_INSTRUMENTATION, __version__)
            self._slot = _Fixed(tracer_provider)
            _explicit_tracing = True

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry the policies' series are on."""
        return self._registry

    @property
    def tracer_provider(self) -> _ot.TracerProvider | None:
        """The provider given at construction (None: the global one)."""
        return self._tracer_provider

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """The listeners given at construction."""
        return self._listeners

    @property
    def latency(self) -> tuple[float, ...] | None:
        """The latency histogram's bucket bounds, or None when latency is not measured."""
        return self._buckets

    @property
    def provider_slot(self) -> ProviderSlot:
        """Where this telemetry's tracer provider is, for a wrapper's tracing gate.

        ``slot._TRACER_PROVIDER is not None`` is the gate: a wrapper that
        sees it set opens its span (`run_in_span`), otherwise it opens none.
        The slot is the OpenTelemetry API's global one for a telemetry that
        follows the global provider; read it per call (the global provider
        can be set after the policy was built).
        """
        return self._slot

    def tracing_gate(self) -> bool:
        """Might a call be traced now? (Wrappers read `provider_slot` themselves.)"""
        return self._slot._TRACER_PROVIDER is not None

    def resolve_tracer(self) -> _ot.Tracer | None:
        """The tracer to use, or None when nobody listens."""
        if self._tracer is None and self._follow_global:
            provider = otel_probe._TRACER_PROVIDER
            if provider is not None:
                # The global provider can be set only once: decide for good.
                self._follow_global = False
                if not isinstance(provider, NoOpTracerProvider):
                    self._tracer = provider.get_tracer(_INSTRUMENTATION, __version__)
        return self._tracer

    def register(
        self, kind: str, name: str, metrics_type: type[M], *, state: object = None
    ) -> tuple[Registration, bool]:
        """The hold of a policy of ``kind`` named ``name`` on its shared metrics.

        `Policy` does this for every policy it constructs;
        ``registration.metrics`` is the `PolicyMetrics` object, of class
        ``metrics_type``, it counts into. The flag says whether another live
        policy may hold these metrics while they are exclusive (a suspected
        clash, see `Collector.confirm`), unless both share their state
        through the same ``state`` object.
        """
        return self._collector.register(kind, name, metrics_type, self._buckets, state)

    def __repr__(self) -> str:
        provider = "global" if self._tracer_provider is None else repr(self._tracer_provider)
        extra = f", listeners={list(self._listeners)!r}" if self._listeners else ""
        if self._buckets is not None:
            extra += f", latency={self._buckets!r}"
        return f"Telemetry(registry={self._registry!r}, tracer_provider={provider}{extra})"


_default: Telemetry | None = None
_default_lock = threading.Lock()


def resolve(telemetry: Telemetry | None) -> Telemetry:
    """``telemetry`` itself, or the default one (created on first use)."""
    global _default
    if telemetry is not None:
        if not isinstance(telemetry, Telemetry):
            raise TypeError(
                f"telemetry must be a stalwart.Telemetry or None, not {type(telemetry).__name__}"
            )
        return telemetry
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Telemetry()
    return _default


async def run_in_span(
    telemetry: Telemetry,
    span_name: str,
    attributes: Mapping[str, AttributeValue],
    fn: Callable[..., Coroutine[Any, Any, T]],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> T:
    """Await ``fn(*args, **kwargs)`` inside a span (if anyone listens).

    The span is started and made current by hand: ``start_as_current_span``
    does the same through two generator-based context managers, which cost
    more than everything else a pipeline does on a call. The current context
    is read once and handed to ``start_span`` and ``set_span_in_context``,
    which would otherwise each read it again (the SDK's sampler a second
    time). The attributes are set one by one right after the start, the
    cheapest public way: passed to ``start_span``, the SDK cleans them for
    samplers and again for the span, twice the cost, and ``set_attributes``
    copies the mapping first (a sampler sees the policy's kind and name in
    the span's name all the same).
    """
    tracer = telemetry._tracer
    if tracer is None:
        tracer = telemetry.resolve_tracer()
        if tracer is None:
            return await (fn(*args, **kwargs) if kwargs else fn(*args))
    context = _get_current()
    span = tracer.start_span(
        span_name, context, record_exception=False, set_status_on_exception=False
    )
    for key, value in attributes.items():
        span.set_attribute(key, value)
    token = _attach(_ot.set_span_in_context(span, context))
    try:
        return await (fn(*args, **kwargs) if kwargs else fn(*args))
    except Exception as exc:
        if span.is_recording():
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__qualname__}: {exc}"))
            span.set_attribute("error.type", _error_type(exc))
        raise
    finally:
        _detach(token)
        span.end()


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
