"""A policy written from outside the package, on the public seam only.

`Shed` refuses a call when too many are running, and counts in-flight calls
in a gauge and refusals in a labelled counter of its own. It is used as a
decorator, through ``call()``, in a `Pipeline`, and as an httpx per-host
policy: everything a built-in policy does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.events import CallRejected, Event
from stalwart.httpx import ResilientTransport

from .conftest import Spans, sample

P = ParamSpec("P")
T = TypeVar("T")


class Overloaded(sw.StalwartError):
    """Shed refused the call."""


class ShedMetrics(sw.PolicyMetrics):
    exclusive = True  # its gauge describes one live policy
    __slots__ = ("live",)

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.live: list[Shed] = []

    def _running(self) -> Iterator[tuple[tuple[()], float]]:
        yield (), sum(shed.running for shed in self.live)

    def _refusals(self) -> Iterator[tuple[tuple[str], float]]:
        yield ("overload",), self.rejected

    families = (
        sw.MetricFamily("test_shed_running", "gauge", "Calls running through Shed.", _running),
        sw.MetricFamily(
            "test_shed_refused", "counter", "Calls Shed refused.", _refusals, ("reason",)
        ),
    )


class Shed(sw.Policy):
    kind = "shed"
    metrics_type = ShedMetrics
    __slots__ = ("limit", "running")

    def __init__(
        self, limit: int, *, name: str = "shed", telemetry: sw.Telemetry | None = None
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        self.limit = limit
        self.running = 0
        metrics = self.metrics
        assert isinstance(metrics, ShedMetrics)
        metrics.live.append(self)

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: sw.Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        metrics, timer = self.metrics, self.timer()

        def make(
            plain: Callable[P, Coroutine[Any, Any, T]] | None,
        ) -> Callable[P, Coroutine[Any, Any, T]]:
            async def shedding(*args: P.args, **kwargs: P.kwargs) -> T:
                if plain is not None and self.tracing():
                    return await self.in_span(plain, args, kwargs)
                start = None if timer is None else timer()
                if self.running >= self.limit:
                    metrics.refused(start)
                    self.report(CallRejected, reason="overload", retry_after=None)
                    raise Overloaded(f"{self.name!r} is overloaded", policy=self.name)
                self.running += 1
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    metrics.failed(exc, start)
                    raise
                finally:
                    self.running -= 1
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return shedding

        return self.build(make, binding)


async def hold(seconds: float) -> str:
    await anyio.sleep(seconds)
    return "done"


@pytest.fixture
def events() -> list[Event]:
    return []


@pytest.fixture
def telemetry(registry: CollectorRegistry, events: list[Event]) -> sw.Telemetry:
    return sw.Telemetry(registry=registry, listeners=[events.append])


async def test_it_refuses_counts_and_reports(
    registry: CollectorRegistry, telemetry: sw.Telemetry, events: list[Event]
) -> None:
    shed = Shed(1, name="s", telemetry=telemetry)
    guarded = shed(hold)
    outcomes: list[str] = []

    async def one() -> None:
        try:
            outcomes.append(await guarded(1.0))
        except Overloaded:
            outcomes.append("refused")

    async with anyio.create_task_group() as tg:
        tg.start_soon(one)
        await anyio.sleep(0.5)
        assert sample(registry, "test_shed_running", policy="s") == 1
        tg.start_soon(one)
    assert sorted(outcomes) == ["done", "refused"]
    assert sample(registry, "test_shed_refused_total", policy="s", reason="overload") == 1
    for outcome, n in (("success", 1), ("rejected", 1), ("error", 0)):
        found = sample(registry, "stalwart_calls_total", policy="s", kind="shed", outcome=outcome)
        assert found == n
    (event,) = events
    assert isinstance(event, CallRejected)
    assert (event.policy, event.kind, event.reason) == ("s", "shed", "overload")


async def test_it_keeps_the_signature_and_works_through_call(telemetry: sw.Telemetry) -> None:
    shed = Shed(2, telemetry=telemetry)

    @shed
    async def greet(name: str, *, punctuation: str = "!") -> str:
        """Say hello."""
        return f"hello {name}{punctuation}"

    assert greet.__name__ == "greet"
    assert greet.__doc__ == "Say hello."
    assert await greet("you", punctuation="?") == "hello you?"
    assert await shed.call(greet, "again") == "hello again!"


async def test_it_opens_its_own_span_alone_and_none_in_a_pipeline(
    registry: CollectorRegistry, spans: Spans
) -> None:
    telemetry = sw.Telemetry(registry=registry, tracer_provider=spans.provider)
    shed = Shed(1, name="s", telemetry=telemetry)
    await shed(hold)(0.0)
    await sw.Pipeline(sw.Retry(telemetry=telemetry), shed, name="p", telemetry=telemetry)(hold)(0.0)
    assert [s.name for s in spans.finished] == ["stalwart.shed s", "stalwart.pipeline p"]
    assert spans.finished[0].attributes == {"stalwart.policy": "s"}


async def test_it_works_as_a_per_host_policy(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    transport = ResilientTransport(
        sw.Retry(attempts=1, telemetry=telemetry),
        transport=httpx.MockTransport(lambda request: httpx.Response(204)),
        per_host=lambda origin: Shed(5, name=origin, telemetry=telemetry),
    )
    async with httpx.AsyncClient(transport=transport) as client:
        assert (await client.get("http://a.test/")).status_code == 204
    assert (
        sample(
            registry,
            "stalwart_calls_total",
            policy="http://a.test:80",
            kind="shed",
            outcome="success",
        )
        == 1
    )


def test_two_live_ones_of_one_name_warn_as_its_metrics_are_exclusive(
    telemetry: sw.Telemetry,
) -> None:
    first = Shed(1, name="s", telemetry=telemetry)
    with pytest.warns(sw.StalwartWarning, match="shed named 's'"):
        second = Shed(1, name="s", telemetry=telemetry)
    assert first.metrics is second.metrics


def test_a_policy_without_a_kind_is_refused() -> None:
    class Nameless(sw.Policy):
        def wrap(self, fn: Any, binding: sw.Binding) -> Any:
            return fn

    with warnings.catch_warnings(), pytest.raises(TypeError, match="kind"):
        Nameless(name="n", telemetry=None)


def test_metric_families_are_validated() -> None:
    with pytest.raises(ValueError, match="_total"):
        sw.MetricFamily("x_total", "counter", "doc", "rejected")
    with pytest.raises(ValueError, match="type"):
        sw.MetricFamily("x", "histogram", "doc", "rejected")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels"):
        sw.MetricFamily("x", "counter", "doc", lambda m: [], ("policy",))
    with pytest.raises(ValueError, match="callable"):
        sw.MetricFamily("x", "counter", "doc", "rejected", ("reason",))


def test_a_family_name_can_be_declared_once() -> None:
    with pytest.raises(ValueError, match="stalwart_retry_attempts"):

        class Clashing(sw.PolicyMetrics):
            __slots__ = ()
            families = (sw.MetricFamily("stalwart_retry_attempts", "counter", "doc", "error"),)
