from __future__ import annotations

import dataclasses
import math
import random
import statistics

import pytest

import stalwart as sw


def test_base_grows_exponentially_from_initial() -> None:
    backoff = sw.Backoff(initial=0.5, multiplier=3.0, maximum=100.0, jitter="none")
    assert [backoff.base(k) for k in range(1, 5)] == [0.5, 1.5, 4.5, 13.5]


def test_base_is_capped_at_maximum() -> None:
    backoff = sw.Backoff(initial=1.0, multiplier=2.0, maximum=5.0, jitter="none")
    assert [backoff.delay(k) for k in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_base_does_not_overflow_for_huge_retry_numbers() -> None:
    backoff = sw.Backoff(initial=0.1, multiplier=10.0, maximum=7.0)
    assert backoff.base(100_000) == 7.0


def test_zero_initial_means_no_delay() -> None:
    backoff = sw.Backoff(initial=0.0, maximum=0.0, jitter="full")
    assert {backoff.delay(k) for k in range(1, 20)} == {0.0}


def test_multiplier_one_is_a_constant_delay() -> None:
    backoff = sw.Backoff(initial=2.0, multiplier=1.0, jitter="none")
    assert {backoff.delay(k) for k in range(1, 10)} == {2.0}


def test_full_jitter_is_uniform_between_zero_and_base() -> None:
    rng = random.Random(1)
    backoff = sw.Backoff(initial=1.0, multiplier=2.0, maximum=100.0, jitter="full")
    samples = [backoff.delay(3, rng=rng) for _ in range(20_000)]
    assert min(samples) >= 0.0
    assert max(samples) <= 4.0
    assert statistics.fmean(samples) == pytest.approx(2.0, rel=0.02)
    assert min(samples) < 0.05
    assert max(samples) > 3.95


def test_equal_jitter_stays_between_half_base_and_base() -> None:
    rng = random.Random(2)
    backoff = sw.Backoff(initial=1.0, multiplier=2.0, maximum=100.0, jitter="equal")
    samples = [backoff.delay(3, rng=rng) for _ in range(20_000)]
    assert min(samples) >= 2.0
    assert max(samples) <= 4.0
    assert statistics.fmean(samples) == pytest.approx(3.0, rel=0.02)


def test_decorrelated_jitter_draws_between_initial_and_three_times_previous() -> None:
    rng = random.Random(3)
    backoff = sw.Backoff(initial=0.5, maximum=100.0, jitter="decorrelated")
    for previous in (0.5, 1.0, 7.0):
        samples = [backoff.delay(2, previous, rng) for _ in range(5_000)]
        assert min(samples) >= 0.5
        assert max(samples) <= 3 * previous
        assert statistics.fmean(samples) == pytest.approx((0.5 + 3 * previous) / 2, rel=0.05)


def test_decorrelated_jitter_starts_from_initial_and_is_capped() -> None:
    rng = random.Random(4)
    backoff = sw.Backoff(initial=1.0, maximum=2.0, jitter="decorrelated")
    first = [backoff.delay(1, rng=rng) for _ in range(1_000)]
    assert all(1.0 <= d <= 2.0 for d in first)
    assert backoff.delay(5, previous=50.0, rng=rng) <= 2.0


def test_no_jitter_is_the_base() -> None:
    backoff = sw.Backoff(initial=0.25, jitter="none")
    assert backoff.delay(3) == 1.0


def test_same_seed_gives_same_delays() -> None:
    backoff = sw.Backoff()
    a = [backoff.delay(k, rng=random.Random(42)) for k in range(1, 8)]
    b = [backoff.delay(k, rng=random.Random(42)) for k in range(1, 8)]
    assert a == b


def test_backoff_is_a_frozen_value() -> None:
    backoff = sw.Backoff(initial=1, maximum=10)
    assert backoff == sw.Backoff(initial=1.0, maximum=10.0)
    assert isinstance(backoff.initial, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        backoff.initial = 2.0  # type: ignore[misc]


def test_delay_rejects_retry_numbers_below_one() -> None:
    with pytest.raises(ValueError, match="retry"):
        sw.Backoff().base(0)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"initial": -1.0}, "initial"),
        ({"initial": math.nan}, "initial"),
        ({"initial": math.inf}, "initial"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"multiplier": math.inf}, "multiplier"),
        ({"maximum": -1.0}, "maximum"),
        ({"maximum": math.nan}, "maximum"),
        ({"initial": 5.0, "maximum": 1.0}, "maximum"),
        ({"jitter": "random"}, "jitter"),
    ],
)
def test_invalid_options_raise_value_error_naming_the_parameter(
    kwargs: dict[str, object], param: str
) -> None:
    with pytest.raises(ValueError, match=param):
        sw.Backoff(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["1", None, True])
def test_non_numbers_raise_type_error(value: object) -> None:
    with pytest.raises(TypeError, match="initial"):
        sw.Backoff(initial=value)  # type: ignore[arg-type]
