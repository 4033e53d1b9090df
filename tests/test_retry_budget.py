from __future__ import annotations

import math

import anyio
import pytest

import stalwart as sw


async def test_the_floor_allows_min_per_second_times_window_retries() -> None:
    budget = sw.RetryBudget(ratio=0.0, min_per_second=2.0, window=5.0)
    allowed = sum(budget.try_withdraw() for _ in range(20))
    assert allowed == 10


async def test_each_first_attempt_earns_ratio_retries() -> None:
    budget = sw.RetryBudget(ratio=0.25, min_per_second=0.0)
    for _ in range(8):
        budget.deposit()
    assert [budget.try_withdraw() for _ in range(3)] == [True, True, False]


async def test_a_ratio_above_one_is_allowed() -> None:
    budget = sw.RetryBudget(ratio=2.0, min_per_second=0.0)
    budget.deposit()
    assert sum(budget.try_withdraw() for _ in range(5)) == 2


async def test_a_denied_withdrawal_takes_nothing() -> None:
    budget = sw.RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)
    assert budget.try_withdraw()
    assert not budget.try_withdraw()
    assert budget.statistics().retries == 1


async def test_deposits_and_retries_leave_the_window() -> None:
    budget = sw.RetryBudget(ratio=1.0, min_per_second=0.0, window=10.0)
    for _ in range(5):
        budget.deposit()
    assert budget.statistics() == sw.RetryBudgetStatistics(requests=5, retries=0, available=5)
    await anyio.sleep(5.0)
    assert budget.try_withdraw()
    await anyio.sleep(5.5)  # the deposits are 10.5 s old: gone; the retry is 5.5 s old
    assert budget.statistics() == sw.RetryBudgetStatistics(requests=0, retries=1, available=0)
    await anyio.sleep(5.0)
    assert budget.statistics() == sw.RetryBudgetStatistics(requests=0, retries=0, available=0)


async def test_after_a_long_pause_the_window_is_empty() -> None:
    budget = sw.RetryBudget(ratio=1.0, min_per_second=0.0, window=1.0)
    budget.deposit()
    await anyio.sleep(3600)
    assert budget.statistics().requests == 0


async def test_amplification_under_a_total_outage_stays_near_one_plus_ratio() -> None:
    budget = sw.RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0)
    retry = sw.Retry(attempts=5, budget=budget, backoff=sw.Backoff(initial=0.01, maximum=0.05))
    attempts = 0

    @retry
    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError

    calls = 0

    async def one_call() -> None:
        nonlocal calls
        calls += 1
        with pytest.raises(ConnectionError):
            await down()

    # 100 calls per second for a minute, every one failing.
    async with anyio.create_task_group() as tg:
        for _ in range(6000):
            tg.start_soon(one_call)
            await anyio.sleep(0.01)
    amplification = attempts / calls
    # 1 + ratio + floor share (1 retry/s over 100 calls/s) = 1.21; without a budget: 5.
    assert amplification <= 1.22
    assert amplification >= 1.15


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"ratio": -0.1}, ValueError, "ratio"),
        ({"ratio": math.nan}, ValueError, "ratio"),
        ({"ratio": "0.1"}, TypeError, "ratio"),
        ({"min_per_second": -1.0}, ValueError, "min_per_second"),
        ({"min_per_second": math.inf}, ValueError, "min_per_second"),
        ({"window": 0.0}, ValueError, "window"),
        ({"window": -3.0}, ValueError, "window"),
        ({"window": math.inf}, ValueError, "window"),
    ],
)
def test_invalid_options_fail_at_construction_naming_the_parameter(
    kwargs: dict[str, object], error: type[Exception], param: str
) -> None:
    with pytest.raises(error, match=param):
        sw.RetryBudget(**kwargs)  # type: ignore[arg-type]


def test_repr_shows_the_settings() -> None:
    assert repr(sw.RetryBudget(0.5, 2, 30)) == (
        "RetryBudget(ratio=0.5, min_per_second=2, window=30)"
    )
