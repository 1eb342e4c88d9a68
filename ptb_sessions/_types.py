"""The registry of users' own types for :class:`~ptb_sessions.JSONCodec`: which classes may be
stored, under which name, and how an instance becomes stored state and back.

Nothing here imports anything by name: a class is only ever found in the registry the bot built
(or among python-telegram-bot's own :class:`~telegram.TelegramObject` classes), so stored data
can never make the bot construct, import or call anything it did not register.
"""

from __future__ import annotations

import dataclasses
import datetime as dtm
import enum
import sys
import typing
import uuid
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any, Final

import telegram
from telegram import Bot, TelegramObject

__all__ = [
    "SUPPORTED_KINDS",
    "TELEGRAM_TYPES",
    "Kind",
    "RegisteredType",
    "TypeRegistry",
    "default_name",
    "is_registrable",
    "registrable_classes",
]

#: What :class:`TypeError` messages list as the kinds of classes that can be registered.
SUPPORTED_KINDS: Final = (
    "a dataclass, a typing.NamedTuple, an Enum (IntEnum, StrEnum, Flag...), a subclass of "
    "dict, list, int or str, a pydantic model, or a plain class whose state is its __dict__"
)
_HEAP_TYPE: Final = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class written in Python
_NATIVE: Final = (defaultdict, OrderedDict, Counter, deque)


class Kind(enum.Enum):
    """How instances of a registered class are stored."""

    DATACLASS = "dataclass"  #: its fields, by name
    NAMEDTUPLE = "namedtuple"  #: its fields, by name
    PYDANTIC = "pydantic"  #: ``model_dump()``, restored by ``model_validate()``
    OBJECT = "object"  #: its ``__dict__``, restored without calling ``__init__``
    ENUM = "enum"  #: the member's value
    DICT = "dict"  #: the items, and the ``__dict__`` if not empty
    LIST = "list"  #: the items, and the ``__dict__`` if not empty
    INT = "int"  #: the plain value, and the ``__dict__`` if not empty
    STR = "str"  #: the plain value, and the ``__dict__`` if not empty


def _is_pydantic_model(cls: type) -> bool:
    pydantic = sys.modules.get("pydantic")  # a pydantic model's module imported pydantic
    return pydantic is not None and issubclass(cls, pydantic.BaseModel)


def _is_plain_class(cls: type) -> bool:
    """Whether instances are plain objects whose whole state is their ``__dict__``: every base
    is a class written in Python (or ``object``), so ``cls.__new__(cls)`` makes an empty one."""
    return cls.__dictoffset__ != 0 and all(
        base is object or base is typing.Generic or base.__flags__ & _HEAP_TYPE
        for base in cls.__mro__
    )


def _kind_of(cls: type) -> Kind | None:
    if issubclass(cls, enum.Enum):
        return Kind.ENUM
    if dataclasses.is_dataclass(cls):
        return Kind.DATACLASS
    if _is_pydantic_model(cls):
        return Kind.PYDANTIC
    if issubclass(cls, tuple):
        return Kind.NAMEDTUPLE if isinstance(getattr(cls, "_fields", None), tuple) else None
    if issubclass(cls, _NATIVE):
        return None  # their own state (a default_factory, a maxlen) is not in __dict__
    for base, kind in ((dict, Kind.DICT), (list, Kind.LIST), (int, Kind.INT), (str, Kind.STR)):
        if issubclass(cls, base):
            return kind if cls is not base else None
    return Kind.OBJECT if _is_plain_class(cls) else None


def _unsupported(cls: object) -> str | None:
    """Why ``cls`` cannot be registered, or :obj:`None` if it can."""
    if not isinstance(cls, type):
        return f"{cls!r} is not a class"
    if issubclass(cls, TelegramObject):
        return (
            f"{cls.__name__} is a python-telegram-bot object: those are stored without "
            "registration"
        )
    if cls in _STORED_WITHOUT_REGISTRATION:
        return f"{cls.__name__} is stored without registration"
    if _kind_of(cls) is None:
        return f"{cls.__qualname__} cannot be registered: it is not {SUPPORTED_KINDS}"
    return None


_STORED_WITHOUT_REGISTRATION: Final = frozenset(
    (
        *(*_NATIVE, dict, list, tuple, set, frozenset, str, int, float, bool, bytes, type(None)),
        *(Decimal, uuid.UUID, dtm.datetime, dtm.date, dtm.time, dtm.timedelta),
    )
)


def is_registrable(cls: object) -> bool:
    """Whether ``cls`` is a class :class:`TypeRegistry` accepts."""
    return _unsupported(cls) is None


class RegisteredType:
    """A registered class: its stored name, its kind and, for dataclasses, its fields.

    Attributes:
        name (:obj:`str`): The name it is stored under.
        cls (:obj:`type`): The class.
        kind (:class:`Kind`): How its instances are stored.
        fields (tuple[:class:`dataclasses.Field`, ...]): The fields of a dataclass, else empty.
    """

    __slots__ = ("cls", "fields", "kind", "name")

    def __init__(self, name: str, cls: type) -> None:
        kind = _kind_of(cls)
        assert kind is not None
        self.name = name
        self.cls = cls
        self.kind = kind
        self.fields: tuple[dataclasses.Field[Any], ...] = (
            dataclasses.fields(cls) if kind is Kind.DATACLASS else ()
        )

    def state(self, obj: Any) -> dict[str, Any]:
        """The state of ``obj`` as attribute names and values, for the kinds stored by field
        (:attr:`Kind.DATACLASS`, :attr:`Kind.NAMEDTUPLE`, :attr:`Kind.PYDANTIC`,
        :attr:`Kind.OBJECT`) and the ``__dict__`` of the others (empty if it has none)."""
        kind = self.kind
        if kind is Kind.DATACLASS:
            return {field.name: getattr(obj, field.name) for field in self.fields}
        if kind is Kind.NAMEDTUPLE:
            return dict(obj._asdict())
        if kind is Kind.PYDANTIC:
            return dict(obj.model_dump())
        return getattr(obj, "__dict__", {})

    def restore(self, payload: Any, attrs: dict[str, Any] | None) -> Any:
        """An instance made from what :meth:`state` (or the items or value) gave, without
        calling ``__init__`` except for named tuples and pydantic models (which validate).

        Raises:
            ValueError: ``payload`` does not fit the class.
            TypeError: ``payload`` does not fit the class.
        """
        cls: Any = self.cls
        kind = self.kind
        if attrs is not None and kind not in _WITH_ATTRS:
            raise ValueError(f"a {kind.value} has no {_ATTRS!r}")
        if kind is Kind.ENUM:
            return cls(payload)
        if kind is Kind.NAMEDTUPLE:
            return cls(**_expect(payload, dict))
        if kind is Kind.PYDANTIC:
            return cls.model_validate(_expect(payload, dict))
        if kind is Kind.DATACLASS:
            return self._restore_dataclass(_expect(payload, dict))
        if kind is Kind.OBJECT:
            obj = cls.__new__(cls)
            vars(obj).update(_expect(payload, dict))
            return obj
        if kind is Kind.INT or kind is Kind.STR:
            obj = cls.__new__(cls, _expect(payload, int if kind is Kind.INT else str))
        else:
            obj = cls.__new__(cls)
            if kind is Kind.DICT:
                obj.update(_expect(payload, dict))
            else:
                obj.extend(_expect(payload, list))
        if attrs:
            vars(obj).update(attrs)
        return obj

    def _restore_dataclass(self, payload: dict[str, Any]) -> Any:
        cls: Any = self.cls
        obj = cls.__new__(cls)
        unknown = set(payload)
        for field in self.fields:
            if field.name in payload:
                value = payload[field.name]
                unknown.discard(field.name)
            elif field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                raise ValueError(f"the field {field.name!r} is missing and has no default")
            object.__setattr__(obj, field.name, value)  # also for frozen dataclasses
        if unknown:
            raise ValueError(f"{sorted(unknown)!r} are not fields of {self.cls.__qualname__}")
        return obj


_WITH_ATTRS: Final = frozenset((Kind.DICT, Kind.LIST, Kind.INT, Kind.STR))
_ATTRS: Final = "attrs"


def _expect(payload: Any, kind: type) -> Any:
    if type(payload) is not kind:
        raise ValueError(f"expected a JSON {kind.__name__}, got {payload!r}")
    return payload


def default_name(cls: type) -> str:
    """The name a class is stored under unless a mapping gives it one: ``module.QualName``."""
    return f"{cls.__module__}.{cls.__qualname__}"


class TypeRegistry:
    """The classes a :class:`~ptb_sessions.JSONCodec` stores, by class and by name.

    Args:
        reserved: Names that cannot be registered (the codec's own tags).
    """

    __slots__ = ("by_class", "by_name", "reserved")

    def __init__(self, reserved: Iterable[str]) -> None:
        self.reserved = frozenset(reserved)
        self.by_class: dict[type, RegisteredType] = {}
        self.by_name: dict[str, RegisteredType] = {}

    def add(self, types: Iterable[type] | Mapping[str, type]) -> None:
        """Register ``types``: classes (stored as ``module.QualName``) or a mapping of stable
        names to classes. Nothing is registered if one of them is refused.

        Raises:
            TypeError: A class is not of a supported kind.
            ValueError: A class or a name is registered twice, or a name is not allowed.
        """
        pairs = (
            list(types.items())
            if isinstance(types, Mapping)
            else [(default_name(cls) if isinstance(cls, type) else "", cls) for cls in types]
        )
        by_class = dict(self.by_class)
        by_name = dict(self.by_name)
        for name, cls in pairs:
            reason = _unsupported(cls)
            if reason is not None:
                raise TypeError(f"JSONCodec(types=...): {reason}")
            self._check_name(name, cls)
            if cls in by_class:
                raise ValueError(
                    f"JSONCodec(types=...): {cls.__qualname__} is registered twice, as "
                    f"{by_class[cls].name!r} and {name!r}"
                )
            if name in by_name:
                raise ValueError(
                    f"JSONCodec(types=...): the name {name!r} is given to two classes, "
                    f"{by_name[name].cls.__qualname__} and {cls.__qualname__}"
                )
            by_class[cls] = by_name[name] = RegisteredType(name, cls)
        self.by_class = by_class
        self.by_name = by_name

    def _check_name(self, name: object, cls: type) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"JSONCodec(types=...): the name of {cls.__qualname__} must be a non-empty "
                f"str, not {name!r}"
            )
        if name in self.reserved or name.startswith("telegram."):
            raise ValueError(
                f"JSONCodec(types=...): the name {name!r} of {cls.__qualname__} is taken by a "
                "built-in type; choose another"
            )


def _telegram_types() -> dict[str, type[TelegramObject]]:
    found: dict[str, type[TelegramObject]] = {}
    for name in telegram.__all__:
        cls = getattr(telegram, name, None)
        if isinstance(cls, type) and issubclass(cls, TelegramObject) and not issubclass(cls, Bot):
            found[f"telegram.{name}"] = cls
    return found


#: python-telegram-bot's own objects, by the name they are stored under (``telegram.Message``).
TELEGRAM_TYPES: Final = _telegram_types()


def _parts(value: Any) -> Iterator[Any]:
    """The values ``value`` holds, as the codec would store them."""
    if isinstance(value, dict):
        yield from value.keys()
        yield from value.values()
        if isinstance(value, defaultdict) and isinstance(value.default_factory, type):
            yield value.default_factory  # a class: checked as one
    elif isinstance(value, list | tuple | set | frozenset | deque):
        yield from value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield from (getattr(value, field.name) for field in dataclasses.fields(value))
    elif not isinstance(value, type | enum.Enum):
        yield from getattr(value, "__dict__", {}).values()


def registrable_classes(value: Any) -> list[type]:
    """The classes of the objects in ``value`` (nested in containers and in registrable
    objects, and ``defaultdict`` factories) that :class:`TypeRegistry` could register, in the
    order they are first met. What the codec stores without registration is not listed."""
    found: dict[type, None] = {}
    seen: set[int] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, TelegramObject):
            continue
        seen.add(id(item))
        cls = item if isinstance(item, type) else type(item)
        if is_registrable(cls):
            found.setdefault(cls)
        if not isinstance(item, type):
            stack.extend(reversed(list(_parts(item))))
    return list(found)
