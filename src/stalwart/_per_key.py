"""The PerKey policy: one policy per key (per upstream, per tenant), a bounded number of them."""

from __future__ import annotations

import itertools
import sys
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Final, Generic, ParamSpec, TypeVar, final

from . import _metrics
from ._gauges import LiveMetrics, live_gauge
from ._keys import (
    KEY_MAX_LENGTH,
    MISSING,
    Key,
    KeySpec,
    Lru,
    checked,
    key_option,
    key_position,
    key_reader,
)
from ._keys import spec_text as _spec_text
from ._metrics import Collector, MetricFamily
from ._policy import AsyncCallable, Binding, Policy
from ._telemetry import Telemetry

__all__ = ["DEFAULT_MAX_KEYS", "PerKey", "PerKeyMetrics"]

P = ParamSpec("P")
T = TypeVar("T")
PolicyT = TypeVar("PolicyT", bound=Policy, covariant=True)

_NO_KEY: Final = object()
"""`PerKey._recent`'s key before any call: no key is this object."""

DEFAULT_MAX_KEYS: Final = 1000
"""How many keys a `PerKey` keeps a policy for, by default."""


class PerKeyMetrics(LiveMetrics["PerKey[Policy]"]):
    """A `PerKey`'s: the keys it keeps a policy for, and the keys it dropped."""

    exclusive = False
    __slots__ = ("dropped",)
    dropped: int

    families = (
        live_gauge(
            "stalwart_per_key_keys",
            "Keys a PerKey policy keeps a policy for now.",
            lambda per_key: len(per_key._table),
        ),
        MetricFamily(
            "stalwart_per_key_dropped",
            "counter",
            "Keys a PerKey policy dropped (least recently used) to stay within max_keys.",
            "dropped",
        ),
    )


@final
class _Entry:
    """A key's policy, its bindings (one per function the `PerKey` wraps), its metrics."""

    __slots__ = ("bound", "made", "policy")

    def __init__(self, policy: Policy, made: list[tuple[Collector, tuple[str, str]]]) -> None:
        self.policy = policy
        self.bound: dict[int, Callable[..., Coroutine[Any, Any, Any]]] = {}
        self.made = made


@final
class _Hot:
    """A wrapped function's entry used last and its call through it (see `PerKey._recent`)."""

    __slots__ = ("__weakref__", "call", "entry")

    def __init__(self) -> None:
        self.entry: _Entry | None = None
        self.call: Any = None  # (the function's T: a coroutine function)


@final
class PerKey(Policy, Generic[PolicyT]):
    """One policy per key: a breaker per upstream, a bulkhead per tenant.

    ``key`` reads each call's key from its arguments: the name of a parameter
    of the decorated function, or a callable taking the call's arguments.
    The key is a ``str`` of 1-255 characters or an ``int`` (made its decimal
    ``str``); ``None`` lets the call through with no policy. The first call
    with a key builds that key's policy, ``factory(key)``; later calls with
    the key go through the same policy. Building is synchronous, so calls
    that arrive together with a new key share the one policy built for it.

    At most ``max_keys`` keys keep their policy; a new key beyond that drops
    the least recently used one (calls still running through its policy
    finish with it; the key's next call builds a fresh one), in O(1)
    whatever their number. The metrics of the policies ``factory`` built
    for a dropped key stop being exported once nothing holds them: a
    service keyed by untrusted values (hosts, tenants) keeps as many metric
    series as it keeps keys, not one per key ever seen. Give each key's
    policy a name of its own (``name=f"upstream {key}"``): names are the
    series' ``policy`` label, and policies of one name share one series.

    `get` and `items` show the policies kept, for a health check
    (`stalwart.asgi.BreakerHealth` reads them). Like a `Pipeline`, a
    `PerKey` opens one span; the key's policy records its events on it.
    ``stalwart_per_key_keys`` is the number of keys kept,
    ``stalwart_per_key_dropped_total`` the keys dropped to make room.

    Args:
        factory: ``key -> policy``: builds a new policy for a key (a ``str``).
        key: a parameter name or a callable of the call's arguments.
        max_keys: keys kept at once, >= 1.
        name: the ``policy`` label of its metrics and attribute of its spans.
        telemetry: where it reports (``None``: the default `Telemetry`);
            the keys' policies report to their own.

    Example::

        breakers = sw.PerKey(
            lambda host: sw.CircuitBreaker(name=f"upstream {host}"), key="host"
        )

        @breakers
        async def fetch(host: str, path: str) -> bytes: ...

        open_hosts = [host for host, b in breakers.items() if b.state is sw.CircuitState.OPEN]
    """

    kind = "per_key"
    metrics_type = PerKeyMetrics
    _metrics: PerKeyMetrics
    _decorator_call = "PerKey(factory, key=...)"
    __slots__ = ("_factory", "_hots", "_key", "_recent", "_sites", "_table")

    def __init__(
        self,
        factory: Callable[[str], PolicyT],
        *,
        key: KeySpec,
        max_keys: int = DEFAULT_MAX_KEYS,
        name: str = "per_key",
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        if isinstance(factory, Policy):
            raise TypeError(
                "factory must be a callable making a new policy for each key "
                "(`factory=lambda key: sw.CircuitBreaker(...)`), not a policy"
            )
        if not callable(factory):
            raise TypeError(
                f"factory must be a callable taking a key and returning a policy, "
                f"not {type(factory).__name__}"
            )
        self._factory = factory
        spec = key_option(key, required=True)
        assert spec is not None
        self._key: KeySpec = spec
        self._table: Lru[str, _Entry] = Lru(max_keys, dropped=self._dropped)
        # The key used last and its entry: already the most recent in the table
        # (the "PerKey" benchmark row). Never a dropped key's: the key used last
        # is dropped only to make room for a new key, which becomes the last.
        self._recent: list[Any] = [_NO_KEY, None]
        self._hots: weakref.WeakSet[_Hot] = weakref.WeakSet()
        self._sites = itertools.count()
        self._metrics.live.add(self)

    @property
    def factory(self) -> Callable[[str], PolicyT]:
        """What builds a key's policy."""
        return self._factory

    @property
    def max_keys(self) -> int:
        """Keys kept at once."""
        return self._table.max_keys

    def get(self, key: Key) -> PolicyT | None:
        """``key``'s policy, or None when none is kept for it; does not mark it used."""
        entry = self._table.peek(checked(key, "key"))
        return None if entry is None else entry.policy  # type: ignore[return-value]

    def items(self) -> list[tuple[str, PolicyT]]:
        """A snapshot of the ``(key, policy)`` pairs kept, least recently used first."""
        return [(key, entry.policy) for key, entry in self._table.items()]  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._table)

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        positional: Callable[..., Coroutine[Any, Any, T]] = fn  # see _policy
        spec = self._key
        # A parameter's key is read inline, a callable's by `key_reader`: its
        # index is past any call's arguments, so one length test sends it there.
        read = key_reader(spec, binding.origin) if callable(spec) else None
        index, default = (
            (sys.maxsize, None) if callable(spec) else key_position(spec, binding.origin)
        )
        name = "" if callable(spec) else spec
        site = next(self._sites)
        # The key's policy records on this policy's span, as a Pipeline's members do.
        members = Binding(binding.origin, traced=False)
        table = self._table
        entries, use, build, recent = table.entries, table.use, self._build, self._recent
        slot, span, timer, metrics = (
            self._telemetry.provider_slot,
            self.in_span,
            self.timer(),
            self._metrics,
        )

        # This function's call through the entry it used last (see `_recent`).
        hot = _Hot()
        self._hots.add(hot)

        def through(entry: _Entry) -> Callable[..., Coroutine[Any, Any, T]]:
            """This function's call through ``entry``'s policy (bound on first use)."""
            call = entry.bound.get(site)
            if call is None:
                call = entry.bound[site] = entry.policy.wrap(fn, members)
            hot.entry, hot.call = entry, call
            return call

        def lookup(key: Any) -> Callable[..., Coroutine[Any, Any, T]]:
            """The call for a key other than the last one (kept out of the wrapper's frame)."""
            if key is None or key is MISSING:  # (missing: fn will say so)
                return positional
            if type(key) is not str or not 0 < len(key) <= KEY_MAX_LENGTH:
                key = checked(key, "the per-key policy's key")
            # `Lru.use`'s found case inlined: the "PerKey" benchmark row.
            entry = entries.get(key)
            if entry is None:
                entry = use(key, build)
            else:
                entries.move_to_end(key)
            recent[0], recent[1] = key, entry
            return through(entry)

        def make(plain: AsyncCallable[P, T] | None) -> AsyncCallable[P, T]:
            async def per_key(*args: P.args, **kwargs: P.kwargs) -> T:
                if slot._TRACER_PROVIDER is not None and plain is not None:
                    return await span(plain, args, kwargs)
                start = None if timer is None else timer()
                try:
                    if len(args) > index:
                        key = args[index]
                    elif read is None:
                        key = kwargs.get(name, default)
                    else:
                        key = read(args, kwargs)
                    # The last key (a checked str, already the most recent): the
                    # same object, usually; else an equal plain str.
                    last = recent[0]
                    if key is last or (type(key) is str and key == last):
                        entry = recent[1]
                        call = hot.call if hot.entry is entry else through(entry)
                    else:
                        call = lookup(key)
                    result = await (call(*args, **kwargs) if kwargs else call(*args))
                except BaseException as exc:
                    metrics.failed(exc, start)
                    raise
                metrics.success += 1
                return result if start is None else metrics.returned(result, start)

            return per_key

        return self.build(make, binding)

    def _build(self, key: str) -> _Entry:
        """A new key's entry: ``factory(key)``, and the metrics building it made."""
        with _metrics.capturing() as made:
            policy = self._factory(key)
        if not isinstance(policy, Policy):
            raise TypeError(
                f"factory must return a stalwart policy, returned {type(policy).__name__} "
                f"for the key {key!r}"
            )
        return _Entry(policy, made)

    def _dropped(self, key: str, entry: _Entry) -> None:
        self._metrics.dropped += 1
        for hot in list(self._hots):  # a dropped policy is held by nothing of ours
            if hot.entry is entry:
                hot.entry = hot.call = None
        for collector, metrics_key in entry.made:
            collector.forget(metrics_key)

    def __repr__(self) -> str:
        factory = getattr(self._factory, "__qualname__", None) or repr(self._factory)
        return (
            f"PerKey({factory}, key={_spec_text(self._key)!r}, max_keys={self.max_keys}, "
            f"name={self._name!r})"
        )
