"""``tune --live``: a scenario's traffic against a small real server, beside the simulation.

The server is uvicorn on its own thread, playing the scenario's dependency
with FaultInjection; the runs are a few seconds of real time.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.__main__ import main
from stalwart._faults import FAULTS_HEADER
from stalwart._matchers import Matcher
from stalwart._tune.engine import simulate
from stalwart._tune.live import (
    LATE,
    Comparison,
    arrivals,
    drain_time,
    failed,
    overloaded,
    play,
    shortened,
)
from stalwart._tune.report import _secs, summarize
from stalwart._tune.scenario import parse_text
from stalwart.httpx import RetryableStatusError
from stalwart.testing import FaultInjection

from .http_support import plain, serve

pytestmark = pytest.mark.realtime

SCENARIO = """\
name = "tiny"
description = "3 s at 40 calls/s; failing for the middle second"
[traffic]
rate = 40.0
deadline = 2.0
[downstream]
latency = { median = 0.010, p99 = 0.030 }
error_rate = 0.0
capacity = 20
queue = 20
[[downstream.timeline]]
phase = "healthy"
duration = 1.0
[[downstream.timeline]]
phase = "outage"
duration = 1.0
[[downstream.timeline]]
phase = "healthy"
duration = 1.0
[grid]
timeout = 1.0  # a healthy attempt takes 10 ms: only a machine far too busy makes it fail
retry = [{ attempts = 1 }, { attempts = 3, backoff = { initial = 0.01, maximum = 0.05 } }]
"""


@pytest.fixture(scope="module")
def scenario_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("live") / "tiny.toml"
    path.write_text(SCENARIO)
    return path


@pytest.fixture(scope="module")
def faults(scenario_file: Path) -> FaultInjection:
    return FaultInjection(scenario_file)


@pytest.fixture(scope="module")
def url(faults: FaultInjection) -> Iterator[str]:
    with serve(faults.middleware(plain)) as base:
        yield base + "/"


def tune(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["tune", *args, "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_live_prints_each_setting_measured_beside_the_simulation(
    url: str, scenario_file: Path, faults: FaultInjection, capsys: pytest.CaptureFixture[str]
) -> None:
    before = faults.statistics().requests
    code, out, err = tune(capsys, "--live", url, str(scenario_file))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "Scenario 'tiny': 3 s at 40 calls/s; failing for the middle second"
    assert f"live against {url} (real time)" in lines[2]
    header = lines[4].split()
    assert header[:4] == ["#", "setting", "run", "success"]
    assert "peak load" in lines[4]
    rows = lines[5:11]
    assert [row.split()[2 if i % 3 == 0 else 0] for i, row in enumerate(rows)] == [
        "live",
        "sim",
        "diff",
    ] * 2
    labels = {rows[0].split()[1], rows[3].split()[1]}
    # A legend line for every column shown, the run column's first.
    legend = lines[12 : lines.index("", 12)]
    assert [line.split("  ")[1] for line in legend] == [
        "run",
        "success",
        "p50 p99 p99.9",
        "attempts/call",
        "peak load",
        "recover",
    ]
    assert "diff: live minus sim" in legend[0]
    assert labels == {"attempts=1", "attempts=3"}
    # The service saw the traffic: about 120 calls per setting, more with retries.
    assert faults.statistics().requests - before > 200
    assert lines[-2].startswith("Live: Recommended: ")
    assert lines[-1].startswith("Simulated: Recommended: ")


def test_live_one_setting_as_json(
    url: str, scenario_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = tune(
        capsys, "--live", url, str(scenario_file), "--setting", "attempts=1", "--json"
    )
    assert code == 0
    data = json.loads(out)
    (live,) = data["live"]["settings"]
    (simulated,) = data["simulated"]["settings"]
    assert live["label"] == simulated["label"] == "attempts=1"
    # Without retries, a call fails when its one attempt meets the outage: a third.
    assert live["success_rate"] == pytest.approx(simulated["success_rate"], abs=0.15)
    assert live["attempts_per_call"] == 1.0


def test_live_speed_shortens_the_timeline(
    url: str, scenario_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = tune(capsys, "--live", url, str(scenario_file), "--speed", "2", "--setting", "2")
    assert code == 0
    assert "timeline 2x shorter" in out
    assert "1.5 s of traffic at 40 calls/s" in out
    assert "attempts=3" in out


def test_shortened_divides_every_duration() -> None:
    scenario = parse_text(SCENARIO, name="tiny")
    short = shortened(scenario, 4.0)
    assert short.traffic.duration == 0.75
    assert [(p.start, p.end) for p in short.downstream.timeline] == [
        (0.0, 0.25),
        (0.25, 0.5),
        (0.5, 0.75),
    ]
    assert short.traffic.rate == scenario.traffic.rate
    assert drain_time(short) == pytest.approx((20 / 20 + 1) * 0.03)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--speed", "2"], "--speed needs --live"),
        (["--setting", "x"], "--setting needs --live"),
        (["--live", "ftp://x/"], "--live needs an http:// or https:// URL"),
        (["--live", "http://127.0.0.1:1/", "--speed", "0"], "--speed must be a number > 0"),
        (["--live", "http://127.0.0.1:1/", "--plot", "x.png"], "cannot be used with --live"),
        (["--live", "http://127.0.0.1:1/"], "cannot reach http://127.0.0.1:1/"),
    ],
)
def test_bad_live_arguments_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = tune(capsys, *args)
    assert (code, out) == (2, "")
    assert message in err


def test_an_unknown_setting_lists_the_grid(
    url: str, scenario_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = tune(capsys, "--live", url, str(scenario_file), "--setting", "attempts=9")
    assert code == 2
    assert "no setting 'attempts=9' in the grid; they are 1: attempts=1; 2: attempts=3" in err


def test_live_observes_the_breaker_through_its_listener(url: str) -> None:
    # The same dependency, a setting with a breaker: it opens in the outage
    # (from 1 s to 2 s), and the run's clock starts with its traffic.
    grid = """\
[grid]
timeout = 0.3
retry = false
breaker = { consecutive_failures = 5, open_for = 0.3 }
"""
    scenario = parse_text(SCENARIO[: SCENARIO.index("[grid]")] + grid, name="tiny")
    (setting,) = scenario.settings
    run, _, _ = anyio.run(play, scenario, setting, url)
    assert run.opened_at
    assert 1.0 <= run.opened_at[0] < 1.5
    assert all(1.0 <= t < 2.5 for t in run.opened_at)
    assert 0.3 <= run.time_open <= 1.5
    assert run.outcomes["rejected"] > 0


class Stalling(httpx.AsyncBaseTransport):
    """A client that cannot keep up: each request holds the event loop for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        busy_until = time.perf_counter() + self.seconds
        while time.perf_counter() < busy_until:  # a busy client: the loop runs nothing else
            pass
        return httpx.Response(200, request=request)


def test_a_client_that_cannot_keep_up_is_named(url: str) -> None:
    # 40 calls/s, each holding the loop 50 ms: two seconds of work every
    # second, so calls start later and later behind their schedule.
    scenario = parse_text(SCENARIO, name="tiny")
    setting = scenario.settings[0]
    played = anyio.run(lambda: play(scenario, setting, url, transport=Stalling(0.05)))
    assert played.late > LATE
    assert scenario.traffic.duration is not None
    assert played.run.end > scenario.traffic.duration + 1.0  # the traffic took longer
    summary = summarize(scenario, [played.run])
    comparison = Comparison(
        scenario=scenario,
        url=url,
        speed=1.0,
        live=summary,
        simulated=summary,
        late={setting.index: played.late},
    )
    assert comparison.behind() == ["attempts=1"]
    table = comparison.table()
    assert f"live (late {_secs(played.late)})" in table
    assert "Not played as the scenario says: attempts=1. The client started calls late" in table
    assert comparison.to_json()["late"] == {"attempts=1": played.late}


def test_a_client_a_little_late_is_not_named(url: str) -> None:
    scenario = parse_text(SCENARIO, name="tiny")
    setting = scenario.settings[0]
    summary = summarize(scenario, [simulate(scenario, setting.index)])
    comparison = Comparison(
        scenario=scenario,
        url=url,
        speed=1.0,
        live=summary,
        simulated=summary,
        late={setting.index: LATE},
    )
    assert comparison.behind() == []
    assert "Not played" not in comparison.table()
    assert "live (late" not in comparison.table()


# -- what the grid's adaptive policies read from the service -----------------------------


def status_error(status: int, fault: str | None = None) -> RetryableStatusError:
    request = httpx.Request("GET", "http://service/")
    headers = {} if fault is None else {FAULTS_HEADER: fault}
    response = httpx.Response(status, headers=headers, request=request)
    return RetryableStatusError("failed", request=request, response=response, retry_after=None)


@pytest.mark.parametrize(
    ("error", "is_failure", "is_overload"),
    [
        (status_error(503), True, True),  # a real service's overload
        (status_error(429), True, False),
        (status_error(502), True, False),
        (status_error(503, "overloaded"), True, True),  # FaultInjection's full queue
        (status_error(503, "error"), True, False),  # its injected error, whatever the status
        (status_error(429, "quota"), True, False),
        (httpx.ConnectError("refused"), True, False),
        (
            sw.CircuitOpenError("open", policy="breaker", retry_after=1.0),
            False,
            False,
        ),  # a policy's refusal
        (sw.RateLimitExceeded("limited", policy="rate_limiter"), False, False),
        (sw.DeadlineExceeded("late", policy="timeout", timeout=1.0), False, False),
    ],
)
def test_the_service_failed_or_was_overloaded_as_the_simulation_says(
    error: BaseException, is_failure: bool, is_overload: bool
) -> None:
    assert (failed(error), overloaded(error)) == (is_failure, is_overload)


def test_a_live_setting_gives_the_throttle_and_the_limit_what_the_service_says() -> None:
    scenario = parse_text(
        SCENARIO[: SCENARIO.index("[grid]")] + "[grid]\nthrottle = {}\nconcurrency = {}\n",
        name="tiny",
    )
    (setting,) = scenario.settings
    throttle, limit = setting.policies(
        sw.Telemetry(registry=CollectorRegistry()),
        random.Random(1),
        failure=failed,
        overloaded=overloaded,
    )
    assert isinstance(throttle, sw.AdaptiveThrottle)
    assert isinstance(limit, sw.ConcurrencyLimit)
    rejects, drops = Matcher("failure_on", throttle.failure_on), Matcher("drop_on", limit.drop_on)
    assert rejects(status_error(503, "error"))
    assert rejects(
        sw.DeadlineExceeded("late", policy="timeout", timeout=1.0)
    )  # a timeout, as simulated
    assert not rejects(sw.CircuitOpenError("open", policy="breaker", retry_after=1.0))
    assert drops(status_error(503, "overloaded"))
    assert not drops(status_error(503, "error"))
    assert drops(sw.DeadlineExceeded("late", policy="timeout", timeout=1.0))


class Refusing(httpx.AsyncBaseTransport):
    """A service that is always overloaded: 503 at once."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, request=request)


def test_a_live_run_counts_the_adaptive_policies_refusals_as_rejected(url: str) -> None:
    scenario = parse_text(
        SCENARIO[: SCENARIO.index("[grid]")] + "[grid]\nthrottle = { window = 1.0 }\n",
        name="tiny",
    )
    (setting,) = scenario.settings
    run = anyio.run(lambda: play(scenario, setting, url, transport=Refusing())).run
    # Every answer is a rejection, so the throttle soon refuses most calls itself.
    assert run.rejected_by["throttle"] > 0
    assert run.outcomes["rejected"] == run.rejected_by["throttle"]
    assert run.outcomes["ok"] == 0


SURGES = """\
[traffic]
rate = 20.0
[[traffic.timeline]]
duration = 10.0
[[traffic.timeline]]
duration = 5.0
rate = 80.0
[[traffic.timeline]]
duration = 15.0
[downstream]
latency = { median = 0.01 }
[grid]
timeout = 1.0
"""


def test_live_calls_arrive_when_the_simulations_do_surges_included() -> None:
    scenario = parse_text(SURGES, name="surges")
    run = simulate(scenario, 0)
    times = list(arrivals(scenario.traffic, random.Random("stalwart-tune:1:traffic").expovariate))
    per_second = [0] * len(run.calls)
    for t in times:
        per_second[int(t + 1e-9)] += 1
    assert per_second == run.calls
    in_surge = sum(1 for t in times if 10.0 <= t < 15.0)
    assert in_surge > 1.5 * sum(1 for t in times if t < 10.0)  # 80/s for 5 s, 20/s for 10 s


def test_shortened_divides_the_traffics_timeline_too() -> None:
    short = shortened(parse_text(SURGES, name="surges"), 5.0)
    assert [(p.start, p.end, p.rate) for p in short.traffic.timeline] == [
        (0.0, 2.0, 20.0),
        (2.0, 3.0, 80.0),
        (3.0, 6.0, 20.0),
    ]
    assert short.traffic.duration == 6.0
