"""The tuner's hedge section, and the ``long-tail`` story it tells."""

from __future__ import annotations

import copy
import random
import textwrap
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart._tune import builtin, schema
from stalwart._tune.engine import DownstreamError, Overloaded
from stalwart._tune.report import Result, summarize
from stalwart._tune.runner import run_all
from stalwart._tune.scenario import ScenarioError, from_dict, parse_text

BASE = """\
[traffic]
rate = 10.0

[[downstream.timeline]]
phase = "healthy"
duration = 30.0
"""


def scenario(text: str) -> Any:
    return parse_text(BASE + textwrap.dedent(text), name="test")


def policies(grid: str) -> list[sw.Policy]:
    setting = scenario(f"[grid]\n{grid}\n").settings[0]
    built: list[sw.Policy] = setting.policies(
        sw.Telemetry(registry=CollectorRegistry()),
        random.Random(1),
        failure=DownstreamError,
        overloaded=Overloaded,
    )
    return built


def test_the_hedge_section_takes_the_policys_own_defaults() -> None:
    setting = scenario("[grid]\nhedge = {}\n").settings[0]
    assert setting.options["hedge"] == {
        "label": None,
        "hedges": 1,
        "delay": 0.05,
        "quantile": None,
        "budget": None,
    }
    (hedge,) = policies("hedge = {}")
    assert isinstance(hedge, sw.Hedge)
    assert (hedge.hedges, hedge.delay, hedge.budget) == (1, 0.05, None)


def test_the_hedge_sits_inside_the_retry_and_outside_the_rest() -> None:
    built = policies("retry = {}\nhedge = { hedges = 2 }\nbreaker = {}\ntimeout = 1.0")
    assert [type(p) for p in built] == [sw.Retry, sw.Hedge, sw.CircuitBreaker, sw.Timeout]


def test_a_quantile_makes_an_adaptive_delay_up_to_the_delay() -> None:
    (hedge,) = policies("hedge = { quantile = 0.9, delay = 0.5, budget = { ratio = 0.05 } }")
    assert isinstance(hedge, sw.Hedge)
    assert hedge.delay == sw.AdaptiveDelay(quantile=0.9, minimum=0.001, maximum=0.5)
    assert isinstance(hedge.budget, sw.RetryBudget)
    assert hedge.budget.ratio == 0.05


@pytest.mark.parametrize(
    ("grid", "path", "expected"),
    [
        ("hedge = { hedges = 0 }", "grid.hedge.hedges", "must be ≥ 1"),
        ("hedge = { hedges = 17 }", "grid.hedge.hedges", "must be ≤ 16"),
        ("hedge = { delay = -1.0 }", "grid.hedge.delay", "must be ≥ 0"),
        ("hedge = { quantile = 1.0 }", "grid.hedge.quantile", "must be ≤ 0.999"),
        ("hedge = { quantile = 0.9, delay = 0.0 }", "grid.hedge.delay", "must be > 0 with a"),
        ("hedge = { budget = { ratio = -1.0 } }", "grid.hedge.budget.ratio", "must be ≥ 0"),
    ],
)
def test_bad_options_are_named_with_their_path(grid: str, path: str, expected: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        scenario(f"[grid]\n{grid}\n")
    found = dict(raised.value.problems)
    assert path in found, found
    assert expected in found[path]


def test_the_reference_documents_the_section() -> None:
    assert "### `[grid.hedge]`" in schema.reference_markdown()
    assert "long-tail" in builtin.NAMES


# -- the long-tail story -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shortened() -> dict[str, Result]:
    """The built-in long tail, at 20 calls/s for 2 minutes, its slowdown 30 s long."""
    data = copy.deepcopy(schema.loads_toml(builtin.text("long-tail"), "long-tail"))
    data["traffic"]["rate"] = 20.0
    data["traffic"]["timeline"] = [{"duration": 120.0}]
    data["downstream"]["timeline"] = [
        {"phase": "healthy", "duration": 60.0},
        {"phase": "brownout", "slowdown": 4.0, "duration": 30.0},
        {"phase": "healthy", "duration": 30.0},
    ]
    data["grid"] = [
        {},
        {"hedge": {"delay": 0.05}},
        {"hedge": {"label": "p95", "quantile": 0.95, "delay": 1.0}},
        {
            "hedge": {
                "label": "budget",
                "delay": 0.05,
                "budget": {"ratio": 0.1, "min_per_second": 1.0},
            }
        },
    ]
    short = from_dict(data, name="long-tail")
    return {r.label: r for r in summarize(short, run_all(short, workers=1)).results}


def test_hedging_cuts_the_tail(shortened: dict[str, Result]) -> None:
    unhedged = shortened["no policy"].run.latency["p99"]
    assert shortened["hedge=0.05s"].run.latency["p99"] < unhedged / 2
    assert shortened["hedge=p95"].run.latency["p99"] < unhedged * 0.75
    for result in shortened.values():
        assert result.run.latency["p50"] == pytest.approx(0.024, abs=0.005)


def test_an_adaptive_delay_hedges_about_one_call_in_twenty(shortened: dict[str, Result]) -> None:
    assert shortened["no policy"].attempts_per_call == pytest.approx(1.0)
    assert 1.02 < shortened["hedge=p95"].attempts_per_call < 1.12
    assert shortened["hedge=0.05s"].attempts_per_call > 1.25


def test_a_budget_caps_the_load_of_a_slowdown(shortened: dict[str, Result]) -> None:
    fixed, budgeted = shortened["hedge=0.05s"], shortened["hedge=budget"]
    assert fixed.peak_load is not None
    assert budgeted.peak_load is not None
    assert fixed.peak_load > 1.5
    assert budgeted.peak_load < 1.2
