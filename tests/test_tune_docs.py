"""The tuning how-to shows real output: its tables are what the command prints.

Every ```` ```text ```` block titled with a ``python -m stalwart tune``
command is run and compared; a scenario file it names comes from the
```` ```toml ```` block titled with that name. The built-in outage and hang
take most of a minute each, so their tables are checked only with
``STALWART_TUNE_FULL=1`` (the numbers are deterministic: the same code gives
the same table). A ``--live`` run's table is real time against a real
server, and is not checked: its figures vary.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from stalwart.__main__ import main
from stalwart._tune.scenario import parse_text

from .docs_examples import ROOT, Block, blocks

HOW_TO = ROOT / "docs" / "how-to" / "tuning.md"
REFERENCE = ROOT / "docs" / "reference" / "scenario-format.md"
COMMAND = "python -m stalwart tune"
FULL = bool(os.environ.get("STALWART_TUNE_FULL"))
# The runs of an hour of traffic: a minute of CPU each (and the overload's nine settings,
# the long tail's seven minutes at 50 calls/s).
SLOW = (
    COMMAND,
    f"{COMMAND} --scenario hang",
    f"{COMMAND} --scenario overload",
    f"{COMMAND} --scenario long-tail",
)


def _title(block: Block) -> str | None:
    for part in shlex.split(block.info)[1:]:
        if part.startswith("title="):
            return part[len("title=") :]
    return None


def _runs() -> list[object]:
    found: list[object] = []
    for block in blocks(HOW_TO):
        title = _title(block)
        if (
            block.lang == "text"
            and title is not None
            and title.startswith(COMMAND)
            and "--live" not in title  # real time against a server: its figures vary
        ):
            slow = title in SLOW
            marks = (
                [pytest.mark.skipif(not FULL, reason="a minute of CPU: STALWART_TUNE_FULL=1")]
                if slow
                else []
            )
            found.append(pytest.param(title, block.code, id=title, marks=marks))
    return found


def _files() -> dict[str, str]:
    return {
        title: block.code
        for block in blocks(HOW_TO)
        if block.lang == "toml" and (title := _title(block)) is not None
    }


def test_the_how_to_shows_outputs_to_check() -> None:
    assert len(_runs()) >= 4


def test_the_how_to_shows_the_breakers_own_scenario() -> None:
    titles = [p.values[0] for p in _runs()]  # type: ignore[attr-defined]
    assert f"{COMMAND} --scenario hang" in titles


@pytest.mark.parametrize(("command", "expected"), _runs())
def test_the_how_to_shows_what_the_command_prints(
    command: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _files()
    args = []
    for arg in shlex.split(command)[len(shlex.split(COMMAND)) :]:
        if arg in files:
            (tmp_path / arg).write_text(files[arg])
            arg = str(tmp_path / arg)
        args.append(arg)
    assert main(["tune", *args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert [line.rstrip() for line in printed.splitlines()] == expected.splitlines()


def test_the_reference_example_is_a_valid_scenario() -> None:
    (example,) = [b for b in blocks(REFERENCE) if b.lang == "toml"]
    scenario = parse_text(example.code, name="example")
    assert len(scenario.settings) == 2 * 4 * 3


def test_the_how_to_plot_is_committed() -> None:
    png = ROOT / "docs" / "how-to" / "img" / "tune-outage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(img/tune-outage.png)" in HOW_TO.read_text(encoding="utf-8")
