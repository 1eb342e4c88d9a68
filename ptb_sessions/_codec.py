"""Value codecs: how a stored value becomes the text (or bytes) of a database row and back.

:class:`JSONCodec` (the default) writes plain JSON for plain values and a small tagged object for
every other supported type (the bot's own registered classes and python-telegram-bot's objects
included), so stored rows stay readable in SQL. :class:`PickleCodec` stores any picklable
object, at the price of trusting the database.
"""

from __future__ import annotations

import base64
import datetime as dtm
import io
import json
import math
import pickle
import re
import uuid
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, runtime_checkable

import orjson
from telegram import Bot, TelegramObject

from ptb_sessions._errors import SerializationError
from ptb_sessions._types import TELEGRAM_TYPES, Kind, RegisteredType, TypeRegistry, is_registrable

if TYPE_CHECKING:
    from telegram.ext import ContextTypes

__all__ = ["Codec", "JSONCodec", "PickleCodec", "bind_codec", "storable_state"]


@runtime_checkable
class Codec(Protocol):
    """How values are turned into the data of a stored row and back.

    Pass an instance as ``codec`` to :class:`~ptb_sessions.SQLAlchemyPersistence`. Its
    :attr:`name` is stored next to every row, so rows keep decoding with the codec that wrote them.

    Attributes:
        name (:obj:`str`): A short identifier of the format, at most 16 characters, e.g.
            ``"json"``.
    """

    @property
    def name(self) -> str: ...

    def encode(self, value: Any) -> str | bytes:
        """Encode ``value``.

        Raises:
            ptb_sessions.SerializationError: ``value`` (or something inside it) cannot be
                encoded; :attr:`~ptb_sessions.SerializationError.path` says where it sits.
        """

    def decode(self, data: str | bytes) -> Any:
        """Decode what :meth:`encode` returned.

        Raises:
            ValueError: ``data`` is malformed. No other exception may escape: callers turn it
                into a :class:`~ptb_sessions.StorageError` naming the namespace and key.
        """


_TAG: Final = "$t"
"""The key that marks a tagged object: ``{"$t": <tag name>, "v": <payload>}``."""
_ATTRS: Final = "attrs"
"""The optional third key of a registered dict, list, int or str subclass: its ``__dict__``."""
_ATOMS: Final = frozenset((str, int, bool, type(None)))
_NONFINITE: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_JSON: Final = json.JSONEncoder(
    ensure_ascii=False, check_circular=False, allow_nan=False, separators=(",", ":")
)
#: A run of digits this long may be an integer beyond 64 bits, which orjson reads as a float.
_LONG_DIGITS: Final = re.compile(r"\d{19}")
_PLAIN_DEPTH: Final = 64
_CIRCULAR: Final = "circular reference (the value contains itself)"
_IN_KEY: Final = object()  # the culprit of a dict key that cannot be encoded: the path ends there


class _Unencodable(Exception):
    """Raised inside :class:`_Encoder` and completed into a :class:`SerializationError` by
    :meth:`JSONCodec.encode`. Each enclosing container adds its subscript to :attr:`parts` while
    the exception passes, so the path costs nothing unless encoding fails."""

    __slots__ = ("culprit", "parts", "reason")

    def __init__(self, reason: str, culprit: object) -> None:
        super().__init__(reason)
        self.reason = reason
        self.culprit = culprit  # the object that failed at the level below the current one
        self.parts: list[str] = []


_SUBCLASSABLE: Final = (
    *(dict, list, tuple, set, frozenset, str, int, float, bytes, Decimal, uuid.UUID),
    *(dtm.datetime, dtm.date, dtm.time, dtm.timedelta),
)


def _not_serializable(value: object) -> str:
    cls = type(value)
    name = cls.__name__
    if is_registrable(cls):
        return f"{name} is not serializable; register it: JSONCodec(types=[{name}])"
    for base in _SUBCLASSABLE:
        if isinstance(value, base):
            return (
                f"{name} is not serializable (a subclass of {base.__name__}: convert it to "
                f"{base.__name__}, or use PickleCodec)"
            )
    return f"{name} is not serializable"


def _tagged(tag: str, payload: Any) -> dict[str, Any]:
    return {_TAG: tag, "v": payload}


def _encode_float(value: float) -> Any:
    return value if math.isfinite(value) else _tagged("float", repr(value))


_LEAVES: Final[dict[type, tuple[str, Callable[[Any], Any]]]] = {
    dtm.datetime: ("datetime", dtm.datetime.isoformat),
    dtm.date: ("date", dtm.date.isoformat),
    dtm.time: ("time", dtm.time.isoformat),
    dtm.timedelta: ("timedelta", lambda delta: [delta.days, delta.seconds, delta.microseconds]),
    Decimal: ("decimal", str),
    bytes: ("bytes", lambda data: base64.b64encode(data).decode("ascii")),
    uuid.UUID: ("uuid", str),
}
#: The built-in ``default_factory`` values of a defaultdict, by the name they are stored under.
_FACTORIES: Final[dict[str, type]] = {
    **{kind.__name__: kind for kind in (int, float, str, bool, bytes, list, dict, set)},
    **{kind.__name__: kind for kind in (frozenset, tuple, deque, defaultdict)},
    **{"decimal": Decimal, "ordereddict": OrderedDict, "counter": Counter},
}
_FACTORY_NAMES: Final = {kind: name for name, kind in _FACTORIES.items()}
_TELEGRAM_NAMES: Final = {cls: name for name, cls in TELEGRAM_TYPES.items()}


def _dumps(tree: Any) -> str:
    """The JSON text of a tree of plain JSON values. orjson writes it (as the standard library
    would, but for the spelling of some floats: ``1e-7``, not ``1e-07``), ten times faster;
    what orjson refuses (an integer beyond 64 bits, a lone surrogate, deep nesting) goes to the
    standard library, so this codec's errors for it stay the same."""
    try:
        return orjson.dumps(tree).decode()
    except orjson.JSONEncodeError:
        return _JSON.encode(tree)


def _loads(text: str) -> Any:
    """:func:`json.loads` of JSON text, through orjson where that gives the same values: not
    for an integer beyond 64 bits (orjson makes a float of it), nor for what orjson refuses
    (``NaN``, a lone surrogate)."""
    if _LONG_DIGITS.search(text) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # the standard library accepts it, or raises its own error
    return json.loads(text)


def _is_plain(value: Any, depth: int) -> bool:
    """Whether ``value`` is plain JSON already, so :class:`_Encoder` has nothing to change.
    Cheaper than encoding; too deep a value (maybe a circular one) counts as not plain."""
    cls = type(value)
    if cls is dict:
        if _TAG in value or depth > _PLAIN_DEPTH:
            return False
        for key, item in value.items():
            if type(key) is not str or not (type(item) in _ATOMS or _is_plain(item, depth + 1)):
                return False
        return True
    if cls is list:
        if depth > _PLAIN_DEPTH:
            return False
        for item in value:  # noqa: SIM110 - a loop is faster than all() over a generator
            if not (type(item) in _ATOMS or _is_plain(item, depth + 1)):
                return False
        return True
    return cls in _ATOMS or (cls is float and math.isfinite(value))


class _Encoder:
    """One run of :meth:`JSONCodec.encode`: turns a value into a tree of plain JSON values,
    tagging every other supported type.

    ``active`` holds the ids of the containers being encoded, so a value that contains itself
    is found; ``types`` are the registered classes.
    """

    __slots__ = ("active", "types")

    def __init__(self, types: Mapping[type, RegisteredType]) -> None:
        self.types = types
        self.active: set[int] = set()

    def encode(self, value: Any) -> Any:
        cls = type(value)
        if cls in _ATOMS:
            return value
        if cls is dict:
            return self.encode_dict(value)
        if cls is list:
            return self.encode_sequence(value)
        if cls is float:
            return _encode_float(value)
        if cls is tuple:
            return _tagged("tuple", self.encode_sequence(value))
        if cls is set or cls is frozenset:
            return _tagged(cls.__name__, self.encode_members(value))
        leaf = _LEAVES.get(cls)
        if leaf is not None:
            return _tagged(leaf[0], leaf[1](value))
        return self.encode_other(value, cls)

    def encode_other(self, value: Any, cls: type) -> Any:
        """A registered class, a collection of :mod:`collections` or a TelegramObject."""
        registered = self.types.get(cls)
        if registered is not None:
            return self.encode_registered(value, registered)
        if cls is defaultdict:
            return _tagged("defaultdict", self.encode_defaultdict(value))
        if cls is OrderedDict or cls is Counter:
            return _tagged(cls.__name__.lower(), self.encode_dict(value))
        if cls is deque:
            return _tagged("deque", {"items": self.encode_sequence(value), "maxlen": value.maxlen})
        telegram_name = _TELEGRAM_NAMES.get(cls)
        if telegram_name is not None:
            # to_json(), not to_dict(): the latter keeps PTB's enums and other non-JSON types
            return _tagged(telegram_name, self.encode(json.loads(value.to_json())))
        raise _Unencodable(_not_serializable(value), value)

    def enter(self, value: object) -> None:
        if id(value) in self.active:
            raise _Unencodable(_CIRCULAR, value)
        self.active.add(id(value))

    def items(self, value: Iterable[Any]) -> list[Any]:
        return [item if type(item) in _ATOMS else self.encode(item) for item in value]

    def encode_dict(self, value: dict[Any, Any], *, entered: bool = False) -> Any:
        """The items of ``value``: a JSON object if every key is a :obj:`str` (and not the tag
        key), else a tagged ``"dict"`` of pairs. ``entered``: the caller holds ``value`` in
        :attr:`active` already (a registered dict subclass)."""
        if not entered:
            self.enter(value)
        try:
            result: Any = {}
            if _TAG not in value:
                for key, item in value.items():
                    if type(key) is not str:
                        break
                    result[key] = item if type(item) in _ATOMS else self.encode(item)
                else:
                    self.active.discard(id(value))
                    return result
            result = _tagged("dict", self.pairs(value))
        except _Unencodable as exc:
            if exc.culprit is not _IN_KEY:
                key = next(key for key, item in value.items() if item is exc.culprit)
                exc.parts.append(f"[{key!r}]")
            exc.culprit = value
            raise
        self.active.discard(id(value))
        return result

    def pairs(self, value: dict[Any, Any]) -> list[list[Any]]:
        pairs = []
        for key, item in value.items():
            try:
                encoded_key = self.encode(key)
            except _Unencodable as exc:
                raise _Unencodable(
                    f"key {key!r} cannot be encoded: {exc.reason}", _IN_KEY
                ) from None
            pairs.append([encoded_key, self.encode(item)])
        return pairs

    def encode_sequence(self, value: Iterable[Any], *, entered: bool = False) -> list[Any]:
        if not entered:
            self.enter(value)
        try:
            result = self.items(value)
        except _Unencodable as exc:
            index = next(index for index, item in enumerate(value) if item is exc.culprit)
            exc.parts.append(f"[{index}]")
            exc.culprit = value
            raise
        self.active.discard(id(value))
        return result

    def encode_members(self, value: set[Any] | frozenset[Any]) -> list[Any]:
        try:
            members = self.items(value)
        except _Unencodable as exc:
            exc.parts.append(f"{{<{type(exc.culprit).__name__}>}}")
            exc.culprit = value
            raise
        return sorted(members, key=_JSON.encode)  # equal sets encode equally

    def encode_attrs(self, state: dict[str, Any]) -> Any:
        """An object's attributes as a JSON object; a failure names the attribute (``.name``)."""
        if _TAG in state or not all(type(name) is str for name in state):
            return self.encode_dict(state)
        result = {}
        for name, item in state.items():
            try:
                result[name] = item if type(item) in _ATOMS else self.encode(item)
            except _Unencodable as exc:
                exc.parts.append(f".{name}")
                raise
        return result

    def encode_registered(self, value: Any, registered: RegisteredType) -> dict[str, Any]:
        self.enter(value)
        try:
            kind = registered.kind
            if kind is Kind.ENUM:
                result = _tagged(
                    registered.name, self.encode_attrs({"value": value.value})["value"]
                )
            elif kind in _WITH_ITEMS:
                state = registered.state(value)
                attrs = self.encode_attrs(state) if state else None  # while value is active
                result = _tagged(registered.name, self.encode_items(value, kind))
                if attrs is not None:
                    result[_ATTRS] = attrs
            else:
                result = _tagged(registered.name, self.encode_attrs(registered.state(value)))
        except _Unencodable as exc:
            exc.culprit = value
            raise
        self.active.discard(id(value))
        return result

    def encode_items(self, value: Any, kind: Kind) -> Any:
        """The content of a registered dict, list, int or str subclass, as its base type."""
        if kind is Kind.DICT:
            return self.encode_dict(value, entered=True)
        if kind is Kind.LIST:
            return self.encode_sequence(value, entered=True)
        return int.__int__(value) if kind is Kind.INT else str.__str__(value)

    def encode_defaultdict(self, value: defaultdict[Any, Any]) -> dict[str, Any]:
        factory = value.default_factory
        if factory is None:
            name = None
        elif isinstance(factory, type) and factory in _FACTORY_NAMES:
            name = _FACTORY_NAMES[factory]
        elif isinstance(factory, type) and factory in self.types:
            name = self.types[factory].name
        else:
            raise _Unencodable(
                f"the default_factory {factory!r} of a defaultdict is not serializable: use a "
                f"built-in type (int, list, dict, set...) or a registered class",
                value,
            )
        return {"factory": name, "items": self.encode_dict(value)}


_WITH_ITEMS: Final = frozenset((Kind.DICT, Kind.LIST, Kind.INT, Kind.STR))


def _payload(payload: Any, kind: type) -> Any:
    if type(payload) is not kind:
        raise ValueError(f"expected a JSON {kind.__name__}, got {payload!r}")
    return payload


def _decode_pairs(payload: Any) -> dict[Any, Any]:
    for pair in _payload(payload, list):
        if type(pair) is not list or len(pair) != 2:
            raise ValueError(f"expected a [key, value] pair, got {pair!r}")
    return dict(payload)


def _decode_timedelta(payload: Any) -> dtm.timedelta:
    days, seconds, microseconds = _payload(payload, list)
    if not all(type(part) is int for part in payload):
        raise ValueError(f"expected [days, seconds, microseconds], got {payload!r}")
    return dtm.timedelta(days=days, seconds=seconds, microseconds=microseconds)


def _decode_deque(payload: Any) -> deque[Any]:
    items, maxlen = _payload(payload, dict)["items"], payload["maxlen"]
    if len(payload) != 2 or not (maxlen is None or type(maxlen) is int):
        raise ValueError(f"expected items and maxlen, got {payload!r}")
    return deque(_payload(items, list), maxlen)


_OFFSET = re.compile(r"([+-])(\d\d):(\d\d)(?::(\d\d)(?:\.(\d{6}))?)?$")


def _from_iso(kind: type[dtm.datetime] | type[dtm.time], payload: Any) -> Any:
    """``kind.fromisoformat``, keeping a UTC offset with seconds and microseconds exactly
    (Python 3.11 drops the microseconds of such an offset)."""
    text = _payload(payload, str)
    match = _OFFSET.search(text)
    if match is None or match[5] is None:
        return kind.fromisoformat(text)
    sign, hours, minutes, seconds, micros = match.groups()
    offset = dtm.timedelta(
        hours=int(hours), minutes=int(minutes), seconds=int(seconds), microseconds=int(micros)
    )
    naive = kind.fromisoformat(text[: match.start()])
    return naive.replace(tzinfo=dtm.timezone(-offset if sign == "-" else offset))


_DECODERS: Final[dict[str, Callable[[Any], Any]]] = {
    "tuple": lambda payload: tuple(_payload(payload, list)),
    "set": lambda payload: set(_payload(payload, list)),
    "frozenset": lambda payload: frozenset(_payload(payload, list)),
    "dict": _decode_pairs,
    "float": lambda payload: _NONFINITE[_payload(payload, str)],
    "datetime": lambda payload: _from_iso(dtm.datetime, payload),
    "date": lambda payload: dtm.date.fromisoformat(_payload(payload, str)),
    "time": lambda payload: _from_iso(dtm.time, payload),
    "timedelta": _decode_timedelta,
    "decimal": lambda payload: Decimal(_payload(payload, str)),
    "bytes": lambda payload: base64.b64decode(_payload(payload, str), validate=True),
    "uuid": lambda payload: uuid.UUID(_payload(payload, str)),
    "ordereddict": lambda payload: OrderedDict(_payload(payload, dict)),
    "counter": lambda payload: Counter(_payload(payload, dict)),
    "deque": _decode_deque,
}
#: Names a registered class cannot have: they are the codec's own.
_RESERVED: Final = frozenset((*_DECODERS, *_FACTORIES, "defaultdict"))


def _as_text(data: object) -> str:
    if isinstance(data, str):
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data).decode("utf-8")
    raise ValueError(f"expected str or bytes, got {type(data).__name__}")


class JSONCodec:
    """The default codec: readable JSON that keeps Python types, and the classes it was told
    to store.

    Plain values (:obj:`None`, :obj:`bool`, :obj:`int`, finite :obj:`float`, :obj:`str`,
    :obj:`list` and :obj:`dict` with :obj:`str` keys) are written as plain JSON, compact and
    unescaped. Every other supported type is written as a tagged object
    ``{"$t": <tag>, "v": <payload>}``:

    * :obj:`tuple`: ``"tuple"``, the list of the items;
    * :obj:`set`, :obj:`frozenset`: ``"set"``, ``"frozenset"``, the list of the members sorted by
      their encoding (so equal sets are stored equally);
    * :obj:`dict` with a key that is not a :obj:`str`, or with the key ``"$t"``: ``"dict"``, the
      list of ``[key, value]`` pairs in order;
    * :obj:`float` nan, inf and -inf: ``"float"``, ``"nan"``, ``"inf"`` or ``"-inf"``;
    * :class:`~datetime.datetime`, :class:`~datetime.date`, :class:`~datetime.time`:
      ``"datetime"``, ``"date"``, ``"time"``, the ``isoformat()``;
    * :class:`~datetime.timedelta`: ``"timedelta"``, ``[days, seconds, microseconds]``;
    * :class:`~decimal.Decimal`: ``"decimal"``, ``str(value)``;
    * :obj:`bytes`: ``"bytes"``, base64;
    * :class:`~uuid.UUID`: ``"uuid"``, ``str(value)``;
    * :class:`~collections.OrderedDict`, :class:`~collections.Counter`: ``"ordereddict"``,
      ``"counter"``, the items as a dict;
    * :class:`~collections.deque`: ``"deque"``, ``{"items": [...], "maxlen": <int or null>}``;
    * :class:`~collections.defaultdict`: ``"defaultdict"``,
      ``{"factory": <name>, "items": <dict>}``, where the ``default_factory`` is :obj:`None`
      (``null``), a built-in type (``"int"``, ``"list"``, ``"dict"``, ``"set"``, ``"str"``...)
      or a registered class (its name);
    * a :class:`telegram.TelegramObject` (a :class:`~telegram.Message`, a
      :class:`~telegram.User`...): ``"telegram.<ClassName>"``, its ``to_dict()``. It comes back
      through ``de_json()`` with the application's bot (see :meth:`bind_bot`), so shortcuts
      such as ``message.reply_text()`` work;
    * an instance of a registered class: the name of the class, and its state (see ``types``).

    So ``{1: (2, 3), "1": None}`` is stored as
    ``{"$t":"dict","v":[[1,{"$t":"tuple","v":[2,3]}],["1",null]]}``: an :obj:`int` key stays an
    :obj:`int` and a :obj:`str` key stays a :obj:`str`. Dict keys may be of any supported
    hashable type.

    Other types must match exactly: an unregistered subclass (an :class:`~enum.IntEnum`, a
    ``dict`` subclass...) is rejected rather than silently stored as its base type. Aware
    datetimes and times keep their UTC offset but come back with a fixed-offset
    :class:`~datetime.timezone` (a :class:`~zoneinfo.ZoneInfo` name and ``fold`` are not
    kept). An object that appears twice comes back as two equal objects.

    Decoding constructs only the types above and the registered classes: nothing is ever
    imported or looked up by a name taken from the stored data. A stored name that is not
    registered (a class removed or renamed) fails to decode, for that row only.

    Args:
        types: The bot's own classes to store: an iterable of classes, stored under
            ``module.QualName``, or a mapping of stable names to classes (a class can then move
            between modules). Supported kinds, stored as ``{"$t": <name>, "v": <payload>}``:

            * a :func:`~dataclasses.dataclass` (frozen ones too): its fields by name, restored
              without calling ``__init__``; a field missing in the stored data takes its
              default;
            * a :class:`typing.NamedTuple`: its fields by name;
            * an :class:`~enum.Enum` (:class:`~enum.IntEnum`, :class:`~enum.StrEnum`,
              :class:`~enum.Flag`...): the member's value;
            * a subclass of :obj:`dict`, :obj:`list`, :obj:`int` or :obj:`str`: its content as
              its base type, plus ``"attrs": {...}``, the instance's ``__dict__``, if not empty;
            * a plain class whose state is its ``__dict__`` (as :mod:`pickle` sees it):
              the ``__dict__``, restored without calling ``__init__``;
            * a pydantic (v2) model: its ``model_dump()``, restored by ``model_validate()``.

            Their fields and items are encoded by this codec, so nested dates, tuples and
            other registered classes round-trip too.

    Raises:
        TypeError: A class is not of a supported kind (or needs no registration).
        ValueError: A class is given twice, two classes are given one name, or a name is one of
            the codec's own tags.
    """

    __slots__ = ("_bot", "_registry")

    name: Final = "json"

    def __init__(self, types: Iterable[type] | Mapping[str, type] = ()) -> None:
        self._registry = TypeRegistry(reserved=_RESERVED)
        self._registry.add(types)
        self._bot: Bot | None = None

    @property
    def types(self) -> Mapping[str, type]:
        """The registered classes, by the name they are stored under."""
        return MappingProxyType(
            {name: entry.cls for name, entry in self._registry.by_name.items()}
        )

    def add_types(self, types: Iterable[type] | Mapping[str, type]) -> None:
        """Register more classes, as the ``types`` argument does. A persistence calls this
        with the classes of its :class:`~telegram.ext.ContextTypes`.

        Raises:
            TypeError: A class is not of a supported kind.
            ValueError: A class or a name is registered already.
        """
        self._registry.add(types)

    def bind_bot(self, bot: Bot | None) -> None:
        """Give ``bot`` to the :class:`~telegram.TelegramObject` values decoded from now on.
        :class:`~ptb_sessions.SQLAlchemyPersistence` calls this with the application's bot.

        Note:
            A codec serves one bot: give each application its own codec.
        """
        self._bot = bot

    def encode(self, value: Any) -> str:
        """Encode ``value`` as a JSON string. Equal values with equal insertion order give equal
        strings.

        Raises:
            ptb_sessions.SerializationError: ``value`` holds an object of an unsupported type
                or contains itself. The path says where, e.g. ``['cart'][2]`` for
                ``{"cart": [1, 2, threading.Lock()]}``; a set member is shown as
                ``{<TypeName>}`` and an attribute of a registered object as ``.name``.
        """
        try:
            tree = (
                value if _is_plain(value, 0) else _Encoder(self._registry.by_class).encode(value)
            )
            return _dumps(tree)
        except _Unencodable as exc:
            raise SerializationError(exc.reason, path="".join(reversed(exc.parts))) from None
        except RecursionError:
            raise SerializationError("nested too deeply to be encoded") from None
        except ValueError as exc:  # e.g. an int with more digits than Python converts to str
            raise SerializationError(str(exc)) from None

    def decode(self, data: str | bytes) -> Any:
        """Decode a string (or UTF-8 bytes) written by :meth:`encode`.

        Raises:
            ValueError: ``data`` is not valid JSON, holds a malformed tagged object, or names a
                type that is not registered.
        """
        text = _as_text(data)
        try:
            if _TAG not in text and "\\u" not in text:  # no tagged object can be in there
                return _loads(text)
            return json.loads(text, object_hook=self._untag)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    def _untag(self, obj: dict[str, Any]) -> Any:
        """The ``object_hook`` of :func:`json.loads`: turns tagged objects back into their types
        (their payloads are decoded already: the hook runs from the inside out)."""
        if _TAG not in obj:
            return obj
        tag = obj[_TAG]
        decoder = _DECODERS.get(tag) if type(tag) is str else None
        if decoder is None or len(obj) != 2 or "v" not in obj:
            decoder = self._decoder_of(obj, tag)
        try:
            return decoder(obj["v"])
        except Exception as exc:  # anything the data makes a constructor raise
            raise ValueError(f"malformed {tag!r} value {obj['v']!r}: {exc}") from exc

    def _decoder_of(self, obj: dict[str, Any], tag: Any) -> Callable[[Any], Any]:
        """How to decode the payload of a tagged object that is not a built-in type: a
        registered class, a defaultdict, a TelegramObject."""
        if type(tag) is not str or "v" not in obj:
            raise ValueError(f"malformed tagged object {obj!r}")
        registered = self._registry.by_name.get(tag)
        attrs = obj.get(_ATTRS)
        if registered is not None and len(obj) == 3 and type(attrs) is dict:
            return partial(registered.restore, attrs=attrs)
        if len(obj) == 2:
            if registered is not None:
                return partial(registered.restore, attrs=None)
            if tag == "defaultdict":
                return self._decode_defaultdict
            telegram_class = TELEGRAM_TYPES.get(tag)
            if telegram_class is not None:
                return partial(self._decode_telegram, telegram_class)
        if registered is None and tag not in _DECODERS and tag not in TELEGRAM_TYPES:
            raise ValueError(
                f"the stored type {tag!r} is not registered: register its class with "
                "JSONCodec(types=[...]) to decode it"
            )
        raise ValueError(f"malformed tagged object {obj!r}")

    def _decode_telegram(self, cls: type[TelegramObject], payload: Any) -> TelegramObject:
        return cls.de_json(_payload(payload, dict), self._bot)

    def _decode_defaultdict(self, payload: Any) -> defaultdict[Any, Any]:
        factory, items = _payload(payload, dict)["factory"], payload["items"]
        if len(payload) != 2:
            raise ValueError(f"expected factory and items, got {payload!r}")
        if factory is None:
            return defaultdict(None, _payload(items, dict))
        kind = _FACTORIES.get(_payload(factory, str))
        if kind is None:
            registered = self._registry.by_name.get(factory)
            if registered is None:
                raise ValueError(f"the default_factory {factory!r} is not registered")
            kind = registered.cls
        return defaultdict(kind, _payload(items, dict))

    def __repr__(self) -> str:
        names = list(self._registry.by_name)
        return f"JSONCodec(types={names!r})" if names else "JSONCodec()"


def _find_unpicklable(
    value: Any, error: Exception, path: list[str], seen: set[int]
) -> tuple[Any, Exception]:
    """Walk into the containers of ``value`` (which failed with ``error``) down to the innermost
    object that does not pickle, recording the subscripts on the way in ``path``."""
    seen.add(id(value))
    if isinstance(value, dict):
        children: Iterable[tuple[str, Any]] = ((f"[{key!r}]", item) for key, item in value.items())
    elif isinstance(value, list | tuple):
        children = ((f"[{index}]", item) for index, item in enumerate(value))
    elif isinstance(value, set | frozenset):
        children = ((f"{{<{type(item).__name__}>}}", item) for item in value)
    else:
        children = ()
    for part, child in children:
        if id(child) in seen:
            continue
        try:
            pickle.dumps(child, protocol=5)
        except Exception as exc:
            path.append(part)
            return _find_unpicklable(child, exc, path, seen)
    return value, error


def _unpicklable(value: Any, error: Exception) -> NoReturn:
    path: list[str] = []
    culprit, exc = _find_unpicklable(value, error, path, set())
    raise SerializationError(
        f"{type(culprit).__name__} is not serializable ({type(exc).__name__}: {exc})",
        path="".join(path),
    ) from exc


_BOT_ID: Final = "ptb_sessions:bot"
"""The persistent id that stands for the bot in pickled data (see :class:`_BotPickler`)."""
_BOT_PLACEHOLDER: Final = object()


def _telegram_object(
    cls: type[TelegramObject], state: dict[str, object], bot: Bot | None
) -> TelegramObject:
    """Rebuild a pickled TelegramObject with the bot of the unpickling codec. Stored pickles
    name this function: it must keep its name and module."""
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    obj.set_bot(bot)
    return obj


class _BotPickler(pickle.Pickler):
    """Pickles a TelegramObject as :func:`_telegram_object` with a placeholder for its bot, and
    any :class:`telegram.Bot` as that placeholder: the unpickler puts its own bot there."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, TelegramObject) and not isinstance(obj, Bot):
            return _telegram_object, (type(obj), obj.__getstate__(), _BOT_PLACEHOLDER)
        return NotImplemented

    def persistent_id(self, obj: Any) -> str | None:
        return _BOT_ID if obj is _BOT_PLACEHOLDER or isinstance(obj, Bot) else None


class _BotUnpickler(pickle.Unpickler):
    """Unpickles with ``bot`` in the place of the placeholder of :class:`_BotPickler`."""

    def __init__(self, data: bytes | bytearray | memoryview, bot: Bot | None) -> None:
        super().__init__(io.BytesIO(data))
        self.bot = bot

    def persistent_load(self, pid: Any) -> Bot | None:
        if pid != _BOT_ID:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self.bot


class PickleCodec:
    """A codec for arbitrary Python objects, with :mod:`pickle` (protocol 5). Opt-in.

    Warning:
        Decoding runs code named by the stored data: whoever can write to the database can run
        arbitrary code in the bot process. Use it only with a database nobody else can write
        to, and prefer :class:`JSONCodec` where it suffices. Pickled data is also tied to the
        classes and modules of the code that wrote it.
    """

    __slots__ = ("_bot",)

    name: Final = "pickle"

    def __init__(self) -> None:
        self._bot: Bot | None = None

    def bind_bot(self, bot: Bot | None) -> None:
        """Give ``bot`` to the :class:`~telegram.TelegramObject` values unpickled from now on
        (and to any pickled :class:`telegram.Bot`), as PTB's
        :class:`~telegram.ext.PicklePersistence` does. :class:`~ptb_sessions.SQLAlchemyPersistence`
        calls this with the application's bot."""
        self._bot = bot

    def encode(self, value: Any) -> bytes:
        """Pickle ``value``.

        Raises:
            ptb_sessions.SerializationError: ``value`` holds an object that cannot be pickled;
                the path says where, as far as it can be found in dicts, lists, tuples and sets.
        """
        buffer = io.BytesIO()
        try:
            _BotPickler(buffer, protocol=5).dump(value)
            return buffer.getvalue()
        except Exception as exc:
            try:
                _unpicklable(value, exc)
            except RecursionError:
                raise SerializationError("nested too deeply to be pickled") from None

    def decode(self, data: str | bytes) -> Any:
        """Unpickle ``data``.

        Raises:
            ValueError: ``data`` is not bytes or cannot be unpickled (including a class that no
                longer exists).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"PickleCodec decodes bytes, got {type(data).__name__}")
        try:
            return _BotUnpickler(data, self._bot).load()
        except Exception as exc:
            raise ValueError(f"cannot unpickle: {type(exc).__name__}: {exc}") from exc

    def __repr__(self) -> str:
        return "PickleCodec()"


def storable_state(codec: Codec, state: object) -> object:
    """A conversation state as ``codec`` can store it: an :obj:`int` or :obj:`str` subclass
    (an :class:`~enum.IntEnum` of states) whose class the codec cannot encode becomes its plain
    value, which :class:`~telegram.ext.ConversationHandler` compares equal to it. Every other
    state is returned as it is."""
    cls = type(state)
    if cls is int or cls is str or cls is bool or not isinstance(state, int | str):
        return state
    try:
        codec.encode(state)
    except SerializationError:
        return int.__int__(state) if isinstance(state, int) else str.__str__(state)
    return state


def bind_codec(
    codec: Codec, bot: Bot | None, context_types: ContextTypes[Any, Any, Any, Any]
) -> None:
    """Prepare ``codec`` for an application: a :class:`JSONCodec` registers the classes of
    ``context_types``' user_data, chat_data and bot_data that it can register and does not know
    yet, and :class:`JSONCodec` and :class:`PickleCodec` give ``bot`` to the TelegramObjects
    they decode. Any other codec is left as it is."""
    if isinstance(codec, JSONCodec):
        known = set(codec.types.values())
        classes = (context_types.user_data, context_types.chat_data, context_types.bot_data)
        codec.add_types(
            [cls for cls in dict.fromkeys(classes) if cls not in known and is_registrable(cls)]
        )
    if isinstance(codec, JSONCodec | PickleCodec):
        codec.bind_bot(bot)
