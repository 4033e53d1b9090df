"""AdaptiveThrottle: the SRE book's client-side throttle, as a policy, in virtual time."""

from __future__ import annotations

import random
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart.events import CallRejected, Event

from .conftest import Spans, sample


class Scripted(random.Random):
    """A random source whose draws are given in advance (then ``then``, if set)."""

    def __init__(self, *draws: float, then: float | None = None) -> None:
        super().__init__(0)
        self.draws = list(draws)
        self.then = then

    def random(self) -> float:
        if self.draws:
            return self.draws.pop(0)
        assert self.then is not None, "an unexpected draw"
        return self.then


class Rejected(Exception):
    """The dependency turned the call away (overloaded)."""


async def reject() -> None:
    raise Rejected


async def accept() -> str:
    return "ok"


async def attempt(throttle: sw.AdaptiveThrottle, fn: Any) -> str:
    """Call ``fn`` through the throttle: what became of it."""
    try:
        await throttle.call(fn)
    except sw.RateLimitExceeded:
        return "refused"
    except Rejected:
        return "rejected"
    return "accepted"


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"k": 0.9}, ValueError, "k must be >= 1"),
        ({"k": "2"}, TypeError, "k must be a number"),
        ({"window": 0.0}, ValueError, "window must be > 0"),
        ({"failure_on": 3}, TypeError, "failure_on must be an exception type"),
        ({"failure_on_result": 3}, TypeError, "failure_on_result must be callable"),
        ({"rng": 3}, TypeError, "rng must be a random.Random"),
    ],
)
def test_options_are_validated_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        sw.AdaptiveThrottle(**options)


def test_the_defaults_are_the_books() -> None:
    throttle = sw.AdaptiveThrottle()
    assert (throttle.k, throttle.window, throttle.failure_on) == (2.0, 120.0, Exception)
    assert (throttle.requests, throttle.accepts, throttle.rejection_probability) == (0, 0, 0.0)
    assert repr(throttle) == "AdaptiveThrottle(k=2, window=120, name='throttle')"


# -- the rule -----------------------------------------------------------------------------


async def test_a_dependency_that_accepts_everything_is_never_throttled() -> None:
    throttle = sw.AdaptiveThrottle(rng=Scripted())  # a draw would fail: none is made
    for _ in range(1000):
        assert await attempt(throttle, accept) == "accepted"
    assert (throttle.requests, throttle.accepts) == (1000, 1000)


@pytest.mark.parametrize(("k", "rejected"), [(2.0, 6), (1.5, 7), (1.0, 9)])
async def test_a_call_is_refused_with_probability_requests_minus_k_accepts_over_requests_plus_1(
    k: float, rejected: int
) -> None:
    """After 2 accepted and ``rejected`` rejected calls: p = (R - k A) / (R + 1)."""
    rng = Scripted(then=0.999999)
    throttle = sw.AdaptiveThrottle(k=k, rng=rng)
    for _ in range(2):
        await throttle.call(accept)
    for _ in range(rejected):
        assert await attempt(throttle, reject) == "rejected"
    requests, accepts = throttle.requests, throttle.accepts
    p = (requests - k * accepts) / (requests + 1)
    assert p > 0
    assert throttle.rejection_probability == pytest.approx(p)
    rng.draws = [p + 1e-9]
    assert await attempt(throttle, accept) == "accepted"  # a draw above p goes through
    p = (throttle.requests - k * throttle.accepts) / (throttle.requests + 1)
    rng.draws = [p - 1e-9]
    assert await attempt(throttle, accept) == "refused"  # a draw below p is refused


async def test_refused_calls_count_as_requests_and_never_as_accepts() -> None:
    throttle = sw.AdaptiveThrottle(k=1.0, rng=Scripted(0.0, 0.0))
    assert await attempt(throttle, reject) == "rejected"  # nothing to go by yet: no draw
    assert await attempt(throttle, accept) == "refused"
    assert await attempt(throttle, accept) == "refused"
    assert (throttle.requests, throttle.accepts) == (3, 0)


async def test_in_front_of_a_dependency_that_accepts_c_per_second_about_k_c_get_through() -> None:
    """The book's steady state: offered L calls/s, a dependency that accepts C of them a
    second sees about k C, and the client refuses the rest: a share (L - k C) / L."""
    offered, capacity, k = 100.0, 20.0, 2.0
    throttle = sw.AdaptiveThrottle(k=k, window=60.0, rng=random.Random(7))
    arrivals = random.Random(11)
    tokens, last = capacity, 0.0

    async def dependency() -> None:
        nonlocal tokens, last
        now = anyio.current_time()
        tokens = min(capacity, tokens + (now - last) * capacity)
        last = now
        if tokens < 1.0:
            raise Rejected
        tokens -= 1.0

    outcomes: list[tuple[float, str]] = []
    start = anyio.current_time()
    last = start
    while (t := anyio.current_time() - start) < 200.0:
        outcomes.append((t, await attempt(throttle, dependency)))
        await anyio.sleep(arrivals.expovariate(offered))
    settled = [what for t, what in outcomes if t >= 80.0]
    refused = settled.count("refused") / len(settled)
    reached = len(settled) - settled.count("refused")
    assert refused == pytest.approx((offered - k * capacity) / offered, abs=0.04)
    assert reached / 120.0 == pytest.approx(k * capacity, rel=0.1)


async def test_it_forgets_rejections_older_than_its_window() -> None:
    throttle = sw.AdaptiveThrottle(window=60.0, rng=random.Random(1))
    for _ in range(200):
        await attempt(throttle, reject)
    assert throttle.rejection_probability > 0.9
    await anyio.sleep(61.0)
    assert await attempt(throttle, accept) == "accepted"
    assert (throttle.requests, throttle.accepts) == (1, 1)
    assert throttle.rejection_probability == 0.0


async def test_the_same_seed_refuses_the_same_calls() -> None:
    async def run(seed: int) -> list[str]:
        throttle = sw.AdaptiveThrottle(rng=random.Random(seed))
        flaky = random.Random(5)
        return [
            await attempt(throttle, reject if flaky.random() < 0.8 else accept) for _ in range(300)
        ]

    first, again, other = await run(1), await run(1), await run(2)
    assert first == again
    assert first != other
    assert "refused" in first


# -- what counts as a rejection ----------------------------------------------------------


async def test_failure_on_chooses_what_counts_as_a_rejection() -> None:
    throttle = sw.AdaptiveThrottle(failure_on=Rejected, rng=Scripted())

    async def broken() -> None:
        raise KeyError("a bug, not overload")

    with pytest.raises(KeyError):
        await throttle.call(broken)
    await attempt(throttle, reject)
    assert (throttle.requests, throttle.accepts) == (2, 1)


async def test_failure_on_result_counts_a_returned_rejection() -> None:
    throttle = sw.AdaptiveThrottle(
        failure_on_result=lambda status: status == 503, rng=Scripted(then=0.99)
    )

    async def answer(status: int) -> int:
        return status

    assert await throttle.call(answer, 503) == 503
    assert await throttle.call(answer, 200) == 200
    assert (throttle.requests, throttle.accepts) == (2, 1)


async def test_a_call_cut_short_by_the_deadline_around_it_was_rejected() -> None:
    throttle = sw.AdaptiveThrottle(rng=Scripted())

    async def hang() -> None:
        await anyio.sleep_forever()

    with pytest.raises(sw.DeadlineExceeded):
        await sw.Timeout(1.0)(throttle(hang))()
    assert (throttle.requests, throttle.accepts) == (1, 0)


async def test_a_call_its_caller_abandoned_was_not_rejected() -> None:
    throttle = sw.AdaptiveThrottle(rng=Scripted())

    async def hang() -> None:
        await anyio.sleep_forever()

    with anyio.move_on_after(1.0):
        await throttle.call(hang)
    assert (throttle.requests, throttle.accepts) == (1, 1)


async def test_without_timeouts_among_its_failures_a_deadline_is_an_accept() -> None:
    throttle = sw.AdaptiveThrottle(failure_on=Rejected, rng=Scripted())

    async def hang() -> None:
        await anyio.sleep_forever()

    with pytest.raises(sw.DeadlineExceeded):
        await sw.Timeout(1.0)(throttle(hang))()
    assert (throttle.requests, throttle.accepts) == (1, 1)


# -- what it reports ---------------------------------------------------------------------


async def test_a_refusal_is_a_rate_limit_error_an_event_and_a_count(
    registry: CollectorRegistry,
) -> None:
    seen: list[Event] = []
    telemetry = sw.Telemetry(registry=registry, listeners=[seen.append])
    throttle = sw.AdaptiveThrottle(
        k=1.0, rng=Scripted(0.9, 0.9, 0.0), name="recs", telemetry=telemetry
    )
    for _ in range(3):
        assert await attempt(throttle, reject) == "rejected"
    with pytest.raises(sw.RateLimitExceeded) as caught:
        await throttle.call(accept)
    assert caught.value.policy == "recs"
    assert caught.value.retry_after is None
    assert "accepted 0 of the last 3 calls" in str(caught.value)
    [event] = [e for e in seen if isinstance(e, CallRejected)]
    assert (event.reason, event.kind, event.policy) == ("throttled", "throttle", "recs")
    assert sample(registry, "stalwart_throttle_rejected_total", policy="recs") == 1
    assert sample(registry, "stalwart_throttle_rejection_probability", policy="recs") == (
        pytest.approx(4 / 5)
    )
    calls = "stalwart_calls_total"
    assert sample(registry, calls, policy="recs", kind="throttle", outcome="rejected") == 1
    assert sample(registry, calls, policy="recs", kind="throttle", outcome="error") == 3


async def test_a_call_runs_in_its_span_and_a_refusal_is_recorded_on_it(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    throttle = sw.AdaptiveThrottle(k=1.0, rng=Scripted(0.0), name="recs", telemetry=telemetry)
    await attempt(throttle, reject)
    await attempt(throttle, accept)
    refused = spans.finished[-1]
    assert refused.name == "stalwart.throttle recs"
    assert [e.name for e in refused.events] == ["stalwart.throttle.rejected", "exception"]
