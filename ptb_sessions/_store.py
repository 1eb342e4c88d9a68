"""The database layer shared by :class:`~ptb_sessions.SQLAlchemyPersistence` and
:class:`~ptb_sessions.SQLAlchemyStorage`: one table, versioned rows, batched writes.

Nothing here knows about PTB or about codecs beyond the text stored in a row: callers encode
values and compare encodings; this module reads and writes rows, checks row versions and turns
database failures into :class:`~ptb_sessions.StorageError` with the URL's password masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from sqlalchemy import Integer, String, Table, any_, bindparam, delete, event, select, text, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ptb_sessions import _alembic
from ptb_sessions._errors import ConflictError, SchemaError, StorageError
from ptb_sessions._schema import MAX_KEY_LENGTH, MAX_NAMESPACE_LENGTH, StoredRow
from ptb_sessions._url import mask_secrets, mask_url, to_async_url
from ptb_sessions.storage._base import conflict_error

__all__ = ["ANY_VERSION", "Database", "Record", "Write"]

_LOGGER = logging.getLogger(__name__)
_TABLE: Table = cast(Table, StoredRow.__table__)
_C = _TABLE.c

#: ``Write.expected_version`` that skips the version check (a blind write).
ANY_VERSION: Final = -1
#: The PostgreSQL advisory lock id of schema upgrades ("ptbs" in ASCII).
_SCHEMA_LOCK_ID: Final = 0x70746273
_PG_LOCK_SCHEMA = text("SELECT pg_advisory_lock(:id)")
_PG_UNLOCK_SCHEMA = text("SELECT pg_advisory_unlock(:id)")
#: How often a transaction that lost a deadlock to another process is tried again.
_DEADLOCK_RETRIES: Final = 5
#: How many keys go into one ``IN (...)`` list.
_CHUNK: Final = 500


@dataclass(slots=True, frozen=True)
class Record:
    """A stored row as read from the database (the value still encoded)."""

    codec: str
    data: str | None
    version: int
    data_version: float | None
    touched_at: float
    expires_at: float | None


@dataclass(slots=True)
class Write:
    """One pending change of a row.

    ``data`` is :obj:`None` to delete the row. ``expected_version`` is the version the writer
    read (:obj:`None`: the writer saw no row; :data:`ANY_VERSION`: no check).
    """

    namespace: str
    key: str
    data: str | None
    codec: str = "json"
    expected_version: int | None = ANY_VERSION
    data_version: float | None = None
    expires_at: float | None = None
    #: Filled in by :meth:`Database.apply`: the version now stored (:obj:`None` if deleted).
    new_version: int | None = field(default=None, compare=False)


def check_key(namespace: str, key: str) -> None:
    """Raise :exc:`ValueError` if ``namespace`` or ``key`` cannot be stored."""
    if not isinstance(key, str):
        raise ValueError(f"{namespace}[{key!r}]: keys must be str, not {type(key).__name__}")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(
            f"{namespace}[{key[:40]!r}...]: key is {len(key)} characters long; at most "
            f"{MAX_KEY_LENGTH} can be stored"
        )
    if "\x00" in key:
        raise ValueError(f"{namespace}[{key!r}]: keys cannot contain NUL characters")
    if not key.isascii():
        try:
            key.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{namespace}[{key!r}]: keys must be valid Unicode (no lone surrogates)"
            ) from None
    if not namespace or len(namespace) > MAX_NAMESPACE_LENGTH:
        raise ValueError(
            f"namespace {namespace!r} must be 1 to {MAX_NAMESPACE_LENGTH} characters long"
        )


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Database:
    """The table of ptb-sessions in one database.

    Args:
        url: An SQLAlchemy URL (sync URLs are run on their asyncio driver) or an
            :class:`~sqlalchemy.ext.asyncio.AsyncEngine`. An engine created here is disposed by
            :meth:`dispose` and created again when used afterwards; an engine passed in is never
            disposed here.
        auto_upgrade: Upgrade the schema to the newest revision on first use. If :obj:`False`,
            an outdated schema raises :class:`~ptb_sessions.SchemaError`.
        clock: Seconds since the epoch, for ``touched_at``.
    """

    __slots__ = (
        "_engine",
        "_fast_idle",
        "_fast_slots",
        "_owns_engine",
        "_ready",
        "_ready_lock",
        "_sqlite_driver",
        "_url",
        "auto_upgrade",
        "clock",
        "fast_connections",
    )

    def __init__(
        self,
        url: str | URL | AsyncEngine,
        *,
        auto_upgrade: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(url, AsyncEngine):
            self._engine: AsyncEngine | None = url
            self._url: URL = url.url
            self._owns_engine = False
        else:
            self._engine = None
            self._url = to_async_url(url)
            self._owns_engine = True
        self.auto_upgrade = auto_upgrade
        self.clock = clock
        self._ready = False
        self._ready_lock = asyncio.Lock()
        #: How many connections are kept open for single-row reads and writes.
        self.fast_connections = 1 if self.dialect == "sqlite" else 4
        self._fast_idle: list[AsyncConnection] = []
        self._sqlite_driver: Any = None
        self._fast_slots: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"Database({self.masked_url!r})"

    @property
    def masked_url(self) -> str:
        """The database URL with its password replaced by ``***``."""
        return mask_url(self._url)

    @property
    def dialect(self) -> str:
        """``sqlite``, ``postgresql``, ``mysql`` or ``mariadb``."""
        return self._url.get_backend_name()

    @property
    def engine(self) -> AsyncEngine:
        """The engine, created on first use."""
        if self._engine is None:
            kwargs: dict[str, Any] = {}
            if self.dialect == "sqlite":
                kwargs["connect_args"] = {"timeout": 30}
            else:
                # No pre-ping (a round trip per checkout): a dropped connection fails its
                # statement, is invalidated, and the next one is new.
                kwargs["pool_recycle"] = 1800
            self._engine = create_async_engine(self._url, **kwargs)
            if self.dialect == "sqlite":
                event.listen(self._engine.sync_engine, "connect", _sqlite_on_connect)
                event.listen(self._engine.sync_engine, "begin", _sqlite_on_begin)
        return self._engine

    async def dispose(self) -> None:
        """Close the kept connections, and the engine's if the engine was created here."""
        idle, self._fast_idle = self._fast_idle, []
        self._fast_slots = None
        self._sqlite_driver = None
        for connection in idle:
            with contextlib.suppress(Exception):
                await connection.close()
        if self._owns_engine and self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    # -- errors ---------------------------------------------------------------------------

    def error(self, exc: BaseException, what: str) -> StorageError:
        """A :class:`~ptb_sessions.StorageError` for ``exc`` raised while doing ``what``."""
        if isinstance(exc, StorageError):
            return exc
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = detail[0] if detail else type(exc).__name__
        reason = mask_secrets(reason, self._url)
        return StorageError(f"{what} failed on {self.masked_url}: {type(exc).__name__}: {reason}")

    @staticmethod
    def is_connection_error(exc: BaseException) -> bool:
        """Whether ``exc`` means the database is unreachable (rather than a row being bad)."""
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, OSError | ConnectionError | asyncio.TimeoutError):
            return True
        name = type(getattr(exc, "orig", exc)).__name__
        return "Connection" in name or "Interface" in name or "OperationalError" in name

    # -- schema -------------------------------------------------------------------------

    async def ensure_schema(self) -> None:
        """Check the schema once, upgrading it if ``auto_upgrade``.

        Raises:
            SchemaError: The schema is outdated and ``auto_upgrade`` is off.
            StorageError: The database cannot be reached.
        """
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            head = _alembic.head_revision()
            try:
                current = await _alembic.checked_revision(self.engine, create=self.auto_upgrade)
                if current != head and self.auto_upgrade:
                    async with self._schema_lock():
                        # Another process may have upgraded while this one waited.
                        current = await _alembic.current_revision(self.engine)
                        if current != head:
                            _LOGGER.info(
                                "Upgrading %s from revision %s to %s",
                                self.masked_url,
                                current,
                                head,
                            )
                            await _alembic.upgrade(self.engine, head)
                            current = await _alembic.current_revision(self.engine)
            except SQLAlchemyError as exc:
                raise self.error(exc, "Checking the database schema") from exc
            except OSError as exc:
                raise self.error(exc, "Checking the database schema") from exc
            if current != head:
                raise SchemaError(
                    f"The database {self.masked_url} is at schema revision "
                    f"{current or 'none (empty database)'}, but ptb-sessions needs revision "
                    f"{head}. Run `ptb-sessions --url '{self.masked_url}' db upgrade` (or "
                    f"`alembic -x url='{self.masked_url}' upgrade head` from the ptb-sessions "
                    f"repository), or pass auto_upgrade=True."
                )
            self._ready = True

    @contextlib.asynccontextmanager
    async def _schema_lock(self) -> AsyncIterator[None]:
        """Serialize schema upgrades across processes (PostgreSQL advisory lock, MariaDB/MySQL
        ``GET_LOCK``), so two bots starting on an empty database do not both create it. On
        SQLite the upgrade's own ``BEGIN IMMEDIATE`` transaction serializes them."""
        if self.dialect == "sqlite":
            yield
            return
        async with self.engine.connect() as connection:
            if self.dialect == "postgresql":
                await connection.execute(_PG_LOCK_SCHEMA, {"id": _SCHEMA_LOCK_ID})
            else:
                await connection.execute(text("SELECT GET_LOCK('ptb_sessions_schema', 300)"))
            await connection.commit()
            try:
                yield
            finally:
                if self.dialect == "postgresql":
                    await connection.execute(_PG_UNLOCK_SCHEMA, {"id": _SCHEMA_LOCK_ID})
                else:
                    await connection.execute(text("SELECT RELEASE_LOCK('ptb_sessions_schema')"))
                await connection.commit()

    @contextlib.asynccontextmanager
    async def connect(
        self, what: str, *, read_only: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, committed at the end; errors become StorageError.
        On SQLite a write transaction takes the write lock at its start (``BEGIN IMMEDIATE``)
        and a ``read_only`` one does not."""
        await self.ensure_schema()
        try:
            async with self.engine.connect() as connection:
                if read_only:
                    await connection.execution_options(ptb_sessions_read_only=True)
                async with connection.begin():
                    yield connection
        except (SQLAlchemyError, OSError) as exc:
            raise self.error(exc, what) from exc

    @contextlib.asynccontextmanager
    async def autocommit(self, what: str) -> AsyncIterator[AsyncConnection]:
        """A connection without a transaction, for single statements (atomic by themselves):
        one round trip each, no ``BEGIN``/``COMMIT``. Errors become StorageError.

        These connections are kept open (at most :attr:`fast_connections`), so the hot path
        of sessions pays no pool checkout and no reset; one that fails is closed.
        """
        await self.ensure_schema()
        if self.dialect == "sqlite":
            async with self._sqlite_autocommit(what) as shared:
                yield shared
            return
        if self._fast_slots is None:
            self._fast_slots = asyncio.Semaphore(self.fast_connections)
        async with self._fast_slots:
            connection: AsyncConnection | None = self._fast_idle.pop() if self._fast_idle else None
            try:
                if connection is None:
                    connection = await self.engine.connect()
                    await connection.execution_options(isolation_level="AUTOCOMMIT")
                yield connection
            except (SQLAlchemyError, OSError, sqlite3.Error) as exc:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.invalidate()
                    connection = None
                raise self.error(exc, what) from exc
            except BaseException:
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
                    connection = None
                raise
            finally:
                if connection is not None:
                    self._fast_idle.append(connection)

    async def _run(
        self, connection: AsyncConnection, statement: Any, params: dict[str, Any]
    ) -> tuple[list[Any], int]:
        """Execute one prebuilt statement: ``(rows, rowcount)``.

        On SQLite it goes straight to the aiosqlite connection, compiled once: one trip to
        the driver's thread instead of the four (cursor, execute, fetch, close) of SQLAlchemy's
        adaptation, which is most of the cost of a session read or write there.
        """
        if self.dialect != "sqlite":
            result = await connection.execute(statement, params)
            rows: list[Any] = list(result.all()) if result.returns_rows else []
            return rows, (len(rows) if result.returns_rows else result.rowcount)
        sql, names, literals = _compiled_for_sqlite(statement)
        args = tuple(params[name] if name in params else literals[name] for name in names)
        driver = self._sqlite_driver  # the shared connection's (see _sqlite_autocommit)
        assert driver is not None
        if statement.is_select:
            rows = list(await driver.execute_fetchall(sql, args))
            return rows, len(rows)
        cursor = await driver.execute(sql, args)
        return [], cursor.rowcount

    @contextlib.asynccontextmanager
    async def _sqlite_autocommit(self, what: str) -> AsyncIterator[AsyncConnection]:
        """One connection shared by every single-row statement at once: its statements go
        straight to the driver (:meth:`_run`), whose thread runs them in turn, so concurrent
        updates pipeline through it without waiting for each other's round trips."""
        if not self._fast_idle:
            async with self._ready_lock:
                if not self._fast_idle:
                    try:
                        connection = await self.engine.connect()
                        await connection.execution_options(isolation_level="AUTOCOMMIT")
                    except (SQLAlchemyError, OSError, sqlite3.Error) as exc:
                        raise self.error(exc, what) from exc
                    driver = (await connection.get_raw_connection()).driver_connection
                    self._sqlite_driver = driver
                    self._fast_idle.append(connection)
        connection = self._fast_idle[0]
        try:
            yield connection
        except (SQLAlchemyError, OSError, sqlite3.Error) as exc:
            if self._fast_idle and self._fast_idle[0] is connection:
                self._fast_idle.clear()
                self._sqlite_driver = None
                with contextlib.suppress(Exception):
                    await connection.invalidate()
            raise self.error(exc, what) from exc

    # -- reads --------------------------------------------------------------------------

    async def get(self, namespace: str, key: str) -> Record | None:
        """The row of ``key`` in ``namespace``, or :obj:`None`."""
        async with self.autocommit(f"Reading {namespace}[{key!r}]") as connection:
            rows, _ = await self._run(connection, _GET_ONE, {"ns": namespace, "k": key})
        return Record(*rows[0]) if rows else None

    async def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, Record]:
        """The rows of ``keys`` that exist in ``namespace``."""
        found: dict[str, Record] = {}
        async with self.connect(
            f"Reading {len(keys)} keys of {namespace}", read_only=True
        ) as connection:
            for chunk in _chunks(keys):
                result = await connection.execute(
                    select(_C.key, *_RECORD_COLUMNS).where(
                        _C.namespace == namespace, self._key_in(chunk)
                    )
                )
                for key, *rest in result:
                    found[key] = Record(*rest)
        return found

    async def scan(
        self, namespace: str, *, batch_size: int = 5000
    ) -> AsyncIterator[tuple[str, Record]]:
        """Every row of ``namespace``, in key order, fetched in batches (keyset pagination, so
        memory does not grow with the table)."""
        last: str | None = None
        while True:
            query = select(_C.key, *_RECORD_COLUMNS).where(_C.namespace == namespace)
            if last is not None:
                query = query.where(_C.key > last)
            query = query.order_by(_C.key).limit(batch_size)
            async with self.connect(f"Reading {namespace}", read_only=True) as connection:
                rows = (await connection.execute(query)).all()
            for key, *rest in rows:
                yield key, Record(*rest)
            if len(rows) < batch_size:
                return
            last = rows[-1][0]

    async def namespaces(self) -> list[str]:
        """Every namespace that has rows."""
        async with self.connect("Listing namespaces") as connection:
            result = await connection.execute(select(_C.namespace).distinct())
            return sorted(row[0] for row in result)

    # -- writes -------------------------------------------------------------------------

    async def apply(self, writes: Sequence[Write]) -> dict[tuple[str, str], StorageError]:
        """Apply ``writes`` in one transaction, checking row versions.

        A write whose ``expected_version`` does not match the stored row is not applied and
        gets a :class:`~ptb_sessions.ConflictError`; the others are applied. If the
        transaction fails as a whole, the writes are retried one by one, each in its own
        transaction, so a row the database rejects fails for its key only. Each applied write
        gets its ``new_version``.

        Returns:
            The errors of the writes that were not applied, by ``(namespace, key)``.

        Raises:
            StorageError: The database cannot be reached; nothing was applied.
        """
        if not writes:
            return {}
        try:
            for attempt in range(_DEADLOCK_RETRIES):
                try:
                    async with self.connect(f"Writing {len(writes)} rows") as connection:
                        return await self._apply(connection, writes)
                except StorageError as exc:
                    if attempt + 1 == _DEADLOCK_RETRIES or not _is_deadlock(exc.__cause__):
                        raise
                    await asyncio.sleep(0.01 * (attempt + 1))
        except StorageError as exc:
            if len(writes) == 1 or self.is_connection_error(exc.__cause__ or exc):
                if len(writes) == 1:
                    return {(writes[0].namespace, writes[0].key): exc}
                raise
            _LOGGER.warning(
                "A batch of %d writes failed (%s); retrying one by one", len(writes), exc
            )
        errors: dict[tuple[str, str], StorageError] = {}
        for write in writes:
            try:
                async with self.connect(f"Writing {write.namespace}[{write.key!r}]") as connection:
                    errors.update(await self._apply(connection, [write]))
            except StorageError as exc:
                if self.is_connection_error(exc.__cause__ or exc):
                    raise
                errors[(write.namespace, write.key)] = exc
        return errors

    async def _apply(
        self, connection: AsyncConnection, writes: Sequence[Write]
    ) -> dict[tuple[str, str], StorageError]:
        now = self.clock()
        errors: dict[tuple[str, str], StorageError] = {}
        current = await self._lock_versions(connection, writes)
        upserts: list[dict[str, Any]] = []
        deletes: dict[str, list[str]] = {}
        for write in writes:
            where = (write.namespace, write.key)
            stored = current.get(where)
            expected = write.expected_version
            if expected != ANY_VERSION and expected != stored:
                errors[where] = ConflictError(
                    f"{write.namespace}[{write.key!r}] was changed by another writer since it "
                    f"was read (stored version {stored}, read version {expected}); this write "
                    "was dropped and the key will be read again"
                )
                continue
            if write.data is None:
                if stored is not None:
                    deletes.setdefault(write.namespace, []).append(write.key)
                write.new_version = None
                continue
            write.new_version = new_version() if stored is None else stored + 1
            upserts.append(
                {
                    "namespace": write.namespace,
                    "key": write.key,
                    "codec": write.codec,
                    "data": write.data,
                    "version": write.new_version,
                    "data_version": write.data_version,
                    "touched_at": now,
                    "expires_at": write.expires_at,
                }
            )
        if self.dialect == "sqlite":
            await self._sqlite_write_many(connection, deletes, upserts)
            return errors
        for namespace, keys in deletes.items():
            for chunk in _chunks(keys):
                await connection.execute(
                    delete(_TABLE).where(_C.namespace == namespace, self._key_in(chunk))
                )
        if upserts:
            await connection.execute(self._upsert_statement(), upserts)
        return errors

    @staticmethod
    async def _sqlite_write_many(
        connection: AsyncConnection, deletes: dict[str, list[str]], upserts: list[dict[str, Any]]
    ) -> None:
        """The deletes and upserts of a batch, each as one ``executemany`` on the driver: one
        trip to its thread instead of SQLAlchemy's per-row parameter processing."""
        driver = (await connection.get_raw_connection()).driver_connection
        assert driver is not None
        if deletes:
            await driver.executemany(
                _SQLITE_DELETE_MANY,
                [(namespace, key) for namespace, keys in deletes.items() for key in keys],
            )
        if upserts:
            await driver.executemany(
                _SQLITE_UPSERT_MANY,
                [
                    (
                        row["namespace"],
                        row["key"],
                        row["codec"],
                        row["data"],
                        row["version"],
                        row["data_version"],
                        row["touched_at"],
                        row["expires_at"],
                    )
                    for row in upserts
                ],
            )

    async def _lock_versions(
        self, connection: AsyncConnection, writes: Sequence[Write]
    ) -> dict[tuple[str, str], int]:
        """The stored versions of the rows of ``writes``, locked for update (SQLite: the whole
        database is, by ``BEGIN IMMEDIATE``)."""
        by_namespace: dict[str, list[str]] = {}
        for write in writes:
            by_namespace.setdefault(write.namespace, []).append(write.key)
        versions: dict[tuple[str, str], int] = {}
        if self.dialect == "sqlite":
            driver = (await connection.get_raw_connection()).driver_connection
            assert driver is not None
            for namespace, keys in by_namespace.items():
                for chunk in _chunks(keys):
                    placeholders = ",".join("?" * len(chunk))
                    rows = await driver.execute_fetchall(
                        f"SELECT key, version FROM {_TABLE.name} "
                        f"WHERE namespace = ? AND key IN ({placeholders})",
                        (namespace, *chunk),
                    )
                    for key, version in rows:
                        versions[(namespace, key)] = version
            return versions
        if self.dialect == "postgresql":
            for namespace, keys in by_namespace.items():
                # A join on unnest() keeps the primary-key lookups whatever the statistics of
                # the table (with `key = ANY(...)` a fresh, unanalyzed table is scanned).
                result = await connection.execute(
                    _PG_LOCK_VERSIONS, {"ns": namespace, "keys": keys}
                )
                for key, version in result:
                    versions[(namespace, key)] = version
            return versions
        for namespace, keys in by_namespace.items():
            for chunk in _chunks(keys):
                query = select(_C.key, _C.version).where(
                    _C.namespace == namespace, self._key_in(chunk)
                )
                if self.dialect != "sqlite":
                    query = query.with_for_update()
                for key, version in await connection.execute(query):
                    versions[(namespace, key)] = version
        return versions

    async def write_one(self, write: Write) -> None:
        """Apply one write with a single statement, atomic by itself: a conditional
        ``UPDATE``/``DELETE`` (version check), an ``INSERT`` (nothing stored expected), or an
        upsert/delete without a check. Sets ``write.new_version`` (:obj:`None` when unknown,
        after an unchecked write, or deleted).

        Raises:
            ConflictError: The stored version is not ``write.expected_version``.
            StorageError: The database failed.
        """
        ns, key, expected = write.namespace, write.key, write.expected_version
        params = {
            "ns": ns,
            "k": key,
            "codec": write.codec,
            "data": write.data,
            "data_version": write.data_version,
            "touched_at": self.clock(),
            "expires_at": write.expires_at,
            "expected": expected,
        }
        conflict = False
        async with self.autocommit(f"Writing {ns}[{key!r}]") as connection:
            if write.data is None:
                write.new_version = None
                if expected == ANY_VERSION:
                    await self._run(connection, _DELETE_ONE, params)
                elif expected is None:
                    rows, _ = await self._run(connection, _GET_ONE, params)
                    conflict = bool(rows)
                else:
                    _, count = await self._run(connection, _DELETE_IF_VERSION, params)
                    conflict = not count
            elif expected is None:
                write.new_version = params["version"] = new_version()
                try:
                    _, count = await self._run(connection, self._insert_new(), params)
                    conflict = not count
                except IntegrityError:
                    conflict = True
            elif expected == ANY_VERSION:
                write.new_version = None
                params["version"] = new_version()
                await self._run(connection, self._blind_upsert(), params)
            else:
                write.new_version = params["version"] = expected + 1
                _, count = await self._run(connection, _UPDATE_IF_VERSION, params)
                conflict = not count
        if conflict:
            raise conflict_error(key, f"namespace {ns!r}")

    def _insert_new(self) -> Any:
        """``INSERT`` one row unless its key exists (then 0 rows; MySQL: IntegrityError)."""
        if self.dialect == "postgresql":
            return _PG_INSERT_NEW
        if self.dialect == "sqlite":
            return _SQLITE_INSERT_NEW
        return _INSERT_ONE

    def _blind_upsert(self) -> Any:
        if self.dialect == "postgresql":
            return _PG_UPSERT_ONE
        if self.dialect == "sqlite":
            return _SQLITE_UPSERT_ONE
        return _MYSQL_UPSERT_ONE

    def _key_in(self, keys: Sequence[str]) -> Any:
        """``key IN (...)``; on PostgreSQL ``key = ANY(:array)``, which the planner handles
        with the index however many keys there are."""
        if self.dialect == "postgresql":
            return _C.key == any_(bindparam("keys", list(keys), type_=ARRAY(String)))
        return _C.key.in_(keys)

    def _upsert_statement(self) -> Any:
        columns = ("codec", "data", "version", "data_version", "touched_at", "expires_at")
        if self.dialect == "postgresql":
            stmt = postgresql.insert(_TABLE)
            return stmt.on_conflict_do_update(
                index_elements=[_C.namespace, _C.key],
                set_={name: stmt.excluded[name] for name in columns},
            )
        if self.dialect == "sqlite":
            lite = sqlite.insert(_TABLE)
            return lite.on_conflict_do_update(
                index_elements=[_C.namespace, _C.key],
                set_={name: lite.excluded[name] for name in columns},
            )
        my = mysql.insert(_TABLE)
        return my.on_duplicate_key_update({name: my.inserted[name] for name in columns})

    async def touch(self, namespace: str, keys: Sequence[str], expires_at: float | None) -> None:
        """Set ``touched_at`` to now and ``expires_at`` of ``keys`` (a load with a ttl)."""
        now = self.clock()
        async with self.connect(f"Refreshing the expiry of {namespace}") as connection:
            for chunk in _chunks(keys):
                await connection.execute(
                    update(_TABLE)
                    .where(_C.namespace == namespace, self._key_in(chunk))
                    .values(touched_at=now, expires_at=expires_at)
                )

    async def touch_namespace(self, namespace: str, expires_at: float) -> None:
        """Set ``expires_at`` of every unexpired row of ``namespace`` (an eager load)."""
        now = self.clock()
        async with self.connect(f"Refreshing the expiry of {namespace}") as connection:
            await connection.execute(
                update(_TABLE)
                .where(
                    _C.namespace == namespace,
                    (_C.expires_at.is_(None)) | (_C.expires_at >= now),
                )
                .values(touched_at=now, expires_at=expires_at)
            )

    async def delete_if_expired(self, namespace: str, key: str) -> bool:
        """Delete the row of ``key`` if it has expired. Whether it was deleted."""
        now = self.clock()
        async with self.connect(f"Deleting the expired {namespace}[{key!r}]") as connection:
            result = await connection.execute(
                delete(_TABLE).where(_C.namespace == namespace, _C.key == key, _C.expires_at < now)
            )
        return bool(result.rowcount)

    async def purge_expired(self, namespace: str | None = None) -> int:
        """Delete every expired row (uses the index on ``expires_at``). Returns the count."""
        now = self.clock()
        query = delete(_TABLE).where(_C.expires_at < now)
        if namespace is not None:
            query = query.where(_C.namespace == namespace)
        async with self.connect("Deleting expired rows") as connection:
            result = await connection.execute(query)
        return int(result.rowcount or 0)

    async def move_keys(
        self, moves: Sequence[tuple[str, str, str]]
    ) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
        """Rename rows ``(namespace, old_key, new_key)`` in one transaction. A row whose new key
        already exists is left where it is.

        Returns:
            The moves done and the moves skipped because the new key was taken.
        """
        done: list[tuple[str, str, str]] = []
        skipped: list[tuple[str, str, str]] = []
        if not moves:
            return done, skipped
        async with self.connect(f"Moving {len(moves)} rows") as connection:
            for namespace, old, new in moves:
                exists = (
                    await connection.execute(
                        select(_C.version).where(_C.namespace == namespace, _C.key == old)
                    )
                ).first()
                if exists is None:
                    continue
                taken = (
                    await connection.execute(
                        select(_C.version).where(_C.namespace == namespace, _C.key == new)
                    )
                ).first()
                if taken is not None:
                    skipped.append((namespace, old, new))
                    continue
                result = await connection.execute(
                    update(_TABLE)
                    .where(_C.namespace == namespace, _C.key == old)
                    .values(key=new, version=_C.version + 1)
                )
                if result.rowcount:
                    done.append((namespace, old, new))
        return done, skipped

    async def keys_containing(self, namespace: str, part: str) -> list[str]:
        """The keys of ``namespace`` that contain ``part`` (a scan: for rare maintenance)."""
        escaped = part.replace("!", "!!").replace("%", "!%").replace("_", "!_")
        async with self.connect(f"Searching {namespace}", read_only=True) as connection:
            result = await connection.execute(
                select(_C.key).where(
                    _C.namespace == namespace, _C.key.like(f"%{escaped}%", escape="!")
                )
            )
            return sorted(row[0] for row in result)

    async def stats(self) -> list[tuple[str, int, int, int]]:
        """``(namespace, rows, bytes, expired rows)`` per namespace."""
        from sqlalchemy import case, func

        now = self.clock()
        async with self.connect("Counting rows") as connection:
            result = await connection.execute(
                select(
                    _C.namespace,
                    func.count(),
                    func.coalesce(func.sum(func.length(_C.data)), 0),
                    func.coalesce(func.sum(case((_C.expires_at < now, 1), else_=0)), 0),
                )
                .group_by(_C.namespace)
                .order_by(_C.namespace)
            )
            return [(ns, int(n), int(b), int(e)) for ns, n, b, e in result]

    # -- database row locks (several processes) ------------------------------------------

    @contextlib.asynccontextmanager
    async def row_lock(self, namespace: str, key: str, timeout: float = 60) -> AsyncIterator[None]:
        """Hold a database lock on ``(namespace, key)`` across processes until exit.

        PostgreSQL uses a transaction-level advisory lock, MariaDB/MySQL ``GET_LOCK``; both
        lock the key whether or not its row exists. SQLite has one writer at a time and a
        single process in practice: nothing is locked there.
        """
        if self.dialect == "sqlite":
            yield
            return
        await self.ensure_schema()
        name = f"ptb_sessions:{namespace}:{key}"
        try:
            connection = await self.engine.connect()
        except (SQLAlchemyError, OSError) as exc:
            raise self.error(exc, f"Locking {namespace}[{key!r}]") from exc
        try:
            try:
                if self.dialect == "postgresql":
                    await connection.begin()
                    lock_id = zlib.crc32(name.encode()) | (zlib.adler32(name.encode()) << 32)
                    lock_id -= 1 << 63  # into bigint's signed range
                    await connection.execute(
                        text("SELECT pg_advisory_xact_lock(:id)"), {"id": lock_id}
                    )
                else:
                    # GET_LOCK names are limited to 64 characters.
                    digest = f"ptb_sessions:{zlib.crc32(name.encode()):08x}{len(name):04x}"
                    digest += f"{zlib.adler32(name.encode()):08x}"
                    got = (
                        await connection.execute(
                            text("SELECT GET_LOCK(:name, :timeout)"),
                            {"name": digest, "timeout": int(timeout)},
                        )
                    ).scalar()
                    if got != 1:
                        raise StorageError(
                            f"Could not lock {namespace}[{key!r}] within {timeout} s on "
                            f"{self.masked_url}"
                        )
            except SQLAlchemyError as exc:
                raise self.error(exc, f"Locking {namespace}[{key!r}]") from exc
            yield
        finally:
            try:
                if self.dialect == "postgresql":
                    await connection.rollback()
                else:
                    await connection.execute(text("SELECT RELEASE_ALL_LOCKS()"))
                    await connection.commit()
            except (SQLAlchemyError, OSError):
                _LOGGER.debug("Releasing the lock of %s[%r] failed", namespace, key, exc_info=True)
            finally:
                await connection.close()


_RECORD_COLUMNS = (
    _C.codec,
    _C.data,
    _C.version,
    _C.data_version,
    _C.touched_at,
    _C.expires_at,
)


_ONE = (_C.namespace == bindparam("ns")) & (_C.key == bindparam("k"))
_GET_ONE = select(*_RECORD_COLUMNS).where(_ONE)
_DELETE_ONE = delete(_TABLE).where(_ONE)
_DELETE_IF_VERSION = delete(_TABLE).where(_ONE, _C.version == bindparam("expected"))
_VALUES: dict[str, Any] = {
    "codec": bindparam("codec"),
    "data": bindparam("data"),
    "data_version": bindparam("data_version"),
    "touched_at": bindparam("touched_at"),
    "expires_at": bindparam("expires_at"),
}
_UPDATE_IF_VERSION = (
    update(_TABLE)
    .where(_ONE, _C.version == bindparam("expected"))
    .values(version=bindparam("version"), **_VALUES)
)
_INSERT_VALUES = {
    "namespace": bindparam("ns"),
    "key": bindparam("k"),
    "version": bindparam("version"),
    **_VALUES,
}
_INSERT_ONE = _TABLE.insert().values(**_INSERT_VALUES)
_PG_INSERT_NEW = postgresql.insert(_TABLE).values(**_INSERT_VALUES).on_conflict_do_nothing()
_SQLITE_INSERT_NEW = sqlite.insert(_TABLE).values(**_INSERT_VALUES).on_conflict_do_nothing()
_UPSERT_SET = {**_VALUES, "version": _C.version + 1}
_PG_UPSERT_ONE = (
    postgresql.insert(_TABLE)
    .values(**_INSERT_VALUES)
    .on_conflict_do_update(index_elements=[_C.namespace, _C.key], set_=_UPSERT_SET)
)
_SQLITE_UPSERT_ONE = (
    sqlite.insert(_TABLE)
    .values(**_INSERT_VALUES)
    .on_conflict_do_update(index_elements=[_C.namespace, _C.key], set_=_UPSERT_SET)
)
_MYSQL_UPSERT_ONE = (
    mysql.insert(_TABLE).values(**_INSERT_VALUES).on_duplicate_key_update(**_UPSERT_SET)
)


_SQLITE_DELETE_MANY = f"DELETE FROM {_TABLE.name} WHERE namespace = ? AND key = ?"
_SQLITE_UPSERT_MANY = (
    f"INSERT INTO {_TABLE.name} "
    "(namespace, key, codec, data, version, data_version, touched_at, expires_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (namespace, key) DO UPDATE SET "
    "codec = excluded.codec, data = excluded.data, version = excluded.version, "
    "data_version = excluded.data_version, touched_at = excluded.touched_at, "
    "expires_at = excluded.expires_at"
)
_PG_LOCK_VERSIONS = text(
    f"SELECT t.key, t.version FROM {_TABLE.name} AS t "
    "JOIN unnest(CAST(:keys AS VARCHAR[])) AS wanted(key) ON t.key = wanted.key "
    "WHERE t.namespace = :ns FOR UPDATE OF t"
).columns(key=String, version=Integer)
_SQLITE_DIALECT = sqlite.dialect()
_SQLITE_COMPILED: dict[int, tuple[str, tuple[str, ...], dict[str, Any]]] = {}


def _compiled_for_sqlite(statement: Any) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """``(sql, parameter names in order, literal parameters)`` of a prebuilt statement,
    compiled once."""
    compiled = _SQLITE_COMPILED.get(id(statement))
    if compiled is None:
        result = statement.compile(dialect=_SQLITE_DIALECT)
        compiled = (str(result), tuple(result.positiontup), dict(result.params))
        _SQLITE_COMPILED[id(statement)] = compiled
    return compiled


def _is_deadlock(exc: BaseException | None) -> bool:
    """Whether the database aborted the transaction to resolve a deadlock (try it again)."""
    message = str(getattr(exc, "orig", exc)).lower()
    return "deadlock" in message or "could not serialize" in message


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling is off; _sqlite_on_begin starts every transaction
    # with BEGIN IMMEDIATE, so a read-then-write transaction never fails halfway on a lock.
    dbapi_connection.isolation_level = None
    # WAL lets readers and the writer work side by side; NORMAL sync is durable in WAL mode
    # across application crashes (only a power loss can drop the last commits).
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    options = connection.get_execution_options()
    if options.get("isolation_level") == "AUTOCOMMIT":
        return
    connection.exec_driver_sql(
        "BEGIN" if options.get("ptb_sessions_read_only") else "BEGIN IMMEDIATE"
    )


def new_version() -> int:
    """The version of a newly inserted row: random, so that a key deleted and written again
    between another writer's read and write never shows that writer its old version."""
    return secrets.randbelow(1 << 29) + 1
