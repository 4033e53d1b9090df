"""Fault injection: a scenario's ``[downstream]`` played on a real service.

`FaultInjection` reads the same scenario file as ``python -m stalwart tune``
and makes a real service (as ASGI middleware) or any async function (as a
policy) behave like the simulated dependency: its latency distribution, error
rate, hangs, capacity and queue, and the phases of its timeline. It only acts
on what is switched on explicitly, request by request: a header, or a context
variable (`FaultInjection.enabled`).

The downstream model is the simulation's, decision for decision (see
`stalwart._tune.engine`): a request beyond the ``quota`` (when there is one)
is refused after ``error_latency`` (429), taking no slot; else it fails with
the phase's error rate (an error after ``error_latency``, or, in a phase that
hangs, no answer at all), taking no slot; otherwise its service time is drawn
from the phase's log-normal latency, and it takes one of ``capacity`` slots,
or waits in a FIFO queue of at most ``queue``, or is turned away. A slot stays
busy for the request's service time whether or not its caller is still there;
a queued request whose caller gave up is still served, unless
``serves_abandoned = false``. The slots are bookkeeping (the time each
becomes free), not tasks: nothing runs in the background, and nothing
outlives a request.
"""

from __future__ import annotations

import math
import os
import random
from collections import deque
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from heapq import heapreplace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar, final

import anyio

from . import _clock, _validate
from ._gcra import Gcra
from ._http import header_name
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry

if TYPE_CHECKING:
    from ._tune.scenario import Scenario
    from .asgi import ASGIApp, Message, Receive, Scope, Send

__all__ = ["FAULTS_HEADER", "FaultInjection", "FaultStatistics", "InjectedFault"]

P = ParamSpec("P")
T = TypeVar("T")

FAULTS_HEADER: Final = "x-stalwart-faults"
"""The request header that switches fault injection on for one request."""

# A switch header's value: "on", or the position on the timeline in seconds.
_MAX_SWITCH: Final = 32
_MAX_POSITION: Final = 1e9


class InjectedFault(Exception):
    """A failure `FaultInjection` made up: an error, or a rejection by a full queue or the quota.

    Attributes:
        reason: ``"error"`` (the profile's error rate), ``"overloaded"``
            (every slot taken and the queue full) or ``"quota"`` (beyond the
            profile's ``quota``).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (str(self), self.reason))


def _rebuild(message: str, reason: str) -> InjectedFault:
    return InjectedFault(message, reason=reason)


@final
@dataclass(frozen=True, slots=True)
class FaultStatistics:
    """What a `FaultInjection` has done since it was made (requests it acted on).

    ``served``: requests that got their slot and service time (whether or
    not their caller was still waiting); ``errors``, ``hangs``: failures by
    the profile's error rate; ``rejected``: turned away by a full queue;
    ``busy`` and ``queued``: slots taken and requests waiting, now;
    ``over_quota``: refused by the profile's ``quota``.
    """

    requests: int
    served: int
    errors: int
    hangs: int
    rejected: int
    busy: int
    queued: int
    over_quota: int = 0


class _Waiter:
    """A queued request: woken once, when it reaches the head of the queue."""

    __slots__ = ("arrival", "event", "fate", "service")

    def __init__(self, service: float, arrival: float) -> None:
        self.service = service
        self.arrival = arrival
        self.event = anyio.Event()
        #: "waiting"; "served" (abandoned, served all the same); "dropped"
        self.fate = "waiting"


class _Overloaded(Exception):
    pass


class _Server:
    """The downstream's ``capacity`` slots and FIFO queue (an M/G/c queue).

    ``_free`` holds the time at which each slot is next free. A request that
    finds a slot free takes it at once; otherwise it queues, and the head of
    the queue sleeps until the earliest free time. Service times are drawn on
    arrival and a slot stays busy for its request's service time whatever
    happens to the caller, so free times only ever move forward and the head
    of the queue knows exactly when its turn comes.
    """

    __slots__ = ("_free", "_queue_limit", "_scheduled", "_serves_abandoned", "_waiters", "served")

    def __init__(self, capacity: int, queue: int | None, serves_abandoned: bool) -> None:
        self._free = [-math.inf] * capacity
        self._queue_limit = math.inf if queue is None else queue
        self._serves_abandoned = serves_abandoned
        self._waiters: deque[_Waiter] = deque()
        # Start times, still to come, of abandoned requests served all the same.
        self._scheduled: deque[float] = deque()
        self.served = 0

    def busy(self, now: float) -> int:
        return sum(1 for t in self._free if t > now)

    def queued(self, now: float) -> int:
        return len(self._waiters) + self._pending(now)

    def _pending(self, now: float) -> int:
        scheduled = self._scheduled
        while scheduled and scheduled[0] <= now:
            scheduled.popleft()
        return len(scheduled)

    async def serve(self, service: float) -> None:
        """Take a slot for ``service`` seconds (queueing first if needed); return when done.

        Raises `_Overloaded` at once when every slot is taken and the queue is full.
        """
        free, waiters = self._free, self._waiters
        now = _clock.now()
        if not waiters and free[0] <= now:
            heapreplace(free, now + service)
            self.served += 1
            await anyio.sleep(service)
            return
        if self.queued(now) >= self._queue_limit:
            raise _Overloaded
        waiter = _Waiter(service, now)
        waiters.append(waiter)
        try:
            if waiters[0] is not waiter:
                await waiter.event.wait()
            await anyio.sleep_until(free[0])
        except BaseException:
            self._abandon(waiter)
            raise
        # Its service began when the slot came free (or it arrived), not when this
        # task woke: an event loop that wakes it late must not stretch the slot's
        # busy time, or a busy server loses capacity the simulated one keeps.
        start = max(free[0], waiter.arrival)
        heapreplace(free, start + service)
        self.served += 1
        waiters.popleft()
        self._advance(start)
        await anyio.sleep(start + service - _clock.now())

    def _abandon(self, waiter: _Waiter) -> None:
        waiter.fate = "served" if self._serves_abandoned else "dropped"
        if self._waiters[0] is waiter:
            self._advance(_clock.now())

    def _advance(self, now: float) -> None:
        """Settle the abandoned requests at the head of the queue; wake the first live one."""
        free, waiters = self._free, self._waiters
        while waiters and waiters[0].fate != "waiting":
            abandoned = waiters.popleft()
            if abandoned.fate == "served":
                start = max(free[0], abandoned.arrival)
                heapreplace(free, start + abandoned.service)
                self.served += 1
                if start > now:
                    self._scheduled.append(start)
        if waiters:
            waiters[0].event.set()


@final
class FaultInjection(Policy):
    """Play a scenario's ``[downstream]`` profile on a real service, or around any call.

    Chaos testing from the file the tuner reads: the same latency
    distribution, error rate, hangs, capacity, queue and timeline that
    ``python -m stalwart tune`` simulates, now on a real server. It is
    **off by default**: it only acts on a request that switches it on, by the
    ``header`` (``x-stalwart-faults``) or by `enabled`; everything else passes
    straight through, untouched.

    As ASGI middleware, in front of a service (install it only where tests
    run: any client can send the header)::

        faults = FaultInjection("payments.toml")
        app = faults.middleware(app)

    and a request carrying ``x-stalwart-faults: on`` meets the profile. As a
    policy, around any async function::

        @faults
        async def charge(order_id: str) -> None: ...

        with faults.enabled():
            await charge("o-1")  # may be slow, fail, or hang, as the profile says

    **What a switched-on request meets** (decided as the simulation decides):
    beyond the profile's ``quota`` (requests a second, when it has one; on
    the real clock), it is refused after ``error_latency``: the middleware
    answers 429 and the policy raises `InjectedFault` (reason ``"quota"``).
    Otherwise, with the error rate of the current phase it fails, taking no slot: after
    ``error_latency`` the middleware answers ``error_status`` and the policy
    raises `InjectedFault`, or, in a phase whose ``failure = "hangs"``,
    there is no answer at all (the middleware waits for the client to
    disconnect; the policy waits until cancelled). Otherwise its service
    time is drawn from the phase's log-normal latency; it takes one of
    ``capacity`` slots for that long (queueing for one first, FIFO, or being
    turned away like an error when ``queue`` requests already wait), and then
    the service itself runs (the middleware calls the app, the policy the
    function): its own time adds to the injected latency.

    The middleware's injected answers carry the ``header`` too, saying
    which fault they are: ``error``, ``overloaded`` (the queue full) or
    ``quota`` (``python -m stalwart tune --live`` tells overloads from
    errors by it, as the simulation does, whatever ``error_status`` is).

    **The timeline.** A switched-on request is placed on the scenario's
    timeline: by default at the time since the injection first acted (or
    since `restart`), times ``speed``; a header value or an ``at`` that is a
    number of seconds places it there instead (``python -m stalwart tune
    --live`` sends its own position this way, so the server needs no clock of
    its own). Time is the event loop's clock, so the policy runs in virtual
    time in tests.

    Every random draw comes from one ``random.Random`` seeded with ``seed``
    (default: the scenario's), so a run in virtual time is reproducible.

    Args:
        scenario: a scenario file (a path), or a scenario already parsed from
            TOML (a mapping); only its ``[downstream]`` and ``seed`` are used.
        speed: how many seconds of the timeline pass per second of the clock
            (> 0); ``10`` plays a 10-minute incident in one minute.
        seed: the seed of the random draws (default: the scenario's).
        header: the request header that switches it on (``on``, or the
            position on the timeline in seconds); anything else in it, or no
            header, leaves the request alone.
        error_status: the status of an injected error or rejection by a
            full queue (the middleware's), 500-599 or 429; the quota's
            refusals are 429.
        name: the policy's name.
        telemetry: where the policy reports: its calls in
            ``stalwart_calls_total`` (kind ``fault_injection``; an injected
            fault counts as an ``error``, a hang given up on as
            ``cancelled``), and its span. The middleware reports nothing:
            `statistics` says what it did.

    Raises:
        ValueError: a scenario that is not valid (every problem listed), or a
            bad option.
    """

    kind = "fault_injection"
    __slots__ = (
        "_clock",
        "_error_latency",
        "_error_status",
        "_errors",
        "_hangs",
        "_header",
        "_origin",
        "_over_quota",
        "_profile",
        "_quota",
        "_rejected",
        "_requests",
        "_rng",
        "_server",
        "_speed",
        "_switch",
    )

    def __init__(
        self,
        scenario: str | os.PathLike[str] | Mapping[str, Any],
        *,
        speed: float = 1.0,
        seed: int | None = None,
        header: str = FAULTS_HEADER,
        error_status: int = 503,
        name: str = "fault_injection",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        parsed = _read(scenario)
        self._speed = _validate.number("speed", speed)
        if self._speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        if seed is not None:
            seed = _validate.count("seed", seed, minimum=0)
        self._header = header_name("header", header).lower().encode("latin-1")
        if not isinstance(error_status, int) or isinstance(error_status, bool):
            raise TypeError(f"error_status must be an int, not {type(error_status).__name__}")
        if not (500 <= error_status <= 599 or error_status == 429):
            raise ValueError(f"error_status must be 500-599 or 429, got {error_status!r}")
        self._error_status = error_status
        downstream = parsed.downstream
        self._profile = downstream
        self._error_latency = downstream.error_latency
        self._server = (
            None
            if downstream.capacity is None
            else _Server(downstream.capacity, downstream.queue, downstream.serves_abandoned)
        )
        self._rng = random.Random(f"stalwart-faults:{parsed.seed if seed is None else seed}")
        self._origin: float | None = None
        self._switch: ContextVar[float | bool] = ContextVar(f"stalwart_faults_{id(self)}")
        self._requests = self._errors = self._hangs = self._rejected = self._over_quota = 0
        quota = downstream.quota
        # On the real clock (the timeline's position may step back between requests).
        self._quota = None if quota is None else Gcra(quota.rate, burst=quota.burst)
        self._clock: Callable[[], float] = _clock.now

    # -- switching on ------------------------------------------------------------------

    @contextmanager
    def enabled(self, *, at: float | None = None) -> Iterator[None]:
        """Switch the injection on for the calls made inside the block (and tasks started there).

        ``at``: place every call at this many seconds into the timeline
        (default: the time since the injection first acted, times ``speed``).
        """
        value: float | bool = True if at is None else self._position("at", at)
        token = self._switch.set(value)
        try:
            yield
        finally:
            self._switch.reset(token)

    def restart(self) -> None:
        """Start the timeline again: the next request that is switched on is at 0."""
        self._origin = None

    @property
    def speed(self) -> float:
        return self._speed

    @property
    def header(self) -> str:
        """The header that switches it on (lower case)."""
        return self._header.decode("latin-1")

    def statistics(self) -> FaultStatistics:
        """A snapshot of what it has done and of its slots and queue now.

        Safe to call from another thread than the server's when that one runs asyncio.
        """
        server = self._server
        busy = queued = served = 0
        if server is not None:
            try:
                now = self._clock()
            except RuntimeError:  # no event loop running: nothing is either
                now = math.inf
            busy, queued, served = server.busy(now), server.queued(now), server.served
        else:
            served = self._requests - self._errors - self._hangs - self._over_quota
        return FaultStatistics(
            self._requests,
            served,
            self._errors,
            self._hangs,
            self._rejected,
            busy,
            queued,
            self._over_quota,
        )

    @staticmethod
    def _position(param: str, value: Any) -> float:
        seconds = _validate.duration(param, value)
        if seconds > _MAX_POSITION:
            raise ValueError(f"{param} must be <= {_MAX_POSITION:g} seconds, got {value!r}")
        return seconds

    def _from_header(self, scope: Scope) -> float | bool | None:
        """The switch a request's header holds: True ("on"), a position, or None (off)."""
        for key, value in scope.get("headers", ()):
            if key.lower() != self._header:
                continue
            if len(value) > _MAX_SWITCH:
                return None
            text = value.strip().lower()
            if text == b"on":
                return True
            try:
                seconds = float(text)
            except ValueError:
                return None
            return seconds if 0.0 <= seconds <= _MAX_POSITION else None
        return None

    # -- what a request meets ----------------------------------------------------------

    def _decide(self, switch: float | bool) -> tuple[str, float]:
        """("quota" | "hang" | "error" | "serve", seconds) for a request switched on with
        ``switch``."""
        info = _clock.asyncio_loop()
        # The clock of the loop it acts on, for `statistics` called from another
        # thread (a test's, beside the server's): asyncio's can be read from anywhere.
        self._clock = _clock.now if info is None else info.time
        if switch is True:
            now = _clock.now()
            if self._origin is None:
                self._origin = now
            at = (now - self._origin) * self._speed
        else:
            at = float(switch)
        error_rate, mu, sigma, hangs = self._profile.at(at)
        self._requests += 1
        quota = self._quota
        if quota is not None and quota.reserve(_clock.now()) is None:
            self._over_quota += 1
            return "quota", self._error_latency
        rng = self._rng
        if rng.random() < error_rate:
            if hangs:
                self._hangs += 1
                return "hang", math.inf
            self._errors += 1
            return "error", self._error_latency
        return "serve", math.exp(mu + sigma * rng.gauss(0.0, 1.0)) if sigma else math.exp(mu)

    async def _occupy(self, service: float) -> bool:
        """Hold a slot for ``service`` seconds; False if the queue turned the request away."""
        server = self._server
        if server is None:
            await anyio.sleep(service)
            return True
        try:
            await server.serve(service)
        except _Overloaded:
            self._rejected += 1
            return False
        return True

    # -- as a policy -------------------------------------------------------------------

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        positional: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        switch, meet, metrics = self._switch, self._meet, self._metrics
        slot, span, timer = self._telemetry.provider_slot, self.in_span, self.timer()

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def injected(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await span(plain, args, kwargs)
                start = None if timer is None else timer()
                try:
                    on = switch.get(None)
                    if on is not None:
                        await meet(on)
                    result = await (fn(*args, **kwargs) if kwargs else positional(*args))
                except BaseException as exc:
                    # An injected fault stands for the dependency's own error:
                    # counted as one, as the function's errors are.
                    metrics.failed(exc, start)
                    raise
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return injected

        return self.build(make, binding)

    async def _meet(self, switch: float | bool) -> None:
        """What a switched-on call meets before its function runs; raises its fault."""
        action, seconds = self._decide(switch)
        if action == "hang":
            await anyio.sleep_forever()
        if action == "error":
            await anyio.sleep(seconds)
            raise InjectedFault(f"{self._name}: injected error", reason="error")
        if action == "quota":
            await anyio.sleep(seconds)
            raise InjectedFault(f"{self._name}: beyond the quota", reason="quota")
        if not await self._occupy(seconds):
            await anyio.sleep(self._error_latency)
            raise InjectedFault(
                f"{self._name}: every slot taken and the queue full", reason="overloaded"
            )

    # -- as ASGI middleware ------------------------------------------------------------

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """``app`` behind this injection: an ASGI 3 application.

        HTTP requests switched on (by the header, or by `enabled` around the
        call) meet the profile before ``app`` sees them; every other request,
        and every lifespan or websocket scope, goes straight to ``app``.
        """
        if not callable(app):
            raise TypeError(f"app must be an ASGI application, not {type(app).__name__}")
        return _Middleware(self, app)

    async def _asgi(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        switch = self._switch.get(None) if scope["type"] == "http" else None
        if switch is None and scope["type"] == "http":
            switch = self._from_header(scope)
        if switch is None:
            await app(scope, receive, send)
            return
        action, seconds = self._decide(switch)
        if action == "hang":
            await _until_disconnected(receive)
            return
        if action == "error":
            await anyio.sleep(seconds)
            await self._answer(send, b"injected error", "error")
            return
        if action == "quota":
            await anyio.sleep(seconds)
            await self._answer(send, b"injected quota: too many requests", "quota", status=429)
            return
        server = self._server
        served: bool | None
        if server is None or server._serves_abandoned:
            served = await self._occupy(seconds)
        else:
            # A queued request whose caller hangs up leaves the queue: watch for it.
            receive, served = await self._occupy_while_connected(receive, seconds)
        if served is None:
            return
        if not served:
            await anyio.sleep(self._error_latency)
            await self._answer(
                send, b"injected overload: every slot taken and the queue full", "overloaded"
            )
            return
        await app(scope, receive, send)

    async def _occupy_while_connected(
        self, receive: Receive, service: float
    ) -> tuple[Receive, bool | None]:
        """`_occupy`, given up when the client disconnects (None); a ``receive`` for the app."""
        buffered: list[Message] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive, None
            buffered.append(message)
            if not message.get("more_body", False):
                break
        outcome: list[bool] = []
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch)
            outcome.append(await self._occupy(service))
            group.cancel_scope.cancel()
        if not outcome:
            return receive, None

        async def replay() -> Message:
            if buffered:
                return buffered.pop(0)
            return await receive()

        return replay, outcome[0]

    async def _answer(
        self, send: Send, body: bytes, reason: str, status: int | None = None
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": self._error_status if status is None else status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                    (self._header, reason.encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def __repr__(self) -> str:
        return f"<FaultInjection {self._name!r} speed={self._speed:g}>"


def _read(scenario: object) -> Scenario:
    """The scenario a `FaultInjection` plays; only its downstream and seed matter.

    A scenario without ``[traffic]`` is accepted: it may describe a
    dependency and nothing else.
    """
    from ._tune.scenario import from_dict
    from ._tune.schema import ScenarioError, loads_toml

    if isinstance(scenario, Mapping):
        data, source = dict(scenario), "the scenario"
    elif isinstance(scenario, (str, os.PathLike)):
        path = Path(scenario)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"scenario: cannot read {path}: {exc}") from None
    else:
        raise TypeError(
            "scenario must be a path to a scenario file or a mapping parsed from TOML, "
            f"not {type(scenario).__name__}"
        )
    try:
        if not isinstance(scenario, Mapping):
            data = loads_toml(text, source)
        if "traffic" not in data:
            data["traffic"] = {"rate": 1.0, "duration": 1.0}  # never read here
        return from_dict(data, name="scenario", source=source)
    except ScenarioError as exc:
        raise ValueError(f"scenario: {exc.render()}") from None


class _Middleware:
    """`FaultInjection.middleware`'s application."""

    __slots__ = ("app", "faults")

    def __init__(self, faults: FaultInjection, app: ASGIApp) -> None:
        self.faults = faults
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.faults._asgi(self.app, scope, receive, send)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
