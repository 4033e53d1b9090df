"""The SRE book's client-side throttle: its counts, its formula, its draws, its window."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from stalwart._throttle_window import ThrottleWindow


class Draws(random.Random):
    """A `random.Random` that returns the given numbers, in order (and fails if it runs out)."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)
        self.drawn = 0

    def random(self) -> float:
        self.drawn += 1
        return self.values.pop(0)


NEVER = 1.0 - 2**-53  # the largest number random() returns: refuses only when p is 1


def counted(requests: int, accepts: int, *, k: float = 2.0, now: float = 0.0) -> ThrottleWindow:
    """A throttle whose window holds exactly these counts (no call refused on the way)."""
    window = ThrottleWindow(k=k, window=60.0)
    for _ in range(requests):
        assert window.admit(now, Draws(NEVER))
    for _ in range(accepts):
        window.accept(now)
    assert (window.requests, window.accepts) == (requests, accepts)
    return window


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"k": 0.5}, ValueError, "k must be >= 1"),
        ({"k": math.inf}, ValueError, "k must be finite"),
        ({"k": "2"}, TypeError, "k must be a number"),
        ({"window": 0}, ValueError, "window must be > 0"),
        ({"window": -1.0}, ValueError, "window must be > 0"),
        ({"buckets": 0}, ValueError, "buckets must be >= 1"),
        ({"window": 5e-324, "buckets": 2}, ValueError, "window / buckets must be > 0"),
    ],
)
def test_bad_options_are_refused_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ThrottleWindow(**options)


def test_options_are_kept() -> None:
    window = ThrottleWindow(k=1.5, window=30.0, buckets=6)
    assert (window.k, window.window) == (1.5, 30.0)
    assert repr(window) == "ThrottleWindow(k=1.5, window=30, buckets=6)"


@pytest.mark.parametrize(
    ("requests", "accepts", "k", "expected"),
    [
        (0, 0, 2.0, 0.0),
        (1, 0, 2.0, 1 / 2),
        (10, 3, 2.0, 4 / 11),
        (10, 5, 2.0, 0.0),  # exactly k * accepts: nothing to refuse
        (10, 4, 2.0, 2 / 11),
        (100, 0, 2.0, 100 / 101),
        (100, 40, 1.5, 40 / 101),
        (7, 7, 1.0, 0.0),
        (50, 49, 1.0, 1 / 51),
    ],
)
def test_the_probability_follows_the_formula(
    requests: int, accepts: int, k: float, expected: float
) -> None:
    window = counted(requests, accepts, k=k)
    assert window.rejection_probability(0.0) == pytest.approx(expected, rel=1e-15, abs=0.0)
    assert window.rejection_probability(0.0) == max(0.0, (requests - k * accepts) / (requests + 1))


def test_a_call_is_refused_when_the_draw_falls_below_the_probability() -> None:
    window = counted(10, 3)  # p = 4/11 = 0.3636...
    assert not window.admit(0.0, Draws(0.36))
    window = counted(10, 3)
    assert window.admit(0.0, Draws(0.37))


def test_a_healthy_dependency_costs_no_draw() -> None:
    window = counted(10, 10)
    rng = Draws()  # any draw would fail: there is nothing to draw
    assert all(window.admit(0.0, rng) for _ in range(10))
    assert rng.drawn == 0


def test_a_refused_call_still_counts_as_a_request() -> None:
    window = counted(10, 3)
    assert not window.admit(0.0, Draws(0.0))
    assert (window.requests, window.accepts) == (11, 3)
    assert window.rejection_probability(0.0) == (11 - 6) / 12


def test_the_probability_never_reaches_one() -> None:
    window = counted(10_000, 0)
    assert window.rejection_probability(0.0) == 10_000 / 10_001
    assert window.admit(0.0, Draws(NEVER))


def test_counts_leave_the_window_a_slice_at_a_time() -> None:
    window = ThrottleWindow(k=2.0, window=10.0, buckets=5)  # slices of 2 s
    for t in (0.0, 1.0, 2.5, 4.0, 9.9):
        window.admit(t, Draws(NEVER))
        window.accept(t)
    assert window.requests == 5
    window.rejection_probability(10.0)  # slice [0, 2) left the window
    assert (window.requests, window.accepts) == (3, 3)
    window.rejection_probability(13.9)  # [2, 4) left too
    assert (window.requests, window.accepts) == (2, 2)
    window.rejection_probability(17.99)  # [8, 18) still holds the call at 9.9
    assert (window.requests, window.accepts) == (1, 1)
    window.rejection_probability(18.0)
    assert (window.requests, window.accepts) == (0, 0)


def test_a_long_pause_empties_the_window() -> None:
    window = counted(10, 0)
    assert window.rejection_probability(3600.0) == 0.0
    assert (window.requests, window.accepts) == (0, 0)


def test_a_clock_that_goes_back_empties_the_window() -> None:
    window = counted(10, 0, now=1000.0)
    assert window.rejection_probability(3.0) == 0.0
    assert window.requests == 0


def test_refusals_over_many_draws_match_the_probabilities() -> None:
    """Each draw refuses with the probability of its moment: the count matches their sum.

    Refusals minus the sum of the probabilities is a martingale whose variance
    is the sum of p(1 - p); it stays within four standard deviations.
    """
    rng = random.Random("throttle-draws")
    dependency = random.Random("throttle-dependency")
    window = ThrottleWindow(k=2.0, window=60.0)
    refused = 0
    expected = variance = 0.0
    for i in range(20_000):
        now = i * 0.01
        p = window.rejection_probability(now)
        expected += p
        variance += p * (1 - p)
        if not window.admit(now, rng):
            refused += 1
        elif dependency.random() < 0.3:  # a dependency that accepts 30% of what it gets
            window.accept(now)
    assert expected > 5_000  # the draws were not trivial
    assert abs(refused - expected) <= 4 * math.sqrt(variance)


def test_against_a_dependency_of_fixed_capacity_about_k_times_its_accepts_get_through() -> None:
    """100 calls a second, a dependency that accepts 10 a second: about 20 reach it (k = 2)."""
    rng = random.Random("throttle-capacity")
    window = ThrottleWindow(k=2.0, window=120.0)
    reached = 0
    accepted_this_second: dict[int, int] = {}
    for i in range(60_000):  # 600 s
        now = i * 0.01
        if not window.admit(now, rng):
            continue
        second = int(now)
        if now >= 300.0:
            reached += 1
        if accepted_this_second.get(second, 0) < 10:
            accepted_this_second[second] = accepted_this_second.get(second, 0) + 1
            window.accept(now)
    assert 18.0 <= reached / 300.0 <= 22.0


def test_accept_latest_counts_in_the_slice_of_the_latest_count() -> None:
    window = ThrottleWindow(k=1.0, window=10.0, buckets=10)
    rng = random.Random(0)
    assert window.admit(0.5, rng)
    window.accept_latest()  # in slice 0, where the admission was counted
    assert (window.requests, window.accepts) == (1, 1)
    window.admit(9.5, rng)  # slice 9: slice 0 is still in the window
    assert (window.requests, window.accepts) == (2, 1)
    window.admit(10.5, rng)  # slice 10: slice 0 has left, with both of its counts
    assert (window.requests, window.accepts) == (2, 0)
