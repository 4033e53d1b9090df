"""The simulation: deterministic, made of the real policies, and telling the known stories.

The scenarios here are the built-in ones shrunk to a few minutes of traffic,
so the suite stays fast; the orderings they must show are the reasons each
built-in scenario exists.
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest

from stalwart._tune import builtin, schema
from stalwart._tune.engine import BUCKET, Run, SimulationLoop, percentile, simulate
from stalwart._tune.report import Report, Result, summarize
from stalwart._tune.runner import run_all
from stalwart._tune.scenario import Scenario, from_dict


def built_in(name: str) -> dict[str, Any]:
    return copy.deepcopy(schema.loads_toml(builtin.text(name), name))


def scenario_of(data: dict[str, Any], name: str = "test") -> Scenario:
    return from_dict(data, name=name)


def phases(*spec: tuple[str, float]) -> list[dict[str, Any]]:
    return [{"phase": kind, "duration": duration} for kind, duration in spec]


def report_of(scenario: Scenario) -> Report:
    return summarize(scenario, run_all(scenario))


def by_label(report: Report) -> dict[str, Result]:
    return {r.label: r for r in report.results}


SMALL_OUTAGE: dict[str, Any] = {
    "traffic": {"rate": 20.0, "deadline": 5.0},
    "downstream": {
        "latency": {"median": 0.02, "p99": 0.1},
        "capacity": 50,
        "queue": 50,
        "timeline": phases(
            ("healthy", 60.0), ("outage", 60.0), ("recovery", 20.0), ("healthy", 60.0)
        ),
    },
    "grid": {
        "timeout": 1.0,
        "retry": [
            {"attempts": 3, "backoff": {"initial": 0.05, "maximum": 1.0}},
            {
                "attempts": 3,
                "backoff": {"initial": 0.05, "maximum": 1.0},
                "budget": {"ratio": 0.1, "min_per_second": 1.0},
            },
        ],
        "breaker": [False, {"failure_rate": 0.5, "minimum_calls": 10, "open_for": 5.0}],
    },
}


# Every policy at once, briefly: for the tests of determinism.
TINY: dict[str, Any] = {
    "traffic": {"rate": 20.0, "deadline": 5.0},
    "downstream": {
        "capacity": 20,
        "queue": 20,
        "timeline": phases(
            ("healthy", 20.0), ("outage", 20.0), ("recovery", 10.0), ("healthy", 20.0)
        ),
    },
    "grid": {
        "timeout": 1.0,
        "retry": {"attempts": 3, "backoff": {"initial": 0.05}, "budget": [False, {"ratio": 0.2}]},
        "breaker": {"failure_rate": 0.5, "minimum_calls": 10, "open_for": 2.0},
        "bulkhead": {"max_concurrent": 10, "max_queued": 5},
    },
}


@pytest.fixture(scope="module")
def outage() -> Report:
    return report_of(scenario_of(copy.deepcopy(SMALL_OUTAGE), "outage"))


# -- determinism -------------------------------------------------------------------------


def test_the_same_scenario_and_seed_give_identical_json() -> None:
    scenario = scenario_of(copy.deepcopy(TINY))
    first = json.dumps(report_of(scenario).to_json())
    second = json.dumps(report_of(scenario).to_json())
    assert first == second


def test_another_seed_gives_other_numbers() -> None:
    data = copy.deepcopy(TINY)
    first = report_of(scenario_of(data)).to_json()
    data["seed"] = 2
    second = report_of(scenario_of(data)).to_json()
    assert first["settings"] != second["settings"]


def test_the_number_of_worker_processes_changes_nothing() -> None:
    data = built_in("contention")
    data["traffic"]["clients"] = 30
    scenario = scenario_of(data)
    alone = summarize(scenario, run_all(scenario, workers=1)).to_json()
    pooled = summarize(scenario, run_all(scenario, workers=2)).to_json()
    assert json.dumps(alone) == json.dumps(pooled)


def test_watching_the_progress_changes_nothing() -> None:
    scenario = scenario_of(copy.deepcopy(TINY))
    shares: list[float] = []
    watched = simulate(scenario, 1, shares.append)
    unwatched = simulate(scenario, 1)
    assert watched == unwatched
    assert shares == sorted(shares)
    assert shares[-1] == 1.0
    assert len(shares) > 10


def test_a_setting_simulates_the_same_whichever_runs_before_it() -> None:
    scenario = scenario_of(copy.deepcopy(TINY))
    alone = simulate(scenario, 1)
    simulate(scenario, 0)
    assert simulate(scenario, 1) == alone


# -- the built-in scenarios tell their stories ----------------------------------------------


def test_with_a_budget_amplification_in_a_total_outage_stays_near_one_plus_ratio(
    outage: Report,
) -> None:
    results = by_label(outage)
    budgeted = results["budget=0.1 breaker=off"]
    # ratio 0.1, plus the floor of 1 retry/s over 20 calls/s; a little for the
    # budget's slots (a tenth of its window) and for the windows' edges.
    limit = 1 + 0.1 + 1.0 / 20.0
    assert budgeted.outage_load is not None
    assert budgeted.outage_load <= limit + 0.02
    assert budgeted.peak_load is not None
    assert budgeted.peak_load <= limit + 0.1
    unbudgeted = results["budget=off breaker=off"]
    assert unbudgeted.outage_load == pytest.approx(3.0, abs=0.05)


def test_a_breaker_cuts_the_load_during_an_outage(outage: Report) -> None:
    results = by_label(outage)
    with_breaker = results["budget=off breaker=on"].outage_load
    without = results["budget=off breaker=off"].outage_load
    assert with_breaker is not None
    assert without is not None
    assert with_breaker < 0.25 * without


def test_a_breaker_detects_the_outage_within_seconds_and_stays_open_through_it(
    outage: Report,
) -> None:
    result = by_label(outage)["budget=off breaker=on"]
    assert result.time_to_detect is not None
    assert 0.0 <= result.time_to_detect < 2.0
    # Open for most of the outage, in periods of open_for = 5 s.
    assert 40.0 <= result.run.time_open <= 80.0
    opens = len(result.run.opened_at)
    assert result.run.time_open == pytest.approx(5.0 * opens, abs=5.0)


def test_settings_without_a_breaker_detect_nothing_and_are_never_open(outage: Report) -> None:
    result = by_label(outage)["budget=off breaker=off"]
    assert result.time_to_detect is None
    assert result.run.time_open == 0.0
    assert result.run.opened_at == []


def test_every_setting_recovers_from_a_plain_outage(outage: Report) -> None:
    for result in outage.results:
        assert result.recovered is True
        assert result.time_to_recover is not None
        assert result.time_to_recover <= 30.0


def test_the_recommendation_keeps_the_load_within_the_limit(outage: Report) -> None:
    assert outage.best.load <= outage.max_load
    assert outage.worst.label == "budget=off breaker=off"
    assert outage.recommendation().startswith(f"Recommended: {outage.best.label} (")


def test_jitter_beats_no_jitter_in_contention_and_full_jitter_finishes_first() -> None:
    data = built_in("contention")
    data["traffic"]["clients"] = 50
    results = by_label(report_of(scenario_of(data)))
    none = results["jitter=none"]
    for jitter in ("full", "equal", "decorrelated"):
        jittered = results[f"jitter={jitter}"]
        assert jittered.success_rate == 1.0
        assert none.attempts_per_call > 2 * jittered.attempts_per_call
        assert none.run.end > 5 * jittered.run.end
    assert results["jitter=full"].run.end < results["jitter=equal"].run.end


def small_retry_storm() -> Scenario:
    data = built_in("retry-storm")
    data["traffic"]["rate"] = 30.0
    data["downstream"]["capacity"] = 4
    data["downstream"]["queue"] = 100
    data["downstream"]["timeline"] = [
        {"phase": "healthy", "duration": 30.0},
        {"phase": "brownout", "slowdown": 3.0, "duration": 20.0},
        {"phase": "healthy", "duration": 70.0},
    ]
    retry = data["grid"]["retry"]
    data["grid"]["retry"] = [retry[1], retry[2]]  # 3 attempts, without and with a budget
    return scenario_of(data)


def test_in_a_retry_storm_a_budget_lets_the_downstream_recover() -> None:
    results = by_label(report_of(small_retry_storm()))
    storm, budgeted = results["budget=off"], results["budget=0.1"]
    assert storm.recovered is False
    assert budgeted.recovered is True
    assert budgeted.success_rate > storm.success_rate + 0.3
    assert storm.peak_load is not None
    assert storm.peak_load > 2.5
    # Without a budget the slots go to requests whose callers are gone.
    assert sum(storm.run.wasted) > 2 * sum(budgeted.run.wasted)


def test_in_a_brownout_a_breaker_saves_calls() -> None:
    data = built_in("brownout")
    data["downstream"]["timeline"] = phases(
        ("healthy", 30.0), ("brownout", 40.0), ("recovery", 10.0), ("healthy", 30.0)
    )
    data["downstream"]["timeline"][1]["slowdown"] = 8.0
    data["grid"]["timeout"] = 2.0
    data["grid"]["retry"] = {"attempts": 1}
    data["grid"]["breaker"] = data["grid"]["breaker"][:2]
    results = by_label(report_of(scenario_of(data)))
    assert results["breaker=on failures"].success_rate > results["breaker=off"].success_rate


def test_in_a_hang_a_breaker_fails_fast_and_spares_the_downstream_at_no_cost() -> None:
    data = built_in("hang")
    data["traffic"]["rate"] = 20.0
    data["downstream"]["timeline"] = [
        {"phase": "healthy", "duration": 60.0},
        {"phase": "outage", "failure": "hangs", "duration": 60.0},
        {"phase": "healthy", "duration": 60.0},
    ]
    data["grid"]["retry"] = data["grid"]["retry"][1]  # with a budget
    data["grid"]["breaker"] = data["grid"]["breaker"][:2]  # off, and 5 in a row for 5 s
    results = by_label(report_of(scenario_of(data)))
    off, on = results["breaker=off"], results["breaker=5 in a row/5s"]
    # Without a breaker, a call of the outage fails only when its attempt times
    # out; with one, it is rejected at once (but for the trials and the five
    # calls that open it).
    assert off.run.outcomes["timeout"] > 20 * on.run.outcomes["timeout"]
    assert off.run.latency["p99"] >= 1.0
    assert on.run.latency["mean"] < 0.1 * off.run.latency["mean"]
    assert on.outage_load is not None
    assert off.outage_load is not None
    assert on.outage_load < 0.2 * off.outage_load
    assert on.success_rate == pytest.approx(off.success_rate, abs=0.01)
    assert on.time_to_detect is not None
    assert on.time_to_detect < 2.0


# -- the simulated downstream ----------------------------------------------------------------


def one_setting(downstream: dict[str, Any], grid: dict[str, Any], **traffic: Any) -> Run:
    data = {
        "traffic": {"rate": 10.0, "duration": 30.0, **traffic},
        "downstream": downstream,
        "grid": grid,
    }
    return simulate(scenario_of(data), 0)


def test_the_loop_starts_at_zero_and_jumps_to_the_next_timer() -> None:
    loop = SimulationLoop()
    try:
        woke: list[float] = []
        loop.call_at(3600.0, lambda: woke.append(loop.time()))
        loop.call_at(3600.5, loop.stop)
        assert loop.time() == 0.0
        loop.run_forever()
        assert woke == [3600.0]
    finally:
        loop.close()


def test_hanging_requests_end_at_the_attempt_timeout() -> None:
    run = one_setting(
        {"timeline": [{"phase": "outage", "failure": "hangs", "duration": 30.0}]},
        {"timeout": 0.25},
    )
    assert run.outcomes["timeout"] == sum(run.calls)
    assert run.latency["p50"] == pytest.approx(0.25)
    assert run.timeouts == sum(run.calls)


def test_hanging_requests_without_a_timeout_end_at_the_callers_deadline() -> None:
    run = one_setting(
        {"timeline": [{"phase": "outage", "failure": "hangs", "duration": 30.0}]},
        {},
        deadline=2.0,
    )
    assert run.outcomes["timeout"] == sum(run.calls)
    assert run.latency["p99"] == pytest.approx(2.0)
    assert run.end == pytest.approx(run.latency["p99"] + 30.0, abs=2.0)


def test_errors_answer_after_the_error_latency() -> None:
    run = one_setting({"error_rate": 1.0, "error_latency": 0.05}, {})
    assert run.outcomes["error"] == sum(run.calls)
    assert run.latency["p50"] == pytest.approx(0.05)
    assert sum(run.failed) == sum(run.attempts)


def test_requests_beyond_capacity_and_queue_are_turned_away() -> None:
    run = one_setting(
        {"latency": {"median": 2.0}, "capacity": 2, "queue": 3, "error_rate": 0.0},
        {},
        deadline=100.0,
    )
    assert run.outcomes["error"] > 0
    assert sum(run.failed) == run.outcomes["error"]
    # Every 2 s, two slots free up for the 20 calls that arrived.
    assert run.outcomes["ok"] == pytest.approx(2 * 30 / 2.0 + 3, abs=6)


def test_the_queue_makes_callers_wait_in_order() -> None:
    run = one_setting(
        {"latency": {"median": 0.5}, "capacity": 1, "error_rate": 0.0},
        {},
        rate=1.0,
        duration=10.0,
    )
    assert run.outcomes["ok"] == sum(run.calls)
    assert run.latency["p50"] >= 0.5


def test_a_downstream_that_drops_abandoned_requests_wastes_less() -> None:
    # Twice the load it can take: its queue fills with requests nobody waits for.
    downstream = {"latency": {"median": 0.05}, "capacity": 1, "queue": 100, "error_rate": 0.0}
    wasteful = one_setting(downstream, {"timeout": 0.5}, rate=40.0)
    frugal = one_setting({**downstream, "serves_abandoned": False}, {"timeout": 0.5}, rate=40.0)
    assert sum(frugal.wasted) < sum(wasteful.wasted)
    assert frugal.outcomes["ok"] > 4 * wasteful.outcomes["ok"]


def test_a_recovery_ramps_the_error_rate_down() -> None:
    run = one_setting(
        {"timeline": phases(("outage", 10.0), ("recovery", 100.0))},
        {},
        rate=50.0,
        duration=110.0,
    )
    early = sum(run.failed[10:30]) / sum(run.attempts[10:30])
    late = sum(run.failed[90:110]) / sum(run.attempts[90:110])
    assert early == pytest.approx(0.85, abs=0.06)
    assert late == pytest.approx(0.1, abs=0.06)


def test_closed_clients_wait_for_each_answer() -> None:
    data = {
        "traffic": {"mode": "closed", "clients": 3, "calls": 5},
        "downstream": {"latency": {"median": 1.0}, "error_rate": 0.0},
        "grid": {},
    }
    run = simulate(scenario_of(data), 0)
    assert sum(run.calls) == 15
    assert run.end == pytest.approx(5.0)
    assert run.calls[:5] == [3, 3, 3, 3, 3]


def test_closed_clients_think_between_calls() -> None:
    data = {
        "traffic": {"mode": "closed", "clients": 5, "think_time": 1.0, "duration": 100.0},
        "downstream": {"latency": {"median": 0.01}, "error_rate": 0.0},
        "grid": {},
    }
    run = simulate(scenario_of(data), 0)
    assert sum(run.calls) == pytest.approx(5 * 100 / 1.01, rel=0.15)


def test_the_policies_counts_come_from_their_own_telemetry() -> None:
    run = one_setting(
        {"error_rate": 1.0},
        {"retry": {"attempts": 3, "backoff": {"initial": 0.0, "maximum": 0.0}}},
    )
    calls = sum(run.calls)
    assert run.retries == 2 * calls
    assert run.exhausted == calls
    assert sum(run.attempts) == 3 * calls


def test_bulkhead_rejections_are_counted() -> None:
    run = one_setting(
        {"latency": {"median": 5.0}, "error_rate": 0.0},
        {"bulkhead": {"max_concurrent": 1}},
    )
    assert run.bulkhead_rejected > 0
    assert run.outcomes["rejected"] == run.bulkhead_rejected


def test_time_series_are_per_second() -> None:
    run = one_setting({}, {}, rate=10.0, duration=60.0)
    assert BUCKET == 1.0
    assert sum(run.calls) == sum(run.attempts)
    assert len(run.calls) == math.floor(run.end / BUCKET) + 1
    assert 5 < sum(run.calls[:10]) / 10 < 15


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 0.999) == 100.0
    assert percentile([], 0.5) == 0.0


def test_a_round_trip_adds_to_every_attempt_there_and_back() -> None:
    near = one_setting({"latency": {"median": 0.05}, "error_rate": 0.0}, {})
    far = one_setting({"latency": {"median": 0.05}, "error_rate": 0.0, "round_trip": 0.01}, {})
    assert near.latency["p50"] == pytest.approx(0.05)
    assert far.latency["p50"] == pytest.approx(0.06)
    errors = one_setting(
        {"error_rate": 1.0, "error_latency": 0.005, "round_trip": 0.01}, {}, deadline=1.0
    )
    assert errors.latency["p50"] == pytest.approx(0.015)


def test_a_round_trip_counts_against_the_attempt_timeout() -> None:
    downstream = {"latency": {"median": 0.045}, "error_rate": 0.0, "round_trip": 0.01}
    run = one_setting(downstream, {"timeout": 0.05})
    assert run.outcomes["timeout"] == sum(run.calls)
    assert (
        "round trip 10 ms"
        in scenario_of(
            {"traffic": {"rate": 1.0, "duration": 1.0}, "downstream": downstream}
        ).downstream.describe()
    )
