"""Inbound admission control: `LoadShedMiddleware`."""

from __future__ import annotations

import math
from typing import Final, final

from .. import _clock, _validate
from .._bulkhead import Bulkhead
from .._concurrency_limit import ConcurrencyLimit
from .._deadline import remaining
from .._errors import BulkheadFullError, DeadlineExceeded, RateLimitExceeded
from .._http import ERROR_RULES, error_rule, retry_after_header
from .._latency_quantile import LatencyQuantile
from .._policy import Binding
from ..events import CallRejected
from ._types import ASGIApp, Receive, Scope, Send, _send_problem

# The service times kept: 0.1 ms to 10 min, 2 % accuracy, half-life 30 s.
_LOW: Final = 0.0001
_HIGH: Final = 600.0
_HALF_LIFE: Final = 30.0

#: Requests measured (their weight, decayed) before the typical service time is trusted.
MIN_SAMPLES: Final = 10.0


class _Request:
    """One request's passage through the limit: did the app start?"""

    __slots__ = ("entered",)

    def __init__(self) -> None:
        self.entered = False


@final
class LoadShedMiddleware:
    """Refuse the requests a service cannot serve in time, at once, instead of queueing them.

    Under more load than it can serve, a service that accepts everything
    queues it: latency grows for every request until callers time out, and
    the work done for them is wasted. This middleware admits requests
    through ``limit``, a `~stalwart.ConcurrencyLimit` (its limit follows the
    service's latency) or a `~stalwart.Bulkhead` (a fixed limit), and
    answers the others at once:

    * a request the limit refuses gets ``503 Service Unavailable`` with
      ``Retry-After`` (the refusal's own ``retry_after`` when it knows one,
      else ``retry_after`` seconds; whole seconds, rounded up) and an
      ``application/problem+json`` body naming the limit (``kind``
      ``"rate_limited"`` for a `~stalwart.ConcurrencyLimit`,
      ``"bulkhead_full"`` for a `~stalwart.Bulkhead`), as
      `ErrorMiddleware` answers the same errors;
    * a request whose deadline leaves less time than the service's
      **typical service time** (the median of recent requests' durations,
      once about `MIN_SAMPLES` were measured; it forgets with a half-life of
      30 s) gets ``504 Gateway Timeout`` without being started: it would
      time out anyway, and its caller learns so at once rather than after
      its deadline. The deadline is the ambient one (`stalwart.remaining`),
      so put `DeadlineMiddleware` outside this one. A `CallRejected` event
      with reason ``"deadline_too_short"`` is reported on the limit's
      telemetry (the limit's counters are its own refusals only).

    The typical service time is measured from the moment a request is
    admitted to the end of its response, for requests whose app returned.
    With a `~stalwart.ConcurrencyLimit`, each request is a sample of its
    algorithm: an app cut short by the request's deadline counts as a drop.

    Only ``http`` requests are limited; other scopes pass straight through.

    Args:
        app: the ASGI application to protect.
        limit: a `~stalwart.ConcurrencyLimit` or a `~stalwart.Bulkhead`,
            used by this middleware alone.
        retry_after: seconds a refused client is told to wait when the
            refusal does not say, > 0.
        refuse_doomed: refuse requests whose deadline is shorter than the
            typical service time (False: admit them all).

    Example::

        app = DeadlineMiddleware(LoadShedMiddleware(app, limit=sw.ConcurrencyLimit()))
    """

    __slots__ = ("_app", "_bound", "_limit", "_refuse_doomed", "_retry_after", "_service")

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: ConcurrencyLimit | Bulkhead,
        retry_after: float = 1.0,
        refuse_doomed: bool = True,
    ) -> None:
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, not {type(app).__name__}")
        if not isinstance(limit, (ConcurrencyLimit, Bulkhead)):
            raise TypeError(
                "limit must be a stalwart.ConcurrencyLimit or a stalwart.Bulkhead, "
                f"not {type(limit).__name__}"
            )
        seconds = _validate.duration("retry_after", retry_after, positive=True)
        if not isinstance(refuse_doomed, bool):
            raise TypeError(f"refuse_doomed must be a bool, not {type(refuse_doomed).__name__}")
        self._app = app
        self._limit = limit
        # To the millisecond first: 1.0000000001 is not a second more.
        self._retry_after = math.ceil(round(seconds, 3))
        self._refuse_doomed = refuse_doomed
        self._service = LatencyQuantile(0.5, low=_LOW, high=_HIGH, half_life=_HALF_LIFE)
        self._bound = limit.wrap(self._admitted, Binding(app))

    @property
    def app(self) -> ASGIApp:
        """The wrapped application."""
        return self._app

    @property
    def limit(self) -> ConcurrencyLimit | Bulkhead:
        """The policy that admits requests."""
        return self._limit

    @property
    def typical_service_time(self) -> float | None:
        """The median duration of recent admitted requests, in seconds (None: too few yet)."""
        service = self._service
        if service.estimate is None or service.weight(_clock.now()) < MIN_SAMPLES:
            return None
        return service.estimate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        if self._refuse_doomed:
            left = remaining()
            if left is not None:
                typical = self.typical_service_time
                if typical is not None and left < typical:
                    await self._doomed(send, left, typical)
                    return
        request = _Request()
        try:
            await self._bound(scope, receive, send, request)
        except (RateLimitExceeded, BulkheadFullError) as exc:
            if request.entered:
                raise  # the app's own, for ErrorMiddleware or the server
            await self._shed(send, exc)

    async def _admitted(
        self, scope: Scope, receive: Receive, send: Send, request: _Request
    ) -> None:
        request.entered = True
        start = _clock.now()
        await self._app(scope, receive, send)
        end = _clock.now()
        self._service.add(end, end - start)

    async def _shed(self, send: Send, error: RateLimitExceeded | BulkheadFullError) -> None:
        rule = error_rule(error)
        assert rule is not None
        retry_after = retry_after_header(error)
        await _send_problem(
            send,
            rule.status,
            rule.status.phrase,
            rule.detail.format(policy=error.policy),
            retry_after=self._retry_after if retry_after is None else retry_after,
            extensions={"policy": error.policy, "kind": rule.kind},
        )

    async def _doomed(self, send: Send, left: float, typical: float) -> None:
        limit = self._limit
        limit.report(CallRejected, reason="deadline_too_short", retry_after=None)
        rule = ERROR_RULES[DeadlineExceeded]
        await _send_problem(
            send,
            rule.status,
            rule.status.phrase,
            f"The request's deadline leaves {left * 1000.0:.0f} ms, less than the "
            f"{typical * 1000.0:.0f} ms a request typically takes: it was not started.",
            extensions={"policy": limit.name, "kind": rule.kind},
        )

    def __repr__(self) -> str:
        return f"LoadShedMiddleware({self._app!r}, limit={self._limit!r})"
