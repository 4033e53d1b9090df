"""Keys read from a call's arguments, and a bounded table of state per key.

What every keyed policy shares (`RateLimiter`'s buckets, `PerKey`'s
policies): the ``key=`` option (a parameter name or a callable of the call's
arguments), how a call's key is read and checked (a ``str`` of 1-255
characters, or an ``int`` made its decimal ``str``; ``None``: the call has no
key), and `Lru`, the table that keeps at most ``max_keys`` entries, the least
recently used dropped first, in O(1) per call whatever their number.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Final, Generic, TypeAlias, TypeVar, final

from . import _validate
from ._idempotency import _MISSING, _callable_name, _key_position, _qualified_name

__all__ = [
    "KEY_MAX_LENGTH",
    "MISSING",
    "Key",
    "KeyReader",
    "KeySpec",
    "Lru",
    "ValidatedKey",
    "checked",
    "key_option",
    "key_position",
    "key_reader",
    "spec_text",
]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: A key: a str of 1-255 characters or an int (made its decimal str); None: no key.
Key: TypeAlias = str | int
KeySpec: TypeAlias = str | Callable[..., Key | None]
KeyReader: TypeAlias = Callable[[tuple[Any, ...], dict[str, Any]], Any]

KEY_MAX_LENGTH: Final = 255


@final
class ValidatedKey(str):
    """A key a policy made from input already validated elsewhere: exempt from `KEY_MAX_LENGTH`.

    The bound keeps untrusted keys (read from a call's arguments) from
    filling memory; an integration's own keys come from input its library
    parsed and checked, and some are longer: an origin
    (``scheme://host:port``, with a DNS name of up to 253 characters, 267
    in all) that httpx took from a URL, a gRPC service's full name. `checked`
    takes such a key whatever its length (it must not be empty) and makes
    it a plain ``str``. Make one with `validated_key`.
    """

    __slots__ = ()


def validated_key(text: str) -> str:
    """``text`` as a key that `checked` takes whatever its length (see `ValidatedKey`).

    A ``text`` within the bound stays a plain ``str``: the keyed policies'
    fast path for the most recent key (an exact ``str``) is kept.
    """
    return text if len(text) <= KEY_MAX_LENGTH else ValidatedKey(text)


#: What a reader returns for a parameter the call did not pass (the function will say so).
MISSING: Final[Any] = _MISSING

# An int key becomes its decimal str: at most 20 characters in this range.
_INT_KEYS: Final = range(-(2**63), 2**63)


def key_option(value: Any, *, required: bool = False) -> KeySpec | None:
    """The ``key`` option, checked: a parameter name, a callable, or (unless required) None."""
    if value is None and not required:
        return None
    if not isinstance(value, str) and not callable(value):
        accepted = "a parameter name (str) or a callable"
        if not required:
            accepted += " or None"
        raise TypeError(f"key must be {accepted}, not {type(value).__name__}")
    if isinstance(value, str) and not value.isidentifier():
        raise ValueError(f"key must be the name of a parameter or a callable, got {value!r}")
    spec: KeySpec = value
    return spec


def key_reader(spec: KeySpec, origin: Callable[..., Any]) -> KeyReader:
    """How a call's key is read from its arguments, for ``origin``'s calls.

    A parameter name is looked up in ``origin``'s signature once (a
    ``ValueError`` when it has no such parameter); the reader returns
    `MISSING` when the call did not pass it and it has no default.
    """
    if callable(spec):
        user = spec

        def from_callable(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return user(*args, **kwargs)

        return from_callable
    index, default = key_position(spec, origin)

    def from_parameter(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args[index] if len(args) > index else kwargs.get(spec, default)

    return from_parameter


def key_position(name: str, origin: Callable[..., Any]) -> tuple[int, Any]:
    """Where parameter ``name`` of ``origin`` is in a call: (index in args, default).

    The index is ``sys.maxsize`` for a keyword-only parameter; the default
    `MISSING` for a parameter without one. For a hot path that reads the
    key inline: ``args[index] if len(args) > index else kwargs.get(name, default)``.
    """
    return _key_position(origin, name, _qualified_name(origin))


def spec_text(spec: KeySpec | None) -> str | None:
    """The ``key`` option as a repr shows it: the parameter name, or the callable's name."""
    return spec if spec is None or isinstance(spec, str) else _callable_name(spec)


def checked(key: object, what: str) -> str:
    """``key`` as a table's key: a str of 1-255 characters, or an int as its decimal str.

    ``what`` names the key in the ``ValueError``/``TypeError`` of a key that
    is neither. A ``str`` subclass is made a plain ``str``: its own hash and
    equality are not trusted. A `ValidatedKey` may be longer.
    """
    if type(key) is str:
        if 0 < len(key) <= KEY_MAX_LENGTH:
            return key
        raise ValueError(f"{what} must be 1-{KEY_MAX_LENGTH} characters, got {len(key)}")
    if isinstance(key, int) and not isinstance(key, bool):
        if key in _INT_KEYS:
            return str(key)
        raise ValueError(f"{what} must be an int in [-2**63, 2**63), got {_validate.shown(key)}")
    if isinstance(key, str):
        if type(key) is ValidatedKey and key:
            return str.__str__(key)
        return checked(str.__str__(key), what)
    raise TypeError(f"{what} must be a str, an int or None, not {type(key).__name__}")


@final
class Lru(Generic[K, V]):
    """At most ``max_keys`` values by key, the least recently used dropped first.

    O(1) per call whatever the number of keys. Keys are any hashable values;
    the caller bounds and validates untrusted ones (see `checked`).

    Args:
        max_keys: entries kept, >= 1 (``param`` names it in the error).
        dropped: called with each ``(key, value)`` dropped to make room.
    """

    __slots__ = ("dropped", "entries", "max_keys")

    def __init__(
        self,
        max_keys: int,
        *,
        param: str = "max_keys",
        dropped: Callable[[K, V], object] | None = None,
    ) -> None:
        self.max_keys = _validate.count(param, max_keys)
        #: the entries, least recently used first (a hot path may read it, see `use`)
        self.entries: OrderedDict[K, V] = OrderedDict()
        self.dropped = dropped

    def use(self, key: K, make: Callable[[K], V]) -> V:
        """``key``'s value, marked most recently used; made by ``make(key)`` if it has none.

        A value ``make`` fails to make leaves the table as it was. A new
        entry beyond ``max_keys`` drops the least recently used one.

        A hot path may inline the found case (``entries.get(key)``, then
        ``entries.move_to_end(key)``) and call this only for a new key.
        """
        entries = self.entries
        value = entries.get(key)
        if value is not None:
            entries.move_to_end(key)
            return value
        value = make(key)
        if len(entries) >= self.max_keys:
            old, gone = entries.popitem(last=False)
            if self.dropped is not None:
                self.dropped(old, gone)
        entries[key] = value
        return value

    def peek(self, key: K) -> V | None:
        """``key``'s value, or None; does not mark it used."""
        return self.entries.get(key)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of the entries, least recently used first."""
        return list(self.entries.items())

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def __repr__(self) -> str:
        return f"Lru({len(self.entries)} of {self.max_keys})"
