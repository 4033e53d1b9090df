"""Idempotency keys: run once per key, replay the result, one call in flight."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Literal, TypeVar, Union, final

import anyio
from typing_extensions import ParamSpec

from . import _codec, _telemetry, _validate
from ._errors import IdempotencyConflict, IdempotencyKeyReused
from ._idempotency_store import (
    ClaimOutcome,
    Completed,
    IdempotencyStore,
    InFlight,
    Lease,
    MemoryStore,
    resolve_store,
)
from ._policy import Policy
from ._telemetry import IdempotencyStats, Telemetry, add_event, otel_probe, run_in_span
from ._timeout import is_cancellation

__all__ = ["Idempotency", "OnConflict"]

P = ParamSpec("P")
T = TypeVar("T")

OnConflict = Literal["wait", "raise"]
KeySpec = Union[str, Callable[..., Union[str, None]]]  # noqa: UP007 - runtime alias on 3.10
FingerprintSpec = Union[Literal["args"], Callable[..., str], None]  # noqa: UP007

DEFAULT_TTL: Final = 86_400.0
DEFAULT_LEASE: Final = 30.0
KEY_MAX_LENGTH: Final = 255
REPLAYED_EVENT: Final = "stalwart.idempotency.replayed"

# A holder that fails or is cancelled gets this long, shielded from
# cancellation, to tell a shared store; past it the lease frees the key.
_CLEANUP_TIMEOUT: Final = 10.0

_MISSING: Final[Any] = object()
_POSITIONAL: Final = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_VARIADIC: Final = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)

_log = logging.getLogger("stalwart.idempotency")


@final
class Idempotency(Policy):
    """Run a call once per idempotency key; replay its result to repeats.

    The first call with a key runs and, if it returns, its result is stored
    for ``ttl`` seconds: later calls with that key return the stored result
    without running (a *replay*). If it raises, nothing is stored and the key
    is free again, so a retry runs afresh. A call whose key is in flight
    waits for that call's outcome (``on_conflict="wait"``) or raises
    `IdempotencyConflict` (``"raise"``); if the running call fails or is
    cancelled, its exception is not shared: one waiter takes the key and
    runs, the others wait for that one.

    Args:
        key: the name of a parameter of the decorated function holding the
            key, or a callable taking the call's arguments and returning it.
            A key of ``None`` means "no de-duplication" for that call; any
            other key must be a ``str`` of 1-255 printable characters, else
            the call fails with `TypeError`/`ValueError` before running.
        store: where records live: an `IdempotencyStore`. Default: a private
            `MemoryStore` of ``max_entries`` records.
        ttl: seconds a result is replayed for, > 0 (default one day).
        fingerprint: what makes two calls with one key "the same request":
            ``None`` (no check), ``"args"`` (a SHA-256 of a canonical JSON
            encoding of the other arguments, the same in every process), or
            a callable of the call's arguments returning a ``str``. A key
            reused with a different fingerprint raises
            `IdempotencyKeyReused`, also while the first call is in flight.
        on_conflict: ``"wait"`` (default) or ``"raise"``.
        lease: seconds a claim on a key lasts in a shared store without
            renewal, > 0 (default 30). While the call runs its claim is
            renewed every ``lease / 3`` seconds; if the process dies, other
            callers may take the key after at most ``lease`` seconds.
            Waiters also look at the store again at least this often.
            The in-process store needs neither.
        max_entries: the size of the default in-process store (default
            10,000); give a ``store`` or this, not both.

    Records are scoped by ``name`` and by the decorated function's module
    and qualified name: two functions never share a record, even in one
    store, while one function decorated alike in several processes shares
    its records through a shared store. A replay from the default store
    returns the very object the first call returned (see `MemoryStore`).

    Example::

        @sw.Idempotency(key="payment_id", fingerprint="args", ttl=3600)
        async def charge(payment_id: str, amount_cents: int) -> dict[str, str]: ...
    """

    kind = "idempotency"
    _decorator_call = "Idempotency(key=...)"
    __slots__ = (
        "_fingerprint",
        "_keeper",
        "_key",
        "_lease",
        "_on_conflict",
        "_raise_on_conflict",
        "_stats",
        "_store",
        "_ttl",
    )

    def __init__(
        self,
        *,
        key: KeySpec,
        store: IdempotencyStore | None = None,
        ttl: float = DEFAULT_TTL,
        fingerprint: FingerprintSpec = None,
        on_conflict: OnConflict = "wait",
        lease: float = DEFAULT_LEASE,
        max_entries: int | None = None,
        name: str = "idempotency",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        if isinstance(key, str):
            if not key.isidentifier():
                raise ValueError(f"key must be the name of a parameter or a callable, got {key!r}")
        elif not callable(key):
            raise TypeError(
                f"key must be a parameter name (str) or a callable, not {type(key).__name__}"
            )
        self._key = key
        self._store = store = resolve_store(store, max_entries)
        self._keeper = LeaseKeeper(store, f"idempotency policy {self._name!r}")
        self._ttl = _validate.stored_duration(
            "ttl", _validate.duration("ttl", ttl, positive=True), store
        )
        spec: object = fingerprint
        if spec is not None and spec != "args" and not callable(spec):
            if isinstance(spec, str):
                raise ValueError(f"fingerprint must be None, 'args' or a callable, got {spec!r}")
            raise TypeError(
                f"fingerprint must be None, 'args' or a callable, not {type(spec).__name__}"
            )
        self._fingerprint = fingerprint
        if on_conflict not in ("wait", "raise"):
            raise ValueError(f"on_conflict must be 'wait' or 'raise', got {on_conflict!r}")
        self._on_conflict: OnConflict = on_conflict
        self._raise_on_conflict = on_conflict == "raise"
        self._lease = _validate.stored_duration(
            "lease", _validate.duration("lease", lease, positive=True), store
        )
        self._stats = self._telemetry.stats("idempotency", self._name, IdempotencyStats)

    @property
    def store(self) -> IdempotencyStore:
        return self._store

    @property
    def ttl(self) -> float:
        return self._ttl

    @property
    def on_conflict(self) -> OnConflict:
        return self._on_conflict

    @property
    def lease(self) -> float:
        return self._lease

    def _bind(
        self,
        fn: Callable[P, Coroutine[Any, Any, T]],
        *,
        origin: Callable[..., Any],
        traced: bool,
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        positional: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        label = _qualified_name(origin)
        scope = f"{self._name}:{label}"
        key_fn: Callable[..., Any] | None
        if isinstance(self._key, str):
            pname: str | None = self._key
            index, default = _key_position(origin, self._key, label)
            key_fn = None
            what = f"the idempotency key (parameter {self._key!r} of {label})"
        else:
            pname, index, default = None, sys.maxsize, _MISSING
            key_fn = self._key
            what = f"the idempotency key returned by key={_callable_name(key_fn)}"
        fingerprint_of = self._fingerprint_reader(origin, pname, label)
        store, ttl, lease, stats, settle = (
            self._store,
            self._ttl,
            self._lease,
            self._stats,
            self._settle,
        )
        memory = store if type(store) is MemoryStore else None
        tel, span_name, attrs = self._telemetry, self._span_name, self._span_attributes
        key_name = pname or ""

        def bad_key(key: object) -> Exception:
            if not isinstance(key, str):
                return TypeError(
                    f"{what} must be a str, or None to skip de-duplication, "
                    f"not {type(key).__name__}"
                )
            shown = repr(key) if len(key) <= 40 else repr(key[:40]) + "..."
            return ValueError(
                f"{what} must be 1-{KEY_MAX_LENGTH} printable characters, "
                f"got {len(key)} characters: {shown}"
            )

        def reused() -> IdempotencyKeyReused:
            return self._key_reused(label)

        def make(
            traced: bool, inner: Callable[P, Coroutine[Any, Any, T]] | None
        ) -> Callable[P, Coroutine[Any, Any, T]]:
            async def idempotent(*args: P.args, **kwargs: P.kwargs) -> T:
                if traced and (otel_probe._TRACER_PROVIDER is not None or tel._tracer is not None):
                    return await run_in_span(tel, span_name, attrs, inner, args, kwargs)  # type: ignore[arg-type]
                if key_fn is None:
                    key = args[index] if len(args) > index else kwargs.get(key_name, default)
                else:
                    key = key_fn(*args, **kwargs)
                if key is None or key is _MISSING:
                    return await (fn(*args, **kwargs) if kwargs else positional(*args))
                if (
                    not isinstance(key, str)
                    or not 0 < len(key) <= KEY_MAX_LENGTH
                    or not key.isprintable()
                ):
                    raise bad_key(key)
                fp = None if fingerprint_of is None else fingerprint_of(args, kwargs)
                outcome: ClaimOutcome
                if memory is not None:
                    slot = (scope, key)
                    fast = memory._claim_now(slot, fp)
                    if type(fast) is list:
                        try:
                            result = await (fn(*args, **kwargs) if kwargs else positional(*args))
                        except BaseException:
                            memory._release_now(slot, fast)
                            raise
                        try:
                            memory._complete_now(slot, fast, result, ttl)
                        except BaseException:
                            memory._release_now(slot, fast)
                            raise
                        return result
                    if type(fast) is tuple:
                        stored = fast[2]
                        if fp is not None and stored is not None and stored != fp:
                            raise reused()
                        stats.replays += 1
                        if _telemetry._explicit_tracing or otel_probe._TRACER_PROVIDER is not None:
                            add_event(REPLAYED_EVENT, attrs)
                        return fast[1]  # type: ignore[no-any-return]
                    assert type(fast) is InFlight
                    outcome = fast
                else:
                    outcome = await store.claim(scope, key, fingerprint=fp, lease=lease)
                return await settle(fn, args, kwargs, scope, key, fp, outcome, label)

            return idempotent

        untraced = make(False, None)
        return make(True, untraced) if traced else untraced

    async def _settle(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        scope: str,
        key: str,
        fp: str | None,
        outcome: ClaimOutcome,
        label: str,
    ) -> T:
        """Everything but a plain first run or replay on the in-process store."""
        store = self._store
        counted = False
        while True:
            if isinstance(outcome, Lease):
                return await self._run_holding(fn, args, kwargs, outcome)
            if isinstance(outcome, Completed):
                self._check_fingerprint(outcome.fingerprint, fp, label)
                self._stats.replays += 1
                add_event(REPLAYED_EVENT, self._span_attributes)
                return outcome.value  # type: ignore[no-any-return]
            if not isinstance(outcome, InFlight):
                raise TypeError(
                    f"{store!r}.claim() returned {outcome!r}: expected a Lease, Completed "
                    "or InFlight"
                )
            self._check_fingerprint(outcome.fingerprint, fp, label)
            if not counted:
                counted = True
                self._stats.conflicts += 1
            if self._raise_on_conflict:
                raise IdempotencyConflict(
                    f"a call to {label} with this idempotency key is already in flight "
                    f"(policy {self._name!r}, on_conflict='raise')",
                    policy=self._name,
                )
            done = await store.wait(scope, key, timeout=self._lease)
            if done is not None:
                outcome = done
            else:
                outcome = await store.claim(scope, key, fingerprint=fp, lease=self._lease)

    def _check_fingerprint(self, stored: str | None, fp: str | None, label: str) -> None:
        if fp is not None and stored is not None and stored != fp:
            raise self._key_reused(label)

    def _key_reused(self, label: str) -> IdempotencyKeyReused:
        return IdempotencyKeyReused(
            f"an idempotency key was reused for {label} with different arguments "
            f"(policy {self._name!r}): a key must name one request",
            policy=self._name,
        )

    async def _run_holding(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        lease: Lease,
    ) -> T:
        """Run the call as the key's holder, then store its result or free the key."""
        keeper = self._keeper
        try:
            result = await keeper.run(lease, fn, *args, **kwargs)
        except BaseException:
            await keeper.release(lease)
            raise
        try:
            stored = await keeper.complete(lease, result, ttl=self._ttl)
        except BaseException:
            await keeper.release(lease)
            raise
        if not stored:
            _log.warning(
                "idempotency policy %r: the result of a call of %s was not stored (its claim "
                "ended before the call did, or the store did not answer in time: a shared "
                "store may still store it in the background while the claim holds)",
                self._name,
                lease.scope,
            )
        return result

    def _fingerprint_reader(
        self, origin: Callable[..., Any], key_param: str | None, label: str
    ) -> Callable[[tuple[Any, ...], dict[str, Any]], str] | None:
        spec = self._fingerprint
        if spec is None:
            return None
        if spec == "args":
            return _args_fingerprint(origin, key_param, label)
        user = spec
        assert callable(user)

        def fingerprint_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
            value = user(*args, **kwargs)
            if not isinstance(value, str):
                raise TypeError(
                    f"fingerprint={_callable_name(user)} must return a str, "
                    f"not {type(value).__name__}"
                )
            return value

        return fingerprint_of

    def __repr__(self) -> str:
        key = self._key if isinstance(self._key, str) else _callable_name(self._key)
        return (
            f"Idempotency(key={key!r}, ttl={self._ttl:g}, on_conflict={self._on_conflict!r}, "
            f"store={self._store!r}, name={self._name!r})"
        )


def _qualified_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of the user's function: stable across processes."""
    target: Any = fn
    while hasattr(target, "func") and not hasattr(target, "__qualname__"):
        target = target.func  # functools.partial
    qualname = getattr(target, "__qualname__", None)
    module = getattr(target, "__module__", None)
    if qualname is None:  # an instance with an async __call__
        qualname, module = type(target).__qualname__, type(target).__module__
    return f"{module}.{qualname}"


def _callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _signature(origin: Callable[..., Any], option: str, label: str) -> inspect.Signature:
    try:
        return inspect.signature(origin)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{option}: cannot read the signature of {label}: {exc}") from exc


def _key_position(origin: Callable[..., Any], name: str, label: str) -> tuple[int, Any]:
    """Where parameter ``name`` is found in a call: (index in args, default)."""
    signature = _signature(origin, f"key={name!r}", label)
    position = 0
    for param in signature.parameters.values():
        if param.name == name:
            if param.kind in _VARIADIC:
                raise ValueError(
                    f"key={name!r} names the variadic parameter of {label}{signature}; "
                    "name a single parameter, or pass a callable"
                )
            default = _MISSING if param.default is param.empty else param.default
            return (position if param.kind in _POSITIONAL else sys.maxsize), default
        if param.kind in _POSITIONAL:
            position += 1
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return sys.maxsize, _MISSING  # passed by name into **kwargs
    raise ValueError(f"key={name!r} is not a parameter of {label}{signature}")


def _args_fingerprint(
    origin: Callable[..., Any], key_param: str | None, label: str
) -> Callable[[tuple[Any, ...], dict[str, Any]], str]:
    """SHA-256 of the canonical JSON of a call's arguments, bound by name.

    Defaults are filled in, so ``f(k)`` and ``f(k, x=<x's default>)`` agree;
    the key itself is left out, and so is a leading ``self``/``cls`` (the
    record is scoped to the function, not to an instance).
    """
    signature = _signature(origin, "fingerprint='args'", label)
    positional: list[str] = []
    by_name: set[str] = set()  # parameters a keyword argument may fill
    varargs, varkw = "*", "**"
    defaults: dict[str, Any] = {}
    for param in signature.parameters.values():
        if param.kind in _POSITIONAL:
            positional.append(param.name)
        if param.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            by_name.add(param.name)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            varargs = param.name
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            varkw = param.name
        if param.default is not param.empty:
            defaults[param.name] = param.default
    skip = {key_param} if key_param else set()
    # A key no parameter names arrives in **kwargs: leave it out there.
    key_extra = key_param if key_param and key_param not in signature.parameters else None
    if positional and positional[0] in ("self", "cls"):
        skip.add(positional[0])
    count = len(positional)
    subject = f"fingerprint='args' of {label} cannot encode argument"
    hint = "pass fingerprint=<a callable of the arguments returning a str> instead"

    def fingerprint_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        bound = dict(defaults)
        bound.update(zip(positional, args, strict=False))
        if len(args) > count:
            bound[varargs] = args[count:]
        extra: dict[str, Any] = {}
        for name, value in kwargs.items():
            if name in by_name:
                bound[name] = value
            elif name != key_extra:  # collected by **kwargs: kept apart from parameters
                extra[name] = value
        if extra:
            bound[varkw] = extra
        for name in skip:
            bound.pop(name, None)
        for name, value in bound.items():
            _codec.check(value, name, exact=False, subject=subject, hint=hint)
        canonical = json.dumps(bound, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    return fingerprint_of


@final
class LeaseKeeper:
    """What holding a claimed key involves, for the decorator and the middleware.

    While the holder's work runs, a lease with a duration is renewed every third
    of it (best effort: a failed renewal is logged and the work goes on). On a
    shared store, storing the outcome and freeing the key are shielded from
    cancellation for up to 10 seconds, so a cancelled holder does not leave its
    key claimed until the lease runs out (a store may wait less: ``RedisStore``
    stops at the ambient deadline, and finishes in the background). Freeing
    never raises: the holder's own outcome is what propagates.
    """

    __slots__ = ("_label", "_shield", "_store", "_work")

    def __init__(self, store: IdempotencyStore, label: str, *, work: str = "call") -> None:
        self._store = store
        self._label = label  # who is logging, e.g. "idempotency policy 'charge'"
        self._work = work  # what the holder runs: "call", "request"
        # The in-process store never suspends: nothing there to shield.
        self._shield = type(store) is not MemoryStore

    async def run(
        self, lease: Lease, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
    ) -> T:
        """Await ``fn(*args, **kwargs)``, renewing ``lease`` meanwhile."""
        if lease.duration is None:
            return await fn(*args, **kwargs)
        failure: BaseException | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_renewing, lease)
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                if is_cancellation(type(exc)):
                    raise
                # Raised after the task group, or it would come out wrapped
                # in an exception group.
                failure = exc
            tg.cancel_scope.cancel()
        if failure is not None:
            try:
                raise failure
            finally:
                failure = None
        return result

    async def complete(self, lease: Lease, value: Any, *, ttl: float) -> bool:
        """Store the outcome; False if the claim had ended. Store errors propagate."""
        if not self._shield:
            return await self._store.complete(lease, value, ttl=ttl)
        with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
            return await self._store.complete(lease, value, ttl=ttl)
        return False  # the store did not answer in time: the result is not stored

    async def release(self, lease: Lease) -> None:
        """Free the key; never raises (the lease frees it if this fails)."""
        try:
            if not self._shield:
                await self._store.release(lease)
                return
            with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True) as cleanup:
                await self._store.release(lease)
            if cleanup.cancelled_caught:
                _log.warning("%s: releasing a key timed out; its lease will free it", self._label)
        except Exception:  # noqa: BLE001 - logged; the holder's own outcome propagates
            _log.warning(
                "%s: could not release a key now; the store goes on trying in the background "
                "if it can, and the key's lease frees it in any case",
                self._label,
                exc_info=True,
            )

    async def _keep_renewing(self, lease: Lease) -> None:
        assert lease.duration is not None
        interval = lease.duration / 3.0
        while True:
            await anyio.sleep(interval)
            try:
                held = await self._store.renew(lease)
            except Exception:  # noqa: BLE001 - logged; renewing is best effort
                # The work goes on; the next renewal may get through before
                # the lease runs out.
                _log.warning("%s: could not renew a claim", self._label, exc_info=True)
                continue
            if not held:
                _log.warning(
                    "%s: lost the claim on a key while its %s ran", self._label, self._work
                )
                return
