"""Tests of the value codecs: exact round trips (type by type), the stored JSON format, error
paths, circular references, determinism, and decoding of garbage."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dtm
import importlib.util
import json
import math
import pickle
import sys
import threading
import uuid
from collections import Counter, OrderedDict, defaultdict, deque
from decimal import Decimal
from typing import Any

import pytest
from _values import (
    OWN_TYPES,
    Bag,
    Box,
    Color,
    Mood,
    Pair,
    Shape,
    Ticket,
    hashables,
    own_values,
    same,
    values,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from telegram import Bot, Chat, InlineKeyboardButton, InlineKeyboardMarkup, Message, User
from telegram.ext import ContextTypes

from ptb_sessions._codec import Codec, JSONCodec, PickleCodec, bind_codec, storable_state
from ptb_sessions._errors import SerializationError
from ptb_sessions._types import SUPPORTED_KINDS

JSON = JSONCodec()
PICKLE = PickleCodec()
LOCK_NAME = type(threading.Lock()).__name__


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


@settings(max_examples=400, deadline=None)
@given(values)
def test_json_round_trip_keeps_values_and_types(value: Any) -> None:
    encoded = JSON.encode(value)
    assert isinstance(encoded, str)
    assert same(JSON.decode(encoded), value)
    assert same(JSON.decode(encoded.encode("utf-8")), value)


@settings(max_examples=200, deadline=None)
@given(values)
def test_json_output_is_strict_json_and_reencodes_identically(value: Any) -> None:
    encoded = JSON.encode(value)
    strict_json(encoded)
    assert JSON.encode(JSON.decode(encoded)) == encoded


@settings(deadline=None)
@given(plain_values)
def test_plain_values_are_stored_as_plain_json(value: Any) -> None:
    encoded = JSON.encode(value)
    assert same(strict_json(encoded), value)
    # compact, and not a character escaped that need not be (floats may be spelled shorter)
    assert len(encoded) <= len(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


#: What orjson (the codec's fast path) does not read or write as the standard library does:
#: integers beyond 64 bits (it reads them as floats), lone surrogates, NaN and infinities.
#: Nesting deeper than orjson's limit: test_deeply_nested_values_round_trip.
ORJSON_EDGES = [
    {"n": 2**64, "m": -(2**63) - 1, "l": [10**30, -(10**19)], "s": "x"},
    {"id": 12345678901234567890123, "phone": "+4912345678901234567890"},
    {"text": "\ud83d", "ok": "🍕"},
    [math.nan, math.inf, 1e-07, 1e16, 123456789.12345679],
]


@pytest.mark.parametrize("value", ORJSON_EDGES)
def test_values_orjson_reads_otherwise_round_trip_exactly(value: Any) -> None:
    assert same(JSON.decode(JSON.encode(value)), value)


@pytest.mark.parametrize(
    "text", ['{"n":18446744073709551616}', "[-10000000000000000000]", '{"a":NaN}', '["\\ud800"]']
)
def test_json_that_orjson_reads_otherwise_decodes_as_the_standard_library_does(
    text: str,
) -> None:
    assert same(JSON.decode(text), json.loads(text))


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


@settings(deadline=None)
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
    assert error.reason == "Thing is not serializable; register it: JSONCodec(types=[Thing])"


def test_error_in_a_dict_key_names_the_key() -> None:
    error = _encode_error({"d": {(1, Thing()): 1}})
    assert error.path == "['d']"
    assert error.reason.startswith("key (1, <")
    assert error.reason.endswith(
        "cannot be encoded: Thing is not serializable; register it: JSONCodec(types=[Thing])"
    )


class Stamp(tuple[int, int]):
    """A tuple subclass that is not a named tuple: it cannot be registered."""


class Ordered(OrderedDict[str, int]):
    """An OrderedDict subclass: its order lives outside its __dict__, so it cannot be
    registered."""


@pytest.mark.parametrize(
    ("value", "base"),
    [
        (Stamp((1, 2)), "tuple"),
        (Ordered(), "dict"),
        (bytearray(b"x"), None),
    ],
)
def test_unregistrable_subclasses_are_rejected_with_a_hint(value: Any, base: str | None) -> None:
    error = _encode_error({"x": value})
    assert error.path == "['x']"
    assert error.reason.startswith(f"{type(value).__name__} is not serializable")
    assert "register" not in error.reason
    if base is None:
        assert "subclass" not in error.reason
    else:
        assert f"a subclass of {base}: convert it to {base}, or use PickleCodec" in error.reason


@pytest.mark.parametrize("value", [Color.RED, Thing()])
def test_unregistered_classes_are_rejected_with_the_fix(value: Any) -> None:
    error = _encode_error({"x": value})
    name = type(value).__name__
    assert error.path == "['x']"
    assert error.reason == f"{name} is not serializable; register it: JSONCodec(types=[{name}])"


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
        *("timedelta", "decimal", "bytes", "uuid", "other", "ordereddict", "counter"),
        *("deque", "defaultdict", "telegram.Message", "telegram.User", "Box", "Color"),
        *("Bag", "Ticket", "Pair"),
    ]
)
FUZZED = JSONCodec(types={"Box": Box, "Color": Color, "Bag": Bag, "Ticket": Ticket, "Pair": Pair})
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@settings(deadline=None)
@given(tags, json_values, st.none() | json_values)
def test_decode_of_random_tagged_objects_returns_or_raises_value_error(
    tag: str, payload: Any, attrs: Any
) -> None:
    tagged = (
        {"$t": tag, "v": payload} if attrs is None else {"$t": tag, "v": payload, "attrs": attrs}
    )
    data = json.dumps({"x": [tagged]})
    with contextlib.suppress(ValueError):  # anything else fails the test
        FUZZED.decode(data)


@settings(deadline=None)
@given(st.text() | st.binary())
def test_decode_of_random_data_returns_or_raises_value_error(data: str | bytes) -> None:
    with contextlib.suppress(ValueError):
        JSON.decode(data)


# --- JSONCodec: your own types ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(own_values)
def test_own_types_round_trip_exactly_nested_in_every_type(value: Any) -> None:
    codec = JSONCodec(types=OWN_TYPES)
    encoded = codec.encode(value)
    strict_json(encoded)
    assert same(codec.decode(encoded), value)
    assert codec.encode(codec.decode(encoded)) == encoded


@dataclasses.dataclass
class Choice:
    item: int


ALIASED = JSONCodec(types={"Choice": Choice, "Color": Color, "Bag": Bag, "Ticket": Ticket})


def _with_note(bag: Bag, note: Any) -> Bag:
    bag.note = note  # type: ignore[attr-defined]
    return bag


def _ticket(number: int) -> Ticket:
    return Ticket(number, owner=(1, 2))


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        (Choice(item=3), '{"$t":"Choice","v":{"item":3}}'),
        ([Color.GREEN], '[{"$t":"Color","v":2}]'),
        (Bag(a=1), '{"$t":"Bag","v":{"a":1}}'),
        (Bag({1: 2}), '{"$t":"Bag","v":{"$t":"dict","v":[[1,2]]}}'),
        (_with_note(Bag(a=1), "x"), '{"$t":"Bag","v":{"a":1},"attrs":{"note":"x"}}'),
        (_ticket(7), '{"$t":"Ticket","v":{"number":7,"owner":{"$t":"tuple","v":[1,2]}}}'),
        (
            defaultdict(int, {"a": 1}),
            '{"$t":"defaultdict","v":{"factory":"int","items":{"a":1}}}',
        ),
        (defaultdict(Choice), '{"$t":"defaultdict","v":{"factory":"Choice","items":{}}}'),
        (
            defaultdict(None, {1: 2}),
            '{"$t":"defaultdict","v":{"factory":null,"items":{"$t":"dict","v":[[1,2]]}}}',
        ),
        (OrderedDict(b=1, a=2), '{"$t":"ordereddict","v":{"b":1,"a":2}}'),
        (Counter("aab"), '{"$t":"counter","v":{"a":2,"b":1}}'),
        (deque([1, 2]), '{"$t":"deque","v":{"items":[1,2],"maxlen":null}}'),
        (deque([1], maxlen=3), '{"$t":"deque","v":{"items":[1],"maxlen":3}}'),
    ],
)
def test_stored_format_of_own_types(value: Any, stored: str) -> None:
    assert ALIASED.encode(value) == stored
    assert same(ALIASED.decode(stored), value)


def test_a_class_is_stored_under_its_module_and_qualified_name_by_default() -> None:
    codec = JSONCodec(types=[Choice])
    assert codec.types == {"test_codec.Choice": Choice}
    assert codec.encode(Choice(1)) == '{"$t":"test_codec.Choice","v":{"item":1}}'
    assert repr(codec) == "JSONCodec(types=['test_codec.Choice'])"


def test_an_alias_lets_a_class_move_between_modules() -> None:
    stored = JSONCodec(types={"Choice": Choice}).encode(Choice(4))

    @dataclasses.dataclass
    class Moved:
        item: int

    assert JSONCodec(types={"Choice": Moved}).decode(stored) == Moved(4)


def test_registered_objects_are_restored_without_calling_init() -> None:
    calls: list[str] = []

    class Counted:
        def __init__(self) -> None:
            calls.append("init")
            self.n = 1

    @dataclasses.dataclass(frozen=True)
    class Checked:
        n: int

        def __post_init__(self) -> None:
            calls.append("post_init")

    codec = JSONCodec(types=[Counted, Checked])
    stored = codec.encode([Counted(), Checked(2)])
    calls.clear()
    counted, checked = codec.decode(stored)
    assert calls == []
    assert type(counted) is Counted and counted.n == 1
    assert checked == Checked(2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.n = 3  # type: ignore[misc]


def test_a_dataclass_field_missing_in_stored_data_takes_its_default() -> None:
    stored = '{"$t":"Box","v":{"items":[1]}}'
    box = JSONCodec(types={"Box": Box}).decode(stored)
    assert same(box, Box([1], "box", None, set()))


@pytest.mark.parametrize(
    ("stored", "message"),
    [
        ('{"$t":"Box","v":{"label":"x"}}', "the field 'items' is missing and has no default"),
        ('{"$t":"Box","v":{"items":[],"gone":1}}', "['gone'] are not fields of Box"),
        ('{"$t":"Box","v":[1]}', "expected a JSON dict"),
        ('{"$t":"Box","v":{"items":[]},"attrs":{}}', "has no 'attrs'"),
        ('{"$t":"Color","v":9}', "9 is not a valid Color"),
        ('{"$t":"Pair","v":{"third":1}}', "third"),
        ('{"$t":"Bag","v":{},"attrs":[]}', "malformed tagged object"),
        ('{"$t":"Bag","v":{},"x":{}}', "malformed tagged object"),
        ('{"$t":"defaultdict","v":{"factory":"eval","items":{}}}', "'eval' is not registered"),
        ('{"$t":"defaultdict","v":{"factory":"int"}}', "items"),
        ('{"$t":"deque","v":{"items":[],"maxlen":"x"}}', "maxlen"),
        ('{"$t":"telegram.Message","v":[1]}', "expected a JSON dict"),
    ],
)
def test_stored_data_that_does_not_fit_its_class_is_a_value_error(
    stored: str, message: str
) -> None:
    codec = JSONCodec(types={"Box": Box, "Color": Color, "Pair": Pair, "Bag": Bag})
    with pytest.raises(ValueError) as info:
        codec.decode(stored)
    assert message in str(info.value)


class Trap:
    """Records every way it could be brought to life."""

    calls: list[str] = []

    def __new__(cls, *args: Any, **kwargs: Any) -> Trap:
        Trap.calls.append("new")
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Trap.calls.append("init")

    def __setstate__(self, state: Any) -> None:
        Trap.calls.append("setstate")


@pytest.mark.parametrize(
    "name", ["os.system", "subprocess.Popen", "builtins.eval", "test_codec.Trap", "Trap"]
)
def test_a_stored_name_that_is_not_registered_runs_nothing(name: str) -> None:
    Trap.calls.clear()
    stored = json.dumps({"x": {"$t": name, "v": {"args": ["touch /tmp/pwned"]}}})
    with pytest.raises(ValueError) as info:
        JSON.decode(stored)
    assert f"the stored type {name!r} is not registered" in str(info.value)
    assert Trap.calls == []


def test_registered_objects_name_their_attributes_in_error_paths() -> None:
    codec = JSONCodec(types=[Box, Bag, Ticket, Pair])
    cases = {
        "['b'].items[1]": {"b": Box([1, Thing()])},
        "[0][2]": [Bag({2: Thing()})],
        ".note": _with_note(Bag(), Thing()),
        ".owner.second": Ticket(1, Pair(1, Thing())),
    }
    for path, value in cases.items():
        with pytest.raises(SerializationError) as info:
            codec.encode(value)
        assert info.value.path == path, value
        assert info.value.reason.startswith("Thing is not serializable; register it")


def test_a_registered_object_that_contains_itself_is_a_circular_reference() -> None:
    ticket = Ticket(1)
    ticket.owner = [ticket]
    with pytest.raises(SerializationError) as info:
        JSONCodec(types=[Ticket]).encode({"t": ticket})
    assert info.value.path == "['t'].owner[0]"
    assert "circular reference" in info.value.reason


@pytest.mark.parametrize(
    ("value", "path", "reason"),
    [
        (defaultdict(lambda: 0), "", "the default_factory <function"),
        ({"d": defaultdict(Thing)}, "['d']", "the default_factory <class"),
    ],
)
def test_a_defaultdict_factory_that_is_neither_built_in_nor_registered_is_refused(
    value: Any, path: str, reason: str
) -> None:
    error = _encode_error(value)
    assert error.path == path
    assert error.reason.startswith(reason)
    assert "use a built-in type (int, list, dict, set...) or a registered class" in error.reason


def test_a_decoded_defaultdict_keeps_its_factory() -> None:
    clicks = JSON.decode(JSON.encode(defaultdict(int, {5: 2})))
    clicks[6] += 1
    assert clicks == {5: 2, 6: 1}
    boxes = JSONCodec(types=[Box]).decode(JSONCodec(types=[Box]).encode(defaultdict(Box)))
    assert type(boxes) is defaultdict and boxes.default_factory is Box


class Slotted:
    __slots__ = ("x",)


class Error(Exception):
    pass


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (dict, "dict is stored without registration"),
        (defaultdict, "defaultdict is stored without registration"),
        (dtm.datetime, "datetime is stored without registration"),
        (Message, "Message is a python-telegram-bot object"),
        (Bot, "Bot is a python-telegram-bot object"),
        (Slotted, "Slotted cannot be registered: it is not a dataclass"),
        (Error, "Error cannot be registered"),
        (Stamp, "Stamp cannot be registered"),
        (Ordered, "Ordered cannot be registered"),
        (threading.Thread().__class__.__mro__[-1], "object cannot be registered"),
        (len, "is not a class"),
        ("Choice", "'Choice' is not a class"),
    ],
)
def test_registering_an_unsupported_class_is_a_type_error(cls: Any, reason: str) -> None:
    with pytest.raises(TypeError) as info:
        JSONCodec(types=[cls])
    assert reason in str(info.value)
    if "cannot be registered" in reason:
        assert str(info.value).endswith(f"it is not {SUPPORTED_KINDS}")


@pytest.mark.parametrize(
    ("types", "message"),
    [
        ([Choice, Choice], "Choice is registered twice"),
        ({"a": Choice, "b": Choice}, "Choice is registered twice, as 'a' and 'b'"),
        ({"x": Choice, "y": Box, "z": Choice}, "registered twice"),
        ({"tuple": Choice}, "the name 'tuple' of Choice is taken by a built-in type"),
        ({"int": Choice}, "is taken by a built-in type"),
        ({"telegram.Choice": Choice}, "is taken by a built-in type"),
        ({"": Choice}, "must be a non-empty str"),
        ({5: Choice}, "must be a non-empty str"),
    ],
)
def test_registering_a_class_or_name_twice_is_a_value_error(types: Any, message: str) -> None:
    with pytest.raises(ValueError) as info:
        JSONCodec(types=types)
    assert message in str(info.value)


def test_two_classes_with_one_name_are_a_value_error() -> None:
    def make() -> type:
        @dataclasses.dataclass
        class Twin:
            n: int

        return Twin

    with pytest.raises(ValueError, match="is given to two classes"):
        JSONCodec(types=[make(), make()])
    with pytest.raises(ValueError, match="the name 'Twin' is given to two classes"):
        codec = JSONCodec(types={"Twin": make()})
        codec.add_types({"Twin": make()})
    assert list(codec.types) == ["Twin"], "a refused add_types registers nothing"


@pytest.mark.skipif(importlib.util.find_spec("pydantic") is None, reason="pydantic not installed")
def test_pydantic_models_round_trip() -> None:
    import pydantic

    class Item(pydantic.BaseModel):
        name: str
        at: dtm.datetime
        sizes: tuple[int, ...] = ()

    class Order(pydantic.BaseModel):
        items: list[Item]
        note: str | None = None

    codec = JSONCodec(types={"Order": Order})
    order = Order(items=[Item(name="pizza", at=dtm.datetime(2026, 1, 2, 3), sizes=(1, 2))])
    stored = codec.encode({"order": order})
    assert stored.startswith('{"order":{"$t":"Order","v":{"items":[{"name":"pizza"')
    back = codec.decode(stored)["order"]
    assert type(back) is Order and back == order
    assert type(back.items[0]) is Item and back.items[0].sizes == (1, 2)


# --- JSONCodec: python-telegram-bot objects ---------------------------------------------------


def _message() -> Message:
    return Message(
        message_id=3,
        date=dtm.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dtm.timezone.utc),
        chat=Chat(id=5, type=Chat.PRIVATE),
        from_user=User(id=5, first_name="Zoë", is_bot=False),
        text="hi",
        reply_markup=InlineKeyboardMarkup([[InlineKeyboardButton("x", callback_data="y")]]),
    )


def test_telegram_objects_round_trip_through_to_dict_and_de_json() -> None:
    message = _message()
    stored = JSON.encode({"last": message, "who": message.from_user})
    assert '{"last":{"$t":"telegram.Message","v":{' in stored
    assert '"who":{"$t":"telegram.User","v":{"first_name":"Zoë","id":5,"is_bot":false}}' in stored
    back = JSON.decode(stored)
    assert type(back["last"]) is Message and type(back["who"]) is User
    assert back["last"].to_dict() == message.to_dict()
    assert back["last"].chat.type is Chat.PRIVATE
    assert back["last"].reply_markup == message.reply_markup
    with pytest.raises(RuntimeError, match="no bot"):
        back["last"].get_bot()


def test_decoded_telegram_objects_get_the_bound_bot() -> None:
    bot = Bot("123:abc")
    codec = JSONCodec()
    stored = codec.encode([_message()])
    codec.bind_bot(bot)
    (message,) = codec.decode(stored)
    assert message.get_bot() is bot
    assert message.chat.get_bot() is bot
    assert message.from_user.get_bot() is bot


# --- conversation states and context types -------------------------------------------------------


@pytest.mark.parametrize(
    ("codec", "state", "stored"),
    [
        (JSON, Color.RED, 1),
        (JSON, Mood.HAPPY, "happy"),
        (JSONCodec(types=[Color]), Color.RED, Color.RED),
        (PICKLE, Color.RED, Color.RED),
        (JSON, 2, 2),
        (JSON, "x", "x"),
        (JSON, True, True),
        (JSON, Shape.DOT, Shape.DOT),  # not an int or a str: refused when it is written
        (JSON, (1, 2), (1, 2)),
    ],
)
def test_conversation_states_are_stored_exactly_or_as_their_plain_value(
    codec: Codec, state: object, stored: object
) -> None:
    result = storable_state(codec, state)
    assert type(result) is type(stored) and result == stored


def test_bind_codec_registers_the_context_types_classes_and_sets_the_bot() -> None:
    bot = Bot("123:abc")
    codec = JSONCodec(types={"MyBag": Bag})
    context_types = ContextTypes(chat_data=Ticket, user_data=Bag, bot_data=dict)
    bind_codec(codec, bot, context_types)
    bind_codec(codec, bot, context_types)  # again: nothing registered twice
    assert codec.types == {"MyBag": Bag, "_values.Ticket": Ticket}
    (message,) = codec.decode(codec.encode([_message()]))
    assert message.get_bot() is bot

    pickle_codec = PickleCodec()
    bind_codec(pickle_codec, bot, context_types)
    assert pickle_codec.decode(pickle_codec.encode(_message())).get_bot() is bot


def test_bind_codec_skips_classes_that_cannot_be_registered() -> None:
    codec = JSONCodec()
    bind_codec(codec, None, ContextTypes(chat_data=Slotted, user_data=defaultdict))
    assert codec.types == {}


# --- PickleCodec ----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
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


def test_pickle_sets_the_bound_bot_on_telegram_objects() -> None:
    bot = Bot("123:abc")
    message = _message()
    message.set_bot(Bot("456:def"))  # another bot: replaced by the unpickling codec's
    codec = PickleCodec()
    stored = codec.encode({"m": message, "bot": message.get_bot()})
    assert b"456:def" not in stored, "a bot (and its token) is never pickled"
    codec.bind_bot(bot)
    back = codec.decode(stored)
    assert back["m"] == message and back["m"].text == "hi"
    assert back["m"].get_bot() is bot
    assert back["m"].from_user.get_bot() is bot
    assert back["bot"] is bot


def test_pickle_without_a_bound_bot_gives_telegram_objects_none() -> None:
    back = PICKLE.decode(PICKLE.encode(_message()))
    with pytest.raises(RuntimeError, match="no bot"):
        back.get_bot()


def test_pickle_decodes_rows_written_before_the_bot_was_kept() -> None:
    codec = PickleCodec()
    codec.bind_bot(Bot("123:abc"))
    assert codec.decode(pickle.dumps({"m": _message()}, protocol=5))["m"].text == "hi"


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
