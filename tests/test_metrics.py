"""Outcome counters, the latency histogram, name clashes and bounded metric state."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart import _metrics
from stalwart.httpx import ResilientTransport

from .conftest import sample

ZERO = sw.Backoff(initial=0.0, maximum=0.0)
OUTCOMES = ("success", "error", "rejected", "timeout", "cancelled")


def calls(registry: CollectorRegistry, kind: str, policy: str) -> dict[str, float | None]:
    """``stalwart_calls_total`` of one policy, by outcome (zeroes left out)."""
    found = {
        outcome: sample(registry, "stalwart_calls_total", policy=policy, kind=kind, outcome=outcome)
        for outcome in OUTCOMES
    }
    return {outcome: n for outcome, n in found.items() if n}


async def ok() -> str:
    return "ok"


async def boom() -> str:
    raise ValueError("boom")


async def slow() -> str:
    await anyio.sleep(10.0)
    return "late"


async def outcome_of(fn: Callable[[], Coroutine[Any, Any, Any]]) -> str:
    try:
        await fn()
    except Exception as exc:
        return type(exc).__name__
    return "returned"


@pytest.fixture
def telemetry(registry: CollectorRegistry) -> sw.Telemetry:
    return sw.Telemetry(registry=registry)


# -- stalwart_calls_total -----------------------------------------------------------------


async def test_every_policy_counts_its_calls_by_outcome(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    retry = sw.Retry(attempts=1, name="r", telemetry=telemetry)
    timeout = sw.Timeout(1.0, name="t", telemetry=telemetry)
    bulkhead = sw.Bulkhead(1, name="b", telemetry=telemetry)
    for policy in (retry, timeout, bulkhead):
        await outcome_of(policy(ok))
        await outcome_of(policy(boom))
    assert calls(registry, "retry", "r") == {"success": 1, "error": 1}
    assert calls(registry, "timeout", "t") == {"success": 1, "error": 1}
    assert calls(registry, "bulkhead", "b") == {"success": 1, "error": 1}


async def test_a_timeout_counts_its_own_expiry_as_timeout(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    inner = sw.Timeout(1.0, name="inner", telemetry=telemetry)
    outer = sw.Timeout(5.0, name="outer", telemetry=telemetry)
    assert await outcome_of(outer(inner(slow))) == "DeadlineExceeded"
    assert calls(registry, "timeout", "inner") == {"timeout": 1}
    # The inner one's error went through the outer Timeout: an error there.
    assert calls(registry, "timeout", "outer") == {"error": 1}


async def test_an_ambient_deadline_claimed_by_a_timeout_is_its_timeout(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    timeout = sw.Timeout(5.0, name="t", telemetry=telemetry)
    with sw.deadline(1.0):
        assert await outcome_of(timeout(slow)) == "DeadlineExceeded"
    assert calls(registry, "timeout", "t") == {"timeout": 1}


async def test_a_breaker_counts_rejections_once(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    breaker = sw.CircuitBreaker(consecutive_failures=1, name="cb", telemetry=telemetry)
    guarded = breaker(boom)
    for _ in range(3):
        await outcome_of(guarded)
    assert calls(registry, "circuit_breaker", "cb") == {"error": 1, "rejected": 2}
    assert sample(registry, "stalwart_circuit_rejected_total", policy="cb") == 2


async def test_a_half_open_trial_counts_its_outcome(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    breaker = sw.CircuitBreaker(
        consecutive_failures=1, open_for=1.0, name="cb", telemetry=telemetry
    )
    await outcome_of(breaker(boom))
    await anyio.sleep(1.0)
    assert await outcome_of(breaker(ok)) == "returned"
    assert calls(registry, "circuit_breaker", "cb") == {"error": 1, "success": 1}


async def test_a_full_bulkhead_counts_a_rejection(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    bulkhead = sw.Bulkhead(1, name="b", telemetry=telemetry)
    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead(slow))
        await anyio.sleep(0.001)
        assert await outcome_of(bulkhead(ok)) == "BulkheadFullError"
        tg.cancel_scope.cancel()
    assert calls(registry, "bulkhead", "b") == {"rejected": 1, "cancelled": 1}


async def test_a_call_cancelled_while_queued_counts_as_cancelled(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    bulkhead = sw.Bulkhead(1, max_queued=1, name="b", telemetry=telemetry)
    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead(slow))
        await anyio.sleep(0.001)
        with anyio.move_on_after(1.0):
            await bulkhead(ok)()
        tg.cancel_scope.cancel()
    assert calls(registry, "bulkhead", "b") == {"cancelled": 2}


async def test_a_retry_counts_the_call_not_its_attempts(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    failures = 0

    async def flaky() -> str:
        nonlocal failures
        failures += 1
        if failures < 3:
            raise ConnectionError
        return "ok"

    retry = sw.Retry(attempts=3, backoff=ZERO, name="r", telemetry=telemetry)
    assert await retry(flaky)() == "ok"
    assert calls(registry, "retry", "r") == {"success": 1}
    assert sample(registry, "stalwart_retry_attempts_total", policy="r") == 2


async def test_a_retry_out_of_its_timeout_counts_a_timeout(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    retry = sw.Retry(attempts=3, timeout=2.0, backoff=ZERO, name="r", telemetry=telemetry)
    assert await outcome_of(retry(slow)) == "DeadlineExceeded"
    assert calls(registry, "retry", "r") == {"timeout": 1}


async def test_idempotency_counts_replays_as_successes_and_conflicts_as_rejections(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    policy = sw.Idempotency(key="key", on_conflict="raise", name="i", telemetry=telemetry)

    async def pay(key: str) -> str:
        await anyio.sleep(1.0)
        return key

    paying = policy(pay)
    async with anyio.create_task_group() as tg:
        tg.start_soon(paying, "k")
        await anyio.sleep(0.001)
        with pytest.raises(sw.IdempotencyConflict):
            await paying("k")
    assert await paying("k") == "k"  # a replay
    assert await paying(None) is None  # type: ignore[arg-type]  # no key: just runs
    assert calls(registry, "idempotency", "i") == {"success": 3, "rejected": 1}


async def test_a_pipeline_counts_its_calls_and_its_members_theirs(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    pipeline = sw.Pipeline(
        sw.Retry(attempts=2, backoff=ZERO, name="r", telemetry=telemetry),
        sw.Timeout(1.0, name="t", telemetry=telemetry),
        name="p",
        telemetry=telemetry,
    )
    assert await outcome_of(pipeline(slow)) == "DeadlineExceeded"
    assert calls(registry, "pipeline", "p") == {"error": 1}
    assert calls(registry, "retry", "r") == {"error": 1}
    assert calls(registry, "timeout", "t") == {"timeout": 2}


async def test_a_cancelled_call_counts_as_cancelled(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    retry = sw.Retry(name="r", telemetry=telemetry)
    with anyio.move_on_after(1.0):
        await retry(slow)()
    assert calls(registry, "retry", "r") == {"cancelled": 1}


# -- the latency histogram ----------------------------------------------------------------


async def test_latency_is_measured_on_the_loops_clock_by_outcome(
    registry: CollectorRegistry,
) -> None:
    telemetry = sw.Telemetry(registry=registry, latency=(0.5, 2.0))
    timeout = sw.Timeout(1.0, name="t", telemetry=telemetry)

    async def takes(seconds: float) -> None:
        await anyio.sleep(seconds)

    guarded = timeout(takes)
    await guarded(0.25)
    await guarded(0.75)
    await outcome_of(lambda: guarded(5.0))

    def bucket(outcome: str, le: str) -> float | None:
        return registry.get_sample_value(
            "stalwart_call_duration_seconds_bucket",
            {"policy": "t", "kind": "timeout", "outcome": outcome, "le": le},
        )

    assert [bucket("success", le) for le in ("0.5", "2.0", "+Inf")] == [1, 2, 2]
    assert [bucket("timeout", le) for le in ("0.5", "2.0", "+Inf")] == [0, 1, 1]
    assert registry.get_sample_value(
        "stalwart_call_duration_seconds_sum",
        {"policy": "t", "kind": "timeout", "outcome": "success"},
    ) == pytest.approx(1.0)


async def test_latency_true_uses_the_default_buckets(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry, latency=True)
    assert telemetry.latency == _metrics.DEFAULT_BUCKETS
    breaker = sw.CircuitBreaker(consecutive_failures=1, name="cb", telemetry=telemetry)
    await outcome_of(breaker(boom))
    await outcome_of(breaker(ok))  # rejected
    counted = registry.get_sample_value(
        "stalwart_call_duration_seconds_count",
        {"policy": "cb", "kind": "circuit_breaker", "outcome": "rejected"},
    )
    assert counted == 1


def test_without_latency_there_is_no_histogram(registry: CollectorRegistry) -> None:
    sw.Retry(telemetry=sw.Telemetry(registry=registry))
    names = {m.name for m in registry.collect()}
    assert "stalwart_call_duration_seconds" not in names


@pytest.mark.parametrize(
    ("latency", "error"),
    [
        ((), ValueError),
        ((1.0, 0.5), ValueError),
        ((0.0, 1.0), ValueError),
        ((1.0, float("inf")), ValueError),
        (("1",), TypeError),
        ("1,2", TypeError),
        (3, TypeError),
    ],
)
def test_bad_latency_buckets_are_refused(latency: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="latency"):
        sw.Telemetry(registry=CollectorRegistry(), latency=latency)


def test_one_registry_has_one_set_of_buckets(registry: CollectorRegistry) -> None:
    sw.Retry(telemetry=sw.Telemetry(registry=registry, latency=(1.0,)))
    with pytest.raises(ValueError, match="latency"):
        sw.Retry(telemetry=sw.Telemetry(registry=registry, latency=(2.0,)))


# -- the name-clash warning ---------------------------------------------------------------


def test_a_second_live_breaker_of_one_name_warns(telemetry: sw.Telemetry) -> None:
    first = sw.CircuitBreaker(name="payments", telemetry=telemetry)
    with pytest.warns(sw.StalwartWarning, match="circuit_breaker named 'payments'") as caught:
        second = sw.CircuitBreaker(name="payments", telemetry=telemetry)
    assert caught[0].filename == __file__  # the user's line, not stalwart's
    assert first.metrics is second.metrics


def test_a_breaker_of_a_name_no_longer_used_does_not_warn(telemetry: sw.Telemetry) -> None:
    first = sw.CircuitBreaker(name="payments", telemetry=telemetry)
    first.force_open()
    del first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sw.CircuitBreaker(name="payments", telemetry=telemetry)


def test_garbage_in_a_reference_cycle_does_not_warn(telemetry: sw.Telemetry) -> None:
    first = sw.CircuitBreaker(name="payments", telemetry=telemetry)
    cycle: list[Any] = [first]
    cycle.append(cycle)
    del first, cycle  # unreachable, but not yet collected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sw.CircuitBreaker(name="payments", telemetry=telemetry)


def test_stateless_policies_of_one_name_share_series_without_warning(
    telemetry: sw.Telemetry,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = sw.Retry(name="r", telemetry=telemetry)
        b = sw.Retry(name="r", telemetry=telemetry)
        c = sw.Timeout(1, name="t", telemetry=telemetry)
        d = sw.Timeout(1, name="t", telemetry=telemetry)
    assert a.metrics is b.metrics
    assert c.metrics is d.metrics


def test_breakers_sharing_a_store_do_not_warn(telemetry: sw.Telemetry) -> None:
    store = sw.InProcessCircuitStore()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = sw.CircuitBreaker(name="dep", store=store, telemetry=telemetry)
        b = sw.CircuitBreaker(name="dep", store=store, telemetry=telemetry)
    assert a.metrics is b.metrics


def test_breakers_on_different_registries_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = [
            sw.CircuitBreaker(name="dep", telemetry=sw.Telemetry(registry=CollectorRegistry()))
            for _ in range(2)
        ]
    assert kept[0].metrics is not kept[1].metrics


def test_a_policy_whose_options_are_refused_does_not_warn(telemetry: sw.Telemetry) -> None:
    kept = sw.Bulkhead(1, name="b", telemetry=telemetry)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="max_concurrent"):
            sw.Bulkhead(0, name="b", telemetry=telemetry)
    assert kept.max_concurrent == 1


# -- bounded metric state -----------------------------------------------------------------


def test_the_metrics_of_names_no_longer_used_are_bounded(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    for i in range(_metrics.RETIRED_KEPT + 500):
        sw.CircuitBreaker(name=f"per-request-{i}", telemetry=telemetry)
    gc.collect()
    collector = _metrics.collector_for(registry)
    assert collector.retired() == _metrics.RETIRED_KEPT
    # The oldest went; the latest are still exported (counters, not gauges).
    assert sample(registry, "stalwart_circuit_rejected_total", policy="per-request-0") is None
    last = f"per-request-{_metrics.RETIRED_KEPT + 499}"
    assert sample(registry, "stalwart_circuit_rejected_total", policy=last) == 0
    assert sample(registry, "stalwart_circuit_state", policy=last, state="closed") is None


async def test_a_name_that_comes_back_goes_on_counting(
    registry: CollectorRegistry, telemetry: sw.Telemetry
) -> None:
    await outcome_of(sw.Retry(attempts=1, name="r", telemetry=telemetry)(boom))
    gc.collect()
    await outcome_of(sw.Retry(attempts=1, name="r", telemetry=telemetry)(boom))
    assert calls(registry, "retry", "r") == {"error": 2}


async def test_per_host_policies_keep_bounded_metric_state(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    transport = ResilientTransport(
        transport=httpx.MockTransport(lambda request: httpx.Response(200)),
        per_host=lambda origin: sw.CircuitBreaker(name=origin, telemetry=telemetry),
        max_hosts=10,
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for i in range(_metrics.RETIRED_KEPT + 300):
            await client.get(f"http://host-{i}.test/")
    gc.collect()
    collector = _metrics.collector_for(registry)
    # The live per-host breakers only: a dropped host's are not even retired
    # (they would crowd out the retired metrics of every other policy).
    assert collector.retired() == 0
    assert sorted(collector._metrics) == [
        ("circuit_breaker", f"http://host-{i}.test:80")
        for i in sorted(range(_metrics.RETIRED_KEPT + 290, _metrics.RETIRED_KEPT + 300), key=str)
    ]
    first = "http://host-0.test:80"
    assert sample(registry, "stalwart_circuit_rejected_total", policy=first) is None
