"""Run the benchmarks: stalwart and its peers side by side, as ratios.

python benchmarks/run.py                  # full run, written to benchmarks/results/
python benchmarks/run.py --quick          # a few seconds, to check that it works
python benchmarks/run.py --require-peers  # a missing peer is an error (nox -s bench)
python benchmarks/run.py --only "Retry, success" --group Pipeline  # some rows, with their baselines

Prints a Markdown report; a full run (or any run given ``--output``) also
writes it, with a PNG chart of the same name next to it. ``--only`` and
``--group`` time just the rows they select (and the baselines those rows
are compared with), and leave out the scaling and memory sections. The exit status is
1 when a budget is missed (never with ``--quick``, whose numbers are noise,
nor with ``--no-fail``), 2 when ``--require-peers`` finds a peer missing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (
    _harness,
    chart,
    hot_path,
    peer_cases,
    report,
    scaling,
    telemetry_cost,
    trio_cases,
)
from benchmarks._harness import Case

RESULTS = Path(__file__).resolve().parent / "results"


def _phase(message: str) -> None:
    print(f"… {message}", file=sys.stderr, flush=True)


def select(cases: list[Case], names: Sequence[str], groups: Sequence[str]) -> list[Case]:
    """The cases whose name contains one of ``names``, or whose group's title one
    of ``groups`` (case-insensitively), with the baselines they are compared with."""
    names = [text.casefold() for text in names]
    groups = [text.casefold() for text in groups]
    chosen = {
        case.name
        for case in cases
        if not case.is_baseline
        and (
            any(text in case.name.casefold() for text in names)
            or any(text in case.group.casefold() for text in groups)
        )
    }
    # Baselines have baselines of their own (a reference row is measured against
    # a bare await): add them until none is missing.
    while True:
        wanted = {case.baseline for case in cases if case.name in chosen and case.baseline}
        if wanted <= chosen:
            break
        chosen |= wanted
    return [case for case in cases if case.name in chosen]


def measure(args: argparse.Namespace) -> report.Results:
    rounds, calls, sample_ns = args.rounds, args.calls, args.sample_ms * 1e6
    started = time.perf_counter()
    main = hot_path.baselines() + hot_path.cases() + peer_cases.cases()
    on_trio = trio_cases.cases()
    telemetry, scrape = telemetry_cost.cases()
    if args.only or args.group:
        main, on_trio, telemetry = (
            select(cases, args.only, args.group) for cases in (main, on_trio, telemetry)
        )
        if not (main or on_trio or telemetry):
            raise SystemExit(f"error: no row matches --only {args.only} --group {args.group}")
        return _measure_selected(main, on_trio, telemetry, args, started)
    _phase("the hot path on asyncio, stalwart and its peers")
    with peer_cases.configured():
        asyncio.run(_harness.measure(main, rounds=rounds, calls=calls, sample_ns=sample_ns))
    _phase("the same on trio")
    trio_cases.run(on_trio, rounds=rounds, calls=calls, sample_ns=sample_ns)
    _phase("scaling: breaker windows")
    windows = scaling.breaker_scaling(
        quick=args.quick, rounds=rounds, calls=calls, sample_ns=sample_ns
    )
    _phase("scaling: bulkhead queues")
    queues = scaling.bulkhead_scaling(quick=args.quick, rounds=min(rounds, 3), calls=calls)
    _phase("scaling: idempotency keys")
    keys = scaling.idempotency_scaling(quick=args.quick, calls=calls)
    _phase("scaling: rate limiter keys")
    limiter_keys = scaling.rate_limiter_scaling(quick=args.quick, calls=calls)
    _phase("memory per breaker")
    memory = hot_path.breaker_memory(args.quick) + peer_cases.breaker_memory(args.quick)
    _phase("telemetry (last: an explicit tracer provider changes the process)")
    asyncio.run(_harness.measure(telemetry, rounds=rounds, calls=calls, sample_ns=sample_ns))
    return report.Results(
        main=main,
        trio=on_trio,
        telemetry=telemetry,
        scrape_ns=scrape(),
        windows=windows,
        queues=queues,
        keys=keys,
        limiter_keys=limiter_keys,
        memory=memory,
        rounds=rounds,
        calls=calls,
        sample_ms=args.sample_ms,
        seconds=time.perf_counter() - started,
        missing=peer_cases.missing(),
    )


def _measure_selected(
    main: list[Case],
    on_trio: list[Case],
    telemetry: list[Case],
    args: argparse.Namespace,
    started: float,
) -> report.Results:
    """The phases of the selected rows only: no scaling, no memory."""
    rounds, calls, sample_ns = args.rounds, args.calls, args.sample_ms * 1e6
    if main:
        _phase(f"{len(main)} rows on asyncio")
        with peer_cases.configured():
            asyncio.run(_harness.measure(main, rounds=rounds, calls=calls, sample_ns=sample_ns))
    if on_trio:
        _phase(f"{len(on_trio)} rows on trio")
        trio_cases.run(on_trio, rounds=rounds, calls=calls, sample_ns=sample_ns)
    if telemetry:
        _phase(f"{len(telemetry)} telemetry rows")
        asyncio.run(_harness.measure(telemetry, rounds=rounds, calls=calls, sample_ns=sample_ns))
    return report.Results(
        main=main,
        trio=on_trio,
        telemetry=telemetry,
        scrape_ns=None,
        windows=[],
        queues=[],
        keys=[],
        limiter_keys=[],
        memory=[],
        rounds=rounds,
        calls=calls,
        sample_ms=args.sample_ms,
        seconds=time.perf_counter() - started,
        missing=peer_cases.missing(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, to check it works")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (25)")
    parser.add_argument(
        "--calls", type=int, default=None, help="most calls per case per round (20,000)"
    )
    parser.add_argument(
        "--sample-ms", type=float, default=None, help="about how long each sample lasts, in ms (20)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="TEXT",
        help="time only the rows whose name contains TEXT (repeatable), with their baselines",
    )
    parser.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="TEXT",
        help="time only the groups whose title contains TEXT (repeatable), with their baselines",
    )
    parser.add_argument("--output", type=Path, default=None, help="write the report here")
    parser.add_argument(
        "--require-peers", action="store_true", help="fail if a peer is not installed"
    )
    parser.add_argument(
        "--no-fail", action="store_true", help="report missed budgets, exit 0 all the same"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 25)
    args.calls = args.calls or (200 if args.quick else 20_000)
    args.sample_ms = args.sample_ms or (1.0 if args.quick else 20.0)

    missing = peer_cases.missing()
    if missing and args.require_peers:
        print(
            f"error: peers not installed: {', '.join(missing)} "
            "(pip install -r benchmarks/requirements.txt)",
            file=sys.stderr,
        )
        return 2
    for name in missing:
        print(f"note: {name} is not installed: its rows are skipped", file=sys.stderr)

    with warnings.catch_warnings():
        # The peers' own deprecations (datetime.utcnow, ...) are not ours to report.
        peers = "|".join(peer_cases.OPTIONAL)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=rf"({peers})(\.|$)")
        results = measure(args)

    output: Path | None = args.output
    if output is None and not (args.quick or args.only or args.group):
        output = RESULTS / f"{report.result_stem()}.md"
    picture = None
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        picture = output.with_suffix(".png")
        chart.draw(
            [(group, results.main) for group in hot_path.GROUPS]
            + [(telemetry_cost.GROUP, results.telemetry)],
            picture,
        )
    text = report.render(results, chart=picture.name if picture is not None else None)
    print(text)
    if output is not None:
        output.write_text(text, encoding="utf-8")
        print(f"written: {output} and {picture}", file=sys.stderr)
    missed = [check for check in report.checks(results) if not check.ok]
    if missed:
        print(f"{len(missed)} budget(s) missed", file=sys.stderr)
    return exit_status(len(missed), quick=args.quick, no_fail=args.no_fail)


def exit_status(missed: int, *, quick: bool, no_fail: bool) -> int:
    """1 for missed budgets, unless the run is --quick (its numbers are noise) or --no-fail."""
    return 1 if missed and not (quick or no_fail) else 0


if __name__ == "__main__":
    raise SystemExit(main())
