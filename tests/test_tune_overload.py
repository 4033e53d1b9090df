"""The tuner's adaptive policies: the concurrency and throttle sections, ``[[grid]]``
alternatives, a traffic timeline with surges, and the ``overload`` story it tells."""

from __future__ import annotations

import copy
import random
import textwrap
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart._tune import builtin, schema
from stalwart._tune.engine import DownstreamError, Overloaded, simulate
from stalwart._tune.report import Result, summarize
from stalwart._tune.runner import run_all
from stalwart._tune.scenario import RatePhase, ScenarioError, from_dict, parse_text

BASE = """\
[traffic]
rate = 10.0

[[downstream.timeline]]
phase = "healthy"
duration = 30.0
"""


def scenario(text: str) -> Any:
    return parse_text(BASE + textwrap.dedent(text), name="test")


def problem_at(text: str, path: str) -> str:
    with pytest.raises(ScenarioError) as raised:
        scenario(text)
    found = dict(raised.value.problems)
    assert path in found, found
    return found[path]


# -- one entry per policy ----------------------------------------------------------------


def test_the_grid_is_its_sections_in_pipeline_order() -> None:
    assert [f.name for f in schema.GRID.fields] == [s.name for s in schema.SECTIONS]
    assert [s.name for s in schema.SECTIONS] == [
        "retry",
        "hedge",
        "rate_limiter",
        "throttle",
        "breaker",
        "concurrency",
        "bulkhead",
        "timeout",
    ]


def test_every_section_with_options_is_in_the_reference() -> None:
    documented = [table for _, table in schema._DOCUMENTED]
    for section in schema.SECTIONS:
        if isinstance(section.kind, schema.Table):
            assert any(table is section.kind for table in documented), section.name
    page = schema.reference_markdown()
    assert "### `[grid.concurrency]`" in page
    assert "### `[grid.throttle]`" in page
    assert "### `[[traffic.timeline]]`" in page


def test_the_adaptive_sections_take_the_policies_own_defaults() -> None:
    setting = scenario("[grid]\nconcurrency = {}\nthrottle = {}\n").settings[0]
    assert setting.options["concurrency"] == {
        "label": None,
        "algorithm": "gradient2",
        "initial": 20,
        "minimum": 1,
        "maximum": 1000,
        "max_queued": 0,
    }
    assert setting.options["throttle"] == {"label": None, "k": 2.0, "window": 120.0}


def test_a_setting_builds_them_in_the_pipeline_with_the_downstreams_errors() -> None:
    setting = scenario(
        "[grid]\nretry = {}\nhedge = {}\nthrottle = { k = 1.5 }\nbreaker = {}\n"
        'concurrency = { algorithm = "vegas", max_queued = 4 }\n'
        "bulkhead = { max_concurrent = 8 }\ntimeout = 1.0\n"
    ).settings[0]
    policies = setting.policies(
        sw.Telemetry(registry=CollectorRegistry()),
        random.Random(1),
        failure=DownstreamError,
        overloaded=Overloaded,
    )
    assert [type(p) for p in policies] == [
        sw.Retry,
        sw.Hedge,
        sw.AdaptiveThrottle,
        sw.CircuitBreaker,
        sw.ConcurrencyLimit,
        sw.Bulkhead,
        sw.Timeout,
    ]
    throttle, limit = policies[2], policies[4]
    assert isinstance(throttle, sw.AdaptiveThrottle)
    assert throttle.k == 1.5
    assert throttle.failure_on == (DownstreamError, TimeoutError)
    assert isinstance(limit, sw.ConcurrencyLimit)
    assert isinstance(limit.algorithm, sw.VegasLimit)
    assert limit.max_queued == 4
    assert isinstance(limit.drop_on, tuple)
    assert Overloaded in limit.drop_on
    assert [p.name for p in policies] == [
        s.name for s in schema.SECTIONS if s.name != "rate_limiter"
    ]


@pytest.mark.parametrize(
    ("grid", "path", "expected"),
    [
        ("concurrency = { minimum = 5, maximum = 2 }", "grid.concurrency", "maximum must be"),
        ("concurrency = { initial = 2000 }", "grid.concurrency", "initial must be between"),
        ('concurrency = { algorithm = "cubic" }', "grid.concurrency.algorithm", "must be one of"),
        ("throttle = { k = 0.5 }", "grid.throttle.k", "must be ≥ 1"),
        ("throttle = { window = 0.0 }", "grid.throttle.window", "must be > 0"),
    ],
)
def test_bad_options_are_named_with_their_path(grid: str, path: str, expected: str) -> None:
    assert expected in problem_at(f"[grid]\n{grid}\n", path)


# -- [[grid]]: alternatives --------------------------------------------------------------


ALTERNATIVES = """\
[[grid]]

[[grid]]
bulkhead = [{ max_concurrent = 10 }, { max_concurrent = 40 }]

[[grid]]
concurrency = { algorithm = ["gradient2", "aimd"] }

[[grid]]
throttle = {}
timeout = 1.0
"""


def test_grid_tables_are_compared_one_after_the_other_not_combined() -> None:
    settings = scenario(ALTERNATIVES).settings
    assert [s.label for s in settings] == [
        "no policy",
        "bulkhead=10",
        "bulkhead=40",
        "concurrency=gradient2",
        "concurrency=aimd",
        "throttle=on timeout=1s",
    ]
    assert settings[5].options["bulkhead"] is None
    assert settings[5].options["timeout"] == 1.0


def test_a_problem_in_a_grid_table_names_the_table() -> None:
    text = "[[grid]]\nbulkhead = { max_concurent = 10 }\n"
    assert "did you mean" in problem_at(text, "grid[0].bulkhead.max_concurent")


def test_the_settings_of_all_grid_tables_count_towards_the_limit() -> None:
    tables = "".join(f"[[grid]]\ntimeout = {t}.0\n" for t in range(1, 4))
    assert len(scenario(tables).settings) == 3


# -- a timeline of rates -----------------------------------------------------------------


SURGE = """\
[[traffic.timeline]]
duration = 60.0

[[traffic.timeline]]
duration = 30.0
rate = 50.0

[[traffic.timeline]]
duration = 60.0
rate = 5.0
"""


def surged() -> Any:
    return parse_text("[traffic]\nrate = 10.0\n" + SURGE + "[grid]\ntimeout = 1.0\n", name="surge")


def test_a_traffic_timeline_is_absolute_phases_of_rates() -> None:
    traffic = surged().traffic
    assert traffic.timeline == (
        RatePhase(0.0, 60.0, 10.0),
        RatePhase(60.0, 90.0, 50.0),
        RatePhase(90.0, 150.0, 5.0),
    )
    assert traffic.duration == 150.0  # the timeline's length, the downstream having none
    assert traffic.surges == (RatePhase(60.0, 90.0, 50.0),)
    assert traffic.describe() == (
        "150 s of traffic at 10 calls/s "
        "(50 calls/s from 1 min to 90 s, 5 calls/s from 90 s to 150 s)"
    )


def test_a_surge_is_the_incident_when_the_downstream_has_none() -> None:
    s = surged()
    assert s.incident == (60.0, 90.0)
    assert s.core == (60.0, 90.0)


def test_the_downstreams_incident_comes_first() -> None:
    s = parse_text(
        "[traffic]\nrate = 10.0\n" + SURGE + '[[downstream.timeline]]\nphase = "healthy"\n'
        'duration = 30.0\n[[downstream.timeline]]\nphase = "outage"\nduration = 10.0\n',
        name="both",
    )
    assert s.core == (30.0, 40.0)
    assert s.incident == (30.0, 90.0)


def test_only_open_traffic_has_a_timeline_of_rates() -> None:
    text = '[traffic]\nmode = "closed"\nclients = 5\nduration = 10.0\n' + SURGE
    with pytest.raises(ScenarioError) as raised:
        parse_text(text, name="closed")
    assert "traffic.timeline" in dict(raised.value.problems)


def test_calls_arrive_at_each_phases_rate() -> None:
    data: dict[str, Any] = {
        "traffic": {
            "rate": 20.0,
            "deadline": 1.0,
            "timeline": [
                {"duration": 100.0},
                {"duration": 100.0, "rate": 60.0},
                {"duration": 100.0, "rate": 5.0},
            ],
        },
        "downstream": {"latency": {"median": 0.01}, "error_rate": 0.0},
        "grid": {"timeout": 0.5},
    }
    run = simulate(from_dict(data, name="rates"), 0)
    per_phase = [sum(run.calls[i : i + 100]) / 100.0 for i in (0, 100, 200)]
    assert per_phase == [
        pytest.approx(20.0, rel=0.1),
        pytest.approx(60.0, rel=0.1),
        pytest.approx(5.0, rel=0.2),
    ]


# -- the overload story ------------------------------------------------------------------


def overload(grid: list[dict[str, Any]]) -> dict[str, Result]:
    """The built-in overload, its surge shortened to 30 s: each setting's success and p99."""
    data = copy.deepcopy(schema.loads_toml(builtin.text("overload"), "overload"))
    data["traffic"]["timeline"] = [
        {"duration": 30.0},
        {"duration": 30.0, "rate": 120.0},
        {"duration": 30.0},
    ]
    data["grid"] = grid
    shortened = from_dict(data, name="overload")
    report = summarize(shortened, run_all(shortened))
    return {r.label: r for r in report.results}


@pytest.fixture(scope="module")
def shrunk() -> dict[str, Result]:
    return overload(
        [
            {},
            {"bulkhead": {"max_concurrent": 10}},
            {"concurrency": {"algorithm": ["gradient2", "vegas", "aimd"]}},
            {"throttle": {"window": 10.0}},
        ]
    )


def test_without_protection_a_surge_collapses_into_timeouts(shrunk: dict[str, Result]) -> None:
    none = shrunk["no policy"]
    assert none.run.outcomes["timeout"] > 0.2 * none.calls
    assert none.run.latency["p99"] == pytest.approx(2.0, abs=0.01)  # the callers' deadline


@pytest.mark.parametrize("algorithm", ["gradient2", "vegas", "aimd"])
def test_an_adaptive_limit_keeps_most_calls_succeeding_without_a_number_to_choose(
    shrunk: dict[str, Result], algorithm: str
) -> None:
    limited, none = shrunk[f"concurrency={algorithm}"], shrunk["no policy"]
    assert limited.success_rate > none.success_rate + 0.15
    assert limited.run.outcomes["rejected"] > 0
    assert limited.run.rejected_by == {"concurrency": limited.run.outcomes["rejected"]}


def test_latency_based_limits_keep_latency_as_low_as_a_bulkhead_sized_to_the_capacity(
    shrunk: dict[str, Result],
) -> None:
    bulkhead = shrunk["bulkhead=10"].run.latency["p99"]
    for algorithm in ("gradient2", "vegas"):
        assert shrunk[f"concurrency={algorithm}"].run.latency["p99"] < 1.5 * bulkhead
    assert shrunk["concurrency=aimd"].run.latency["p99"] > bulkhead  # it waits for drops


def test_a_throttle_refuses_while_the_downstream_fails_and_counts_it(
    shrunk: dict[str, Result],
) -> None:
    throttled = shrunk["throttle=on"]
    assert throttled.run.rejected_by["throttle"] > 0
    assert throttled.run.outcomes["rejected"] == throttled.run.rejected_by["throttle"]
    assert throttled.to_json(1)["policies"]["throttle_rejected"] > 0
