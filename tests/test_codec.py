"""Tests of the value codecs: exact round trips (type by type), the stored JSON format, error
paths, circular references, determinism, and decoding of garbage."""

from __future__ import annotations

import contextlib
import datetime as dtm
import json
import math
import pickle
import sys
import threading
import uuid
from collections import defaultdict
from decimal import Decimal
from enum import IntEnum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptb_sessions._codec import Codec, JSONCodec, PickleCodec
from ptb_sessions._errors import SerializationError

JSON = JSONCodec()
PICKLE = PickleCodec()
LOCK_NAME = type(threading.Lock()).__name__


# --- an equality that also compares types (1 == 1.0 == True, and -0.0 == 0.0) ---------------


def same(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are equal and of the same types all the way down, dicts in the
    same order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return repr(a) == repr(b)  # nan == nan, -0.0 != 0.0
    if isinstance(a, Decimal):
        return a.as_tuple() == Decimal(b).as_tuple()  # NaN, sNaN, and the exponent of 1.00
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    if isinstance(a, set | frozenset):
        return len(a) == len(b) and all(any(same(x, y) for y in b) for x in a)
    if isinstance(a, dtm.datetime | dtm.time):
        return (
            a.replace(tzinfo=None) == b.replace(tzinfo=None)
            and type(a.tzinfo) is type(b.tzinfo)
            and a.utcoffset() == b.utcoffset()
        )
    return bool(a == b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (1, True),
        (1, 1.0),
        (0.0, -0.0),
        ((1,), [1]),
        ({1: "a"}, {"1": "a"}),
        ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
        ({1}, {True}),
        (frozenset({1}), {1}),
        (Decimal("1.0"), Decimal("1.00")),
        (dtm.datetime(2024, 1, 1), dtm.datetime(2024, 1, 1, tzinfo=dtm.timezone.utc)),
        (
            dtm.datetime(2024, 1, 1, 5, tzinfo=dtm.timezone(dtm.timedelta(hours=5))),
            dtm.datetime(2024, 1, 1, 0, tzinfo=dtm.timezone.utc),
        ),
        (b"a", "a"),
    ],
)
def test_same_tells_apart_what_equality_does_not(a: Any, b: Any) -> None:
    assert same(a, a)
    assert not same(a, b)


# --- strategies -----------------------------------------------------------------------------

MAX_OFFSET = dtm.timedelta(hours=24) - dtm.timedelta(microseconds=1)
offsets = st.builds(dtm.timezone, st.timedeltas(min_value=-MAX_OFFSET, max_value=MAX_OFFSET))
timezones = st.none() | st.just(dtm.timezone.utc) | offsets
hashable_atoms = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.dates()
    | st.datetimes(timezones=timezones)
    | st.uuids()
    | st.decimals(allow_nan=False)
    | st.timedeltas()
)
hashables = st.recursive(
    hashable_atoms,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
tricky_keys = st.sampled_from(["$t", "v", "1", "-5", "1.5", "null", "true", "$$t", "\\u0024t"])
keys = st.text(max_size=8) | st.integers() | tricky_keys | hashables
atoms = (
    hashable_atoms
    | st.times(timezones=timezones)
    | st.decimals()  # with NaN and sNaN
    | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0])
)
values = st.recursive(
    atoms,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
        | st.dictionaries(keys, inner, max_size=4)
    ),
    max_leaves=25,
)
plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    # "$t" is the one key that a plain dict may not have
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text().filter(lambda key: key != "$t"), inner, max_size=4)
    ),
    max_leaves=25,
)


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"not strict JSON: {name}")


def strict_json(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


# --- JSONCodec: round trips -----------------------------------------------------------------


@settings(max_examples=400)
@given(values)
def test_json_round_trip_keeps_values_and_types(value: Any) -> None:
    encoded = JSON.encode(value)
    assert isinstance(encoded, str)
    assert same(JSON.decode(encoded), value)
    assert same(JSON.decode(encoded.encode("utf-8")), value)


@settings(max_examples=200)
@given(values)
def test_json_output_is_strict_json_and_reencodes_identically(value: Any) -> None:
    encoded = JSON.encode(value)
    strict_json(encoded)
    assert JSON.encode(JSON.decode(encoded)) == encoded


@given(plain_values)
def test_plain_values_are_stored_as_plain_json(value: Any) -> None:
    encoded = JSON.encode(value)
    assert same(strict_json(encoded), value)
    assert encoded == json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ({"count": 3, "name": "x"}, '{"count":3,"name":"x"}'),
        ({"name": "Zoë 🍕"}, '{"name":"Zoë 🍕"}'),
        ([1, 2.5, None, True], "[1,2.5,null,true]"),
        (-0.0, "-0.0"),
        ((1, 2), '{"$t":"tuple","v":[1,2]}'),
        ({3, 1, 2}, '{"$t":"set","v":[1,2,3]}'),
        (frozenset({"b", "a"}), '{"$t":"frozenset","v":["a","b"]}'),
        ({1: "a", "1": "b"}, '{"$t":"dict","v":[[1,"a"],["1","b"]]}'),
        ({(1, 2): None}, '{"$t":"dict","v":[[{"$t":"tuple","v":[1,2]},null]]}'),
        (math.nan, '{"$t":"float","v":"nan"}'),
        ([math.inf, -math.inf], '[{"$t":"float","v":"inf"},{"$t":"float","v":"-inf"}]'),
        (
            dtm.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=dtm.timezone(dtm.timedelta(hours=-3))),
            '{"$t":"datetime","v":"2024-05-06T07:08:09.000010-03:00"}',
        ),
        (dtm.datetime(2024, 5, 6), '{"$t":"datetime","v":"2024-05-06T00:00:00"}'),
        (dtm.date(2024, 5, 6), '{"$t":"date","v":"2024-05-06"}'),
        (dtm.time(7, 8, 9, 10), '{"$t":"time","v":"07:08:09.000010"}'),
        (dtm.timedelta(days=-1, seconds=5, microseconds=7), '{"$t":"timedelta","v":[-1,5,7]}'),
        (Decimal("1.10"), '{"$t":"decimal","v":"1.10"}'),
        (Decimal("NaN"), '{"$t":"decimal","v":"NaN"}'),
        (b"\x00\xff", '{"$t":"bytes","v":"AP8="}'),
        (
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
            '{"$t":"uuid","v":"12345678-1234-5678-1234-567812345678"}',
        ),
        ({"cart": {"$t": "tuple"}}, '{"cart":{"$t":"dict","v":[["$t","tuple"]]}}'),
    ],
)
def test_stored_format(value: Any, stored: str) -> None:
    assert JSON.encode(value) == stored
    assert same(JSON.decode(stored), value)


def test_int_keys_stay_int_and_numeric_str_keys_stay_str() -> None:
    decoded = JSON.decode(JSON.encode({1: "int", "1": "str", -1001234: {"2": 2, 2: "two"}}))
    assert list(decoded) == [1, "1", -1001234]
    assert [type(key) for key in decoded] == [int, str, int]
    assert [type(key) for key in decoded[-1001234]] == [str, int]


@pytest.mark.parametrize(
    "value",
    [
        {"$t": "tuple", "v": [1, 2]},
        {"$t": "bytes", "v": "AP8="},
        {"$t": {"$t": "set", "v": []}},
        [{"$t": None}, {"v": 1, "$t": "dict"}],
        {"$t": "x", 1: 2},
        {"\\u0024t": "float", "v": "nan"},
        "$t",
        {"text": '{"$t":"tuple","v":[]}'},
    ],
)
def test_user_dicts_with_the_tag_key_round_trip(value: Any) -> None:
    encoded = JSON.encode(value)
    assert same(JSON.decode(encoded), value)


def test_the_same_object_twice_is_not_a_circular_reference() -> None:
    shared = [1, {"a": (2,)}]
    value = {"x": shared, "y": shared, "z": (shared, shared)}
    assert same(JSON.decode(JSON.encode(value)), value)


def test_deeply_nested_values_round_trip() -> None:
    value: Any = "leaf"
    for depth in range(300):
        value = [value] if depth % 2 else {"d": value}
    assert same(JSON.decode(JSON.encode(value)), value)


def test_encode_does_not_change_the_value() -> None:
    value = {"a": [1, (2, {3})], 4: {"$t": math.nan}}
    before = pickle.dumps(value)
    JSON.encode(value)
    assert pickle.dumps(value) == before


# --- JSONCodec: determinism -----------------------------------------------------------------


def test_equal_sets_encode_equally_whatever_their_iteration_order() -> None:
    # 1, 9 and 17 collide in a small hash table, so insertion order decides iteration order.
    first, second = set(), set()
    for item in (1, 9, 17):
        first.add(item)
    for item in (17, 9, 1):
        second.add(item)
    assert first == second
    assert list(first) != list(second)  # else this test proves nothing
    assert JSON.encode(first) == JSON.encode(second)
    assert JSON.encode({"s": frozenset(first)}) == JSON.encode({"s": frozenset(second)})


@given(st.sets(hashables, max_size=6))
def test_sets_encode_equally_when_rebuilt_in_another_order(value: set[Any]) -> None:
    rebuilt = set()
    for item in reversed(list(value)):
        rebuilt.add(item)
    assert JSON.encode(rebuilt) == JSON.encode(value)


# --- JSONCodec: errors ----------------------------------------------------------------------


def _encode_error(value: Any) -> SerializationError:
    with pytest.raises(SerializationError) as info:
        JSON.encode(value)
    return info.value


def test_error_names_path_and_type() -> None:
    error = _encode_error({"cart": [1, 2, threading.Lock()]})
    assert error.path == "['cart'][2]"
    assert error.reason == f"{LOCK_NAME} is not serializable"
    assert str(error) == f"value['cart'][2]: {LOCK_NAME} is not serializable"
    located = error.located("chat_data[-1001234]")
    assert str(located) == f"chat_data[-1001234]['cart'][2]: {LOCK_NAME} is not serializable"
    assert isinstance(error, TypeError)


class Thing:
    pass


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (Thing(), ""),
        ([Thing()], "[0]"),
        ({42: {"x": Thing()}}, "[42]['x']"),
        ({"a": ({1: [0, Thing()]},)}, "['a'][0][1][1]"),
        ({"s": {(1, Thing())}}, "['s']{<tuple>}[1]"),
        ({"$t": Thing()}, "['$t']"),
        ((1, 2, 3, [4, Thing()]), "[3][1]"),
    ],
)
def test_error_path(value: Any, path: str) -> None:
    error = _encode_error(value)
    assert error.path == path
    assert error.reason == "Thing is not serializable"


def test_error_in_a_dict_key_names_the_key() -> None:
    error = _encode_error({"d": {(1, Thing()): 1}})
    assert error.path == "['d']"
    assert error.reason.startswith("key (1, <")
    assert error.reason.endswith("cannot be encoded: Thing is not serializable")


class Color(IntEnum):
    RED = 1


@pytest.mark.parametrize(
    ("value", "base"),
    [
        (defaultdict(list), "dict"),
        (Color.RED, "int"),
        (bytearray(b"x"), None),
    ],
)
def test_subclasses_are_rejected_with_a_hint(value: Any, base: str | None) -> None:
    error = _encode_error({"x": value})
    assert error.path == "['x']"
    assert error.reason.startswith(f"{type(value).__name__} is not serializable")
    if base is None:
        assert "subclass" not in error.reason
    else:
        assert f"a subclass of {base}: convert it to {base}, or use PickleCodec" in error.reason


def test_too_big_int_is_a_serialization_error() -> None:
    digits = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    if not digits:
        pytest.skip("this Python converts ints of any size to str")
    assert "digits" in str(_encode_error({"n": 10 ** (digits + 1)}))


def test_circular_dict() -> None:
    value: dict[str, Any] = {"a": 1}
    value["self"] = value
    error = _encode_error(value)
    assert error.path == "['self']"
    assert "circular reference" in error.reason


def test_circular_list_through_tuple_and_dict() -> None:
    inner: list[Any] = []
    value = {"x": [0, (inner,)]}
    inner.append(value)
    error = _encode_error(value)
    assert error.path == "['x'][1][0][0]"
    assert "circular reference" in error.reason


def test_circular_top_level_list() -> None:
    value: list[Any] = [1]
    value.append(value)
    error = _encode_error(value)
    assert error.path == "[1]"
    assert "circular reference" in error.reason


# --- JSONCodec: decoding garbage ------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        "",
        "{",
        "[1,]",
        b"\xff\xfe\x00",
        '{"$t":"nope","v":1}',
        '{"$t":"tuple"}',
        '{"$t":"tuple","v":[],"x":1}',
        '{"$t":1,"v":[]}',
        '{"$t":"tuple","v":"ab"}',
        '{"$t":"set","v":[[1]]}',
        '{"$t":"dict","v":[[[1],2]]}',
        '{"$t":"dict","v":["ab"]}',
        '{"$t":"dict","v":[[1,2,3]]}',
        '{"$t":"float","v":"1.5"}',
        '{"$t":"datetime","v":"yesterday"}',
        '{"$t":"date","v":5}',
        '{"$t":"time","v":"25:00"}',
        '{"$t":"timedelta","v":[1,2]}',
        '{"$t":"timedelta","v":[1e400,0,0]}',
        '{"$t":"timedelta","v":[999999999999,0,0]}',
        '{"$t":"timedelta","v":[true,0,0]}',
        '{"$t":"decimal","v":"abc"}',
        '{"$t":"bytes","v":"!!"}',
        '{"$t":"uuid","v":"1234"}',
        '{"\\u0024t":"nope","v":1}',
        "[" * 100_000,
    ],
)
def test_decode_garbage_raises_value_error(data: str | bytes) -> None:
    with pytest.raises(ValueError):
        JSON.decode(data)


@pytest.mark.parametrize("data", [None, 5, ["[]"]])
def test_decode_of_a_non_string_raises_value_error(data: Any) -> None:
    with pytest.raises(ValueError, match="expected str or bytes"):
        JSON.decode(data)


tags = st.sampled_from(
    [
        *("tuple", "set", "frozenset", "dict", "float", "datetime", "date", "time"),
        *("timedelta", "decimal", "bytes", "uuid", "other"),
    ]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(tags, json_values)
def test_decode_of_random_tagged_objects_returns_or_raises_value_error(
    tag: str, payload: Any
) -> None:
    data = json.dumps({"x": [{"$t": tag, "v": payload}]})
    with contextlib.suppress(ValueError):  # anything else fails the test
        JSON.decode(data)


@given(st.text() | st.binary())
def test_decode_of_random_data_returns_or_raises_value_error(data: str | bytes) -> None:
    with contextlib.suppress(ValueError):
        JSON.decode(data)


# --- PickleCodec ----------------------------------------------------------------------------


@settings(max_examples=100)
@given(values)
def test_pickle_round_trip(value: Any) -> None:
    encoded = PICKLE.encode(value)
    assert isinstance(encoded, bytes)
    assert same(PICKLE.decode(encoded), value)
    view: Any = memoryview(encoded)  # what some database drivers return for binary columns
    assert same(PICKLE.decode(view), value)


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def test_pickle_keeps_arbitrary_objects_identity_and_cycles() -> None:
    point = Point(3)
    value: dict[str, Any] = {"a": point, "b": point, "dd": defaultdict(list, {1: [2]})}
    value["self"] = value
    decoded = PICKLE.decode(PICKLE.encode(value))
    assert decoded["a"] is decoded["b"]
    assert decoded["a"].x == 3
    assert decoded["self"] is decoded
    assert type(decoded["dd"]) is defaultdict
    assert decoded["dd"][5] == []


def test_pickle_uses_protocol_5() -> None:
    assert PICKLE.encode({"a": 1})[:2] == b"\x80\x05"


def test_pickle_error_names_type_and_path() -> None:
    with pytest.raises(SerializationError) as info:
        PICKLE.encode({"cart": [1, 2, threading.Lock()]})
    assert info.value.path == "['cart'][2]"
    assert info.value.reason.startswith(f"{LOCK_NAME} is not serializable (TypeError: ")


def test_pickle_error_of_a_local_function() -> None:
    def local() -> None:
        pass

    with pytest.raises(SerializationError) as info:
        PICKLE.encode({"callback": (1, local)})
    assert info.value.path == "['callback'][1]"
    assert info.value.reason.startswith("function is not serializable")


class NoPickle:
    def __reduce__(self) -> Any:
        raise RuntimeError("nope")


def test_pickle_error_of_a_failing_reduce_with_a_cycle_around_it() -> None:
    value: list[Any] = []
    value.append(value)
    value.append({"x": NoPickle()})
    with pytest.raises(SerializationError) as info:
        PICKLE.encode(value)
    assert info.value.path == "[1]['x']"
    assert info.value.reason == "NoPickle is not serializable (RuntimeError: nope)"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\x80\x05K",
        pickle.dumps(Point(1)).replace(b"Point", b"Nopey"),
        pickle.dumps(Point(1)).replace(b"test_codec", b"missing_mod"),
        "text",
        None,
    ],
)
def test_pickle_decode_garbage_raises_value_error(data: Any) -> None:
    with pytest.raises(ValueError):
        PICKLE.decode(data)


# --- the protocol ---------------------------------------------------------------------------


@pytest.mark.parametrize(("codec", "name"), [(JSON, "json"), (PICKLE, "pickle")])
def test_codecs_follow_the_protocol(codec: Codec, name: str) -> None:
    assert isinstance(codec, Codec)
    assert codec.name == name
    assert not hasattr(codec, "__dict__")
    assert repr(codec) == f"{type(codec).__name__}()"


def test_an_object_without_decode_is_not_a_codec() -> None:
    class EncodeOnly:
        name = "x"

        def encode(self, value: Any) -> str:
            return ""

    assert not isinstance(EncodeOnly(), Codec)
