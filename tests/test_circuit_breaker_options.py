"""CircuitBreaker's recovery and shadow options, on asyncio and trio, in virtual time.

``open_for=Backoff(...)`` (growing open periods), ``trial_timeout`` (hung
trials), ``failure_on_result`` (failures judged on the returned value) and
``mode="observe"`` (a shadow breaker that never rejects).
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart import CircuitState
from stalwart.events import CallRejected, CircuitStateChanged, Event

from .conftest import sample

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
STEADY = sw.Backoff(initial=1.0, multiplier=2.0, maximum=8.0, jitter="none")


class Boom(Exception):
    """The dependency failed."""


_names = itertools.count()


def breaker(**options: Any) -> sw.CircuitBreaker:
    """A breaker of a name of its own, tripped by one failure unless told otherwise."""
    options.setdefault("consecutive_failures", 1)
    options.setdefault("name", f"options-{next(_names)}")
    options.setdefault("telemetry", sw.Telemetry(registry=CollectorRegistry()))
    return sw.CircuitBreaker(**options)


def guarded(cb: sw.CircuitBreaker) -> Any:
    @cb
    async def call(outcome: str = "ok", seconds: float = 0.0) -> str:
        if seconds:
            await anyio.sleep(seconds)
        if outcome == "fail":
            raise Boom
        return outcome

    return call


async def attempt(fn: Any, outcome: str = "ok", seconds: float = 0.0) -> str:
    """Make a call; say what it returned, or what it raised."""
    try:
        result: str = await fn(outcome, seconds)
    except sw.CircuitOpenError:
        return "rejected"
    except Boom:
        return "Boom"
    return result


def open_period(cb: sw.CircuitBreaker) -> float:
    left = cb.statistics().time_until_half_open
    assert left is not None
    return left


# -- open_for=Backoff ----------------------------------------------------------


async def test_the_kth_opening_in_a_row_lasts_the_backoffs_delay_k() -> None:
    cb = breaker(open_for=STEADY)
    fn = guarded(cb)
    periods = []
    assert await attempt(fn, "fail") == "Boom"
    for _ in range(5):
        assert cb.state is OPEN
        periods.append(open_period(cb))
        await anyio.sleep(periods[-1])
        assert cb.state is HALF_OPEN
        assert await attempt(fn, "fail") == "Boom"  # the trial fails: the next opening
    assert periods == [1.0, 2.0, 4.0, 8.0, 8.0]


async def test_a_close_starts_the_openings_again_from_one() -> None:
    cb = breaker(open_for=STEADY)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(1.0)
    await attempt(fn, "fail")
    assert open_period(cb) == 2.0
    await anyio.sleep(2.0)
    assert await attempt(fn) == "ok"
    assert cb.state is CLOSED
    await attempt(fn, "fail")
    assert open_period(cb) == 1.0


async def test_reset_starts_the_openings_again_from_one() -> None:
    cb = breaker(open_for=STEADY)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(1.0)
    await attempt(fn, "fail")
    cb.reset()
    await attempt(fn, "fail")
    assert open_period(cb) == 1.0


async def test_rejections_say_the_time_left_of_the_growing_period() -> None:
    cb = breaker(open_for=STEADY)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(1.0)
    await attempt(fn, "fail")
    await anyio.sleep(0.5)
    with pytest.raises(sw.CircuitOpenError) as info:
        await fn()
    assert info.value.retry_after == 1.5


async def test_open_periods_are_the_backoffs_jittered_delays() -> None:
    jittered = sw.Backoff(initial=1.0, multiplier=2.0, maximum=8.0, jitter="equal")
    cb = breaker(open_for=jittered, rng=random.Random(7))
    fn = guarded(cb)
    draws = random.Random(7)
    await attempt(fn, "fail")
    for k in range(1, 5):
        expected = jittered.delay(k, None, draws)
        assert open_period(cb) == pytest.approx(expected, abs=1e-9)
        await anyio.sleep(expected)
        await attempt(fn, "fail")


async def test_replicas_open_for_different_jittered_periods() -> None:
    jittered = sw.Backoff(initial=10.0, multiplier=2.0, maximum=60.0, jitter="equal")
    periods = set()
    for seed in range(5):
        cb = breaker(open_for=jittered, rng=random.Random(seed))
        await attempt(guarded(cb), "fail")
        periods.add(open_period(cb))
    assert len(periods) == 5
    assert all(5.0 <= p <= 10.0 for p in periods)


async def test_decorrelated_jitter_draws_from_the_previous_period() -> None:
    backoff = sw.Backoff(initial=1.0, multiplier=2.0, maximum=30.0, jitter="decorrelated")
    with pytest.warns(sw.StalwartWarning, match="jitter='equal'"):
        cb = breaker(open_for=backoff, rng=random.Random(3))
    fn = guarded(cb)
    draws = random.Random(3)
    previous = None
    await attempt(fn, "fail")
    for k in range(1, 5):
        previous = backoff.delay(k, previous, draws)
        assert open_period(cb) == pytest.approx(previous, abs=1e-9)
        await anyio.sleep(previous)
        await attempt(fn, "fail")


@pytest.mark.parametrize(
    ("jitter", "how"), [("full", "between 0 and its delay"), ("decorrelated", "three times")]
)
def test_a_jitter_that_can_shorten_an_open_period_warns(jitter: str, how: str) -> None:
    backoff = sw.Backoff(initial=5.0, maximum=60.0, jitter=jitter)  # type: ignore[arg-type]
    with pytest.warns(sw.StalwartWarning, match=how) as caught:
        sw.CircuitBreaker(open_for=backoff, telemetry=sw.Telemetry(registry=CollectorRegistry()))
    assert caught[0].filename == __file__  # the line that built the breaker
    for quiet in ("equal", "none"):
        steady = sw.Backoff(initial=5.0, maximum=60.0, jitter=quiet)
        sw.CircuitBreaker(open_for=steady, telemetry=sw.Telemetry(registry=CollectorRegistry()))


async def test_breakers_sharing_a_store_share_the_count_of_openings() -> None:
    store = sw.InProcessCircuitStore()
    a = breaker(open_for=STEADY, store=store, name="shared-openings")
    b = breaker(open_for=STEADY, store=store, name="shared-openings")
    await attempt(guarded(a), "fail")  # the first opening: a's
    assert open_period(b) == 1.0
    await anyio.sleep(1.0)
    await attempt(guarded(b), "fail")  # the second: b's trial fails
    assert open_period(a) == open_period(b) == 2.0
    await anyio.sleep(2.0)
    await attempt(guarded(a), "fail")
    assert open_period(b) == 4.0
    await anyio.sleep(4.0)
    assert await attempt(guarded(b)) == "ok"
    await attempt(guarded(a), "fail")
    assert open_period(b) == 1.0


# -- trial_timeout ---------------------------------------------------------------


async def test_a_hung_trial_is_failed_after_trial_timeout_and_frees_its_slot() -> None:
    cb = breaker(open_for=10.0, trial_timeout=5.0)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, fn, "ok", 1000.0)  # the trial hangs
        await anyio.sleep(4.0)
        assert await attempt(fn) == "rejected"  # its slot is still taken
        assert cb.state is HALF_OPEN
        await anyio.sleep(1.0)
        # Its time ran out: a failure, so the breaker opened again, from then.
        assert await attempt(fn) == "rejected"
        assert cb.state is OPEN
        assert open_period(cb) == 10.0
        await anyio.sleep(10.0)
        assert cb.statistics().trial_calls == 0  # the hung call holds no slot
        assert await attempt(fn) == "ok"  # a new trial
        assert cb.state is CLOSED
        tg.cancel_scope.cancel()
    assert cb.state is CLOSED  # the hung trial's end counts for nothing


async def test_a_hung_trial_found_late_opens_from_when_its_time_ran_out() -> None:
    cb = breaker(open_for=10.0, trial_timeout=5.0)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, fn, "ok", 1000.0)
        await anyio.sleep(12.0)  # ran out at 5.0, so open until 15.0
        with pytest.raises(sw.CircuitOpenError) as info:
            await fn()
        assert info.value.retry_after == 3.0
        tg.cancel_scope.cancel()


async def test_a_hung_trial_found_after_the_new_period_lets_the_caller_try() -> None:
    events: list[tuple[str, str]] = []

    def listen(event: Event) -> None:
        if isinstance(event, CircuitStateChanged):
            events.append((event.from_state.value, event.to_state.value))

    telemetry = sw.Telemetry(registry=CollectorRegistry(), listeners=[listen])
    cb = breaker(open_for=10.0, trial_timeout=5.0, telemetry=telemetry)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, fn, "ok", 1000.0)
        await anyio.sleep(30.0)  # ran out at 5.0; that opening was over at 15.0
        assert await attempt(fn) == "ok"  # a trial of its own
        tg.cancel_scope.cancel()
    assert cb.state is CLOSED
    assert events == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


async def test_a_trial_that_ends_after_trial_timeout_counts_as_a_failure() -> None:
    cb = breaker(open_for=10.0, trial_timeout=5.0)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(10.0)
    assert await attempt(fn, "ok", 6.0) == "ok"  # the caller still gets its result
    assert cb.state is OPEN
    assert open_period(cb) == 9.0  # opened when its time ran out, a second ago


async def test_a_trial_within_trial_timeout_counts_as_usual() -> None:
    cb = breaker(open_for=10.0, trial_timeout=5.0)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(10.0)
    assert await attempt(fn, "ok", 4.5) == "ok"
    assert cb.state is CLOSED


async def test_a_hung_trial_grows_the_next_open_period() -> None:
    cb = breaker(open_for=STEADY, trial_timeout=5.0)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(1.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, fn, "ok", 1000.0)
        await anyio.sleep(5.0)
        await attempt(fn)
        assert open_period(cb) == 2.0  # the second opening in a row
        tg.cancel_scope.cancel()


async def test_a_hung_trial_in_one_breaker_lets_another_sharing_its_store_try() -> None:
    store = sw.InProcessCircuitStore()
    a = breaker(open_for=10.0, trial_timeout=5.0, store=store, name="shared-trial")
    b = breaker(open_for=10.0, trial_timeout=5.0, store=store, name="shared-trial")
    await attempt(guarded(a), "fail")
    await anyio.sleep(10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, guarded(a), "ok", 1000.0)
        await anyio.sleep(1.0)
        assert await attempt(guarded(b)) == "rejected"  # the one permit is a's
        await anyio.sleep(4.0)
        assert await attempt(guarded(b)) == "ok"  # a's permit lapsed with its time
        assert b.state is CLOSED
        tg.cancel_scope.cancel()
    assert a.state is b.state is CLOSED


# -- failure_on_result ------------------------------------------------------------


async def test_failure_on_result_trips_the_breaker_while_the_result_returns() -> None:
    cb = breaker(consecutive_failures=2, failure_on_result=lambda r: r == "bad")
    fn = guarded(cb)
    assert await attempt(fn, "bad") == "bad"
    assert cb.state is CLOSED
    assert await attempt(fn, "ok") == "ok"  # ends the run
    assert await attempt(fn, "bad") == "bad"
    assert await attempt(fn, "bad") == "bad"
    assert cb.state is OPEN
    assert await attempt(fn, "ok") == "rejected"


async def test_failing_results_count_in_the_failure_rate() -> None:
    cb = breaker(
        consecutive_failures=None,
        failure_rate=0.5,
        minimum_calls=4,
        failure_on_result=lambda r: r == "bad",
    )
    fn = guarded(cb)
    for outcome in ["ok", "bad", "ok"]:
        await attempt(fn, outcome)
    assert cb.statistics().failures == 1
    await attempt(fn, "bad")
    assert cb.state is OPEN


async def test_a_failing_result_fails_a_trial() -> None:
    cb = breaker(open_for=10.0, failure_on_result=lambda r: r == "bad")
    fn = guarded(cb)
    await attempt(fn, "bad")
    await anyio.sleep(10.0)
    assert await attempt(fn, "bad") == "bad"
    assert cb.state is OPEN


async def test_a_result_failure_is_a_successful_call_to_the_metrics() -> None:
    registry = CollectorRegistry()
    cb = breaker(
        failure_on_result=lambda r: r == "bad",
        telemetry=sw.Telemetry(registry=registry),
        name="judged",
    )
    await attempt(guarded(cb), "bad")
    labels = {"policy": "judged", "kind": "circuit_breaker"}
    assert sample(registry, "stalwart_calls_total", **labels, outcome="success") == 1.0
    assert sample(registry, "stalwart_calls_total", **labels, outcome="error") == 0.0


async def test_a_predicate_that_raises_counts_as_the_call_raising() -> None:
    def judge(result: object) -> bool:
        raise Boom

    cb = breaker(failure_on_result=judge)
    with pytest.raises(Boom):
        await guarded(cb)()
    assert cb.state is OPEN


async def test_a_predicate_that_raises_in_a_trial_frees_its_slot() -> None:
    def judge(result: object) -> bool:
        if result == "odd":
            raise ValueError(result)
        return False

    cb = breaker(open_for=10.0, failure_on=Boom, failure_on_result=judge)
    fn = guarded(cb)
    await attempt(fn, "fail")
    await anyio.sleep(10.0)
    with pytest.raises(ValueError):
        await fn("odd")  # not a failure (failure_on=Boom): a success
    assert cb.state is CLOSED


# -- mode="observe" ------------------------------------------------------------------


async def test_observe_mode_never_rejects() -> None:
    cb = breaker(open_for=10.0, half_open_calls=1, mode="observe")
    fn = guarded(cb)
    assert await attempt(fn, "fail") == "Boom"
    assert cb.state is OPEN
    assert [await attempt(fn) for _ in range(3)] == ["ok"] * 3
    cb.force_open()
    assert await attempt(fn) == "ok"


async def test_observe_mode_counts_and_reports_the_rejections_it_would_make() -> None:
    registry = CollectorRegistry()
    seen: list[Event] = []
    cb = breaker(
        open_for=10.0,
        mode="observe",
        name="shadow",
        telemetry=sw.Telemetry(registry=registry, listeners=[seen.append]),
    )
    fn = guarded(cb)
    await attempt(fn, "fail")
    await attempt(fn)
    await attempt(fn)
    assert sample(registry, "stalwart_circuit_rejected_total", policy="shadow") == 2.0
    rejections = [e for e in seen if isinstance(e, CallRejected)]
    assert [(e.reason, e.retry_after) for e in rejections] == [("circuit_open", 10.0)] * 2
    # Counted as an enforcing breaker would count them: rejected, not run.
    labels = {"policy": "shadow", "kind": "circuit_breaker"}
    assert sample(registry, "stalwart_calls_total", **labels, outcome="rejected") == 2.0
    assert sample(registry, "stalwart_calls_total", **labels, outcome="success") == 0.0
    assert sample(registry, "stalwart_circuit_state", policy="shadow", state="open") == 1.0


async def test_calls_observe_mode_lets_through_count_for_nothing() -> None:
    cb = breaker(open_for=10.0, mode="observe")
    fn = guarded(cb)
    await attempt(fn, "fail")
    await attempt(fn)  # would have been rejected: not a trial, not in the window
    assert cb.state is OPEN
    await anyio.sleep(10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(attempt, fn, "fail", 1.0)  # the trial
        await anyio.sleep(0.5)
        assert await attempt(fn) == "ok"  # beyond half_open_calls: let through
        assert cb.state is HALF_OPEN
    assert cb.state is OPEN  # the trial's failure decides


async def test_the_mode_shows_in_the_options_and_the_repr() -> None:
    cb = breaker(mode="observe", name="shadowing")
    assert cb.mode == "observe"
    assert "mode='observe'" in repr(cb)
    assert breaker().mode == "enforce"


# The same outcomes, fed to an enforcing and an observing breaker: one call at
# a time (its outcome, its duration, then a pause), or a call that hangs. The enforcing breaker
# rejects some calls; the observing one runs them, and their outcomes count
# for nothing. Both must report the same transitions, at the same times, and
# the same rejections (the observing one counting those it would have made).
steps = st.lists(
    st.tuples(
        st.sampled_from(["ok", "fail", "bad", "hang"]),
        st.sampled_from([0.0, 0.5, 2.0]),
        st.sampled_from([0.0, 0.25, 1.0, 3.0]),
    ),
    min_size=1,
    max_size=40,
)
configs = st.fixed_dictionaries(
    {
        "failure_rate": st.sampled_from([None, 0.5]),
        "minimum_calls": st.integers(1, 4),
        "window": st.integers(1, 6),
        "consecutive_failures": st.none() | st.integers(1, 3),
        "slow_call_duration": st.none() | st.just(1.0),
        "open_for": st.sampled_from([0.5, 2.0, STEADY]),
        "half_open_calls": st.integers(1, 2),
        "trial_timeout": st.none() | st.just(1.5),
    }
)


async def play(cb: sw.CircuitBreaker, script: list[tuple[str, float, float]]) -> list[str]:
    fn = guarded(cb)
    seen = []
    async with anyio.create_task_group() as tg:
        for outcome, seconds, pause in script:
            if outcome == "hang":
                tg.start_soon(attempt, fn, "ok", 1000.0)
                await anyio.lowlevel.checkpoint()  # it starts, and is admitted or not
            else:
                # A step takes as long whether the call ran or was rejected.
                end = anyio.current_time() + seconds
                seen.append(await attempt(fn, outcome, seconds))
                await anyio.sleep_until(end)
            await anyio.sleep(pause)
        tg.cancel_scope.cancel()
    return seen


@pytest.mark.filterwarnings("ignore::stalwart.StalwartWarning")  # minimum_calls unused
@settings(max_examples=200)
@given(config=configs, script=steps)
async def test_observe_mode_reports_the_transitions_enforce_mode_makes(
    config: dict[str, Any], script: list[tuple[str, float, float]]
) -> None:
    reports: dict[str, list[tuple[Any, ...]]] = {}
    results: dict[str, list[str]] = {}
    for mode in ("enforce", "observe"):
        events: list[tuple[Any, ...]] = []
        start = anyio.current_time()

        def listen(
            event: Event, events: list[tuple[Any, ...]] = events, start: float = start
        ) -> None:
            at = round(event.time - start, 9)
            if isinstance(event, CircuitStateChanged):
                events.append((at, event.from_state, event.to_state))
            elif isinstance(event, CallRejected):
                events.append((at, "rejected", event.retry_after))

        cb = breaker(
            **config,
            failure_on_result=lambda r: r == "bad",
            mode=mode,
            telemetry=sw.Telemetry(registry=CollectorRegistry(), listeners=[listen]),
        )
        results[mode] = await play(cb, script)
        reports[mode] = events
    assert reports["observe"] == reports["enforce"]
    assert "rejected" not in results["observe"]
    # Where enforce mode rejected, observe mode ran the call; elsewhere, the same.
    for enforced, observed in zip(results["enforce"], results["observe"], strict=True):
        assert enforced in ("rejected", observed)


# -- options ------------------------------------------------------------------------


async def test_the_new_options_are_readable() -> None:
    def judge(result: object) -> bool:
        return result is None

    cb = breaker(open_for=STEADY, trial_timeout=2.5, failure_on_result=judge)
    assert (cb.open_for, cb.trial_timeout, cb.failure_on_result, cb.mode) == (
        STEADY,
        2.5,
        judge,
        "enforce",
    )
    plain = breaker()
    assert (plain.open_for, plain.trial_timeout, plain.failure_on_result) == (30.0, None, None)


def test_the_repr_shows_the_new_options() -> None:
    def is_empty(result: object) -> bool:
        return not result

    cb = sw.CircuitBreaker(
        consecutive_failures=3,
        open_for=sw.Backoff(initial=1.0, maximum=60.0, jitter="equal"),
        trial_timeout=5.0,
        failure_on_result=is_empty,
        mode="observe",
        name="repr",
    )
    assert repr(cb) == (
        "CircuitBreaker(consecutive_failures=3, window=CountWindow(size=100), "
        "open_for=Backoff(initial=1.0, multiplier=2.0, maximum=60.0, jitter='equal'), "
        "trial_timeout=5, "
        "failure_on_result=test_the_repr_shows_the_new_options.<locals>.is_empty, "
        "mode='observe', name='repr')"
    )


@pytest.mark.parametrize(
    ("options", "error", "param"),
    [
        ({"open_for": "30"}, TypeError, "open_for"),
        ({"open_for": None}, TypeError, "open_for"),
        ({"open_for": True}, TypeError, "open_for"),
        ({"trial_timeout": 0}, ValueError, "trial_timeout"),
        ({"trial_timeout": -1.0}, ValueError, "trial_timeout"),
        ({"trial_timeout": math.inf}, ValueError, "trial_timeout"),
        ({"trial_timeout": math.nan}, ValueError, "trial_timeout"),
        ({"trial_timeout": "5"}, TypeError, "trial_timeout"),
        ({"failure_on_result": 42}, TypeError, "failure_on_result"),
        ({"mode": "shadow"}, ValueError, "mode"),
        ({"mode": None}, ValueError, "mode"),
        ({"rng": 42}, TypeError, "rng"),
    ],
)
def test_bad_new_options_are_rejected_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], param: str
) -> None:
    with pytest.raises(error, match=param):
        sw.CircuitBreaker(**options)


class Limited:
    """A store with a limit on the durations it keeps (see `CircuitStore`)."""

    max_duration = 60.0

    def __init__(self) -> None:
        self.inner = sw.InProcessCircuitStore()

    def attach(self, key: str, listener: Any) -> Any:
        return self.inner.attach(key, listener)

    async def transition(self, *args: Any) -> Any:
        return await self.inner.transition(*args)

    async def acquire_trial(self, *args: Any, **kwargs: Any) -> Any:
        return await self.inner.acquire_trial(*args, **kwargs)

    async def release_trial(self, *args: Any) -> Any:
        return await self.inner.release_trial(*args)

    def assign(self, key: str, state: Any) -> None:
        self.inner.assign(key, state)


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"open_for": sw.Backoff(initial=1.0, maximum=120.0, jitter="equal")}, "open_for"),
        ({"trial_timeout": 90.0}, "trial_timeout"),
    ],
)
def test_durations_a_store_cannot_keep_are_rejected(options: dict[str, Any], param: str) -> None:
    with pytest.raises(ValueError, match=param):
        sw.CircuitBreaker(store=Limited(), **options)
    sw.CircuitBreaker(
        store=Limited(), open_for=sw.Backoff(maximum=60.0, jitter="equal"), trial_timeout=60.0
    )
