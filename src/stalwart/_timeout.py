"""The Timeout policy: a deadline scope around each call, counted and traced.

The ambient deadline it builds on, and the scope that cancels, are in
`_deadline`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, final

from . import _validate
from ._deadline import _Scope
from ._errors import DeadlineExceeded
from ._metrics import MetricFamily, PolicyMetrics
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry, observed
from .events import TimedOut

__all__ = ["Timeout", "TimeoutMetrics"]

P = ParamSpec("P")
T = TypeVar("T")


class TimeoutMetrics(PolicyMetrics):
    """A `Timeout`'s: its ``timeout`` outcomes are ``stalwart_timeouts_total``."""

    __slots__ = ()
    families = (
        MetricFamily("stalwart_timeouts", "counter", "Calls cancelled by a Timeout.", "timeout"),
    )


@final
class Timeout(Policy):
    """Cancel a call that takes longer than ``seconds``.

    The limit is ``min(seconds, sw.remaining())``: a `Timeout` never outlives
    the ambient deadline, and inside the call `remaining` reports it. When the
    limit passes, the call is cancelled and `DeadlineExceeded` raised, its
    ``timeout`` the limit that applied; ``stalwart_timeouts_total`` counts it
    whether the Timeout's own limit or the ambient deadline was nearer.

    Args:
        seconds: the limit for each call, > 0.
        name: the ``policy`` label of its metrics and attribute of its spans.
        telemetry: where it reports (``None``: the default `Telemetry`).

    Example::

        @sw.Timeout(2.0)
        async def get_price(sku: str) -> Decimal: ...
    """

    kind = "timeout"
    metrics_type = TimeoutMetrics
    _decorator_call = "Timeout(seconds)"
    __slots__ = ("_seconds",)

    def __init__(
        self, seconds: float, *, name: str = "timeout", telemetry: Telemetry | None = None
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        self._seconds = _validate.duration("seconds", seconds, positive=True)

    @property
    def seconds(self) -> float:
        """The limit for each call, before any nearer ambient deadline."""
        return self._seconds

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        call: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        slot, span, timer = self._telemetry.provider_slot, self.in_span, self.timer()
        seconds, name, owner, metrics = self._seconds, self._name, self, self._metrics

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def timing_out(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await span(plain, args, kwargs)
                # The scope counts the call's outcome, its own expiry as a timeout.
                start = None if timer is None else timer()
                # `with scope:` spelt out: a `with` calls `__enter__` through C,
                # a frame of its own, which the "Timeout" and "Pipeline" rows of
                # benchmarks/hot_path.py pay for on every call. (A scope's
                # `__exit__` never swallows: it raises, or lets the error go.)
                scope = _Scope(seconds, name, owner, metrics, start)
                scope.__enter__()
                try:
                    result = await (call(*args, **kwargs) if kwargs else call(*args))
                except BaseException as exc:
                    scope.__exit__(type(exc), exc, exc.__traceback__)
                    raise
                scope.__exit__(None, None, None)
                return result

            return timing_out

        return self.build(make, binding)

    @property
    def claims_outer_deadline(self) -> bool:
        return True

    def deadline_exceeded(self, timeout: float) -> DeadlineExceeded:
        if observed(self._telemetry):
            self.report(TimedOut, timeout=timeout)
        message = f"{self._name!r} timed out after {timeout:g}s"
        if timeout < self._seconds:
            # Operators read this: the Timeout's own limit never ran out.
            message += (
                f", the ambient deadline's time left (nearer than its own {self._seconds:g}s)"
            )
        return DeadlineExceeded(message, policy=self._name, timeout=timeout)

    def __repr__(self) -> str:
        return f"Timeout({self._seconds:g}, name={self._name!r})"
