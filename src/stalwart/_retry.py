"""Retries with exponential backoff and jitter, within deadlines and budgets."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Literal, ParamSpec, TypeVar, final, get_args

from . import _clock, _validate
from ._deadline import _Scope, remaining
from ._errors import CircuitOpenError, DeadlineExceeded, RateLimitExceeded
from ._matchers import ExceptionMatcher, Matcher
from ._metrics import Counted, MetricFamily, PolicyMetrics
from ._policy import AsyncCallable, Binding, Policy
from ._retry_budget import RetryBudget, charged
from ._telemetry import Telemetry, observed
from .events import RetryGaveUp, Retrying

__all__ = ["Backoff", "Jitter", "Retry", "retries_disabled"]

P = ParamSpec("P")
T = TypeVar("T")

Jitter = Literal["full", "equal", "decorrelated", "none"]
"""The jitter strategies of a `Backoff` (see `Backoff` for their formulas)."""
_JITTERS: Final = frozenset(get_args(Jitter))


@final
@dataclass(frozen=True, slots=True)
class Backoff:
    """How long to wait before each retry: exponential, capped, jittered.

    The delay before retry *k* (k = 1 for the first retry) starts from
    ``base = min(maximum, initial * multiplier**(k-1))`` and is then jittered:

    * ``"full"`` (default): uniform(0, base), which spreads competing clients
      best (AWS Architecture Blog, "Exponential Backoff And Jitter");
    * ``"equal"``: base/2 + uniform(0, base/2), never much shorter than base;
    * ``"decorrelated"``: min(maximum, uniform(initial, 3 x previous delay));
    * ``"none"``: base exactly.

    Args:
        initial: first base delay in seconds, >= 0.
        multiplier: growth per retry, >= 1.
        maximum: cap on any delay in seconds, >= ``initial``.
        jitter: ``"full"``, ``"equal"``, ``"decorrelated"`` or ``"none"``.
    """

    initial: float = 0.1
    multiplier: float = 2.0
    maximum: float = 10.0
    jitter: Jitter = "full"

    def __post_init__(self) -> None:
        initial = _validate.duration("initial", self.initial)
        multiplier = _validate.number("multiplier", self.multiplier, minimum=1.0)
        maximum = _validate.duration("maximum", self.maximum)
        if maximum < initial:
            raise ValueError(f"maximum must be >= initial ({initial:g}), got {self.maximum!r}")
        if self.jitter not in _JITTERS:
            raise ValueError(f"jitter must be one of {sorted(_JITTERS)}, got {self.jitter!r}")
        object.__setattr__(self, "initial", initial)
        object.__setattr__(self, "multiplier", multiplier)
        object.__setattr__(self, "maximum", maximum)

    def base(self, retry: int) -> float:
        """The un-jittered delay before retry number ``retry`` (1-based)."""
        if retry < 1:
            raise ValueError(f"retry must be >= 1, got {retry!r}")
        if self.initial == 0.0:
            return 0.0
        # Compare in log space: multiplier**(retry-1) overflows long before
        # a retry loop would give up.
        # (A difference of logs: maximum / initial itself may overflow.)
        if (retry - 1) * math.log(self.multiplier) >= math.log(self.maximum) - math.log(
            self.initial
        ):
            return self.maximum
        return min(self.maximum, self.initial * self.multiplier ** (retry - 1))

    def delay(
        self, retry: int, previous: float | None = None, rng: random.Random | None = None
    ) -> float:
        """A jittered delay before retry number ``retry`` (1-based).

        ``previous`` is the delay used before the previous retry: only
        ``"decorrelated"`` jitter needs it (``None``: ``initial``). Random
        draws come from ``rng``, or the ``random`` module's generator.
        """
        uniform = random.uniform if rng is None else rng.uniform
        jitter = self.jitter
        if jitter == "decorrelated":
            last = self.initial if previous is None else previous
            return min(self.maximum, uniform(self.initial, max(self.initial, 3.0 * last)))
        base = self.base(retry)
        if jitter == "full":
            return uniform(0.0, base)
        if jitter == "equal":
            half = base / 2.0
            return half + uniform(0.0, half)
        return base


_DEFAULT_BACKOFF: Final = Backoff()


class RetryMetrics(PolicyMetrics):
    """A `Retry`'s: retries made, and calls given up on while still failing."""

    __slots__ = ("attempts", "exhausted")

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.attempts = 0
        self.exhausted = 0

    families = (
        MetricFamily(
            "stalwart_retry_attempts",
            "counter",
            "Retries made (attempts after the first).",
            "attempts",
        ),
        MetricFamily(
            "stalwart_retry_exhausted",
            "counter",
            "Calls given up on while still failing (attempts, deadline or budget ran out).",
            "exhausted",
        ),
    )


class _TestingMode:
    """Set by `stalwart.testing`: no waiting, optionally fewer attempts."""

    __slots__ = ("attempts",)

    def __init__(self, attempts: int | None) -> None:
        self.attempts = attempts


_testing: _TestingMode | None = None

_retries_allowed: ContextVar[bool] = ContextVar("stalwart_retries_allowed", default=True)


@contextmanager
def retries_disabled() -> Iterator[None]:
    """Within this block, no `Retry` makes another attempt: failures propagate.

    For work that is not safe to repeat, such as a non-idempotent HTTP request
    sent through a user's policy: the other policies (breakers, timeouts,
    bulkheads) still apply, only the retrying is switched off. Tasks started
    inside the block inherit it.
    """
    token = _retries_allowed.set(False)
    try:
        yield
    finally:
        _retries_allowed.reset(token)


#: What a `Retry` given no ``on`` does not retry: refusals this process made to
#: protect a dependency. Waiting them out would block the caller for as long
#: as the refusal lasts (an open breaker's ``open_for``) and then send every
#: waiting caller at once.
_REFUSALS: Final = (CircuitOpenError, RateLimitExceeded)


def _retry_by_default(exc: BaseException) -> bool:
    """The default ``on``: every `Exception` except the refusals above."""
    return not isinstance(exc, _REFUSALS)


def _default_hint(outcome: object) -> float | None:
    hint = getattr(outcome, "retry_after", None) if isinstance(outcome, BaseException) else None
    return hint if isinstance(hint, (int, float)) else None


@final
class Retry(Policy):
    """Retry a failing call with backoff, within deadlines and budgets.

    Args:
        attempts: total tries including the first, >= 1.
        on: which exceptions to retry: a type, a tuple of types, or a
            predicate ``exc -> bool``. Not given (or None): every `Exception`
            except `CircuitOpenError` and `RateLimitExceeded`, so an open
            breaker or a rate limit fails the call at once instead of being
            waited out; ``on=Exception`` retries those too. Only `Exception`
            subclasses are ever retried: cancellation, ``KeyboardInterrupt``
            and ``SystemExit`` propagate at once, even with
            ``on=BaseException``.
        on_result: ``result -> bool``, True to retry a returned value.
        backoff: the delays between attempts (a `Backoff`).
        timeout: seconds for all attempts and sleeps together; works like a
            `deadline` around the whole retry.
        budget: a shared `RetryBudget`; a retry it denies is not made.
        retry_after: ``exc_or_result -> float | None``, a server's hint of
            how long to wait. By default an exception's ``retry_after``
            attribute (a server's ``Retry-After``, as `stalwart.httpx` and
            others attach it).
        rng: the ``random.Random`` jitter draws from (default: the ``random``
            module's), for reproducible delays.
        name: the ``policy`` label of its metrics and attribute of its spans.
        telemetry: where it reports (``None``: the default `Telemetry`).

    The delay before a retry is ``max(backoff delay, hint)``; when it would
    end after the ambient deadline or the ``timeout``, no more attempts are
    made. A hint longer than the backoff's ``maximum`` (``inf`` included) is
    not waited either: retrying stops at once, so no call ever sleeps longer
    than ``maximum`` between attempts (an upstream answering ``Retry-After:
    86400`` is down for the day, not for a retry). When retrying stops, the
    last exception propagates unchanged, or
    for result-based retries the last result is returned. An exception that
    was retried is done with: its ``__traceback__`` is cleared before the
    next attempt (it would otherwise keep alive the frames that hold it).

    Example::

        @sw.Retry(attempts=4, on=httpx.TransportError, backoff=sw.Backoff(initial=0.2))
        async def fetch(url: str) -> httpx.Response: ...
    """

    kind = "retry"
    metrics_type = RetryMetrics
    _metrics: RetryMetrics
    _decorator_call = "Retry()"
    __slots__ = (
        "_attempts",
        "_backoff",
        "_budget",
        "_hint",
        "_matches",
        "_on",
        "_on_result",
        "_rng",
        "_timeout",
        "_timer",
    )

    def __init__(
        self,
        attempts: int = 3,
        *,
        on: ExceptionMatcher | None = None,
        on_result: Callable[[Any], bool] | None = None,
        backoff: Backoff = _DEFAULT_BACKOFF,
        timeout: float | None = None,
        budget: RetryBudget | None = None,
        retry_after: Callable[[Any], float | None] | None = None,
        name: str = "retry",
        telemetry: Telemetry | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        self._attempts = _validate.count("attempts", attempts)
        # The default is a predicate like any other: `_retryable` checks it
        # only once an attempt has failed, so the hot path does not see it.
        self._on = _retry_by_default if on is None else on
        self._matches = Matcher("on", self._on)
        if on_result is not None and not callable(on_result):
            raise TypeError(f"on_result must be callable, not {type(on_result).__name__}")
        self._on_result = on_result
        if not isinstance(backoff, Backoff):
            raise TypeError(f"backoff must be a stalwart.Backoff, not {type(backoff).__name__}")
        self._backoff = backoff
        self._timeout = _validate.optional_duration("timeout", timeout, positive=True)
        if budget is not None and not isinstance(budget, RetryBudget):
            raise TypeError(f"budget must be a stalwart.RetryBudget, not {type(budget).__name__}")
        self._budget = budget
        if retry_after is not None and not callable(retry_after):
            raise TypeError(f"retry_after must be callable, not {type(retry_after).__name__}")
        self._hint = _default_hint if retry_after is None else retry_after
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, not {type(rng).__name__}")
        self._rng = rng
        self._timer = self.timer()  # (its telemetry is for life)

    @property
    def attempts(self) -> int:
        """Total tries, the first included."""
        return self._attempts

    @property
    def backoff(self) -> Backoff:
        """The delays between attempts."""
        return self._backoff

    @property
    def timeout(self) -> float | None:
        """Seconds for all attempts and sleeps together, or None."""
        return self._timeout

    @property
    def budget(self) -> RetryBudget | None:
        """The shared `RetryBudget`, or None."""
        return self._budget

    def _retryable(self, exc: BaseException) -> bool:
        # Only `Exception`s: cancellation and exits are never retried, whatever `on` says.
        return isinstance(exc, Exception) and self._matches(exc)

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        call: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        slot, metrics, owner = self._telemetry.provider_slot, self._metrics, self
        # No result predicate, budget, timeout nor latency to measure: the first
        # attempt is made inline, with nothing to time and no coroutine between
        # caller and `fn` (the "Retry, success" row); otherwise `_counted` makes
        # the call. The wrapper closes over what the inline attempt uses, and
        # reaches the rest through `owner`: each name it closes over is copied
        # into every call's frame.
        simple = (
            self._on_result is None
            and self._timeout is None
            and self._budget is None
            and self._timer is None
        )
        if not simple:
            return self.build_through(self._counted, call, binding)

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def retrying(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await owner.in_span(plain, args, kwargs)
                try:
                    result = await (call(*args, **kwargs) if kwargs else call(*args))
                except BaseException as exc:
                    if not owner._retryable(exc):
                        metrics.failed(exc, None)
                        raise
                    failure = exc
                else:
                    metrics.success += 1
                    return result
                # Retry outside the `except`, or every later error would
                # carry this one as its __context__. And let go of it after:
                # raised again, its traceback would hold this frame holding it.
                try:
                    with Counted(metrics):
                        return await owner._again(call, args, kwargs, failure, True)
                finally:
                    del failure

            return retrying

        return self.build(make, binding)

    async def _counted(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        """A call with a result predicate, budget, timeout or latency to measure."""
        timer = self._timer
        start = None if timer is None else timer()
        seconds, metrics = self._timeout, self._metrics
        # The block counts the call's outcome; a `timeout` scope also its expiry.
        with (
            Counted(metrics, start)
            if seconds is None
            else _Scope(seconds, self._name, self, metrics, start)
        ):
            budget = self._budget
            if budget is None:
                return await self._attempts_of(fn, args, kwargs)
            budget.deposit()
            # A Hedge inside drawing on this budget: the request is recorded already.
            token = charged.set(budget)
            try:
                return await self._attempts_of(fn, args, kwargs)
            finally:
                charged.reset(token)

    async def _attempts_of(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            if not self._retryable(exc):
                raise
            failure: Any = exc
        else:
            if self._on_result is None or not self._on_result(result):
                return result
            return await self._again(fn, args, kwargs, result, False)
        try:
            return await self._again(fn, args, kwargs, failure, True)
        finally:
            del failure  # no cycle if it is raised again

    async def _again(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failure: Any,
        raised: bool,
    ) -> T:
        """Retry after a failed first attempt; ``raised``: failure is an exception."""
        testing = _testing
        attempts = self._attempts
        if testing is not None and testing.attempts is not None:
            attempts = min(attempts, testing.attempts)
        backoff, rng, budget, on_result = self._backoff, self._rng, self._budget, self._on_result
        hint_of, metrics, retryable = self._hint, self._metrics, self._retryable
        telemetry = self._telemetry
        maximum = backoff.maximum
        no_backoff = maximum == 0.0
        if not _retries_allowed.get():
            attempts = 1
        attempt = 1
        previous: float | None = None
        while attempt < attempts:
            delay = 0.0 if no_backoff else backoff.delay(attempt, previous, rng)
            previous = delay
            hint = hint_of(failure)
            # (NaN compares false: ignored like a negative or absent hint.)
            if hint is not None and isinstance(hint, (int, float)) and hint > delay:
                if hint > maximum:
                    break  # longer than we ever wait: give up now, in tests too
                delay = float(hint)
            if testing is not None:
                delay = 0.0
            left = remaining()
            if left is not None and delay >= left:
                break  # the sleep would outlive the deadline: fail now
            if budget is not None and not budget.try_withdraw():
                break
            attempt += 1
            metrics.attempts += 1
            if observed(telemetry):
                self.report(
                    Retrying,
                    attempt=attempt,
                    delay=delay,
                    error=failure if raised else None,
                    result=None if raised else failure,
                )
            if raised:
                # The failure is handled: drop its traceback. It holds the
                # frames that hold the failure, a reference cycle per retried
                # error left for the garbage collector otherwise.
                failure.__traceback__ = None
            if delay > 0.0:
                await _clock.sleep(delay)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                if not retryable(exc):
                    raise
                failure, raised = exc, True
                continue
            if on_result is not None and on_result(result):
                failure, raised = result, False
                continue
            return result
        metrics.exhausted += 1
        if observed(telemetry):
            self.report(
                RetryGaveUp,
                attempts=attempt,
                error=failure if raised else None,
                result=None if raised else failure,
            )
        if raised:
            try:
                raise failure
            finally:
                failure = None  # no cycle: the error's traceback holds this frame
        return failure  # type: ignore[no-any-return]

    @property
    def claims_outer_deadline(self) -> bool:
        return False

    def deadline_exceeded(self, timeout: float) -> DeadlineExceeded:
        """The ``timeout`` budget ran out mid-attempt: the retry gave up."""
        self._metrics.exhausted += 1
        error = DeadlineExceeded(
            f"{self._name!r} ran out of its {timeout:g}s budget", policy=self._name, timeout=timeout
        )
        if observed(self._telemetry):
            self.report(RetryGaveUp, attempts=0, error=error, result=None)
        return error

    def __repr__(self) -> str:
        return f"Retry({self._attempts}, backoff={self._backoff!r}, name={self._name!r})"
