"""The test suite's own set-up: a Redis found or started, hypothesis made deterministic.

A suite that skips its Redis tests on a fresh machine, or that draws new
hypothesis examples on every run, is a suite whose green means little.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

from . import redis_support

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.realtime


def test_hypothesis_runs_the_same_examples_every_time() -> None:
    if os.environ.get("HYPOTHESIS_PROFILE", "ci") != "ci":
        pytest.skip("another hypothesis profile was asked for")
    current = settings.default
    assert current is not None
    assert current.derandomize
    assert current.database is None
    assert current.deadline is None


def test_every_hypothesis_test_keeps_the_profiles_determinism() -> None:
    """Tests may size their runs (max_examples), never undo what the profile fixes."""
    undoing = re.compile(r"\b(derandomize|database|deadline|seed)\s*=")
    offenders = [
        f"{path.name}:{number}"
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        if path.name != Path(__file__).name
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "settings(" in line and undoing.search(line)
    ]
    assert not offenders


def test_free_ports_are_below_55535() -> None:
    assert all(20_000 <= redis_support.free_port() < 55_535 for _ in range(50))


def _runs_redis_server(pid: int) -> bool:
    try:
        return "redis-server" in Path(f"/proc/{pid}/comm").read_text()
    except OSError:
        return False


def test_without_a_redis_the_suite_starts_its_own_and_stops_it() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    nowhere = f"redis://127.0.0.1:{redis_support.free_port()}/0"  # nothing listens there
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider"),
            "tests/test_redis_store.py::test_a_first_run_under_contention_still_runs_once",
        ],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": nowhere, "CI": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    started = re.search(r"redis: started redis-server \(pid (\d+)\) at (\S+)", done.stdout)
    assert started is not None, done.stdout
    assert "1 passed" in done.stdout
    assert not _runs_redis_server(int(started[1]))  # stopped at the end of the session
    assert not redis_support.answers(started[2], within=0.5)


def test_a_hung_test_fails_with_every_threads_stack(
    pytestconfig: pytest.Config, tmp_path: Path
) -> None:
    """A hang fails its test in bounded time, showing where it hung, instead of hanging CI."""
    assert 0 < float(pytestconfig.getini("timeout")) <= 600
    method = pytestconfig.getini("timeout_method")
    assert method == "signal"  # the test fails and its fixtures' teardown runs
    hung = tmp_path / "test_hung.py"
    hung.write_text(
        "import threading\n"
        "import pytest\n\n"
        "@pytest.fixture\n"
        "def started(tmp_path_factory):\n"
        "    yield\n"
        "    open('teardown-ran', 'w').close()\n\n"
        "def waits_for_a_reply_that_never_comes():\n"
        "    threading.Event().wait()\n\n"
        "def test_hangs(started):\n"
        "    waits_for_a_reply_that_never_comes()\n\n"
        "def test_after_it():\n"
        "    pass\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(hung)),
            *("-o", "timeout=2", "-o", f"timeout_method={method}"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Timeout" in output
    assert "waits_for_a_reply_that_never_comes" in output
    assert "1 failed, 1 passed" in output  # the suite went on
    assert (tmp_path / "teardown-ran").exists()  # what the test started is stopped


def test_a_silent_worker_fails_its_read_and_leaves_no_thread_behind() -> None:
    """A worker process that never answers fails the read; the loop can still close.

    (The thread reading its stdout would otherwise block the event loop's
    shutdown, which waits for it, and hang the suite.)
    """
    silent = ("-n", "1", "-r", "1", "import time; time.sleep(600)")
    worker = redis_support.WorkerProcess("timeit", *silent, timeout=0.5)
    try:
        with pytest.raises(AssertionError, match=r"said nothing for 0\.5 s"):
            asyncio.run(worker.read())  # returns only once its executor's threads ended
        assert not worker.alive
    finally:
        worker.kill()
