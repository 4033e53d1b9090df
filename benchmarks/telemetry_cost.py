"""What telemetry costs: the four-policy pipeline with and without listeners.

* tracing: no SDK (the default: one attribute check per call), and an
  OpenTelemetry SDK ``TracerProvider`` with a span processor, given through
  ``sw.Telemetry(tracer_provider=...)`` (the global provider is never set),
  against one bare SDK span around ``await f()`` from the same provider;
* what the contract alone asks for: a span carrying the ``stalwart.policy``
  attribute, opened the usual way (``start_as_current_span``), around the
  pipeline without SDK;
* metrics: a call's only metrics work is counting its outcome, one integer
  increment per policy (``stalwart_calls_total``, read with the gauges at
  scrape time), with no switch to turn it off: the pipeline behind a call
  counter, with its private registry never scraped, and scraped
  (``generate_latest``) every 1,000 calls, far more often than any
  Prometheus server would.

This phase runs last: once any ``Telemetry`` has an explicit tracer
provider, stalwart looks for a recording span on its rare paths (a retry, a
rejection) in every policy of the process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Final

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from prometheus_client import CollectorRegistry, generate_latest

import stalwart as sw

from ._harness import Call, Case
from .hot_path import BARE, f, unique

GROUP: Final = "Telemetry: Pipeline(Timeout, Retry, CircuitBreaker, Bulkhead)"
SPAN: Final = "one bare SDK span around await f()"
COUNTED: Final = "Pipeline on a private registry, behind a call counter, never scraped"
WRAPPED: Final = "one span with stalwart.policy around the pipeline without SDK"
SCRAPE_EVERY: Final = 1_000


class CountingProcessor(SpanProcessor):
    """A span processor that only counts ended spans: the cheapest real listener."""

    def __init__(self) -> None:
        self.ended = 0

    def on_end(self, span: ReadableSpan) -> None:
        self.ended += 1


def pipeline(telemetry: sw.Telemetry | None) -> Call:
    return sw.Pipeline(
        sw.Timeout(10, telemetry=telemetry),
        sw.Retry(telemetry=telemetry),
        sw.CircuitBreaker(name=unique("breaker"), telemetry=telemetry),
        sw.Bulkhead(8, name=unique("bulkhead"), telemetry=telemetry),
        telemetry=telemetry,
    )(f)


def counting(registry: CollectorRegistry, call: Call, every: int | None) -> Call:
    """``call`` behind a call counter that scrapes ``registry`` every ``every``
    calls (``None``: never); the counter itself costs the same either way."""
    count = [0]
    period = every or 0

    async def counted() -> int:
        count[0] += 1
        if count[0] == period:
            count[0] = 0
            generate_latest(registry)
        return await call()  # type: ignore[no-any-return]

    return counted


def scrape_ns(registry: CollectorRegistry, times: int = 200) -> float:
    """Median ns of one ``generate_latest`` of ``registry``."""
    samples = []
    for _ in range(times):
        start = time.perf_counter_ns()
        generate_latest(registry)
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples)


def cases() -> tuple[list[Case], Callable[[], float]]:
    """The phase's cases, and how to time one scrape of the scraped registry."""
    provider = TracerProvider()
    provider.add_span_processor(CountingProcessor())
    tracer = provider.get_tracer("benchmarks")
    attributes = {"stalwart.policy": "pipeline"}  # the span attribute of the contract
    quiet, busy = CollectorRegistry(), CollectorRegistry()

    def bare_span() -> Call:
        async def call() -> int:
            with tracer.start_as_current_span("f"):
                return await f()

        return call

    def attributed_span(inner: Call) -> Call:
        """One span as stalwart opens it: its attribute, no exception recording."""

        async def call() -> int:
            with tracer.start_as_current_span(
                "stalwart.pipeline pipeline",
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ):
                return await inner()  # type: ignore[no-any-return]

        return call

    def traced() -> Call:
        return pipeline(sw.Telemetry(registry=CollectorRegistry(), tracer_provider=provider))

    def untraced() -> Call:
        return pipeline(sw.Telemetry(registry=CollectorRegistry()))

    built = [
        Case(BARE, lambda: f),
        Case("Pipeline, default telemetry (no SDK)", lambda: pipeline(None), BARE, 35, group=GROUP),
        Case(
            "Pipeline, metrics on a private registry",
            lambda: pipeline(sw.Telemetry(registry=quiet)),
            BARE,
            group=GROUP,
        ),
        Case(COUNTED, lambda: counting(quiet, pipeline(sw.Telemetry(registry=quiet)), None)),
        Case(
            f"the same, scraping its registry every {SCRAPE_EVERY:,} calls",
            lambda: counting(busy, pipeline(sw.Telemetry(registry=busy)), SCRAPE_EVERY),
            COUNTED,
            group=GROUP,
            note="metrics on vs off, as far as they can be",
        ),
        Case(SPAN, bare_span),
        Case(
            "one SDK span with the attribute stalwart sets (stalwart.policy)",
            lambda: attributed_span(f),
            SPAN,
            group=GROUP,
            reference=True,
        ),
        Case(
            "Pipeline, SDK TracerProvider with a span processor",
            traced,
            SPAN,
            1.2,
            group=GROUP,
            note="one span per call, as the bare span",
        ),
        Case(WRAPPED, lambda: attributed_span(untraced())),
        Case(
            "Pipeline, SDK TracerProvider, against that span",
            traced,
            WRAPPED,
            group=GROUP,
            note="what tracing adds to the contract's span, opened the usual way",
        ),
    ]
    return built, lambda: scrape_ns(busy)
