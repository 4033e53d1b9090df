from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stalwart", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_help_lists_the_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_the_demo_shows_the_pipeline_beating_the_bare_call() -> None:
    out = run("demo", "--calls", "200")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if "/200 ok" in line}
    bare_ok = int(lines["unprotected"].split()[1].split("/")[0])
    guarded_ok = int(lines["stalwart"].split()[1].split("/")[0])
    assert guarded_ok > bare_ok
    assert "stalwart_retry_attempts_total" in out.stdout


def test_bad_arguments_exit_with_2() -> None:
    out = run("demo", "--calls", "0")
    assert out.returncode == 2
    assert "--calls" in out.stderr
