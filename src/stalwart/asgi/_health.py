"""Circuit breakers' states for readiness probes: `BreakerHealth`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sized
from typing import Any, Final, final

from .._circuit_breaker import CircuitBreaker
from .._circuit_store import CircuitState
from .._per_key import PerKey
from .._pipeline import Pipeline
from .._policy import Policy
from ._types import Receive, Scope, Send

__all__ = ["BreakerHealth"]

#: What a source may be: a policy (a breaker, or a `PerKey` or `Pipeline` holding
#: breakers), a mapping of keys to policies, an iterable of policies, or a
#: callable returning one of those, called for each report; None stands for no breaker
#: (``transport.per_host`` of a transport without per-host policies).
Source = Policy | Mapping[str, Policy] | Iterable[Policy] | Callable[[], Any] | None

_JSON: Final = b"application/json"
_METHODS: Final = ("GET", "HEAD")


@final
class BreakerHealth:
    """An ASGI app that reports circuit breakers' states as JSON, for readiness probes.

    Route the probe's path to it, in any ASGI framework (Starlette's and
    FastAPI's ``add_route``, or ``Route(path, BreakerHealth(...))``; mounted
    with ``app.mount(path, ...)``, it answers at ``path + "/"``)::

        transport = ResilientTransport(per_host=lambda origin: sw.CircuitBreaker(name=origin))
        app.add_route("/health/breakers", BreakerHealth(transport.per_host))

    ``sources`` are read afresh on every request: a `~stalwart.PerKey` (its
    policies, by key), a `~stalwart.CircuitBreaker`, a `~stalwart.Pipeline`
    (the breakers in it), a mapping of keys to policies, a list of them, or
    a callable returning any of those. Breakers are found inside pipelines
    and nested ``PerKey`` policies; other policies are not reported. A
    breaker found twice is reported once.

    **The rule.** The answer is ``503 Service Unavailable`` when a
    *required* breaker is OPEN, else ``200 OK``. HALF_OPEN counts as up: the
    breaker is letting trial calls through, and a probe that failed the pod
    for it would keep the recovery from being seen. With ``required=None``
    (the default) every breaker reported is required: any open breaker
    fails the probe. ``required`` may instead name the breakers that matter,
    by name or by key (a ``PerKey`` key such as an origin); the others are
    still reported but never fail the probe. ``required=()`` never fails it
    (a page for humans and dashboards). A required name that no breaker has
    (a host never called, or dropped by its ``PerKey``) is not open. A
    breaker in ``mode="observe"`` (a shadow breaker, which rejects nothing)
    is reported, and counts for ``"degraded"``, but is never required.

    The body::

        {"status": "ok" | "degraded" | "unavailable",
         "breakers": [{"name": "upstream https://api.test:443",
                       "key": "https://api.test:443", "state": "open",
                       "retry_after": 12.5, "required": true}, ...]}

    ``status`` is ``"unavailable"`` with a 503, ``"degraded"`` when some
    breaker is open but none required, ``"ok"`` otherwise. ``key`` is the
    ``PerKey`` key (null for a breaker given directly); ``retry_after`` the
    seconds until an open breaker lets a trial through, to the millisecond
    (null when not open, or when forced open). ``GET`` and ``HEAD`` are
    answered, other methods get 405; the answer is never cached
    (``Cache-Control: no-store``).

    Args:
        *sources: where the breakers are (see above).
        required: the names or keys of the breakers whose opening fails the
            probe, or None for every breaker.
    """

    __slots__ = ("_required", "_sources")

    def __init__(self, *sources: Source, required: Collection[str] | None = None) -> None:
        for i, source in enumerate(sources):
            given: object = source
            if not (
                given is None
                or isinstance(given, (Policy, Mapping))
                or callable(given)
                or (isinstance(given, Iterable) and not isinstance(given, (str, bytes)))
            ):
                raise TypeError(
                    f"sources[{i}] must be a policy, a mapping or list of policies, or a "
                    f"callable returning one, not {type(source).__name__}"
                )
        if required is not None and (
            isinstance(required, (str, bytes))
            or not isinstance(required, Collection)
            or not all(isinstance(name, str) for name in required)
        ):
            raise TypeError(
                "required must be a collection of breaker names or keys (str), or None, "
                f"not {type(required).__name__}"
            )
        self._sources = sources
        self._required = None if required is None else frozenset(required)

    def report(self) -> tuple[int, dict[str, Any]]:
        """The HTTP status and the JSON body, as of now (call it from async code)."""
        breakers: list[dict[str, Any]] = []
        any_open = failing = False
        seen: set[int] = set()
        for key, breaker in _breakers(self._sources):
            if id(breaker) in seen:
                continue
            seen.add(id(breaker))
            statistics = breaker.statistics()
            state = statistics.state
            # A shadow breaker (mode="observe") rejects nothing: never required.
            required = breaker.mode == "enforce" and (
                self._required is None
                or breaker.name in self._required
                or (key is not None and key in self._required)
            )
            until = statistics.time_until_half_open
            is_open = state is CircuitState.OPEN
            any_open = any_open or is_open
            failing = failing or (is_open and required)
            breakers.append(
                {
                    "name": breaker.name,
                    "key": key,
                    "state": state.value,
                    "retry_after": (
                        round(until, 3) if until is not None and math.isfinite(until) else None
                    ),
                    "required": required,
                }
            )
        status = "unavailable" if failing else "degraded" if any_open else "ok"
        return (503 if failing else 200), {"status": status, "breakers": breakers}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":  # served alone, as the whole app
            await _lifespan(receive, send)
            return
        if kind != "http":
            await send({"type": "websocket.close", "code": 1000})
            return
        if scope["method"] not in _METHODS:
            body = b'{"detail": "method not allowed"}'
            await _respond(send, 405, body, [(b"allow", b"GET, HEAD")])
            return
        status, report = self.report()
        body = json.dumps(report, separators=(",", ":")).encode()
        await _respond(send, status, b"" if scope["method"] == "HEAD" else body, [], len(body))

    def __repr__(self) -> str:
        required = None if self._required is None else sorted(self._required)
        shown = [_source_text(source) for source in self._sources]
        return f"BreakerHealth({', '.join([*shown, f'required={required!r}'])})"


def _source_text(source: Any) -> str:
    """A source as the repr shows it: never iterated nor called (it is read on each request)."""
    if source is None or isinstance(source, Policy):
        return repr(source)
    if callable(source):
        return getattr(source, "__qualname__", None) or repr(source)
    kind = type(source).__name__
    if not isinstance(source, Sized):
        return f"<{kind}>"
    count = len(source)
    return f"<{kind} of {count} {'policy' if count == 1 else 'policies'}>"


def _breakers(sources: Iterable[Any], key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """Every circuit breaker in ``sources``, with the `PerKey` key it is kept under."""
    for source in sources:
        if source is None:
            continue
        if isinstance(source, CircuitBreaker):
            yield key, source
        elif isinstance(source, PerKey):
            for inner_key, policy in source.items():
                yield from _breakers((policy,), inner_key)
        elif isinstance(source, Pipeline):
            yield from _breakers(source.policies, key)
        elif isinstance(source, Policy):
            continue
        elif isinstance(source, Mapping):
            for inner_key, policy in list(source.items()):
                yield from _breakers((policy,), str(inner_key))
        elif callable(source):
            yield from _breakers((source(),), key)
        elif isinstance(source, Iterable) and not isinstance(source, (str, bytes)):
            yield from _breakers(list(source), key)


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    length: int | None = None,
) -> None:
    fields = [
        (b"content-type", _JSON),
        (b"content-length", str(len(body) if length is None else length).encode()),
        (b"cache-control", b"no-store"),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
