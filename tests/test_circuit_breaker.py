"""CircuitBreaker: every rule, on asyncio and trio, in virtual time."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import pickle
import time
import tracemalloc
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any, assert_type

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart import CircuitState, _clock
from stalwart.testing import VirtualClockEventLoop

from .conftest import Spans, sample

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


class Boom(Exception):
    """The dependency failed."""


class Benign(Exception):
    """An answer, not a failure (like a 404)."""


class Ignored(Exception):
    """Neither a success nor a failure."""


class Shutdown(BaseException):
    """A BaseException that is not an Exception (like KeyboardInterrupt)."""


class Dependency:
    """A fake downstream: each call does what it is told, and is counted."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(
        self, outcome: str = "ok", seconds: float = 0.0, raised: BaseException | None = None
    ) -> str:
        self.calls += 1
        if seconds:
            await anyio.sleep(seconds)
        if raised is not None:
            raise raised
        if outcome == "fail":
            raise Boom
        if outcome == "benign":
            raise Benign
        if outcome == "ignored":
            raise Ignored
        return outcome


Guarded = Callable[..., Coroutine[Any, Any, str]]


def guard(breaker: sw.CircuitBreaker) -> tuple[Dependency, Guarded]:
    dependency = Dependency()
    return dependency, breaker(dependency)


async def outcome(fn: Guarded, kind: str, seconds: float = 0.0) -> str:
    """Make a call; say what it returned, or what it raised."""
    try:
        return await fn(kind, seconds)
    except sw.CircuitOpenError:
        return "rejected"
    except Exception as exc:
        return type(exc).__name__


async def outcomes(fn: Guarded, *kinds: str, seconds: float = 0.0) -> list[str]:
    """Make one call per kind, one after the other."""
    return [await outcome(fn, kind, seconds) for kind in kinds]


async def trip(fn: Guarded, failures: int) -> None:
    await outcomes(fn, *["fail"] * failures)


_names = itertools.count()


def breaker(**options: Any) -> sw.CircuitBreaker:
    """A breaker of a name of its own (two live ones of one name would warn)."""
    options.setdefault("ignore", Ignored)
    options.setdefault("name", f"breaker-{next(_names)}")
    return sw.CircuitBreaker(**options)


# -- triggers ----------------------------------------------------------------


async def test_opens_when_the_failure_rate_reaches_failure_rate() -> None:
    cb = breaker(failure_rate=0.5, minimum_calls=4)
    _, fn = guard(cb)
    await outcomes(fn, "ok", "fail", "ok")
    assert cb.state is CLOSED
    await outcomes(fn, "fail")  # 2 of 4
    assert cb.state is OPEN


async def test_a_failure_rate_below_failure_rate_stays_closed() -> None:
    cb = breaker(failure_rate=0.5, minimum_calls=4, window=10)
    _, fn = guard(cb)
    await outcomes(fn, "ok", "fail", "ok", "ok", "fail", "ok", "ok", "ok", "fail")  # 3 of 9
    assert cb.state is CLOSED


async def test_rates_do_not_count_before_minimum_calls() -> None:
    cb = breaker(failure_rate=0.5, minimum_calls=5)
    _, fn = guard(cb)
    await trip(fn, 4)
    assert cb.state is CLOSED
    await trip(fn, 1)
    assert cb.state is OPEN


async def test_failure_rate_none_switches_the_rate_trigger_off() -> None:
    cb = breaker(failure_rate=None, minimum_calls=1, slow_call_duration=10.0)
    _, fn = guard(cb)
    await trip(fn, 50)
    assert cb.state is CLOSED
    assert cb.statistics().failure_rate == 1.0
    assert cb.failure_rate is None


async def test_consecutive_failures_alone_leaves_the_rate_trigger_off() -> None:
    cb = breaker(consecutive_failures=3)
    assert cb.failure_rate is None
    _, fn = guard(cb)
    for _ in range(20):  # a flaky dependency: 2 of every 3 calls fail, never 3 in a row
        await outcomes(fn, "fail", "fail", "ok")
    assert cb.state is CLOSED
    await trip(fn, 3)
    assert cb.state is OPEN


async def test_consecutive_failures_and_an_explicit_failure_rate_trigger_both() -> None:
    cb = breaker(consecutive_failures=3, failure_rate=0.5, minimum_calls=4)
    _, fn = guard(cb)
    await outcomes(fn, "fail", "fail", "ok", "fail")  # 3 of 4, never 3 in a row
    assert cb.state is OPEN


async def test_the_default_failure_rate_is_one_half() -> None:
    cb = breaker(minimum_calls=4)
    assert cb.failure_rate == 0.5
    _, fn = guard(cb)
    await outcomes(fn, "ok", "fail", "ok", "fail")
    assert cb.state is OPEN


async def test_a_breaker_without_triggers_opens_only_when_forced() -> None:
    cb = breaker(failure_rate=None)
    _, fn = guard(cb)
    await trip(fn, 200)
    assert cb.state is CLOSED
    cb.force_open()
    assert cb.state is OPEN


def test_minimum_calls_given_without_a_rate_trigger_warns() -> None:
    with pytest.warns(sw.StalwartWarning, match=r"minimum_calls=20 has no effect"):
        sw.CircuitBreaker(consecutive_failures=5, minimum_calls=20)
    with pytest.warns(sw.StalwartWarning, match=r"minimum_calls=3 has no effect"):
        sw.CircuitBreaker(failure_rate=None, minimum_calls=3)


def test_the_warning_points_at_the_line_that_built_the_breaker() -> None:
    with pytest.warns(sw.StalwartWarning) as caught:
        sw.CircuitBreaker(window=10, minimum_calls=20)
    assert caught[0].filename == __file__


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"window": 5},  # the default minimum_calls (10) is lowered without a word
        {"window": 20, "minimum_calls": 20},
        {"window": sw.TimeWindow(1.0), "minimum_calls": 1000},
        {"consecutive_failures": 5},
        {"consecutive_failures": 5, "failure_rate": 0.5, "minimum_calls": 20},
        {"consecutive_failures": 5, "slow_call_duration": 1.0, "minimum_calls": 20},
        {"failure_rate": None},
    ],
    ids=repr,
)
def test_sensible_options_do_not_warn(options: dict[str, Any]) -> None:
    sw.CircuitBreaker(**options)  # the suite turns warnings into errors


async def test_a_count_window_smaller_than_minimum_calls_lowers_it() -> None:
    with pytest.warns(sw.StalwartWarning, match=r"count from 3 calls on"):
        cb = breaker(window=3, minimum_calls=10)
    _, fn = guard(cb)
    await trip(fn, 3)
    assert cb.state is OPEN


async def test_a_success_can_complete_minimum_calls_and_open() -> None:
    cb = breaker(failure_rate=0.5, minimum_calls=4)
    _, fn = guard(cb)
    await outcomes(fn, "fail", "fail", "fail")
    assert cb.state is CLOSED
    await outcomes(fn, "ok")  # 3 of 4 failed
    assert cb.state is OPEN


async def test_a_count_window_holds_only_the_last_calls() -> None:
    cb = breaker(window=4, failure_rate=1.0)
    _, fn = guard(cb)
    await outcomes(fn, "fail", "fail", "fail", "ok", "ok", "fail", "ok")
    stats = cb.statistics()
    assert (stats.calls, stats.failures) == (4, 1)
    assert stats.failure_rate == 0.25


async def test_opens_after_consecutive_failures() -> None:
    cb = breaker(consecutive_failures=3)
    _, fn = guard(cb)
    await trip(fn, 2)
    assert cb.state is CLOSED
    await trip(fn, 1)
    assert cb.state is OPEN


async def test_a_success_ends_a_run_of_failures() -> None:
    cb = breaker(consecutive_failures=3)
    _, fn = guard(cb)
    await outcomes(fn, "fail", "fail", "ok", "fail", "fail")
    assert cb.state is CLOSED
    assert cb.statistics().consecutive_failures == 2


async def test_an_ignored_error_does_not_end_a_run_of_failures() -> None:
    cb = breaker(consecutive_failures=3)
    _, fn = guard(cb)
    await outcomes(fn, "fail", "fail", "ignored", "fail")
    assert cb.state is OPEN


async def test_slow_calls_open_at_slow_call_rate() -> None:
    cb = breaker(slow_call_duration=1.0, slow_call_rate=0.5, minimum_calls=4)
    _, fn = guard(cb)
    await outcomes(fn, "ok", "ok", seconds=0.5)
    await outcomes(fn, "ok", seconds=1.0)  # 1 of 3 slow: too few calls yet
    assert cb.state is CLOSED
    await outcomes(fn, "ok", seconds=0.5)  # 1 of 4
    assert cb.state is CLOSED
    await outcomes(fn, "ok", seconds=2.0)  # 2 of 5
    assert cb.state is CLOSED
    await outcomes(fn, "ok", seconds=1.5)  # 3 of 6
    assert cb.state is OPEN
    assert cb.statistics().slow_calls == 3


async def test_a_call_is_slow_from_slow_call_duration_on() -> None:
    cb = breaker(slow_call_duration=1.0, window=10)
    _, fn = guard(cb)
    await outcomes(fn, "ok", seconds=0.999)
    assert cb.statistics().slow_calls == 0
    await outcomes(fn, "ok", seconds=1.0)
    assert cb.statistics().slow_calls == 1


async def test_a_slow_failure_counts_as_failure_and_as_slow() -> None:
    cb = breaker(slow_call_duration=1.0, window=10)
    _, fn = guard(cb)
    await outcomes(fn, "fail", seconds=3.0)
    stats = cb.statistics()
    assert (stats.calls, stats.failures, stats.slow_calls) == (1, 1, 1)


async def test_slow_calls_do_not_count_without_slow_call_duration() -> None:
    cb = breaker(minimum_calls=2, slow_call_rate=0.0)
    _, fn = guard(cb)
    await outcomes(fn, "ok", "ok", seconds=100.0)
    assert cb.state is CLOSED
    assert cb.statistics().slow_calls == 0


async def test_a_time_window_opens_on_the_failure_rate() -> None:
    cb = breaker(window=sw.TimeWindow(10), minimum_calls=4, failure_rate=0.5)
    _, fn = guard(cb)
    await outcomes(fn, "ok", "fail", "ok", "fail")
    assert cb.state is OPEN


async def test_a_time_window_forgets_calls_older_than_its_seconds() -> None:
    cb = breaker(window=sw.TimeWindow(10), minimum_calls=4, failure_rate=0.5)
    _, fn = guard(cb)
    await outcomes(fn, "fail", "fail", "fail")
    await anyio.sleep(10.5)
    await outcomes(fn, "fail")
    assert cb.state is CLOSED
    stats = cb.statistics()
    assert (stats.calls, stats.failures) == (1, 1)


async def test_a_success_opens_a_time_window_whose_older_successes_left_it() -> None:
    cb = breaker(window=sw.TimeWindow(4, buckets=4), minimum_calls=2, failure_rate=0.5)
    _, fn = guard(cb)
    await outcomes(fn, "ok", "ok", "ok")
    await anyio.sleep(2.0)
    await outcomes(fn, "fail", "fail")  # 2 of 5
    assert cb.state is CLOSED
    await anyio.sleep(2.5)  # the first three successes leave the window...
    await outcomes(fn, "ok")  # ...so after this success, 2 of 3 calls failed
    assert cb.state is OPEN


async def test_a_success_opens_a_time_window_whose_failure_rate_rose_while_it_was_read() -> None:
    # The case a hypothesis test found: old calls left the window while
    # statistics() read it, so recording the next outcome saw nothing leave.
    cb = breaker(window=sw.TimeWindow(2.0, buckets=4), failure_rate=0.25, minimum_calls=1)
    _, fn = guard(cb)
    await outcomes(fn, "ok", "ok", "ok", "ok")
    await anyio.sleep(0.5)
    await outcomes(fn, "fail")  # 1 of 5
    await anyio.sleep(0.5)
    await outcomes(fn, "ok")  # 1 of 6
    await anyio.sleep(1.0)  # the four first successes leave the window
    assert cb.statistics().failure_rate == 0.5  # read: the buckets are dropped here
    assert cb.state is CLOSED  # no outcome recorded since: not checked yet
    await outcomes(fn, "ok")  # 1 of 3
    assert cb.state is OPEN


async def test_a_time_window_can_be_a_fraction_of_a_second() -> None:
    cb = breaker(window=sw.TimeWindow(0.5), minimum_calls=3, failure_rate=1.0)
    _, fn = guard(cb)
    for _ in range(6):
        await outcomes(fn, "fail")
        await anyio.sleep(0.3)  # never three failures within half a second
    assert cb.state is CLOSED
    await outcomes(fn, "fail", "fail", "fail")
    assert cb.state is OPEN


async def test_a_time_window_drops_its_buckets_one_at_a_time() -> None:
    cb = breaker(window=sw.TimeWindow(4, buckets=4), minimum_calls=100)
    _, fn = guard(cb)
    for _ in range(4):
        await outcomes(fn, "fail")
        await anyio.sleep(1.0)
    assert cb.statistics().calls == 3  # the first bucket has left the window
    await anyio.sleep(2.0)
    assert cb.statistics().calls == 1


# -- open --------------------------------------------------------------------


async def test_an_open_breaker_rejects_at_once_without_calling() -> None:
    cb = breaker(consecutive_failures=1, open_for=30.0, name="quotes")
    dependency, fn = guard(cb)
    await trip(fn, 1)
    start = anyio.current_time()
    with pytest.raises(sw.CircuitOpenError) as info:
        await fn()
    assert anyio.current_time() == start
    assert dependency.calls == 1
    assert info.value.policy == "quotes"
    assert info.value.retry_after == 30.0
    assert "quotes" in str(info.value)


async def test_retry_after_is_the_time_left_until_a_trial() -> None:
    cb = breaker(consecutive_failures=1, open_for=30.0)
    _, fn = guard(cb)
    await trip(fn, 1)
    await anyio.sleep(12.5)
    with pytest.raises(sw.CircuitOpenError) as info:
        await fn()
    assert info.value.retry_after == pytest.approx(17.5)
    assert cb.statistics().time_until_half_open == pytest.approx(17.5)


async def test_after_open_for_the_breaker_is_half_open() -> None:
    cb = breaker(consecutive_failures=1, open_for=30.0)
    _, fn = guard(cb)
    await trip(fn, 1)
    await anyio.sleep(29.9)
    assert cb.state is OPEN
    await anyio.sleep(0.1)
    assert cb.state is HALF_OPEN


async def test_open_for_zero_allows_a_trial_at_once() -> None:
    cb = breaker(consecutive_failures=1, open_for=0.0)
    _, fn = guard(cb)
    await trip(fn, 1)
    assert cb.state is HALF_OPEN
    assert await fn() == "ok"
    assert cb.state is CLOSED


async def test_each_rejection_raises_a_new_error() -> None:
    cb = breaker(consecutive_failures=1)
    _, fn = guard(cb)
    await trip(fn, 1)
    with pytest.raises(sw.CircuitOpenError) as first:
        await fn()
    with pytest.raises(sw.CircuitOpenError) as second:
        await fn()
    assert first.value is not second.value


async def test_rejection_errors_equal_constructed_ones() -> None:
    cb = breaker(consecutive_failures=1, open_for=5.0, name="quotes")
    _, fn = guard(cb)
    await trip(fn, 1)
    with pytest.raises(sw.CircuitOpenError) as info:
        await fn()
    made = sw.CircuitOpenError(str(info.value), policy="quotes", retry_after=5.0)

    def seen(error: sw.CircuitOpenError) -> tuple[object, ...]:
        return (type(error), error.args, error.policy, error.retry_after, vars(error))

    assert seen(info.value) == seen(made)
    assert seen(pickle.loads(pickle.dumps(info.value))) == seen(made)


@pytest.mark.parametrize(
    "read",
    [str, repr, lambda e: e.args, lambda e: pickle.loads(pickle.dumps(e)).args],
    ids=["str", "repr", "args", "pickled"],
)
async def test_a_rejection_reads_like_a_constructed_error_whatever_is_read_first(
    read: Callable[[sw.CircuitOpenError], object],
) -> None:
    # Rejections make their message only when it is read (it is most of what
    # building the error costs); no reader may tell.
    cb = breaker(consecutive_failures=1, open_for=5.0, name="quotes")
    _, fn = guard(cb)
    await trip(fn, 1)
    with pytest.raises(sw.CircuitOpenError) as info:
        await fn()
    made = sw.CircuitOpenError("circuit breaker 'quotes' is open", policy="quotes", retry_after=5.0)
    assert read(info.value) == read(made)
    info.value.args = ("replaced",)
    assert (str(info.value), info.value.args) == ("replaced", ("replaced",))


async def test_rejections_keep_no_memory() -> None:
    cb = breaker(consecutive_failures=1)
    _, fn = guard(cb)
    await trip(fn, 1)

    async def reject(n: int) -> None:
        for _ in range(n):
            with contextlib.suppress(sw.CircuitOpenError):
                await fn()

    await reject(100)  # first-use caches
    gc.collect()
    tracemalloc.start()
    try:
        await reject(10)
        before = tracemalloc.get_traced_memory()[0]
        await reject(5000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 5000  # well under one byte per rejection


# -- half-open ---------------------------------------------------------------


async def opened(cb: sw.CircuitBreaker, fn: Guarded) -> None:
    """Trip ``cb`` and wait until it is half-open."""
    await trip(fn, cb.consecutive_failures or 1)
    assert cb.state is OPEN
    assert isinstance(cb.open_for, float)  # not a Backoff
    await anyio.sleep(cb.open_for)
    assert cb.state is HALF_OPEN


async def test_a_successful_trial_closes_with_an_empty_window() -> None:
    cb = breaker(consecutive_failures=1, open_for=10.0)
    _, fn = guard(cb)
    await opened(cb, fn)
    assert await fn() == "ok"
    assert cb.state is CLOSED
    stats = cb.statistics()
    assert (stats.calls, stats.failures, stats.consecutive_failures) == (0, 0, 0)


async def test_a_failed_trial_opens_again_for_open_for() -> None:
    cb = breaker(consecutive_failures=1, open_for=10.0)
    _, fn = guard(cb)
    await opened(cb, fn)
    assert await outcomes(fn, "fail") == ["Boom"]
    assert cb.state is OPEN
    assert cb.statistics().time_until_half_open == 10.0


async def test_a_slow_trial_opens_again() -> None:
    cb = breaker(consecutive_failures=1, open_for=10.0, slow_call_duration=2.0)
    _, fn = guard(cb)
    await opened(cb, fn)
    assert await outcomes(fn, "ok", seconds=2.0) == ["ok"]
    assert cb.state is OPEN


async def test_half_open_needs_half_open_calls_successes_to_close() -> None:
    cb = breaker(consecutive_failures=1, open_for=10.0, half_open_calls=3)
    _, fn = guard(cb)
    await opened(cb, fn)
    await outcomes(fn, "ok", "ok")
    assert cb.state is HALF_OPEN
    await outcomes(fn, "ok")
    assert cb.state is CLOSED


async def test_half_open_runs_at_most_half_open_calls_trials_at_once() -> None:
    cb = breaker(consecutive_failures=1, open_for=10.0, half_open_calls=2)
    dependency, fn = guard(cb)
    await opened(cb, fn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(fn, "ok", 5.0)
        tg.start_soon(fn, "ok", 5.0)
        await anyio.sleep(1.0)
        assert cb.statistics().trial_calls == 2
        with pytest.raises(sw.CircuitOpenError) as info:
            await fn()
        assert info.value.retry_after == 0.0
        assert "half-open" in str(info.value)
    assert dependency.calls == 1 + 2
    assert cb.state is CLOSED


async def test_an_ignored_trial_gives_its_slot_back_without_counting() -> None:
    cb = breaker(consecutive_failures=1, open_for=10.0, half_open_calls=1)
    _, fn = guard(cb)
    await opened(cb, fn)
    assert await outcomes(fn, "ignored") == ["Ignored"]
    assert cb.state is HALF_OPEN
    assert cb.statistics().trial_calls == 0
    assert await fn() == "ok"
    assert cb.state is CLOSED


async def test_a_cancelled_trial_gives_its_slot_back_without_counting() -> None:
    cb = breaker(consecutive_failures=1, open_for=10.0, half_open_calls=1)
    _, fn = guard(cb)
    await opened(cb, fn)
    with anyio.move_on_after(1.0):
        await fn("ok", 5.0)
    assert cb.state is HALF_OPEN
    assert cb.statistics().trial_calls == 0
    assert await fn() == "ok"
    assert cb.state is CLOSED


async def test_a_trial_raising_a_non_failure_counts_as_success() -> None:
    cb = breaker(consecutive_failures=1, open_for=10.0, failure_on=Boom)
    _, fn = guard(cb)
    await opened(cb, fn)
    assert await outcomes(fn, "benign") == ["Benign"]
    assert cb.state is CLOSED


async def test_trials_of_a_finished_half_open_period_do_not_count() -> None:
    cb = breaker(consecutive_failures=1, open_for=10.0, half_open_calls=2)
    _, fn = guard(cb)
    await opened(cb, fn)
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(outcomes, fn, "ok", seconds=5.0))  # a slow trial, ends at +5
        await anyio.sleep(1.0)
        await outcomes(fn, "fail")  # reopens at +1
        assert cb.state is OPEN
    assert cb.state is OPEN  # the late success did not close it
    assert cb.statistics().time_until_half_open == pytest.approx(6.0)
    await anyio.sleep(6.0)
    assert cb.statistics().trial_calls == 0  # nor did it free a slot of the new period
    await outcomes(fn, "ok")
    assert cb.state is HALF_OPEN  # one success of two


# -- classification ----------------------------------------------------------


@pytest.mark.parametrize(
    "failure_on",
    [Boom, (KeyError, Boom), lambda exc: isinstance(exc, Boom)],
    ids=["type", "tuple", "predicate"],
)
async def test_failure_on_says_what_is_a_failure(failure_on: Any) -> None:
    cb = breaker(consecutive_failures=2, failure_on=failure_on)
    _, fn = guard(cb)
    await outcomes(fn, "benign", "benign", "benign")
    assert cb.state is CLOSED
    await trip(fn, 2)
    assert cb.state is OPEN


@pytest.mark.parametrize(
    "ignore",
    [Ignored, (KeyError, Ignored), lambda exc: isinstance(exc, Ignored)],
    ids=["type", "tuple", "predicate"],
)
async def test_ignored_errors_count_as_neither(ignore: Any) -> None:
    cb = sw.CircuitBreaker(window=10, minimum_calls=1, ignore=ignore)
    _, fn = guard(cb)
    await outcomes(fn, "ignored", "ignored")
    assert cb.statistics().calls == 0
    assert cb.state is CLOSED


async def test_ignore_wins_over_failure_on() -> None:
    cb = sw.CircuitBreaker(consecutive_failures=1, failure_on=Exception, ignore=Ignored)
    _, fn = guard(cb)
    await outcomes(fn, "ignored")
    assert cb.state is CLOSED


async def test_other_exceptions_count_as_successes() -> None:
    cb = breaker(window=10, minimum_calls=2, failure_on=Boom)
    _, fn = guard(cb)
    await outcomes(fn, "benign", "benign")
    stats = cb.statistics()
    assert (stats.calls, stats.failures, stats.state) == (2, 0, CLOSED)


async def test_a_cancelled_call_counts_as_neither() -> None:
    cb = breaker(window=10, minimum_calls=1)
    _, fn = guard(cb)
    with anyio.move_on_after(1.0):
        await fn("fail", 5.0)
    assert cb.statistics().calls == 0


async def test_base_exceptions_count_as_neither_and_propagate() -> None:
    cb = breaker(window=10, minimum_calls=1, failure_on=BaseException)
    _, fn = guard(cb)
    error = Shutdown()
    with pytest.raises(Shutdown) as info:
        await fn(raised=error)
    assert info.value is error
    assert cb.statistics().calls == 0


async def test_the_callers_exception_propagates_unchanged() -> None:
    cb = breaker(consecutive_failures=1)
    _, fn = guard(cb)
    error = Boom("the original")
    with pytest.raises(Boom) as info:
        await fn(raised=error)
    assert info.value is error
    assert info.value.__context__ is None


# -- control and statistics ---------------------------------------------------


async def test_force_open_stays_open_until_reset() -> None:
    cb = breaker(open_for=1.0)
    dependency, fn = guard(cb)
    cb.force_open()
    await anyio.sleep(1000.0)
    assert cb.state is OPEN
    with pytest.raises(sw.CircuitOpenError) as info:
        await fn()
    assert info.value.retry_after == math.inf
    assert cb.statistics().time_until_half_open == math.inf
    cb.reset()
    assert cb.state is CLOSED
    assert await fn() == "ok"
    assert dependency.calls == 1


async def test_reset_closes_with_an_empty_window() -> None:
    cb = breaker(window=10, minimum_calls=3)
    _, fn = guard(cb)
    await outcomes(fn, "fail", "fail", "ok")
    cb.reset()
    stats = cb.statistics()
    assert (stats.state, stats.calls, stats.failures, stats.consecutive_failures) == (
        CLOSED,
        0,
        0,
        0,
    )


async def test_reset_ends_an_open_period() -> None:
    cb = breaker(consecutive_failures=1)
    _, fn = guard(cb)
    await trip(fn, 1)
    cb.reset()
    assert await fn() == "ok"


async def test_statistics_describe_the_window() -> None:
    cb = breaker(window=10, minimum_calls=10, slow_call_duration=1.0)
    _, fn = guard(cb)
    await outcomes(fn, "ok", "ok", "fail")
    await outcomes(fn, "fail", seconds=1.5)
    assert cb.statistics() == sw.CircuitBreakerStatistics(
        state=CLOSED,
        calls=4,
        failures=2,
        slow_calls=1,
        failure_rate=0.5,
        slow_call_rate=0.25,
        consecutive_failures=2,
        trial_calls=0,
        time_until_half_open=None,
    )


def test_state_and_statistics_work_outside_an_event_loop() -> None:
    cb = sw.CircuitBreaker()
    assert cb.state is CLOSED
    assert cb.statistics().calls == 0
    cb.force_open()
    assert cb.state is OPEN
    assert cb.statistics().time_until_half_open == math.inf


async def test_calls_that_end_while_the_breaker_is_open_are_not_counted() -> None:
    cb = breaker(window=10, consecutive_failures=2)
    _, fn = guard(cb)
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(outcomes, fn, "fail", seconds=5.0))  # admitted while closed
        await anyio.sleep(1.0)
        await trip(fn, 2)
        assert cb.state is OPEN
    stats = cb.statistics()
    assert (stats.calls, stats.failures, stats.consecutive_failures) == (2, 2, 2)


async def test_the_options_are_readable() -> None:
    cb = sw.CircuitBreaker(
        failure_rate=0.25,
        window=sw.TimeWindow(2.5),
        minimum_calls=7,
        consecutive_failures=4,
        slow_call_duration=0.2,
        slow_call_rate=0.75,
        open_for=3,
        half_open_calls=2,
    )
    assert cb.store is None
    assert (cb.failure_rate, cb.window, cb.minimum_calls, cb.consecutive_failures) == (
        0.25,
        sw.TimeWindow(2.5),
        7,
        4,
    )
    assert (cb.slow_call_duration, cb.slow_call_rate, cb.open_for, cb.half_open_calls) == (
        0.2,
        0.75,
        3.0,
        2,
    )
    assert breaker(window=20).window == sw.CountWindow(20)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            {},
            "CircuitBreaker(failure_rate=0.5, minimum_calls=10, window=CountWindow(size=100), "
            "open_for=30, name='circuit')",
        ),
        (
            {"consecutive_failures": 5, "name": "db"},
            "CircuitBreaker(consecutive_failures=5, window=CountWindow(size=100), "
            "open_for=30, name='db')",
        ),
        (
            {
                "failure_rate": 0.25,
                "window": sw.TimeWindow(2.5),
                "minimum_calls": 7,
                "consecutive_failures": 4,
                "slow_call_duration": 0.2,
                "slow_call_rate": 0.75,
                "open_for": 3,
            },
            "CircuitBreaker(failure_rate=0.25, consecutive_failures=4, slow_call_duration=0.2, "
            "slow_call_rate=0.75, minimum_calls=7, window=TimeWindow(seconds=2.5, buckets=10), "
            "open_for=3, name='circuit')",
        ),
        (
            {"failure_rate": None, "slow_call_duration": 2.0},
            "CircuitBreaker(slow_call_duration=2, slow_call_rate=1, minimum_calls=10, "
            "window=CountWindow(size=100), open_for=30, name='circuit')",
        ),
        (
            {"failure_rate": None},
            "CircuitBreaker(failure_rate=None, window=CountWindow(size=100), open_for=30, "
            "name='circuit')",
        ),
    ],
)
def test_the_repr_shows_every_active_trigger(options: dict[str, Any], expected: str) -> None:
    assert repr(sw.CircuitBreaker(**options)) == expected


# -- the decorator ------------------------------------------------------------


async def test_call_runs_a_function_under_the_breaker() -> None:
    cb = breaker(consecutive_failures=1)
    dependency = Dependency()
    assert await cb.call(dependency, "ok") == "ok"
    with pytest.raises(Boom):
        await cb.call(dependency, "fail")
    with pytest.raises(sw.CircuitOpenError):
        await cb.call(dependency)


async def test_the_decorator_keeps_the_signature() -> None:
    cb = sw.CircuitBreaker()

    async def fetch(url: str, *, retries: int = 1) -> bytes:
        return url.encode() * retries

    guarded = cb(fetch)
    assert_type(await guarded("a", retries=2), bytes)
    assert guarded.__name__ == "fetch"
    assert await guarded("a", retries=2) == b"aa"


def test_decorating_a_sync_function_is_a_type_error() -> None:
    def sync() -> None: ...

    with pytest.raises(TypeError, match="async def"):
        sw.CircuitBreaker()(sync)  # type: ignore[arg-type]


async def test_breakers_count_calls_of_every_function_they_guard() -> None:
    cb = breaker(consecutive_failures=2)
    _, first = guard(cb)
    _, second = guard(cb)
    await trip(first, 1)
    await trip(second, 1)
    assert cb.state is OPEN
    assert await outcomes(first, "ok") == ["rejected"]


# -- telemetry ---------------------------------------------------------------


def test_series_exist_from_construction(registry: CollectorRegistry) -> None:
    cb = sw.CircuitBreaker(name="fresh", telemetry=sw.Telemetry(registry=registry))
    assert sample(registry, "stalwart_circuit_state", policy="fresh", state="closed") == 1
    assert sample(registry, "stalwart_circuit_state", policy="fresh", state="open") == 0
    assert sample(registry, "stalwart_circuit_state", policy="fresh", state="half_open") == 0
    assert sample(registry, "stalwart_circuit_rejected_total", policy="fresh") == 0
    del cb  # gauges describe live breakers; counters outlive them
    assert sample(registry, "stalwart_circuit_state", policy="fresh", state="closed") is None
    assert sample(registry, "stalwart_circuit_rejected_total", policy="fresh") == 0


async def test_transitions_are_counted_and_the_state_gauge_follows(
    registry: CollectorRegistry,
) -> None:
    cb = breaker(
        consecutive_failures=1, open_for=5, name="cb", telemetry=sw.Telemetry(registry=registry)
    )
    _, fn = guard(cb)
    await trip(fn, 1)
    assert sample(registry, "stalwart_circuit_state", policy="cb", state="open") == 1
    assert sample(registry, "stalwart_circuit_state", policy="cb", state="closed") == 0
    await anyio.sleep(5)
    await fn()
    assert sample(registry, "stalwart_circuit_state", policy="cb", state="closed") == 1
    transitions = {
        (f, t): sample(
            registry, "stalwart_circuit_transitions_total", policy="cb", from_state=f, to_state=t
        )
        for f, t in [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    }
    assert transitions == dict.fromkeys(transitions, 1)


async def test_rejections_are_counted(registry: CollectorRegistry) -> None:
    cb = breaker(consecutive_failures=1, name="cb", telemetry=sw.Telemetry(registry=registry))
    _, fn = guard(cb)
    await trip(fn, 1)
    await outcomes(fn, "ok", "ok", "ok")
    assert sample(registry, "stalwart_circuit_rejected_total", policy="cb") == 3


async def test_calls_run_in_a_span_named_for_the_breaker(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    cb = sw.CircuitBreaker(name="quotes", telemetry=telemetry)
    _, fn = guard(cb)
    await fn()
    span = spans.only()
    assert span.name == "stalwart.circuit_breaker quotes"
    assert span.attributes == {"stalwart.policy": "quotes"}


async def test_transitions_and_rejections_are_span_events(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    cb = breaker(consecutive_failures=1, open_for=5.0, name="quotes", telemetry=telemetry)
    _, fn = guard(cb)
    await trip(fn, 1)
    await outcomes(fn, "ok")
    tripping, rejected = spans.finished
    assert [e.name for e in tripping.events] == ["stalwart.circuit.transition", "exception"]
    event = tripping.events[0]
    assert event.attributes == {
        "stalwart.policy": "quotes",
        "stalwart.from_state": "closed",
        "stalwart.to_state": "open",
    }
    assert rejected.status.status_code.name == "ERROR"
    assert rejected.events[0].name == "stalwart.circuit.rejected"
    assert rejected.events[0].attributes == {
        "stalwart.policy": "quotes",
        "stalwart.reason": "circuit_open",
        "stalwart.retry_after": 5.0,
    }


async def test_in_a_pipeline_the_events_go_to_the_pipeline_span(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    cb = breaker(consecutive_failures=1, name="cb", telemetry=telemetry)
    fn = sw.Pipeline(cb, name="pipe", telemetry=telemetry)(Dependency())
    await trip(fn, 1)
    await outcomes(fn, "ok")
    assert [s.name for s in spans.finished] == ["stalwart.pipeline pipe"] * 2
    assert spans.finished[1].events[0].name == "stalwart.circuit.rejected"


# -- with Retry ----------------------------------------------------------------

FIXED = sw.Backoff(initial=0.5, jitter="none")


def flaky(failures: int) -> Dependency:
    """Fails ``failures`` times, then succeeds."""

    class Flaky(Dependency):
        async def __call__(
            self, outcome: str = "ok", seconds: float = 0.0, raised: BaseException | None = None
        ) -> str:
            self.calls += 1
            if self.calls <= failures:
                raise Boom
            return "ok"

    return Flaky()


async def test_a_default_retry_does_not_wait_out_an_open_breaker() -> None:
    cb = breaker(consecutive_failures=1, open_for=5.0)
    dependency = flaky(1)
    fn = sw.Pipeline(sw.Retry(attempts=3, backoff=FIXED), cb)(dependency)
    start = anyio.current_time()
    with pytest.raises(sw.CircuitOpenError):
        await fn()
    # fail; 0.5 s backoff; rejected, and the rejection propagates at once
    assert anyio.current_time() - start == pytest.approx(0.5)
    assert dependency.calls == 1


async def test_a_retry_on_circuit_open_errors_waits_out_an_open_breaker() -> None:
    cb = breaker(consecutive_failures=1, open_for=5.0)
    dependency = flaky(1)
    fn = sw.Pipeline(sw.Retry(attempts=3, on=Exception, backoff=FIXED), cb)(dependency)
    start = anyio.current_time()
    assert await fn() == "ok"
    # fail; 0.5 s backoff; rejected (retry_after 4.5); wait 4.5 s; a trial that succeeds
    assert anyio.current_time() - start == pytest.approx(5.0)
    assert dependency.calls == 2
    assert cb.state is CLOSED


async def test_retry_fails_at_once_when_the_deadline_ends_before_retry_after() -> None:
    cb = breaker(consecutive_failures=1, open_for=5.0)
    dependency = flaky(1)
    fn = sw.Pipeline(sw.Retry(attempts=3, on=Exception, backoff=FIXED), cb)(dependency)
    start = anyio.current_time()
    with sw.deadline(3.0), pytest.raises(sw.CircuitOpenError):
        await fn()
    assert anyio.current_time() - start == pytest.approx(0.5)
    assert dependency.calls == 1


async def test_retry_fails_at_once_when_its_timeout_ends_before_retry_after() -> None:
    cb = breaker(consecutive_failures=1, open_for=5.0)
    dependency = flaky(1)
    fn = sw.Pipeline(sw.Retry(attempts=3, on=Exception, backoff=FIXED, timeout=3.0), cb)(dependency)
    start = anyio.current_time()
    with pytest.raises(sw.CircuitOpenError):
        await fn()
    assert anyio.current_time() - start == pytest.approx(0.5)


async def test_retry_fails_at_once_when_its_budget_is_spent() -> None:
    cb = breaker(consecutive_failures=1, open_for=5.0)
    budget = sw.RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)  # one retry
    fn = sw.Pipeline(sw.Retry(attempts=3, backoff=FIXED, budget=budget), cb)(flaky(1))
    start = anyio.current_time()
    with pytest.raises(sw.CircuitOpenError):
        await fn()
    assert anyio.current_time() - start == pytest.approx(0.5)


async def test_a_half_open_rejection_lets_retry_use_its_own_backoff() -> None:
    cb = breaker(consecutive_failures=1, open_for=5.0)
    _, plain = guard(cb)
    await opened(cb, plain)
    fn = sw.Pipeline(sw.Retry(attempts=2, on=Exception, backoff=FIXED), cb)(Dependency())
    async with anyio.create_task_group() as tg:
        tg.start_soon(plain, "ok", 2.0)  # holds the only trial slot for 2 s
        await anyio.sleep(0.1)
        start = anyio.current_time()
        with pytest.raises(sw.CircuitOpenError):
            await fn()
        assert anyio.current_time() - start == pytest.approx(0.5)  # one backoff, no hint


# -- cost ----------------------------------------------------------------------


class CountingLoop(VirtualClockEventLoop):
    """Counts every read of its clock."""

    reads = 0

    def time(self) -> float:
        self.reads += 1
        return super().time()


def test_a_breaker_without_a_rate_trigger_reads_no_clock_for_a_success_from_the_first() -> None:
    loop = CountingLoop()
    guarded = sw.CircuitBreaker(consecutive_failures=5)(Dependency())

    async def main() -> int:
        await guarded()  # the first success finds that no success can trip it
        before = loop.reads
        for _ in range(1000):
            await guarded()
        return loop.reads - before

    try:
        assert loop.run_until_complete(main()) == 0
    finally:
        loop.close()


def test_a_closed_breaker_reads_no_clock_for_a_success() -> None:
    loop = CountingLoop()
    guarded = sw.CircuitBreaker(minimum_calls=5)(Dependency())

    async def main() -> int:
        for _ in range(5):  # until the window holds minimum_calls calls
            await guarded()
        before = loop.reads
        for _ in range(1000):
            await guarded()
        return loop.reads - before

    try:
        assert loop.run_until_complete(main()) == 0
    finally:
        loop.close()


@pytest.mark.filterwarnings("ignore::stalwart.StalwartWarning")  # a thousand of one name
def test_a_breaker_with_the_default_window_takes_at_most_400_bytes() -> None:
    telemetry = sw.Telemetry(registry=CollectorRegistry())
    kept = [sw.CircuitBreaker(telemetry=telemetry)]  # first-use caches are not the breaker's
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept += [sw.CircuitBreaker(telemetry=telemetry) for _ in range(1000)]
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown / 1000 <= 400


# -- concurrency ---------------------------------------------------------------


@pytest.mark.parametrize(
    "window", [sw.CountWindow(100_000), sw.TimeWindow(1000.0)], ids=["count", "time"]
)
async def test_thousands_of_interleaved_calls_leave_exact_counts(
    window: sw.CountWindow | sw.TimeWindow,
) -> None:
    # Never trips (whatever order the calls end in): only the counting is tested.
    cb = sw.CircuitBreaker(window=window, minimum_calls=10_000, failure_on=Boom, ignore=Ignored)
    _, fn = guard(cb)
    kinds = ["ok", "fail", "benign", "ignored", "cancel"]
    plan = [(kinds[i % 5], (i * 7919) % 97 / 10) for i in range(5000)]

    async def one(kind: str, seconds: float) -> None:
        if kind == "cancel":
            with anyio.move_on_after(seconds / 2):
                await fn("fail", seconds + 1)
            return
        await outcomes(fn, kind, seconds=seconds)

    async with anyio.create_task_group() as tg:
        for kind, seconds in plan:
            tg.start_soon(one, kind, seconds)
    stats = cb.statistics()
    assert stats.state is CLOSED
    assert stats.calls == 3000  # ok, fail and benign (a success): 1000 each
    assert stats.failures == 1000


async def test_many_callers_in_half_open_run_only_half_open_calls_trials() -> None:
    cb = breaker(consecutive_failures=1, open_for=5.0, half_open_calls=3)
    dependency, fn = guard(cb)
    await opened(cb, fn)
    before = dependency.calls
    results: list[str] = []

    async def one() -> None:
        results.append(await outcome(fn, "ok", 1.0))

    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(one)
    assert dependency.calls - before == 3
    assert sorted(set(results)) == ["ok", "rejected"]
    assert results.count("ok") == 3
    assert cb.state is CLOSED


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "param"),
    [
        ({"failure_rate": -0.1}, ValueError, "failure_rate"),
        ({"failure_rate": 1.5}, ValueError, "failure_rate"),
        ({"failure_rate": math.nan}, ValueError, "failure_rate"),
        ({"failure_rate": "0.5"}, TypeError, "failure_rate"),
        ({"slow_call_rate": 2}, ValueError, "slow_call_rate"),
        ({"slow_call_rate": -1}, ValueError, "slow_call_rate"),
        ({"window": 0}, ValueError, "window"),
        ({"window": -5}, ValueError, "window"),
        ({"window": 2.5}, TypeError, "window"),
        ({"window": True}, TypeError, "window"),
        ({"window": [10]}, TypeError, "window"),
        ({"minimum_calls": 0}, ValueError, "minimum_calls"),
        ({"minimum_calls": 1.0}, TypeError, "minimum_calls"),
        ({"consecutive_failures": 0}, ValueError, "consecutive_failures"),
        ({"half_open_calls": 0}, ValueError, "half_open_calls"),
        ({"half_open_calls": None}, TypeError, "half_open_calls"),
        ({"open_for": -1}, ValueError, "open_for"),
        ({"open_for": math.inf}, ValueError, "open_for"),
        ({"open_for": math.nan}, ValueError, "open_for"),
        ({"open_for": "30"}, TypeError, "open_for"),
        ({"slow_call_duration": 0}, ValueError, "slow_call_duration"),
        ({"slow_call_duration": -2.0}, ValueError, "slow_call_duration"),
        ({"slow_call_duration": math.inf}, ValueError, "slow_call_duration"),
        ({"failure_on": "Boom"}, TypeError, "failure_on"),
        ({"failure_on": ()}, TypeError, "failure_on"),
        ({"failure_on": (Boom, "x")}, TypeError, "failure_on"),
        ({"ignore": 42}, TypeError, "ignore"),
        ({"ignore": (int,)}, TypeError, "ignore"),
        ({"store": object()}, TypeError, "store"),
        ({"name": ""}, ValueError, "name"),
        ({"telemetry": "default"}, TypeError, "telemetry"),
    ],
)
def test_bad_options_are_rejected_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], param: str
) -> None:
    with pytest.raises(error, match=param):
        sw.CircuitBreaker(**options)


def test_positional_options_are_rejected() -> None:
    with pytest.raises(TypeError):
        sw.CircuitBreaker(0.5)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("make", "error", "param"),
    [
        (lambda: sw.CountWindow(0), ValueError, "size"),
        (lambda: sw.CountWindow(1.5), TypeError, "size"),  # type: ignore[arg-type]
        (lambda: sw.TimeWindow(0), ValueError, "seconds"),
        (lambda: sw.TimeWindow(-1), ValueError, "seconds"),
        (lambda: sw.TimeWindow(math.inf), ValueError, "seconds"),
        (lambda: sw.TimeWindow("10"), TypeError, "seconds"),  # type: ignore[arg-type]
        (lambda: sw.TimeWindow(10, buckets=0), ValueError, "buckets"),
        (lambda: sw.TimeWindow(10, buckets=2.0), TypeError, "buckets"),  # type: ignore[arg-type]
    ],
)
def test_bad_windows_are_rejected_naming_the_parameter(
    make: Callable[[], object], error: type[Exception], param: str
) -> None:
    with pytest.raises(error, match=param):
        make()


def test_windows_are_frozen_values() -> None:
    window = sw.TimeWindow(0.5)
    assert window == sw.TimeWindow(0.5, buckets=10)
    assert hash(window) == hash(sw.TimeWindow(0.5))
    with pytest.raises(AttributeError):
        window.seconds = 2.0  # type: ignore[misc]
    assert sw.TimeWindow(3).seconds == 3.0


# -- the rejection's clock -----------------------------------------------------


def test_on_a_plain_asyncio_loop_rejections_read_the_monotonic_clock() -> None:
    # Not virtual time: this is about the real clock. An open breaker's
    # rejection compares time.monotonic() with the end of the open period
    # directly (the loop's own clock, without looking the loop up).
    async def main() -> tuple[float, float, object, object]:
        cb = breaker(consecutive_failures=1, open_for=60.0)
        _, fn = guard(cb)
        await trip(fn, 1)
        with pytest.raises(sw.CircuitOpenError) as first:
            await fn("ok")
        cb.force_open()
        with pytest.raises(sw.CircuitOpenError) as forced:
            await fn("ok")
        return first.value.retry_after, forced.value.retry_after, _clock.monotonic_or_none(), cb

    before = time.monotonic()
    retry_after, forced, clock, cb = asyncio.run(main())
    assert 60.0 - (time.monotonic() - before) <= retry_after <= 60.0
    assert forced == math.inf
    assert clock is time.monotonic
    assert isinstance(cb, sw.CircuitBreaker)
    assert cb.state is OPEN


async def test_virtual_clocks_are_asked_through_the_loop() -> None:
    # conftest runs asyncio on VirtualClockEventLoop, trio on MockClock.
    assert _clock.monotonic_or_none() is None
    cb = breaker(consecutive_failures=1, open_for=5.0)
    _, fn = guard(cb)
    await trip(fn, 1)
    await anyio.sleep(4.0)
    with pytest.raises(sw.CircuitOpenError) as info:
        await fn("ok")
    assert info.value.retry_after == pytest.approx(1.0)
    await anyio.sleep(1.0)
    assert await outcome(fn, "ok") == "ok"
