from __future__ import annotations

import math
import pickle
from datetime import date
from enum import Enum
from typing import Any

import pytest

import stalwart as sw


class Color(str, Enum):  # noqa: UP042 - a str-valued Enum as users write them
    RED = "red"


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**70),
        1.25,
        "héllo 🙂",
        [],
        {},
        [1, "a", None, [2.5, {"k": False}]],
        {"nested": {"list": [1, 2, 3], "": "empty key"}},
    ],
)
def test_json_values_round_trip_exactly(value: Any) -> None:
    codec = sw.JSONCodec()
    data = codec.encode(value)
    assert isinstance(data, bytes)
    decoded = codec.decode(data)
    assert decoded == value
    assert type(decoded) is type(value)


def test_the_encoding_is_compact_utf8() -> None:
    assert sw.JSONCodec().encode({"a": [1, "é"]}) == '{"a":[1,"é"]}'.encode()


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        ((1, 2), TypeError, r"value of type tuple"),
        ({"a": {1, 2}}, TypeError, r"value\['a'\] of type set"),
        ([b"raw"], TypeError, r"value\[0\] of type bytes"),
        ({"when": date(2024, 1, 1)}, TypeError, r"value\['when'\] of type datetime.date"),
        ({1: "a"}, TypeError, r"key 1 is a int"),
        ([Color.RED], TypeError, r"value\[0\] of type tests.test_codec.Color"),
        ({"x": math.nan}, ValueError, r"value\['x'\]: nan has no JSON form"),
        ([math.inf], ValueError, r"value\[0\]: inf"),
        (object(), TypeError, "convert the value, or use a codec"),
    ],
)
def test_values_that_would_not_come_back_unchanged_are_refused(
    value: Any, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        sw.JSONCodec().encode(value)


def test_a_value_that_contains_itself_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match=r"value\[0\]: it contains itself"):
        sw.JSONCodec().encode(loop)


def test_a_value_repeated_without_a_cycle_is_fine() -> None:
    shared = [1]
    assert sw.JSONCodec().decode(sw.JSONCodec().encode([shared, shared])) == [[1], [1]]


@pytest.mark.parametrize("data", [b"", b"{", b"\xff\xfe", b"nope"])
def test_bytes_that_are_not_utf8_json_are_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="JSONCodec cannot decode"):
        sw.JSONCodec().decode(data)


def test_decode_wants_bytes() -> None:
    with pytest.raises(TypeError, match="decodes bytes, not str"):
        sw.JSONCodec().decode("{}")  # type: ignore[arg-type]


ran: list[str] = []


class Exploit:
    def __reduce__(self) -> tuple[Any, ...]:
        return (ran.append, ("pickle ran code",))


def test_a_pickle_is_never_unpickled() -> None:
    payload = pickle.dumps(Exploit())
    with pytest.raises(ValueError, match="JSONCodec cannot decode"):
        sw.JSONCodec().decode(payload)
    assert ran == []


def test_json_codec_is_a_codec() -> None:
    assert isinstance(sw.JSONCodec(), sw.Codec)
    assert repr(sw.JSONCodec()) == "JSONCodec()"
