from __future__ import annotations

import math
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw

from .conftest import Spans, sample


class Gate:
    """Calls that block until released, to hold bulkhead slots on demand."""

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.started: list[Any] = []

    async def __call__(self, tag: Any = None) -> Any:
        self.started.append(tag)
        await self.event.wait()
        return tag

    def open(self) -> None:
        self.event.set()


async def settle() -> None:
    """Let every runnable task run until it blocks (virtual time: instant)."""
    await anyio.sleep(0.001)


async def test_at_most_max_concurrent_calls_run_at_once() -> None:
    bulkhead = sw.Bulkhead(3, max_queued=None)
    running = peak = 0

    @bulkhead
    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(1)
        running -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(work)
        await settle()
        assert bulkhead.in_flight == 3
        assert bulkhead.queued == 7
    assert peak == 3
    assert bulkhead.in_flight == 0
    assert bulkhead.queued == 0


async def test_without_a_queue_excess_calls_are_rejected_at_once() -> None:
    gate = Gate()
    bulkhead = sw.Bulkhead(2, name="pdf")
    guarded = bulkhead(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        tg.start_soon(guarded)
        await settle()
        start = anyio.current_time()
        with pytest.raises(sw.BulkheadFullError) as info:
            await guarded()
        assert anyio.current_time() == start
        assert info.value.policy == "pdf"
        assert str(info.value) == "bulkhead 'pdf' is full: 2 of 2 slots taken, 0 calls queued"
        gate.open()


async def test_the_refusal_says_one_slot_and_one_call_in_the_singular() -> None:
    gate = Gate()
    guarded = sw.Bulkhead(1, max_queued=1, name="pdf")(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        tg.start_soon(guarded)
        await settle()
        with pytest.raises(sw.BulkheadFullError) as info:
            await guarded()
        gate.open()
    assert str(info.value) == "bulkhead 'pdf' is full: 1 of 1 slot taken, 1 call queued"


async def test_the_queue_is_bounded() -> None:
    gate = Gate()
    bulkhead = sw.Bulkhead(1, max_queued=2)
    guarded = bulkhead(gate)
    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(guarded, i)
        await settle()
        assert (bulkhead.in_flight, bulkhead.queued) == (1, 2)
        with pytest.raises(sw.BulkheadFullError):
            await guarded("late")
        gate.open()
    assert sorted(gate.started) == [0, 1, 2]


async def test_waiters_get_slots_in_fifo_order() -> None:
    order: list[int] = []
    bulkhead = sw.Bulkhead(1, max_queued=None)

    @bulkhead
    async def work(i: int) -> None:
        order.append(i)
        await anyio.sleep(1)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(work, i)
            await anyio.sleep(0.001)  # arrive in a known order
    assert order == list(range(20))


async def test_a_newcomer_never_jumps_the_queue() -> None:
    order: list[str] = []
    bulkhead = sw.Bulkhead(1, max_queued=None)

    @bulkhead
    async def work(tag: str) -> None:
        order.append(tag)
        await anyio.sleep(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(work, "first")
        await settle()
        tg.start_soon(work, "queued")
        await anyio.sleep(1.0 - 0.001)  # just before "first" finishes
        tg.start_soon(work, "newcomer")
    assert order == ["first", "queued", "newcomer"]


async def test_max_wait_bounds_the_time_in_the_queue() -> None:
    gate = Gate()
    bulkhead = sw.Bulkhead(1, max_queued=5, max_wait=2.0)
    guarded = bulkhead(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        await settle()
        start = anyio.current_time()
        with pytest.raises(sw.BulkheadFullError):
            await guarded()
        assert anyio.current_time() - start == pytest.approx(2.0)
        assert bulkhead.queued == 0
        gate.open()


async def test_zero_max_wait_rejects_without_queueing() -> None:
    gate = Gate()
    bulkhead = sw.Bulkhead(1, max_queued=5, max_wait=0)
    guarded = bulkhead(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        await settle()
        with pytest.raises(sw.BulkheadFullError):
            await guarded()
        gate.open()


async def test_a_waiter_served_within_max_wait_runs() -> None:
    bulkhead = sw.Bulkhead(1, max_queued=1, max_wait=5.0)

    @bulkhead
    async def work(seconds: float) -> float:
        await anyio.sleep(seconds)
        return seconds

    results: list[float] = []

    async def run(seconds: float) -> None:
        results.append(await work(seconds))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, 3.0)
        await settle()
        tg.start_soon(run, 1.0)
    assert results == [3.0, 1.0]


async def test_a_slot_is_given_back_when_the_call_fails() -> None:
    bulkhead = sw.Bulkhead(1)

    @bulkhead
    async def boom() -> None:
        raise ValueError

    for _ in range(3):
        with pytest.raises(ValueError):
            await boom()
    assert bulkhead.in_flight == 0


async def test_a_slot_is_given_back_when_the_call_is_cancelled() -> None:
    bulkhead = sw.Bulkhead(1)
    with anyio.move_on_after(1):
        await bulkhead.call(anyio.sleep, 10)
    assert bulkhead.in_flight == 0

    async def free() -> str:
        return "free"

    assert await bulkhead.call(free) == "free"


async def test_a_call_cancelled_while_queued_leaves_the_queue() -> None:
    gate = Gate()
    bulkhead = sw.Bulkhead(1, max_queued=None)
    guarded = bulkhead(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded, "holder")
        await settle()
        with anyio.move_on_after(1) as scope:
            await guarded("cancelled")
        assert scope.cancelled_caught
        assert (bulkhead.in_flight, bulkhead.queued) == (1, 0)
        tg.start_soon(guarded, "next")
        await settle()
        gate.open()
    assert gate.started == ["holder", "next"]
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


async def test_a_slot_granted_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    bulkhead = sw.Bulkhead(1, max_queued=None)
    served: list[str] = []
    waiter_scope = anyio.CancelScope()

    @bulkhead
    async def work(tag: str) -> None:
        served.append(tag)
        if tag == "holder":
            await anyio.sleep(1)
            # Cancel the first waiter in the same instant its slot is handed over.
            waiter_scope.cancel()

    async def cancelled_waiter() -> None:
        with waiter_scope:
            await work("cancelled")

    async with anyio.create_task_group() as tg:
        tg.start_soon(work, "holder")
        await settle()
        tg.start_soon(cancelled_waiter)
        await settle()
        tg.start_soon(work, "third")
        await settle()
        assert bulkhead.queued == 2
    assert "third" in served
    assert "cancelled" not in served
    assert (bulkhead.in_flight, bulkhead.queued) == (0, 0)


async def test_abandoned_waiters_do_not_pile_up() -> None:
    gate = Gate()
    bulkhead = sw.Bulkhead(1, max_queued=None)
    guarded = bulkhead(gate)
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        await settle()
        for _ in range(500):
            with anyio.move_on_after(0.001):
                await guarded()
        assert bulkhead.queued == 0
        assert len(bulkhead._queue.waiters) < 130
        gate.open()


async def test_statistics_snapshot() -> None:
    gate = Gate()
    bulkhead = sw.Bulkhead(2, max_queued=4)
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(bulkhead(gate))
        await settle()
        assert bulkhead.statistics() == sw.BulkheadStatistics(
            max_concurrent=2, max_queued=4, in_flight=2, queued=1
        )
        gate.open()


async def test_gauges_and_rejections_are_reported(
    registry: CollectorRegistry, telemetry: sw.Telemetry, spans: Spans
) -> None:
    gate = Gate()
    bulkhead = sw.Bulkhead(1, max_queued=1, name="bh", telemetry=telemetry)
    guarded = bulkhead(gate)
    assert sample(registry, "stalwart_bulkhead_in_flight", policy="bh") == 0
    assert sample(registry, "stalwart_bulkhead_queued", policy="bh") == 0
    assert sample(registry, "stalwart_bulkhead_rejected_total", policy="bh") == 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(guarded)
        tg.start_soon(guarded)
        await settle()
        assert sample(registry, "stalwart_bulkhead_in_flight", policy="bh") == 1
        assert sample(registry, "stalwart_bulkhead_queued", policy="bh") == 1
        with pytest.raises(sw.BulkheadFullError):
            await guarded()
        gate.open()
    assert sample(registry, "stalwart_bulkhead_rejected_total", policy="bh") == 1
    assert sample(registry, "stalwart_bulkhead_in_flight", policy="bh") == 0
    rejected = [s for s in spans.named("stalwart.bulkhead bh") if not s.status.is_ok]
    assert len(rejected) == 1
    assert [e.name for e in rejected[0].events] == ["stalwart.bulkhead.rejected", "exception"]


async def test_bulkheads_sharing_a_name_warn_and_share_their_gauges(
    registry: CollectorRegistry,
) -> None:
    telemetry = sw.Telemetry(registry=registry)
    gate = Gate()
    a = sw.Bulkhead(1, name="shared", telemetry=telemetry)
    with pytest.warns(sw.StalwartWarning, match="another live bulkhead named 'shared'"):
        b = sw.Bulkhead(1, name="shared", telemetry=telemetry)
    async with anyio.create_task_group() as tg:
        tg.start_soon(a(gate))
        tg.start_soon(b(gate))
        await settle()
        assert sample(registry, "stalwart_bulkhead_in_flight", policy="shared") == 2
        gate.open()


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "param"),
    [
        ((0,), {}, ValueError, "max_concurrent"),
        ((-1,), {}, ValueError, "max_concurrent"),
        ((1.5,), {}, TypeError, "max_concurrent"),
        ((True,), {}, TypeError, "max_concurrent"),
        ((1,), {"max_queued": -1}, ValueError, "max_queued"),
        ((1,), {"max_queued": 2.0}, TypeError, "max_queued"),
        ((1,), {"max_wait": -0.5}, ValueError, "max_wait"),
        ((1,), {"max_wait": math.nan}, ValueError, "max_wait"),
        ((1,), {"max_wait": math.inf}, ValueError, "max_wait"),
    ],
)
def test_invalid_options_fail_at_construction_naming_the_parameter(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], param: str
) -> None:
    with pytest.raises(error, match=param):
        sw.Bulkhead(*args, **kwargs)


def test_decorating_a_sync_function_with_a_bulkhead_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="async def"):
        sw.Bulkhead(1)(print)  # type: ignore[arg-type]
