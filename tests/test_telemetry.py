from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from opentelemetry.trace import NoOpTracerProvider
from prometheus_client import REGISTRY, CollectorRegistry, Counter

import stalwart as sw

from .conftest import Spans, sample


def test_series_exist_from_construction(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    kept = [  # noqa: F841 - gauges describe live policies
        sw.Retry(name="r", telemetry=telemetry),
        sw.Timeout(1, name="t", telemetry=telemetry),
        sw.Bulkhead(1, name="b", telemetry=telemetry),
    ]
    assert sample(registry, "stalwart_retry_attempts_total", policy="r") == 0
    assert sample(registry, "stalwart_retry_exhausted_total", policy="r") == 0
    assert sample(registry, "stalwart_timeouts_total", policy="t") == 0
    assert sample(registry, "stalwart_bulkhead_in_flight", policy="b") == 0
    assert sample(registry, "stalwart_bulkhead_queued", policy="b") == 0
    assert sample(registry, "stalwart_bulkhead_rejected_total", policy="b") == 0


async def test_policies_with_the_same_name_share_series(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    a = sw.Retry(attempts=2, backoff=sw.Backoff(0, maximum=0), name="s", telemetry=telemetry)
    b = sw.Retry(attempts=3, backoff=sw.Backoff(0, maximum=0), name="s", telemetry=telemetry)

    async def fail() -> None:
        raise ValueError

    for policy in (a, b):
        with pytest.raises(ValueError):
            await policy(fail)()
    assert sample(registry, "stalwart_retry_attempts_total", policy="s") == 1 + 2


def test_registries_are_independent() -> None:
    first, second = CollectorRegistry(), CollectorRegistry()
    sw.Timeout(1, name="only-first", telemetry=sw.Telemetry(registry=first))
    assert sample(first, "stalwart_timeouts_total", policy="only-first") == 0
    assert sample(second, "stalwart_timeouts_total", policy="only-first") is None


def test_the_default_telemetry_reports_to_the_global_registry() -> None:
    sw.Timeout(1, name="default-registry-check")
    assert (
        REGISTRY.get_sample_value("stalwart_timeouts_total", {"policy": "default-registry-check"})
        == 0
    )


def test_conflicting_metric_names_are_detected(registry: CollectorRegistry) -> None:
    sw.Telemetry(registry=registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Counter("stalwart_retry_attempts", "clash", registry=registry)


def test_many_telemetry_objects_share_one_collector_per_registry(
    registry: CollectorRegistry,
) -> None:
    for _ in range(3):
        sw.Retry(name="x", telemetry=sw.Telemetry(registry=registry))
    families = [m.name for m in registry.collect()]
    assert families.count("stalwart_retry_attempts") == 1


def test_metric_families_have_the_contract_types(registry: CollectorRegistry) -> None:
    sw.Telemetry(registry=registry)
    types = {m.name: m.type for m in registry.collect()}
    # (Metrics classes defined elsewhere, a custom policy's, add their own families.)
    assert (
        types.items()
        >= {
            "stalwart_retry_attempts": "counter",
            "stalwart_retry_exhausted": "counter",
            "stalwart_timeouts": "counter",
            "stalwart_bulkhead_in_flight": "gauge",
            "stalwart_bulkhead_queued": "gauge",
            "stalwart_bulkhead_rejected": "counter",
            "stalwart_circuit_state": "gauge",
            "stalwart_circuit_transitions": "counter",
            "stalwart_circuit_rejected": "counter",
            "stalwart_idempotency_replays": "counter",
            "stalwart_idempotency_conflicts": "counter",
            "stalwart_calls": "counter",
        }.items()
    )


async def test_a_successful_call_has_an_ok_span(telemetry: sw.Telemetry, spans: Spans) -> None:
    async def fn() -> int:
        return 1

    await sw.Bulkhead(2, name="b", telemetry=telemetry)(fn)()
    span = spans.only()
    assert span.name == "stalwart.bulkhead b"
    assert span.attributes == {"stalwart.policy": "b"}
    assert not span.status.is_ok or span.status.status_code.name == "UNSET"
    assert span.events == ()


async def test_a_failing_call_has_an_error_span(telemetry: sw.Telemetry, spans: Spans) -> None:
    async def fn() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError):
        await sw.Retry(attempts=1, name="r", telemetry=telemetry)(fn)()
    span = spans.only()
    assert span.status.status_code.name == "ERROR"
    assert span.attributes is not None
    assert span.attributes["error.type"] == "KeyError"
    assert [e.name for e in span.events] == ["stalwart.retry.gave_up", "exception"]


async def test_an_explicit_no_op_provider_records_nothing(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry, tracer_provider=NoOpTracerProvider())
    assert telemetry.resolve_tracer() is None
    assert not telemetry.tracing_gate()

    async def fn() -> int:
        return 1

    assert await sw.Retry(telemetry=telemetry)(fn)() == 1


def test_without_an_sdk_nothing_is_traced() -> None:
    assert not sw.Telemetry().tracing_gate()


def test_a_global_provider_installed_after_construction_is_picked_up() -> None:
    # The global tracer provider can be set once per process: use a fresh one.
    code = textwrap.dedent(
        """
        import anyio
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import stalwart as sw

        @sw.Retry(name="late")          # built at import time, before the SDK
        async def fn():
            return 1

        async def main():
            await fn()                  # not traced: no SDK yet
            exporter = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            await fn()
            print([s.name for s in exporter.get_finished_spans()])

        anyio.run(main)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "['stalwart.retry late']"


def test_telemetry_validates_its_arguments() -> None:
    with pytest.raises(TypeError, match="registry"):
        sw.Telemetry(registry="prometheus")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tracer_provider"):
        sw.Telemetry(tracer_provider=42)  # type: ignore[arg-type]


def test_telemetry_exposes_what_it_was_given(registry: CollectorRegistry, spans: Spans) -> None:
    telemetry = sw.Telemetry(registry=registry, tracer_provider=spans.provider)
    assert telemetry.registry is registry
    assert telemetry.tracer_provider is spans.provider
    assert sw.Telemetry().registry is REGISTRY
