"""Scenario files: what they accept, and how they say what is wrong with them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from stalwart._tune import builtin, schema
from stalwart._tune.scenario import (
    MAX_SETTINGS,
    Scenario,
    ScenarioError,
    from_dict,
    load,
    parse_text,
)

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """\
[traffic]
rate = 10.0

[[downstream.timeline]]
phase = "healthy"
duration = 30.0
"""


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ScenarioError) as raised:
        parse_text(textwrap.dedent(text), name="test")
    return raised.value.problems


def problem_at(text: str, path: str) -> str:
    found = dict(problems(text))
    assert path in found, found
    return found[path]


def with_grid(grid: str) -> str:
    return MINIMAL + "\n[grid]\n" + textwrap.dedent(grid)


# -- what is accepted --------------------------------------------------------------


def test_a_minimal_scenario_takes_its_defaults() -> None:
    scenario = parse_text(MINIMAL, name="minimal")
    assert scenario.name == "minimal"
    assert scenario.seed == 1
    assert scenario.traffic.duration == 30.0
    assert scenario.traffic.deadline == 10.0
    assert scenario.downstream.latency.median == 0.02
    assert scenario.downstream.capacity is None


def test_without_a_grid_the_outage_scenarios_grid_is_compared() -> None:
    mine = parse_text(MINIMAL, name="minimal")
    outage = parse_text(builtin.text("outage"), name="outage")
    assert [s.options for s in mine.settings] == [s.options for s in outage.settings]


@pytest.mark.parametrize("name", builtin.NAMES)
def test_every_built_in_scenario_is_valid(name: str) -> None:
    scenario = parse_text(builtin.text(name), name=name)
    assert scenario.name == name
    assert scenario.description == builtin.description(name)
    assert len(scenario.settings) >= 4


def test_the_built_in_outage_is_an_hour_at_50_calls_per_second_over_at_least_8_settings() -> None:
    scenario = parse_text(builtin.text("outage"), name="outage")
    assert scenario.traffic.rate == 50.0
    assert scenario.traffic.duration == 3600.0
    assert len(scenario.settings) >= 8


def test_the_timeline_becomes_absolute_phases_and_a_recovery_ramps_back() -> None:
    scenario = parse_text(builtin.text("outage"), name="outage")
    outage, recovery = scenario.downstream.timeline[1:3]
    assert (outage.start, outage.end, outage.error_rate) == (1200.0, 1500.0, 1.0)
    assert (recovery.error_rate, recovery.end_error_rate) == (1.0, 0.001)
    assert scenario.incident == (1200.0, 1620.0)
    assert scenario.core == (1200.0, 1500.0)


def test_a_brownout_is_slower_by_its_slowdown() -> None:
    scenario = parse_text(
        MINIMAL + '[[downstream.timeline]]\nphase = "brownout"\nslowdown = 4.0\nduration = 5.0\n',
        name="t",
    )
    brownout = scenario.downstream.timeline[1]
    assert brownout.latency.median == pytest.approx(0.08)
    assert brownout.latency.p99 == pytest.approx(0.4)


def test_a_latency_without_p99_is_constant() -> None:
    scenario = parse_text(MINIMAL + "[downstream]\nlatency = { median = 0.5 }\n", name="t")
    assert scenario.downstream.latency.sigma == 0.0


def test_the_grid_is_every_combination_of_the_alternatives() -> None:
    scenario = parse_text(
        with_grid(
            """\
            timeout = [0.5, 1.0]
            retry = { attempts = [1, 3], budget = [false, { ratio = 0.2 }] }
            breaker = [false, { open_for = [5.0, 30.0] }]
            """
        ),
        name="t",
    )
    assert len(scenario.settings) == 2 * 4 * 3
    first = scenario.settings[0].options
    assert first["retry"]["budget"] is None
    assert first["breaker"] is None
    assert first["timeout"] == 0.5
    assert [s.index for s in scenario.settings] == list(range(24))


def test_grid_options_take_the_policies_own_defaults() -> None:
    scenario = parse_text(with_grid("breaker = {}\nretry = {}\n"), name="t")
    options = scenario.settings[0].options
    assert options["breaker"]["open_for"] == 30.0
    assert options["breaker"]["window"] == 100
    assert options["retry"]["attempts"] == 3
    assert options["retry"]["backoff"]["jitter"] == "full"


def test_labels_name_only_what_varies() -> None:
    scenario = parse_text(
        with_grid(
            """\
            timeout = 1.0
            retry = { attempts = [1, 3], backoff = { initial = 0.05 } }
            breaker = [false, { open_for = 5.0 }]
            """
        ),
        name="t",
    )
    assert [s.label for s in scenario.settings] == [
        "attempts=1 breaker=off",
        "attempts=1 breaker=on",
        "attempts=3 breaker=off",
        "attempts=3 breaker=on",
    ]
    # Every setting retries: its options listed say so, a bare "retry" would not add to it.
    assert scenario.common == "backoff.initial=0.05s, breaker.open_for=5s, timeout=1s"


def test_a_section_on_everywhere_with_default_options_is_named_by_its_headline() -> None:
    scenario = parse_text(with_grid("timeout = [1.0, 2.0]\nretry = {}\nbreaker = {}\n"), name="t")
    assert scenario.common == "attempts=3, breaker=on"


def test_a_breaker_given_consecutive_failures_has_no_rate_trigger_unless_asked() -> None:
    import random

    from prometheus_client import CollectorRegistry

    import stalwart as sw

    scenario = parse_text(
        with_grid(
            """\
            breaker = [
              { consecutive_failures = 5 },
              { consecutive_failures = 5, failure_rate = 0.5 },
              { failure_rate = false, slow_call_duration = 1.0 },
              {},
            ]
            """
        ),
        name="t",
    )
    rates = [s.options["breaker"]["failure_rate"] for s in scenario.settings]
    assert rates == [None, 0.5, None, 0.5]
    assert [s.label for s in scenario.settings] == [
        "breaker.failure_rate=off breaker.consecutive_failures=5 breaker.slow_call_duration=off",
        "breaker.failure_rate=0.5 breaker.consecutive_failures=5 breaker.slow_call_duration=off",
        "breaker.failure_rate=off breaker.consecutive_failures=off breaker.slow_call_duration=1s",
        "breaker.failure_rate=0.5 breaker.consecutive_failures=off breaker.slow_call_duration=off",
    ]
    built = [  # each on a registry of its own, as each setting runs on its own
        s.policies(sw.Telemetry(registry=CollectorRegistry()), random.Random(1))[0]
        for s in scenario.settings
    ]
    assert [b.failure_rate for b in built] == rates  # type: ignore[attr-defined]


def test_a_common_consecutive_failures_breaker_does_not_list_its_rate_as_off() -> None:
    scenario = parse_text(
        with_grid("timeout = [1.0, 2.0]\nbreaker = { consecutive_failures = 5 }\n"), name="t"
    )
    assert scenario.common == "breaker.consecutive_failures=5"


def test_an_alternative_with_a_label_is_shown_by_it() -> None:
    scenario = parse_text(
        with_grid(
            """\
            breaker = [
              { label = "fast", failure_rate = 0.2, open_for = 1.0 },
              { label = "patient", failure_rate = 0.8, open_for = 60.0 },
            ]
            """
        ),
        name="t",
    )
    assert [s.label for s in scenario.settings] == ["breaker=fast", "breaker=patient"]


def test_a_budget_on_in_some_settings_shows_its_ratio() -> None:
    scenario = parse_text(
        with_grid("retry = { attempts = 3, budget = [false, { ratio = 0.2 }] }\n"), name="t"
    )
    assert [s.label for s in scenario.settings] == ["budget=off", "budget=0.2"]


def test_the_policies_of_a_setting_are_the_real_ones_outermost_first() -> None:
    import random

    from prometheus_client import CollectorRegistry

    import stalwart as sw

    scenario = parse_text(
        with_grid(
            "timeout = 1.0\nretry = { budget = {} }\nbreaker = {}\n"
            "bulkhead = { max_concurrent = 4 }\n"
        ),
        name="t",
    )
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    policies = scenario.settings[0].policies(telemetry, random.Random(1))
    assert [type(p) for p in policies] == [sw.Retry, sw.CircuitBreaker, sw.Bulkhead, sw.Timeout]
    retry = policies[0]
    assert isinstance(retry, sw.Retry)
    assert isinstance(retry.budget, sw.RetryBudget)


def test_a_time_window_builds_a_time_window_breaker() -> None:
    import random

    from prometheus_client import CollectorRegistry

    import stalwart as sw

    scenario = parse_text(with_grid("breaker = { time_window = 10.0 }\n"), name="t")
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    (breaker,) = scenario.settings[0].policies(telemetry, random.Random(1))
    assert isinstance(breaker, sw.CircuitBreaker)
    assert breaker.window == sw.TimeWindow(10.0)


def test_load_reads_a_file_named_after_its_stem(tmp_path: Path) -> None:
    path = tmp_path / "payments.toml"
    path.write_text(MINIMAL)
    assert load(path).name == "payments"


def test_a_scenario_can_come_from_a_dict() -> None:
    data: dict[str, Any] = {
        "traffic": {"rate": 5.0, "duration": 10.0},
        "grid": {"retry": {"attempts": 2}},
    }
    scenario = from_dict(data, name="d")
    assert isinstance(scenario, Scenario)
    assert scenario.downstream.timeline == ()


# -- what is refused, and how it is said ---------------------------------------------


def test_an_unknown_key_suggests_the_closest_one() -> None:
    assert problem_at(MINIMAL.replace("rate", "rat"), "traffic.rat") == (
        'unknown key (did you mean "rate"?)'
    )


def test_an_unknown_key_with_nothing_close_lists_the_known_ones() -> None:
    message = problem_at(MINIMAL + "[downstream]\ncolour = 1\n", "downstream.colour")
    assert message.startswith("unknown key (known keys: latency, error_rate")


def test_an_unknown_key_in_the_grid_is_found_inside_alternatives() -> None:
    message = problem_at(
        with_grid("breaker = [false, { failure_rat = 0.5 }]\n"), "grid.breaker[1].failure_rat"
    )
    assert "failure_rate" in message


def test_an_unknown_section_is_named() -> None:
    assert "did you mean" in problem_at(MINIMAL + "[trafic]\nrate = 1\n", "trafic")


@pytest.mark.parametrize(
    ("fragment", "path", "expected"),
    [
        (
            '[traffic]\ndeadline = "10"\n',
            "traffic.deadline",
            'must be a number, not a string ("10")',
        ),
        ("seed = 1.5\n", "seed", "must be an integer, not a number (1.5)"),
        ("seed = true\n", "seed", "must be an integer, not a boolean (true)"),
        (
            "[downstream]\ncapacity = [1]\n",
            "downstream.capacity",
            "must be an integer, not an array",
        ),
        ("[downstream]\nlatency = 0.1\n", "downstream.latency", "must be a table, not a number"),
        ("[downstream]\nserves_abandoned = 1\n", "downstream.serves_abandoned", "true or false"),
        ("grid = 3\n", "grid", "must be a table or an array of tables, not an integer"),
    ],
)
def test_a_wrong_type_is_named_with_its_path(fragment: str, path: str, expected: str) -> None:
    text = fragment + MINIMAL if not fragment.startswith("[") else MINIMAL + fragment
    if fragment.startswith("[traffic]"):
        text = MINIMAL.replace("rate = 10.0", 'rate = 10.0\ndeadline = "10"')
    assert expected in problem_at(text, path)


@pytest.mark.parametrize(
    ("text", "path", "expected"),
    [
        (
            MINIMAL.replace("duration = 30.0", "duration = -5.0"),
            "downstream.timeline[0].duration",
            "must be > 0",
        ),
        (MINIMAL.replace("rate = 10.0", "rate = 0.0"), "traffic.rate", "must be > 0"),
        (MINIMAL + "[downstream]\nerror_rate = 1.5\n", "downstream.error_rate", "must be ≤ 1"),
        (MINIMAL + "[downstream]\ncapacity = 0\n", "downstream.capacity", "must be ≥ 1"),
        (
            MINIMAL + "[downstream]\nlatency = { median = 0.2, p99 = 0.1 }\n",
            "downstream.latency.p99",
            "must be ≥ median (0.2), got 0.1",
        ),
        (
            MINIMAL + "[downstream]\nlatency = { p99 = 0.1 }\n",
            "downstream.latency.median",
            "missing",
        ),
        (
            "seed = 1\n" + MINIMAL.replace("rate = 10.0", "rate = inf"),
            "traffic.rate",
            "must be finite",
        ),
        (
            MINIMAL.replace('"healthy"', '"helthy"'),
            "downstream.timeline[0].phase",
            'did you mean "healthy"',
        ),
        (with_grid("retry = { attempts = 0 }\n"), "grid.retry.attempts", "must be ≥ 1, got 0"),
        (with_grid("timeout = [1.0, -1.0]\n"), "grid.timeout[1]", "must be > 0"),
        (
            with_grid("retry = { backoff = { jitter = 'ful' } }\n"),
            "grid.retry.backoff.jitter",
            'did you mean "full"',
        ),
    ],
)
def test_an_impossible_value_is_named_with_its_path(text: str, path: str, expected: str) -> None:
    assert expected in problem_at(text, path)


def test_the_policies_refuse_what_they_refuse_and_the_path_says_where() -> None:
    message = problem_at(
        with_grid("retry = { backoff = { initial = 5.0, maximum = 1.0 } }\n"), "grid.retry.backoff"
    )
    assert message == "maximum must be >= initial (5), got 1.0"


@pytest.mark.parametrize(
    ("text", "path", "expected"),
    [
        ('[traffic]\nmode = "open"\n' + MINIMAL.split("\n", 2)[2], "traffic.rate", "needs a rate"),
        (
            MINIMAL.replace("rate = 10.0", 'mode = "closed"'),
            "traffic.clients",
            "needs clients",
        ),
        (
            MINIMAL.replace("rate = 10.0", 'mode = "closed"\nclients = 2\nrate = 1.0'),
            "traffic.rate",
            "only open traffic",
        ),
        (MINIMAL.replace("rate = 10.0", "rate = 10.0\ncalls = 3"), "traffic.calls", "only closed"),
        ("[traffic]\nrate = 1.0\n", "traffic.duration", "give a duration"),
        (
            MINIMAL + '[[downstream.timeline]]\nphase = "outage"\nslowdown = 2.0\nduration = 1.0\n',
            "downstream.timeline[1].slowdown",
            "only a brownout has a slowdown",
        ),
        (
            MINIMAL
            + '[[downstream.timeline]]\nphase = "recovery"\nerror_rate = 0.5\nduration = 1.0\n',
            "downstream.timeline[1].error_rate",
            "a recovery ramps",
        ),
        (MINIMAL + "[downstream]\nqueue = 10\n", "downstream.queue", "needs a capacity"),
        (
            with_grid("breaker = { window = 50, time_window = 10.0 }\n"),
            "grid.breaker.time_window",
            "not both",
        ),
        (with_grid("timeout = []\n"), "grid.timeout", "an empty list of alternatives"),
        (with_grid("timeout = [[1.0]]\n"), "grid.timeout[0]", "cannot hold another list"),
        (with_grid("breaker = 3\n"), "grid.breaker", "a table, false (off) or a list of them"),
    ],
)
def test_keys_that_do_not_fit_together_are_named(text: str, path: str, expected: str) -> None:
    assert expected in problem_at(text, path)


def test_a_grid_too_large_is_refused_with_its_size() -> None:
    values = ", ".join(str(n) for n in range(1, 40))
    text = with_grid(f"timeout = [{values}]\nretry = {{ attempts = [{values}] }}\n")
    message = problem_at(text, "grid")
    assert message.startswith(f"1521 settings is too many (at most {MAX_SETTINGS})")


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        """\
        seed = -1
        [traffic]
        rat = 5
        [downstream]
        error_rate = 2.0
        [[downstream.timeline]]
        phase = "healthy"
        duration = 0.0
        [grid]
        timeout = "1s"
        """
    )
    assert [path for path, _ in found] == [
        "seed",
        "traffic.rat",
        "downstream.error_rate",
        "downstream.timeline[0].duration",
        "traffic.rate",
        "grid.timeout",
    ]


def test_a_toml_syntax_error_says_where() -> None:
    with pytest.raises(ScenarioError) as raised:
        parse_text("[traffic]\nrate = = 1\n", name="t")
    assert "not valid TOML" in str(raised.value)
    assert "line 2" in str(raised.value)


def test_an_unreadable_file_is_a_scenario_error(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read"):
        load(tmp_path / "missing.toml")


def test_the_error_message_lists_every_problem_under_the_source() -> None:
    error = ScenarioError([("a.b", "wrong"), ("c", "also wrong")], "x.toml")
    assert str(error) == "x.toml is not a valid scenario:\n  a.b: wrong\n  c: also wrong"


# -- the command line on bad input ---------------------------------------------------


def tune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stalwart", "tune", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_bad_file_exits_with_2_and_a_message_not_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL.replace("rate", "rat") + "[downstream]\nerror_rate = 3\n")
    done = tune(str(path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"{path} is not a valid scenario:" in done.stderr
    assert 'traffic.rat: unknown key (did you mean "rate"?)' in done.stderr
    assert "downstream.error_rate: must be ≤ 1, got 3" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ("missing.toml",),
        ("--scenario", "outag"),
        ("--seed", "-1"),
        ("--workers", "0"),
        ("--max-load", "0"),
        ("--max-load", "nan"),
        ("--plot", "no/such/dir/out.png"),
        ("--seed", "one"),
        ("--unknown",),
    ],
)
def test_bad_arguments_exit_with_2_and_no_traceback(args: tuple[str, ...]) -> None:
    from stalwart.__main__ import main

    # In-process is enough: argparse and the command share the exit codes.
    with pytest.raises(SystemExit) as exited:
        code = main(["tune", *args])
        raise SystemExit(code)
    assert exited.value.code == 2


def test_a_file_and_a_built_in_together_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from stalwart.__main__ import main

    assert main(["tune", "x.toml", "--scenario", "outage"]) == 2
    assert "not both" in capsys.readouterr().err


def test_an_unknown_built_in_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    from stalwart.__main__ import main

    assert main(["tune", "--scenario", "retrystorm"]) == 2
    assert 'did you mean "retry-storm"?' in capsys.readouterr().err


# -- the reference cannot drift ----------------------------------------------------------


def test_the_reference_page_shows_the_schema_as_it_is() -> None:
    page = ROOT / "docs" / "reference" / "scenario-format.md"
    text = page.read_text(encoding="utf-8")
    assert schema.splice(text) == text, (
        "docs/reference/scenario-format.md is out of date: run "
        "python -m stalwart._tune.schema --update docs/reference/scenario-format.md"
    )


def test_the_reference_documents_every_key() -> None:
    reference = schema.reference_markdown()
    for _, table in schema._DOCUMENTED:
        for field in table.fields:
            assert f"| `{field.name}` |" in reference


def test_tune_help_documents_every_key_and_option() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stalwart", "tune", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for _, table in schema._DOCUMENTED:
        for field in table.fields:
            if field.name == "grid" or isinstance(field.kind, (schema.Table, schema.TableArray)):
                continue  # sections, shown as headers
            assert f"    {field.name}: " in done.stdout, field.name
    for option in (
        "--scenario",
        "--list",
        "--print-scenario",
        "--json",
        "--plot",
        "--seed",
        "--workers",
        "--max-load",
        "--progress",
        "--no-progress",
    ):
        assert option in done.stdout
    for header in ("[traffic]", "[[downstream.timeline]]", "[grid.retry.budget]", "[grid.breaker]"):
        assert header in done.stdout
