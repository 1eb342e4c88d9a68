"""What the codec tests store: an equality that also compares types, hypothesis strategies of
every supported value, and the bot's own classes (registered with :data:`OWN_TYPES`) nested in
all of them."""

from __future__ import annotations

import dataclasses
import datetime as dtm
import math
from collections import Counter, OrderedDict, defaultdict, deque
from decimal import Decimal
from enum import Enum, Flag, IntEnum
from typing import Any, NamedTuple

from hypothesis import strategies as st


def same(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are equal and of the same types all the way down, dicts in the
    same order, registered objects attribute by attribute."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Enum):
        return a is b
    if dataclasses.is_dataclass(a):
        return all(
            same(getattr(a, field.name), getattr(b, field.name)) for field in dataclasses.fields(a)
        )
    if isinstance(a, float):
        return repr(a) == repr(b)  # nan == nan, -0.0 != 0.0
    if isinstance(a, Decimal):
        return a.as_tuple() == Decimal(b).as_tuple()  # NaN, sNaN, and the exponent of 1.00
    if getattr(a, "__dict__", None) is not None and not same(vars(a), vars(b)):
        return False
    if isinstance(a, defaultdict) and a.default_factory is not b.default_factory:
        return False
    if isinstance(a, deque):
        return a.maxlen == b.maxlen and same(list(a), list(b))
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
    if getattr(a, "__dict__", None) is not None and not isinstance(a, int | str):
        return True  # a plain object: its __dict__ is compared above
    return bool(a == b)


# --- the bot's own classes -------------------------------------------------------------------


class Color(IntEnum):
    RED = 1
    GREEN = 2


class Mood(str, Enum):  # a StrEnum, as Python 3.10 can have it
    HAPPY = "happy"
    GRUMPY = "grumpy"


class Perm(Flag):
    READ = 1
    WRITE = 2


class Shape(Enum):
    DOT = (0, 0)
    LINE = (0, 1)


@dataclasses.dataclass(frozen=True)
class Point:
    """Frozen, hashable if its coordinates are."""

    x: Any
    y: Any = None


@dataclasses.dataclass
class Box:
    items: list[Any]
    label: str = "box"
    made: dtm.datetime | None = None
    tags: set[str] = dataclasses.field(default_factory=set)


class Pair(NamedTuple):
    first: Any
    second: Any = 0


class Bag(dict[Any, Any]):
    """A dict subclass with a method and, sometimes, an attribute."""

    def total(self) -> int:
        return len(self)


class Stack(list[Any]):
    pass


class Ticket:
    """A plain class whose state is its __dict__."""

    def __init__(self, number: int, owner: Any = None) -> None:
        self.number = number
        self.owner = owner


OWN_TYPES = [Color, Mood, Perm, Shape, Point, Box, Pair, Bag, Stack, Ticket]


def _bag(items: dict[Any, Any], note: Any) -> Bag:
    bag = Bag(items)
    if note is not None:
        bag.note = note  # type: ignore[attr-defined]
    return bag


# --- strategies -------------------------------------------------------------------------------

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

members = st.sampled_from([*Color, *Mood, *Perm, Perm.READ | Perm.WRITE, *Shape])
own_hashables = st.recursive(
    hashable_atoms | members,
    lambda inner: (
        st.lists(inner, max_size=3).map(tuple)
        | st.frozensets(inner, max_size=3)
        | st.builds(Point, inner, inner)
        | st.builds(Pair, inner, inner)
    ),
    max_leaves=6,
)
own_keys = keys | own_hashables
factories = st.sampled_from([None, int, list, dict, set, str, Box, Stack])


def _own_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Every container, built-in or registered, around ``inner``."""
    return (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(tuple)
        | st.sets(own_hashables, max_size=3)
        | st.frozensets(own_hashables, max_size=3)
        | st.dictionaries(own_keys, inner, max_size=3)
        | st.builds(Box, st.lists(inner, max_size=3), st.text(max_size=5))
        | st.builds(Point, inner, inner)
        | st.builds(Pair, inner, inner)
        | st.builds(_bag, st.dictionaries(own_keys, inner, max_size=3), st.none() | inner)
        | st.builds(Stack, st.lists(inner, max_size=3))
        | st.builds(Ticket, st.integers(), inner)
        | st.builds(defaultdict, factories, st.dictionaries(own_keys, inner, max_size=3))
        | st.builds(OrderedDict, st.dictionaries(own_keys, inner, max_size=3))
        | st.builds(Counter, st.dictionaries(own_hashables, st.integers(), max_size=3))
        | st.builds(deque, st.lists(inner, max_size=3), st.none() | st.just(5))
    )


own_values = st.recursive(atoms | members, _own_containers, max_leaves=20)
