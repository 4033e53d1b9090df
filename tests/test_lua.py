"""The Lua scripts' files and their loader: fragments written once, included once.

Pure: no Redis here (the scripts run against a real Redis in test_redis_*.py
and test_gcra_redis.py).
"""

from __future__ import annotations

import re
from importlib.resources import files

import pytest

from stalwart._lua import expand, source

LUA = files("stalwart._lua")
SCRIPTS = sorted(
    p.name.removesuffix(".lua")
    for p in LUA.iterdir()
    if p.name.endswith(".lua") and not p.name.startswith("_")
)
FRAGMENTS = sorted(
    p.name.removesuffix(".lua")
    for p in LUA.iterdir()
    if p.name.endswith(".lua") and p.name.startswith("_")
)


def test_an_include_line_stands_for_its_fragment_and_the_rest_is_kept() -> None:
    texts = {"main": "a\n--#include _f\nb\n", "_f": "f1\nf2\n"}
    assert expand("main", texts.__getitem__) == "a\nf1\nf2\nb\n"


def test_a_fragment_named_twice_or_by_two_fragments_is_written_once() -> None:
    texts = {
        "main": "--#include _clock\n--#include _circuit\n--#include _clock\nbody\n",
        "_circuit": "--#include _clock\ncircuit\n",
        "_clock": "clock\n",
    }
    assert expand("main", texts.__getitem__) == "clock\ncircuit\nbody\n"


def test_fragments_that_include_each_other_end() -> None:
    texts = {
        "main": "--#include _a\nmain\n",
        "_a": "--#include _b\na\n",
        "_b": "--#include _a\nb\n",
    }
    assert expand("main", texts.__getitem__) == "b\na\nmain\n"


def test_only_a_whole_include_line_includes() -> None:
    texts = {"main": "x = 1 --#include _f\n-- #include _f\n--#include _f extra\n"}
    assert expand("main", texts.__getitem__) == texts["main"]


def test_a_missing_fragment_is_an_error() -> None:
    with pytest.raises(FileNotFoundError):
        source("_no_such_fragment_")


def test_the_store_scripts_and_their_fragments_are_files() -> None:
    assert "gcra" in SCRIPTS
    assert {"claim", "transition", "acquire_trial", "release_trial", "release"} <= set(SCRIPTS)
    assert FRAGMENTS == ["_circuit", "_clock"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_is_expanded_with_each_shared_function_defined_once(name: str) -> None:
    text = source(name)
    assert not re.search(r"^--#include", text, re.MULTILINE)
    defined = re.findall(r"^local function (\w+)", text, re.MULTILINE)
    assert len(defined) == len(set(defined)), defined


@pytest.mark.parametrize("function", ["now_ms", "given_up", "record", "change"])
def test_a_shared_function_is_written_in_one_file(function: str) -> None:
    pattern = re.compile(rf"^local function {function}\(", re.MULTILINE)
    written = [
        p.name for p in LUA.iterdir() if p.name.endswith(".lua") and pattern.search(p.read_text())
    ]
    assert len(written) == 1, written


def test_the_scripts_that_take_something_share_the_clock_and_the_given_up_check() -> None:
    clock = source("_clock")
    for name in ("claim", "acquire_trial"):
        assert clock in source(name)
        assert "given_up(now, ARGV[5]" in source(name)
