"""``canonical_json`` writes what ``rfc8785`` writes, byte for byte, for every value: plain
ones (no floats, ASCII keys) through Python's C encoder, the rest through rfc8785 itself;
and refuses what rfc8785 refuses with the same error."""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from typing import Any

import pytest
import rfc8785

from mvm.errors import InvalidArgument
from mvm.security.canonical import canonical_json

#: every ASCII character (controls, quote, backslash, DEL), and beyond: Latin-1, the JSON
#: line separators U+2028/2029, the BMP's top (U+E000-U+FFFF sorts after astral characters
#: in UTF-16), astral characters
_ALPHABET = [chr(c) for c in range(0x80)] + list("é\u00a0\u2028\u2029\ue000\uffff\U0001f600\U00010000ß")


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randrange(0, 12)))


def _value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "bool", "none", "big"] + (["list", "tuple", "dict", "dict"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return _text(rng)
    if kind == "int":
        return rng.choice([0, -1, 1, 2**53 - 1, -(2**53) + 1, rng.randrange(-(10**15), 10**15)])
    if kind == "float":
        return rng.choice([0.0, -0.0, 1.0, -3.0, 12.5, -0.25, 0.1, 1e21, 1e-7, 1e-5, 1.5e-4, 1e16, 123456789.125,
                           2.0**53, 1e15 + 0.5, 5e-324, 1.7976931348623157e308, rng.uniform(-1e6, 1e6),
                           rng.uniform(-1, 1) * 10.0 ** rng.randrange(-9, 23)])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "big":
        return rng.choice(["x", 7, [], {}])  # keeps most values valid; out-of-range cases are below
    items = [_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    keys = [_text(rng) if rng.random() < 0.3 else "".join(rng.choice("abcXYZ_-09") for _ in range(3))
            for _ in items]
    return dict(zip(keys, items, strict=True))


def _outcome(fn: Any, value: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(value)
    except (rfc8785.CanonicalizationError, UnicodeError, TypeError, InvalidArgument) as exc:
        return "error", str(exc)


def _rfc8785_then_ours(value: Any) -> tuple[tuple[str, Any], tuple[str, Any]]:
    return _outcome(rfc8785.dumps, value), _outcome(canonical_json, value)


def test_random_values_give_rfc8785s_bytes() -> None:
    rng = random.Random(8785)
    for _ in range(3000):
        value = _value(rng)
        expected, ours = _rfc8785_then_ours(value)
        assert expected[0] == "ok", value  # the generator makes valid values only
        assert ours == expected, value


class Colour(enum.StrEnum):
    RED = "red"


class Count(enum.IntEnum):
    ONE = 1


@pytest.mark.parametrize("value", [
    {"b": 1, "a": [1.5, 2.0, 1e21, 1e-7, -0.0, 0.1]},  # floats: ECMAScript number form
    {"\U0001f600": 1, "\ue000": 2, "é": 3},  # non-ASCII keys: UTF-16 order
    OrderedDict([("b", 1), ("a", 2)]),
    [Colour.RED, Count.ONE],  # subclasses: rfc8785 writes their values
    {"nested": [[{"k": "v\n\t\"\\\x00\x1f\x7f\u2028"}]]},
])
def test_values_rfc8785_writes_itself_give_the_same_bytes(value: Any) -> None:
    expected, ours = _rfc8785_then_ours(value)
    assert expected[0] == "ok"
    assert ours == expected


@pytest.mark.parametrize("value", [
    2**53, -(2**53), [1, {"n": 2**60}], float("nan"), [float("inf")], "lone \ud800 surrogate",
    {"k": ["\udfff"]}, {1: "not a str key"}, {"k": object()}, {"k": b"bytes"},
])
def test_what_rfc8785_refuses_is_refused_naming_the_field(value: Any) -> None:
    assert _outcome(rfc8785.dumps, value)[0] == "error"
    with pytest.raises(InvalidArgument) as raised:
        canonical_json(value, field="args")
    assert raised.value.details.get("field") == "args" or "args" in str(raised.value)
