"""The :class:`SQLAlchemyStorage`: a session storage on the table of ptb-sessions."""

from __future__ import annotations

import contextlib
import datetime as dtm
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from ptb_sessions._codec import Codec
from ptb_sessions._groupcommit import GroupCommit
from ptb_sessions._rowpolicy import DEFAULT_MAX_VALUE_SIZE, RowPolicy
from ptb_sessions._store import ANY_VERSION, DEFAULT_SESSION_CACHE, Database, check_key
from ptb_sessions._url import DEFAULT_URL
from ptb_sessions.storage._base import ReadVersions

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
        ttl: The idle timeout in seconds (or a :class:`~datetime.timedelta`): a value
            neither read nor written for this long expires (SPEC 4).
        migrations: Versioned data migrations; see :func:`~ptb_sessions.enhance_storage`.
        auto_upgrade: Create or upgrade the schema on first use.
        clock: Seconds since the epoch; injected in tests.
        max_value_size: The largest encoded value in bytes (default 1 MiB); larger ones are
            rejected with :class:`~ptb_sessions.SerializationError`. :obj:`None`: no limit.
            :meth:`ptb_sessions.SQLAlchemyPersistence.storage` passes the persistence's.
        session_cache: How many rows this process keeps after reading or writing them, so
            that the next read of a key goes to no database (default 10,000); see
            :class:`~ptb_sessions.SQLAlchemyPersistence`. A storage of
            :meth:`ptb_sessions.SQLAlchemyPersistence.storage` shares the persistence's.
    """

    __slots__ = ("_reads", "database", "namespace", "policy")

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
        session_cache: int = DEFAULT_SESSION_CACHE,
    ) -> None:
        self.database = (
            url
            if isinstance(url, Database)
            else Database(url, auto_upgrade=auto_upgrade, clock=clock, session_cache=session_cache)
        )
        check_key(namespace, "")
        self.namespace = namespace
        #: The row policy: codec, size limit, ttl, migrations and clock.
        self.policy = RowPolicy(
            codec, max_value_size=max_value_size, ttl=ttl, migrations=migrations, clock=clock
        )
        # What this task's last read found: the version, and whether it was migrated.
        self._reads: ReadVersions[tuple[int | None, bool]] = ReadVersions()

    @property
    def codec(self) -> Codec:
        """The codec of the values."""
        return self.policy.codec

    def __repr__(self) -> str:
        return f"SQLAlchemyStorage({self.database.masked_url!r}, namespace={self.namespace!r})"

    def _ptb_sessions_enhance(
        self,
        *,
        ttl: float | None,
        migrations: Mapping[float, Callable[[Any], Any]] | None,
        clock: Callable[[], float],
    ) -> SQLAlchemyStorage:
        policy = self.policy
        return SQLAlchemyStorage(
            self.database,
            namespace=self.namespace,
            codec=policy.codec,
            ttl=ttl,
            migrations=migrations,
            clock=clock,
            max_value_size=policy.max_value_size,
        )

    async def read(self, key: str) -> Any | None:
        """The value stored for ``key``, or :obj:`None` (nothing stored, or expired: an expired
        row is deleted). With a ttl, the read refreshes the expiry (a cheap update of the
        expiry only, skipped while less than a tenth of the ttl has passed).

        Raises:
            StorageError: The database failed or the row cannot be decoded; never
                :obj:`None` in that case.
            MigrationError: A data migration failed.
        """
        check_key(self.namespace, key)
        policy = self.policy
        group = GroupCommit.of(self.database)
        record = await group.read(self.namespace, key)
        opened = None if record is None else policy.open(record, self.namespace, key)
        if record is None or opened is None:
            if record is not None:
                group.forget(self.namespace, key)
                await self.database.delete_if_expired(self.namespace, key, now=policy.clock())
            self._reads.remember(key, (None, False))
            return None
        if opened.touch:
            await group.touch(self.namespace, key, policy.expires_at())
        self._reads.remember(key, (record.version, opened.migrated))
        return opened.value

    def needs_writeback(self, key: str) -> bool:
        """Whether the value this task last read for ``key`` was migrated, so that it must be
        written back at the latest data version even if unchanged."""
        read = self._reads.peek(key)[1]
        return read is not None and read[1]

    async def write(self, key: str, value: Any) -> None:
        """Store ``value`` for ``key``.

        Raises:
            SerializationError: The value cannot be encoded; nothing is written.
            ConflictError: The row changed since this task read it; nothing is written.
            StorageError: The database failed.
        """
        check_key(self.namespace, key)
        write = self.policy.write(self.namespace, key, value)
        write.expected_version = self._expected_version(key)
        await GroupCommit.of(self.database).write(write)

    async def delete(self, key: str) -> None:
        """Delete the value of ``key``, if any.

        Raises:
            ConflictError: The row changed since this task read it; nothing is deleted.
        """
        check_key(self.namespace, key)
        write = self.policy.delete(self.namespace, key)
        write.expected_version = self._expected_version(key)
        await GroupCommit.of(self.database).write(write)

    def _expected_version(self, key: str) -> int | None:
        """The version this task read for ``key`` (forgotten now), or :data:`ANY_VERSION`."""
        known, read = self._reads.pop(key)
        return read[0] if known and read is not None else ANY_VERSION

    async def has(self, key: str) -> bool:
        """Whether an unexpired value is stored for ``key``."""
        record = await self.database.get(self.namespace, key)
        return record is not None and not self.policy.is_expired(record.expires_at)

    async def keys(self) -> AsyncIterator[str]:
        """The keys of the unexpired values."""
        async for key, record in self.database.scan(self.namespace):
            if not self.policy.is_expired(record.expires_at):
                yield key

    async def items(self) -> AsyncIterator[tuple[str, Any]]:
        """The ``(key, value)`` pairs of the unexpired values, migrated."""
        async for key, record in self.database.scan(self.namespace):
            opened = self.policy.open(record, self.namespace, key)
            if opened is not None:
                yield key, opened.value

    async def purge_expired(self) -> int:
        """Delete the expired rows of this namespace. Returns their count."""
        return await self.database.purge_expired(self.namespace, now=self.policy.clock())

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        """Hold a database lock on ``key`` (PostgreSQL, MariaDB, MySQL) so that several bot
        processes take turns; used by ``SessionHandler(lock="database")``. Under the lock,
        the key is read from the database, never from this process's cache, and the cache
        keeps nothing of it afterwards (another process may change it next)."""
        group = GroupCommit.of(self.database)
        async with self.database.row_lock(self.namespace, key):
            group.forget(self.namespace, key)
            try:
                yield
            finally:
                group.forget(self.namespace, key)

    async def close(self) -> None:
        """Dispose the engine if this storage created it."""
        await self.database.dispose()
