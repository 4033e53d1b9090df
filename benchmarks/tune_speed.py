"""How fast ``python -m stalwart tune`` simulates: calls per wall second.

python benchmarks/tune_speed.py            # the built-in outage scenario, as shipped
python benchmarks/tune_speed.py --quick    # its first 10 minutes, for smoke tests

Runs the scenario's whole grid twice: on one process, and on as many
processes as there are CPUs (``--workers``, the command's default), and
reports simulated calls (and attempts, retries included) per wall second.
The goal: the built-in outage scenario, an hour of traffic at 50 calls/s on
9 settings, in under 60 seconds on 2 CPUs.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stalwart
from stalwart._tune import builtin, schema
from stalwart._tune.engine import Run
from stalwart._tune.runner import default_workers, run_all
from stalwart._tune.scenario import Scenario, from_dict

GOAL_SECONDS = 60.0


def outage(quick: bool) -> Scenario:
    data = copy.deepcopy(schema.loads_toml(builtin.text("outage"), "outage"))
    if quick:
        data["traffic"]["duration"] = 600.0
        data["downstream"]["timeline"] = [
            {"phase": "healthy", "duration": 240.0},
            {"phase": "outage", "duration": 120.0},
            {"phase": "recovery", "duration": 60.0},
            {"phase": "healthy", "duration": 180.0},
        ]
    return from_dict(data, name="outage")


def measure(scenario: Scenario, workers: int) -> tuple[float, list[Run]]:
    started = time.perf_counter()
    runs = run_all(scenario, workers=workers)
    return time.perf_counter() - started, runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 minutes of traffic, not an hour")
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="processes (default: the CPUs)"
    )
    args = parser.parse_args(argv)
    scenario = outage(args.quick)
    settings = len(scenario.settings)
    rows = []
    seconds = 0.0
    for workers in dict.fromkeys((1, args.workers)):
        seconds, runs = measure(scenario, workers)
        calls = sum(sum(run.calls) for run in runs)
        attempts = sum(sum(run.attempts) for run in runs)
        rows.append(
            f"| {workers} | {seconds:.1f} s | {calls:,} | {attempts:,} | "
            f"{calls / seconds:,.0f} | {attempts / seconds:,.0f} |"
        )
    duration = scenario.traffic.duration or 0.0
    print(
        f"stalwart {stalwart.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs ({default_workers()} usable)\n\n"
        f"Built-in scenario 'outage'{' (quick: 10 minutes)' if args.quick else ''}: "
        f"{duration / 60:g} min of traffic at {scenario.traffic.rate:g} calls/s, "
        f"{settings} settings.\n\n"
        "| processes | wall time | calls simulated | attempts | calls/s | attempts/s |\n"
        "|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    if not args.quick:
        verdict = "met" if seconds < GOAL_SECONDS else "MISSED"
        print(
            f"\nGoal, under {GOAL_SECONDS:g} s on 2 CPUs: {seconds:.1f} s on "
            f"{args.workers} process{'es' if args.workers > 1 else ''}, {verdict}."
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
