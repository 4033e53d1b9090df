"""How values cross a shared store: as bytes, through a codec, never by pickle.

A store shared between processes (Redis) holds bytes. Whoever can write to it
can make every reader decode what they wrote, so decoding must never run code:
stalwart's codecs are data-only, and pickle is never used.
"""

from __future__ import annotations

import json
import math
from typing import Any, Protocol, final, runtime_checkable

__all__ = ["Codec", "JSONCodec"]


@runtime_checkable
class Codec(Protocol):
    """Turns values into bytes and back, for stores shared between processes.

    A codec must give back exactly what it was given (``decode(encode(v)) ==
    v``, same types), or refuse it: ``encode`` raises `TypeError` for a value
    it cannot represent (`ValueError` for one it can type but not represent,
    such as a NaN), naming where in the value the problem is; ``decode``
    raises `ValueError` for bytes it cannot read. Decoding must never execute
    anything found in the data (no pickle): a shared store is only as
    trustworthy as everyone who can write to it.
    """

    def encode(self, value: Any) -> bytes:
        """The bytes representing ``value``."""
        ...

    def decode(self, data: bytes) -> Any:
        """The value ``data`` represents."""
        ...


@final
class JSONCodec:
    """JSON as UTF-8 bytes, for values that survive the round trip exactly.

    Accepts ``None``, ``bool``, ``int``, finite ``float``, ``str``, and
    ``list`` and ``dict`` (with ``str`` keys) of those, nested. Anything else
    raises `TypeError` naming the offending part (``result['items'][2]``),
    rather than coming back changed: JSON would turn a tuple into a list, a
    ``datetime`` cannot be stored at all, and an ``int`` dict key would come
    back a ``str``. Convert such values yourself (return ``list``s, ISO
    strings, ``model.model_dump()``), or write a `Codec` for your types.

    Example::

        codec = sw.JSONCodec()
        codec.decode(codec.encode({"id": 7, "tags": ["a"]}))  # {'id': 7, 'tags': ['a']}
    """

    __slots__ = ()

    def encode(self, value: Any) -> bytes:
        """UTF-8 JSON for ``value``; `TypeError`/`ValueError` if it cannot round-trip."""
        check(value, "value", exact=True, subject="JSONCodec cannot encode")
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
            "utf-8"
        )

    def decode(self, data: bytes) -> Any:
        """The value encoded in ``data``; `ValueError` if it is not UTF-8 JSON."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"JSONCodec decodes bytes, not {type(data).__name__}")
        try:
            return json.loads(bytes(data).decode("utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError both are
            raise ValueError(f"JSONCodec cannot decode {len(data)} bytes: {exc}") from exc

    def __repr__(self) -> str:
        return "JSONCodec()"


_HINT = (
    "only None, bool, int, float, str, list and dict with str keys survive JSON unchanged; "
    "convert the value, or use a codec that handles its type"
)


def check(value: Any, path: str, *, exact: bool, subject: str, hint: str = _HINT) -> None:
    """Raise unless ``value`` is plain JSON data.

    With ``exact``, only the exact JSON types pass (what a codec can give
    back unchanged); without, subclasses of ``str``/``int``/``float`` (enums)
    and tuples pass too (enough to hash a canonical form). Errors start with
    ``subject`` and name ``path`` extended to the offending part.
    """
    _check(value, path, exact, subject, hint, set())


def _check(value: Any, path: str, exact: bool, subject: str, hint: str, active: set[int]) -> None:
    cls = type(value)
    if value is None or cls is str or cls is bool or cls is int:
        return
    if cls is float or (not exact and isinstance(value, float)):
        if not math.isfinite(value):
            raise ValueError(f"{subject} {path}: {value!r} has no JSON form")
        return
    if not exact and isinstance(value, (str, int)):
        return
    if cls is list or cls is dict or (not exact and isinstance(value, (list, tuple, dict))):
        marker = id(value)
        if marker in active:
            raise ValueError(f"{subject} {path}: it contains itself")
        active.add(marker)
        if isinstance(value, dict):
            for k, v in value.items():
                if type(k) is not str and (exact or not isinstance(k, str)):
                    raise TypeError(
                        f"{subject} {path}: key {k!r} is a {type(k).__qualname__}, "
                        "and JSON object keys are strings"
                    )
                _check(v, f"{path}[{k!r}]", exact, subject, hint, active)
        else:
            for i, item in enumerate(value):
                _check(item, f"{path}[{i}]", exact, subject, hint, active)
        active.discard(marker)
        return
    raise TypeError(f"{subject} {path} of type {_type_name(cls)}: {hint}")


def _type_name(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
