"""``python -m stalwart``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    from ._tune import command as tune_command

    parser = argparse.ArgumentParser(
        prog="python -m stalwart",
        description="stalwart: resilience for async Python services.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="make a flaky dependency reliable, in virtual time (a 10-second tour)",
        description="Calls a simulated flaky dependency with and without a stalwart pipeline "
        "and prints what each achieved. Runs in virtual time: no real waiting.",
    )
    demo.add_argument("--calls", type=int, default=1000, help="calls to make (default: 1000)")
    demo.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    tune = commands.add_parser(
        "tune",
        help="choose retry, breaker and budget settings: simulate a failure profile "
        "against a grid of settings, in virtual time",
        description=tune_command.DESCRIPTION,
        epilog=tune_command.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune_command.configure(tune)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.calls < 1:
            parser.error("--calls must be >= 1")
        from ._demo import main as demo

        demo(calls=args.calls, seed=args.seed)
        return 0
    if args.command == "tune":
        from ._tune.command import run

        return run(args, sys.stdout, sys.stderr)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
