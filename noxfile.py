"""Development tasks: ``nox -s tests lint typecheck`` before every commit.

Sessions run with the interpreter that runs nox (Python 3.11+).
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_venv = "yes"
nox.options.error_on_external_run = True


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (asyncio and trio, virtual time; Redis for its tests)."""
    session.install("-e", ".[dev]")
    # Two workers, each taking whole files (a file's module fixtures, such as
    # its worker processes or its Redis Cluster, start once): the real-time
    # tests mostly wait, and the suite stays within five minutes on 2 cores.
    # `nox -s tests -- -n 0` runs in one process.
    session.run(
        "python",
        "-m",
        "pytest",
        "-n",
        os.environ.get("STALWART_TEST_WORKERS", "2"),
        "--dist",
        "loadfile",
        *session.posargs,
        env={"REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")},
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install("ruff>=0.5")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, its tests and benchmarks."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, stalwart beside its peers, as ratios (``-- --quick``, ``-- --no-fail``).

    Writes the report and its chart to ``benchmarks/results/``; fails when a
    peer is missing or a budget is missed.
    """
    session.install("-e", ".[dev]")
    session.install("-r", "benchmarks/requirements.txt")
    session.run("python", "benchmarks/run.py", "--require-peers", *session.posargs)


@nox.session
def validate(session: nox.Session) -> None:
    """The simulation against a real service: ``tune --live`` beside it, per setting.

    About 16 minutes (two scenarios scaled to a minute per setting); writes
    ``benchmarks/results/validation.md``; fails when a setting's success rate
    or peak load is out of tolerance (``-- --only retry-storm`` for one).
    """
    session.install("-e", ".[dev]")
    session.run("python", "benchmarks/validate.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site in strict mode (warnings are errors)."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def demo(session: nox.Session) -> None:
    """A short tour: a flaky call made reliable, in virtual time."""
    session.install("-e", ".")
    session.run("python", "-m", "stalwart", "demo", *session.posargs)


@nox.session
def tune(session: nox.Session) -> None:
    """Simulate an outage against a grid of settings: ``python -m stalwart tune``."""
    session.install("-e", ".[tune]")
    session.run("python", "-m", "stalwart", "tune", *session.posargs)
