"""The tuner's rate limiter: the ``rate_limiter`` grid section, the downstream's ``quota``,
and the ``quota`` story they tell."""

from __future__ import annotations

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
from stalwart._tune.scenario import Quota, ScenarioError, parse_text


def scenario(text: str, traffic: str = "rate = 10.0\nduration = 30.0") -> Any:
    return parse_text(f"[traffic]\n{traffic}\n" + textwrap.dedent(text), name="test")


def problem_at(text: str, path: str) -> str:
    with pytest.raises(ScenarioError) as raised:
        scenario(text)
    found = dict(raised.value.problems)
    assert path in found, found
    return found[path]


# -- the grid's section ------------------------------------------------------------------


def test_the_rate_limiter_sits_inside_the_retries_so_every_attempt_takes_a_permit() -> None:
    setting = scenario(
        "[grid]\nretry = {}\nrate_limiter = { rate = 5.0, burst = 2, max_wait = 0.5 }\n"
        "timeout = 1.0\n"
    ).settings[0]
    policies = setting.policies(
        sw.Telemetry(registry=CollectorRegistry()),
        random.Random(1),
        failure=DownstreamError,
        overloaded=Overloaded,
    )
    assert [type(p) for p in policies] == [sw.Retry, sw.RateLimiter, sw.Timeout]
    limiter = policies[1]
    assert isinstance(limiter, sw.RateLimiter)
    assert (limiter.rate, limiter.per, limiter.burst, limiter.max_wait) == (5.0, 1.0, 2, 0.5)
    assert limiter.name == "rate_limiter"


def test_the_section_takes_the_policys_own_defaults_and_needs_a_rate() -> None:
    setting = scenario("[grid]\nrate_limiter = { rate = 5.0 }\n").settings[0]
    assert setting.options["rate_limiter"] == {
        "label": None,
        "rate": 5.0,
        "per": 1.0,
        "burst": None,
        "max_wait": 0.0,
    }
    assert "missing" in problem_at("[grid]\nrate_limiter = {}\n", "grid.rate_limiter.rate")


def test_max_wait_false_waits_as_long_as_the_deadline_allows() -> None:
    setting = scenario("[grid]\nrate_limiter = { rate = 5.0, max_wait = false }\n").settings[0]
    (limiter,) = setting.policies(sw.Telemetry(registry=CollectorRegistry()), random.Random(1))
    assert isinstance(limiter, sw.RateLimiter)
    assert limiter.max_wait is None


@pytest.mark.parametrize(
    ("grid", "path", "expected"),
    [
        ("rate_limiter = { rate = 0.0 }", "grid.rate_limiter.rate", "must be > 0"),
        ("rate_limiter = { rate = 5.0, burst = 0 }", "grid.rate_limiter.burst", "must be ≥ 1"),
        ("rate_limiter = { rate = 5.0, per = 0.0 }", "grid.rate_limiter.per", "must be > 0"),
        ("rate_limiter = { rate = 5.0, max_wait = -1.0 }", "grid.rate_limiter.max_wait", "≥ 0"),
        ("rate_limiter = { rate = 5.0, keys = 3 }", "grid.rate_limiter.keys", "unknown key"),
    ],
)
def test_bad_options_are_named_with_their_path(grid: str, path: str, expected: str) -> None:
    assert expected in problem_at(f"[grid]\n{grid}\n", path)


def test_a_setting_is_labelled_by_its_rate() -> None:
    settings = scenario("[grid]\nrate_limiter = [false, { rate = 5.0 }, { rate = 8.0 }]\n").settings
    assert [s.label for s in settings] == [
        "rate_limiter=off",
        "rate_limiter=5",
        "rate_limiter=8",
    ]


def test_the_section_is_in_the_reference() -> None:
    page = schema.reference_markdown()
    assert "### `[grid.rate_limiter]`" in page
    assert "### `[downstream.quota]`" in page


# -- the downstream's quota --------------------------------------------------------------


def test_a_quota_bursts_default_to_its_rate() -> None:
    assert scenario("[downstream]\nquota = { rate = 7.5 }\n").downstream.quota == Quota(7.5, 7)
    assert scenario("[downstream]\nquota = { rate = 0.5 }\n").downstream.quota == Quota(0.5, 1)
    assert scenario("[downstream]\n").downstream.quota is None


@pytest.mark.parametrize(
    ("downstream", "path", "expected"),
    [
        ("quota = {}", "downstream.quota.rate", "missing"),
        ("quota = { rate = -1.0 }", "downstream.quota.rate", "must be > 0"),
        ("quota = { rate = 5.0, burst = 0 }", "downstream.quota.burst", "must be ≥ 1"),
        ("quota = 5.0", "downstream.quota", "must be a table"),
    ],
)
def test_a_bad_quota_is_named_with_its_path(downstream: str, path: str, expected: str) -> None:
    assert expected in problem_at(f"[downstream]\n{downstream}\n", path)


QUOTA = """\
[downstream]
latency = { median = 0.01 }
error_rate = 0.0
error_latency = 0.0
quota = { rate = 10.0, burst = 5 }
"""


def test_the_quota_admits_its_rate_and_refuses_the_rest_as_failures() -> None:
    # 40 calls/s for 20 s against 10/s: a GCRA admits at most burst + rate * seconds.
    run = simulate(scenario(QUOTA + "[grid]\n", "rate = 40.0\nduration = 20.0"), 0)
    admitted = sum(run.attempts) - sum(run.failed)
    assert 5 + 10 * 19 <= admitted <= 5 + 10 * 20
    assert run.outcomes["ok"] == admitted
    assert run.outcomes["error"] == sum(run.failed)
    assert "quota 10/s (burst 5)" in scenario(QUOTA).describe()


def test_a_rate_limiter_under_the_quota_sends_nothing_beyond_it() -> None:
    grid = "[grid]\nrate_limiter = { rate = 10.0, burst = 5 }\n"
    run = simulate(scenario(QUOTA + grid, "rate = 40.0\nduration = 20.0"), 0)
    assert sum(run.failed) == 0  # not one request refused by the quota
    assert run.rejected_by == {"rate_limiter": run.outcomes["rejected"]}
    assert run.outcomes["rejected"] > 500
    assert run.outcomes["ok"] == sum(run.attempts)


# -- the built-in story ------------------------------------------------------------------


@pytest.fixture(scope="module")
def story() -> dict[str, Result]:
    quota = parse_text(builtin.text("quota"), name="quota")
    report = summarize(quota, run_all(quota))
    return {r.label: r for r in report.results}


def test_the_quota_scenario_compares_retries_with_a_limiter_that_refuses_or_waits(
    story: dict[str, Result],
) -> None:
    assert set(story) == {
        "attempts=1",
        "attempts=3",
        "attempts=3 rate_limiter=refuse over 18/s",
        "attempts=3 rate_limiter=wait for 18/s",
    }


def test_retries_alone_get_a_few_more_calls_through_by_hammering_the_quota(
    story: dict[str, Result],
) -> None:
    retries, once = story["attempts=3"], story["attempts=1"]
    assert retries.success_rate > once.success_rate
    peak = max(r.peak_load or 0.0 for r in story.values())
    assert retries.peak_load == peak
    assert sum(retries.run.failed) > 2 * sum(once.run.failed)


def test_a_limiter_that_refuses_sends_nothing_beyond_the_quota(story: dict[str, Result]) -> None:
    refusing = story["attempts=3 rate_limiter=refuse over 18/s"]
    # Its downstream failures are the 1% of healthy errors, not the quota's 429s.
    assert sum(refusing.run.failed) < 0.02 * sum(refusing.run.attempts)
    assert refusing.run.rejected_by["rate_limiter"] > 0
    assert refusing.to_json(1)["policies"]["rate_limiter_rejected"] > 0


def test_a_limiter_that_waits_turns_the_bursts_into_latency(story: dict[str, Result]) -> None:
    waiting = story["attempts=3 rate_limiter=wait for 18/s"]
    assert waiting.success_rate == 1.0
    assert waiting.run.rejected_by["rate_limiter"] == 0
    assert waiting.run.latency["p99"] > 1.0  # the bursts' calls waited for their turn
    assert all(waiting.success_rate >= r.success_rate for r in story.values())
