"""Idempotency keys: run once per key, replay the result, one call in flight."""

from __future__ import annotations

import enum
import hashlib
import inspect
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, Literal, ParamSpec, TypeAlias, TypeVar, final

import anyio

from . import _codec, _validate
from ._deadline import is_cancellation
from ._errors import IdempotencyConflict, IdempotencyKeyReused
from ._idempotency_store import (
    ClaimOutcome,
    Completed,
    IdempotencyStore,
    InFlight,
    Lease,
    MemoryStore,
    Slot,
    resolve_store,
)
from ._metrics import MetricFamily, PolicyMetrics
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry, observed
from .events import CallRejected, IdempotentReplay

__all__ = ["Idempotency", "OnConflict"]

P = ParamSpec("P")
T = TypeVar("T")

OnConflict = Literal["wait", "raise"]
KeySpec: TypeAlias = str | Callable[..., str | None]
FingerprintSpec: TypeAlias = Literal["args"] | Callable[..., str] | None

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


class Verdict(enum.Enum):
    """What to do with a request, given the store's answer to its claim on a key."""

    RUN = "run"  #: the claim is ours: run, then store the outcome
    REPLAY = "replay"  #: a stored outcome answers it
    CONFLICT = "conflict"  #: the same request is in flight
    REUSED = "reused"  #: the key was used for a different request


def mismatch(stored: str | None, fingerprint: str | None) -> bool:
    """Do two fingerprints (None: not checked) name different requests?"""
    return fingerprint is not None and stored is not None and stored != fingerprint


def decide(outcome: ClaimOutcome, fingerprint: str | None, store: object) -> Verdict:
    """The verdict on a claim: the one decision the decorator and the middleware share.

    A key reused for another request (another fingerprint) is refused
    before anything else, also while the first request is in flight.
    """
    if isinstance(outcome, Lease):
        return Verdict.RUN
    if not isinstance(outcome, (Completed, InFlight)):
        raise TypeError(
            f"{store!r}.claim() returned {outcome!r}: expected a Lease, Completed or InFlight"
        )
    if mismatch(outcome.fingerprint, fingerprint):
        return Verdict.REUSED
    return Verdict.REPLAY if isinstance(outcome, Completed) else Verdict.CONFLICT


def record_durations(store: IdempotencyStore, *, ttl: float, lease: float) -> tuple[float, float]:
    """``ttl`` and ``lease`` of records kept in ``store``, checked: > 0, at most what it keeps.

    For the `Idempotency` policy and the ASGI ``IdempotencyMiddleware``
    alike (see `_validate.stored_duration`).
    """
    return (
        _validate.stored_duration("ttl", _validate.duration("ttl", ttl, positive=True), store),
        _validate.stored_duration(
            "lease", _validate.duration("lease", lease, positive=True), store
        ),
    )


class IdempotencyMetrics(PolicyMetrics):
    """An idempotency policy's (or middleware's): replays, and keys found in flight."""

    __slots__ = ("conflicts", "replays")

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(kind, name)
        self.replays = 0
        self.conflicts = 0

    families = (
        MetricFamily(
            "stalwart_idempotency_replays",
            "counter",
            "Calls answered from a stored result.",
            "replays",
        ),
        MetricFamily(
            "stalwart_idempotency_conflicts",
            "counter",
            "Calls whose key was already in flight.",
            "conflicts",
        ),
    )


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
    metrics_type = IdempotencyMetrics
    _metrics: IdempotencyMetrics
    _decorator_call = "Idempotency(key=...)"
    __slots__ = (
        "_fingerprint",
        "_keeper",
        "_key",
        "_lease",
        "_on_conflict",
        "_raise_on_conflict",
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
        self._ttl, self._lease = record_durations(store, ttl=ttl, lease=lease)
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

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        positional: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        origin = binding.origin
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
        ttl, metrics, settle, replayed = self._ttl, self._metrics, self._settle, self._replayed
        memory = self._store if type(self._store) is MemoryStore else None
        slot, span, timer = self._telemetry.provider_slot, self.in_span, self.timer()
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

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def idempotent(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await span(plain, args, kwargs)
                start = None if timer is None else timer()
                fp: str | None = None
                held: Any = None  # the in-process store's answer to a claim, then our claim
                record: Slot | None = None
                key: Any
                try:
                    if key_fn is None:
                        key = args[index] if len(args) > index else kwargs.get(key_name, default)
                    else:
                        key = key_fn(*args, **kwargs)
                    if key is not None and key is not _MISSING:
                        if (
                            not isinstance(key, str)
                            or not 0 < len(key) <= KEY_MAX_LENGTH
                            or not key.isprintable()
                        ):
                            raise bad_key(key)  # noqa: TRY301 - counted as the call's error below
                        if fingerprint_of is not None:
                            fp = fingerprint_of(args, kwargs)
                        if memory is not None:
                            record = (scope, key)
                            held = memory._claim_now(record, fp)
                except BaseException as exc:
                    metrics.failed(exc, start)
                    raise
                if type(held) is tuple:
                    return replayed(held[1], held[2], fp, label, start)  # type: ignore[no-any-return]
                if type(held) is not list:
                    if key is not None and key is not _MISSING:
                        return await settle(fn, args, kwargs, scope, key, fp, held, label, start)
                    record = None  # no key: no record
                try:
                    result = await (fn(*args, **kwargs) if kwargs else positional(*args))
                    if record is not None:
                        memory._complete_now(record, held, result, ttl)  # type: ignore[union-attr]
                except BaseException as exc:
                    if record is not None:
                        memory._release_now(record, held)  # type: ignore[union-attr]
                    metrics.failed(exc, start)
                    raise
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return idempotent

        return self.build(make, binding)

    def _replayed(
        self, value: Any, stored: str | None, fp: str | None, label: str, start: float | None
    ) -> Any:
        """Answer a call with a stored result (``stored``: its fingerprint), or refuse it."""
        metrics = self._metrics
        if mismatch(stored, fp):
            metrics.refused(start)
            raise self._key_reused(label)
        metrics.replays += 1
        metrics.succeeded(start)
        if observed(self._telemetry):
            self.report(IdempotentReplay)
        return value

    async def _settle(
        self,
        fn: Callable[..., Coroutine[Any, Any, T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        scope: str,
        key: str,
        fp: str | None,
        outcome: ClaimOutcome | None,
        label: str,
        start: float | None,
    ) -> T:
        """Everything but a plain first run or replay on the in-process store.

        ``outcome`` is the store's answer to a claim, or None to claim now.
        Counts the call's outcome.
        """
        store, metrics = self._store, self._metrics
        waited = False
        try:
            while True:
                if outcome is None:
                    outcome = await store.claim(scope, key, fingerprint=fp, lease=self._lease)
                verdict = decide(outcome, fp, store)
                if verdict is not Verdict.CONFLICT:
                    break
                if not waited:
                    metrics.conflicts += 1  # once per call, however long it waits
                if self._raise_on_conflict:
                    break
                waited = True
                outcome = await store.wait(scope, key, timeout=self._lease)
        except BaseException as exc:
            metrics.failed(exc, start)
            raise
        if verdict is Verdict.REPLAY:
            assert isinstance(outcome, Completed)
            return self._replayed(outcome.value, None, None, label, start)  # type: ignore[no-any-return]
        if verdict is Verdict.REUSED:
            metrics.refused(start)
            raise self._key_reused(label)
        if verdict is Verdict.CONFLICT:
            metrics.refused(start)
            if observed(self._telemetry):
                self.report(CallRejected, reason="idempotency_conflict", retry_after=None)
            raise IdempotencyConflict(
                f"a call to {label} with this idempotency key is already in flight "
                f"(policy {self._name!r}, on_conflict='raise')",
                policy=self._name,
            )
        assert isinstance(outcome, Lease)
        try:
            result = await self._run_holding(fn, args, kwargs, outcome)
        except BaseException as exc:
            metrics.failed(exc, start)
            raise
        metrics.succeeded(start)
        return result

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
        except BaseException as exc:
            await keeper.release(lease, cancelled=is_cancellation(type(exc)))
            raise
        try:
            stored = await keeper.complete(lease, result, ttl=self._ttl)
        except BaseException as exc:
            if not keeper.handed_over(exc):
                await keeper.release(lease)
            raise
        # A bypassed lease held nothing: the store that was away let the call
        # run, and logs its outage itself, once, not per call it let through.
        if not stored and not lease.bypassed:
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
    key claimed until the lease runs out; a store that finishes them in the
    background when cancelled (``RedisStore``: ``settles_in_background``) is
    not shielded, and a cancelled holder leaves them to it at once. Freeing
    never raises: the holder's own outcome is what propagates.
    """

    __slots__ = ("_background", "_label", "_shield", "_store", "_work")

    def __init__(self, store: IdempotencyStore, label: str, *, work: str = "call") -> None:
        self._store = store
        self._label = label  # who is logging, e.g. "idempotency policy 'charge'"
        self._work = work  # what the holder runs: "call", "request"
        # A store that finishes a cancelled write in the background
        # (RedisStore): shielding it would hold a cancelled caller for the
        # store's timeout, for nothing.
        self._background = bool(getattr(store, "settles_in_background", False))
        # The in-process store never suspends: nothing there to shield.
        self._shield = type(store) is not MemoryStore and not self._background

    def handed_over(self, error: BaseException) -> bool:
        """Did ``complete`` raise ``error`` having left the write to the store's background?

        A cancelled ``complete`` of a store that settles in the background:
        the result is stored as soon as the store can, so the key must not
        be freed.
        """
        return self._background and is_cancellation(type(error))

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

    async def release(self, lease: Lease, *, cancelled: bool = False) -> None:
        """Free the key; never raises (the lease frees it if this fails).

        ``cancelled``: the holder was cancelled. A store that settles in the
        background is then handed the release at once, not awaited: the
        cancelled caller goes now, and the key is freed as soon as the
        store can.
        """
        try:
            if not self._shield:
                if cancelled and self._background:
                    with anyio.CancelScope() as handed:
                        handed.cancel()  # its first wait leaves the release to the background
                        await self._store.release(lease)
                    return
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
