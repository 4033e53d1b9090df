from __future__ import annotations

import gc
import inspect
import itertools
import math
import random
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.testing import instant_retries

from .conftest import Spans, sample

NO_WAIT = sw.Backoff(initial=0.0, maximum=0.0)


def flaky(failures: int, exc: Callable[[int], BaseException] = ValueError, result: Any = "ok"):  # type: ignore[no-untyped-def]
    """An async function that raises ``failures`` times, then returns ``result``."""
    raised: list[BaseException] = []

    async def fn() -> Any:
        if len(raised) < failures:
            error = exc(len(raised) + 1)
            raised.append(error)
            raise error
        return result

    fn.raised = raised  # type: ignore[attr-defined]
    return fn


async def test_a_successful_call_runs_once() -> None:
    calls = 0

    @sw.Retry(attempts=5)
    async def fn(x: int) -> int:
        nonlocal calls
        calls += 1
        return x + 1

    assert await fn(1) == 2
    assert calls == 1


async def test_retries_until_success() -> None:
    fn = flaky(2)
    assert await sw.Retry(attempts=3, backoff=NO_WAIT)(fn)() == "ok"
    assert len(fn.raised) == 2


async def test_last_exception_propagates_unchanged() -> None:
    fn = flaky(5)
    with pytest.raises(ValueError) as info:
        await sw.Retry(attempts=3, backoff=NO_WAIT)(fn)()
    assert len(fn.raised) == 3
    assert info.value is fn.raised[-1]
    assert type(info.value) is ValueError


async def test_earlier_attempts_do_not_become_the_context_of_the_last_error() -> None:
    fn = flaky(5)
    with pytest.raises(ValueError) as info:
        await sw.Retry(attempts=3, backoff=NO_WAIT)(fn)()
    assert info.value.__context__ is None
    assert info.value.__cause__ is None


async def test_one_attempt_means_no_retry() -> None:
    fn = flaky(1)
    with pytest.raises(ValueError):
        await sw.Retry(attempts=1)(fn)()
    assert len(fn.raised) == 1


async def test_only_exceptions_matching_on_type_are_retried() -> None:
    fn = flaky(1, exc=KeyError)
    with pytest.raises(KeyError):
        await sw.Retry(attempts=3, on=ValueError, backoff=NO_WAIT)(fn)()
    assert len(fn.raised) == 1


async def test_on_accepts_a_tuple_of_types() -> None:
    fn = flaky(2, exc=lambda n: KeyError(n) if n == 1 else OSError(n))
    assert await sw.Retry(attempts=3, on=(KeyError, OSError), backoff=NO_WAIT)(fn)() == "ok"


async def test_on_accepts_a_predicate() -> None:
    fn = flaky(3, exc=lambda n: ValueError("transient" if n < 3 else "fatal"))
    retry = sw.Retry(attempts=10, on=lambda e: "transient" in str(e), backoff=NO_WAIT)
    with pytest.raises(ValueError, match="fatal"):
        await retry(fn)()
    assert len(fn.raised) == 3


class CustomBaseError(BaseException):
    pass


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit, GeneratorExit, CustomBaseError])
async def test_base_exceptions_are_never_retried_even_with_on_base_exception(
    exc: type[BaseException],
) -> None:
    fn = flaky(1, exc=lambda n: exc())
    with pytest.raises(exc):
        await sw.Retry(attempts=3, on=BaseException, backoff=NO_WAIT)(fn)()
    assert len(fn.raised) == 1


async def test_base_exceptions_never_reach_the_predicate() -> None:
    seen: list[BaseException] = []

    def predicate(exc: BaseException) -> bool:
        seen.append(exc)
        return True

    fn = flaky(1, exc=lambda n: KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        await sw.Retry(attempts=3, on=predicate)(fn)()
    assert seen == []


async def test_cancellation_is_never_retried() -> None:
    calls = 0

    @sw.Retry(attempts=5, on=BaseException, backoff=NO_WAIT)
    async def fn() -> None:
        nonlocal calls
        calls += 1
        await anyio.sleep(10)

    with anyio.move_on_after(1) as scope:
        await fn()
    assert scope.cancelled_caught
    assert calls == 1


async def test_cancellation_during_backoff_sleep_is_not_swallowed() -> None:
    fn = flaky(5)
    with anyio.move_on_after(1.5) as scope:
        await sw.Retry(attempts=5, backoff=sw.Backoff(initial=1.0, jitter="none"))(fn)()
    assert scope.cancelled_caught
    assert len(fn.raised) == 2  # at t=0 and t=1; cancelled while sleeping 2 s


async def test_on_result_retries_results_and_returns_the_last_one() -> None:
    results = iter([None, None, None, None])

    @sw.Retry(attempts=3, on_result=lambda r: r is None, backoff=NO_WAIT)
    async def fn() -> int | None:
        return next(results)

    assert await fn() is None
    assert next(results) is None  # exactly three consumed, one left


async def test_on_result_stops_at_a_good_result() -> None:
    results = iter([500, 503, 200])

    @sw.Retry(attempts=5, on_result=lambda status: status >= 500, backoff=NO_WAIT)
    async def fn() -> int:
        return next(results)

    assert await fn() == 200


async def test_on_result_and_exceptions_mix() -> None:
    outcomes: list[Any] = [ValueError("a"), 503, ValueError("b"), 200]

    @sw.Retry(attempts=4, on_result=lambda status: status >= 500, backoff=NO_WAIT)
    async def fn() -> int:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return int(outcome)

    assert await fn() == 200


async def test_backoff_delays_elapse_in_order() -> None:
    stamps: list[float] = []

    @sw.Retry(attempts=4, backoff=sw.Backoff(initial=1.0, multiplier=2.0, jitter="none"))
    async def fn() -> None:
        stamps.append(anyio.current_time())
        raise ValueError

    with pytest.raises(ValueError):
        await fn()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps == pytest.approx([1.0, 2.0, 4.0])


async def test_jitter_draws_from_the_injected_rng() -> None:
    backoff = sw.Backoff(initial=1.0, multiplier=2.0, maximum=60.0, jitter="full")
    expected_rng = random.Random(7)
    expected = [backoff.delay(k, rng=expected_rng) for k in (1, 2, 3)]
    stamps: list[float] = []

    @sw.Retry(attempts=4, backoff=backoff, rng=random.Random(7))
    async def fn() -> None:
        stamps.append(anyio.current_time())
        raise ValueError

    with pytest.raises(ValueError):
        await fn()
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps == pytest.approx(expected)


async def test_decorrelated_jitter_feeds_each_delay_into_the_next() -> None:
    backoff = sw.Backoff(initial=1.0, maximum=1000.0, jitter="decorrelated")
    rng = random.Random(11)
    expected, previous = [], None
    for k in (1, 2, 3, 4):
        previous = backoff.delay(k, previous, rng)
        expected.append(previous)
    stamps: list[float] = []

    @sw.Retry(attempts=5, backoff=backoff, rng=random.Random(11))
    async def fn() -> None:
        stamps.append(anyio.current_time())
        raise ValueError

    with pytest.raises(ValueError):
        await fn()
    assert [b - a for a, b in itertools.pairwise(stamps)] == pytest.approx(expected)


class ThrottledError(Exception):
    def __init__(self, retry_after: object) -> None:
        super().__init__(f"retry after {retry_after}")
        self.retry_after = retry_after


async def test_an_exceptions_retry_after_attribute_is_honoured() -> None:
    fn = flaky(1, exc=lambda n: ThrottledError(5.0))
    start = anyio.current_time()
    await sw.Retry(attempts=2, backoff=sw.Backoff(initial=0.1, jitter="none"))(fn)()
    assert anyio.current_time() - start == pytest.approx(5.0)


async def test_a_hint_shorter_than_the_backoff_does_not_shorten_it() -> None:
    fn = flaky(1, exc=lambda n: ThrottledError(0.5))
    start = anyio.current_time()
    await sw.Retry(attempts=2, backoff=sw.Backoff(initial=2.0, jitter="none"))(fn)()
    assert anyio.current_time() - start == pytest.approx(2.0)


@pytest.mark.parametrize("hint", [-3.0, math.nan, "7", None])
async def test_invalid_hints_are_ignored(hint: object) -> None:
    fn = flaky(1, exc=lambda n: ThrottledError(hint))
    start = anyio.current_time()
    await sw.Retry(attempts=2, backoff=sw.Backoff(initial=1.0, jitter="none"))(fn)()
    assert anyio.current_time() - start == pytest.approx(1.0)


async def test_a_custom_retry_after_reads_hints_from_results() -> None:
    results = iter([(429, 3.0), (200, None)])

    @sw.Retry(
        attempts=2,
        on_result=lambda r: r[0] == 429,
        retry_after=lambda r: r[1] if isinstance(r, tuple) else None,
        backoff=sw.Backoff(initial=0.0, maximum=5.0),
    )
    async def fn() -> tuple[int, float | None]:
        return next(results)

    start = anyio.current_time()
    assert (await fn())[0] == 200
    assert anyio.current_time() - start == pytest.approx(3.0)


def circuit_open(attempt: int) -> sw.CircuitOpenError:
    return sw.CircuitOpenError("open", policy="cb", retry_after=4.0)


REFUSALS = [
    pytest.param(circuit_open, id="circuit-open"),
    pytest.param(
        lambda n: sw.RateLimitExceeded("limited", policy="rl", retry_after=0.5), id="rate-limit"
    ),
    pytest.param(lambda n: sw.RateLimitExceeded("limited", policy="rl"), id="rate-limit-no-hint"),
]


@pytest.mark.parametrize("refusal", REFUSALS)
async def test_a_default_retry_lets_refusals_through_at_once(
    refusal: Callable[[int], BaseException], registry: CollectorRegistry
) -> None:
    fn = flaky(1, exc=refusal)
    retry = sw.Retry(attempts=3, telemetry=sw.Telemetry(registry=registry))
    start = anyio.current_time()
    with pytest.raises(sw.StalwartError) as info:
        await retry(fn)()
    assert info.value is fn.raised[0]
    assert anyio.current_time() == start
    assert sample(registry, "stalwart_retry_attempts_total", policy="retry") == 0.0


async def test_a_default_retry_retries_other_stalwart_errors() -> None:
    fn = flaky(2, exc=lambda n: sw.BulkheadFullError("full", policy="b"))
    assert await sw.Retry(attempts=3, backoff=NO_WAIT)(fn)() == "ok"


async def test_on_none_is_the_default() -> None:
    fn = flaky(1, exc=circuit_open)
    with pytest.raises(sw.CircuitOpenError):
        await sw.Retry(attempts=3, on=None)(fn)()


@pytest.mark.parametrize(
    "on",
    [Exception, sw.StalwartError, (ValueError, sw.CircuitOpenError), lambda exc: True],
    ids=["Exception", "StalwartError", "tuple", "predicate"],
)
async def test_an_explicit_on_retries_what_it_matches_refusals_included(on: Any) -> None:
    fn = flaky(1, exc=circuit_open)
    start = anyio.current_time()
    backoff = sw.Backoff(initial=0.0, maximum=10.0)
    assert await sw.Retry(attempts=2, on=on, backoff=backoff)(fn)() == "ok"
    assert anyio.current_time() - start == pytest.approx(4.0)  # its retry_after, waited


@pytest.mark.parametrize("hint", [999_999_999.0, math.inf, 10.001])
async def test_a_hint_longer_than_the_backoff_maximum_stops_retrying_at_once(
    hint: float, registry: CollectorRegistry
) -> None:
    fn = flaky(2, exc=lambda n: ThrottledError(hint))
    retry = sw.Retry(attempts=3, telemetry=sw.Telemetry(registry=registry))  # maximum 10 s
    start = anyio.current_time()
    with pytest.raises(ThrottledError) as info:
        await retry(fn)()
    assert info.value is fn.raised[0]
    assert anyio.current_time() == start
    assert sample(registry, "stalwart_retry_exhausted_total", policy="retry") == 1.0


async def test_a_hint_equal_to_the_backoff_maximum_is_waited() -> None:
    fn = flaky(1, exc=lambda n: ThrottledError(3.0))
    start = anyio.current_time()
    await sw.Retry(attempts=2, backoff=sw.Backoff(initial=0.1, maximum=3.0))(fn)()
    assert anyio.current_time() - start == pytest.approx(3.0)


async def test_a_long_hint_on_a_later_attempt_stops_with_that_attempts_error() -> None:
    fn = flaky(3, exc=lambda n: ThrottledError(1.0 if n == 1 else 60.0))
    start = anyio.current_time()
    with pytest.raises(ThrottledError) as info:
        await sw.Retry(attempts=5, backoff=sw.Backoff(initial=0.0, maximum=10.0))(fn)()
    assert info.value is fn.raised[1]
    assert anyio.current_time() - start == pytest.approx(1.0)


async def test_a_long_hint_for_a_result_returns_that_result_at_once() -> None:
    results = iter([(503, 1.0), (503, 120.0), (200, None)])

    @sw.Retry(
        attempts=3,
        on_result=lambda r: r[0] == 503,
        retry_after=lambda r: r[1] if isinstance(r, tuple) else None,
        backoff=sw.Backoff(initial=0.0, maximum=30.0),
    )
    async def fn() -> tuple[int, float | None]:
        return next(results)

    start = anyio.current_time()
    assert await fn() == (503, 120.0)
    assert anyio.current_time() - start == pytest.approx(1.0)


async def test_a_hint_past_the_deadline_fails_at_once_with_the_last_error() -> None:
    fn = flaky(1, exc=lambda n: ThrottledError(8.0))
    start = anyio.current_time()
    with sw.deadline(5.0), pytest.raises(ThrottledError):
        await sw.Retry(attempts=3, backoff=sw.Backoff(initial=0.0, maximum=60.0))(fn)()
    assert anyio.current_time() == start
    assert len(fn.raised) == 1


async def test_a_pipeline_of_default_retry_and_breaker_fails_fast_once_open() -> None:
    calls = 0

    @sw.Pipeline(sw.Retry(attempts=3), sw.CircuitBreaker(consecutive_failures=2))
    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError

    start = anyio.current_time()
    with pytest.raises(sw.CircuitOpenError) as info:
        await fn()  # two failures open the breaker; the third attempt is rejected
    assert calls == 2
    assert info.value.retry_after == pytest.approx(30.0, abs=1.0)
    opened = anyio.current_time()
    assert opened - start < 1.0  # the backoff of one retry, never the 30 s open period
    for _ in range(3):
        with pytest.raises(sw.CircuitOpenError):
            await fn()
    assert anyio.current_time() == opened
    assert calls == 2


async def test_no_sleep_outlives_the_ambient_deadline() -> None:
    fn = flaky(10)
    start = anyio.current_time()
    with sw.deadline(5.0), pytest.raises(ValueError) as info:
        await sw.Retry(attempts=10, backoff=sw.Backoff(initial=1.0, jitter="none"))(fn)()
    # attempts at t = 0, 1, 3; the next sleep (4 s) would end at 7 > 5: stop at t = 3.
    assert len(fn.raised) == 3
    assert info.value is fn.raised[-1]
    assert anyio.current_time() - start == pytest.approx(3.0)


async def test_timeout_budget_bounds_sleeps_like_a_deadline() -> None:
    fn = flaky(10)
    start = anyio.current_time()
    retry = sw.Retry(attempts=10, timeout=5.0, backoff=sw.Backoff(initial=1.0, jitter="none"))
    with pytest.raises(ValueError):
        await retry(fn)()
    assert len(fn.raised) == 3
    assert anyio.current_time() - start == pytest.approx(3.0)


async def test_timeout_budget_cancels_a_running_attempt() -> None:
    calls = 0

    @sw.Retry(attempts=10, timeout=5.0, backoff=NO_WAIT, name="slow-retry")
    async def fn() -> None:
        nonlocal calls
        calls += 1
        await anyio.sleep(3.0)
        raise ValueError

    start = anyio.current_time()
    with pytest.raises(sw.DeadlineExceeded) as info:
        await fn()
    assert calls == 2
    assert anyio.current_time() - start == pytest.approx(5.0)
    assert info.value.timeout == 5.0
    assert info.value.policy == "slow-retry"


async def test_timeout_budget_is_shortened_by_the_ambient_deadline() -> None:
    fn = flaky(10)
    retry = sw.Retry(attempts=10, timeout=50.0, backoff=sw.Backoff(initial=1.0, jitter="none"))
    start = anyio.current_time()
    with sw.deadline(2.5), pytest.raises(ValueError):
        await retry(fn)()
    assert anyio.current_time() - start == pytest.approx(1.0)


async def test_a_denied_retry_is_not_made() -> None:
    budget = sw.RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)  # one retry per window
    fn = flaky(10)
    retry = sw.Retry(attempts=5, budget=budget, backoff=NO_WAIT)
    with pytest.raises(ValueError):
        await retry(fn)()
    assert len(fn.raised) == 2  # the first attempt, then the only retry the budget allows


async def test_first_attempts_earn_retries_in_the_budget() -> None:
    budget = sw.RetryBudget(ratio=0.5, min_per_second=0.0, window=10.0)
    retry = sw.Retry(attempts=2, budget=budget, backoff=NO_WAIT)
    ok = retry(flaky(0))
    for _ in range(4):
        await ok()
    assert budget.statistics().requests == 4
    assert budget.statistics().available == 2
    failing = flaky(100)
    for _ in range(5):
        with pytest.raises(ValueError):
            await retry(failing)()
    # Each failing call earns 0.5 and spends 1: with 2 banked, calls 5-8 retry
    # (2.5, 2.0, 1.5, 1.0 available) and call 9 finds only 0.5: denied.
    assert budget.statistics().retries == 4
    assert len(failing.raised) == 5 + 4


async def test_exhaustion_and_retries_are_counted(registry: CollectorRegistry) -> None:
    retry = sw.Retry(
        attempts=3, backoff=NO_WAIT, name="counted", telemetry=sw.Telemetry(registry=registry)
    )
    with pytest.raises(ValueError):
        await retry(flaky(5))()
    await retry(flaky(1))()
    assert sample(registry, "stalwart_retry_attempts_total", policy="counted") == 3
    assert sample(registry, "stalwart_retry_exhausted_total", policy="counted") == 1


async def test_giving_up_at_the_deadline_counts_as_exhausted(registry: CollectorRegistry) -> None:
    retry = sw.Retry(
        attempts=3,
        backoff=sw.Backoff(initial=5.0, jitter="none"),
        name="dl",
        telemetry=sw.Telemetry(registry=registry),
    )
    with sw.deadline(1.0), pytest.raises(ValueError):
        await retry(flaky(5))()
    assert sample(registry, "stalwart_retry_attempts_total", policy="dl") == 0
    assert sample(registry, "stalwart_retry_exhausted_total", policy="dl") == 1


async def test_a_timeout_budget_expiring_mid_attempt_counts_as_exhausted(
    registry: CollectorRegistry,
) -> None:
    retry = sw.Retry(
        attempts=5, timeout=2.0, name="budgeted", telemetry=sw.Telemetry(registry=registry)
    )
    with pytest.raises(sw.DeadlineExceeded) as info:
        await retry.call(anyio.sleep, 10)
    assert info.value.policy == "budgeted"
    assert sample(registry, "stalwart_retry_exhausted_total", policy="budgeted") == 1


async def test_each_retry_is_an_event_with_the_attempt_about_to_be_made(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    retry = sw.Retry(
        attempts=3,
        backoff=sw.Backoff(initial=1.0, jitter="none"),
        name="evented",
        telemetry=telemetry,
    )
    with pytest.raises(ValueError):
        await retry(flaky(5))()
    span = spans.only()
    assert span.name == "stalwart.retry evented"
    assert span.attributes is not None
    assert span.attributes["stalwart.policy"] == "evented"
    retries = [e for e in span.events if e.name == "stalwart.retry"]
    assert [e.attributes["stalwart.attempt"] for e in retries] == [2, 3]  # type: ignore[index]
    assert [e.attributes["stalwart.delay"] for e in retries] == [1.0, 2.0]  # type: ignore[index]
    assert all(e.attributes["stalwart.policy"] == "evented" for e in retries)  # type: ignore[index]


async def test_testing_mode_makes_retries_instant() -> None:
    fn = flaky(3)
    retry = sw.Retry(attempts=4, backoff=sw.Backoff(initial=100.0, maximum=100.0))
    start = anyio.current_time()
    with instant_retries():
        assert await retry(fn)() == "ok"
    assert anyio.current_time() == start


async def test_testing_mode_ignores_server_hints() -> None:
    fn = flaky(1, exc=lambda n: ThrottledError(6.0))
    start = anyio.current_time()
    with instant_retries():
        await sw.Retry(attempts=2)(fn)()
    assert anyio.current_time() == start


async def test_testing_mode_still_gives_up_on_a_hint_longer_than_the_maximum() -> None:
    fn = flaky(1, exc=lambda n: ThrottledError(60.0))
    with instant_retries(), pytest.raises(ThrottledError):
        await sw.Retry(attempts=2)(fn)()
    assert len(fn.raised) == 1


async def test_testing_mode_can_cap_attempts() -> None:
    fn = flaky(5)
    with instant_retries(attempts=2), pytest.raises(ValueError):
        await sw.Retry(attempts=10)(fn)()
    assert len(fn.raised) == 2


async def test_concurrent_calls_keep_separate_attempt_counts() -> None:
    retry = sw.Retry(attempts=3, backoff=sw.Backoff(initial=1.0, jitter="none"))
    outcomes: dict[int, int] = {}

    @retry
    async def fn(i: int) -> int:
        outcomes[i] = outcomes.get(i, 0) + 1
        if outcomes[i] < 1 + i % 3:
            raise ValueError(i)
        return i

    results: list[int] = []

    async def run(i: int) -> None:
        results.append(await fn(i))

    async with anyio.create_task_group() as tg:
        for i in range(30):
            tg.start_soon(run, i)
    assert sorted(results) == list(range(30))
    assert all(outcomes[i] == 1 + i % 3 for i in range(30))


async def test_call_runs_a_function_under_the_policy() -> None:
    fn = flaky(1)
    retry = sw.Retry(attempts=2, backoff=NO_WAIT)
    assert await retry.call(fn) == "ok"

    async def add(a: int, b: int, *, c: int = 0) -> int:
        return a + b + c

    assert await retry.call(add, 1, 2, c=3) == 6


async def test_methods_can_be_decorated() -> None:
    class Client:
        def __init__(self) -> None:
            self.calls = 0

        @sw.Retry(attempts=3, backoff=NO_WAIT)
        async def get(self, key: str) -> str:
            self.calls += 1
            if self.calls < 2:
                raise OSError
            return key.upper()

    client = Client()
    assert await client.get("a") == "A"
    assert client.calls == 2


def test_the_decorated_function_keeps_its_signature_and_metadata() -> None:
    async def fetch(url: str, *, timeout: float = 1.0) -> bytes:
        """Fetch a URL."""
        return b""

    wrapped = sw.Retry()(fetch)
    assert inspect.signature(wrapped) == inspect.signature(fetch)
    assert wrapped.__name__ == "fetch"
    assert wrapped.__doc__ == "Fetch a URL."
    assert wrapped.__wrapped__ is fetch  # type: ignore[attr-defined]
    assert inspect.iscoroutinefunction(wrapped)


def test_decorating_a_sync_function_is_a_type_error() -> None:
    def sync() -> None:
        pass

    with pytest.raises(TypeError, match="async def"):
        sw.Retry()(sync)  # type: ignore[arg-type]


async def test_call_with_a_sync_function_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="async def"):
        await sw.Retry().call(len, "abc")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "param"),
    [
        ({"attempts": 0}, ValueError, "attempts"),
        ({"attempts": -2}, ValueError, "attempts"),
        ({"attempts": 2.5}, TypeError, "attempts"),
        ({"attempts": True}, TypeError, "attempts"),
        ({"on": "ValueError"}, TypeError, "on"),
        ({"on": ()}, TypeError, "on"),
        ({"on": (ValueError, 3)}, TypeError, "on"),
        ({"on_result": 3}, TypeError, "on_result"),
        ({"backoff": 1.0}, TypeError, "backoff"),
        ({"timeout": -1.0}, ValueError, "timeout"),
        ({"timeout": 0.0}, ValueError, "timeout"),
        ({"timeout": math.nan}, ValueError, "timeout"),
        ({"timeout": math.inf}, ValueError, "timeout"),
        ({"budget": 0.1}, TypeError, "budget"),
        ({"retry_after": 5}, TypeError, "retry_after"),
        ({"rng": 42}, TypeError, "rng"),
        ({"name": ""}, ValueError, "name"),
        ({"name": 3}, TypeError, "name"),
        ({"telemetry": "otel"}, TypeError, "telemetry"),
    ],
)
def test_invalid_options_fail_at_construction_naming_the_parameter(
    kwargs: dict[str, Any], error: type[Exception], param: str
) -> None:
    with pytest.raises(error, match=param):
        sw.Retry(**kwargs)


async def test_retries_disabled_lets_the_first_failure_through(registry: CollectorRegistry) -> None:
    from stalwart._retry import retries_disabled

    fn = flaky(1)
    retry = sw.Retry(attempts=3, backoff=NO_WAIT, telemetry=sw.Telemetry(registry=registry))
    with retries_disabled(), pytest.raises(ValueError):
        await retry(fn)()
    assert len(fn.raised) == 1
    assert await retry(fn)() == "ok"  # outside the block, retrying is back


async def test_retried_failures_leave_no_reference_cycles_behind() -> None:
    # A retried error is done with: its traceback is dropped, so nothing keeps
    # it (or the frames it ran through) alive once the call is over, even
    # with the cycle collector off. The error that is raised keeps its own.
    class Failure(Exception):
        pass  # unlike ValueError, can be weakly referenced

    refs: list[weakref.ref[Failure]] = []

    def remember(error: Failure) -> Failure:
        refs.append(weakref.ref(error))
        return error

    def failing(failures: int) -> Callable[[], Any]:
        async def fn() -> str:
            if len(refs) < failures:
                raise remember(Failure(len(refs)))  # no local: no cycle of our own
            return "ok"

        return fn

    retry = sw.Retry(attempts=3, backoff=NO_WAIT)
    gc.disable()
    try:
        assert await retry(failing(2))() == "ok"
        assert [ref() for ref in refs] == [None, None]

        refs.clear()
        with pytest.raises(Failure) as info:
            await retry(failing(3))()
        assert info.value is refs[-1]()
        assert info.value.__traceback__ is not None
        del info
        assert [ref() for ref in refs] == [None, None, None]

        # No retry made at all: one attempt, or a timeout budget (another path).
        for policy in (sw.Retry(attempts=1), sw.Retry(attempts=1, timeout=5.0)):
            refs.clear()
            with pytest.raises(Failure) as info:
                await policy(failing(1))()
            del info
            assert [ref() for ref in refs] == [None]
    finally:
        gc.enable()
