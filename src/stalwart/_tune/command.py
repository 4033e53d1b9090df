"""``python -m stalwart tune``: the options, and what running it does.

Exit codes: 0 done; 2 a bad scenario file or bad arguments, an unreachable
``--live`` service, or metrics ``--calibrate`` cannot use (a message, never
a traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import IO, Any

from . import builtin, schema
from .report import DEFAULT_MAX_LOAD, WINDOW

__all__ = ["DESCRIPTION", "EPILOG", "configure", "run"]

DESCRIPTION = """\
Simulate a downstream failure profile against a grid of policy settings, in
virtual time, and print per setting: success rate, latency seen by callers,
load on the downstream (attempts per call, peak load during the incident),
time to detect the outage and to recover after it, and time spent open.

Each setting runs the real stalwart policies (Retry, RetryBudget,
AdaptiveThrottle, CircuitBreaker, ConcurrencyLimit, Bulkhead, Timeout, in a
Pipeline) against a simulated dependency on a virtual clock: an hour of
traffic takes seconds, and the same scenario and seed always give the same
numbers. With no scenario, the first built-in one runs ("outage").
"""


def _epilog() -> str:
    keys = "\n".join(schema.help_summary())
    return f"""\
columns:
  success        share of calls that returned (the callers' view)
  p50/p99/p99.9  latency of calls, failed ones included
  attempts/call  attempts that reached the downstream, per call
  peak load      highest attempts/call over {WINDOW} s windows during the incident
                 (1.00x: the load without retries)
  detect         start of the outage to the breaker's first opening
  recover        end of the outage to the first {WINDOW} s in which calls succeed
                 as often as before it
  open           time the breaker spent rejecting calls

ranking: settings whose peak load stays within --max-load first; then higher
success (under 0.1 point apart: a tie), lower peak load (or attempts/call
when nothing fails; within 5%: a tie), lower p99.

scenario files are TOML; most keys have defaults. A sketch:

  name = "payments"
  [traffic]
  rate = 200.0                         # calls per second
  [downstream]
  latency = {{ median = 0.05, p99 = 0.4 }}
  capacity = 64
  [[downstream.timeline]]
  phase = "healthy"
  duration = 600.0
  [[downstream.timeline]]
  phase = "outage"
  duration = 120.0
  [grid]                               # a list anywhere = alternatives to compare
  timeout = [0.5, 2.0]
  retry = {{ attempts = [2, 4], budget = [false, {{ ratio = 0.1 }}] }}
  breaker = {{ failure_rate = 0.5, open_for = [5.0, 30.0] }}

every key: type (default), then its meaning
{keys}

Start from a built-in: python -m stalwart tune --scenario outage --print-scenario
Start from your metrics: python -m stalwart tune --calibrate http://HOST/metrics
Check against a real service: python -m stalwart tune SCENARIO.toml --live URL --speed 10
Full reference: docs/reference/scenario-format.md

exit codes: 0 done, 2 bad scenario or arguments (or an unreachable --live URL,
or metrics --calibrate cannot read), 130 interrupted
"""


EPILOG = _epilog()


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``tune`` options to its (sub)parser."""
    parser.add_argument(
        "file",
        nargs="?",
        metavar="SCENARIO.toml",
        help="the scenario to simulate (default: the built-in 'outage' scenario)",
    )
    parser.add_argument(
        "--scenario",
        metavar="NAME",
        help=f"run a built-in scenario instead: {', '.join(builtin.NAMES)}",
    )
    parser.add_argument("--list", action="store_true", help="list the built-in scenarios and exit")
    parser.add_argument(
        "--print-scenario",
        action="store_true",
        help="print the scenario's TOML and exit (a starting point for your own)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )
    parser.add_argument(
        "--plot",
        metavar="FILE.png",
        help="also draw the best and worst settings over time into this PNG (needs matplotlib)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", help="seed of every random draw (default: the scenario's)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="processes to simulate settings on (default: one per CPU); "
        "the numbers do not depend on it",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=DEFAULT_MAX_LOAD,
        metavar="X",
        help="settings whose peak load on the downstream exceeds X times the load without "
        f"retries rank last (default: {DEFAULT_MAX_LOAD:g})",
    )
    live = parser.add_argument_group(
        "against a real service",
        "play the scenario's traffic against a real HTTP service (one playing the dependency, "
        "e.g. behind stalwart.testing.FaultInjection reading the same scenario), through "
        "ResilientTransport, and print the table measured beside the simulation's",
    )
    live.add_argument(
        "--live",
        metavar="URL",
        help="the service to call (GET URL); every attempt carries x-stalwart-faults: "
        "its position on the scenario's timeline, in seconds",
    )
    live.add_argument(
        "--speed",
        type=float,
        metavar="X",
        help="with --live: shorten the timeline (traffic duration and phases) X times; "
        "rates, latencies and settings are unchanged (default: 1, real time)",
    )
    live.add_argument(
        "--setting",
        metavar="NAME",
        help="with --live: play only this setting (its label as the table shows it, "
        "or its number in the grid, from 1)",
    )
    calibration = parser.add_argument_group(
        "from your metrics",
        "print a [downstream] table (latency median and p99, error rate) measured from a "
        "Prometheus latency histogram",
    )
    calibration.add_argument(
        "--calibrate",
        metavar="FILE|URL",
        help="a Prometheus text exposition: a file, or a /metrics URL",
    )
    calibration.add_argument(
        "--metric",
        metavar="NAME",
        help="with --calibrate: the histogram to read (default: OpenTelemetry's "
        "http.client.request.duration, else the only *_seconds histogram)",
    )
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress",
        dest="progress",
        action="store_const",
        const=True,
        help="show a progress bar on stderr (default: when stderr is a terminal)",
    )
    shown.add_argument(
        "--no-progress",
        dest="progress",
        action="store_const",
        const=False,
        help="never show the progress bar",
    )


def _fail(err: IO[str], message: str) -> int:
    err.write(f"python -m stalwart tune: error: {message}\n")
    return 2


def run(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    """Do what the parsed ``args`` ask; return the exit code."""
    from .scenario import ScenarioError, load, parse_text

    if args.calibrate is not None:
        return _calibrate(args, out, err)
    if args.metric is not None:
        return _fail(err, "--metric needs --calibrate")
    for option in ("speed", "setting"):
        if getattr(args, option) is not None and args.live is None:
            return _fail(err, f"--{option} needs --live")
    if args.live is not None:
        problem = _live_problem(args)
        if problem is not None:
            return _fail(err, problem)
    if args.list:
        width = max(len(name) for name in builtin.NAMES)
        for name in builtin.NAMES:
            out.write(f"{name.ljust(width)}  {builtin.description(name)}\n")
        return 0
    if args.file is not None and args.scenario is not None:
        return _fail(err, "give a scenario file or --scenario NAME, not both")
    if args.scenario is not None and args.scenario not in builtin.NAMES:
        return _fail(
            err,
            f"no built-in scenario {args.scenario!r}"
            f"{schema._did_you_mean(args.scenario, builtin.NAMES)}; "
            f"they are: {', '.join(builtin.NAMES)}",
        )
    if args.seed is not None and args.seed < 0:
        return _fail(err, f"--seed must be >= 0, got {args.seed}")
    if args.workers is not None and args.workers < 1:
        return _fail(err, f"--workers must be >= 1, got {args.workers}")
    if not (math.isfinite(args.max_load) and args.max_load > 0):
        return _fail(err, f"--max-load must be a number > 0, got {args.max_load:g}")

    name = args.scenario or builtin.NAMES[0]
    try:
        if args.file is not None:
            scenario = load(args.file)
        else:
            scenario = parse_text(
                builtin.text(name), name=name, source=f"built-in scenario {name!r}"
            )
    except ScenarioError as exc:
        err.write(f"python -m stalwart tune: error: {exc.render()}\n")
        return 2
    if args.print_scenario:
        text = builtin.text(name) if args.file is None else Path(args.file).read_text("utf-8")
        out.write(text)
        return 0
    if args.seed is not None:
        scenario = dataclasses.replace(scenario, seed=args.seed)

    if args.plot is not None:
        from .plot import PlotUnavailable, require_matplotlib

        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            return _fail(err, str(exc))
        folder = Path(args.plot).resolve().parent
        if not folder.is_dir():
            return _fail(err, f"cannot write {args.plot}: no such directory {folder}")

    if args.live is not None:
        return _live(args, scenario, out, err)

    from .report import summarize
    from .runner import ProgressBar, default_workers, run_all

    show = args.progress if args.progress is not None else err.isatty()
    bar = ProgressBar(err, len(scenario.settings), f"tune {scenario.name}") if show else None
    workers = args.workers if args.workers is not None else default_workers()
    try:
        runs = run_all(scenario, workers=workers, progress=bar)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        err.write("interrupted\n")
        return 130
    if bar is not None:
        bar.close()
    report = summarize(scenario, runs, max_load=args.max_load)
    if args.json:
        out.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        out.write(report.table())
    out.flush()
    if args.plot is not None:
        from .plot import write_plot

        try:
            write_plot(report, args.plot)
        except OSError as exc:
            return _fail(err, f"cannot write {args.plot}: {exc.strerror or exc}")
        err.write(f"plot written to {args.plot}\n")
    return 0


def _calibrate(args: argparse.Namespace, out: IO[str], err: IO[str]) -> int:
    from .calibrate import CalibrationError, calibrate, read_source

    if args.live is not None or args.file is not None or args.scenario is not None:
        return _fail(err, "--calibrate reads metrics, not a scenario: give it alone")
    try:
        text = read_source(args.calibrate)
        calibration = calibrate(text, source=args.calibrate, metric=args.metric)
    except CalibrationError as exc:
        return _fail(err, str(exc))
    if args.json:
        out.write(
            json.dumps(
                {
                    "source": calibration.source,
                    "metric": calibration.metric,
                    "requests": calibration.requests,
                    "errors": calibration.errors,
                    "downstream": {
                        "latency": {"median": calibration.median, "p99": calibration.p99},
                        "error_rate": calibration.error_rate,
                        "error_latency": calibration.error_latency,
                    },
                },
                indent=2,
            )
            + "\n"
        )
    else:
        out.write(calibration.toml())
    return 0


def _live_problem(args: argparse.Namespace) -> str | None:
    from urllib.parse import urlsplit

    url = urlsplit(args.live)
    if url.scheme not in ("http", "https") or not url.netloc:
        return f"--live needs an http:// or https:// URL, got {args.live!r}"
    if args.speed is not None and not (math.isfinite(args.speed) and args.speed > 0):
        return f"--speed must be a number > 0, got {args.speed:g}"
    if args.plot is not None:
        return "--plot draws simulated runs: it cannot be used with --live"
    return None


def _live(args: argparse.Namespace, scenario: Any, out: IO[str], err: IO[str]) -> int:
    from .live import compare, write_progress

    indexes = None
    if args.setting is not None:
        labels = [setting.label for setting in scenario.settings]
        if args.setting in labels:
            indexes = [labels.index(args.setting)]
        elif args.setting.isdigit() and 1 <= int(args.setting) <= len(labels):
            indexes = [int(args.setting) - 1]
        else:
            listed = "; ".join(f"{i}: {label}" for i, label in enumerate(labels, 1))
            return _fail(err, f"no setting {args.setting!r} in the grid; they are {listed}")
    import httpx

    try:
        httpx.get(args.live, timeout=10.0)  # without the header: the service as it is
    except httpx.HTTPError as exc:
        return _fail(err, f"cannot reach {args.live}: {exc or type(exc).__name__}")
    show = args.progress if args.progress is not None else err.isatty()
    try:
        comparison = compare(
            scenario,
            args.live,
            speed=args.speed or 1.0,
            settings=indexes,
            max_load=args.max_load,
            progress=write_progress(err) if show else None,
        )
    except KeyboardInterrupt:
        err.write("interrupted\n")
        return 130
    if args.json:
        out.write(json.dumps(comparison.to_json(), indent=2) + "\n")
    else:
        out.write(comparison.table())
    return 0
