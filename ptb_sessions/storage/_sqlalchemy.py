"""The :class:`SQLAlchemyStorage`: a session storage on the table of ptb-sessions."""

from __future__ import annotations

import contextlib
import datetime as dtm
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ptb_sessions._codec import Codec, JSONCodec
from ptb_sessions._groupcommit import GroupCommit
from ptb_sessions._rows import DEFAULT_MAX_VALUE_SIZE, decode_record, encode_value
from ptb_sessions._store import ANY_VERSION, Database, Record, Write, check_key
from ptb_sessions._url import DEFAULT_URL
from ptb_sessions.storage._base import ReadVersions
from ptb_sessions.storage._enhance import apply_migrations, normalize_ttl, sorted_migrations

__all__ = ["SQLAlchemyStorage"]


class SQLAlchemyStorage:
    """A :class:`~ptb_sessions.StorageAdapter` that keeps each session in a row of an SQL
    database: SQLite, PostgreSQL, MariaDB or MySQL.

    It keeps versions (see :class:`~ptb_sessions.StorageAdapter`): a write based on a stale
    read raises :class:`~ptb_sessions.ConflictError` instead of overwriting, also across
    processes. Timeouts and data migrations are stored in columns of the row (an expired row
    is deleted by :meth:`purge_expired` with one indexed statement), so
    :func:`~ptb_sessions.enhance_storage` on this storage returns a configured copy rather
    than a wrapper.

    Use :meth:`ptb_sessions.SQLAlchemyPersistence.storage` to share the persistence's
    database, or give a URL or engine.

    Args:
        url: An SQLAlchemy URL (sync URLs run on their asyncio driver) or
            :class:`~sqlalchemy.ext.asyncio.AsyncEngine`.
        namespace: The namespace of the rows; one per kind of session.
        codec: How values are encoded; :class:`~ptb_sessions.JSONCodec` by default.
        ttl: Seconds (or a :class:`~datetime.timedelta`) after the last write when a value
            expires.
        migrations: Versioned data migrations; see :func:`~ptb_sessions.enhance_storage`.
        auto_upgrade: Create or upgrade the schema on first use.
        clock: Seconds since the epoch; injected in tests.
        max_value_size: The largest encoded value in bytes (default 1 MiB); larger ones are
            rejected with :class:`~ptb_sessions.SerializationError`. :obj:`None`: no limit.
            :meth:`ptb_sessions.SQLAlchemyPersistence.storage` passes the persistence's.
    """

    __slots__ = (
        "_migrations",
        "_ttl",
        "_versions",
        "clock",
        "codec",
        "database",
        "max_value_size",
        "namespace",
    )

    def __init__(
        self,
        url: str | URL | AsyncEngine | Database = DEFAULT_URL,
        *,
        namespace: str = "session",
        codec: Codec | None = None,
        ttl: float | dtm.timedelta | None = None,
        migrations: Mapping[float, Callable[[Any], Any]] | None = None,
        auto_upgrade: bool = True,
        clock: Callable[[], float] = time.time,
        max_value_size: int | None = DEFAULT_MAX_VALUE_SIZE,
    ) -> None:
        self.database = (
            url
            if isinstance(url, Database)
            else Database(url, auto_upgrade=auto_upgrade, clock=clock)
        )
        check_key(namespace, "")
        self.namespace = namespace
        self.codec: Codec = codec if codec is not None else JSONCodec()
        self.clock = clock
        self.max_value_size = max_value_size
        self._ttl = normalize_ttl(ttl)
        self._migrations = sorted_migrations(migrations) if migrations is not None else None
        self._versions: ReadVersions[int] = ReadVersions()

    def __repr__(self) -> str:
        return f"SQLAlchemyStorage({self.database.masked_url!r}, namespace={self.namespace!r})"

    def _ptb_sessions_enhance(
        self,
        *,
        ttl: float | None,
        migrations: Mapping[float, Callable[[Any], Any]] | None,
        clock: Callable[[], float],
    ) -> SQLAlchemyStorage:
        return SQLAlchemyStorage(
            self.database,
            namespace=self.namespace,
            codec=self.codec,
            ttl=ttl,
            migrations=migrations,
            clock=clock,
            max_value_size=self.max_value_size,
        )

    def _decode(self, key: str, record: Record) -> Any:
        value = decode_record(self.codec, record, self.namespace, key)
        if self._migrations is not None:
            value, _ = apply_migrations(
                value, record.data_version, self._migrations, key=f"{self.namespace}[{key!r}]"
            )
        return value

    def _expired(self, record: Record) -> bool:
        return record.expires_at is not None and record.expires_at < self.clock()

    async def read(self, key: str) -> Any | None:
        """The value stored for ``key``, or :obj:`None` (nothing stored, or expired: an expired
        row is deleted).

        Raises:
            StorageError: The database failed or the row cannot be decoded; never
                :obj:`None` in that case.
            MigrationError: A data migration failed.
        """
        check_key(self.namespace, key)
        record = await GroupCommit.of(self.database).read(self.namespace, key)
        if record is not None and self._expired(record):
            GroupCommit.of(self.database).forget(self.namespace, key)
            await self.database.delete_if_expired(self.namespace, key)
            record = None
        if record is None:
            self._versions.remember(key, None)
            return None
        value = self._decode(key, record)
        self._versions.remember(key, record.version)
        return value

    async def write(self, key: str, value: Any) -> None:
        """Store ``value`` for ``key``.

        Raises:
            SerializationError: The value cannot be encoded; nothing is written.
            ConflictError: The row changed since this task read it; nothing is written.
            StorageError: The database failed.
        """
        check_key(self.namespace, key)
        codec, data = encode_value(
            self.codec, value, f"{self.namespace}[{key!r}]", self.max_value_size
        )
        await self._write(key, data, codec)

    async def delete(self, key: str) -> None:
        """Delete the value of ``key``, if any.

        Raises:
            ConflictError: The row changed since this task read it; nothing is deleted.
        """
        check_key(self.namespace, key)
        await self._write(key, None, self.codec.name)

    async def _write(self, key: str, data: str | None, codec: str) -> None:
        known, version = self._versions.pop(key)
        write = Write(
            self.namespace,
            key,
            data,
            codec,
            expected_version=version if known else ANY_VERSION,
            data_version=None if self._migrations is None else self._migrations[-1][0],
            expires_at=None if self._ttl is None else self.clock() + self._ttl,
        )
        await GroupCommit.of(self.database).write(write)

    async def has(self, key: str) -> bool:
        """Whether an unexpired value is stored for ``key``."""
        record = await self.database.get(self.namespace, key)
        return record is not None and not self._expired(record)

    async def keys(self) -> AsyncIterator[str]:
        """The keys of the unexpired values."""
        async for key, record in self.database.scan(self.namespace):
            if not self._expired(record):
                yield key

    async def items(self) -> AsyncIterator[tuple[str, Any]]:
        """The ``(key, value)`` pairs of the unexpired values, migrated."""
        async for key, record in self.database.scan(self.namespace):
            if not self._expired(record):
                yield key, self._decode(key, record)

    async def purge_expired(self) -> int:
        """Delete the expired rows of this namespace. Returns their count."""
        return await self.database.purge_expired(self.namespace)

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        """Hold a database lock on ``key`` (PostgreSQL, MariaDB, MySQL) so that several bot
        processes take turns; used by ``SessionHandler(lock="database")``. Under the lock,
        the key is read from the database, never from this process's cache."""
        async with self.database.row_lock(self.namespace, key):
            GroupCommit.of(self.database).forget(self.namespace, key)
            yield

    async def close(self) -> None:
        """Dispose the engine if this storage created it."""
        await self.database.dispose()
