"""Metrics and traces, cheap when nobody listens.

Two decisions keep the hot path free of telemetry cost:

* **Metrics are read at scrape time.** A policy counts into plain integer
  slots of a small stats object, bound once at construction and shared by all
  policies of the same kind and name on one registry. A single custom
  `Collector` per registry turns them into Prometheus families when scraped.
  No label lookups, locks or formatting happen per call. (Counting is an
  unlocked ``+= 1``: exact on one event loop, the way policies are used.)
* **Spans are opened only when a real tracer provider is configured.** The
  OpenTelemetry API's no-op path still costs ~50x a bare ``await``, so each
  decorated call first checks two attributes (see `Telemetry.tracing_gate`);
  with no SDK installed that check is all the tracing work there is.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, Final, Protocol, TypeVar, cast, final

import opentelemetry.trace as _ot
from opentelemetry.context import attach as _attach
from opentelemetry.context import detach as _detach
from opentelemetry.environment_variables import OTEL_PYTHON_TRACER_PROVIDER
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, Status, StatusCode
from opentelemetry.util.types import AttributeValue
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from ._version import __version__

__all__ = ["Telemetry"]

T = TypeVar("T")
S = TypeVar("S")

_INSTRUMENTATION = "stalwart"
POLICY_ATTRIBUTE: Final = "stalwart.policy"


class _ProviderProbe(Protocol):
    _TRACER_PROVIDER: Any


class _SlowProbe:
    """Fallback if the OpenTelemetry API ever renames its global slot."""

    @property
    def _TRACER_PROVIDER(self) -> Any:  # noqa: N802 - mirrors the API's name
        provider = _ot.get_tracer_provider()
        return None if isinstance(provider, ProxyTracerProvider) else provider


# ``opentelemetry.trace._TRACER_PROVIDER`` is None until an application calls
# ``set_tracer_provider`` (which the API allows exactly once). Reading that
# module attribute is the cheapest possible "is an SDK configured?" check.
otel_probe: _ProviderProbe = cast(
    _ProviderProbe, _ot if hasattr(_ot, "_TRACER_PROVIDER") else _SlowProbe()
)

# True once any Telemetry was given an explicit, real tracer provider: events
# must then be looked for even while the global provider is unset.
_explicit_tracing = False


def listening() -> bool:
    """Could any span be recording? Guards event work on rare paths."""
    return _explicit_tracing or otel_probe._TRACER_PROVIDER is not None


def add_event(name: str, attributes: Mapping[str, AttributeValue]) -> None:
    """Record ``name`` on the current span, if one is recording."""
    if _explicit_tracing or otel_probe._TRACER_PROVIDER is not None:
        span = _ot.get_current_span()
        if span.is_recording():
            span.add_event(name, attributes)


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

    Metric series exist from the construction of each policy; they are
    computed at scrape time, so the per-call cost is an integer increment.
    """

    __slots__ = ("_collector", "_follow_global", "_registry", "_tracer", "_tracer_provider")

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        tracer_provider: _ot.TracerProvider | None = None,
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
        self._registry = registry
        self._tracer_provider = tracer_provider
        self._collector = _collector_for(registry)
        self._tracer: _ot.Tracer | None = None
        self._follow_global = tracer_provider is None or isinstance(
            tracer_provider, ProxyTracerProvider
        )
        if self._follow_global:
            if OTEL_PYTHON_TRACER_PROVIDER in os.environ:
                _ot.get_tracer_provider()  # loads the provider named by the environment
        elif not isinstance(tracer_provider, NoOpTracerProvider):
            assert tracer_provider is not None
            self._tracer = tracer_provider.get_tracer(_INSTRUMENTATION, __version__)
            _explicit_tracing = True

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry the policies' series are on."""
        return self._registry

    @property
    def tracer_provider(self) -> _ot.TracerProvider | None:
        """The provider given at construction (None: the global one)."""
        return self._tracer_provider

    def tracing_gate(self) -> bool:
        """Might a call be traced now? Hot paths inline this very expression.

        True also for a policy switched off by an explicit no-op provider
        while a global one is installed: `resolve_tracer` then says no.
        """
        return otel_probe._TRACER_PROVIDER is not None or self._tracer is not None

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

    def stats(self, kind: str, name: str, factory: Callable[[str], S]) -> S:
        """The stats object shared by policies of ``kind`` named ``name``."""
        return self._collector.stats(kind, name, factory)

    def __repr__(self) -> str:
        provider = "global" if self._tracer_provider is None else repr(self._tracer_provider)
        return f"Telemetry(registry={self._registry!r}, tracer_provider={provider})"


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
    more than everything else a pipeline does on a call. Its attributes are
    set right after the start: passed to ``start_span``, the SDK runs them
    through its generic cleaning for samplers, twice the cost (a sampler
    sees the policy's kind and name in the span's name all the same).
    """
    tracer = telemetry._tracer
    if tracer is None:
        tracer = telemetry.resolve_tracer()
        if tracer is None:
            return await fn(*args, **kwargs)
    span = tracer.start_span(span_name, record_exception=False, set_status_on_exception=False)
    for key, value in attributes.items():
        span.set_attribute(key, value)
    token = _attach(_ot.set_span_in_context(span))
    try:
        return await fn(*args, **kwargs)
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


# -- metrics -----------------------------------------------------------------


class RetryStats:
    __slots__ = ("attempts", "exhausted", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.attempts = 0
        self.exhausted = 0


class TimeoutStats:
    __slots__ = ("name", "timeouts")

    def __init__(self, name: str) -> None:
        self.name = name
        self.timeouts = 0


class _Gauged(Protocol):
    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...


class BulkheadStats:
    """Rejections are counted; the gauges are read from live bulkheads."""

    __slots__ = ("live", "name", "rejected")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rejected = 0
        self.live: weakref.WeakSet[_Gauged] = weakref.WeakSet()


CIRCUIT_STATES: Final = ("closed", "open", "half_open")


class CircuitStats:
    __slots__ = ("name", "rejected", "state", "transitions")

    def __init__(self, name: str) -> None:
        self.name = name
        self.rejected = 0
        self.state = "closed"
        self.transitions: dict[tuple[str, str], int] = {}

    def transition(self, from_state: str, to_state: str) -> None:
        key = (from_state, to_state)
        self.transitions[key] = self.transitions.get(key, 0) + 1
        self.state = to_state


class IdempotencyStats:
    __slots__ = ("conflicts", "name", "replays")

    def __init__(self, name: str) -> None:
        self.name = name
        self.replays = 0
        self.conflicts = 0


class _Collector:
    """Turns the stats of every policy on one registry into metric families."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kinds: dict[str, dict[str, Any]] = {
            "retry": {},
            "timeout": {},
            "bulkhead": {},
            "circuit_breaker": {},
            "idempotency": {},
        }

    def stats(self, kind: str, name: str, factory: Callable[[str], S]) -> S:
        table = self._kinds[kind]
        found = table.get(name)
        if found is None:
            with self._lock:
                found = table.setdefault(name, factory(name))
        return found  # type: ignore[no-any-return]

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        yield from self._families(fill=True)

    def _families(self, fill: bool = False) -> Iterator[Metric]:
        k = self._kinds
        with self._lock:
            retry = list(k["retry"].values())
            timeout = list(k["timeout"].values())
            bulkhead = list(k["bulkhead"].values())
            circuit = list(k["circuit_breaker"].values())
            idem = list(k["idempotency"].values())

        attempts = CounterMetricFamily(
            "stalwart_retry_attempts", "Retries made (attempts after the first).", labels=["policy"]
        )
        exhausted = CounterMetricFamily(
            "stalwart_retry_exhausted",
            "Calls given up on while still failing (attempts, deadline or budget ran out).",
            labels=["policy"],
        )
        timeouts = CounterMetricFamily(
            "stalwart_timeouts", "Calls cancelled by a Timeout.", labels=["policy"]
        )
        in_flight = GaugeMetricFamily(
            "stalwart_bulkhead_in_flight", "Calls running inside a bulkhead.", labels=["policy"]
        )
        queued = GaugeMetricFamily(
            "stalwart_bulkhead_queued", "Calls waiting for a bulkhead slot.", labels=["policy"]
        )
        bh_rejected = CounterMetricFamily(
            "stalwart_bulkhead_rejected", "Calls a bulkhead turned away.", labels=["policy"]
        )
        state = GaugeMetricFamily(
            "stalwart_circuit_state",
            "1 for the circuit breaker's current state, 0 for the others.",
            labels=["policy", "state"],
        )
        transitions = CounterMetricFamily(
            "stalwart_circuit_transitions",
            "Circuit breaker state changes.",
            labels=["policy", "from_state", "to_state"],
        )
        cb_rejected = CounterMetricFamily(
            "stalwart_circuit_rejected", "Calls an open circuit rejected.", labels=["policy"]
        )
        replays = CounterMetricFamily(
            "stalwart_idempotency_replays",
            "Calls answered from a stored result.",
            labels=["policy"],
        )
        conflicts = CounterMetricFamily(
            "stalwart_idempotency_conflicts",
            "Calls whose key was already in flight.",
            labels=["policy"],
        )
        if fill:
            for r in retry:
                attempts.add_metric([r.name], r.attempts)
                exhausted.add_metric([r.name], r.exhausted)
            for t in timeout:
                timeouts.add_metric([t.name], t.timeouts)
            for b in bulkhead:
                live = list(b.live)
                in_flight.add_metric([b.name], sum(x.in_flight for x in live))
                queued.add_metric([b.name], sum(x.queued for x in live))
                bh_rejected.add_metric([b.name], b.rejected)
            for c in circuit:
                for s in CIRCUIT_STATES:
                    state.add_metric([c.name, s], 1.0 if c.state == s else 0.0)
                for (from_state, to_state), n in sorted(c.transitions.items()):
                    transitions.add_metric([c.name, from_state, to_state], n)
                cb_rejected.add_metric([c.name], c.rejected)
            for i in idem:
                replays.add_metric([i.name], i.replays)
                conflicts.add_metric([i.name], i.conflicts)
        yield from (attempts, exhausted, timeouts, in_flight, queued, bh_rejected)
        yield from (state, transitions, cb_rejected, replays, conflicts)


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, _Collector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def _collector_for(registry: CollectorRegistry) -> _Collector:
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _Collector()
            registry.register(collector)
            _collectors[registry] = collector
        return collector
