"""The breaker's windows against plain-list models of what they hold."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalwart._windows import CountRing, CountWindow, TimeRing, TimeWindow, ring_for

# An outcome: (failed, slow); a run of successes the breaker only counted is
# ("pending", n).
Outcome = tuple[bool, bool]

outcomes = st.tuples(st.booleans(), st.booleans())
steps = st.one_of(outcomes, st.tuples(st.just("pending"), st.integers(1, 300)), st.just("refresh"))


def check_count_ring(ring: CountRing, history: list[Outcome], size: int) -> None:
    ring.refresh(None)
    held = history[-size:]
    assert ring.calls == len(held)
    assert ring.failures == sum(failed for failed, _ in held)
    assert ring.slow == sum(slow for _, slow in held)
    run = 0
    for failed, _ in reversed(history):
        if not failed:
            break
        run += 1
    assert ring.run == run


@settings(max_examples=300)
@given(
    size=st.one_of(st.integers(1, 40), st.sampled_from([63, 64, 65, 257, 1000])),
    slow=st.booleans(),
    ops=st.lists(steps, max_size=80),
)
def test_a_count_ring_holds_the_last_size_outcomes(
    size: int, slow: bool, ops: list[object]
) -> None:
    ring = CountRing(size, slow=slow)
    history: list[Outcome] = []
    for op in ops:
        if op == "refresh":
            check_count_ring(ring, history, size)
        elif isinstance(op, tuple) and op[0] == "pending":
            ring.pending += op[1]
            history += [(False, False)] * op[1]
        else:
            assert isinstance(op, tuple)
            failed, was_slow = bool(op[0]), bool(op[1]) and slow
            ring.record(failed, was_slow, 0.0)
            history.append((failed, was_slow))
    check_count_ring(ring, history, size)
    ring.clear()
    check_count_ring(ring, [], size)


def test_a_count_ring_is_bit_packed() -> None:
    assert len(CountRing(1_000_000, slow=False)._bits) == 125_000
    assert len(CountRing(1_000_000, slow=True)._bits) == 250_000
    assert len(CountRing(100, slow=False)._bits) == 13
    assert sys.getsizeof(CountRing(1_000_000, slow=False)._bits) < 126_000


def test_successes_counted_in_bulk_evict_old_failures() -> None:
    ring = CountRing(1_000_000, slow=True)
    for _ in range(10):
        ring.record(True, True, 0.0)
    ring.pending += 999_995
    ring.refresh(None)
    assert (ring.calls, ring.failures, ring.slow) == (1_000_000, 5, 5)
    ring.pending += 5
    ring.refresh(None)
    assert (ring.calls, ring.failures, ring.slow, ring.run) == (1_000_000, 0, 0, 0)
    assert not any(ring._bits)


def check_time_ring(ring: TimeRing, history: list[tuple[float, bool, bool]], now: float) -> None:
    width = ring.window.seconds / ring.window.buckets
    current = now // width
    held = [o for o in history if current - ring.window.buckets < o[0] // width <= current]
    ring.refresh(now)
    assert ring.calls == len(held)
    assert ring.failures == sum(failed for _, failed, _ in held)
    assert ring.slow == sum(slow for _, _, slow in held)


@settings(max_examples=300)
@given(
    seconds=st.sampled_from([0.5, 1.0, 4.0, 10.0, 3.0]),
    buckets=st.integers(1, 12),
    ops=st.lists(
        st.one_of(outcomes, st.floats(0.0, 3.0).map(lambda x: round(x * 8) / 8)), max_size=60
    ),
)
def test_a_time_ring_holds_the_outcomes_of_its_buckets(
    seconds: float, buckets: int, ops: list[object]
) -> None:
    ring = TimeRing(TimeWindow(seconds, buckets))
    now = 100.0
    history: list[tuple[float, bool, bool]] = []
    for op in ops:
        if isinstance(op, float):
            now += op
            check_time_ring(ring, history, now)
        else:
            assert isinstance(op, tuple)
            failed, slow = bool(op[0]), bool(op[1])
            ring.record(failed, slow, now)
            history.append((now, failed, slow))
    check_time_ring(ring, history, now)
    ring.clear()
    check_time_ring(ring, [], now)


def test_a_time_ring_starts_over_when_the_clock_goes_back() -> None:
    ring = TimeRing(TimeWindow(10))
    ring.record(True, False, 500.0)
    ring.record(True, False, 0.5)  # another event loop, whose clock starts at 0
    assert (ring.calls, ring.failures, ring.run) == (1, 1, 2)


def test_a_time_ring_forgets_everything_after_a_long_pause() -> None:
    ring = TimeRing(TimeWindow(10))
    for i in range(20):
        ring.record(True, True, i * 0.25)
    ring.refresh(1e9)
    assert (ring.calls, ring.failures, ring.slow) == (0, 0, 0)


def test_ring_for_builds_the_ring_of_a_window() -> None:
    assert isinstance(ring_for(CountWindow(5), slow=False), CountRing)
    assert ring_for(TimeWindow(5), slow=True).window == TimeWindow(5)
    assert ring_for(CountWindow(5), slow=False).window == CountWindow(5)


def test_a_time_window_needs_buckets_of_some_width() -> None:
    with pytest.raises(ValueError, match="buckets"):
        TimeWindow(5e-324, buckets=4)
