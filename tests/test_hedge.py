"""Hedge: another attempt beside a slow one, the first success wins, nothing left behind.

Every test runs in virtual time on asyncio and on trio. Latencies and delays
are chosen so that no two events fall on the same instant unless the test is
about that instant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart._retry import retries_disabled
from stalwart.events import Event, Hedged

from .conftest import Spans, sample

pytestmark = pytest.mark.anyio


def now() -> float:
    return anyio.current_time()


class Backend:
    """A dependency whose n-th attempt takes ``latencies[n]`` seconds, then returns or raises.

    Records when each attempt started, and which were cancelled or ended.
    """

    def __init__(self, latencies: Sequence[float], errors: Sequence[BaseException | None] = ()):
        self.latencies = list(latencies)
        self.errors = list(errors)
        self.started: list[float] = []
        self.cancelled: list[int] = []
        self.ended: list[int] = []

    async def __call__(self) -> int:
        n = len(self.started)
        self.started.append(now())
        try:
            await anyio.sleep(self.latencies[n % len(self.latencies)])
        except BaseException:
            self.cancelled.append(n)
            raise
        finally:
            self.ended.append(n)
        error = self.errors[n] if n < len(self.errors) else None
        if error is not None:
            raise error
        return n


def fresh(hedges: int = 1, **options: Any) -> sw.Hedge:
    return sw.Hedge(hedges, telemetry=sw.Telemetry(registry=CollectorRegistry()), **options)


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"hedges": 0}, ValueError, "hedges must be >= 1"),
        ({"hedges": 17}, ValueError, "hedges must be at most 16"),
        ({"hedges": 1.0}, TypeError, "hedges must be an int"),
        ({"delay": -0.1}, ValueError, "delay must be >= 0"),
        ({"delay": math.nan}, ValueError, "delay must be finite"),
        ({"delay": "50ms"}, TypeError, "delay must be a number of seconds or a stalwart"),
        ({"delay": True}, TypeError, "delay must be a number of seconds or a stalwart"),
        ({"on": 3}, TypeError, "on must be an exception type"),
        ({"budget": 0.1}, TypeError, "budget must be a stalwart.RetryBudget"),
        ({"discard": "close"}, TypeError, "discard must be callable"),
        ({"name": ""}, ValueError, "name must be"),
    ],
)
def test_bad_options_are_refused_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        sw.Hedge(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantile": 1.0}, "quantile must be strictly between 0 and 1"),
        ({"quantile": 0}, "quantile must be strictly between 0 and 1"),
        ({"minimum": 0}, "minimum must be > 0"),
        ({"minimum": 0.5, "maximum": 0.5}, "maximum must be > minimum"),
        ({"maximum": math.inf}, "maximum must be finite"),
        ({"half_life": 0}, "half_life must be > 0"),
        ({"warmup": 0}, "warmup must be >= 1"),
    ],
)
def test_bad_adaptive_delays_are_refused_naming_the_parameter(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        sw.AdaptiveDelay(**kwargs)


def test_the_options_read_back() -> None:
    budget = sw.RetryBudget()
    adaptive = sw.AdaptiveDelay(quantile=0.9)
    hedge = sw.Hedge(2, delay=adaptive, on=OSError, budget=budget)
    assert (hedge.hedges, hedge.delay, hedge.on, hedge.budget) == (2, adaptive, OSError, budget)
    assert "Hedge(2" in repr(hedge)


# -- when hedges start ----------------------------------------------------------------------


async def test_a_fast_call_makes_one_attempt() -> None:
    backend = Backend([0.04])
    hedge = fresh(delay=0.05)
    assert await hedge.call(backend) == 0
    assert backend.started == [0.0]
    assert hedge.metrics.hedges == 0  # type: ignore[attr-defined]


async def test_the_hedge_starts_at_the_delay_and_not_before() -> None:
    backend = Backend([1.0, 0.01])
    start = now()
    assert await fresh(delay=0.05).call(backend) == 1
    assert [t - start for t in backend.started] == pytest.approx([0.0, 0.05])
    assert now() - start == pytest.approx(0.06)


async def test_each_hedge_waits_the_delay_after_the_one_before() -> None:
    backend = Backend([1.0, 1.0, 0.01])
    start = now()
    assert await fresh(2, delay=0.1).call(backend) == 2
    assert [t - start for t in backend.started] == pytest.approx([0.0, 0.1, 0.2])


async def test_the_first_success_wins_and_the_others_are_cancelled_and_awaited() -> None:
    backend = Backend([1.0, 1.0, 0.05])
    hedge = fresh(2, delay=0.1)
    assert await hedge.call(backend) == 2
    # Both losers were cancelled, and had finished unwinding when the call returned.
    assert sorted(backend.cancelled) == [0, 1]
    assert sorted(backend.ended) == [0, 1, 2]
    assert hedge.metrics.hedges == 2  # type: ignore[attr-defined]
    assert hedge.metrics.won == 1  # type: ignore[attr-defined]


async def test_the_first_attempt_can_still_win_after_a_hedge_started() -> None:
    backend = Backend([0.08, 1.0])
    hedge = fresh(delay=0.05)
    assert await hedge.call(backend) == 0
    assert backend.cancelled == [1]
    assert hedge.metrics.won == 0  # type: ignore[attr-defined]


async def test_a_failed_attempt_starts_the_next_hedge_at_once() -> None:
    backend = Backend([0.01, 0.02], [ValueError("first")])
    start = now()
    assert await fresh(delay=0.05).call(backend) == 1
    assert [t - start for t in backend.started] == pytest.approx([0.0, 0.01])


async def test_when_every_attempt_fails_the_last_failure_propagates() -> None:
    errors = [ValueError("first"), ValueError("second"), ValueError("third")]
    backend = Backend([0.5, 0.3, 0.01], errors)
    with pytest.raises(ValueError, match="first") as info:
        await fresh(2, delay=0.1).call(backend)
    assert info.value is errors[0]  # the last to fail (at 0.5), unchanged
    assert backend.cancelled == []


async def test_an_error_on_does_not_match_ends_the_call_and_cancels_the_rest() -> None:
    backend = Backend([1.0, 0.01], [None, KeyError("bad request")])
    with pytest.raises(KeyError):
        await fresh(delay=0.05, on=OSError).call(backend)
    assert backend.cancelled == [0]
    assert now() == pytest.approx(0.06)


async def test_zero_delay_starts_every_attempt_at_once() -> None:
    backend = Backend([0.3, 0.2, 0.1])
    assert await fresh(2, delay=0).call(backend) == 2
    assert backend.started == [0.0, 0.0, 0.0]


async def test_a_late_winner_is_discarded() -> None:
    released: list[int] = []
    gate = anyio.Event()
    started: list[int] = []

    async def attempt() -> int:
        started.append(len(started))
        n = started[-1]
        await gate.wait()  # both wake in one turn: the second finds the call won
        return n

    async def close(result: int) -> None:
        await anyio.sleep(0.001)  # shielded: the call's group is cancelled meanwhile
        released.append(result)

    async def open_gate() -> None:
        await anyio.sleep(0.1)
        gate.set()

    async with anyio.create_task_group() as group:
        group.start_soon(open_gate)
        winner = await fresh(delay=0, discard=close).call(attempt)
    assert released == [1 - winner]


async def test_a_shielded_first_attempt_is_interrupted_once_its_shield_ends() -> None:
    ended: list[str] = []

    async def attempt() -> str:
        if not ended:
            ended.append("first started")
            try:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(0.2)  # a winning hedge must not cut this short
                ended.append("shield over")
                await anyio.sleep(10)
            except BaseException:
                ended.append("first cancelled")
                raise
            return "first"
        await anyio.sleep(0.01)
        return "hedge"

    assert await fresh(delay=0.05).call(attempt) == "hedge"
    assert ended == ["first started", "shield over", "first cancelled"]
    assert 0.2 <= now() < 0.215


@pytest.mark.parametrize("looked_up", [True, False])
async def test_a_first_attempt_under_the_callers_own_shield_is_still_cut(
    anyio_backend_name: str, looked_up: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's shield is outside the call: a losing first attempt is cut at once.

    On asyncio the call records the caller's anyio scope at its start, to
    tell a shield inside the attempt from one around the call; also when
    stalwart has not yet read anyio's table of task states
    (``looked_up=False``), and on the call that finds the policy's lane.
    """
    from stalwart import _privates

    policy = fresh(delay=0.05)
    for call in range(2):  # the first call on a loop, then one through its lane
        if anyio_backend_name == "asyncio" and not looked_up:
            monkeypatch.setattr(_privates, "_anyio_states", None)
        backend = Backend([1.0, 0.01])
        began = now()
        with anyio.CancelScope(shield=True):
            assert await policy.call(backend) == 1, call
        assert backend.cancelled == [0], call
        assert now() - began == pytest.approx(0.06), call


async def test_no_hedge_where_repeating_is_not_safe() -> None:
    backend = Backend([1.0, 0.01])
    with retries_disabled():
        assert await fresh(delay=0.05).call(backend) == 0
    assert len(backend.started) == 1


@pytest.mark.parametrize(
    ("latencies", "errors"),
    [
        ([1.0], [None]),  # slow, succeeds after the delay
        ([1.0], [ConnectionError("late")]),  # fails after the delay
        ([0.01], [ConnectionError("early")]),  # fails before the delay
    ],
    ids=["slow success", "fails late", "fails early"],
)
async def test_no_hedge_where_repeating_is_not_safe_on_a_warm_policy(
    latencies: list[float], errors: list[BaseException | None]
) -> None:
    # A policy that has made calls on this loop (on asyncio: its lane), then calls
    # inside retries_disabled: one attempt each, its own outcome, and the policy
    # hedges as before once outside again.
    policy = fresh(delay=0.05)
    assert await policy.call(Backend([0.01])) == 0
    backend = Backend(latencies, errors)
    with retries_disabled():
        if errors[0] is None:
            assert await policy.call(backend) == 0
        else:
            with pytest.raises(ConnectionError) as raised:
                await policy.call(backend)
            assert raised.value is errors[0]
    assert len(backend.started) == 1
    assert policy.metrics.hedges == 0  # type: ignore[attr-defined]
    after = Backend([1.0, 0.01])
    assert await policy.call(after) == 1
    assert len(after.started) == 2


async def test_a_task_being_cancelled_starts_no_hedge(anyio_backend_name: str) -> None:
    # Cancelled before the delay, the attempt cleans up past it: no hedge joins a
    # call whose caller is leaving, and the cancellation propagates.
    started: list[float] = []

    async def attempt() -> int:
        started.append(now())
        try:
            await anyio.sleep(1.0)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.1)  # cleanup, past the delay
        return 0

    policy = fresh(delay=0.05)
    await policy.call(Backend([0.01]))  # warm: on asyncio, the call takes the lane
    with anyio.CancelScope() as scope:
        scope.deadline = now() + 0.01
        await policy.call(attempt)
    assert scope.cancelled_caught
    assert len(started) == 1
    assert policy.metrics.hedges == 0  # type: ignore[attr-defined]
    assert policy.metrics.cancelled == 1


# -- deadlines, budgets, cancellation -------------------------------------------------------


async def test_no_hedge_starts_once_the_deadline_has_passed() -> None:
    backend = Backend([1.0, 0.01])
    with pytest.raises(sw.DeadlineExceeded), sw.deadline(0.05):
        await fresh(delay=0.05).call(backend)
    assert len(backend.started) == 1
    assert backend.cancelled == [0]


async def test_a_deadline_nearer_than_the_delay_cancels_every_attempt() -> None:
    backend = Backend([1.0, 1.0])
    hedge = fresh(delay=0.05)
    with pytest.raises(sw.DeadlineExceeded):
        await sw.Timeout(0.08).call(hedge.call, backend)
    assert sorted(backend.cancelled) == [0, 1]
    assert hedge.metrics.cancelled == 1


async def test_a_budget_denies_hedges_once_spent() -> None:
    # No ratio, a floor of one retry per window: one hedge in all.
    budget = sw.RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)
    hedge = fresh(delay=0.05, budget=budget)
    first, second = Backend([1.0, 0.01]), Backend([1.0, 0.01])
    assert await hedge.call(first) == 1
    assert await hedge.call(second) == 0
    assert len(second.started) == 1
    assert budget.statistics().retries == 1


async def test_a_budget_earns_hedges_from_calls() -> None:
    budget = sw.RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)
    hedge = fresh(delay=0.05, budget=budget)
    backends = [Backend([1.0, 0.01]) for _ in range(4)]
    results = [await hedge.call(b) for b in backends]
    # Each call earns half a hedge: the second and the fourth can hedge.
    assert results == [0, 1, 0, 1]


async def test_retries_and_hedges_sharing_a_budget_count_a_request_once() -> None:
    budget = sw.RetryBudget(ratio=0.1, min_per_second=10.0, window=10.0)
    backend = Backend([0.01, 0.01, 0.01], [OSError("a"), OSError("b")])
    policy = sw.Pipeline(
        sw.Retry(attempts=2, budget=budget, backoff=sw.Backoff(0, maximum=0)),
        fresh(delay=0.05, budget=budget),
    )
    assert await policy.call(backend) == 2
    stats = budget.statistics()
    assert stats.requests == 1  # the Hedge's call inside the Retry is no new request
    assert stats.retries == 2  # one hedge (after the first failure), one retry


async def test_the_callers_cancellation_cancels_every_attempt_and_leaves_no_task() -> None:
    backend = Backend([1.0, 1.0, 1.0])
    hedge = fresh(2, delay=0.05)
    with anyio.move_on_after(0.12) as scope:
        await hedge.call(backend)
    assert scope.cancelled_caught  # not swallowed: it reached the scope that asked
    assert sorted(backend.cancelled) == [0, 1, 2]
    assert sorted(backend.ended) == [0, 1, 2]
    assert hedge.metrics.cancelled == 1


async def test_no_task_outlives_the_call_on_asyncio(anyio_backend_name: str) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("counts asyncio tasks")
    import asyncio

    before = len(asyncio.all_tasks())
    for latencies in ([1.0, 0.01], [0.01], [1.0, 1.0]):
        with anyio.move_on_after(0.08):
            await fresh(delay=0.05).call(Backend(latencies))
        assert len(asyncio.all_tasks()) == before


# -- many calls in flight: each is hedged at its own delay ----------------------------------


async def test_concurrent_calls_with_staggered_starts_are_each_hedged_at_their_own_delay() -> None:
    # Call i starts at 0.013 * i; every third one answers before the delay, the
    # others are hedged at exactly their start + 0.05. Four or so are in flight
    # at once, and fast ones end before slower, older ones are due, so on
    # asyncio the lane's one timer fires for calls already gone and looks
    # again for the next (see `_Lane`).
    hedge = fresh(delay=0.05)
    backends = [Backend([0.03 if i % 3 == 0 else 1.0, 0.02]) for i in range(12)]
    begun: list[float] = [0.0] * len(backends)
    results: list[int] = [-1] * len(backends)

    async def one(i: int) -> None:
        await anyio.sleep(0.013 * i)
        begun[i] = now()
        results[i] = await hedge.call(backends[i])

    async with anyio.create_task_group() as group:
        for i in range(len(backends)):
            group.start_soon(one, i)
    for i, backend in enumerate(backends):
        started = [t - begun[i] for t in backend.started]
        if i % 3 == 0:
            assert started == pytest.approx([0.0]), i
            assert results[i] == 0
        else:
            assert started == pytest.approx([0.0, 0.05]), i
            assert backend.cancelled == [0]
            assert results[i] == 1
    assert hedge.metrics.hedges == 8  # type: ignore[attr-defined]


async def test_calls_that_start_together_are_hedged_together() -> None:
    hedge = fresh(2, delay=0.05)
    backends = [Backend([1.0, 1.0, 0.01]) for _ in range(5)]
    start = now()
    async with anyio.create_task_group() as group:
        for backend in backends:
            group.start_soon(hedge.call, backend)
    for backend in backends:
        assert [t - start for t in backend.started] == pytest.approx([0.0, 0.05, 0.1])
        assert sorted(backend.cancelled) == [0, 1]


async def test_a_call_nested_in_a_call_of_the_same_policy_is_hedged_at_its_own_delay() -> None:
    # On asyncio the outer call's record in the lane is keyed by the task: the
    # inner one, in the same task, takes the loop's timer heap instead.
    hedge = fresh(delay=0.05)
    inner = Backend([1.0, 0.01])
    outer_started: list[float] = []

    async def outer() -> str:
        outer_started.append(now())
        if len(outer_started) == 1:
            assert await hedge.call(inner) == 1  # hedged at 0.05, answers at 0.06
            return "first"
        await anyio.sleep(1.0)
        return "hedge"

    await hedge.call(Backend([0.01]))  # (asyncio: the policy's first call on this loop)
    start = now()
    assert await hedge.call(outer) == "first"
    assert [t - start for t in inner.started] == pytest.approx([0.0, 0.05])
    assert [t - start for t in outer_started] == pytest.approx([0.0, 0.05])
    assert now() - start == pytest.approx(0.06)


# -- asyncio: one timer per policy and loop, armed only while calls are in flight ------------


def lane_timers(loop: Any) -> list[Any]:
    """The loop's armed timers that belong to a `Hedge`'s lane."""
    from stalwart._hedge import _Lane

    return [
        handle
        for handle in loop._scheduled
        if not handle.cancelled() and isinstance(getattr(handle._callback, "__self__", None), _Lane)
    ]


async def test_an_idle_loop_keeps_no_timer_and_the_timer_holds_no_call(
    anyio_backend_name: str,
) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("the lane and its timer are asyncio's (trio hedges in a cancel scope)")
    import asyncio
    import weakref

    loop = asyncio.get_running_loop()
    hedge = fresh(delay=0.05)

    class Argument:
        pass

    async def answer(argument: Argument) -> int:
        await anyio.sleep(0.01)
        return 1

    # A policy's first call on a loop takes the loop's timer heap, and
    # caches the loop: the next ones take the lane.
    assert await hedge.call(Backend([0.01])) == 0
    assert lane_timers(loop) == []
    argument = Argument()
    gone = weakref.ref(argument)
    assert await hedge(answer)(argument) == 1
    del argument
    # The call is over; its timer is still armed (it fires once more, at most
    # the delay later), and holds nothing of the call.
    assert len(lane_timers(loop)) == 1
    assert gone() is None
    await anyio.sleep(0.05)
    assert lane_timers(loop) == []
    # A hedged call: the timer fired for it and, nothing left, is not armed again.
    assert await hedge.call(Backend([1.0, 0.01])) == 1
    await anyio.sleep(0.05)
    assert lane_timers(loop) == []
    # A first attempt that failed, a cancelled call: neither leaves a record behind.
    assert await hedge.call(Backend([0.01, 0.01], [ValueError("first"), None])) == 1
    with anyio.move_on_after(0.02):
        await hedge.call(Backend([1.0]))
    lanes = hedge._lanes
    assert lanes is not None
    assert [(len(lane.calls), len(lane.fired)) for lane in lanes.values()] == [(0, 0)]
    await anyio.sleep(0.05)
    assert lane_timers(loop) == []


async def test_many_calls_in_flight_share_one_timer(anyio_backend_name: str) -> None:
    if anyio_backend_name != "asyncio":
        pytest.skip("the lane and its timer are asyncio's")
    import asyncio

    loop = asyncio.get_running_loop()
    hedge = fresh(delay=0.05)
    seen: list[int] = []

    async def slow() -> int:
        seen.append(len(lane_timers(loop)))
        await anyio.sleep(0.02)
        return 0

    await hedge.call(Backend([0.01]))  # the first call on a loop: the timer heap's
    async with anyio.create_task_group() as group:
        for _ in range(50):
            group.start_soon(hedge.call, slow)
    assert seen == [1] * 50


def test_several_loops_in_turn_share_a_hedge_and_a_closed_loop_is_released() -> None:
    import gc
    import weakref

    from stalwart.testing import VirtualClockEventLoop

    hedge = fresh(delay=0.05)

    def run_on_a_new_loop() -> weakref.ref[Any]:
        loop = VirtualClockEventLoop()
        backend = Backend([1.0, 0.01])
        try:
            assert loop.run_until_complete(hedge.call(backend)) == 1
            assert backend.started == pytest.approx([0.0, 0.05])
            # A second call, ended before the delay: the loop closes with its
            # lane's timer still armed.
            assert loop.run_until_complete(hedge.call(Backend([0.01]))) == 0
        finally:
            loop.close()
        return weakref.ref(loop)

    first = run_on_a_new_loop()
    second = run_on_a_new_loop()
    gc.collect()
    assert first() is None  # the policy held it only while it was the last loop used
    assert hedge.metrics.hedges == 2  # type: ignore[attr-defined]
    run_on_a_new_loop()
    gc.collect()
    assert second() is None


def test_loops_in_two_threads_share_a_hedge() -> None:
    import threading

    from stalwart.testing import VirtualClockEventLoop

    hedge = fresh(delay=0.05)
    failures: list[BaseException] = []

    async def calls() -> None:
        loop_start = now()
        for i in range(40):
            backend = Backend([1.0 if i % 2 else 0.01, 0.01])
            start = now()
            assert await hedge.call(backend) == i % 2
            expected = [0.0, 0.05] if i % 2 else [0.0]
            assert [t - start for t in backend.started] == pytest.approx(expected)
        assert now() - loop_start == pytest.approx(20 * 0.06 + 20 * 0.01)

    def run() -> None:
        loop = VirtualClockEventLoop()
        try:
            loop.run_until_complete(calls())
        except BaseException as exc:
            failures.append(exc)
        finally:
            loop.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert hedge.metrics.hedges == 40  # type: ignore[attr-defined]


# -- the adaptive delay ---------------------------------------------------------------------


async def calls(hedge: sw.Hedge, latency: float, n: int, gap: float = 0.1) -> None:
    for _ in range(n):
        await hedge.call(Backend([latency]))
        await anyio.sleep(gap)


async def test_the_adaptive_delay_is_its_maximum_until_warm() -> None:
    hedge = fresh(delay=sw.AdaptiveDelay(minimum=0.001, maximum=0.5, warmup=10))
    assert hedge.current_delay() == 0.5
    await calls(hedge, 0.01, 5)
    assert hedge.current_delay() == 0.5
    await calls(hedge, 0.01, 10)
    assert hedge.current_delay() == pytest.approx(0.01, rel=0.03)


async def test_the_adaptive_delay_tracks_a_shifting_distribution() -> None:
    adaptive = sw.AdaptiveDelay(quantile=0.9, minimum=0.001, maximum=1.0, half_life=2.0, warmup=5)
    hedge = fresh(delay=adaptive)
    await calls(hedge, 0.01, 100)
    assert hedge.current_delay() == pytest.approx(0.01, rel=0.03)
    # Slower: within 5 half-lives (100 calls 0.1 s apart) the p90 has followed.
    await calls(hedge, 0.2, 100)
    assert hedge.current_delay() == pytest.approx(0.2, rel=0.03)
    # Faster again: the old samples must fall below 10 % of the weight.
    await calls(hedge, 0.02, 150)
    assert hedge.current_delay() == pytest.approx(0.02, rel=0.03)


@pytest.mark.parametrize("latency", [0.0123, 0.02, 0.05])
async def test_a_steady_latency_never_hedges_once_learned(latency: float) -> None:
    # Every call takes the same time: the p95 is that time, and a delay of its
    # estimate (which may sit just under it) hedged every call.
    hedge = fresh(delay=sw.AdaptiveDelay(minimum=0.001, maximum=0.5, warmup=5))
    await calls(hedge, latency, 100)
    assert latency <= hedge.current_delay() <= latency * 1.05
    assert hedge.metrics.hedges == 0  # type: ignore[attr-defined]


async def test_only_the_tail_beyond_the_learned_p95_hedges() -> None:
    # 90 % of calls take 20 ms, 10 % take 300 ms: the p80 is the fast calls'
    # latency, and only the slow calls hedge (before, every call did).
    hedge = fresh(delay=sw.AdaptiveDelay(quantile=0.8, minimum=0.001, maximum=1.0, warmup=5))
    for i in range(200):
        await hedge.call(Backend([0.3 if i % 10 == 0 else 0.02, 0.02]))
        await anyio.sleep(0.1)
    assert 0.02 <= hedge.current_delay() <= 0.021
    assert hedge.metrics.hedges <= 20  # type: ignore[attr-defined]  # the slow ones, at most


async def test_losers_keep_the_adaptive_delay_from_sinking() -> None:
    # One call in four is slow. The slow first attempts lose to their hedges and
    # are cancelled, yet still count above the p50: the delay stays at the fast
    # calls' latency instead of collapsing to the minimum.
    adaptive = sw.AdaptiveDelay(quantile=0.5, minimum=0.001, maximum=1.0, half_life=5.0, warmup=5)
    hedge = fresh(delay=adaptive)
    for i in range(200):
        await hedge.call(Backend([1.0 if i % 4 == 0 else 0.02, 0.02]))
        await anyio.sleep(0.1)
    assert hedge.current_delay() == pytest.approx(0.02, rel=0.03)


# -- telemetry ------------------------------------------------------------------------------


async def test_metrics_events_and_span_events(registry: CollectorRegistry, spans: Spans) -> None:
    events: list[Event] = []
    telemetry = sw.Telemetry(
        registry=registry, tracer_provider=spans.provider, listeners=[events.append]
    )
    hedge = sw.Hedge(2, delay=0.05, name="profiles", telemetry=telemetry)
    assert await hedge.call(Backend([1.0, 1.0, 0.01])) == 2
    assert await hedge.call(Backend([0.01])) == 0
    with pytest.raises(OSError):
        await hedge.call(Backend([0.01, 0.01, 0.01], [OSError(), OSError(), OSError()]))
    assert sample(registry, "stalwart_hedges_total", policy="profiles") == 4
    assert sample(registry, "stalwart_hedges_won_total", policy="profiles") == 1
    for outcome, count in (("success", 2), ("error", 1)):
        labels = {"policy": "profiles", "kind": "hedge", "outcome": outcome}
        assert sample(registry, "stalwart_calls_total", **labels) == count
    hedged = [e for e in events if isinstance(e, Hedged)]
    assert [e.attempt for e in hedged] == [2, 3, 2, 3]
    assert {(e.policy, e.kind) for e in hedged} == {("profiles", "hedge")}
    first = spans.named("stalwart.hedge profiles")[0]
    assert [(e.name, dict(e.attributes or {})["stalwart.attempt"]) for e in first.events] == [
        ("stalwart.hedge", 2),
        ("stalwart.hedge", 3),
    ]


async def test_in_a_pipeline_its_events_go_on_the_pipelines_span(spans: Spans) -> None:
    telemetry = sw.Telemetry(registry=CollectorRegistry(), tracer_provider=spans.provider)
    policy = sw.Pipeline(
        sw.Timeout(1.0, telemetry=telemetry),
        sw.Hedge(delay=0.05, telemetry=telemetry),
        sw.Timeout(0.5, telemetry=telemetry),
        telemetry=telemetry,
    )
    assert await policy.call(Backend([1.0, 0.01])) == 1
    span = spans.only()
    assert span.name == "stalwart.pipeline pipeline"
    assert [e.name for e in span.events] == ["stalwart.hedge"]


async def test_an_attempt_timeout_inside_starts_the_next_hedge_at_once() -> None:
    # Pipeline(Timeout, Hedge, Timeout): a hung attempt is cut at 0.2 s, which
    # starts the next one at once (the delay is longer than that).
    backend = Backend([10.0, 10.0, 0.01])
    policy = sw.Pipeline(sw.Timeout(1.0), fresh(2, delay=0.5), sw.Timeout(0.2))
    start = now()
    assert await policy.call(backend) == 2
    assert [t - start for t in backend.started] == pytest.approx([0.0, 0.2, 0.4])


def test_the_decorator_keeps_the_signature() -> None:
    @sw.Hedge()
    async def fetch(url: str, *, retries: int = 0) -> bytes:
        """Fetch it."""
        return b""

    assert fetch.__name__ == "fetch"
    assert fetch.__doc__ == "Fetch it."
