"""The breaker against a small reference model of its rules (hypothesis state machine).

Random sequences of calls (successes, failures, other errors, ignored errors,
base exceptions, slow calls), calls left running and finished later or
cancelled, clock jumps, force_open and reset drive a real breaker on an
asyncio loop in virtual time, and a model written straight from the rules
in plain lists. After every step, the two must agree on the state, the
window's counts, the trial calls, and on every rejection and its
``retry_after``. Times are multiples of 1/8 s, so both sides compute them
exactly.

The model checks every trigger on every outcome it records (successes
included: a time window's rates can rise as old calls leave it); options may
be left out, to check their defaults (``failure_rate`` off when
``consecutive_failures`` is given), and a ``minimum_calls`` that cannot do
what it says must come with a `StalwartWarning`.

It covers the recovery and shadow options too: ``open_for`` as a `Backoff`
(the k-th opening in a row lasts delay k, drawn from a generator seeded like
the breaker's), ``trial_timeout`` (a trial running that long is a failure as
of then, found by the next call or its own end), ``failure_on_result`` (a
returned "bad" is a failure) and ``mode="observe"`` (every predicted
rejection is counted and reported, but the call runs, and counts for
nothing).
"""

from __future__ import annotations

import asyncio
import math
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart._circuit_store import InProcessCircuitStore
from stalwart.events import CallRejected, Event
from stalwart.testing import VirtualClockEventLoop

OUTCOMES = ["success", "failure", "benign", "ignored", "base", "bad"]
COUNTS = {"success": "success", "benign": "success", "failure": "failure"}  # others: neither
SLOW = 1.0


class Failure(Exception):
    pass


class Benign(Exception):
    pass


class Ignored(Exception):
    pass


class Base(BaseException):
    pass


def raise_for(outcome: str) -> None:
    if outcome == "failure":
        raise Failure
    if outcome == "benign":
        raise Benign
    if outcome == "ignored":
        raise Ignored
    if outcome == "base":
        raise Base
    # "bad" returns: a failure if the breaker has failure_on_result


@dataclass
class Model:
    """The rules, written as plainly as possible."""

    failure_rate: float | None
    minimum_calls: int
    consecutive_failures: int | None
    slow_call_duration: float | None
    slow_call_rate: float
    open_for: float
    half_open_calls: int
    size: int | None  # a CountWindow's size, or None for the TimeWindow
    seconds: float = 0.0
    buckets: int = 1
    backoff: sw.Backoff | None = None
    rng: random.Random | None = None
    trial_timeout: float | None = None
    judged: bool = False  # failure_on_result: a "bad" result is a failure
    state: str = "closed"
    open_until: float = 0.0
    forced: bool = False
    period: int = 0  # bumped by every transition but OPEN -> HALF_OPEN
    trials: list[float] = field(default_factory=list)  # their start times
    successes: int = 0
    run: int = 0
    openings: int = 0
    last_period: float | None = None
    rejections: int = 0
    window: list[tuple[float, bool, bool]] = field(default_factory=list)

    def observe(self, now: float) -> None:
        if self.state == "open" and not self.forced and now >= self.open_until:
            self.state = "half_open"

    def held(self, now: float) -> list[tuple[float, bool, bool]]:
        if self.size is not None:
            return self.window[-self.size :]
        width = self.seconds / self.buckets
        current = now // width
        return [c for c in self.window if current - self.buckets < c[0] // width <= current]

    def counts(self, now: float) -> tuple[int, int, int]:
        held = self.held(now)
        return len(held), sum(c[1] for c in held), sum(c[2] for c in held)

    def admit(self, now: float) -> tuple[str, Any]:
        """("closed", None) | ("trial", period) | ("rejected", retry_after)."""
        while True:
            self.observe(now)
            if self.state == "closed":
                return "closed", None
            if self.state == "open":
                self.rejections += 1
                return "rejected", math.inf if self.forced else self.open_until - now
            timeout = self.trial_timeout
            if timeout is not None and self.trials and now - min(self.trials) >= timeout:
                self.open(min(self.trials) + timeout)  # a failure when its time ran out
                continue
            if len(self.trials) < self.half_open_calls:
                self.trials.append(now)
                return "trial", self.period
            self.rejections += 1
            return "rejected", 0.0

    def finish(self, admitted: tuple[str, Any], started: float, now: float, outcome: str) -> None:
        if outcome == "bad":
            outcome = "failure" if self.judged else "success"
        counts = COUNTS.get(outcome)
        slow = (
            counts is not None
            and self.slow_call_duration is not None
            and now - started >= self.slow_call_duration
        )
        kind, period = admitted
        if kind == "rejected":
            return  # let through by observe mode: it counts for nothing
        if kind == "closed":
            if self.state != "closed" or counts is None:
                return
            failed = counts == "failure"
            self.window.append((now, failed, slow))
            self.run = self.run + 1 if failed else 0
            if self.tripped(now):
                self.open(now)
            return
        if period != self.period:
            return
        self.trials.remove(started)
        timeout = self.trial_timeout
        if timeout is not None and now - started >= timeout:
            self.open(started + timeout)
            return
        if counts is None:
            return
        if counts == "failure" or slow:
            self.open(now)
            return
        self.successes += 1
        if self.successes >= self.half_open_calls:
            self.close()

    def tripped(self, now: float) -> bool:
        if self.consecutive_failures is not None and self.run >= self.consecutive_failures:
            return True
        calls, failures, slow = self.counts(now)
        enough = self.minimum_calls if self.size is None else min(self.minimum_calls, self.size)
        if calls < enough:
            return False
        if self.failure_rate is not None and failures / calls >= self.failure_rate:
            return True
        return self.slow_call_duration is not None and slow / calls >= self.slow_call_rate

    def new_period(self, state: str) -> None:
        self.state = state
        self.period += 1
        self.trials = []
        self.successes = 0
        self.forced = False

    def open(self, since: float) -> None:
        self.new_period("open")
        self.openings += 1
        length = self.open_for
        if self.backoff is not None:
            length = self.last_period = self.backoff.delay(
                self.openings, self.last_period, self.rng
            )
        self.open_until = since + length

    def close(self) -> None:
        self.new_period("closed")
        self.window = []
        self.run = 0
        self.openings = 0
        self.last_period = None

    def force_open(self) -> None:
        self.new_period("open")
        self.forced = True
        self.openings = 0


@dataclass
class Running:
    task: asyncio.Task[str]
    admitted: tuple[str, Any]
    started: float
    release: asyncio.Future[str]


durations = st.sampled_from([0.0, 0.125, 0.5, 0.875, 1.0, 1.5])
# Open periods: a number, or a Backoff. Delays of "none" jitter are sums of
# eighths like every time here; jittered ones are not, and are only drawn for
# a breaker without a store (through a store they cross as durations left,
# and come back a rounding away).
backoffs = st.none() | st.builds(
    sw.Backoff,
    initial=st.sampled_from([0.25, 0.5]),
    multiplier=st.sampled_from([1.0, 2.0]),
    maximum=st.sampled_from([0.5, 2.0]),
    jitter=st.sampled_from(["none", "full", "equal", "decorrelated"]),
)
jumps = st.sampled_from([0.125, 0.25, 0.5, 1.0, 2.0, 5.0])


class BreakerMachine(RuleBasedStateMachine):
    time_window = False

    def __init__(self) -> None:
        super().__init__()
        self.loop = VirtualClockEventLoop()
        self.running: list[Running] = []
        self.rejected: list[float | None] = []  # each CallRejected's retry_after

    @initialize(
        failure_rate=st.sampled_from(["default", None, 0.0, 0.25, 0.5, 0.75, 1.0]),
        minimum_calls=st.none() | st.integers(1, 6),
        size=st.integers(1, 8),
        buckets=st.sampled_from([1, 4, 8]),
        consecutive_failures=st.none() | st.integers(1, 3),
        slow=st.booleans(),
        slow_call_rate=st.sampled_from([0.0, 0.5, 1.0]),
        open_for=st.sampled_from([0.0, 0.5, 2.0]),
        half_open_calls=st.integers(1, 3),
        shared=st.booleans(),
        backoff=backoffs,
        seed=st.integers(0, 3),
        trial_timeout=st.sampled_from([None, 0.5, 1.5]),
        judged=st.booleans(),
        observe=st.booleans(),
    )
    def build(
        self,
        failure_rate: float | str | None,
        minimum_calls: int | None,
        size: int,
        buckets: int,
        consecutive_failures: int | None,
        slow: bool,
        slow_call_rate: float,
        open_for: float,
        half_open_calls: int,
        shared: bool,
        backoff: sw.Backoff | None,
        seed: int,
        trial_timeout: float | None,
        judged: bool,
        observe: bool,
    ) -> None:
        if shared and backoff is not None and backoff.jitter != "none":
            backoff = sw.Backoff(backoff.initial, backoff.multiplier, backoff.maximum, "none")
        self.observing = observe
        window: sw.CountWindow | sw.TimeWindow
        if self.time_window:
            window = sw.TimeWindow(2.0, buckets=buckets)
        else:
            window = sw.CountWindow(size)
        options: dict[str, Any] = {
            "consecutive_failures": consecutive_failures,
            "slow_call_duration": SLOW if slow else None,
            "slow_call_rate": slow_call_rate,
            "open_for": open_for,
            "half_open_calls": half_open_calls,
        }
        given = dict(options)
        if failure_rate != "default":
            given["failure_rate"] = failure_rate
        if minimum_calls is not None:
            given["minimum_calls"] = minimum_calls
        if backoff is not None:
            given["open_for"] = backoff
        if judged:
            given["failure_on_result"] = lambda result: result == "bad"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.breaker = sw.CircuitBreaker(
                window=window,
                failure_on=Failure,
                ignore=Ignored,
                store=InProcessCircuitStore() if shared else None,
                telemetry=sw.Telemetry(registry=CollectorRegistry(), listeners=[self.listen]),
                trial_timeout=trial_timeout,
                mode="observe" if observe else "enforce",
                rng=random.Random(seed),
                **given,
            )
        # The defaults, as the documentation states them.
        if failure_rate == "default":
            failure_rate = None if consecutive_failures is not None else 0.5
        assert not isinstance(failure_rate, str)
        rated = failure_rate is not None or slow
        wasted = minimum_calls is not None and (
            not rated or (not self.time_window and minimum_calls > size)
        )
        # And a Backoff whose jitter may make an open period far shorter than its delay.
        shrinking = backoff is not None and backoff.jitter in ("full", "decorrelated")
        assert [w.category for w in caught] == [sw.StalwartWarning] * (wasted + shrinking)
        self.model = Model(
            **options,
            failure_rate=failure_rate,
            minimum_calls=10 if minimum_calls is None else minimum_calls,
            size=None if self.time_window else size,
            seconds=2.0,
            buckets=buckets,
            backoff=backoff,
            rng=random.Random(seed),
            trial_timeout=trial_timeout,
            judged=judged,
        )

    def listen(self, event: Event) -> None:
        if isinstance(event, CallRejected):
            self.rejected.append(event.retry_after)

    # -- driving both ------------------------------------------------------

    def now(self) -> float:
        return self.loop.time()

    def start(self) -> Running:
        """Start a call that runs until released; admit it in the model too."""
        release: asyncio.Future[str] = self.loop.create_future()

        async def dependency() -> str:
            outcome = await release
            raise_for(outcome)
            return outcome

        task = self.loop.create_task(self.breaker(dependency)())
        admitted = self.model.admit(self.now())
        reported = len(self.rejected)
        self.loop.run_until_complete(self.settle(task, release))
        if admitted[0] == "rejected":  # reported, in either mode, with its retry_after
            assert self.rejected[reported:] == [admitted[1]]
        return Running(task, admitted, self.now(), release)

    async def settle(self, task: asyncio.Task[str], release: asyncio.Future[str]) -> None:
        for _ in range(10):  # until the call waits on `release`, or is done
            await asyncio.sleep(0)

    def outcome_of(self, running: Running) -> None:
        """Check a finished call against what the model predicted."""
        task = running.task
        assert task.done()
        kind, detail = running.admitted
        if kind == "rejected" and not self.observing:
            error = task.exception()
            assert isinstance(error, sw.CircuitOpenError), error
            assert error.retry_after == detail
        elif not task.cancelled():
            assert not isinstance(task.exception(), sw.CircuitOpenError)

    @rule(outcome=st.sampled_from(OUTCOMES), seconds=durations)
    def call(self, outcome: str, seconds: float) -> None:
        """A call from start to end; it takes ``seconds``."""
        running = self.start()
        if running.admitted[0] == "rejected" and not self.observing:
            self.outcome_of(running)
            return
        if seconds:
            self.loop.run_until_complete(asyncio.sleep(seconds))
        running.release.set_result(outcome)
        self.loop.run_until_complete(asyncio.wait([running.task]))
        self.model.finish(running.admitted, running.started, self.now(), outcome)
        self.outcome_of(running)

    @precondition(lambda self: len(self.running) < 6)
    @rule()
    def begin(self) -> None:
        """A call that stays running."""
        running = self.start()
        if running.admitted[0] == "rejected" and not self.observing:
            self.outcome_of(running)
        else:
            self.running.append(running)

    @rule()
    def fail_until_half_open(self) -> None:
        """Failing calls until the breaker opens (if it can), then its open period."""
        for _ in range(10):
            if self.model.state != "closed":
                break
            self.call("failure", 0.0)
        if self.model.state == "open" and not self.model.forced:
            self.loop.advance(max(0.0, self.model.open_until - self.now()))

    @precondition(lambda self: len(self.running) < 6 and self.model.trial_timeout is not None)
    @rule(late=st.sampled_from([0.0, 0.125, 1.0]))
    def hang(self, late: float) -> None:
        """A call that stays running past trial_timeout (and ``late`` more seconds)."""
        self.begin()
        timeout = self.model.trial_timeout
        assert timeout is not None
        self.loop.advance(timeout + late)

    @precondition(lambda self: self.running)
    @rule(which=st.integers(0, 5), outcome=st.sampled_from(OUTCOMES))
    def end(self, which: int, outcome: str) -> None:
        running = self.running.pop(which % len(self.running))
        running.release.set_result(outcome)
        self.loop.run_until_complete(asyncio.wait([running.task]))
        self.model.finish(running.admitted, running.started, self.now(), outcome)
        self.outcome_of(running)

    @precondition(lambda self: self.running)
    @rule(which=st.integers(0, 5))
    def cancel(self, which: int) -> None:
        running = self.running.pop(which % len(self.running))
        running.task.cancel()
        self.loop.run_until_complete(asyncio.wait([running.task]))
        assert running.task.cancelled()
        self.model.finish(running.admitted, running.started, self.now(), "cancelled")

    @rule(seconds=jumps)
    def wait(self, seconds: float) -> None:
        self.loop.advance(seconds)

    @rule()
    def force_open(self) -> None:
        self.breaker.force_open()
        self.model.force_open()

    @rule()
    def reset(self) -> None:
        self.breaker.reset()
        self.model.close()

    # -- agreeing ------------------------------------------------------------

    @invariant()
    def they_agree(self) -> None:
        if not hasattr(self, "breaker"):
            return
        self.loop.run_until_complete(self.compare())

    async def compare(self) -> None:
        now = self.now()
        model = self.model
        model.observe(now)
        stats = self.breaker.statistics()
        assert stats.state.value == model.state
        assert self.breaker.metrics.state == model.state  # type: ignore[attr-defined]  # the metric follows
        calls, failures, slow = model.counts(now)
        assert (stats.calls, stats.failures, stats.slow_calls) == (calls, failures, slow)
        assert stats.consecutive_failures == model.run
        assert self.breaker.metrics.rejected == model.rejections
        if model.state == "half_open":
            assert stats.trial_calls == len(model.trials)
        if model.state == "open":
            expected = math.inf if model.forced else model.open_until - now
            assert stats.time_until_half_open == expected

    def teardown(self) -> None:
        for running in self.running:
            running.task.cancel()
        if self.running:
            self.loop.run_until_complete(asyncio.wait([r.task for r in self.running]))
        self.loop.close()


class CountWindowMachine(BreakerMachine):
    time_window = False


class TimeWindowMachine(BreakerMachine):
    time_window = True


SETTINGS = settings(max_examples=150, stateful_step_count=40)
TestCountWindow = CountWindowMachine.TestCase
TestCountWindow.settings = SETTINGS
TestTimeWindow = TimeWindowMachine.TestCase
TestTimeWindow.settings = SETTINGS
