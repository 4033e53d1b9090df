"""The benchmark suite runs: once, in tiny mode, in this process.

Its numbers are noise at this size and are not checked; what is checked is
that every section and every stalwart row is there, that the ratios parse,
and that the chart is a PNG. Peers are optional: without them (CI's test
environment) their rows are skipped and the suite still runs. With them, the
retrying peers are checked to make 3 tries, as stalwart's `Retry` does.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from benchmarks import _harness, hot_path, peer_cases, run, telemetry_cost, trio_cases
from benchmarks._harness import Case

import stalwart._telemetry

from . import redis_support

SECTIONS = (
    "### The run",
    "### Hot path, asyncio",
    "### trio",
    "### Telemetry",
    "### Scaling",
    "#### CircuitBreaker: the window's size",
    "#### Bulkhead: calls queued",
    "#### Idempotency: distinct keys through the in-process store",
    "#### RateLimiter(key=...): keys held",
    "### Memory per breaker",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    output = tmp_path_factory.mktemp("bench") / "r.md"
    # The telemetry phase gives a Telemetry an explicit tracer provider, which
    # makes every policy of the process look for spans on its rare paths:
    # undo that for the tests that follow.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stalwart._telemetry, "_explicit_tracing", False)
        status = run.main(["--quick", "--output", str(output)])
    assert status == 0  # --quick never fails on budgets
    return output.read_text(encoding="utf-8"), output


def rows(text: str) -> dict[str, list[str]]:
    """Table rows by their first cell (the last one wins)."""
    found = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| item") and "---" not in line:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            found[cells[0]] = cells
    return found


def test_every_section_is_reported(report: tuple[str, Path]) -> None:
    text, _ = report
    for section in SECTIONS:
        assert section in text
    for group in (*hot_path.GROUPS, *trio_cases.GROUPS, telemetry_cost.GROUP):
        assert f"#### {group}" in text


def test_every_stalwart_case_has_a_row_whose_ratio_parses(report: tuple[str, Path]) -> None:
    text, _ = report
    table = rows(text)
    ours = [case for case in hot_path.cases() if case.is_ours]
    assert ours
    for case in ours:
        cells = table[case.name]
        assert cells[1] == "**stalwart**"
        assert float(cells[2].replace(",", "")) > 0
        assert re.fullmatch(r"\d+\.\d\dx", cells[3]), cells
        if case.budget is not None:
            assert cells[4] == f"≤ {case.budget:g}x"
            assert cells[5] in ("ok", "**over**")
    for name in ("Pipeline, default telemetry (no SDK)", "Retry, success (trio)"):
        assert re.fullmatch(r"\d+\.\d\dx", table[name][3])


def test_the_rate_limiter_keys_table_has_a_row_per_size(report: tuple[str, Path]) -> None:
    text, _ = report
    section = text.split("#### RateLimiter(key=...): keys held")[1].split("###")[0]
    table = rows(section)
    for keys in ("1,000", "10,000"):  # the tiny run's sizes
        cells = table[keys]
        assert re.fullmatch(r"\d+\.\d\dx", cells[2]), cells
        assert re.fullmatch(r"\d+\.\d\dx", cells[4]), cells
        assert cells[6].endswith(" B"), cells
    assert table["1,000"][2] == "1.00x"


def test_the_cases_of_each_phase_have_names_of_their_own() -> None:
    phases = {
        "asyncio": hot_path.baselines() + hot_path.cases() + peer_cases.cases(),
        "trio": trio_cases.cases(),
        "telemetry": telemetry_cost.cases()[0],
    }
    for phase, cases in phases.items():
        names = [case.name for case in cases]
        assert len(names) == len(set(names)), phase


def test_two_cases_of_one_name_are_refused() -> None:
    # The harness keys calls by name: the first case would time the second's call.
    twins = [Case("the same", lambda: hot_path.f), Case("the same", lambda: hot_path.raising)]
    with pytest.raises(ValueError, match="unique"):
        asyncio.run(_harness.measure(twins, rounds=1, calls=10))


def test_the_chart_is_written_next_to_the_report(report: tuple[str, Path]) -> None:
    text, output = report
    chart = output.with_suffix(".png")
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"]({chart.name})" in text


def test_missing_peers_are_an_error_only_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_cases, "missing", lambda: ["tenacity"])
    assert run.main(["--quick", "--require-peers"]) == 2


@pytest.mark.parametrize("library", peer_cases.RETRIES)
def test_retrying_peers_make_three_tries(library: str) -> None:
    if not peer_cases.installed(library):
        pytest.skip(f"{library} is not installed")
    tries = 0

    async def failing() -> None:
        nonlocal tries
        tries += 1
        raise ValueError

    async def main() -> None:
        with pytest.raises(Exception):  # hyx raises its own error after the last try
            await peer_cases.retrying(library, wait=False)(failing)()

    with peer_cases.configured():  # stamina: no log line per retry
        asyncio.run(main())
    assert tries == 3


@pytest.mark.parametrize(
    ("missed", "quick", "no_fail", "status"),
    [
        (0, False, False, 0),
        (2, False, False, 1),
        (2, True, False, 0),  # --quick: its numbers are noise
        (2, False, True, 0),  # --no-fail: report only
    ],
)
def test_a_missed_budget_fails_only_a_full_run(
    missed: int, quick: bool, no_fail: bool, status: int
) -> None:
    assert run.exit_status(missed, quick=quick, no_fail=no_fail) == status


def test_only_selects_rows_by_name_with_their_baselines() -> None:
    cases = hot_path.baselines() + hot_path.cases()
    chosen = run.select(cases, ["PERMIT available"], [])
    assert [case.name for case in chosen] == [
        hot_path.BARE,
        "RateLimiter, permit available",
        "RateLimiter(key=...), permit available",
    ]


def test_only_selects_the_baselines_of_baselines() -> None:
    cases = hot_path.baselines() + hot_path.cases()
    chosen = run.select(cases, ["PerKey(CircuitBreaker)"], [])
    assert [case.name for case in chosen] == [
        hot_path.BARE,
        hot_path.KEYED_BREAKER,  # the row's baseline, itself measured against a bare await
        "PerKey(CircuitBreaker), the key's breaker found",
    ]


def test_a_selected_run_written_with_its_chart_holds_every_ratio(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    output = tmp_path / "run.md"
    selected = ["--only", "PerKey(CircuitBreaker)", "--output", str(output)]
    assert run.main(["--rounds", "1", "--calls", "200", "--no-fail", *selected]) == 0
    table = rows(capsys.readouterr().out)
    assert re.fullmatch(r"\d+\.\d\dx", table[hot_path.KEYED_BREAKER][3])
    assert output.with_suffix(".png").stat().st_size > 0


def test_group_selects_every_row_of_the_groups_it_names() -> None:
    cases = hot_path.baselines() + hot_path.cases()
    chosen = run.select(cases, [], [hot_path.PIPELINE])
    assert [case.name for case in chosen] == [
        hot_path.BARE,
        "Pipeline(Timeout, Retry, Bulkhead)",
        "Pipeline(Timeout, Retry, CircuitBreaker, Bulkhead)",
    ]


def test_a_run_of_selected_rows_reports_them_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    selected = ["--only", "RateLimiter, permit"]
    assert run.main(["--rounds", "1", "--calls", "200", "--no-fail", *selected]) == 0
    text = capsys.readouterr().out
    table = rows(text)
    assert re.fullmatch(r"\d+\.\d\dx", table["RateLimiter, permit available"][3])
    assert hot_path.BARE in table
    assert "Retry, success" not in table
    for section in ("### trio", "### Telemetry", "### Scaling", "### Memory per breaker"):
        assert section not in text
    assert not list(tmp_path.iterdir())  # nothing written without --output


def test_a_selection_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(SystemExit, match="no row matches"):
        run.main(["--quick", "--only", "no such row"])


@pytest.mark.redis
@pytest.mark.realtime
def test_the_redis_report_counts_one_round_trip_per_rate_limited_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``redis_store.py``, in tiny mode, written where ``--output`` says (warnings are errors)."""
    from benchmarks import redis_store

    redis_support.require_redis()
    monkeypatch.setattr(redis_store, "REDIS_URL", redis_support.REDIS_URL)
    output = tmp_path / "redis.md"
    assert redis_store.main(["--quick", "--output", str(output)]) == 0
    text = output.read_text(encoding="utf-8")
    for section in ("### The run", "### Breakers", "### Idempotency", "### Rate limiter"):
        assert section in text
    table = rows(text)
    for row in ("let through at once", "refused"):
        assert table[row][1] == "1", table[row]
    assert table["replay"][1] == "1"


def test_the_documented_budgets_are_the_suites() -> None:
    # Each budgeted row has a row in docs/benchmarks.md's table naming its
    # policy with the same budget: the table once missed four policies.
    text = (Path(__file__).parent.parent / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    section = text.split("## The budgets", 1)[1].split("\n## ", 1)[0]
    documented = [
        (item.casefold(), float(budget))
        for item, budget in re.findall(r"^\| (.+?) \| ≤ ([\d.]+)x \|", section, re.MULTILINE)
    ]
    telemetry, _ = telemetry_cost.cases()
    budgeted = [case for case in hot_path.cases() + telemetry if case.budget is not None]
    assert len(budgeted) >= 20
    for case in budgeted:
        policy = re.split(r"[ ,(]", case.name, maxsplit=1)[0].casefold()
        assert any(policy in item and budget == case.budget for item, budget in documented), (
            f"{case.name!r} (budget {case.budget:g}x) is not in the documented budgets"
        )
