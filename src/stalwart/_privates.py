"""Every private attribute of asyncio, anyio and OpenTelemetry that stalwart reads.

stalwart's hot paths cost less than the public ways of asking a few
questions ("is an SDK installed?", "which task is running?", "is this task
inside a shielded anyio scope?"). The cheap answers are private attributes of
other libraries, and they are all read here, or fetched from here:

=========================================  ===================================
private read                                fallback when a release drops it
=========================================  ===================================
``opentelemetry.trace._TRACER_PROVIDER``    ``get_tracer_provider()`` per call
``asyncio.tasks._current_tasks``            ``asyncio.current_task()``
``asyncio.events._get_running_loop``        ``asyncio.get_running_loop()``
a loop's ``_thread_id``                     the official loop lookup per read
anyio's ``_task_states`` (asyncio backend)  deadlines do not see anyio shields
an anyio scope's ``_shield``, ``_parent``   (the same)
a loop's ``_scheduled`` (the tuner)         the loop's own timeout, added up
=========================================  ===================================

Two hot paths read an attribute named here inline once a probe has found it
on that object: a loop's ``_thread_id`` (`Hedge` and `RateLimiter` cache a
loop only if it has one) and anyio's table (`Hedge` tests it for emptiness
once `anyio_task_states` has fetched it).

The single rule: a probe that fails (after an upgrade renamed what it reads)
falls back to the public, slower way, and says so once, with a
`RuntimeWarning` naming the attribute, so that a test suite notices.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import asyncio.tasks
import sys
import warnings
from collections.abc import Callable
from typing import Any, Final, Protocol, cast
from weakref import WeakKeyDictionary

import opentelemetry.trace as _ot
from opentelemetry.trace import ProxyTracerProvider

__all__ = [
    "ANYIO_ASYNCIO",
    "LOOP_THREAD_ID",
    "ProviderSlot",
    "anyio_task_states",
    "current_task",
    "otel_probe",
    "probe_failed",
    "running_loop",
    "scheduled_timers",
    "scope_chain",
]

_warned: set[str] = set()


def probe_failed(what: str, fallback: str) -> None:
    """Say once that ``what`` could not be read, and what stalwart does instead."""
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(
        f"stalwart could not read {what} (a private attribute, renamed by an upgrade?): "
        f"it falls back to {fallback}",
        RuntimeWarning,
        stacklevel=3,
    )


# -- OpenTelemetry ------------------------------------------------------------------------


class ProviderSlot(Protocol):
    """Where a tracer provider is: ``_TRACER_PROVIDER`` not None when spans may be opened."""

    _TRACER_PROVIDER: Any


class _SlowProbe:
    """The fallback if the OpenTelemetry API ever renames its global slot."""

    @property
    def _TRACER_PROVIDER(self) -> Any:  # noqa: N802 - mirrors the API's name
        provider = _ot.get_tracer_provider()
        return None if isinstance(provider, ProxyTracerProvider) else provider


def _otel_probe() -> ProviderSlot:
    # ``opentelemetry.trace._TRACER_PROVIDER`` is None until an application
    # calls ``set_tracer_provider`` (which the API allows once): reading it is
    # the cheapest "is an SDK configured?" there is. Wrappers read the
    # attribute of this slot inline: it is their tracing gate.
    if hasattr(_ot, "_TRACER_PROVIDER"):
        return cast(ProviderSlot, _ot)
    probe_failed("opentelemetry.trace._TRACER_PROVIDER", "get_tracer_provider() per call")
    return cast(ProviderSlot, _SlowProbe())


otel_probe: Final = _otel_probe()


# -- asyncio ------------------------------------------------------------------------------


def _current_task_reader() -> Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]:
    if sys.version_info >= (3, 12):  # pragma: no cover - C implementation there
        return asyncio.current_task
    # 3.11: asyncio.current_task() is Python and looks the loop up again;
    # the C-level table it reads is the same.
    table = getattr(asyncio.tasks, "_current_tasks", None)  # pragma: no cover - interpreter
    if table is None:  # pragma: no cover - interpreter
        probe_failed("asyncio.tasks._current_tasks", "asyncio.current_task()")
        return asyncio.current_task
    return cast(Callable[[asyncio.AbstractEventLoop], "asyncio.Task[Any] | None"], table.get)


current_task: Final = _current_task_reader()


def _running_loop_reader() -> Callable[[], asyncio.AbstractEventLoop | None]:
    reader = getattr(asyncio.events, "_get_running_loop", None)
    if reader is None:  # pragma: no cover - interpreter
        probe_failed("asyncio.events._get_running_loop", "asyncio.get_running_loop()")

        def running() -> asyncio.AbstractEventLoop | None:
            try:
                return asyncio.get_running_loop()
            except RuntimeError:
                return None

        return running
    return cast(Callable[[], "asyncio.AbstractEventLoop | None"], reader)


running_loop: Final = _running_loop_reader()

#: The attribute in which an asyncio loop keeps the thread running it (None when
#: stopped). `stalwart._clock` compares it with the current thread's, and takes
#: the official lookup when it is missing (see `loop_thread_missing`).
LOOP_THREAD_ID: Final = "_thread_id"


def loop_thread_missing(loop: object) -> None:
    """A running loop without ``_thread_id``: `_clock` takes the slow lookup for it."""
    probe_failed(
        f"{type(loop).__qualname__}._thread_id",
        "the official running-loop lookup on every clock read",
    )


def scheduled_timers(loop: object) -> list[Any] | None:
    """The timer heap of an asyncio loop (``_scheduled``), or None."""
    scheduled = getattr(loop, "_scheduled", None)
    if scheduled is None:
        probe_failed(
            f"{type(loop).__qualname__}._scheduled",
            "adding the loop's computed timeouts (rounding errors add up)",
        )
    return scheduled


# -- anyio --------------------------------------------------------------------------------

#: anyio's asyncio backend, by module name: until it is imported, no task has an
#: anyio scope (Hedge tests ``in sys.modules`` with it before asking for the table).
ANYIO_ASYNCIO: Final = "anyio._backends._asyncio"

_anyio_states: dict[Any, Any] | None = None  # ref(task) -> anyio's TaskState


def anyio_task_states() -> dict[Any, Any] | None:
    """anyio's asyncio backend's table of task states (weakref -> state), or None.

    None until that backend is loaded (no anyio scope exists then), and when
    the table cannot be found: then stalwart's asyncio deadlines behave as
    ``asyncio.timeout`` does, and do not see anyio's shields.
    """
    global _anyio_states
    if _anyio_states is None:
        module = sys.modules.get(ANYIO_ASYNCIO)
        if module is None:
            return None
        states = getattr(module, "_task_states", None)
        data = getattr(states, "data", None) if isinstance(states, WeakKeyDictionary) else None
        if not isinstance(data, dict):
            probe_failed(
                f"{ANYIO_ASYNCIO}._task_states",
                "deadlines that do not see anyio's shielded scopes",
            )
            return None
        # The dict inside the WeakKeyDictionary: get() without its Python layer.
        _anyio_states = data
    return _anyio_states


def scope_chain(scope: Any, until: Any) -> bool:
    """Is any anyio cancel scope from ``scope`` out to ``until`` (excluded) shielded?"""
    while scope is not None and scope is not until:
        if getattr(scope, "_shield", False):
            return True
        scope = getattr(scope, "_parent_scope", None)
    return False
