"""What telemetry costs: the four-policy pipeline with and without listeners.

* tracing: no SDK (the default: one attribute check per call), and an
  OpenTelemetry SDK ``TracerProvider`` with a span processor, given through
  ``sw.Telemetry(tracer_provider=...)`` (the global provider is never set),
  against one bare SDK span around ``await f()`` from the same provider;
* metrics: stalwart's are computed at scrape time, so there is nothing to
  switch off per call: the pipeline reporting to a private registry that is
  never scraped, and to one scraped (``generate_latest``) every 1,000 calls,
  far more often than any Prometheus server would.

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
from .hot_path import BARE, f

GROUP: Final = "Telemetry: Pipeline(Timeout, Retry, CircuitBreaker, Bulkhead)"
SPAN: Final = "one bare SDK span around await f()"
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
        sw.CircuitBreaker(telemetry=telemetry),
        sw.Bulkhead(8, telemetry=telemetry),
        telemetry=telemetry,
    )(f)


def scraped(registry: CollectorRegistry, call: Call) -> Call:
    """``call``, with the registry scraped every SCRAPE_EVERY calls."""
    count = [0]

    async def scraping() -> int:
        count[0] += 1
        if count[0] % SCRAPE_EVERY == 0:
            generate_latest(registry)
        return await call()  # type: ignore[no-any-return]

    return scraping


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
    processor = CountingProcessor()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("benchmarks")
    quiet = CollectorRegistry()
    busy = CollectorRegistry()

    def bare_span() -> Call:
        async def call() -> int:
            with tracer.start_as_current_span("f"):
                return await f()

        return call

    def traced() -> Call:
        return pipeline(sw.Telemetry(registry=CollectorRegistry(), tracer_provider=provider))

    built = [
        Case(BARE, lambda: f),
        Case(
            "Pipeline, default telemetry (no SDK)",
            lambda: pipeline(None),
            BARE,
            35,
            group=GROUP,
        ),
        Case(
            "Pipeline, metrics on a private registry, never scraped",
            lambda: pipeline(sw.Telemetry(registry=quiet)),
            BARE,
            group=GROUP,
        ),
        Case(
            f"Pipeline, metrics on a private registry scraped every {SCRAPE_EVERY:,} calls",
            lambda: scraped(busy, pipeline(sw.Telemetry(registry=busy))),
            BARE,
            group=GROUP,
        ),
        Case(SPAN, bare_span, group=GROUP),
        Case(
            "Pipeline, SDK TracerProvider with a span processor",
            traced,
            SPAN,
            1.2,
            group=GROUP,
            note="one span per call, as the bare span",
        ),
    ]
    return built, lambda: scrape_ns(busy)
