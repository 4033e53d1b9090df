"""Does the simulation tell the truth? ``tune --live`` against a real service, per setting.

python benchmarks/validate.py             # both scenarios, about 16 minutes
python benchmarks/validate.py --only retry-storm          # one scenario, printed
python benchmarks/validate.py --only retry-storm --setting "attempts=5 budget=off"
nox -s validate                           # the same, and the report written

For the built-in ``retry-storm`` and ``outage`` scenarios, scaled to a minute
of traffic per setting, a real uvicorn service (in a process of its own)
plays the scenario's dependency with `stalwart.testing.FaultInjection`, and
the live runner (``python -m stalwart tune --live``) calls it through
`stalwart.httpx.ResilientTransport` with each setting's policies. Each
setting must give, live, a success rate within 3 points of the simulation's
and a peak load within 15% of it: of the simulation's run, among ten seeds,
nearest to the live one (see `verdicts`), each simulated with the round trip
the live run measured (``downstream.round_trip``). A live run counts only if
its client kept up with the scenario's traffic (`stalwart._tune.live.LATE`);
the client and the service run at a higher scheduling priority than the
machine's other work when permitted (`PRIORITY`), so that a busy machine
does not starve them, and the report gives the load average.
A full run writes the side-by-side tables and the verdicts to
``benchmarks/results/validation.md`` (a partial one prints them, or writes
them to ``--output``); the exit status is 1 when a setting is out of
tolerance.

How the scenarios are scaled (the simulation runs the same scaled files, so
the comparison is like for like): the timeline is cut to a minute, keeping
the healthy lead-in the recovery is measured against; ``retry-storm``
runs at a quarter of the rate on a quarter of the capacity (the same 70%
utilisation), so that its retries stay within what one Python client and one
uvicorn process can send and accept on a shared 2-core machine. Without a
budget, 5 attempts a call put 5.2 times the load on the dependency, each
attempt after a timeout on a new connection: at 50 calls/s (260 attempts/s)
the client started calls up to 20 s late and in bunches, and the service
accepted fewer than half of the attempts before they timed out, so the
simulated dependency's queue emptied in the lulls and calls succeeded that
the scenario's traffic would not let through (+6 to +8 points; the round
trip the live run measured, 60 to 90 ms, said as much). At 25 calls/s the
same setting keeps to the schedule and agrees with the simulation within a
point. A retry budget's floor (``min_per_second``, 10 by default, a tenth of
the built-in's rate) is scaled with the rate, to 2.5: left at 10, it lets 40%
more attempts through at 25 calls/s, 1.55 times the load on a dependency at
70% of its capacity, and the budgets' settings sit on a tipping point
(recovering in most simulated seeds and not in one, nor in a live run) that
the built-in scenario does not have. ``outage`` runs at
20 calls/s: without a retry budget, every call rejected while a breaker is
open retries the moment it closes, and a herd of 500 new connections (50
calls/s for the 10 s of a deadline) takes the uvicorn service's one event
loop over a second to accept on a loaded 2-core machine, a cost of this
harness that the dependency it plays does not have. Its outage lasts 5 s,
recovery included, and ends before any breaker's first trial call (the
slowest to open, at 90% failures within a budget, opens 2 to 4 s into it): a
trial made while the dependency is half-recovered is a coin toss that
decides a whole open period (5 s of calls, 8 points of success), and one
live run cannot agree with one simulated run on a coin toss.

"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.loopback

from stalwart._tune import builtin, schema
from stalwart._tune.engine import simulate
from stalwart._tune.live import LATE, Comparison, compare, with_round_trip
from stalwart._tune.report import DEFAULT_MAX_LOAD, Result, summarize
from stalwart._tune.scenario import Scenario, from_dict

RESULTS = Path(__file__).resolve().parent / "results"
SUCCESS_POINTS = 3.0
PEAK_LOAD_SHARE = 0.15


def scaled(name: str) -> dict[str, Any]:
    """The built-in scenario ``name``, scaled to a minute of traffic."""
    data = schema.loads_toml(builtin.text(name), name)
    data["name"] = f"{name} (1 min)"
    ds = data["downstream"]
    if name == "retry-storm":
        data["description"] = "a minute at 25 calls/s, near capacity; a 10-second slowdown"
        data["traffic"]["rate"] = 25.0
        ds["capacity"], ds["queue"] = 3, 75
        # A budget's floor of retries a second, scaled with the rate: the built-in's
        # default 10 is a tenth of its 100 calls/s; 10 at 25 calls/s would be 40%.
        for retry in data["grid"]["retry"]:
            if "budget" in retry:
                retry["budget"]["min_per_second"] = 2.5
        durations = [20.0, 10.0, 30.0]
    elif name == "outage":
        data["description"] = "a minute at 20 calls/s; the dependency fails every call for 4.5 s"
        data["traffic"]["rate"] = 20.0
        durations = [20.0, 4.5, 0.5, 35.0]
    else:
        raise ValueError(name)
    for phase, duration in zip(ds["timeline"], durations, strict=True):
        phase["duration"] = duration
    return data


def _toml(value: Any, path: str = "") -> str:
    """``value`` (a scenario as parsed) written back as TOML."""
    lines: list[str] = []
    tables: list[tuple[str, Any]] = []
    for key, item in value.items():
        if isinstance(item, dict) or (
            isinstance(item, list) and item and isinstance(item[0], dict) and key == "timeline"
        ):
            tables.append((key, item))
        else:
            lines.append(f"{key} = {_literal(item)}")
    for key, item in tables:
        full = f"{path}.{key}" if path else key
        if isinstance(item, list):
            for entry in item:
                lines.append(f"\n[[{full}]]")
                lines.append(_toml(entry, full).strip())
        else:
            lines.append(f"\n[{full}]")
            lines.append(_toml(item, full).strip())
    return "\n".join(lines) + "\n"


def _literal(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return schema.toml_literal(value)


# -- the service ---------------------------------------------------------------------------


def serve(scenario_file: str) -> None:
    """Run the dependency: uvicorn, FaultInjection playing ``scenario_file``; print the port."""
    import uvicorn

    from benchmarks import loopback
    from stalwart.testing import FaultInjection

    async def ok(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    app = FaultInjection(scenario_file).middleware(ok)
    sock = loopback.listening_socket()
    print(sock.getsockname()[1], flush=True)
    # Keep-alive longer than any breaker's open_for: uvicorn's default (5 s) closes
    # an idle connection just as a 5 s breaker's trial call reuses it, and the
    # trial fails with RemoteProtocolError, which no simulated dependency does.
    config = loopback.config(app, backlog=4096, timeout_keep_alive=120)
    uvicorn.Server(config).run(sockets=[sock])


class Service:
    """The dependency in a process of its own (the client's event loop keeps its own core)."""

    def __init__(self, scenario_file: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(scenario_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        port = self.process.stdout.readline().strip()
        if not port.isdigit():
            self.close()
            raise RuntimeError("the service did not start")
        self.url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30.0
        while True:  # poll until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("the service did not listen within 30 s") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


# -- the comparison ------------------------------------------------------------------------


#: Seeds the simulation runs each setting with: the outcomes it can produce.
SEEDS = range(1, 11)


@dataclasses.dataclass(frozen=True)
class Verdict:
    label: str
    #: the simulation's success rates over `SEEDS`: lowest and highest
    simulated: tuple[float, float]
    live: float
    #: the seed whose run is nearest to the live one, and the differences to it
    seed: int
    points: float
    share: float
    #: how late the live calls started (99th percentile, seconds): past `LATE`, the
    #: client did not play the scenario, and the live run says nothing of the simulation
    late: float = 0.0

    @property
    def played(self) -> bool:
        return self.late <= LATE

    @property
    def within(self) -> bool:
        return (
            self.played
            and abs(self.points) <= SUCCESS_POINTS
            and abs(self.share) <= PEAK_LOAD_SHARE
        )


def verdicts(comparison: Comparison) -> list[Verdict]:
    """Per setting: is the live run one the simulation produces, within tolerance?

    The simulation runs the setting with every seed of `SEEDS`; the live run
    is compared with the nearest of them (success points over 3, peak load
    share over 15%, whichever is further). One run is one draw: where a
    setting's outcome turns on a coin toss (a breaker's trial call, the
    latency it happens to draw while a herd of retries waits), the seeds
    show both sides, and the live run must land on one of them.
    """
    out = []
    short = comparison.scenario
    for live, _ in comparison.pairs():
        index = live.setting.index
        runs = []
        trip = comparison.round_trips.get(index, 0.0)
        for seed in SEEDS:
            seeded = with_round_trip(dataclasses.replace(short, seed=seed), trip)
            runs.append((seed, summarize(seeded, [simulate(seeded, index)]).results[0]))
        assert live.peak_load is not None

        def distance(item: tuple[int, Result], live: Result = live) -> float:
            sim = item[1]
            assert sim.peak_load is not None
            points = abs(live.success_rate - sim.success_rate) * 100.0 / SUCCESS_POINTS
            assert live.peak_load is not None
            share = abs(live.peak_load / sim.peak_load - 1.0) / PEAK_LOAD_SHARE
            return max(points, share)

        seed, nearest = min(runs, key=distance)
        assert nearest.peak_load is not None
        rates = [sim.success_rate for _, sim in runs]
        out.append(
            Verdict(
                label=live.label,
                simulated=(min(rates), max(rates)),
                live=live.success_rate,
                seed=seed,
                points=(live.success_rate - nearest.success_rate) * 100.0,
                share=live.peak_load / nearest.peak_load - 1.0,
                late=comparison.late.get(index, 0.0),
            )
        )
    return out


def chosen(scenario: Scenario, labels: list[str] | None) -> list[int] | None:
    """The indexes of the settings labelled ``labels`` (None: every setting)."""
    if not labels:
        return None
    known = {s.label: s.index for s in scenario.settings}
    missing = [label for label in labels if label not in known]
    if missing:
        raise ValueError(
            f"--setting: {scenario.name} has no setting {', '.join(map(repr, missing))} "
            f"(its settings: {', '.join(map(repr, known))})"
        )
    return [known[label] for label in labels]


def run_one(
    name: str, folder: Path, labels: list[str] | None = None
) -> tuple[Scenario, Comparison]:
    data = scaled(name)
    path = folder / f"{name}.toml"
    path.write_text(_toml(data), encoding="utf-8")
    scenario = from_dict(schema.loads_toml(path.read_text("utf-8"), name), name=name)
    settings = chosen(scenario, labels)
    service = Service(path)
    try:

        def progress(text: str) -> None:
            print(f"… {name} {text}", file=sys.stderr, flush=True)

        comparison = compare(
            scenario,
            service.url,
            settings=settings,
            max_load=DEFAULT_MAX_LOAD,
            progress=progress,
        )
    finally:
        service.close()
    return scenario, comparison


def report(
    results: list[tuple[str, Comparison]],
    seconds: float,
    load: tuple[float, float] | None = None,
    priority: int = 0,
) -> tuple[str, bool]:
    """The report's text, and whether every setting is within tolerance.

    ``load``: the machine's load average (over a minute) when the run started and ended;
    ``priority``: how much higher than the rest the client and the service ran (nice).
    """
    busy = ""
    if load is not None:
        busy = f", load average {load[0]:.1f} at the start and {load[1]:.1f} at the end"
    if priority:
        busy += f", client and service at nice -{priority}"
    lines = [
        "# Validation: the simulation against a real service",
        "",
        f"`python benchmarks/validate.py` on {platform.node() or 'this machine'} "
        f"({platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}, {os.cpu_count()} cores{busy}), {seconds / 60:.0f} minutes. "
        "Each setting is played live "
        "(`tune --live`: real uvicorn service behind `FaultInjection`, real httpx "
        "client through `ResilientTransport`, real time) and simulated on the same scaled "
        f"scenario. Tolerances: success within {SUCCESS_POINTS:g} points, peak load within "
        f"{PEAK_LOAD_SHARE:.0%}, of the simulation's run nearest to the live one among "
        f"seeds {SEEDS[0]} to {SEEDS[-1]} (the table shows seed 1's). A live run counts "
        f"only if its client kept up: one call in a hundred at most {LATE * 1e3:.0f} ms "
        "late.",
        "",
    ]
    all_ok = True
    for name, comparison in results:
        lines += [f"## {name}", "", "```text", comparison.table().rstrip(), "```", ""]
        lines += [
            f"| setting | success, simulated (seeds {SEEDS[0]}-{SEEDS[-1]}) | success, live "
            "| nearest seed | success, live - it | peak load, live / it - 1 "
            "| calls late (p99) | within |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for v in verdicts(comparison):
            all_ok &= v.within
            low, high = v.simulated
            lines.append(
                f"| {v.label} | {low:.1%} to {high:.1%} | {v.live:.1%} | {v.seed} "
                f"| {v.points:+.1f} pt | {v.share:+.1%} | {v.late * 1e3:.0f} ms "
                f"| {'yes' if v.within else 'NO' if v.played else 'NO (not played on time)'} |"
            )
        lines.append("")
    lines.append(
        "All settings within tolerance." if all_ok else "**Some settings are out of tolerance.**"
    )
    return "\n".join(lines) + "\n", all_ok


#: How much higher than the machine's other work the client and the service run.
PRIORITY = 10


def _priority() -> int:
    """Raise this process's scheduling priority (the service inherits it); by how much.

    The comparison is of the simulation with the scenario played on time: on
    a machine busy with other work, a client and a service at the common
    priority fall behind the traffic (see `stalwart._tune.live.LATE`), and
    the run says more about the machine than about the model. Without the
    permission to (not root, no CAP_SYS_NICE), 0: they run as they are.
    """
    try:
        os.nice(-PRIORITY)
    except (OSError, AttributeError):
        return 0
    return PRIORITY


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--serve", metavar="SCENARIO.toml", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=("retry-storm", "outage"))
    parser.add_argument(
        "--setting",
        action="append",
        metavar="LABEL",
        help="only the setting with this label (with --only; may be repeated), "
        'e.g. "attempts=5 budget=off"',
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="where to write the report (default: benchmarks/results/validation.md for a full "
        "run; a partial one, with --only or --setting, is printed and written only here)",
    )
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.setting and not args.only:
        parser.error("--setting needs --only (the scenario whose setting it is)")
    names = [args.only] if args.only else ["retry-storm", "outage"]
    priority = _priority()
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            try:
                _, comparison = run_one(name, Path(folder), args.setting)
            except ValueError as exc:
                parser.error(str(exc))
            results.append((name, comparison))
            print(comparison.table(), flush=True)
    load = (load_before, os.getloadavg()[0])
    text, ok = report(results, time.monotonic() - started, load, priority)
    output = args.output
    if output is None and not args.only:
        output = RESULTS / "validation.md"
    if output is None:
        print(text, flush=True)
    else:
        output.write_text(text, encoding="utf-8")
        print(f"report written to {output}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
