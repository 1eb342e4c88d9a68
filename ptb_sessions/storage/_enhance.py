"""Timeouts and versioned data migrations for any storage adapter: :func:`enhance_storage`.

Stored layout. An enhanced storage writes a *record*, a :obj:`dict`::

    {"__ptb_sessions__": 1, "d": <value>, "v": <data version>, "e": <expires at>}

``"v"`` (the latest migration version, an :obj:`int` or :obj:`float`) is present only with
migrations, ``"e"`` (``clock()`` at the write plus the ttl, in seconds) only with a ttl. With
neither, the value is stored as it is, unless it looks like a record itself (then it is wrapped,
so it reads back unchanged). A stored value that is not a record (exactly the keys above, a
marker of ``1`` and a ``"d"``) is legacy data from before the enhancement: no version (every
migration runs) and no expiry.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any, cast

from ptb_sessions._errors import ConflictError, MigrationError, SerializationError
from ptb_sessions.storage._base import StorageAdapter

__all__ = [
    "RECORD_MARKER",
    "apply_migrations",
    "enhance_storage",
    "is_record",
    "make_record",
    "normalize_ttl",
    "parse_record",
    "sorted_migrations",
]

RECORD_MARKER = "__ptb_sessions__"
"""The key that marks a record of an enhanced storage (its value is the layout version, 1)."""

_RECORD_KEYS = frozenset((RECORD_MARKER, "d", "v", "e"))
_EXPIRED_DELETE_ATTEMPTS = 5

Migration = Callable[[Any], Any]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def normalize_ttl(ttl: float | timedelta | None) -> float | None:
    """Return ``ttl`` in seconds.

    Args:
        ttl (:obj:`float` | :class:`datetime.timedelta` | :obj:`None`): Seconds, a timedelta, or
            :obj:`None` (no expiry). Infinity also means no expiry.

    Returns:
        :obj:`float` | :obj:`None`: The seconds, or :obj:`None` for no expiry.

    Raises:
        TypeError: ``ttl`` is not a number or a timedelta.
        ValueError: ``ttl`` is zero, negative or NaN.
    """
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise TypeError(f"ttl must be seconds (int or float) or a datetime.timedelta, not {ttl!r}")
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"ttl must be positive, not {ttl!r}")
    return None if math.isinf(seconds) else seconds


def sorted_migrations(
    migrations: Mapping[float, Migration],
) -> tuple[tuple[float, Migration], ...]:
    """Validate ``migrations`` and return them as ``(version, migration)`` pairs in numeric order
    (``10.1`` after ``10`` and before ``11``).

    Args:
        migrations (Mapping[:obj:`float`, Callable]): Data version -> the function that turns a
            value of the previous version into one of this version.

    Raises:
        ValueError: ``migrations`` is empty, or a version is not a finite :obj:`int` or
            :obj:`float`.
        TypeError: A migration is not callable.
    """
    if not migrations:
        raise ValueError(
            "migrations must not be empty; pass None for no migrations, or e.g. "
            "{1: migrate_to_1} to version the data"
        )
    for version, migration in migrations.items():
        if not _is_number(version):
            raise ValueError(
                f"Migration versions must be finite numbers (int or float), not {version!r}"
            )
        if not callable(migration):
            raise TypeError(f"Migration {version!r} must be callable, not {migration!r}")
    return tuple(sorted(migrations.items(), key=lambda item: item[0]))


def _copy(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception:  # an uncopyable value is migrated as it is
        return value


def apply_migrations(
    value: Any,
    stored_version: float | None,
    migrations_sorted: tuple[tuple[float, Migration], ...],
    *,
    key: str,
) -> tuple[Any, float]:
    """Run the migrations that ``value`` still needs.

    With no ``stored_version`` (legacy data) every migration runs, else those with a version
    above it, in numeric order. :obj:`None` is not migrated. The migrations get a deep copy of
    ``value``, so a failing migration that changed it in place leaves ``value`` as it was.

    Args:
        value (:obj:`object`): The stored value.
        stored_version (:obj:`float` | :obj:`None`): Its data version, :obj:`None` if it has
            none.
        migrations_sorted: The result of :func:`sorted_migrations`.
        key (:obj:`str`): The session key, for error messages.

    Returns:
        tuple[:obj:`object`, :obj:`float`]: The migrated value and the latest version.

    Raises:
        ptb_sessions.MigrationError: ``stored_version`` is not a number or newer than the latest
            migration, or a migration raised.
    """
    latest = migrations_sorted[-1][0]
    if value is None:
        return None, latest
    if stored_version is not None:
        if not _is_number(stored_version):
            raise MigrationError(
                f"{key!r} has the invalid data version {stored_version!r}; versions are numbers"
            )
        if stored_version > latest:
            raise MigrationError(
                f"{key!r} has data version {stored_version!r}, newer than the "
                f"latest migration {latest!r}. Was it written by a newer version of the bot? "
                "Add its migrations instead of downgrading the data."
            )
    pending = [
        (version, migration)
        for version, migration in migrations_sorted
        if stored_version is None or version > stored_version
    ]
    if pending:
        value = _copy(value)
    for version, migration in pending:
        try:
            value = migration(value)
        except Exception as exc:
            raise MigrationError(
                f"Migration to version {version!r} failed for {key!r}: "
                f"{type(exc).__name__}: {exc}. The stored value was left unchanged."
            ) from exc
    return value, latest


def is_record(stored: object) -> bool:
    """Whether ``stored`` is a record written by an enhanced storage (see the module docs)."""
    if not isinstance(stored, dict) or "d" not in stored:
        return False
    marker = stored.get(RECORD_MARKER)
    return type(marker) is int and marker == 1 and stored.keys() <= _RECORD_KEYS


def make_record(value: Any, *, version: float | None, expires_at: float | None) -> Any:
    """What an enhanced storage stores for ``value``: a record, or ``value`` itself if there is
    neither a version nor an expiry and ``value`` does not look like a record."""
    if version is None and expires_at is None and not is_record(value):
        return value
    record: dict[str, Any] = {RECORD_MARKER: 1, "d": value}
    if version is not None:
        record["v"] = version
    if expires_at is not None:
        record["e"] = expires_at
    return record


def parse_record(stored: Any) -> tuple[Any, Any, float | None]:
    """Split what an enhanced storage read into ``(value, data version, expires at)``.

    Legacy data (not a record) has neither a version nor an expiry. The version is returned as
    stored (:func:`apply_migrations` validates it); an expiry that is not a number is ignored.
    """
    if not is_record(stored):
        return stored, None, None
    expires_at = stored.get("e")
    return (
        stored["d"],
        stored.get("v"),
        float(expires_at) if _is_number(expires_at) else None,
    )


class _EnhancedStorage:
    """The adapter returned by :func:`enhance_storage` for adapters without native support.

    ``has``, ``keys``, ``items`` and ``lock`` exist only if the wrapped adapter has them.
    """

    __slots__ = (
        "_clock",
        "_inner",
        "_migrations",
        "_ttl",
        "has",
        "items",
        "keys",
        "lock",
    )

    has: Callable[[str], Awaitable[bool]]
    keys: Callable[[], AsyncIterator[str]]
    items: Callable[[], AsyncIterator[tuple[str, Any]]]
    lock: Callable[[str], AbstractAsyncContextManager[Any]]

    def __init__(
        self,
        inner: StorageAdapter,
        ttl: float | None,
        migrations: tuple[tuple[float, Migration], ...] | None,
        clock: Callable[[], float],
    ) -> None:
        self._inner = inner
        self._ttl = ttl
        self._migrations = migrations
        self._clock = clock
        if hasattr(inner, "has"):
            self.has = self._has
        if hasattr(inner, "keys"):
            self.keys = self._keys
        if hasattr(inner, "items"):
            self.items = self._items
        if hasattr(inner, "lock"):
            self.lock = inner.lock

    def __repr__(self) -> str:
        versions = None if self._migrations is None else [v for v, _ in self._migrations]
        return f"enhance_storage({self._inner!r}, ttl={self._ttl!r}, migrations={versions!r})"

    def _expired(self, expires_at: float | None) -> bool:
        return self._ttl is not None and expires_at is not None and self._clock() > expires_at

    def _unwrap(self, key: str, stored: Any) -> tuple[bool, Any]:
        """``(expired, migrated value)`` of what the inner adapter stores for ``key``."""
        value, version, expires_at = parse_record(stored)
        if self._expired(expires_at):
            return True, None
        if self._migrations is not None and value is not None:
            value, _ = apply_migrations(value, version, self._migrations, key=key)
        return False, value

    async def read(self, key: str) -> Any | None:
        """Read ``key``: :obj:`None` if nothing is stored or it expired (it is then deleted),
        else the value, migrated to the latest version (not written back).

        Raises:
            ptb_sessions.MigrationError: The stored version is newer than the latest migration,
                or a migration raised. The stored value is left as it was.
        """
        for _ in range(_EXPIRED_DELETE_ATTEMPTS):
            stored = await self._inner.read(key)
            if stored is None:
                return None
            expired, value = self._unwrap(key, stored)
            if not expired:
                return value
            try:
                await self._inner.delete(key)
            except ConflictError:
                continue  # rewritten since our read: read the new value
            return None
        raise ConflictError(
            f"Session key {key!r} kept changing while its expired value was being deleted"
        )

    async def write(self, key: str, value: Any) -> None:
        """Store ``value`` for ``key`` with the latest data version; restarts the ttl."""
        version = None if self._migrations is None else self._migrations[-1][0]
        expires_at = None if self._ttl is None else self._clock() + self._ttl
        stored = make_record(value, version=version, expires_at=expires_at)
        try:
            await self._inner.write(key, stored)
        except SerializationError as exc:
            if stored is not value and exc.path.startswith("['d']"):
                raise SerializationError(exc.reason, path=exc.path[5:], root=exc.root) from exc
            raise

    async def delete(self, key: str) -> None:
        """Delete ``key``."""
        await self._inner.delete(key)

    async def _has(self, key: str) -> bool:
        if self._ttl is None:
            return bool(await cast(Any, self._inner).has(key))
        stored = await self._inner.read(key)
        if stored is None:
            return False
        _, _, expires_at = parse_record(stored)
        return not self._expired(expires_at)

    async def _keys(self) -> AsyncIterator[str]:
        inner = cast(Any, self._inner)
        if self._ttl is None:
            async for key in inner.keys():
                yield key
            return
        if hasattr(inner, "items"):
            async for key, stored in inner.items():
                if not self._expired(parse_record(stored)[2]):
                    yield key
            return
        async for key in inner.keys():
            stored = await inner.read(key)
            if stored is not None and not self._expired(parse_record(stored)[2]):
                yield key

    async def _items(self) -> AsyncIterator[tuple[str, Any]]:
        async for key, stored in cast(Any, self._inner).items():
            expired, value = self._unwrap(key, stored)
            if not expired:
                yield key, value


def enhance_storage(
    storage: StorageAdapter,
    *,
    ttl: float | timedelta | None = None,
    migrations: Mapping[float, Migration] | None = None,
    clock: Callable[[], float] = time.time,
) -> StorageAdapter:
    """Add timeouts and versioned data migrations to any storage adapter (grammY's
    ``enhanceStorage``).

    Example::

        storage = enhance_storage(
            MemoryStorage(),
            ttl=timedelta(days=30),
            migrations={1: lambda d: {"pizzas": d}, 2: lambda d: {**d, "size": "L"}},
        )

    Values are stored as records (see :mod:`ptb_sessions.storage._enhance`); values stored
    before the enhancement are read as data with no version and no expiry. If ``storage``
    supports the features natively (a ``_ptb_sessions_enhance(*, ttl, migrations, clock)``
    method, like :class:`~ptb_sessions.SQLAlchemyStorage`), that is used instead of a wrapper.
    The optional methods ``has``, ``keys``, ``items`` and ``lock`` are offered if ``storage``
    has them; ``keys``/``items`` skip expired values (without deleting them) and ``items``
    migrates values. With a ttl, ``has`` reads the value.

    Args:
        storage (:class:`~ptb_sessions.StorageAdapter`): The adapter to enhance.
        ttl (:obj:`float` | :class:`datetime.timedelta`, optional): A value not written for this
            many seconds expires: reading it returns :obj:`None` and deletes it. Every write
            restarts the period; reads do not. It expires when ``clock()`` is *after* the write
            time plus ``ttl``.
        migrations (Mapping[:obj:`float`, Callable[[Any], Any]], optional): Data version ->
            migration. Versions are numbers, sorted numerically (``10.1`` runs after ``10`` and
            before ``11``). A value with no version runs every migration, one at version ``v``
            those above ``v``; reads return migrated values (written back with the next write)
            and every write stores the latest version. :obj:`None` is not migrated.
        clock (Callable[[], :obj:`float`], optional): The time in seconds. Defaults to
            :func:`time.time`.

    Returns:
        :class:`~ptb_sessions.StorageAdapter`: The enhanced adapter.

    Raises:
        ValueError: ``ttl`` is not positive, ``migrations`` is empty or has a version that is
            not a number.
    """
    ttl_seconds = normalize_ttl(ttl)
    ordered = None if migrations is None else sorted_migrations(migrations)
    native = getattr(storage, "_ptb_sessions_enhance", None)
    if callable(native):
        return cast(
            StorageAdapter,
            native(
                ttl=ttl_seconds,
                migrations=None if ordered is None else dict(ordered),
                clock=clock,
            ),
        )
    return cast(StorageAdapter, _EnhancedStorage(storage, ttl_seconds, ordered, clock))
