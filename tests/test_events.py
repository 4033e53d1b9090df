"""Events: what each policy reports to its telemetry's listeners, and how."""

from __future__ import annotations

import logging
import pickle
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart import CircuitState
from stalwart.events import (
    CallRejected,
    CircuitStateChanged,
    Event,
    FellBack,
    Hedged,
    IdempotentReplay,
    RetryGaveUp,
    Retrying,
    TimedOut,
    log_to,
)

from .conftest import Spans

ZERO = sw.Backoff(initial=0.0, maximum=0.0)


class Events(list[Event]):
    """A listener that keeps every event."""

    def __call__(self, event: Event) -> None:
        self.append(event)

    def of(self, kind: type[Event]) -> list[Any]:
        return [e for e in self if isinstance(e, kind)]


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def telemetry(events: Events) -> sw.Telemetry:
    return sw.Telemetry(registry=CollectorRegistry(), listeners=[events])


async def outcome(fn: Any) -> str:
    try:
        await fn()
    except Exception as exc:
        return type(exc).__name__
    return "returned"


async def wait_all_tasks_blocked() -> None:
    """Let every runnable task run until it blocks (virtual time: instant)."""
    await anyio.sleep(0.001)


def failing(times: int, error: type[Exception] = ConnectionError) -> Any:
    calls = 0

    async def fn() -> str:
        nonlocal calls
        calls += 1
        if calls <= times:
            raise error(f"failure {calls}")
        return "ok"

    return fn


# -- each policy's events ---------------------------------------------------------------


async def test_a_retry_reports_each_retry_with_the_error_that_caused_it(
    telemetry: sw.Telemetry, events: Events
) -> None:
    retry = sw.Retry(attempts=3, backoff=ZERO, name="r", telemetry=telemetry)
    assert await retry(failing(2))() == "ok"
    retrying = events.of(Retrying)
    assert [(e.attempt, e.delay, e.result) for e in retrying] == [(2, 0.0, None), (3, 0.0, None)]
    assert [str(e.error) for e in retrying] == ["failure 1", "failure 2"]
    assert all((e.policy, e.kind) == ("r", "retry") for e in retrying)
    assert events.of(RetryGaveUp) == []


async def test_a_retry_on_a_result_reports_the_result(
    telemetry: sw.Telemetry, events: Events
) -> None:
    results = iter([503, 200])

    async def status() -> int:
        return next(results)

    retry = sw.Retry(
        attempts=2, on_result=lambda s: s >= 500, backoff=ZERO, name="r", telemetry=telemetry
    )
    assert await retry(status)() == 200
    (event,) = events.of(Retrying)
    assert (event.error, event.result) == (None, 503)


async def test_a_retry_that_gives_up_reports_it(telemetry: sw.Telemetry, events: Events) -> None:
    retry = sw.Retry(attempts=2, backoff=ZERO, name="r", telemetry=telemetry)
    with pytest.raises(ConnectionError):
        await retry(failing(5))()
    (gave_up,) = events.of(RetryGaveUp)
    assert gave_up.attempts == 2
    assert str(gave_up.error) == "failure 2"


async def test_event_time_is_the_loops_clock(telemetry: sw.Telemetry, events: Events) -> None:
    retry = sw.Retry(
        attempts=3,
        backoff=sw.Backoff(initial=1.0, multiplier=1.0, jitter="none"),
        name="r",
        telemetry=telemetry,
    )
    await anyio.sleep(5.0)
    await retry(failing(2))()
    assert [e.time for e in events.of(Retrying)] == [5.0, 6.0]


async def test_a_breaker_reports_its_transitions_and_rejections(
    telemetry: sw.Telemetry, events: Events
) -> None:
    breaker = sw.CircuitBreaker(
        consecutive_failures=1, open_for=10.0, name="cb", telemetry=telemetry
    )
    guarded = breaker(failing(1))
    with pytest.raises(ConnectionError):
        await guarded()
    with pytest.raises(sw.CircuitOpenError):
        await guarded()
    await anyio.sleep(10.0)
    assert await guarded() == "ok"
    changes = [(e.from_state, e.to_state) for e in events.of(CircuitStateChanged)]
    assert changes == [
        (CircuitState.CLOSED, CircuitState.OPEN),
        (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]
    (rejected,) = events.of(CallRejected)
    assert (rejected.reason, rejected.retry_after, rejected.kind) == (
        "circuit_open",
        10.0,
        "circuit_breaker",
    )


def test_reset_outside_a_loop_is_reported_on_the_monotonic_clock(
    telemetry: sw.Telemetry, events: Events
) -> None:
    breaker = sw.CircuitBreaker(name="cb", telemetry=telemetry)
    breaker.force_open()
    breaker.reset()
    assert [e.to_state for e in events.of(CircuitStateChanged)] == [
        CircuitState.OPEN,
        CircuitState.CLOSED,
    ]


async def test_a_bulkhead_reports_its_rejections(telemetry: sw.Telemetry, events: Events) -> None:
    bulkhead = sw.Bulkhead(1, name="bh", telemetry=telemetry)
    gate = anyio.Event()

    async def held() -> None:
        await gate.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(bulkhead(held))
        await wait_all_tasks_blocked()
        with pytest.raises(sw.BulkheadFullError):
            await bulkhead(held)()
        gate.set()
    (rejected,) = events.of(CallRejected)
    assert (rejected.policy, rejected.kind, rejected.reason, rejected.retry_after) == (
        "bh",
        "bulkhead",
        "bulkhead_full",
        None,
    )


async def test_a_timeout_reports_the_limit_that_applied(
    telemetry: sw.Telemetry, events: Events
) -> None:
    timeout = sw.Timeout(5.0, name="t", telemetry=telemetry)

    async def slow() -> None:
        await anyio.sleep(10.0)

    with sw.deadline(2.0), pytest.raises(sw.DeadlineExceeded):
        await timeout(slow)()
    (timed_out,) = events.of(TimedOut)
    assert (timed_out.policy, timed_out.timeout, timed_out.time) == ("t", 2.0, 2.0)


async def test_idempotency_reports_replays_and_refused_conflicts(
    telemetry: sw.Telemetry, events: Events
) -> None:
    gate = anyio.Event()

    async def pay(key: str) -> str:
        await gate.wait()
        return f"paid {key}"

    policy = sw.Idempotency(key="key", on_conflict="raise", name="pay", telemetry=telemetry)
    paying = policy(pay)
    async with anyio.create_task_group() as tg:
        tg.start_soon(paying, "k")
        await wait_all_tasks_blocked()
        with pytest.raises(sw.IdempotencyConflict):
            await paying("k")
        gate.set()
    assert await paying("k") == "paid k"
    assert [type(e) for e in events] == [CallRejected, IdempotentReplay]
    assert events.of(CallRejected)[0].reason == "idempotency_conflict"


async def test_the_idempotency_middleware_reports_replays(
    telemetry: sw.Telemetry, events: Events
) -> None:
    from stalwart.asgi import IdempotencyMiddleware

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"made"})

    middleware = IdempotencyMiddleware(app, name="orders", telemetry=telemetry)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/orders",
        "query_string": b"",
        "headers": [(b"idempotency-key", b"k-1")],
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    for _ in range(2):
        await middleware(scope, receive, send)
    (replay,) = events.of(IdempotentReplay)
    assert (replay.policy, replay.kind) == ("orders", "idempotency")


# -- listeners ----------------------------------------------------------------------------


async def test_listeners_are_called_in_order(events: Events) -> None:
    order: list[str] = []
    telemetry = sw.Telemetry(
        registry=CollectorRegistry(),
        listeners=[lambda e: order.append("first"), lambda e: order.append("second")],
    )
    retry = sw.Retry(attempts=2, backoff=ZERO, telemetry=telemetry)
    await retry(failing(1))()
    assert order == ["first", "second"]


async def test_a_listener_that_raises_is_logged_and_never_reaches_the_call(
    caplog: pytest.LogCaptureFixture, events: Events
) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("listener bug")

    telemetry = sw.Telemetry(registry=CollectorRegistry(), listeners=[broken, events])
    retry = sw.Retry(attempts=2, backoff=ZERO, name="r", telemetry=telemetry)
    with caplog.at_level(logging.ERROR, logger="stalwart"):
        assert await retry(failing(1))() == "ok"
    assert len(events.of(Retrying)) == 1  # the next listener still heard it
    (record,) = caplog.records
    assert record.name == "stalwart"
    assert "listener" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], RuntimeError)


async def test_policies_on_a_telemetry_without_listeners_report_nothing(events: Events) -> None:
    quiet = sw.Telemetry(registry=CollectorRegistry())
    heard = sw.Telemetry(registry=CollectorRegistry(), listeners=[events])
    await sw.Retry(attempts=2, backoff=ZERO, telemetry=quiet)(failing(1))()
    await sw.Retry(attempts=2, backoff=ZERO, name="heard", telemetry=heard)(failing(1))()
    assert [e.policy for e in events] == ["heard"]


def test_listeners_must_be_callables() -> None:
    with pytest.raises(TypeError, match="listeners"):
        sw.Telemetry(listeners=[42])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="listeners"):
        sw.Telemetry(listeners=print)  # type: ignore[arg-type]


async def test_events_are_also_span_events(events: Events, spans: Spans) -> None:
    telemetry = sw.Telemetry(
        registry=CollectorRegistry(), tracer_provider=spans.provider, listeners=[events]
    )
    retry = sw.Retry(attempts=2, backoff=ZERO, name="r", telemetry=telemetry)
    await retry(failing(1))()
    (span,) = spans.finished
    (event,) = span.events
    assert event.name == "stalwart.retry"
    assert event.attributes == {
        "stalwart.policy": "r",
        "stalwart.attempt": 2,
        "stalwart.delay": 0.0,
        "error.type": "ConnectionError",
    }


# -- log_to -------------------------------------------------------------------------------


async def test_log_to_logs_opening_and_giving_up_as_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    telemetry = sw.Telemetry(registry=CollectorRegistry(), listeners=[log_to()])
    retry = sw.Retry(attempts=2, backoff=ZERO, name="r", telemetry=telemetry)
    breaker = sw.CircuitBreaker(consecutive_failures=1, name="cb", telemetry=telemetry)
    with caplog.at_level(logging.INFO, logger="stalwart"):
        assert await outcome(retry(failing(5))) == "ConnectionError"
        assert await outcome(breaker(failing(5))) == "ConnectionError"
        assert await outcome(breaker(failing(5))) == "CircuitOpenError"
    shown = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert shown == [
        ("INFO", "retry 'r': attempt 2 in 0s after ConnectionError: failure 1"),
        ("WARNING", "retry 'r': gave up after 2 attempts: ConnectionError: failure 2"),
        ("WARNING", "circuit_breaker 'cb': closed -> open"),
        ("INFO", "circuit_breaker 'cb': rejected a call (circuit_open, retry after 30s)"),
    ]
    assert isinstance(getattr(caplog.records[2], "stalwart_event", None), CircuitStateChanged)


async def test_log_to_uses_the_logger_it_is_given(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("myapp.resilience")
    telemetry = sw.Telemetry(registry=CollectorRegistry(), listeners=[log_to(logger)])
    with caplog.at_level(logging.INFO, logger="myapp.resilience"):
        await sw.Retry(attempts=2, backoff=ZERO, telemetry=telemetry)(failing(1))()
    assert [r.name for r in caplog.records] == ["myapp.resilience"]


def test_log_to_needs_a_logger() -> None:
    with pytest.raises(TypeError, match="logger"):
        log_to("stalwart")  # type: ignore[arg-type]


# -- the event types ----------------------------------------------------------------------


def test_events_are_frozen_slotted_and_picklable() -> None:
    made: list[Event] = [
        Retrying("r", "retry", 1.0, attempt=2, delay=0.5, error=ValueError("x"), result=None),
        RetryGaveUp("r", "retry", 1.0, attempts=3, error=None, result=503),
        CircuitStateChanged("cb", "circuit_breaker", 1.0, CircuitState.OPEN, CircuitState.CLOSED),
        CallRejected("bh", "bulkhead", 1.0, reason="bulkhead_full", retry_after=None),
        TimedOut("t", "timeout", 1.0, timeout=2.0),
        IdempotentReplay("i", "idempotency", 1.0),
        Hedged("h", "hedge", 1.0, attempt=2),
        FellBack("f", "fallback", 1.0, error=None, result="cached"),
    ]
    for event in made:
        assert not hasattr(event, "__dict__")
        with pytest.raises(AttributeError):
            event.policy = "other"  # type: ignore[misc]
        copy = pickle.loads(pickle.dumps(event))
        assert type(copy) is type(event)
        assert copy.span_attributes() == event.span_attributes()
        assert str(event).startswith(f"{event.kind} {event.policy!r}: ")
    assert made[3].span_event == "stalwart.bulkhead.rejected"
    assert CallRejected("rl", "rate_limiter", 0.0, "rate_limited", 1.0).span_event == (
        "stalwart.rate_limiter.rejected"
    )
    assert made[1].span_attributes()["stalwart.result"] == 503
    assert made[7].span_attributes()["stalwart.result"] == "cached"
