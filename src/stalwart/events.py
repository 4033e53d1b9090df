"""What policies do, as events: for listeners, logs and spans.

A `~stalwart.Telemetry` given ``listeners`` calls each of them, in order and
synchronously, with every event of every policy that reports to it::

    import logging
    import stalwart as sw
    from stalwart.events import log_to

    telemetry = sw.Telemetry(listeners=[log_to(logging.getLogger("myapp.resilience"))])
    breaker = sw.CircuitBreaker(name="payments", telemetry=telemetry)

Every event is a frozen dataclass and a subclass of `Event`: ``policy`` (the
policy's name), ``kind`` (its kind: ``"retry"``, ``"circuit_breaker"``, ...)
and ``time`` (the running event loop's clock, the one every policy reads).
The same events are recorded on the current span, if one is recording.

A listener that raises is logged on the ``stalwart`` logger and never reaches
the call. With no listener and no tracing, no event is even built.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, final

from opentelemetry.util.types import AttributeValue

from ._circuit_store import CircuitState

__all__ = [
    "CallRejected",
    "CircuitStateChanged",
    "Event",
    "FellBack",
    "Hedged",
    "IdempotentReplay",
    "LimitChanged",
    "Listener",
    "RetryGaveUp",
    "Retrying",
    "TimedOut",
    "log_to",
]

_POLICY: Final = "stalwart.policy"
_SHOWN: Final = 80  # characters of a result shown in a span attribute or a log line


@dataclass(frozen=True, slots=True)
class Event:
    """Something a policy did.

    Attributes:
        policy: the policy's name.
        kind: the policy's kind (``"retry"``, ``"circuit_breaker"``, ...).
        time: when, on the running event loop's clock (``time.monotonic()``
            for an event outside any loop, such as `CircuitBreaker.reset`).
    """

    policy: str
    kind: str
    time: float

    #: the name of the span event that records it
    span_event: ClassVar[str] = "stalwart.event"

    def span_attributes(self) -> dict[str, AttributeValue]:
        """The span event's attributes (``stalwart.policy`` and the event's own)."""
        return {_POLICY: self.policy}

    def __str__(self) -> str:
        return f"{self.kind} {self.policy!r}: {self._describe()}"

    def _describe(self) -> str:
        return type(self).__name__


Listener = Callable[[Event], None]
"""A callable given every event of the policies that report to its telemetry."""


def _shown(value: object) -> AttributeValue:
    """A value as a span attribute: primitives as they are, anything else by type."""
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= _SHOWN else value[: _SHOWN - 3] + "..."
    if value is None:
        return "None"
    return _type_name(value)


def _type_name(value: object) -> str:
    cls = type(value)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _cause(error: BaseException | None, result: object) -> dict[str, AttributeValue]:
    if error is not None:
        return {"error.type": _type_name(error)}
    return {"stalwart.result": _shown(result)}


def _why(error: BaseException | None, result: object) -> str:
    if error is not None:
        text = str(error)
        return f"{_type_name(error)}: {text}" if text else _type_name(error)
    shown = repr(result)
    return f"result {shown if len(shown) <= _SHOWN else shown[: _SHOWN - 3] + '...'}"


@final
@dataclass(frozen=True, slots=True)
class Retrying(Event):
    """A `~stalwart.Retry` is about to make another attempt.

    Attributes:
        attempt: the number of the attempt about to be made (2 for the first retry).
        delay: seconds it waits first.
        error: the exception that made it retry, or None for a result.
        result: the result that made it retry (``on_result``), or None.
    """

    attempt: int
    delay: float
    error: BaseException | None
    result: Any

    span_event: ClassVar[str] = "stalwart.retry"

    def span_attributes(self) -> dict[str, AttributeValue]:
        return {
            _POLICY: self.policy,
            "stalwart.attempt": self.attempt,
            "stalwart.delay": self.delay,
            **_cause(self.error, self.result),
        }

    def _describe(self) -> str:
        return f"attempt {self.attempt} in {self.delay:.3g}s after {_why(self.error, self.result)}"


@final
@dataclass(frozen=True, slots=True)
class RetryGaveUp(Event):
    """A `~stalwart.Retry` stopped retrying a call that was still failing.

    Its attempts, its deadline, its ``timeout`` or its budget ran out (or
    the server's hint was longer than the backoff's maximum): ``error`` now
    propagates, or ``result`` is returned.

    Attributes:
        attempts: the attempts made.
        error: the last exception (which propagates), or None.
        result: the last result (which is returned), or None.
    """

    attempts: int
    error: BaseException | None
    result: Any

    span_event: ClassVar[str] = "stalwart.retry.gave_up"

    def span_attributes(self) -> dict[str, AttributeValue]:
        return {
            _POLICY: self.policy,
            "stalwart.attempts": self.attempts,
            **_cause(self.error, self.result),
        }

    def _describe(self) -> str:
        return f"gave up after {self.attempts} attempts: {_why(self.error, self.result)}"


@final
@dataclass(frozen=True, slots=True)
class CircuitStateChanged(Event):
    """A `~stalwart.CircuitBreaker` moved from one state to another."""

    from_state: CircuitState
    to_state: CircuitState

    span_event: ClassVar[str] = "stalwart.circuit.transition"

    def span_attributes(self) -> dict[str, AttributeValue]:
        return {
            _POLICY: self.policy,
            "stalwart.from_state": self.from_state.value,
            "stalwart.to_state": self.to_state.value,
        }

    def _describe(self) -> str:
        return f"{self.from_state.value} -> {self.to_state.value}"


# Span event names of rejections the contract names; others: stalwart.<kind>.rejected.
_REJECTION_EVENTS: Final = {
    "circuit_open": "stalwart.circuit.rejected",
    "bulkhead_full": "stalwart.bulkhead.rejected",
}


@final
@dataclass(frozen=True, slots=True)
class CallRejected(Event):
    """A policy refused a call without running it.

    Attributes:
        reason: ``"circuit_open"``, ``"bulkhead_full"``, ``"rate_limited"``,
            ``"idempotency_conflict"``, ...
        retry_after: seconds until the policy would admit it, when known.
    """

    reason: str
    retry_after: float | None

    @property
    def span_event(self) -> str:  # type: ignore[override]
        return _REJECTION_EVENTS.get(self.reason) or f"stalwart.{self.kind}.rejected"

    def span_attributes(self) -> dict[str, AttributeValue]:
        attributes: dict[str, AttributeValue] = {
            _POLICY: self.policy,
            "stalwart.reason": self.reason,
        }
        if self.retry_after is not None:
            attributes["stalwart.retry_after"] = self.retry_after
        return attributes

    def _describe(self) -> str:
        after = "" if self.retry_after is None else f", retry after {self.retry_after:.3g}s"
        return f"rejected a call ({self.reason}{after})"


@final
@dataclass(frozen=True, slots=True)
class TimedOut(Event):
    """A `~stalwart.Timeout` cancelled a call; ``timeout`` is the limit that applied."""

    timeout: float

    span_event: ClassVar[str] = "stalwart.timeout"

    def span_attributes(self) -> dict[str, AttributeValue]:
        return {_POLICY: self.policy, "stalwart.timeout": self.timeout}

    def _describe(self) -> str:
        return f"timed out after {self.timeout:.3g}s"


@final
@dataclass(frozen=True, slots=True)
class IdempotentReplay(Event):
    """A call (or request) was answered with the stored result of an earlier one."""

    span_event: ClassVar[str] = "stalwart.idempotency.replayed"

    def _describe(self) -> str:
        return "replayed a stored result"


@final
@dataclass(frozen=True, slots=True)
class Hedged(Event):
    """A hedging policy started another attempt beside a slow one (``attempt``: its number)."""

    attempt: int

    span_event: ClassVar[str] = "stalwart.hedge"

    def span_attributes(self) -> dict[str, AttributeValue]:
        return {_POLICY: self.policy, "stalwart.attempt": self.attempt}

    def _describe(self) -> str:
        return f"started attempt {self.attempt} beside a slow one"


@final
@dataclass(frozen=True, slots=True)
class FellBack(Event):
    """A fallback policy answered instead of a call that failed.

    Attributes:
        error: the exception it answered for, or None.
        result: the result it answered for (``on_result``), or None.
    """

    error: BaseException | None
    result: Any

    span_event: ClassVar[str] = "stalwart.fallback"

    def span_attributes(self) -> dict[str, AttributeValue]:
        return {_POLICY: self.policy, **_cause(self.error, self.result)}

    def _describe(self) -> str:
        return f"fell back after {_why(self.error, self.result)}"


@final
@dataclass(frozen=True, slots=True)
class LimitChanged(Event):
    """An adaptive limit moved (a `~stalwart.ConcurrencyLimit`'s, as latency or drops told it).

    Attributes:
        from_limit: the limit before.
        to_limit: the limit now.
    """

    from_limit: int
    to_limit: int

    span_event: ClassVar[str] = "stalwart.limit.changed"

    def span_attributes(self) -> dict[str, AttributeValue]:
        return {
            _POLICY: self.policy,
            "stalwart.from_limit": self.from_limit,
            "stalwart.to_limit": self.to_limit,
        }

    def _describe(self) -> str:
        return f"limit {self.from_limit} -> {self.to_limit}"


def _alarming(event: Event) -> bool:
    """Does it deserve a WARNING? A breaker opening, a retry giving up."""
    if isinstance(event, CircuitStateChanged):
        return event.to_state is CircuitState.OPEN
    return isinstance(event, RetryGaveUp)


def log_to(logger: logging.Logger | None = None) -> Listener:
    """A listener that logs each event on ``logger`` (default: the ``stalwart`` logger).

    A breaker opening and a retry giving up are logged at WARNING, every
    other event at INFO. Each record carries the event itself as
    ``record.stalwart_event``, for structured log handlers.

    Example::

        telemetry = sw.Telemetry(listeners=[log_to()])
    """
    if logger is None:
        logger = logging.getLogger("stalwart")
    elif not isinstance(logger, logging.Logger):
        raise TypeError(f"logger must be a logging.Logger or None, not {type(logger).__name__}")
    target = logger

    def log(event: Event) -> None:
        level = logging.WARNING if _alarming(event) else logging.INFO
        if target.isEnabledFor(level):
            target.log(level, "%s", event, extra={"stalwart_event": event})

    return log
