"""The streaming latency quantile: its error bound against exact quantiles, and how it forgets."""

from __future__ import annotations

import math
import random
from statistics import NormalDist
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalwart._latency_quantile import LatencyQuantile


def exact(samples: list[tuple[float, float]], q: float) -> float:
    """The smallest value whose weight at or below it is at least q times the total."""
    ordered = sorted(samples)
    total = math.fsum(w for _, w in ordered)
    cumulative = 0.0
    for value, w in ordered:
        cumulative += w
        if cumulative >= q * total:
            return value
    return ordered[-1][0]


def assert_within(estimator: LatencyQuantile, samples: list[tuple[float, float]], q: float) -> None:
    """The bound: within ``a`` of the exact quantile, clamped to the range.

    Sums of weights round, so the rank is allowed a relative slack of 1e-9 on
    either side (the exact quantiles at q - 1e-9 and q + 1e-9 bracket it).
    """
    a = estimator.relative_accuracy * (1 + 1e-9)
    low, high = estimator.low, estimator.high
    lower = min(high, max(low, exact(samples, q * (1 - 1e-9))))
    upper = min(high, max(low, exact(samples, min(1.0, q * (1 + 1e-9)))))
    value = estimator.estimate if q == estimator.q else estimator.quantile(q)
    assert value is not None
    assert lower * (1 - a) <= value <= upper * (1 + a), (value, lower, upper)
    if q == estimator.q:  # the ceiling: never below the quantile, at most gamma times it
        ceiling = estimator.ceiling
        assert ceiling is not None
        assert lower * (1 - 1e-9) <= ceiling <= upper * estimator.gamma * (1 + 1e-9)


def lognormal_quantile(median: float, sigma: float, q: float) -> float:
    return median * math.exp(sigma * NormalDist().inv_cdf(q))


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options", "error", "message"),
    [
        ((0.0,), {}, ValueError, "quantile must be strictly between 0 and 1"),
        ((1.0,), {}, ValueError, "quantile must be strictly between 0 and 1"),
        (("0.5",), {}, TypeError, "quantile must be a number"),
        ((0.5,), {"low": 0.0}, ValueError, "low must be > 0"),
        ((0.5,), {"high": math.inf}, ValueError, "high must be finite"),
        ((0.5,), {"low": 2.0, "high": 1.0}, ValueError, "high must be > low"),
        ((0.5,), {"half_life": 0.0}, ValueError, "half_life must be > 0"),
        ((0.5,), {"relative_accuracy": 0.0}, ValueError, "relative_accuracy must be in"),
        ((0.5,), {"relative_accuracy": 0.6}, ValueError, "relative_accuracy must be in"),
    ],
)
def test_bad_options_are_refused_naming_the_parameter(
    args: tuple[Any, ...], options: dict[str, Any], error: type[Exception], message: str
) -> None:
    options = {"low": 0.001, "high": 10.0, **options}
    with pytest.raises(error, match=message):
        LatencyQuantile(*args, **options)


def test_memory_is_fixed_by_the_range_and_the_accuracy() -> None:
    estimator = LatencyQuantile(0.95, low=0.0001, high=60.0, relative_accuracy=0.02)
    assert len(estimator._counts) == 334
    rng = random.Random(0)
    for i in range(10_000):
        estimator.add(i * 0.01, rng.expovariate(10.0))
    assert len(estimator._counts) == 334
    assert "LatencyQuantile(0.95, low=0.0001, high=60, half_life=30.0" in repr(estimator)


# -- basics -------------------------------------------------------------------------------


def test_an_empty_estimator_has_no_estimate_and_no_weight() -> None:
    estimator = LatencyQuantile(0.5, low=0.001, high=1.0)
    assert estimator.estimate is None
    assert estimator.quantile(0.9) is None
    assert estimator.weight(0.0) == 0.0


def test_one_sample_is_its_own_quantile_within_the_accuracy() -> None:
    estimator = LatencyQuantile(0.95, low=0.001, high=1.0, relative_accuracy=0.01)
    estimator.add(0.0, 0.0372)
    assert estimator.estimate == pytest.approx(0.0372, rel=0.01)


def test_values_outside_the_range_count_at_its_edges() -> None:
    estimator = LatencyQuantile(0.5, low=0.01, high=1.0)
    for _ in range(10):
        estimator.add(0.0, 0.000001)
    assert estimator.estimate == 0.01
    for _ in range(30):
        estimator.add(0.0, 1e6)
    assert estimator.estimate == 1.0
    estimator.add(0.0, math.nan)  # ignored
    assert estimator.weight(0.0) == 40.0


def test_without_decay_the_weight_is_the_number_of_samples() -> None:
    estimator = LatencyQuantile(0.5, low=0.001, high=1.0, half_life=None)
    for i in range(100):
        estimator.add(i * 1000.0, 0.1)
    assert estimator.weight(1e9) == 100.0


def test_with_decay_the_weight_halves_every_half_life() -> None:
    estimator = LatencyQuantile(0.5, low=0.001, high=1.0, half_life=10.0)
    for _ in range(8):
        estimator.add(5.0, 0.1)
    assert estimator.weight(5.0) == 8.0
    assert estimator.weight(15.0) == pytest.approx(4.0)
    assert estimator.weight(35.0) == pytest.approx(1.0)


def test_a_steady_stream_weighs_rate_times_half_life_over_ln_2() -> None:
    estimator = LatencyQuantile(0.5, low=0.001, high=1.0, half_life=5.0)
    for i in range(20_000):
        estimator.add(i * 0.01, 0.1)  # 100 a second for 200 s (40 half-lives)
    assert estimator.weight(199.99) == pytest.approx(100 * 5.0 / math.log(2), rel=0.01)


def test_a_clock_that_goes_back_starts_afresh() -> None:
    estimator = LatencyQuantile(0.5, low=0.001, high=10.0)
    for _ in range(100):
        estimator.add(1000.0, 5.0)
    assert estimator.weight(999.0) == 0.0
    estimator.add(1.0, 0.01)
    assert estimator.estimate == pytest.approx(0.01, rel=0.02)
    assert estimator.weight(1.0) == 1.0


@pytest.mark.parametrize("latency", [0.0005, 0.001, 0.0123, 0.02, 0.02 * 1.04**7, 0.5, 40.0])
def test_the_ceiling_of_a_steady_latency_is_never_below_it(latency: float) -> None:
    # The estimate of a point mass may sit just under it (a hedge delayed that
    # long would start on every call); the ceiling never does.
    estimator = LatencyQuantile(0.95, low=0.001, high=30.0, half_life=10.0)
    before = estimator.ceiling
    assert before is None
    for i in range(100):
        estimator.add(i * 0.1, latency)
    clamped = min(30.0, max(0.001, latency))
    ceiling = estimator.ceiling
    assert ceiling is not None
    assert clamped <= ceiling <= clamped * estimator.gamma
    if latency in (0.0123, 0.02):  # cases where the estimate is below the latency
        assert estimator.estimate is not None
        assert estimator.estimate < latency


# -- accuracy on stationary distributions -------------------------------------------------


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("accuracy", [0.01, 0.02, 0.05])
def test_without_decay_every_estimate_is_within_the_accuracy_of_the_exact_quantile(
    q: float, accuracy: float
) -> None:
    rng = random.Random(f"stationary:{q}:{accuracy}")
    estimator = LatencyQuantile(
        q, low=0.0005, high=30.0, half_life=None, relative_accuracy=accuracy
    )
    samples: list[tuple[float, float]] = []
    for i in range(1, 5001):
        value = 0.02 * math.exp(0.8 * rng.gauss(0.0, 1.0))  # lognormal: p50 20 ms, p99 128 ms
        estimator.add(float(i), value)
        samples.append((value, 1.0))
        if i % 250 == 0 or i < 20:
            assert_within(estimator, samples, q)
    for other in (0.1, 0.5, 0.75, 0.999):
        assert_within(estimator, samples, other)


def test_with_decay_the_estimate_is_within_the_accuracy_of_the_exact_weighted_quantile() -> None:
    rng = random.Random("decayed")
    half_life = 7.0
    estimator = LatencyQuantile(0.95, low=0.001, high=10.0, half_life=half_life)
    samples: list[tuple[float, float]] = []
    now = 0.0
    for i in range(1, 4001):
        now += rng.expovariate(50.0)
        value = rng.paretovariate(2.5) * 0.01  # heavy-tailed
        estimator.add(now, value)
        samples.append((value, 2.0 ** (now / half_life)))
        if i % 200 == 0:
            assert_within(estimator, samples, 0.95)


@settings(max_examples=300)
@given(
    q=st.floats(min_value=0.01, max_value=0.99),
    half_life=st.one_of(st.none(), st.floats(min_value=0.5, max_value=100.0)),
    accuracy=st.sampled_from([0.005, 0.02, 0.1]),
    samples=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=5.0),  # seconds since the previous sample
            st.floats(min_value=0.0, max_value=1000.0),  # latency (often outside the range)
        ),
        min_size=1,
        max_size=300,
    ),
)
def test_the_bound_holds_for_any_samples_and_times(
    q: float, half_life: float | None, accuracy: float, samples: list[tuple[float, float]]
) -> None:
    estimator = LatencyQuantile(
        q, low=0.01, high=100.0, half_life=half_life, relative_accuracy=accuracy
    )
    now = 0.0
    seen: list[tuple[float, float]] = []
    for gap, value in samples:
        now += gap
        estimator.add(now, value)
        weight = 1.0 if half_life is None else 2.0 ** (now / half_life)
        seen.append((value, weight))
    assert_within(estimator, seen, q)


def test_a_run_of_ten_thousand_half_lives_neither_overflows_nor_drifts() -> None:
    rng = random.Random("long run")
    estimator = LatencyQuantile(0.9, low=0.001, high=10.0, half_life=1.0)
    for i in range(200_000):  # 20 samples per half-life
        estimator.add(i * 0.05, 0.05 * math.exp(0.5 * rng.gauss(0.0, 1.0)))
    assert math.isfinite(estimator.weight(10_000.0))
    # About 29 samples' worth of weight: a noisy p90, but of the right distribution.
    assert estimator.estimate == pytest.approx(lognormal_quantile(0.05, 0.5, 0.9), rel=0.25)
    assert_within_recent(estimator, rng)


def assert_within_recent(estimator: LatencyQuantile, rng: random.Random) -> None:
    """After the landmark moved many times, the bound still holds on fresh samples."""
    start = 20_000.0
    samples: list[tuple[float, float]] = []
    for i in range(400):
        now = start + i * 0.05
        value = 0.05 * math.exp(0.5 * rng.gauss(0.0, 1.0))
        estimator.add(now, value)
        samples.append((value, 2.0 ** ((now - start) / 1.0)))
    # The earlier samples are 10,000 half-lives old: they weigh nothing now.
    assert_within(estimator, samples, 0.9)


# -- forgetting ---------------------------------------------------------------------------

HALF_LIFE = 10.0
RATE = 100.0  # samples a second: 1,000 per half-life


def shifted(before: float, after: float) -> list[tuple[float, float]]:
    """(half-lives since the shift, estimate) after a minute of ``before``, then ``after``.

    Both are lognormal medians with sigma 0.5.
    """
    rng = random.Random(f"shift:{before}:{after}")
    estimator = LatencyQuantile(0.95, low=0.001, high=5.0, half_life=HALF_LIFE)
    for i in range(int(60 * RATE)):
        estimator.add(i / RATE, before * math.exp(0.5 * rng.gauss(0.0, 1.0)))
    assert estimator.estimate == pytest.approx(lognormal_quantile(before, 0.5, 0.95), rel=0.06)
    track = []
    for i in range(int(15 * HALF_LIFE * RATE)):
        estimator.add(60.0 + i / RATE, after * math.exp(0.5 * rng.gauss(0.0, 1.0)))
        if i % 100 == 0:
            estimate = estimator.estimate
            assert estimate is not None
            track.append((i / RATE / HALF_LIFE, estimate))
    return track


def test_after_a_shift_to_slower_calls_the_p95_follows_within_three_half_lives() -> None:
    target = lognormal_quantile(0.1, 0.5, 0.95)  # from 20 ms to 100 ms medians
    track = shifted(0.02, 0.1)
    assert all(abs(e / target - 1) <= 0.10 for t, e in track if t >= 3.0)
    assert any(abs(e / target - 1) > 0.10 for t, e in track if t < 1.0)  # it did move


def test_after_a_shift_to_faster_calls_the_p95_follows_within_seven_half_lives() -> None:
    target = lognormal_quantile(0.02, 0.5, 0.95)  # from 100 ms to 20 ms medians
    track = shifted(0.1, 0.02)
    assert all(abs(e / target - 1) <= 0.10 for t, e in track if t >= 7.0)
    assert any(abs(e / target - 1) > 1.0 for t, e in track if t < 3.0)  # the old tail lingers


def test_without_decay_a_shift_is_never_fully_followed() -> None:
    rng = random.Random("no decay")
    estimator = LatencyQuantile(0.5, low=0.001, high=5.0, half_life=None)
    for i in range(6000):
        estimator.add(i / RATE, 0.02)
    for i in range(3000):
        estimator.add(60.0 + i / RATE, 0.1 * math.exp(0.1 * rng.gauss(0.0, 1.0)))
    assert estimator.estimate == pytest.approx(0.02, rel=0.02)  # two thirds are still old
