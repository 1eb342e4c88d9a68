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

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from typing import Any, cast

from ptb_sessions._errors import ConflictError, SerializationError
from ptb_sessions._rowpolicy import (
    Migration,
    RowPolicy,
    is_number,
)
from ptb_sessions.storage._base import ReadVersions, StorageAdapter

__all__ = [
    "RECORD_MARKER",
    "enhance_storage",
    "is_record",
    "make_record",
    "parse_record",
]

RECORD_MARKER = "__ptb_sessions__"
"""The key that marks a record of an enhanced storage (its value is the layout version, 1)."""

_RECORD_KEYS = frozenset((RECORD_MARKER, "d", "v", "e"))
_EXPIRED_DELETE_ATTEMPTS = 5


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
        float(expires_at) if is_number(expires_at) else None,
    )


class _EnhancedStorage:
    """The adapter returned by :func:`enhance_storage` for adapters without native support.

    ``has``, ``keys``, ``items`` and ``lock`` exist only if the wrapped adapter has them. A
    plain adapter has no cheap way to refresh an expiry, so a read whose expiry is due for a
    refresh (or whose value was migrated) asks for a write-back: see :meth:`needs_writeback`.
    """

    __slots__ = ("_inner", "_policy", "_writeback", "has", "items", "keys", "lock")

    has: Callable[[str], Awaitable[bool]]
    keys: Callable[[], AsyncIterator[str]]
    items: Callable[[], AsyncIterator[tuple[str, Any]]]
    lock: Callable[[str], AbstractAsyncContextManager[Any]]

    def __init__(self, inner: StorageAdapter, policy: RowPolicy) -> None:
        self._inner = inner
        self._policy = policy
        self._writeback: ReadVersions[bool] = ReadVersions()
        if hasattr(inner, "has"):
            self.has = self._has
        if hasattr(inner, "keys"):
            self.keys = self._keys
        if hasattr(inner, "items"):
            self.items = self._items
        if hasattr(inner, "lock"):
            self.lock = inner.lock

    def __repr__(self) -> str:
        policy = self._policy
        versions = None if policy.migrations is None else [v for v, _ in policy.migrations]
        return f"enhance_storage({self._inner!r}, ttl={policy.ttl!r}, migrations={versions!r})"

    def _expired(self, stored: Any) -> bool:
        return self._policy.is_expired(parse_record(stored)[2])

    def _open(self, key: str, stored: Any) -> tuple[bool, Any, bool]:
        """``(expired, migrated value, needs a write-back)`` of what the inner adapter stores."""
        value, version, expires_at = parse_record(stored)
        if self._policy.is_expired(expires_at):
            return True, None, False
        if value is None:
            return False, None, False
        value, migrated = self._policy.migrate(value, version, repr(key))
        return False, value, migrated or self._policy.touch_due(expires_at)

    async def read(self, key: str) -> Any | None:
        """Read ``key``: :obj:`None` if nothing is stored or it expired (it is then deleted),
        else the value, migrated to the latest version.

        Raises:
            ptb_sessions.MigrationError: The stored version is newer than the latest migration,
                or a migration raised. The stored value is left as it was.
        """
        for _ in range(_EXPIRED_DELETE_ATTEMPTS):
            stored = await self._inner.read(key)
            if stored is None:
                self._writeback.remember(key, False)
                return None
            expired, value, writeback = self._open(key, stored)
            if not expired:
                self._writeback.remember(key, writeback)
                return value
            try:
                await self._inner.delete(key)
            except ConflictError:
                continue  # rewritten since our read: read the new value
            self._writeback.remember(key, False)
            return None
        raise ConflictError(
            f"Session key {key!r} kept changing while its expired value was being deleted"
        )

    def needs_writeback(self, key: str) -> bool:
        """Whether the value this task last read for ``key`` must be written back even if
        unchanged: it was migrated, or its expiry is due for a refresh."""
        return bool(self._writeback.pop(key)[1])

    async def write(self, key: str, value: Any) -> None:
        """Store ``value`` for ``key`` with the latest data version; restarts the ttl."""
        self._writeback.pop(key)
        policy = self._policy
        stored = make_record(value, version=policy.latest_version, expires_at=policy.expires_at())
        try:
            await self._inner.write(key, stored)
        except SerializationError as exc:
            if stored is not value and exc.path.startswith("['d']"):
                raise SerializationError(exc.reason, path=exc.path[5:], root=exc.root) from exc
            raise

    async def delete(self, key: str) -> None:
        """Delete ``key``."""
        self._writeback.pop(key)
        await self._inner.delete(key)

    async def _has(self, key: str) -> bool:
        if self._policy.ttl is None:
            return bool(await cast(Any, self._inner).has(key))
        stored = await self._inner.read(key)
        return stored is not None and not self._expired(stored)

    async def _keys(self) -> AsyncIterator[str]:
        inner = cast(Any, self._inner)
        if self._policy.ttl is None:
            async for key in inner.keys():
                yield key
            return
        if hasattr(inner, "items"):
            async for key, stored in inner.items():
                if not self._expired(stored):
                    yield key
            return
        async for key in inner.keys():
            stored = await inner.read(key)
            if stored is not None and not self._expired(stored):
                yield key

    async def _items(self) -> AsyncIterator[tuple[str, Any]]:
        async for key, stored in cast(Any, self._inner).items():
            expired, value, _ = self._open(key, stored)
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
        ttl (:obj:`float` | :class:`datetime.timedelta`, optional): An idle timeout: a value
            neither read nor written for this many seconds expires; reading it then returns
            :obj:`None` and deletes it. It expires when ``clock()`` is *after* its last use plus
            ``ttl``. A plain adapter cannot refresh an expiry cheaply, so a session read under a
            ttl is written back after the handler once a tenth of the ttl has passed. A value
            stored before the ttl was turned on starts its clock at its first read.
        migrations (Mapping[:obj:`float`, Callable[[Any], Any]], optional): Data version ->
            migration. Versions are numbers, sorted numerically (``10.1`` runs after ``10`` and
            before ``11``). A value with no version runs every migration, one at version ``v``
            those above ``v``; reads return migrated values (a session writes them back after the
            handler, even if it changed nothing) and every write stores the latest version.
            :obj:`None` is not migrated.
        clock (Callable[[], :obj:`float`], optional): The time in seconds. Defaults to
            :func:`time.time`.

    Returns:
        :class:`~ptb_sessions.StorageAdapter`: The enhanced adapter.

    Raises:
        ValueError: ``ttl`` is not positive, ``migrations`` is empty or has a version that is
            not a number.
    """
    policy = RowPolicy(ttl=ttl, migrations=migrations, clock=clock)
    native = getattr(storage, "_ptb_sessions_enhance", None)
    if callable(native):
        migrations_in_order = None if policy.migrations is None else dict(policy.migrations)
        return cast(
            StorageAdapter, native(ttl=policy.ttl, migrations=migrations_in_order, clock=clock)
        )
    return cast(StorageAdapter, _EnhancedStorage(storage, policy))
