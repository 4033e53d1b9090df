from __future__ import annotations

import asyncio
import gc
import math
import sys
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw

from .conftest import Spans, jump, sample


async def sleeper(seconds: float, result: Any = "done") -> Any:
    await anyio.sleep(seconds)
    return result


# -- remaining() and deadline() ---------------------------------------------


async def test_remaining_is_none_without_a_deadline() -> None:
    assert sw.remaining() is None


def test_remaining_is_none_outside_any_event_loop() -> None:
    assert sw.remaining() is None


async def test_remaining_counts_down_inside_a_deadline() -> None:
    with sw.deadline(5.0):
        assert sw.remaining() == 5.0
        await anyio.sleep(2.0)
        assert sw.remaining() == pytest.approx(3.0)
    assert sw.remaining() is None


async def test_remaining_never_goes_negative() -> None:
    reached = False
    with pytest.raises(sw.DeadlineExceeded), sw.deadline(1.0):
        jump(3.0)  # time passes without a checkpoint: nothing cancelled yet
        assert sw.remaining() == 0.0
        await anyio.sleep(1.0)
        reached = True
    assert not reached


async def test_a_deadline_cancels_its_block_when_it_passes() -> None:
    reached = False
    start = anyio.current_time()
    with pytest.raises(sw.DeadlineExceeded) as info, sw.deadline(2.0):
        await anyio.sleep(10.0)
        reached = True
    assert not reached
    assert anyio.current_time() - start == pytest.approx(2.0)
    assert info.value.timeout == 2.0
    assert info.value.policy == "deadline"
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, sw.StalwartError)


async def test_a_deadline_that_is_met_changes_nothing() -> None:
    with sw.deadline(2.0):
        assert await sleeper(1.0) == "done"


async def test_a_deadline_works_as_an_async_context_manager() -> None:
    with pytest.raises(sw.DeadlineExceeded):
        async with sw.deadline(1.0):
            assert sw.remaining() == 1.0
            await anyio.sleep(5)


async def test_a_deadline_can_be_named() -> None:
    with pytest.raises(sw.DeadlineExceeded) as info, sw.deadline(1.0, name="request"):
        await anyio.sleep(5)
    assert info.value.policy == "request"


async def test_a_zero_deadline_cancels_at_the_first_checkpoint() -> None:
    with pytest.raises(sw.DeadlineExceeded), sw.deadline(0):
        await anyio.lowlevel.checkpoint()


async def test_a_zero_deadline_around_a_block_that_never_suspends_leaves_nothing_behind() -> None:
    # As asyncio.timeout(0): the block is not cancelled, and neither is the
    # task afterwards (on asyncio 3.11/3.12 the next await used to raise a
    # bare CancelledError).
    with sw.deadline(0):
        value = "cached"
    assert value == "cached"
    await anyio.lowlevel.checkpoint()
    with anyio.fail_after(1):
        await anyio.sleep(0.5)


async def test_a_timeout_entered_after_its_inherited_deadline_passed_leaves_no_trace() -> None:
    cache = {"sku-1": 42}

    @sw.Timeout(5.0)
    async def price(sku: str) -> int:
        return cache[sku]  # a cache hit: no await

    outcome: list[object] = []

    async def child() -> None:
        await anyio.sleep(2.0)  # the deadline it inherited passes meanwhile
        assert sw.remaining() == 0.0
        outcome.append(await price("sku-1"))
        await anyio.sleep(0.1)  # unrelated to the deadline: must not be cancelled
        outcome.append("went on")

    async with anyio.create_task_group() as tg:
        with sw.deadline(1.0):  # the task group is outside: only the child inherits it
            tg.start_soon(child)
    assert outcome == [42, "went on"]


async def test_a_timeout_entered_after_its_deadline_passed_still_cancels_at_a_checkpoint() -> None:
    @sw.Timeout(5.0)
    async def slow() -> str:
        await anyio.sleep(10.0)
        return "done"

    with sw.deadline(1.0):
        jump(2.0)
        with pytest.raises(sw.DeadlineExceeded) as info:
            await slow()
    assert info.value.timeout == 0.0
    await anyio.lowlevel.checkpoint()  # and the task goes on


async def test_nested_deadlines_only_shorten() -> None:
    start = anyio.current_time()
    with pytest.raises(sw.DeadlineExceeded) as info, sw.deadline(1.0), sw.deadline(60.0):
        assert sw.remaining() == 1.0
        await anyio.sleep(10)
    assert anyio.current_time() - start == pytest.approx(1.0)
    assert info.value.timeout == 1.0


async def test_a_nearer_nested_deadline_wins_and_the_outer_one_goes_on() -> None:
    with sw.deadline(10.0):
        with pytest.raises(sw.DeadlineExceeded) as info, sw.deadline(1.0):
            await anyio.sleep(5)
        assert info.value.timeout == 1.0
        assert sw.remaining() == pytest.approx(9.0)
        await anyio.sleep(2)  # the outer deadline still allows this


async def test_child_tasks_inherit_the_deadline_and_are_cancelled_with_it() -> None:
    seen: list[float | None] = []
    finished: list[str] = []

    async def child() -> None:
        seen.append(sw.remaining())
        await anyio.sleep(100)
        finished.append("child")  # pragma: no cover

    with pytest.raises(sw.DeadlineExceeded), sw.deadline(3.0):
        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
            tg.start_soon(child)
    assert seen == [3.0, 3.0]
    assert finished == []


async def test_a_child_started_outside_the_block_still_respects_the_inherited_deadline() -> None:
    outcome: list[object] = []

    async def child() -> None:
        try:
            await sw.Timeout(100.0).call(sleeper, 50.0)
        except sw.DeadlineExceeded as exc:
            outcome.append(exc.timeout)

    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        with sw.deadline(4.0):
            tg.start_soon(child)  # the child runs in tg's scope, after this block
    assert outcome == [4.0]
    assert anyio.current_time() - start == pytest.approx(4.0)


async def test_a_deadline_object_is_single_use() -> None:
    scope = sw.deadline(1.0)
    with scope:
        pass
    with pytest.raises(RuntimeError, match="already in use"), scope:
        pass  # pragma: no cover


async def test_deadline_exposes_its_absolute_time() -> None:
    start = anyio.current_time()
    with sw.deadline(2.5) as scope:
        assert scope.when == pytest.approx(start + 2.5)
        assert scope.seconds == 2.5


def test_deadline_when_before_entering_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not been entered"):
        _ = sw.deadline(1).when


async def test_an_external_cancellation_is_not_turned_into_a_deadline_error() -> None:
    with anyio.move_on_after(1.0) as outer:
        with sw.deadline(5.0):
            await anyio.sleep(10)
    assert outer.cancelled_caught


async def test_a_deadline_inside_a_shorter_cancel_scope_lets_the_scope_win() -> None:
    with anyio.move_on_after(1.0) as outer, sw.deadline(1.0):
        await anyio.sleep(10)
    # Both expire at t=1: either the scope caught it, or DeadlineExceeded was
    # raised and would have propagated; here nothing propagated.
    assert outer.cancel_called


async def test_a_deadline_lets_a_shielded_block_finish() -> None:
    finished = False
    start = anyio.current_time()
    with pytest.raises(sw.DeadlineExceeded), sw.deadline(1.0):
        with anyio.CancelScope(shield=True):
            await anyio.sleep(2.0)
            finished = True
        await anyio.sleep(10)  # the first checkpoint after the shield is cancelled
    assert finished
    # trio cancels at once; asyncio notices the shield's end within 10 ms.
    assert anyio.current_time() - start == pytest.approx(2.0, abs=0.011)


async def test_a_deadline_that_passes_during_a_shield_without_a_later_checkpoint_is_quiet() -> None:
    with sw.deadline(1.0), anyio.CancelScope(shield=True):
        await anyio.sleep(2.0)


async def test_a_timeout_inside_a_shielded_block_still_fires() -> None:
    with anyio.CancelScope(shield=True):
        with pytest.raises(sw.DeadlineExceeded):
            await sw.Timeout(1.0).call(anyio.sleep, 5)


async def test_a_timeout_cancels_a_shield_it_encloses_only_after_it() -> None:
    stamps: list[float] = []

    async def cleanup_then_wait() -> None:
        with anyio.CancelScope(shield=True):
            await anyio.sleep(3.0)
            stamps.append(anyio.current_time())
        await anyio.sleep(10)

    start = anyio.current_time()
    with pytest.raises(sw.DeadlineExceeded):
        await sw.Timeout(1.0).call(cleanup_then_wait)
    assert stamps == [pytest.approx(start + 3.0)]


async def test_shields_are_told_apart_in_one_task_and_across_tasks() -> None:
    # The same task, then others, alternate between a shield outside the
    # Timeout (which must fire) and one inside it (which it must wait for):
    # what the task's anyio state said last time must not leak into the next.
    async def shield_inside() -> float:
        start = anyio.current_time()
        with pytest.raises(sw.DeadlineExceeded):
            async with sw.deadline(1.0):
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(2.0)
                await anyio.sleep(10)
        return anyio.current_time() - start

    async def shield_outside() -> float:
        start = anyio.current_time()
        with anyio.CancelScope(shield=True), pytest.raises(sw.DeadlineExceeded):
            await sw.Timeout(1.0).call(anyio.sleep, 5)
        return anyio.current_time() - start

    async def check(case: Callable[[], Awaitable[float]], seconds: float) -> None:
        assert await case() == pytest.approx(seconds, abs=0.011)

    for _ in range(2):
        await check(shield_outside, 1.0)
        await check(shield_inside, 2.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(check, shield_outside, 1.0)
        tg.start_soon(check, shield_inside, 2.0)
    await check(shield_outside, 1.0)


@pytest.mark.parametrize("seconds", [-1.0, math.nan, math.inf])
def test_deadline_rejects_invalid_seconds(seconds: float) -> None:
    with pytest.raises(ValueError, match="seconds"):
        sw.deadline(seconds)


def test_deadline_rejects_non_numbers() -> None:
    with pytest.raises(TypeError, match="seconds"):
        sw.deadline("5")  # type: ignore[arg-type]


# -- Timeout -----------------------------------------------------------------


async def test_a_fast_call_passes_through_a_timeout() -> None:
    assert await sw.Timeout(5.0)(sleeper)(1.0, "x") == "x"


async def test_a_slow_call_is_cancelled_with_deadline_exceeded() -> None:
    start = anyio.current_time()
    with pytest.raises(sw.DeadlineExceeded) as info:
        await sw.Timeout(2.0, name="db")(sleeper)(10.0)
    assert anyio.current_time() - start == pytest.approx(2.0)
    assert info.value.timeout == 2.0
    assert info.value.policy == "db"
    assert "db" in str(info.value)


async def test_the_call_sees_the_timeout_as_its_ambient_deadline() -> None:
    @sw.Timeout(3.0)
    async def fn() -> float | None:
        return sw.remaining()

    assert await fn() == 3.0


async def test_a_nearer_ambient_deadline_sets_the_limit(registry: CollectorRegistry) -> None:
    timeout = sw.Timeout(10.0, name="t", telemetry=sw.Telemetry(registry=registry))
    start = anyio.current_time()
    with sw.deadline(2.0):
        with pytest.raises(sw.DeadlineExceeded) as info:
            await timeout(sleeper)(30.0)
        assert info.value.timeout == pytest.approx(2.0)
        assert info.value.policy == "t"
        assert str(info.value) == (
            "'t' timed out after 2s, the ambient deadline's time left (nearer than its own 10s)"
        )
    assert anyio.current_time() - start == pytest.approx(2.0)
    assert sample(registry, "stalwart_timeouts_total", policy="t") == 1


async def test_a_nearer_ambient_deadline_reports_the_time_that_was_left() -> None:
    with sw.deadline(5.0):
        await anyio.sleep(4.0)
        with pytest.raises(sw.DeadlineExceeded) as info:
            await sw.Timeout(10.0).call(sleeper, 30.0)
    assert info.value.timeout == pytest.approx(1.0)


async def test_a_timeout_never_extends_the_ambient_deadline() -> None:
    @sw.Timeout(60.0)
    async def fn() -> float | None:
        return sw.remaining()

    with sw.deadline(2.0):
        assert await fn() == 2.0


async def test_timeouts_are_counted_and_reported(
    registry: CollectorRegistry, telemetry: sw.Telemetry, spans: Spans
) -> None:
    timeout = sw.Timeout(1.0, name="counted", telemetry=telemetry)
    assert sample(registry, "stalwart_timeouts_total", policy="counted") == 0
    await timeout(sleeper)(0.5)
    with pytest.raises(sw.DeadlineExceeded):
        await timeout(sleeper)(5.0)
    assert sample(registry, "stalwart_timeouts_total", policy="counted") == 1
    ok, failed = spans.finished
    assert ok.name == failed.name == "stalwart.timeout counted"
    assert [e.name for e in ok.events] == []
    events = [e for e in failed.events if e.name == "stalwart.timeout"]
    assert len(events) == 1
    assert events[0].attributes == {"stalwart.policy": "counted", "stalwart.timeout": 1.0}
    assert failed.status.is_ok is False
    assert failed.attributes is not None
    assert failed.attributes["error.type"] == "stalwart.DeadlineExceeded"


async def test_an_external_cancellation_is_not_counted_as_a_timeout(
    registry: CollectorRegistry,
) -> None:
    timeout = sw.Timeout(10.0, name="ext", telemetry=sw.Telemetry(registry=registry))
    with anyio.move_on_after(1.0) as scope:
        await timeout(sleeper)(5.0)
    assert scope.cancelled_caught
    assert sample(registry, "stalwart_timeouts_total", policy="ext") == 0


async def test_a_timeout_error_raised_by_the_call_is_not_counted(
    registry: CollectorRegistry,
) -> None:
    timeout = sw.Timeout(10.0, name="own", telemetry=sw.Telemetry(registry=registry))

    @timeout
    async def fn() -> None:
        raise sw.DeadlineExceeded("from below", policy="other", timeout=1.0)

    with pytest.raises(sw.DeadlineExceeded, match="from below"):
        await fn()
    assert sample(registry, "stalwart_timeouts_total", policy="own") == 0


async def test_nested_timeouts_the_inner_nearer_one_fires() -> None:
    inner = sw.Timeout(1.0, name="inner")
    outer = sw.Timeout(5.0, name="outer")
    with pytest.raises(sw.DeadlineExceeded) as info:
        await outer(inner(sleeper))(3.0)
    assert info.value.policy == "inner"
    assert str(info.value) == "'inner' timed out after 1s"  # its own limit


async def test_nested_timeouts_the_outer_nearer_one_is_claimed_by_the_inner() -> None:
    inner = sw.Timeout(5.0, name="inner")
    outer = sw.Timeout(1.0, name="outer")
    with pytest.raises(sw.DeadlineExceeded) as info:
        await outer(inner(sleeper))(3.0)
    # The inner Timeout's limit was min(5, 1 left): it reports it.
    assert info.value.policy == "inner"
    assert info.value.timeout == pytest.approx(1.0)


async def test_many_sequential_timeouts_leave_no_timers_behind() -> None:
    timeout = sw.Timeout(1000.0)
    fn = timeout(sleeper)
    for _ in range(2000):
        await fn(0.001)
    await anyio.lowlevel.checkpoint()
    info = sw._clock.asyncio_loop()
    if sys.version_info >= (3, 11) and info is not None:
        from stalwart import _deadline

        timers = _deadline._timers_of(info)
        assert len(timers._heap) <= 600  # compacted: never all 2000 dead entries


async def test_timeout_in_many_concurrent_tasks() -> None:
    timeout = sw.Timeout(5.0)
    outcomes: list[str] = []

    async def run(i: int) -> None:
        try:
            await timeout.call(sleeper, float(i % 10))
            outcomes.append("ok")
        except sw.DeadlineExceeded:
            outcomes.append("timeout")

    async with anyio.create_task_group() as tg:
        for i in range(100):
            tg.start_soon(run, i)
    assert outcomes.count("ok") == 50  # sleeps 0..4 finish: half of them
    assert outcomes.count("timeout") == 50


@pytest.mark.parametrize("seconds", [0.0, -1.0, math.nan, math.inf])
def test_timeout_rejects_invalid_seconds(seconds: float) -> None:
    with pytest.raises(ValueError, match="seconds"):
        sw.Timeout(seconds)


def test_timeout_rejects_non_numbers() -> None:
    with pytest.raises(TypeError, match="seconds"):
        sw.Timeout(None)  # type: ignore[arg-type]


def test_decorating_a_sync_function_with_a_timeout_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="async def"):
        sw.Timeout(1.0)(lambda: None)  # type: ignore[arg-type,return-value]


# -- nothing kept alive (asyncio's own timer machinery: plain asyncio.run) ------


class Result:
    """A result that can be weakly referenced."""


def test_finished_event_loops_are_not_kept_alive() -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def main() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        await sw.Timeout(10.0).call(asyncio.sleep, 0)

    for _ in range(5):
        asyncio.run(main())
    gc.collect()
    # The last loop may stay cached until another loop is looked up.
    assert sum(ref() is not None for ref in loops) <= 1


def test_a_task_that_used_a_timeout_does_not_pin_its_result() -> None:
    async def produce() -> Result:
        return Result()

    async def work() -> Result:
        return await sw.Timeout(10.0).call(produce)

    async def main() -> None:
        # The first Timeout on the loop arms its timer from inside this task;
        # a later one keeps the loop's timer busy while we look.
        result = weakref.ref(await asyncio.create_task(work()))
        with sw.deadline(10.0):
            await asyncio.sleep(0)  # the loop lets go of the handle that woke us
            gc.collect()
            assert result() is None

    asyncio.run(main())


def test_child_tasks_keeping_an_exited_deadline_do_not_pin_its_task() -> None:
    async def main() -> None:
        release = asyncio.Event()
        children: list[asyncio.Task[None]] = []

        async def parent() -> None:
            with sw.deadline(30.0):
                # Inherits the deadline's scope, and outlives the block.
                children.append(asyncio.create_task(release.wait()))  # type: ignore[arg-type]

        task = asyncio.create_task(parent())
        await task
        parent_task = weakref.ref(task)
        del task
        await asyncio.sleep(0)  # the loop lets go of the handle that woke us
        gc.collect()
        assert parent_task() is None
        release.set()
        await children[0]

    asyncio.run(main())
