"""The simulated downstream of ``tests/queueing.py`` does what the limit tests rely on."""

from __future__ import annotations

import math

import pytest

from .queueing import Downstream


def test_below_capacity_a_request_takes_its_service_time() -> None:
    downstream = Downstream(capacity=3, queue=0, median=0.1)
    assert [downstream.arrive(1.0) for _ in range(3)] == [1.1, 1.1, 1.1]
    assert downstream.waiting(1.0) == 0


def test_above_capacity_requests_wait_their_turn_in_fifo_order() -> None:
    downstream = Downstream(capacity=2, queue=None, median=1.0)
    finishes = [downstream.arrive(0.0) for _ in range(6)]
    assert finishes == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert downstream.waiting(0.0) == 4
    assert downstream.waiting(1.0) == 2  # two of them started at 1.0
    assert downstream.waiting(2.5) == 0


def test_latency_grows_with_the_load_by_a_service_time_per_capacity_waiting() -> None:
    downstream = Downstream(capacity=10, queue=None, median=0.05)
    latencies = []
    for _ in range(100):  # all at once: the n-th waits n // 10 service times
        finish = downstream.arrive(0.0)
        assert finish is not None
        latencies.append(finish)
    assert latencies[0] == pytest.approx(0.05)
    assert latencies[-1] == pytest.approx(0.5)


def test_a_full_queue_turns_requests_away_at_once() -> None:
    downstream = Downstream(capacity=1, queue=2, median=1.0)
    assert [downstream.arrive(0.0) for _ in range(4)] == [1.0, 2.0, 3.0, None]
    assert (downstream.accepted, downstream.rejected) == (3, 1)
    assert downstream.arrive(1.0) == 4.0  # one started at 1.0: room again


def test_capacity_can_shrink_and_grow() -> None:
    downstream = Downstream(capacity=4, queue=None, median=1.0)
    downstream.set_capacity(0.0, 1)
    assert [downstream.arrive(0.0) for _ in range(2)] == [1.0, 2.0]
    downstream.set_capacity(0.5, 3)  # two more workers, free at once
    assert [downstream.arrive(0.5) for _ in range(3)] == [1.5, 1.5, 2.5]
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        downstream.set_capacity(1.0, 0)


def test_service_times_are_lognormal_and_reproducible() -> None:
    first = Downstream(capacity=1, queue=None, median=0.1, sigma=0.5, seed=3)
    again = Downstream(capacity=1, queue=None, median=0.1, sigma=0.5, seed=3)
    times = [first.service_time() for _ in range(20_000)]
    assert times[:100] == [again.service_time() for _ in range(100)]
    assert sorted(times)[10_000] == pytest.approx(0.1, rel=0.03)  # the median
    assert sum(times) / len(times) == pytest.approx(first.mean_service, rel=0.02)
    assert first.mean_service == pytest.approx(0.1 * math.exp(0.125))
    first.set_service(median=0.3, sigma=0.0)
    assert first.service_time() == 0.3
