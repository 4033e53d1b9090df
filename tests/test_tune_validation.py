"""The validation's own logic (benchmarks/validate.py): its scenarios and its verdicts.

The live part (a uvicorn service, a minute per setting) runs in ``nox -s
validate``, not here; this checks what it compares and how.
"""

from __future__ import annotations

import dataclasses

import pytest
from benchmarks import validate

from stalwart._tune import builtin, schema
from stalwart._tune.engine import simulate
from stalwart._tune.live import LATE, Comparison
from stalwart._tune.report import summarize
from stalwart._tune.scenario import Scenario, from_dict


def scaled(name: str) -> Scenario:
    text = validate._toml(validate.scaled(name))
    return from_dict(schema.loads_toml(text, name), name=name)


@pytest.mark.parametrize("name", ["retry-storm", "outage"])
def test_the_scaled_scenarios_are_a_minute_of_the_built_in_grid(name: str) -> None:
    scenario = scaled(name)
    assert scenario.traffic.duration == 60.0
    assert scenario.downstream.timeline[-1].end == 60.0
    builtin_grid = schema.loads_toml(builtin.text(name), name)["grid"]
    grid = validate.scaled(name)["grid"]
    if name == "retry-storm":  # its budget's floor scaled with its rate, a quarter
        budgets = [r.pop("budget") for r in grid["retry"] if "budget" in r]
        assert budgets == [{"ratio": 0.1, "min_per_second": 2.5}] * 2
        for r in builtin_grid["retry"]:
            r.pop("budget", None)
    assert grid == builtin_grid


def test_the_outage_ends_before_a_trial_call_could_meet_it_half_recovered() -> None:
    # Every 5 s breaker opens once, and its trial call 5 s later meets a healthy
    # dependency, whatever the seed: no open period turns on a coin toss.
    scenario = scaled("outage")
    for label in ("budget=0.1 breaker=50%/5s", "budget=0.1 breaker=90%/5s"):
        index = next(s.index for s in scenario.settings if s.label == label)
        for seed in range(1, 6):
            run = simulate(dataclasses.replace(scenario, seed=seed), index)
            assert run.time_open == pytest.approx(5.0)


def comparison(live_seed: int) -> Comparison:
    scenario = scaled("outage")
    index = 0
    other = dataclasses.replace(scenario, seed=live_seed)
    live = summarize(scenario, [simulate(other, index)])
    simulated = summarize(scenario, [simulate(scenario, index)])
    return Comparison(scenario=scenario, url="-", speed=1.0, live=live, simulated=simulated)


def test_a_run_the_simulation_produces_is_within_tolerance() -> None:
    (verdict,) = validate.verdicts(comparison(live_seed=4))
    assert verdict.seed == 4
    assert (verdict.points, verdict.share) == (0.0, 0.0)
    assert verdict.within
    low, high = verdict.simulated
    assert low <= verdict.live <= high


def test_a_run_far_from_every_seed_is_not() -> None:
    result = comparison(live_seed=4)
    (live,) = result.live.results
    worse = dataclasses.replace(live, success_rate=live.success_rate - 0.2)
    bad = dataclasses.replace(result, live=dataclasses.replace(result.live, results=(worse,)))
    (verdict,) = validate.verdicts(bad)
    assert not verdict.within
    assert verdict.points < -3.0
    text, ok = validate.report([("outage", bad)], 60.0)
    assert not ok
    assert "| NO |" in text


def test_a_run_whose_client_fell_behind_is_not_within_whatever_its_figures() -> None:
    result = comparison(live_seed=4)
    (index,) = (r.setting.index for r in result.live.results)
    late = dataclasses.replace(result, late={index: LATE * 4})
    (verdict,) = validate.verdicts(late)
    assert (verdict.points, verdict.share) == (0.0, 0.0)
    assert not verdict.played
    assert not verdict.within
    text, ok = validate.report([("outage", late)], 60.0, (1.0, 2.0), priority=10)
    assert not ok
    assert "| 2000 ms | NO (not played on time) |" in text
    assert (
        "load average 1.0 at the start and 2.0 at the end, client and service at nice -10" in text
    )


def test_settings_are_chosen_by_label() -> None:
    scenario = scaled("retry-storm")
    assert validate.chosen(scenario, None) is None
    index = validate.chosen(scenario, ["attempts=5 budget=off"])
    assert index is not None
    assert [scenario.settings[i].label for i in index] == ["attempts=5 budget=off"]
    with pytest.raises(ValueError, match="has no setting 'attempts=9'"):
        validate.chosen(scenario, ["attempts=9"])
