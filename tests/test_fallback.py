"""Fallback: an answer of its own when the call fails, never when it is cancelled."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.events import Event, FellBack

from .conftest import Spans, sample


class Down(Exception):
    """The dependency failed."""


async def down() -> str:
    raise Down("unreachable")


async def fine() -> str:
    return "live"


def recorded() -> tuple[sw.Telemetry, list[Event], CollectorRegistry]:
    events: list[Event] = []
    registry = CollectorRegistry()
    return sw.Telemetry(registry=registry, listeners=[events.append]), events, registry


# -- what it answers ----------------------------------------------------------------------


async def test_a_value_is_returned_instead_of_the_exception() -> None:
    assert await sw.Fallback("cached")(down)() == "cached"


async def test_a_successful_call_returns_its_own_result() -> None:
    assert await sw.Fallback("cached")(fine)() == "live"


async def test_a_sync_callable_is_given_the_exception() -> None:
    seen: list[BaseException] = []

    def answer(exc: BaseException) -> str:
        seen.append(exc)
        return f"fallback for {exc}"

    assert await sw.Fallback(answer)(down)() == "fallback for unreachable"
    assert len(seen) == 1
    assert isinstance(seen[0], Down)


async def test_an_async_callable_is_awaited() -> None:
    async def answer(exc: BaseException) -> str:
        await anyio.sleep(1.0)
        return type(exc).__name__

    start = anyio.current_time()
    assert await sw.Fallback(answer)(down)() == "Down"
    assert anyio.current_time() - start == 1.0


async def test_an_awaitable_returned_by_a_sync_callable_is_awaited() -> None:
    async def refresh() -> str:
        return "refreshed"

    assert await sw.Fallback(lambda exc: refresh())(down)() == "refreshed"


async def test_a_callable_object_with_an_async_call_is_awaited() -> None:
    class Answer:
        async def __call__(self, exc: BaseException) -> str:
            return "from an object"

    assert await sw.Fallback(Answer())(down)() == "from an object"


async def test_an_exception_on_does_not_match_propagates() -> None:
    fallback = sw.Fallback("cached", on=KeyError)
    with pytest.raises(Down):
        await fallback(down)()


async def test_on_takes_a_tuple_or_a_predicate() -> None:
    assert await sw.Fallback("t", on=(KeyError, Down))(down)() == "t"
    assert await sw.Fallback("p", on=lambda exc: "unreach" in str(exc))(down)() == "p"
    with pytest.raises(Down):
        await sw.Fallback("p", on=lambda exc: False)(down)()


async def test_on_result_falls_back_on_a_result_and_gives_it_to_the_callable() -> None:
    async def empty() -> list[int]:
        return []

    fallback = sw.Fallback(lambda result: [len(result), 0], on_result=lambda result: not result)
    assert await fallback(empty)() == [0, 0]


async def test_a_result_on_result_accepts_is_returned() -> None:
    async def some() -> list[int]:
        return [1]

    assert await sw.Fallback([9], on_result=lambda result: not result)(some)() == [1]


async def test_an_on_result_that_raises_fails_the_call_counted_as_an_error() -> None:
    telemetry, _, registry = recorded()

    def judge(result: object) -> bool:
        raise KeyError("judge")

    fallback = sw.Fallback("x", on_result=judge, name="judged", telemetry=telemetry)
    with pytest.raises(KeyError):
        await fallback(fine)()
    assert fallback.metrics.error == 1
    assert sample(registry, "stalwart_fallbacks_total", policy="judged") == 0.0


async def test_an_exception_the_fallback_raises_propagates_with_the_calls_as_context() -> None:
    def broken(exc: BaseException) -> str:
        raise RuntimeError("the cache is down too")

    with pytest.raises(RuntimeError) as info:
        await sw.Fallback(broken)(down)()
    assert isinstance(info.value.__context__, Down)


async def test_call_falls_back_too() -> None:
    assert await sw.Fallback("cached").call(down) == "cached"


async def test_it_answers_for_the_policies_inside_it() -> None:
    breaker = sw.CircuitBreaker(name="fallback-inside")
    breaker.force_open()
    guarded = sw.Pipeline(sw.Fallback(lambda exc: type(exc).__name__), sw.Retry(), breaker)(fine)
    assert await guarded() == "CircuitOpenError"


# -- cancellation never falls back --------------------------------------------------------


async def hang() -> str:
    await anyio.sleep(3600)
    return "never"


async def test_cancellation_never_falls_back_even_on_base_exception() -> None:
    answered: list[BaseException] = []

    def answer(exc: BaseException) -> str:
        answered.append(exc)
        return "cached"

    telemetry, events, registry = recorded()
    fallback = sw.Fallback(answer, on=BaseException, name="cancelled", telemetry=telemetry)
    guarded = fallback(hang)
    with anyio.move_on_after(1.0) as scope:
        await guarded()
    assert scope.cancelled_caught
    assert answered == []
    assert events == []
    assert fallback.metrics.cancelled == 1
    assert sample(registry, "stalwart_fallbacks_total", policy="cancelled") == 0.0


async def test_a_deadline_around_it_is_not_answered_for() -> None:
    guarded = sw.Fallback("cached")(hang)
    with pytest.raises(sw.DeadlineExceeded), sw.deadline(1.0):
        await guarded()


async def test_a_timeout_inside_it_is_answered_for() -> None:
    guarded = sw.Pipeline(sw.Fallback("cached"), sw.Timeout(1.0))(hang)
    start = anyio.current_time()
    assert await guarded() == "cached"
    assert anyio.current_time() - start == 1.0


async def test_a_fallback_cancelled_while_it_runs_is_cancelled() -> None:
    async def slow_answer(exc: BaseException) -> str:
        await anyio.sleep(3600)
        return "never"

    telemetry, _, _ = recorded()
    fallback = sw.Fallback(slow_answer, telemetry=telemetry)
    with anyio.move_on_after(1.0) as scope:
        await fallback(down)()
    assert scope.cancelled_caught
    assert fallback.metrics.cancelled == 1
    assert fallback.metrics.success == 0


# -- what it reports ----------------------------------------------------------------------


async def test_a_fallback_is_counted_and_the_call_a_success() -> None:
    telemetry, _, registry = recorded()
    fallback = sw.Fallback("cached", name="prices", telemetry=telemetry)
    await fallback(down)()
    await fallback(fine)()
    assert sample(registry, "stalwart_fallbacks_total", policy="prices") == 1.0
    labels = {"policy": "prices", "kind": "fallback"}
    assert sample(registry, "stalwart_calls_total", **labels, outcome="success") == 2.0
    assert sample(registry, "stalwart_calls_total", **labels, outcome="error") == 0.0


async def test_an_unmatched_exception_counts_as_an_error() -> None:
    telemetry, _, registry = recorded()
    await_raises = sw.Fallback("cached", on=KeyError, name="strict", telemetry=telemetry)(down)
    with pytest.raises(Down):
        await await_raises()
    labels = {"policy": "strict", "kind": "fallback"}
    assert sample(registry, "stalwart_calls_total", **labels, outcome="error") == 1.0
    assert sample(registry, "stalwart_fallbacks_total", policy="strict") == 0.0


async def test_the_fallbacks_counter_exists_from_construction() -> None:
    registry = CollectorRegistry()
    sw.Fallback(0, name="new", telemetry=sw.Telemetry(registry=registry))
    assert sample(registry, "stalwart_fallbacks_total", policy="new") == 0.0


async def test_fell_back_says_why_for_an_exception_and_for_a_result() -> None:
    telemetry, events, _ = recorded()
    await sw.Fallback("cached", name="why", telemetry=telemetry)(down)()

    async def empty() -> str:
        return ""

    await sw.Fallback("x", on_result=lambda r: r == "", name="why", telemetry=telemetry)(empty)()
    assert [type(e) for e in events] == [FellBack, FellBack]
    first, second = events
    assert isinstance(first, FellBack)
    assert isinstance(second, FellBack)
    assert (first.policy, first.kind, first.result) == ("why", "fallback", None)
    assert isinstance(first.error, Down)
    assert (second.error, second.result) == (None, "")


async def test_fell_back_is_recorded_on_its_span(spans: Spans) -> None:
    telemetry = sw.Telemetry(registry=CollectorRegistry(), tracer_provider=spans.provider)
    await sw.Fallback("cached", name="traced", telemetry=telemetry)(down)()
    span = spans.only()
    assert span.name == "stalwart.fallback traced"
    fell = [e for e in span.events if e.name == "stalwart.fallback"]
    assert len(fell) == 1
    assert fell[0].attributes is not None
    assert fell[0].attributes["error.type"] == f"{__name__}.Down"


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"on": "Down"}, TypeError, "on must be an exception type"),
        ({"on": ()}, TypeError, "on must be an exception type"),
        ({"on_result": True}, TypeError, "on_result must be callable"),
        ({"name": ""}, ValueError, "name"),
    ],
)
def test_bad_options_are_refused_naming_them(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        sw.Fallback(0, **options)


def test_a_callable_that_takes_no_argument_is_refused() -> None:
    with pytest.raises(TypeError, match="fallback must be a value or a callable taking one"):
        sw.Fallback(lambda: "cached")


def test_a_sync_function_cannot_be_decorated() -> None:
    def sync() -> str:
        return ""

    with pytest.raises(TypeError, match="async def"):
        sw.Fallback("")(sync)  # type: ignore[arg-type]


def test_the_repr_shows_the_fallback_and_on() -> None:
    assert repr(sw.Fallback(0, on=KeyError)) == "Fallback(0, on=KeyError, name='fallback')"
    assert repr(sw.Fallback(0, on=(KeyError, OSError), name="f")) == (
        "Fallback(0, on=(KeyError, OSError), name='f')"
    )


def test_the_repr_shows_on_result_when_set() -> None:
    def is_empty(result: object) -> bool:
        return not result

    assert repr(sw.Fallback(0, on=KeyError, on_result=is_empty, name="r")) == (
        "Fallback(0, on=KeyError, "
        "on_result=test_the_repr_shows_on_result_when_set.<locals>.is_empty, name='r')"
    )


def test_it_keeps_the_function_metadata() -> None:
    guarded = sw.Fallback("")(fine)
    assert guarded.__name__ == "fine"
    assert guarded.__wrapped__ is fine  # type: ignore[attr-defined]
