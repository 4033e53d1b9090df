"""A Hedge over a Bulkhead and a ConcurrencyLimit: every attempt gives its slot back.

Each attempt of a hedged call takes a slot of each limit inside the hedge, and
most hedged calls end with an attempt cancelled (the loser, or every attempt
when the caller leaves). However the call ends, both limits are idle again
once it has: nothing in flight, nothing queued, and on asyncio no task left.

Every test runs in virtual time on asyncio and on trio, for a fixed delay, an
adaptive one (its maximum, the same 0.05 s, while it warms up: on asyncio a
call that takes no lane) and none at all (every attempt at once). Each
scenario is played twice on one stack: on asyncio, a fixed-delay policy's
first call on a loop takes no lane, and the calls after it run their first
attempt inline in the lane.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw

pytestmark = pytest.mark.anyio

DELAYS = pytest.mark.parametrize(
    "delay",
    [0.05, sw.AdaptiveDelay(minimum=0.001, maximum=0.05, warmup=1_000), 0.0],
    ids=["fixed", "adaptive", "zero"],
)


class Stack:
    """``Pipeline(Hedge, Bulkhead, ConcurrencyLimit)``, the hedge outermost.

    Roomy (two slots each, for the call and its hedge) unless ``tight``
    names the limit that has one slot and room for one call to wait.
    """

    def __init__(self, delay: float | sw.AdaptiveDelay, tight: str | None = None) -> None:
        telemetry = sw.Telemetry(registry=CollectorRegistry())
        self.bulkhead = sw.Bulkhead(
            1 if tight == "bulkhead" else 2, max_queued=1, telemetry=telemetry
        )
        slots = 1 if tight == "limit" else 2
        self.limit = sw.ConcurrencyLimit(
            algorithm="aimd",
            initial=slots,
            minimum=slots,
            maximum=slots,
            max_queued=1,
            telemetry=telemetry,
        )
        self.hedge = sw.Hedge(1, delay=delay, telemetry=telemetry)
        self.policy = sw.Pipeline(self.hedge, self.bulkhead, self.limit, telemetry=telemetry)

    def taken(self) -> tuple[int, int, int, int]:
        """Slots taken and calls waiting: the bulkhead's, then the limit's."""
        stats = self.bulkhead.statistics()
        return (stats.in_flight, stats.queued, self.limit.in_flight, self.limit.queued)

    async def sample(self, after: float, into: list[tuple[int, int, int, int]]) -> None:
        """Append what `taken` says ``after`` seconds from now."""
        await anyio.sleep(after)
        into.append(self.taken())

    def backend(
        self, latencies: Sequence[float], errors: Sequence[Exception | None] = ()
    ) -> Backend:
        return Backend(self, latencies, errors)


class Backend:
    """A dependency whose n-th attempt takes ``latencies[n]`` seconds, then returns n or raises.

    Records the slots taken (`Stack.taken`) as each attempt starts.
    """

    def __init__(
        self, stack: Stack, latencies: Sequence[float], errors: Sequence[Exception | None]
    ) -> None:
        self.stack = stack
        self.latencies = latencies
        self.errors = errors
        self.seen: list[tuple[int, int, int, int]] = []

    async def __call__(self) -> int:
        n = len(self.seen)
        self.seen.append(self.stack.taken())
        await anyio.sleep(self.latencies[n])
        error = self.errors[n] if n < len(self.errors) else None
        if error is not None:
            raise error
        return n


IDLE = (0, 0, 0, 0)
BOTH_ATTEMPTS_IN = (2, 0, 2, 0)  # as the second attempt starts: two slots taken in each


@pytest.fixture
def tasks(anyio_backend_name: str) -> Callable[[], int]:
    """The asyncio tasks alive now (0 on trio, where an attempt's task lives in a nursery)."""

    def count() -> int:
        if anyio_backend_name != "asyncio":
            return 0
        import asyncio

        return len(asyncio.all_tasks())

    return count


@DELAYS
@pytest.mark.parametrize(
    ("latencies", "winner"),
    [([1.0, 0.01], 1), ([0.08, 1.0], 0)],
    ids=["the-hedge-wins", "the-first-attempt-wins"],
)
async def test_the_cancelled_loser_gives_its_slots_back(
    delay: float | sw.AdaptiveDelay,
    latencies: list[float],
    winner: int,
    tasks: Callable[[], int],
) -> None:
    stack, before = Stack(delay), tasks()
    for _ in range(2):
        backend = stack.backend(latencies)
        assert await stack.policy.call(backend) == winner
        assert backend.seen[1] == BOTH_ATTEMPTS_IN
        assert stack.taken() == IDLE
        assert tasks() == before


@DELAYS
@pytest.mark.parametrize(
    "latencies",
    [[0.5, 0.3], [0.01, 0.02]],
    ids=["both-fail-after-the-delay", "the-first-fails-before-the-delay"],
)
async def test_attempts_that_all_fail_give_their_slots_back(
    delay: float | sw.AdaptiveDelay, latencies: list[float], tasks: Callable[[], int]
) -> None:
    stack, before = Stack(delay), tasks()
    for _ in range(2):
        backend = stack.backend(latencies, [OSError("first"), OSError("second")])
        with pytest.raises(OSError):
            await stack.policy.call(backend)
        assert len(backend.seen) == 2
        assert stack.taken() == IDLE
        assert tasks() == before


@DELAYS
async def test_a_call_the_caller_cancels_gives_every_slot_back(
    delay: float | sw.AdaptiveDelay, tasks: Callable[[], int]
) -> None:
    stack, before = Stack(delay), tasks()
    for _ in range(2):
        backend = stack.backend([1.0, 1.0])
        with anyio.move_on_after(0.08) as scope:
            await stack.policy.call(backend)
        assert scope.cancelled_caught
        assert backend.seen[1] == BOTH_ATTEMPTS_IN
        assert stack.taken() == IDLE
        assert tasks() == before


@DELAYS
@pytest.mark.parametrize(
    ("tight", "waiting"),
    [("bulkhead", (1, 1, 1, 0)), ("limit", (2, 0, 1, 1))],
    ids=["in-the-bulkhead", "in-the-limit"],
)
@pytest.mark.parametrize(
    "cancel_after", [math.inf, 0.08], ids=["the-first-attempt-wins", "the-caller-cancels"]
)
async def test_a_hedge_waiting_for_a_slot_gives_its_place_back(
    delay: float | sw.AdaptiveDelay,
    tight: str,
    waiting: tuple[int, int, int, int],
    cancel_after: float,
    tasks: Callable[[], int],
) -> None:
    # The first attempt holds the one slot and the hedge waits in line for it,
    # until the first attempt ends (it wins at 0.1, or the caller cancels it
    # at 0.08): the slot is handed to the hedge just as it is cancelled.
    stack, before = Stack(delay, tight), tasks()
    for _ in range(2):
        backend = stack.backend([0.1, 0.01])
        sampled: list[tuple[int, int, int, int]] = []
        results: list[int] = []
        async with anyio.create_task_group() as group:
            group.start_soon(stack.sample, 0.07, sampled)
            with anyio.move_on_after(cancel_after):
                results.append(await stack.policy.call(backend))
        assert sampled == [waiting]
        assert results == ([0] if cancel_after == math.inf else [])
        assert stack.taken() == IDLE
        assert tasks() == before
