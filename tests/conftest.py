"""Every async test runs twice, on asyncio and on trio, in virtual time.

asyncio runs on `stalwart.testing.VirtualClockEventLoop`, trio on
``MockClock(autojump_threshold=0)``: whenever all tasks wait, the clock jumps
to the next timer, so timing tests are exact and take no real time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import trio.testing
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.testing import VirtualClockEventLoop


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    if request.param == "asyncio":
        return ("asyncio", {"loop_factory": VirtualClockEventLoop})
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


class Spans:
    """Finished spans recorded by an SDK tracer provider."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.finished if s.name == name]

    def only(self) -> ReadableSpan:
        spans = self.finished
        assert len(spans) == 1, [s.name for s in spans]
        return spans[0]


@pytest.fixture
def spans() -> Iterator[Spans]:
    recorded = Spans()
    yield recorded
    recorded.provider.shutdown()


@pytest.fixture
def telemetry(registry: CollectorRegistry, spans: Spans) -> sw.Telemetry:
    """A private registry and a recording tracer provider."""
    return sw.Telemetry(registry=registry, tracer_provider=spans.provider)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def jump(seconds: float) -> None:
    """Move the virtual clock forward without letting any task run."""
    import asyncio

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        clock = trio.lowlevel.current_clock()
        assert isinstance(clock, trio.testing.MockClock)
        clock.jump(seconds)
    else:
        assert isinstance(loop, VirtualClockEventLoop)
        loop.advance(seconds)
