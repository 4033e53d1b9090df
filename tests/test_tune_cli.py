"""``python -m stalwart tune``: what it prints, writes and exits with."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stalwart.__main__ import main
from stalwart._tune import builtin
from stalwart._tune.command import run
from stalwart._tune.scenario import parse_text

# Thirty seconds of an outage, two settings: a run takes a fraction of a second.
SMALL = """\
name = "small"
description = "a short outage"

[traffic]
rate = 20.0
deadline = 3.0

[downstream]
capacity = 20

[[downstream.timeline]]
phase = "healthy"
duration = 20.0

[[downstream.timeline]]
phase = "outage"
duration = 10.0

[[downstream.timeline]]
phase = "healthy"
duration = 20.0

[grid]
timeout = 0.5
retry = { attempts = 3, backoff = { initial = 0.05 } }
breaker = [false, { minimum_calls = 10, open_for = 2.0 }]
"""


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.toml"
    path.write_text(SMALL)
    return path


def tune(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["tune", "--workers", "1", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_the_commands() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stalwart", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert "demo" in done.stdout
    assert "tune" in done.stdout


def test_list_shows_the_built_in_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = tune(capsys, "--list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(builtin.NAMES)
    assert all(builtin.description(name) in out for name in builtin.NAMES)


def test_the_table_ranks_the_settings_and_recommends_one(
    capsys: pytest.CaptureFixture[str], small: Path
) -> None:
    code, out, err = tune(capsys, str(small))
    assert code == 0
    assert err == ""  # not a terminal: no progress bar
    lines = out.splitlines()
    assert lines[0] == "Scenario 'small': a short outage"
    at = next(i for i, line in enumerate(lines) if line.startswith("#"))
    header = lines[at]
    for column in ("setting", "success", "p50", "p99", "p99.9", "attempts/call", "peak load"):
        assert column in header
    for column in ("detect", "recover", "open"):
        assert column in header
    rows = lines[at + 1 : lines.index("", at)]
    # Retrying into an outage without a budget triples the load: ranked after a line.
    assert rows[1] == "  (over 1.5x peak load on the downstream:)"
    del rows[1]
    assert [row.split()[:2] for row in rows] == [["1", "breaker=on"], ["2", "breaker=off"]]
    assert lines[-1].startswith("Recommended: breaker=on (")


def test_the_table_has_a_legend_for_the_columns_it_shows(
    capsys: pytest.CaptureFixture[str], small: Path
) -> None:
    out = tune(capsys, str(small))[1]
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("#"))
    start = lines.index("", at) + 1
    legend = lines[start : lines.index("", start)]
    assert [line.split("  ")[1] for line in legend] == [
        "success",
        "p50 p99 p99.9",
        "attempts/call",
        "peak load",
        "detect",
        "recover",
        "open",
    ]
    assert "from the start of the outage to the breaker's first opening" in out


def test_the_legend_leaves_out_the_columns_not_shown(capsys: pytest.CaptureFixture[str]) -> None:
    out = tune(capsys, "--scenario", "contention")[1]
    for shown in ("  success ", "  p50 p99 p99.9 ", "  attempts/call ", "  all done "):
        assert shown in out
    for absent in ("peak load", "detect", "recover", "open "):
        assert absent not in out


def test_json_holds_every_number_per_setting(
    capsys: pytest.CaptureFixture[str], small: Path
) -> None:
    code, out, _ = tune(capsys, str(small), "--json")
    assert code == 0
    report = json.loads(out)
    assert report["scenario"]["name"] == "small"
    assert report["scenario"]["outage"] == [20.0, 30.0]
    assert report["recommendation"].startswith("Recommended:")
    settings = report["settings"]
    assert [s["rank"] for s in settings] == [1, 2]
    for setting in settings:
        assert 0.0 <= setting["success_rate"] <= 1.0
        assert set(setting["latency"]) == {"p50", "p99", "p999", "mean"}
        assert setting["attempts_per_call"] > 0
        assert setting["peak_load"] > 0
        assert setting["options"]["timeout"] == 0.5
        assert setting["calls"] == sum(setting["outcomes"].values())
    with_breaker = next(s for s in settings if s["options"]["breaker"] is not None)
    assert with_breaker["time_to_detect"] is not None
    assert with_breaker["time_open"] > 0
    without = next(s for s in settings if s["options"]["breaker"] is None)
    assert without["time_open"] is None
    assert without["time_to_detect"] is None


def test_the_same_seed_prints_the_same_json(
    capsys: pytest.CaptureFixture[str], small: Path
) -> None:
    first = tune(capsys, str(small), "--json")[1]
    second = tune(capsys, str(small), "--json")[1]
    third = tune(capsys, str(small), "--json", "--seed", "2")[1]
    assert first == second
    assert first != third
    assert json.loads(third)["scenario"]["seed"] == 2


def test_plot_writes_a_png(capsys: pytest.CaptureFixture[str], small: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "plot.png"
    code, _, err = tune(capsys, str(small), "--plot", str(target))
    assert code == 0
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert target.stat().st_size > 10_000
    assert f"plot written to {target}" in err


def test_plot_without_matplotlib_says_how_to_get_it(
    capsys: pytest.CaptureFixture[str],
    small: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    target = tmp_path / "plot.png"
    code, out, err = tune(capsys, str(small), "--plot", str(target))
    assert code == 2
    assert "pip install 'stalwart[tune]'" in err
    assert out == ""
    assert not target.exists()


def test_print_scenario_prints_a_file_that_parses_to_the_same_scenario(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = tune(capsys, "--scenario", "retry-storm", "--print-scenario")
    assert code == 0
    assert out == builtin.text("retry-storm")
    assert parse_text(out, name="retry-storm") == parse_text(
        builtin.text("retry-storm"), name="retry-storm"
    )


def test_print_scenario_of_a_file_prints_the_file(
    capsys: pytest.CaptureFixture[str], small: Path
) -> None:
    assert tune(capsys, str(small), "--print-scenario")[1] == SMALL


def test_a_built_in_scenario_runs_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = tune(capsys, "--scenario", "contention", "--json")
    assert code == 0
    labels = [s["label"] for s in json.loads(out)["settings"]]
    assert sorted(labels) == ["jitter=decorrelated", "jitter=equal", "jitter=full", "jitter=none"]
    assert labels[-1] == "jitter=none"


def test_the_progress_bar_goes_to_stderr_when_asked(
    capsys: pytest.CaptureFixture[str], small: Path
) -> None:
    code, out, err = tune(capsys, str(small), "--progress")
    assert code == 0
    assert "tune small [" in err
    assert "2/2 settings" in err
    assert "[" not in out.splitlines()[0]


def test_the_progress_bar_shows_on_a_terminal_unless_refused(small: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    from stalwart.__main__ import _parser

    for flags, shown in (((), True), (("--no-progress",), False)):
        out, err = io.StringIO(), Terminal()
        args = _parser().parse_args(["tune", str(small), "--workers", "1", *flags])
        assert run(args, out, err) == 0
        assert ("settings" in err.getvalue()) is shown


def test_two_workers_print_what_one_prints(capsys: pytest.CaptureFixture[str], small: Path) -> None:
    alone = tune(capsys, str(small), "--json")[1]
    code = main(["tune", str(small), "--json", "--workers", "2"])
    assert code == 0
    assert capsys.readouterr().out == alone


def test_max_load_moves_settings_over_it_to_the_end(
    capsys: pytest.CaptureFixture[str], small: Path
) -> None:
    report = json.loads(tune(capsys, str(small), "--json", "--max-load", "1.2")[1])
    loads = [s["peak_load"] for s in report["settings"]]
    assert report["max_load"] == 1.2
    assert loads[0] <= 1.2 < loads[-1]


def test_the_tune_session_runs_the_default_scenario() -> None:
    noxfile = (Path(__file__).resolve().parent.parent / "noxfile.py").read_text()
    assert '"python", "-m", "stalwart", "tune"' in noxfile
