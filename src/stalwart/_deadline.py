"""The ambient deadline: one per request, inherited, and the scopes that enforce it.

One deadline travels with each request: `deadline` sets it for a block (and
every task started inside it inherits it), `remaining` reads it, and every
policy respects it: `Timeout` (see `_timeout`) never waits longer than it,
`Retry` never sleeps past it, the HTTP integrations send it downstream.

How a deadline cancels work depends on the backend:

* asyncio: one heap of expiry entries per event loop, drained by a single
  loop timer, cancels the task with ``Task.cancel()`` and counts it back with
  ``Task.uncancel()``, exactly as ``asyncio.timeout`` does but without
  allocating a timer handle per call (that is most of its cost). A deadline
  already due on entry cancels from a ``call_soon`` callback, as
  ``asyncio.timeout(0)`` does: a block that ends without suspending is not
  cancelled, and leaves no cancellation behind in its task;
* trio: a trio ``CancelScope`` with a deadline.

A scope (`_Scope`) can also count the outcome of the block it guards as a
call's (it is a `Counted`): that is all a `Timeout` is, plus its span.
"""

from __future__ import annotations

import sys
from asyncio import CancelledError
from collections.abc import Callable
from contextvars import Context, ContextVar, Token
from heapq import heapify, heappop, heappush
from types import TracebackType
from typing import Any, Final, Protocol, final
from weakref import WeakKeyDictionary, ref

import anyio

from . import _clock, _validate
from ._errors import DeadlineExceeded
from ._metrics import Counted, PolicyMetrics
from ._privates import anyio_task_states, current_task, probe_failed, scope_chain

__all__ = [
    "ScopeOwner",
    "counting_expiry",
    "current_deadline",
    "deadline",
    "deadline_expired",
    "is_cancellation",
    "remaining",
]

_current: ContextVar[_Scope | None] = ContextVar("stalwart_deadline", default=None)


def remaining() -> float | None:
    """Seconds left of the ambient deadline (>= 0.0), or None if there is none.

    Example::

        with sw.deadline(2.0):
            left = sw.remaining()  # 2.0, less as time passes, never negative
    """
    scope = _current.get()
    if scope is None:
        return None
    left = scope.when - _clock.now()
    return left if left > 0.0 else 0.0


def current_deadline() -> float | None:
    """The ambient deadline as an absolute time on the loop's clock, or None."""
    scope = _current.get()
    return None if scope is None else scope.when


def deadline_expired() -> bool:
    """Has the ambient deadline passed and cancelled the work under it?

    What a policy asks when a call it guards is cancelled: true when the
    cancellation is (or may be) that of an expired deadline around it, so
    that the call timed out rather than its caller lost interest.
    """
    scope = _current.get()
    while scope is not None:
        if scope.expired():
            return True
        scope = scope._outer
    return False


# What a call that an expired deadline cancelled stands for, to a matcher.
_EXPIRED: Final = DeadlineExceeded("the deadline expired", policy="deadline", timeout=0.0)


def counting_expiry(
    matches: Callable[[BaseException], bool],
) -> Callable[[BaseException], bool]:
    """``matches``, also true of a call cancelled because the deadline around it expired.

    A policy below a `Timeout` (or inside a `deadline`) sees that deadline's
    expiry as a cancellation, not as the `DeadlineExceeded` raised above it:
    this says whether ``matches`` would count the call (it is asked once,
    with a `DeadlineExceeded`). Other exceptions that are not `Exception`
    s (other cancellations) never match.
    """
    expiry_matches = matches(_EXPIRED)

    def counting(exc: BaseException) -> bool:
        if isinstance(exc, Exception):
            return matches(exc)
        return expiry_matches and is_cancellation(type(exc)) and deadline_expired()

    return counting


def is_cancellation(exc_type: type[BaseException]) -> bool:
    """Is this the running backend's cancellation exception?"""
    if issubclass(exc_type, CancelledError):
        return True
    trio = sys.modules.get("trio")
    return trio is not None and issubclass(exc_type, trio.Cancelled)


def _task_token() -> object:
    info = _clock.asyncio_loop()
    if info is not None:
        return info.current_task()
    trio = sys.modules.get("trio")
    if trio is not None:
        return trio.lowlevel.current_task()
    return anyio.get_current_task().id  # pragma: no cover - no third backend today


def _innermost_anyio_scope(task: Any) -> Any:
    """The innermost anyio cancel scope of an asyncio task, or None.

    Read from anyio's table of task states (see `_privates`): without it,
    stalwart's asyncio deadlines behave as ``asyncio.timeout`` does and do not
    see anyio's shields.
    """
    # A task keeps its anyio state object from its first anyio scope until it
    # ends: remember the last task's (the lookup costs a weakref). One tuple,
    # read and replaced whole, so loops in other threads cannot mix it.
    last_task, state = _last_state
    if last_task() is task:
        return state.cancel_scope
    return _looked_up_anyio_scope(task)


def _looked_up_anyio_scope(task: Any) -> Any:
    """`_innermost_anyio_scope` when the cache holds another task: looked up, and cached."""
    global _last_state
    table = anyio_task_states()
    if table is None:
        return None
    state = table.get(ref(task))
    if state is None:
        return None
    scope = getattr(state, "cancel_scope", _NO_ATTRIBUTE)
    if scope is _NO_ATTRIBUTE:  # pragma: no cover - an anyio that renamed it
        probe_failed(
            "anyio's TaskState.cancel_scope", "deadlines that do not see anyio's shielded scopes"
        )
        return None
    # Only a state that has the attribute is cached: a cache hit reads it directly.
    _last_state = (ref(task), state)
    return scope


_NO_ATTRIBUTE: Final = object()


# (No task cached: NoneType() is None, and calling it costs no Python frame:
# a deadline scope reads the cache on every entry, the "Timeout" row.)
_last_state: tuple[Callable[[], Any], Any] = (type(None), None)


class _Timers:
    """The deadline expiries of one asyncio loop, behind a single loop timer.

    Entries are ``[when, seq, scope]`` lists, so the heap compares numbers in
    C (``seq`` breaks ties between equal deadlines).
    A scope that exits removes its entry if it is the heap's last leaf, else
    just clears its entry's slot (both O(1)); cleared entries are dropped when
    they reach the top, or all at once when they outnumber the live ones, so
    the heap stays proportional to the calls in flight.
    """

    __slots__ = ("__weakref__", "_armed_at", "_dead", "_handle", "_heap", "_loop", "_seq")

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._seq = 0
        self._heap: list[list[Any]] = []
        self._dead = 0
        self._handle: Any = None
        self._armed_at = 0.0

    def add(self, when: float, scope: _Scope) -> list[Any]:
        # (Inlined in _Scope.__enter__: keep the two alike.)
        self._seq += 1
        entry = [when, self._seq, scope]
        heappush(self._heap, entry)
        if self._handle is None or when < self._armed_at:
            self._arm(when)
        return entry

    def discard(self, entry: list[Any]) -> None:
        heap = self._heap
        if heap and heap[-1] is entry:
            # The latest deadline is the last leaf: removing it keeps the heap
            # a heap. Scopes of one duration exiting in turn, or nested ones
            # exiting inner first, always take this way, and the heap stays
            # as small as the calls in flight with no clean-up to amortise.
            heap.pop()
            entry[2] = None
        elif entry[2] is not None:
            entry[2] = None
            self._dead += 1
            if self._dead > 256 and self._dead * 2 > len(self._heap):
                self._heap = [e for e in self._heap if e[2] is not None]
                heapify(self._heap)
                self._dead = 0

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        # In an empty context: call_at would copy the caller's, whose deadline
        # scope holds its task, whose result would stay alive until it fires.
        self._handle = self._loop.call_at(when, self._fire, context=Context())

    def _fire(self) -> None:
        self._handle = None
        heap = self._heap
        # The loop runs a timer once it is within its clock resolution of due.
        limit = max(self._loop.time(), self._armed_at)
        while heap:
            entry = heap[0]
            scope = entry[2]
            if scope is None:
                heappop(heap)
                self._dead -= 1
            elif entry[0] <= limit:
                heappop(heap)
                entry[2] = None
                scope.expire()
            else:
                self._arm(entry[0])
                break


# Each loop's timers, for loops in several threads taking turns in the
# LoopInfo cache. Weak both ways: _Timers holds its loop, and lives as long as
# the cached LoopInfo, a scope or its armed timer needs it.
_timers_by_loop: WeakKeyDictionary[Any, ref[_Timers]] = WeakKeyDictionary()


def _timers_of(info: _clock.LoopInfo) -> _Timers:
    timers: _Timers | None = info.timers
    if timers is None:
        known = _timers_by_loop.get(info.loop)
        timers = None if known is None else known()
        if timers is None:
            timers = _Timers(info.loop)
            _timers_by_loop[info.loop] = ref(timers)
        info.timers = timers
    return timers


class _CancelScope(Protocol):
    """What _Scope uses of trio's cancel scope."""

    @property
    def cancel_called(self) -> bool: ...
    @property
    def cancelled_caught(self) -> bool: ...
    def __enter__(self) -> Any: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None: ...


class ScopeOwner(Protocol):
    """A policy whose deadline scope reports to it when it expires."""

    @property
    def claims_outer_deadline(self) -> bool: ...

    def deadline_exceeded(self, timeout: float) -> DeadlineExceeded:
        """Count the expiry and build the error; ``timeout`` is the limit that applied."""
        ...


class _Scope(Counted):
    """One deadline scope: the ambient deadline inside it, and its canceller.

    ``timeout`` is the effective limit (``seconds``, or less when an
    enclosing deadline is nearer). A scope whose enclosing deadline is nearer
    and lives in the same task arms nothing: that deadline cancels for both.
    An ``owner`` (a `Timeout`, or a `Retry` with a ``timeout``) builds the
    error and counts the expiry; one that ``claims_outer_deadline`` (a
    `Timeout`) also reports the enclosing deadline's expiry as its own, as the
    contract asks of a `Timeout`. With ``metrics``, the block's outcome counts
    as a call's (see `Counted`), its expiry as a ``timeout``.
    """

    __slots__ = (
        "_anyio_scope",
        "_cancel_scope",
        "_cancelling",
        "_deferral",
        "_entry",
        "_expired",
        "_outer",
        "_soon",
        "_task",
        "_timers",
        "_token",
        "exceeded",
        "owner",
        "policy",
        "timeout",
        "when",
    )
    when: float
    timeout: float
    policy: str
    _task: Any
    _outer: _Scope | None
    _cancelling: int
    _timers: _Timers

    def __init__(
        self,
        seconds: float,
        policy: str,
        owner: ScopeOwner | None = None,
        metrics: PolicyMetrics | None = None,
        start: float | None = None,
    ) -> None:
        self.metrics = metrics
        self.start = start
        self.timeout = seconds
        self.policy = policy
        self.owner = owner
        self.exceeded = False  # set when it raises DeadlineExceeded itself
        self._expired = False
        self._token: Token[_Scope | None] | None = None
        self._cancel_scope: _CancelScope | None = None
        self._entry: list[Any] | None = None
        self._soon: Any = None  # the call_soon handle of a deadline due on entry

    def __enter__(self) -> _Scope:
        info = _clock.asyncio_loop()
        if info is not None:
            now = info.time()
            task: Any = current_task(info.loop)
            if task is None:
                raise RuntimeError("a stalwart deadline must be entered inside a task")
        else:
            now = _clock.now()
            task = _task_token()
        when = now + self.timeout
        outer = _current.get()
        self._outer = outer
        self._task = task
        if outer is not None and outer.when <= when:
            left = outer.when - now
            self.timeout = left if left > 0.0 else 0.0
            self.when = when = outer.when
            if outer._task is task:
                return self  # the enclosing deadline will cancel this block too
        else:
            self.when = when
        self._token = _current.set(self)
        if info is not None:
            self._cancelling = task.cancelling()
            last_task, state = _last_state  # _innermost_anyio_scope's cache, inlined
            if last_task() is task:
                self._anyio_scope = state.cancel_scope
            else:
                self._anyio_scope = _looked_up_anyio_scope(task)
            self._deferral = 0.0
            timers = info.timers
            if timers is None:
                timers = _timers_of(info)
            self._timers = timers
            if when <= now:
                # Already due: cancel at the first checkpoint, from the loop
                # (as asyncio.timeout(0) does). Cancelling the task here would
                # leave a block that never suspends with a cancellation that
                # its exit cannot take back (before 3.13, uncancel() does
                # not clear a pending cancel()): the task's next, unrelated
                # await would raise a bare CancelledError.
                self._soon = info.loop.call_soon(self.expire, context=Context())
            else:
                # _Timers.add, inlined: this is most of a Timeout's cost.
                timers._seq += 1
                self._entry = entry = [when, timers._seq, self]
                heappush(timers._heap, entry)
                if timers._handle is None or when < timers._armed_at:
                    timers._arm(when)
        else:
            # No asyncio loop is running: this is trio. Its own scope costs a
            # third less than anyio's wrapper of it.
            cancel_scope: _CancelScope = sys.modules["trio"].CancelScope(deadline=when)
            cancel_scope.__enter__()
            self._cancel_scope = cancel_scope
        return self

    def expire(self) -> None:
        """Called by the loop's timer heap when ``when`` has come."""
        self._soon = None
        if self._task is None:
            return  # exited meanwhile (a due-on-entry call_soon that ran late)
        if self._shielded():
            # Like trio (and anyio's own scopes), let a shielded block finish:
            # look again soon, backing off, and cancel once it is over.
            self._deferral = min(0.01, self._deferral * 2.0 or 0.0005)
            timers = self._timers
            self._entry = timers.add(timers._loop.time() + self._deferral, self)
            return
        self._expired = True
        self._task.cancel()

    def _shielded(self) -> bool:
        """Is the task inside an anyio shielded scope entered within this one?"""
        return scope_chain(_innermost_anyio_scope(self._task), self._anyio_scope)

    def expired(self) -> bool:
        """Has this scope's deadline cancelled (or started cancelling) its block?"""
        if self._cancel_scope is not None:
            return self._cancel_scope.cancel_called
        return self._expired

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # Child tasks may keep this scope (their inherited deadline) after it
        # exits: it lets go of the task, and so of the task's result.
        task = self._task
        self._task = None
        token = self._token
        if token is None:
            # Unarmed: the enclosing deadline did the cancelling. A Timeout
            # still owns the outcome: its limit was that deadline's time left.
            outer = self._outer
            if (
                self.owner is not None
                and self.owner.claims_outer_deadline
                and exc_type is not None
                and outer is not None
                and is_cancellation(exc_type)
                and outer.expired()
            ):
                raise self._exceeded() from exc
            self.ended(exc)
            return None
        _current.reset(token)
        cancel_scope = self._cancel_scope
        if cancel_scope is None:
            soon = self._soon
            if soon is not None:
                soon.cancel()
                self._soon = None
            entry = self._entry
            if entry is not None:
                heap = self._timers._heap
                if heap and heap[-1] is entry:  # _Timers.discard's common case, inlined
                    heap.pop()
                    entry[2] = None
                else:
                    self._timers.discard(entry)
            self._anyio_scope = None
            if (
                self._expired
                and task.uncancel() <= self._cancelling
                and exc_type is not None
                and issubclass(exc_type, CancelledError)
            ):
                raise self._exceeded() from exc
            self.ended(exc)
            return None
        swallowed = cancel_scope.__exit__(exc_type, exc, tb)
        if cancel_scope.cancelled_caught:
            raise self._exceeded() from exc
        self.ended(exc)
        return swallowed

    def _exceeded(self) -> DeadlineExceeded:
        self.exceeded = True
        if self.metrics is not None:
            self.metrics.timed_out(self.start)
        if self.owner is not None:
            return self.owner.deadline_exceeded(self.timeout)
        return DeadlineExceeded(
            f"deadline of {self.timeout:g}s exceeded", policy=self.policy, timeout=self.timeout
        )


@final
class deadline:  # noqa: N801 - used like a function: `with sw.deadline(5):`
    """Set the ambient deadline for a block; cancel the block when it passes.

    ``with sw.deadline(seconds):`` (or ``async with``) makes `remaining` report the time left,
    makes every stalwart policy inside respect it, and cancels the block with
    `DeadlineExceeded` when the time is up. Deadlines only ever shorten: a
    nested ``deadline(60)`` inside ``deadline(1)`` still ends after 1 second.
    Tasks started inside the block inherit the deadline; those in a task group
    opened inside the block are cancelled with it.

    Args:
        seconds: time allowed, >= 0 (0 cancels at the first ``await``).
        name: reported as the error's ``policy``.

    Example::

        with sw.deadline(2.5):
            await call_inventory()  # its Timeout/Retry see at most 2.5 s left
    """

    __slots__ = ("_name", "_scope", "_seconds")

    def __init__(self, seconds: float, *, name: str = "deadline") -> None:
        self._seconds = _validate.duration("seconds", seconds)
        self._name = _validate.name(name)
        self._scope: _Scope | None = None

    @property
    def seconds(self) -> float:
        """The time the block is allowed, before any nearer enclosing deadline."""
        return self._seconds

    def __enter__(self) -> deadline:
        if self._scope is not None:
            raise RuntimeError("this deadline is already in use; create one per block")
        scope = _Scope(self._seconds, self._name)
        scope.__enter__()
        self._scope = scope
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        scope = self._scope
        assert scope is not None, "deadline exited without being entered"
        return scope.__exit__(exc_type, exc, tb)

    async def __aenter__(self) -> deadline:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return self.__exit__(exc_type, exc, tb)

    @property
    def when(self) -> float:
        """The absolute deadline on the loop's clock (after entering)."""
        if self._scope is None:
            raise RuntimeError("the deadline has not been entered yet")
        return self._scope.when

    def __repr__(self) -> str:
        return f"deadline({self._seconds:g})"
