"""Every async test runs twice, on asyncio and on trio, in virtual time.

asyncio runs on `stalwart.testing.VirtualClockEventLoop`, trio on
``MockClock(autojump_threshold=0)``: whenever all tasks wait, the clock jumps
to the next timer, so timing tests are exact and take no real time.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from typing import Any

import pytest
import trio.testing
from hypothesis import HealthCheck, settings
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.testing import VirtualClockEventLoop

from . import redis_support

# Hypothesis: the same examples on every run ("ci", the default), so a red
# run is a real bug that reproduces, never a draw of the dice; no deadline
# (a loaded machine is slow, not wrong). ``HYPOTHESIS_PROFILE=explore`` draws
# new examples, many more of them, to look for bugs on purpose. Tests that set
# their own ``max_examples`` inherit everything else from the loaded profile.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=100,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore",
    max_examples=2_000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_redis_header = ""


def pytest_sessionstart(session: pytest.Session) -> None:
    """Find Redis, or start a server of our own (before the test modules are imported)."""
    global _redis_header
    _redis_header = redis_support.bootstrap()


def pytest_report_header(config: pytest.Config) -> str:
    return _redis_header


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    redis_support.shutdown()


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """After a test on real servers, collect its garbage: a leak fails that test.

    A socket or connection left open is reported (a ResourceWarning, an
    error here) when the garbage collector finds it, which could otherwise
    happen in whichever test runs next in the same process.
    """
    if item.get_closest_marker("redis") or item.get_closest_marker("realtime"):
        gc.collect()


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
