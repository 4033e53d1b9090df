"""Client-side adaptive throttling, after the Google SRE book: `AdaptiveThrottle`.

The counts and the rule are `_throttle_window.ThrottleWindow`'s: over the
last ``window`` seconds, ``requests`` (every call tried, those refused here
included) and ``accepts`` (calls the dependency did not reject), and a new
call refused with probability ``max(0, (requests - k * accepts) /
(requests + 1))``. This module decides what a call's end means:

* a call that **returns** was accepted, unless ``failure_on_result`` says
  its result is a rejection (an HTTP 429 or 503 that was returned);
* a call that raises an exception matching ``failure_on`` was **rejected**;
  any other exception was accepted (the dependency answered);
* a call **cancelled by an expired deadline** around the policy timed out:
  rejected when ``failure_on`` matches a `DeadlineExceeded`; any other
  cancellation (the caller lost interest: a hedge that lost, a task group
  that ended) was not the dependency's doing, and counts as accepted.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, NoReturn, ParamSpec, TypeVar, final

from . import _clock
from ._deadline import counting_expiry
from ._errors import RateLimitExceeded
from ._gauges import LiveMetrics, refuse
from ._matchers import ExceptionMatcher, Matcher
from ._metrics import MetricFamily
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry
from ._throttle_window import ThrottleWindow

__all__ = ["AdaptiveThrottle", "AdaptiveThrottleMetrics"]

P = ParamSpec("P")
T = TypeVar("T")


class AdaptiveThrottleMetrics(LiveMetrics["AdaptiveThrottle"]):
    """An `AdaptiveThrottle`'s: its refusals, and its refusal probability, read live."""

    __slots__ = ()

    def _probability(self) -> Iterator[tuple[tuple[()], float]]:
        live = list(self.live)
        yield (), max((t.rejection_probability for t in live), default=0.0)

    families = (
        MetricFamily(
            "stalwart_throttle_rejected",
            "counter",
            "Calls an adaptive throttle refused locally.",
            "rejected",
        ),
        MetricFamily(
            "stalwart_throttle_rejection_probability",
            "gauge",
            "The probability that an adaptive throttle refuses a call, as of its last call.",
            _probability,
        ),
    )


@final
class AdaptiveThrottle(Policy):
    """Refuse calls locally, in proportion, while the dependency rejects them.

    Client-side adaptive throttling (*Site Reliability Engineering*, chapter
    21): over the last ``window`` seconds the throttle counts the calls tried
    (``requests``, refusals included) and those the dependency accepted
    (``accepts``), and refuses each new call with probability::

        max(0, (requests - k * accepts) / (requests + 1))

    While the dependency accepts everything, nothing is refused. When it
    rejects calls (it is overloaded, or down), the client sends it about
    ``k`` times what it accepts and refuses the rest itself, at no cost to
    the dependency, without waiting for a breaker to trip; as the dependency
    accepts more, fewer calls are refused. A refusal raises
    `RateLimitExceeded` (``retry_after`` None). ``k`` (>= 1) trades the
    dependency's wasted effort against how fast the client notices its
    recovery: the book suggests 2.

    What the dependency "rejected": an exception matching ``failure_on``, a
    result for which ``failure_on_result`` is true, and a call cancelled
    because the deadline around the throttle expired (when ``failure_on``
    matches a `DeadlineExceeded`). Anything else it accepted, other
    exceptions and cancellations included.

    Args:
        k: calls sent per accepted call before any is refused, >= 1.
        window: seconds of history counted, > 0.
        failure_on: what counts as a rejection: an exception type, a tuple
            of them, or a predicate (default: every `Exception`).
        failure_on_result: ``result -> bool``, true for a result that stands
            for a rejection.
        rng: where the refusals' random draws come from (default: a generator
            seeded by the operating system), for reproducible tests.
        name: the ``policy`` label of its metrics and attribute of its spans.
        telemetry: where it reports (``None``: the default `Telemetry`).

    Example::

        throttle = sw.AdaptiveThrottle(failure_on=(httpx.TransportError, Overloaded))

        @sw.Pipeline(throttle, sw.Timeout(2.0))
        async def recommend(user_id: str) -> list[str]: ...
    """

    kind = "throttle"
    metrics_type = AdaptiveThrottleMetrics
    _metrics: AdaptiveThrottleMetrics
    _decorator_call = "AdaptiveThrottle()"
    __slots__ = (
        "_failure_on",
        "_failure_on_result",
        "_failures",
        "_rng",
        "_window",
    )

    def __init__(
        self,
        *,
        k: float = 2.0,
        window: float = 120.0,
        failure_on: ExceptionMatcher = Exception,
        failure_on_result: Callable[[Any], bool] | None = None,
        rng: random.Random | None = None,
        name: str = "throttle",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        self._window = ThrottleWindow(k=k, window=window)
        self._failures = counting_expiry(Matcher("failure_on", failure_on, allow_empty=True))
        self._failure_on = failure_on
        if failure_on_result is not None and not callable(failure_on_result):
            raise TypeError(
                f"failure_on_result must be callable, not {type(failure_on_result).__name__}"
            )
        self._failure_on_result = failure_on_result
        if rng is not None and not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, not {type(rng).__name__}")
        self._rng = random.Random() if rng is None else rng
        self._metrics.live.add(self)

    @property
    def k(self) -> float:
        """Calls sent per accepted call before any is refused."""
        return self._window.k

    @property
    def window(self) -> float:
        """Seconds of history counted."""
        return self._window.window

    @property
    def failure_on(self) -> ExceptionMatcher:
        """What counts as a rejection by the dependency."""
        return self._failure_on

    @property
    def requests(self) -> int:
        """Calls tried in the window, refusals included, as of the last call."""
        return self._window.requests

    @property
    def accepts(self) -> int:
        """Calls the dependency accepted in the window, as of the last call."""
        return self._window.accepts

    @property
    def rejection_probability(self) -> float:
        """The probability of refusing a call, from the counts as of the last call."""
        window = self._window
        excess = window.requests - window.k * window.accepts
        return excess / (window.requests + 1) if excess > 0.0 else 0.0

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        call: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        # The wrapper closes over what an admitted call uses, and reaches the
        # rest through `throttle`: each name it closes over is copied into
        # every call's frame (the "AdaptiveThrottle" row of benchmarks/hot_path.py).
        window, rng, now = self._window, self._rng, _clock.now
        admit, accept = window.admit, window.accept_latest
        failure_on_result, throttle, metrics = self._failure_on_result, self, self._metrics
        slot, timer = self._telemetry.provider_slot, self.timer()

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await throttle.in_span(plain, args, kwargs)
                start = None if timer is None else timer()
                if not admit(now(), rng):
                    throttle._refuse(start)
                try:
                    result = await (call(*args, **kwargs) if kwargs else call(*args))
                except BaseException as exc:
                    throttle._failed(exc)
                    metrics.failed(exc, start)
                    raise
                if failure_on_result is None or not failure_on_result(result):
                    accept()
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return guarded

        return self.build(make, binding)

    def _failed(self, exc: BaseException) -> None:
        """A call raised ``exc``: accepted by the dependency, unless it is a rejection."""
        if not self._failures(exc):
            self._window.accept_latest()

    def _refuse(self, start: float | None) -> NoReturn:
        message = (
            f"adaptive throttle {self._name!r} refused the call: the dependency accepted "
            f"{self._window.accepts} of the last {self._window.requests - 1} calls"
        )
        error = RateLimitExceeded(message, policy=self._name, retry_after=None)
        refuse(self, start, "throttled", None, error)

    def __repr__(self) -> str:
        return f"AdaptiveThrottle(k={self.k:g}, window={self.window:g}, name={self._name!r})"
