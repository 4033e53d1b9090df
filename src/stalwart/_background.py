"""Tasks a policy starts on its own, outside any call: the fleet-wide limits' reconcilers.

A fleet-wide `RetryBudget` or `Bulkhead` talks to its store from a task of
its own, so that no call waits for a round trip it does not need. Such a
task is started on first need from inside a call (`spawn`), lives while
there is something to do, and ends by itself; one that is still running
when the event loop ends is cancelled with it (asyncio cancels the tasks
left over when ``asyncio.run`` returns; trio cancels system tasks when the
main task ends).
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from . import _clock

__all__ = ["spawn"]


def spawn(run: Callable[[], Awaitable[None]], name: str) -> Any:
    """Start ``run()`` as a task of the running loop, not tied to the calling task.

    Returns a handle to keep (asyncio keeps only weak references to its
    tasks). ``run`` must catch its own errors: on trio an error escaping a
    system task ends the run.
    """
    info = _clock.asyncio_loop()
    if info is not None:
        # In a context of its own: the task must not inherit the calling
        # task's ambient deadline.
        return info.loop.create_task(
            run(),  # type: ignore[arg-type]
            name=name,
            context=contextvars.Context(),
        )
    trio = sys.modules.get("trio")
    if trio is None:  # pragma: no cover - a loop that is neither asyncio nor trio
        raise RuntimeError("a fleet-wide limit needs a running asyncio or trio event loop")
    trio.lowlevel.spawn_system_task(run, name=name, context=contextvars.Context())
    return run
