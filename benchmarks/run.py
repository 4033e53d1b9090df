"""Run the benchmarks and print a markdown table of ratios.

python benchmarks/run.py            # full run
python benchmarks/run.py --quick    # a few seconds, for smoke tests
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import stalwart
from benchmarks import _harness, hot_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, to check it works")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--calls", type=int, default=None, help="calls per case per round")
    parser.add_argument("--output", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 25)
    calls = args.calls or (200 if args.quick else 20_000)

    cases = hot_path.cases()
    _harness.run(cases, rounds=rounds, n=calls)
    header = (
        f"stalwart {stalwart.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; {rounds} interleaved rounds of "
        f"{calls:,} calls, medians"
    )
    memory = ["| item | bytes | budget | |", "|---|---:|---:|---|"]
    for item, size, budget in hot_path.breaker_memory():
        verdict = "" if budget is None else ("ok" if size <= budget else "**over**")
        limit = "" if budget is None else f"≤ {budget:g}"
        memory.append(f"| {item} | {size:,.0f} | {limit} | {verdict} |")
    report = f"{header}\n\n{_harness.table(cases)}\n\nMemory (tracemalloc)\n\n" + (
        "\n".join(memory) + "\n"
    )
    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
