"""FaultInjection as a policy, in virtual time on asyncio and trio.

The profile's figures are reproduced by the draws themselves (seeded), so
these tests compare them with tolerances that only sampling noise needs.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart._tune.engine import percentile
from stalwart.testing import FaultInjection, InjectedFault

from .conftest import Spans, sample

HEALTHY: dict[str, Any] = {
    "seed": 7,
    "downstream": {"latency": {"median": 0.05, "p99": 0.4}, "error_rate": 0.05},
}


def profile(**downstream: Any) -> dict[str, Any]:
    return {"downstream": {"error_latency": 0.01, **downstream}}


async def work() -> str:
    return "done"


async def timed(faults: FaultInjection, **enabled: Any) -> tuple[str, float]:
    """The outcome of one call ("done", "error", "overloaded") and how long it took."""
    start = anyio.current_time()
    try:
        with faults.enabled(**enabled):
            outcome = await faults.call(work)
    except InjectedFault as exc:
        outcome = exc.reason
    return outcome, anyio.current_time() - start


def assert_outcome(result: tuple[str, float], outcome: str, took: object) -> None:
    assert result[0] == outcome
    assert result[1] == took


async def test_it_does_nothing_unless_switched_on() -> None:
    faults = FaultInjection(profile(latency={"median": 1.0}, error_rate=1.0))
    start = anyio.current_time()
    assert await faults.call(work) == "done"
    assert anyio.current_time() == start
    assert faults.statistics().requests == 0


async def test_a_switched_on_call_meets_the_latency_and_error_rate() -> None:
    faults = FaultInjection(HEALTHY)
    latencies, errors = [], 0
    for _ in range(4000):
        outcome, took = await timed(faults)
        if outcome == "error":
            errors += 1
        else:
            latencies.append(took)
    latencies.sort()
    assert percentile(latencies, 0.5) == pytest.approx(0.05, rel=0.05)
    assert percentile(latencies, 0.99) == pytest.approx(0.4, rel=0.15)
    assert errors / 4000 == pytest.approx(0.05, abs=0.01)
    stats = faults.statistics()
    assert (stats.requests, stats.errors, stats.served) == (4000, errors, 4000 - errors)


async def test_an_injected_error_comes_after_the_error_latency() -> None:
    faults = FaultInjection(profile(error_rate=1.0, error_latency=0.25))
    assert_outcome(await timed(faults), "error", pytest.approx(0.25))


async def test_the_same_seed_gives_the_same_draws() -> None:
    async def draws(seed: int) -> list[tuple[str, float]]:
        faults = FaultInjection(HEALTHY, seed=seed)
        return [await timed(faults) for _ in range(20)]

    first, again, other = await draws(3), await draws(3), await draws(4)
    assert [o for o, _ in first] == [o for o, _ in again]
    assert [t for _, t in first] == pytest.approx([t for _, t in again], abs=1e-9)
    assert [t for _, t in other] != pytest.approx([t for _, t in first], abs=1e-9)


async def test_in_a_pipeline_each_retry_meets_the_profile() -> None:
    faults = FaultInjection(profile(error_rate=1.0, error_latency=0.1))
    pipeline = sw.Pipeline(
        sw.Retry(attempts=3, backoff=sw.Backoff(initial=0.0, maximum=0.0)), faults
    )
    start = anyio.current_time()
    with pytest.raises(InjectedFault, match="injected error"), faults.enabled():
        await pipeline.call(work)
    assert anyio.current_time() - start == pytest.approx(0.3)
    assert faults.statistics().errors == 3


async def test_the_timeline_follows_the_clock_times_speed() -> None:
    faults = FaultInjection(
        profile(
            latency={"median": 0.01},
            error_rate=0.0,
            timeline=[
                {"phase": "healthy", "duration": 100.0},
                {"phase": "outage", "duration": 100.0},
            ],
        ),
        speed=10.0,
    )
    assert (await timed(faults))[0] == "done"  # the timeline starts here, at 0
    await anyio.sleep(10.5)  # 105 s into the timeline: the outage
    assert (await timed(faults))[0] == "error"
    await anyio.sleep(10.0)  # 205 s: healthy again, after the last phase
    assert (await timed(faults))[0] == "done"
    faults.restart()
    assert (await timed(faults))[0] == "done"


async def test_at_places_calls_on_the_timeline() -> None:
    faults = FaultInjection(
        profile(
            latency={"median": 0.01},
            error_rate=0.0,
            timeline=[
                {"phase": "healthy", "duration": 10.0},
                {"phase": "brownout", "slowdown": 20.0, "duration": 10.0},
                {"phase": "outage", "duration": 10.0},
                {"phase": "recovery", "duration": 10.0},
            ],
        )
    )
    assert_outcome(await timed(faults, at=5.0), "done", pytest.approx(0.01))
    assert_outcome(await timed(faults, at=15.0), "done", pytest.approx(0.2))
    assert (await timed(faults, at=25.0))[0] == "error"
    # Halfway through the recovery, half of the calls fail.
    outcomes = [(await timed(faults, at=35.0))[0] for _ in range(2000)]
    assert outcomes.count("error") / 2000 == pytest.approx(0.5, abs=0.04)


async def test_a_hanging_phase_never_answers() -> None:
    faults = FaultInjection(
        profile(timeline=[{"phase": "outage", "failure": "hangs", "duration": 60.0}])
    )
    with anyio.move_on_after(30.0) as scope, faults.enabled(at=1.0):
        await faults.call(work)
    assert scope.cancelled_caught
    assert faults.statistics().hangs == 1


async def test_a_full_queue_turns_requests_away_and_the_queue_is_fifo() -> None:
    faults = FaultInjection(
        profile(latency={"median": 1.0}, error_rate=0.0, capacity=2, queue=2, error_latency=0.0)
    )
    results: dict[int, tuple[str, float]] = {}

    async def one(i: int) -> None:
        results[i] = await timed(faults)

    async with anyio.create_task_group() as group:
        for i in range(6):
            group.start_soon(one, i)
            await anyio.sleep(0.001)
        await anyio.sleep(0.1)
        stats = faults.statistics()
        assert (stats.busy, stats.queued, stats.rejected) == (2, 2, 2)
    assert [results[i][0] for i in range(6)] == ["done"] * 4 + ["overloaded"] * 2
    took = [results[i][1] for i in range(4)]
    assert took == pytest.approx([1.0, 1.0, 1.999, 1.999], abs=0.002)


@pytest.mark.parametrize(
    ("serves_abandoned", "third_done_at", "served"),
    [
        # The abandoned request still takes its second of the only slot...
        (True, 2.998, 3),
        # ...unless it leaves the queue with its caller.
        (False, 1.998, 2),
    ],
)
async def test_an_abandoned_queued_request_is_served_unless_serves_abandoned_is_false(
    serves_abandoned: bool, third_done_at: float, served: int
) -> None:
    faults = FaultInjection(
        profile(
            latency={"median": 1.0},
            error_rate=0.0,
            capacity=1,
            queue=5,
            serves_abandoned=serves_abandoned,
        )
    )
    results: dict[str, tuple[str, float]] = {}

    async def one(key: str, patience: float) -> None:
        with anyio.move_on_after(patience):
            results[key] = await timed(faults)

    async with anyio.create_task_group() as group:
        group.start_soon(one, "first", 10.0)
        await anyio.sleep(0.001)
        group.start_soon(one, "gives up", 0.5)
        await anyio.sleep(0.001)
        group.start_soon(one, "third", 10.0)
    assert "gives up" not in results
    assert_outcome(results["third"], "done", pytest.approx(third_done_at, abs=0.002))
    assert faults.statistics().served == served


async def test_a_caller_in_service_that_gives_up_keeps_the_slot_busy() -> None:
    faults = FaultInjection(profile(latency={"median": 1.0}, error_rate=0.0, capacity=1))
    with anyio.move_on_after(0.25):
        await timed(faults)
    assert faults.statistics().busy == 1
    assert_outcome(await timed(faults), "done", pytest.approx(1.75))


async def test_cancellation_is_never_swallowed() -> None:
    faults = FaultInjection(profile(latency={"median": 5.0}, capacity=1))
    with anyio.CancelScope() as scope:
        scope.cancel()
        with faults.enabled():
            await faults.call(work)
        pytest.fail("the cancellation was swallowed")  # pragma: no cover


async def test_as_a_decorator_it_keeps_the_function() -> None:
    faults = FaultInjection(profile(latency={"median": 0.5}, error_rate=0.0))

    @faults
    async def double(x: int) -> int:
        """Twice x."""
        return 2 * x

    assert double.__doc__ == "Twice x."
    start = anyio.current_time()
    with faults.enabled():
        assert await double(21) == 42
    assert anyio.current_time() - start == pytest.approx(0.5)


def test_it_reads_a_scenario_file(tmp_path: Path) -> None:
    path = tmp_path / "dependency.toml"
    path.write_text("seed = 3\n[downstream]\nlatency = { median = 0.2 }\ncapacity = 4\n")
    faults = FaultInjection(path)
    assert faults.statistics().busy == 0
    assert faults.header == "x-stalwart-faults"


def test_a_bad_scenario_is_a_value_error_with_every_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"downstream\.error_rate: must be ≤ 1") as info:
        FaultInjection({"downstream": {"error_rate": 2.0, "capacity": 0}})
    assert "downstream.capacity" in str(info.value)
    with pytest.raises(ValueError, match="cannot read"):
        FaultInjection(tmp_path / "missing.toml")
    with pytest.raises(TypeError, match="scenario must be"):
        FaultInjection(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"speed": 0}, ValueError, "speed must be > 0"),
        ({"speed": math.inf}, ValueError, "speed must be finite"),
        ({"seed": -1}, ValueError, "seed"),
        ({"header": "no spaces"}, ValueError, "header"),
        ({"error_status": 200}, ValueError, "error_status"),
        ({"error_status": "503"}, TypeError, "error_status"),
    ],
)
def test_bad_options_are_refused_by_name(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        FaultInjection(HEALTHY, **options)


def test_enabled_validates_at() -> None:
    faults = FaultInjection(HEALTHY)
    with pytest.raises(ValueError, match="at must be >= 0"), faults.enabled(at=-1.0):
        pass  # pragma: no cover


def test_an_injected_fault_pickles() -> None:
    error = pickle.loads(pickle.dumps(InjectedFault("x", reason="overloaded")))
    assert (str(error), error.reason) == ("x", "overloaded")


async def test_as_a_policy_it_counts_its_calls_and_opens_its_span(
    registry: CollectorRegistry, spans: Spans
) -> None:
    telemetry = sw.Telemetry(registry=registry, tracer_provider=spans.provider)
    faults = FaultInjection(profile(error_rate=0.5), seed=3, name="f", telemetry=telemetry)
    guarded = faults(work)
    assert await guarded() == "done"  # not switched on: counted all the same
    outcomes = [(await timed(faults))[0] for _ in range(20)]
    with anyio.move_on_after(0.001), faults.enabled():
        await guarded()  # given up on while it is served
    errors = outcomes.count("error")
    assert 0 < errors < 20
    counted = {
        outcome: sample(
            registry, "stalwart_calls_total", policy="f", kind="fault_injection", outcome=outcome
        )
        for outcome in ("success", "error", "cancelled", "rejected")
    }
    assert counted == {"success": 21 - errors, "error": errors, "cancelled": 1, "rejected": 0}
    own = spans.named("stalwart.fault_injection f")
    assert len(own) == 22
    assert sum(s.status.status_code is StatusCode.ERROR for s in own) == errors
    await sw.Pipeline(faults, name="p", telemetry=telemetry)(work)()
    assert len(spans.named("stalwart.fault_injection f")) == 22  # the pipeline's span instead


async def test_beyond_the_quota_a_call_is_refused_after_the_error_latency() -> None:
    faults = FaultInjection(
        profile(latency={"median": 0.1}, error_rate=0.0, quota={"rate": 2.0, "burst": 3})
    )
    results = []

    async def one() -> None:
        results.append(await timed(faults))

    async with anyio.create_task_group() as group:
        for _ in range(5):
            group.start_soon(one)
    assert sorted(results) == [("done", pytest.approx(0.1))] * 3 + [("quota", 0.01)] * 2
    await anyio.sleep(0.5)  # one permit back at 2 a second
    assert (await timed(faults))[0] == "done"
    assert (await timed(faults))[0] == "quota"
    stats = faults.statistics()
    assert (stats.requests, stats.over_quota, stats.served, stats.errors) == (7, 3, 4, 0)


async def test_a_call_refused_by_the_quota_takes_no_slot_and_no_draw() -> None:
    # The quota is checked first, as the simulation does: a refused request
    # draws nothing, so the requests it admits meet the same draws as without it.
    spec = {"latency": {"median": 0.05, "p99": 0.4}, "error_rate": 0.2, "capacity": 1}
    plain, limited = (
        FaultInjection(profile(**spec)),
        FaultInjection(profile(**spec, quota={"rate": 1.0, "burst": 1})),
    )
    outcomes = []
    for _ in range(20):
        outcomes.append((await timed(plain))[0])
        outcomes.append((await timed(limited))[0])
        refused, _ = await timed(limited)
        assert refused == "quota"  # less than a second after its one permit
        await anyio.sleep(1.0)
    assert outcomes[0::2] == outcomes[1::2]
    assert {"done", "error"} <= set(outcomes)
    assert limited.statistics().busy <= 1


async def test_the_middleware_answers_429_beyond_the_quota() -> None:
    faults = FaultInjection(profile(latency={"median": 0.01}, quota={"rate": 1.0, "burst": 1}))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = faults.middleware(app)

    async def status() -> tuple[int, bytes | None]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [(b"x-stalwart-faults", b"on")],
        }
        await middleware(scope, receive, send)
        said = dict(sent[0]["headers"]).get(b"x-stalwart-faults")
        return int(sent[0]["status"]), said

    # An injected answer says which fault it is, in the switch's header.
    assert [await status(), await status()] == [(200, None), (429, b"quota")]


async def test_a_queued_request_woken_late_keeps_its_slot_no_longer_than_its_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A busy event loop wakes the head of the queue 50 ms after its slot came
    # free: the slot still serves one request a second, as the simulated one
    # does, instead of losing 50 ms to each wake-up.
    on_time = anyio.sleep_until

    async def late(deadline: float) -> None:
        await on_time(deadline + 0.05)

    monkeypatch.setattr(anyio, "sleep_until", late)
    faults = FaultInjection(
        profile(latency={"median": 1.0}, error_rate=0.0, capacity=1, queue=5, error_latency=0.0)
    )
    results: dict[int, tuple[str, float]] = {}

    async def one(i: int) -> None:
        results[i] = await timed(faults)

    async with anyio.create_task_group() as group:
        for i in range(3):
            group.start_soon(one, i)
            await anyio.sleep(0.001)
    assert [results[i][0] for i in range(3)] == ["done"] * 3
    took = [results[i][1] for i in range(3)]
    assert took == pytest.approx([1.0, 1.999, 2.998], abs=0.002)
