"""Value codecs: how a stored value becomes the text (or bytes) of a database row and back.

:class:`JSONCodec` (the default) writes plain JSON for plain values and a small tagged object for
every other supported type, so stored rows stay readable in SQL. :class:`PickleCodec` stores any
picklable object, at the price of trusting the database.
"""

import base64
import datetime as dtm
import json
import math
import pickle
import re
import uuid
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any, Final, NoReturn, Protocol, runtime_checkable

from ptb_sessions._errors import SerializationError

__all__ = ["Codec", "JSONCodec", "PickleCodec"]


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
_ATOMS: Final = frozenset((str, int, bool, type(None)))
_NONFINITE: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_JSON: Final = json.JSONEncoder(
    ensure_ascii=False, check_circular=False, allow_nan=False, separators=(",", ":")
)
_PLAIN_DEPTH: Final = 64
_CIRCULAR: Final = "circular reference (the value contains itself)"
_IN_KEY: Final = object()  # the culprit of a dict key that cannot be encoded: the path ends there


class _Unencodable(Exception):
    """Raised inside :func:`_encode` and completed into a :class:`SerializationError` by
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
    name = type(value).__name__
    for base in _SUBCLASSABLE:
        if isinstance(value, base):
            return (
                f"{name} is not serializable (a subclass of {base.__name__}: convert it to "
                f"{base.__name__}, or use PickleCodec)"
            )
    return f"{name} is not serializable"


def _tagged(tag: str, payload: Any) -> dict[str, Any]:
    return {_TAG: tag, "v": payload}


def _encode_items(value: Iterable[Any], active: set[int]) -> list[Any]:
    return [item if type(item) in _ATOMS else _encode(item, active) for item in value]


def _enter(value: object, active: set[int]) -> None:
    if id(value) in active:
        raise _Unencodable(_CIRCULAR, value)
    active.add(id(value))


def _encode_dict(value: dict[Any, Any], active: set[int]) -> Any:
    _enter(value, active)
    try:
        result: Any = {}
        if _TAG not in value:
            for key, item in value.items():
                if type(key) is not str:
                    break
                result[key] = item if type(item) in _ATOMS else _encode(item, active)
            else:
                active.discard(id(value))
                return result
        result = _tagged("dict", _encode_pairs(value, active))
    except _Unencodable as exc:
        if exc.culprit is not _IN_KEY:
            key = next(key for key, item in value.items() if item is exc.culprit)
            exc.parts.append(f"[{key!r}]")
        exc.culprit = value
        raise
    active.discard(id(value))
    return result


def _encode_pairs(value: dict[Any, Any], active: set[int]) -> list[list[Any]]:
    pairs = []
    for key, item in value.items():
        try:
            encoded_key = _encode(key, active)
        except _Unencodable as exc:
            raise _Unencodable(f"key {key!r} cannot be encoded: {exc.reason}", _IN_KEY) from None
        pairs.append([encoded_key, _encode(item, active)])
    return pairs


def _encode_sequence(value: list[Any] | tuple[Any, ...], active: set[int]) -> list[Any]:
    _enter(value, active)
    try:
        result = _encode_items(value, active)
    except _Unencodable as exc:
        index = next(index for index, item in enumerate(value) if item is exc.culprit)
        exc.parts.append(f"[{index}]")
        exc.culprit = value
        raise
    active.discard(id(value))
    return result


def _encode_members(value: set[Any] | frozenset[Any], active: set[int]) -> list[Any]:
    try:
        members = _encode_items(value, active)
    except _Unencodable as exc:
        exc.parts.append(f"{{<{type(exc.culprit).__name__}>}}")
        exc.culprit = value
        raise
    return sorted(members, key=_JSON.encode)  # equal sets encode equally


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


def _is_plain(value: Any, depth: int) -> bool:
    """Whether ``value`` is plain JSON already, so :func:`_encode` has nothing to change. Cheaper
    than encoding; too deep a value (maybe a circular one) counts as not plain."""
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


def _encode(value: Any, active: set[int]) -> Any:
    """Return ``value`` as a tree of plain JSON values, tagging every other supported type."""
    cls = type(value)
    if cls in _ATOMS:
        return value
    if cls is dict:
        return _encode_dict(value, active)
    if cls is list:
        return _encode_sequence(value, active)
    if cls is float:
        return _encode_float(value)
    if cls is tuple:
        return _tagged("tuple", _encode_sequence(value, active))
    if cls is set or cls is frozenset:
        return _tagged(cls.__name__, _encode_members(value, active))
    leaf = _LEAVES.get(cls)
    if leaf is None:
        raise _Unencodable(_not_serializable(value), value)
    return _tagged(leaf[0], leaf[1](value))


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
}


def _untag(obj: dict[str, Any]) -> Any:
    """The ``object_hook`` of :func:`json.loads`: turns tagged objects back into their types."""
    if _TAG not in obj:
        return obj
    tag = obj[_TAG]
    decoder = _DECODERS.get(tag) if type(tag) is str else None
    if decoder is None or len(obj) != 2 or "v" not in obj:
        raise ValueError(f"malformed tagged object {obj!r}")
    try:
        return decoder(obj["v"])
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
        raise ValueError(f"malformed {tag!r} value {obj['v']!r}: {exc}") from exc


def _as_text(data: object) -> str:
    if isinstance(data, str):
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data).decode("utf-8")
    raise ValueError(f"expected str or bytes, got {type(data).__name__}")


class JSONCodec:
    """The default codec: readable JSON that keeps Python types.

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
    * :class:`~uuid.UUID`: ``"uuid"``, ``str(value)``.

    So ``{1: (2, 3), "1": None}`` is stored as
    ``{"$t":"dict","v":[[1,{"$t":"tuple","v":[2,3]}],["1",null]]}``: an :obj:`int` key stays an
    :obj:`int` and a :obj:`str` key stays a :obj:`str`. Dict keys may be of any supported
    hashable type.

    Types must match exactly: subclasses (:class:`collections.defaultdict`, enums, named
    tuples, ...) are rejected rather than silently stored as their base type. Aware datetimes
    and times keep their UTC offset but come back with a fixed-offset
    :class:`~datetime.timezone` (a :class:`~zoneinfo.ZoneInfo` name and ``fold`` are not
    kept). An object that appears twice comes back as two equal objects.
    """

    __slots__ = ()

    name: Final = "json"

    def encode(self, value: Any) -> str:
        """Encode ``value`` as a JSON string. Equal values with equal insertion order give equal
        strings.

        Raises:
            ptb_sessions.SerializationError: ``value`` holds an object of an unsupported type
                or contains itself. The path says where, e.g. ``['cart'][2]`` for
                ``{"cart": [1, 2, threading.Lock()]}``; a set member is shown as
                ``{<TypeName>}``.
        """
        try:
            tree = value if _is_plain(value, 0) else _encode(value, set())
            return _JSON.encode(tree)
        except _Unencodable as exc:
            raise SerializationError(exc.reason, path="".join(reversed(exc.parts))) from None
        except RecursionError:
            raise SerializationError("nested too deeply to be encoded") from None
        except ValueError as exc:  # e.g. an int with more digits than Python converts to str
            raise SerializationError(str(exc)) from None

    def decode(self, data: str | bytes) -> Any:
        """Decode a string (or UTF-8 bytes) written by :meth:`encode`.

        Raises:
            ValueError: ``data`` is not valid JSON or holds a malformed tagged object.
        """
        text = _as_text(data)
        try:
            if _TAG not in text and "\\u" not in text:  # no tagged object can be in there
                return json.loads(text)
            return json.loads(text, object_hook=_untag)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    def __repr__(self) -> str:
        return "JSONCodec()"


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


class PickleCodec:
    """A codec for arbitrary Python objects, with :mod:`pickle` (protocol 5). Opt-in.

    Warning:
        Decoding runs code named by the stored data: whoever can write to the database can run
        arbitrary code in the bot process. Use it only with a database nobody else can write
        to, and prefer :class:`JSONCodec` where it suffices. Pickled data is also tied to the
        classes and modules of the code that wrote it.
    """

    __slots__ = ()

    name: Final = "pickle"

    def encode(self, value: Any) -> bytes:
        """Pickle ``value``.

        Raises:
            ptb_sessions.SerializationError: ``value`` holds an object that cannot be pickled;
                the path says where, as far as it can be found in dicts, lists, tuples and sets.
        """
        try:
            return pickle.dumps(value, protocol=5)
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
            return pickle.loads(data)
        except Exception as exc:
            raise ValueError(f"cannot unpickle: {type(exc).__name__}: {exc}") from exc

    def __repr__(self) -> str:
        return "PickleCodec()"
