from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw

from .conftest import Spans, sample

NONE = sw.Backoff(initial=1.0, jitter="none")


def failing_then_slow() -> Callable[[], Coroutine[Any, Any, str]]:
    """Fails twice (after 0.5 s each), then needs 3 s to succeed."""
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        await anyio.sleep(0.5)
        if calls <= 2:
            raise ValueError(calls)
        await anyio.sleep(2.5)
        return "ok"

    return fn


async def outcome(fn: Callable[[], Coroutine[Any, Any, Any]]) -> tuple[str, float]:
    start = anyio.current_time()
    try:
        result = repr(await fn())
    except Exception as exc:
        result = type(exc).__name__
    return result, anyio.current_time() - start


def own() -> sw.Telemetry:
    """A registry of its own: the stacked and the piped bulkhead live side by side."""
    return sw.Telemetry(registry=CollectorRegistry())


@pytest.mark.parametrize(
    "make",
    [
        lambda: [sw.Timeout(10), sw.Retry(attempts=3, backoff=NONE)],
        lambda: [sw.Retry(attempts=3, backoff=NONE), sw.Timeout(2)],
        lambda: [sw.Timeout(4), sw.Retry(attempts=5, backoff=NONE), sw.Timeout(2)],
        lambda: [
            sw.Retry(attempts=3, backoff=NONE),
            sw.Bulkhead(1, telemetry=own()),
            sw.Timeout(1),
        ],
    ],
    ids=["timeout-outside-retry", "timeout-per-attempt", "both", "with-bulkhead"],
)
async def test_a_pipeline_behaves_like_stacked_decorators(
    make: Callable[[], list[sw.Policy]],
) -> None:
    stacked: Callable[[], Coroutine[Any, Any, str]] = failing_then_slow()
    for policy in reversed(make()):
        stacked = policy(stacked)
    piped = sw.Pipeline(*make())(failing_then_slow())
    assert await outcome(piped) == await outcome(stacked)


async def test_timeout_outside_retry_bounds_the_whole_operation() -> None:
    fn = sw.Pipeline(sw.Timeout(4), sw.Retry(attempts=5, backoff=NONE))(failing_then_slow())
    # t=0.5 fail, sleep 1; t=2 fail, sleep 2 would end at 4: give up with the ValueError.
    assert await outcome(fn) == ("ValueError", 2.0)


async def test_timeout_inside_retry_bounds_each_attempt() -> None:
    fn = sw.Pipeline(sw.Retry(attempts=3, backoff=NONE), sw.Timeout(2))(failing_then_slow())
    # Two failures, then the slow third attempt is cut at 2 s: nothing left to retry.
    assert await outcome(fn) == ("DeadlineExceeded", 0.5 + 1 + 0.5 + 2 + 2)


async def test_nested_pipelines_flatten() -> None:
    inner = sw.Pipeline(sw.Retry(attempts=3, backoff=NONE), sw.Timeout(5))
    fn = sw.Pipeline(sw.Timeout(20), inner)(failing_then_slow())
    assert await outcome(fn) == ("'ok'", 0.5 + 1 + 0.5 + 2 + 3)


async def test_an_empty_pipeline_passes_calls_through() -> None:
    async def fn(x: int) -> int:
        return x * 3

    assert await sw.Pipeline()(fn)(2) == 6
    assert await sw.Pipeline().call(fn, 3) == 9


async def test_a_pipeline_opens_one_span_carrying_its_members_events(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    pipeline = sw.Pipeline(
        sw.Retry(attempts=3, backoff=NONE, name="r", telemetry=telemetry),
        sw.Timeout(1, name="t", telemetry=telemetry),
        name="p",
        telemetry=telemetry,
    )

    @pipeline
    async def slow() -> None:
        await anyio.sleep(2)

    with pytest.raises(sw.DeadlineExceeded):
        await slow()
    span = spans.only()
    assert span.name == "stalwart.pipeline p"
    assert span.attributes is not None
    assert span.attributes["stalwart.policy"] == "p"
    names = [(e.name, (e.attributes or {}).get("stalwart.policy")) for e in span.events]
    assert names == [
        ("stalwart.timeout", "t"),
        ("stalwart.retry", "r"),
        ("stalwart.timeout", "t"),
        ("stalwart.retry", "r"),
        ("stalwart.timeout", "t"),
        ("stalwart.retry.gave_up", "r"),
        ("exception", None),
    ]
    # Each retry says why: the error that made it.
    retries = [e for e in span.events if e.name == "stalwart.retry"]
    assert [(e.attributes or {}).get("error.type") for e in retries] == [
        "stalwart.DeadlineExceeded"
    ] * 2


async def test_members_still_count_their_metrics(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    pipeline = sw.Pipeline(
        sw.Retry(attempts=3, backoff=NONE, name="r", telemetry=telemetry),
        sw.Timeout(1, name="t", telemetry=telemetry),
    )
    with pytest.raises(sw.DeadlineExceeded):
        await pipeline.call(anyio.sleep, 5)
    assert sample(registry, "stalwart_retry_attempts_total", policy="r") == 2
    assert sample(registry, "stalwart_retry_exhausted_total", policy="r") == 1
    assert sample(registry, "stalwart_timeouts_total", policy="t") == 3


async def test_members_of_a_pipeline_open_no_spans_of_their_own(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    retry = sw.Retry(name="r", telemetry=telemetry)
    pipeline = sw.Pipeline(retry, name="p", telemetry=telemetry)

    async def fn() -> int:
        return 1

    await pipeline(fn)()
    await retry(fn)()  # on its own, the same policy does open its span
    assert [s.name for s in spans.finished] == ["stalwart.pipeline p", "stalwart.retry r"]


def test_a_pipeline_keeps_the_signature() -> None:
    async def fetch(url: str, *, retries: int = 1) -> bytes:
        return b""

    wrapped = sw.Pipeline(sw.Retry(), sw.Timeout(1))(fetch)
    assert inspect.signature(wrapped) == inspect.signature(fetch)
    assert wrapped.__name__ == "fetch"


def test_a_pipeline_takes_only_policies() -> None:
    with pytest.raises(TypeError, match=r"policies\[1\]"):
        sw.Pipeline(sw.Retry(), "timeout")  # type: ignore[arg-type]


def test_a_pipeline_rejects_sync_functions() -> None:
    with pytest.raises(TypeError, match="async def"):
        sw.Pipeline(sw.Retry())(lambda: 1)  # type: ignore[arg-type,return-value]


def test_pipeline_exposes_its_policies() -> None:
    retry, timeout = sw.Retry(), sw.Timeout(1)
    assert sw.Pipeline(retry, timeout).policies == (retry, timeout)


# -- arguments through every inlined path ---------------------------------------


def each_policy() -> list[sw.Policy]:
    return [
        sw.Retry(),
        sw.Retry(timeout=10.0),
        sw.CircuitBreaker(name="each-count"),
        sw.CircuitBreaker(window=sw.TimeWindow(10.0), name="each-time"),
        sw.CircuitBreaker(slow_call_duration=1.0, name="each-slow"),
        sw.Bulkhead(2, name="each"),
        sw.Timeout(10.0),
        sw.Idempotency(key="key"),
        sw.Pipeline(
            sw.Timeout(10.0),
            sw.Retry(),
            sw.CircuitBreaker(name="each-piped"),
            sw.Bulkhead(2, name="each-piped"),
        ),
    ]


@pytest.mark.parametrize("policy", each_policy(), ids=repr)
async def test_positional_and_keyword_arguments_reach_the_function(policy: sw.Policy) -> None:
    # The wrappers call fn(*args) when no keywords are given (a faster call
    # than fn(*args, **kwargs)); both ways must deliver every argument.
    async def echo(key: str, *rest: int, scale: int = 1, **extra: int) -> object:
        return key, rest, scale, extra

    guarded = policy(echo)
    assert await guarded("a", 1, 2) == ("a", (1, 2), 1, {})
    assert await guarded("b", scale=3, more=4) == ("b", (), 3, {"more": 4})
    assert await guarded(key="c") == ("c", (), 1, {})
