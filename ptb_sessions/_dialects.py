"""What differs between the database backends, in one small strategy per backend.

:class:`~ptb_sessions._store.Database` is made only of operations; every statement or
predicate that depends on the backend comes from the :class:`Dialect` of its URL: the upsert,
the insert-only statement, the versions locked for a batch, the row lock of sessions, the lock
of schema upgrades, the engine's options and the meaning of a driver error.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import operator
import zlib
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from typing import Any, ClassVar, Final, Protocol, cast

from sqlalchemy import Integer, String, Table, any_, bindparam, event, select, text, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ptb_sessions._schema import StoredRow

__all__ = [
    "AUTOCOMMIT_OPTION",
    "ONE_ROW",
    "UPDATE_AT_VERSION",
    "VALUE_PARAMS",
    "Dialect",
    "RowWrite",
    "dialect_for",
]

#: The execution option that marks the connections of single statements (no transaction).
AUTOCOMMIT_OPTION: Final = "ptb_sessions_autocommit"

_TABLE: Table = cast(Table, StoredRow.__table__)
_C = _TABLE.c
#: The columns an upsert replaces.
_VALUE_COLUMNS: Final = ("codec", "data", "version", "data_version", "touched_at", "expires_at")
#: The name of the schema upgrade lock.
_SCHEMA_LOCK: Final = "ptb_sessions_schema"


def _lock_id(name: str) -> int:
    """A signed 64-bit number for ``name`` (PostgreSQL advisory locks take a bigint)."""
    raw = name.encode()
    return (zlib.crc32(raw) | (zlib.adler32(raw) << 32)) - (1 << 63)


#: Connections the pool of a server engine created by the package keeps open.
POOL_SIZE: Final = 15
#: Connections it may open beyond those, closed again when returned.
POOL_OVERFLOW: Final = 0


class RowWrite(Protocol):
    """A write as the batch statements read it: :class:`~ptb_sessions._store.Write`."""

    namespace: str
    key: str
    codec: str
    data: str | None
    version: int
    data_version: float | None
    expires_at: float | None
    expected_version: int | None

    def row(self, now: float) -> dict[str, Any]:
        """The row's columns, touched at ``now``."""
        ...


#: The attribute of a :class:`RowWrite` behind each statement parameter whose name is not
#: the attribute's.
_WRITE_ATTRIBUTES: Final = {"ns": "namespace", "k": "key", "expected": "expected_version"}


def _value_of(parameter: str) -> Callable[[RowWrite], Any]:
    """The value of ``parameter`` in a write."""
    return operator.attrgetter(_WRITE_ATTRIBUTES.get(parameter, parameter))


def _values_of(parameters: Sequence[str]) -> Callable[[RowWrite], tuple[Any, ...]]:
    """The values of ``parameters`` in a write, as a tuple."""
    attributes = [_WRITE_ATTRIBUTES.get(name, name) for name in parameters]
    if len(attributes) == 1:
        value = operator.attrgetter(attributes[0])
        return lambda write: (value(write),)
    return operator.attrgetter(*attributes)


class Dialect:
    """The SQL of one backend. Subclasses override what differs; nothing else in the package
    asks which backend it talks to."""

    __slots__ = ()

    name: ClassVar[str] = "generic"
    #: Whether the backend runs on SQLAlchemy's sync driver in a thread of its own.
    threaded: ClassVar[bool] = False
    #: Whether rows are locked one by one: :meth:`row_lock` locks anything (several processes
    #: share the database), and a statement may wait for a row another transaction locked.
    row_locks: ClassVar[bool] = True
    #: Whether :meth:`update_at_versions` updates rows (else every change of a batch reads
    #: the stored versions first).
    updates_at_versions: ClassVar[bool] = False
    #: Whether a transaction costs no round trip (``BEGIN`` and ``COMMIT`` are calls in this
    #: process), so that statements that could each commit alone go in one transaction.
    cheap_transactions: ClassVar[bool] = False

    # -- the engine ---------------------------------------------------------------------

    def engine_options(self, timeout: float) -> dict[str, Any]:
        """Keyword arguments of :func:`~sqlalchemy.ext.asyncio.create_async_engine`."""
        # No pre-ping (a round trip per checkout): a statement on a connection that died (a
        # server restart) fails as "invalidated", which Database retries once on a fresh one.
        # A pool that keeps its connections: under many concurrent updates, overflow
        # connections were closed and reopened at every return.
        return {"pool_recycle": 1800, "pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW}

    def prepare_engine(self, engine: Engine) -> None:
        """Install event listeners on an engine created by the package."""

    # -- statements ---------------------------------------------------------------------

    def upsert(self) -> Any:
        """``INSERT`` rows, replacing the values and version of those whose key exists."""
        raise NotImplementedError

    def insert_new(self) -> Any:
        """``INSERT`` rows unless their key exists, returning ``(namespace, key)`` of those
        inserted."""
        raise NotImplementedError

    def key_in(self, keys: Sequence[str]) -> Any:
        """The condition ``key IN (keys)``."""
        return _C.key.in_(keys)

    def upsert_rows(self, connection: Connection, writes: Sequence[RowWrite], now: float) -> None:
        """Store the row of each write, touched at ``now``, whether or not its key exists
        (:meth:`upsert`, as one ``executemany``)."""
        connection.execute(self.upsert(), [write.row(now) for write in writes])

    def code_point_order(self, column: Any) -> Any:
        """``column`` for ``ORDER BY`` in code point order, whatever the collation."""
        return column

    def insert_absent(
        self, connection: Connection, writes: Sequence[RowWrite], now: float
    ) -> Collection[tuple[str, str]]:
        """Insert the row of each write whose key does not exist yet, with no read first,
        touched at ``now``.

        Returns:
            ``(namespace, key)`` of the rows known to be inserted: every inserted one, or fewer
            where the backend cannot tell which (the caller checks those by their stored
            version).
        """
        result = connection.execute(self.insert_new(), [write.row(now) for write in writes])
        return {(namespace, key) for namespace, key in result}

    def update_at_versions(
        self,
        connection: Connection,
        namespace: str,
        writes: Sequence[RowWrite],
        now: float,
        *,
        wait: bool = True,
    ) -> Collection[str]:
        """Update the row of each write of ``namespace`` whose stored version is still the one
        it was read at (``expected_version``) to the write's values, touched at ``now``, with
        no read first. The writes' values go to the database as they are, with no row of
        named parameters built per write. With ``wait=False``, a row locked by another
        transaction fails the statement at once.

        Returns:
            The keys known to be updated: every updated one, or fewer where the backend cannot
            tell which (the caller then checks those by their stored version). By default
            none are updated: a backend that runs such an update row by row (a round trip
            each) is faster with the stored versions read first.
        """
        return ()

    def update_one_at_version(
        self, connection: Connection, write: RowWrite, params: dict[str, Any]
    ) -> bool:
        """Update the row of ``write`` to its values if the stored version is still the one it
        was read at; whether it did (if not, the stored version tells why). ``params`` are the
        write's single-row parameters (:meth:`~ptb_sessions._store.Write.params`)."""
        return bool(connection.execute(UPDATE_AT_VERSION, params).rowcount)

    def lock_versions(
        self, connection: Connection, namespace: str, keys: Sequence[str], *, wait: bool = True
    ) -> dict[str, int]:
        """The stored versions of ``keys``, locked until the transaction ends. With
        ``wait=False``, a row locked by another transaction fails the statement at once."""
        query = select(_C.key, _C.version).where(_C.namespace == namespace, self.key_in(keys))
        result = connection.execute(query.with_for_update(nowait=not wait))
        return {key: version for key, version in result}

    @contextlib.asynccontextmanager
    async def schema_lock(self, engine: AsyncEngine) -> AsyncIterator[None]:
        """Serialize schema upgrades across processes."""
        yield

    @contextlib.asynccontextmanager
    async def row_lock(
        self, connection: AsyncConnection, name: str, timeout: float
    ) -> AsyncIterator[bool]:
        """Hold a lock named ``name`` across processes on ``connection``; yields whether it
        was taken within ``timeout`` seconds."""
        yield True

    # -- errors -------------------------------------------------------------------------

    def is_connection_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection or the server failed (not a row)."""
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, OSError | ConnectionError | asyncio.TimeoutError):
            return True
        name = type(getattr(exc, "orig", None) or exc).__name__
        return "Connection" in name or "Interface" in name

    def is_deadlock(self, exc: BaseException) -> bool:
        """Whether the database aborted the transaction to resolve a deadlock (try again)."""
        message = str(getattr(exc, "orig", None) or exc).lower()
        return "deadlock" in message or "could not serialize" in message


class _SQLite(Dialect):
    __slots__ = ()
    name = "sqlite"
    updates_at_versions = True
    cheap_transactions = True
    threaded = True
    # One writer at a time (BEGIN IMMEDIATE locks the whole file before any statement), and a
    # single process in practice.
    row_locks = False

    def engine_options(self, timeout: float) -> dict[str, Any]:
        # A file on this machine: no dropped connections to ping for; the driver waits up to
        # the deadline for another writer's lock.
        return {"connect_args": {"timeout": timeout}}

    def prepare_engine(self, engine: Engine) -> None:
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)

    def upsert(self) -> Any:
        stmt = sqlite.insert(_TABLE)
        return stmt.on_conflict_do_update(
            index_elements=[_C.namespace, _C.key],
            set_={name: stmt.excluded[name] for name in _VALUE_COLUMNS},
        )

    def insert_new(self) -> Any:
        return sqlite.insert(_TABLE).on_conflict_do_nothing().returning(_C.namespace, _C.key)

    def insert_absent(
        self, connection: Connection, writes: Sequence[RowWrite], now: float
    ) -> Collection[tuple[str, str]]:
        # As update_at_versions: one executemany, whose row count tells whether all were new.
        result = connection.exec_driver_sql(
            _SQLITE_INSERT_ABSENT.text, _SQLITE_INSERT_ABSENT.bind(writes, now)
        )
        if result.rowcount == len(writes):
            return {(write.namespace, write.key) for write in writes}
        return ()

    def update_at_versions(
        self,
        connection: Connection,
        namespace: str,
        writes: Sequence[RowWrite],
        now: float,
        *,
        wait: bool = True,
    ) -> Collection[str]:
        # No row locks to wait for (see row_locks). One executemany of the statement compiled
        # once, each row's values in the order of its placeholders (no per-row parameter
        # processing: SQLite's binds need none, and positional binds skip a lookup by name per
        # value). Its row count is the sum over the rows, so it tells only whether every row
        # was updated.
        #
        # A write without an expiry (no ttl) leaves expires_at out of its SET: SQLite rewrites
        # a row's entry in the expiry index for every column a SET names, changed or not (a
        # third of the statement's time). It applies only to a row stored without an expiry
        # too; a row that still has one is written in full by the stored versions' check.
        lasting = [write for write in writes if write.expires_at is None]
        expiring = [write for write in writes if write.expires_at is not None]
        updated = 0
        for statement, group in (
            (_SQLITE_UPDATE_LASTING, lasting),
            (_SQLITE_UPDATE_AT_VERSION, expiring),
        ):
            if group:
                result = connection.exec_driver_sql(statement.text, statement.bind(group, now))
                updated += result.rowcount
        return {write.key for write in writes} if updated == len(writes) else ()

    def update_one_at_version(
        self, connection: Connection, write: RowWrite, params: dict[str, Any]
    ) -> bool:
        # update_at_versions for one row: the statement's text bound positionally, with no
        # lookup in the compiled cache nor processing of named parameters (30 against 51-61 µs
        # per sequential session write; /tmp/lead/sqlmicro.py).
        statement = (
            _SQLITE_UPDATE_LASTING if write.expires_at is None else _SQLITE_UPDATE_AT_VERSION
        )
        (values,) = statement.bind([write], params["touched_at"])
        return bool(connection.exec_driver_sql(statement.text, values).rowcount)

    def lock_versions(
        self, connection: Connection, namespace: str, keys: Sequence[str], *, wait: bool = True
    ) -> dict[str, int]:
        # The transaction began with BEGIN IMMEDIATE: the whole database is locked already.
        query = select(_C.key, _C.version).where(_C.namespace == namespace, self.key_in(keys))
        return {key: version for key, version in connection.execute(query)}

    def is_connection_error(self, exc: BaseException) -> bool:
        # "database is locked" is another writer holding the file: an outage for this batch.
        return super().is_connection_error(exc) or "database is locked" in str(exc)


class _PostgreSQL(Dialect):
    __slots__ = ()
    name = "postgresql"
    updates_at_versions = True

    def code_point_order(self, column: Any) -> Any:
        return column.collate("C")

    def upsert(self) -> Any:
        stmt = postgresql.insert(_TABLE)
        return stmt.on_conflict_do_update(
            index_elements=[_C.namespace, _C.key],
            set_={name: stmt.excluded[name] for name in _VALUE_COLUMNS},
        )

    def insert_new(self) -> Any:
        return postgresql.insert(_TABLE).on_conflict_do_nothing().returning(_C.namespace, _C.key)

    def insert_absent(
        self, connection: Connection, writes: Sequence[RowWrite], now: float
    ) -> Collection[tuple[str, str]]:
        # As update_at_versions: one statement over arrays of the columns.
        inserted: set[tuple[str, str]] = set()
        for chunk in _chunks_of_size(writes, _PG_CHUNK_CHARACTERS):
            params: dict[str, Any] = {"touched_at": [now] * len(chunk)}
            for column, value in _PG_INSERT_VALUES.items():
                params[column] = list(map(value, chunk))
            result = connection.execute(_PG_INSERT_ABSENT, params)
            inserted.update((namespace, key) for namespace, key in result)
        return inserted

    def update_at_versions(
        self,
        connection: Connection,
        namespace: str,
        writes: Sequence[RowWrite],
        now: float,
        *,
        wait: bool = True,
    ) -> Collection[str]:
        # One statement over arrays of the values (one per column), returning the keys it
        # updated: one execution on the server instead of one per row (per chunk of rows, as
        # one array value holds at most 1 GB). Without waiting, it locks its rows first, with
        # NOWAIT, in a subquery (a locked row fails it before it would wait in the update).
        statement = _PG_UPDATE_AT_VERSIONS if wait else _PG_UPDATE_AT_VERSIONS_NOWAIT
        updated: set[str] = set()
        for chunk in _chunks_of_size(writes, _PG_CHUNK_CHARACTERS):
            params: dict[str, Any] = {"ns": namespace, "touched_at": now}
            for column, value in _PG_UPDATE_VALUES.items():
                params[column] = list(map(value, chunk))
            updated.update(key for (key,) in connection.execute(statement, params))
        return updated

    def key_in(self, keys: Sequence[str]) -> Any:
        # = ANY(array): the planner uses the index however many keys there are.
        return _C.key == any_(bindparam("keys", list(keys), type_=ARRAY(String)))

    def lock_versions(
        self, connection: Connection, namespace: str, keys: Sequence[str], *, wait: bool = True
    ) -> dict[str, int]:
        # A join on unnest() keeps the primary-key lookups whatever the statistics of the
        # table (with `key = ANY(...)` a fresh, unanalyzed table is scanned).
        statement = _PG_LOCK_VERSIONS if wait else _PG_LOCK_VERSIONS_NOWAIT
        result = connection.execute(statement, {"ns": namespace, "keys": list(keys)})
        return {key: version for key, version in result}

    @contextlib.asynccontextmanager
    async def schema_lock(self, engine: AsyncEngine) -> AsyncIterator[None]:
        async with engine.connect() as connection:
            lock = {"id": _lock_id(_SCHEMA_LOCK)}
            await connection.execute(text("SELECT pg_advisory_lock(:id)"), lock)
            await connection.commit()
            try:
                yield
            finally:
                await connection.execute(text("SELECT pg_advisory_unlock(:id)"), lock)
                await connection.commit()

    @contextlib.asynccontextmanager
    async def row_lock(
        self, connection: AsyncConnection, name: str, timeout: float
    ) -> AsyncIterator[bool]:
        await connection.begin()
        await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _lock_id(name)})
        try:
            yield True
        finally:
            await connection.rollback()


class _MySQL(Dialect):
    __slots__ = ()
    name = "mysql"
    updates_at_versions = True

    def engine_options(self, timeout: float) -> dict[str, Any]:
        # The server gives up on a statement (or a row lock) a little before the client's
        # deadline, so a statement the client stopped waiting for never lands later. (On
        # PostgreSQL the driver cancels a statement it stops waiting for.)
        seconds = max(1, int(timeout * 0.9))
        init = f"SET SESSION max_statement_time = {seconds}, innodb_lock_wait_timeout = {seconds}"
        return {**super().engine_options(timeout), "connect_args": {"init_command": init}}

    def upsert(self) -> Any:
        stmt = mysql.insert(_TABLE)
        return stmt.on_duplicate_key_update({name: stmt.inserted[name] for name in _VALUE_COLUMNS})

    def lock_versions(
        self, connection: Connection, namespace: str, keys: Sequence[str], *, wait: bool = True
    ) -> dict[str, int]:
        # The statement's text made once per number of keys, the keys bound as the UTF-8
        # bytes of their VARBINARY column (ExactString): no expansion of an IN list and no
        # per-key parameter processing by SQLAlchemy at every call.
        result = connection.exec_driver_sql(
            _mysql_lock_versions(len(keys), wait),
            (namespace.encode(), *(key.encode() for key in keys)),
        )
        return {bytes(key).decode(): version for key, version in result}

    def upsert_rows(self, connection: Connection, writes: Sequence[RowWrite], now: float) -> None:
        # The statement compiled once, each row's values a tuple in the order of its
        # placeholders: no per-row parameter processing by SQLAlchemy. The namespace and the
        # key are VARBINARY holding UTF-8 here (ExactString), so they go as UTF-8 bytes.
        connection.exec_driver_sql(
            _MYSQL_UPSERT,
            [
                (
                    write.namespace.encode(),
                    write.key.encode(),
                    write.codec,
                    write.data,
                    write.version,
                    write.data_version,
                    now,
                    write.expires_at,
                )
                for write in writes
            ],
        )

    def insert_new(self) -> Any:
        return mysql.insert(_TABLE).prefix_with("IGNORE").returning(_C.namespace, _C.key)

    @contextlib.asynccontextmanager
    async def schema_lock(self, engine: AsyncEngine) -> AsyncIterator[None]:
        async with engine.connect() as connection:
            await connection.execute(text(f"SELECT GET_LOCK('{_SCHEMA_LOCK}', 300)"))
            await connection.commit()
            try:
                yield
            finally:
                await connection.execute(text(f"SELECT RELEASE_LOCK('{_SCHEMA_LOCK}')"))
                await connection.commit()

    @contextlib.asynccontextmanager
    async def row_lock(
        self, connection: AsyncConnection, name: str, timeout: float
    ) -> AsyncIterator[bool]:
        # GET_LOCK names are limited to 64 characters.
        raw = name.encode()
        digest = f"ptb_sessions:{zlib.crc32(raw):08x}{len(name):04x}{zlib.adler32(raw):08x}"
        got = (
            await connection.execute(
                text("SELECT GET_LOCK(:name, :timeout)"), {"name": digest, "timeout": int(timeout)}
            )
        ).scalar()
        try:
            yield got == 1
        finally:
            await connection.execute(text("SELECT RELEASE_ALL_LOCKS()"))
            await connection.commit()

    def update_at_versions(
        self,
        connection: Connection,
        namespace: str,
        writes: Sequence[RowWrite],
        now: float,
        *,
        wait: bool = True,
    ) -> Collection[str]:
        # MariaDB, a batch of a few rows (group commit): one UPDATE joined to the rows' values
        # (a table value constructor), per chunk of at most a MiB; its row count tells only
        # whether every row of the chunk was updated. Without waiting, SET STATEMENT gives it
        # no time for a row lock. On the server it costs more per row than the upsert (26 ms
        # against 15 ms for 1,000 rows), so a larger batch reads the versions first, as MySQL
        # does (no table value constructor, no SET STATEMENT). The key is VARBINARY holding
        # UTF-8 here (ExactString), so it goes as UTF-8 bytes.
        mariadb = getattr(connection.dialect, "is_mariadb", False)
        if len(writes) > _MARIADB_UPDATE_ROWS or not mariadb:
            return ()
        updated: list[str] = []
        for chunk in _chunks_of_size(writes, _MYSQL_CHUNK_CHARACTERS):
            params: list[Any] = []
            for write in chunk:
                params += [write.key.encode(), write.expected_version, write.codec, write.data]
                params += [write.version, write.data_version, write.expires_at]
            params += [now, namespace.encode()]
            statement = _mariadb_update_at_versions(len(chunk), wait=wait)
            result = connection.exec_driver_sql(statement, tuple(params))
            if result.rowcount == len(chunk):
                updated.extend(write.key for write in chunk)
        return updated

    def is_connection_error(self, exc: BaseException) -> bool:
        # 2006 "server has gone away" and 2013 "lost connection" (also what an oversized
        # packet gives: Database tells the two apart by probing the server).
        code = getattr(getattr(exc, "orig", None), "args", (None,))[0]
        return super().is_connection_error(exc) or code in (2006, 2013)


_PG_LOCK_VERSIONS_SQL = (
    f"SELECT t.key, t.version FROM {_TABLE.name} AS t "
    "JOIN unnest(CAST(:keys AS VARCHAR[])) AS wanted(key) ON t.key = wanted.key "
    "WHERE t.namespace = :ns FOR UPDATE OF t"
)
#: The row of one key (parameters ``ns`` and ``k``).
ONE_ROW: Final = (_C.namespace == bindparam("ns")) & (_C.key == bindparam("k"))
#: A row's values, each bound by its column's name.
VALUE_PARAMS: Final[dict[str, Any]] = {name: bindparam(name) for name in _VALUE_COLUMNS}
#: The conditional update of one row: its values, if the stored version is ``expected``.
UPDATE_AT_VERSION = (
    update(_TABLE).where(ONE_ROW, _C.version == bindparam("expected")).values(VALUE_PARAMS)
)


class _Positional:
    """A statement compiled once to SQLite's text with ``?`` placeholders, and how to turn
    writes into the value tuples of an ``executemany`` (``touched_at`` is the batch's time,
    every other value an attribute of the write)."""

    __slots__ = ("_after", "_before", "text")

    def __init__(self, statement: Any) -> None:
        compiled = statement.compile(dialect=sqlite.dialect(paramstyle="qmark"))
        self.text: str = str(compiled)
        names = list(compiled.positiontup or ())
        split = names.index("touched_at")
        self._before = _values_of(names[:split])
        self._after = _values_of(names[split + 1 :])

    def bind(self, writes: Sequence[RowWrite], now: float) -> list[tuple[Any, ...]]:
        """The value tuples of ``writes``, in the order of the placeholders."""
        before, after = self._before, self._after
        return [(*before(write), now, *after(write)) for write in writes]


def _mysql_upsert() -> str:
    """The upsert of MySQL and MariaDB as the drivers' text with ``%s`` placeholders, whose
    order :meth:`_MySQL.upsert_rows` follows."""
    compiled = _MySQL().upsert().compile(dialect=mysql.dialect(paramstyle="format"))
    assert compiled.positiontup == ["namespace", "key", *_VALUE_COLUMNS], compiled.positiontup
    return str(compiled)


_MYSQL_UPSERT: Final = _mysql_upsert()


@functools.lru_cache(maxsize=64)
def _mysql_lock_versions(count: int, wait: bool) -> str:
    """:meth:`Dialect.lock_versions` of ``count`` keys as the drivers' text with ``%s``
    placeholders (the namespace, then the keys)."""
    statement = (
        select(_C.key, _C.version)
        .where(_C.namespace == "ns", _C.key.in_([f"k{i}" for i in range(count)]))
        .with_for_update(nowait=not wait)
    )
    compiled = statement.compile(
        dialect=mysql.dialect(paramstyle="format"), compile_kwargs={"render_postcompile": True}
    )
    return str(compiled)


#: :data:`UPDATE_AT_VERSION` as SQLite's text with positional parameters.
_SQLITE_UPDATE_AT_VERSION: Final = _Positional(UPDATE_AT_VERSION)
#: The same for a row stored without an expiry that stays without one.
_SQLITE_UPDATE_LASTING: Final = _Positional(
    update(_TABLE)
    .where(ONE_ROW, _C.version == bindparam("expected"), _C.expires_at.is_(None))
    .values({name: value for name, value in VALUE_PARAMS.items() if name != "expires_at"})
)
#: The insert of a row unless its key exists, as SQLite's text with positional parameters.
_SQLITE_INSERT_ABSENT: Final = _Positional(sqlite.insert(_TABLE).on_conflict_do_nothing())
#: The characters of ``data`` in one of PostgreSQL's conditional updates, at most.
_PG_CHUNK_CHARACTERS: Final = 64 << 20
#: The per-row parameters of PostgreSQL's conditional update, and their array types.
_ARRAY_COLUMNS: Final = {
    "k": "VARCHAR",
    "codec": "VARCHAR",
    "data": "TEXT",
    "version": "INTEGER",
    "data_version": "DOUBLE PRECISION",
    "expires_at": "DOUBLE PRECISION",
    "expected": "INTEGER",
}
#: Each array of PostgreSQL's conditional update, from a write.
_PG_UPDATE_VALUES: Final = {name: _value_of(name) for name in _ARRAY_COLUMNS}
_PG_UPDATE_AT_VERSIONS_SQL = (
    f"UPDATE {_TABLE.name} AS t SET codec = v.codec, data = v.data, version = v.version, "
    "data_version = v.data_version, touched_at = :touched_at, expires_at = v.expires_at "
    "FROM unnest("
    + ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in _ARRAY_COLUMNS.items())
    + ") AS v("
    + ", ".join(_ARRAY_COLUMNS)
    + ") "
    "WHERE t.namespace = :ns AND t.key = v.k AND t.version = v.expected"
)
_PG_UPDATE_AT_VERSIONS = text(f"{_PG_UPDATE_AT_VERSIONS_SQL} RETURNING t.key").columns(key=String)
_PG_UPDATE_AT_VERSIONS_NOWAIT = text(
    f"{_PG_UPDATE_AT_VERSIONS_SQL} AND t.key IN ("
    f"SELECT l.key FROM {_TABLE.name} AS l "
    "JOIN unnest(CAST(:k AS VARCHAR[])) AS wanted(key) ON l.key = wanted.key "
    "WHERE l.namespace = :ns FOR UPDATE OF l NOWAIT) RETURNING t.key"
).columns(key=String)
#: The columns of a new row, and their array types.
_INSERT_COLUMNS: Final = {
    "namespace": "VARCHAR",
    "key": "VARCHAR",
    "codec": "VARCHAR",
    "data": "TEXT",
    "version": "INTEGER",
    "data_version": "DOUBLE PRECISION",
    "touched_at": "DOUBLE PRECISION",
    "expires_at": "DOUBLE PRECISION",
}
#: Each array of PostgreSQL's insert-only but ``touched_at`` (the batch's time), from a write.
_PG_INSERT_VALUES: Final = {
    name: _value_of(name) for name in _INSERT_COLUMNS if name != "touched_at"
}
_PG_INSERT_ABSENT = text(
    f"INSERT INTO {_TABLE.name} ("
    + ", ".join(_INSERT_COLUMNS)
    + ") SELECT * FROM unnest("
    + ", ".join(f"CAST(:{name} AS {kind}[])" for name, kind in _INSERT_COLUMNS.items())
    + ") ON CONFLICT DO NOTHING RETURNING namespace, key"
).columns(namespace=String, key=String)
_PG_LOCK_VERSIONS = text(_PG_LOCK_VERSIONS_SQL).columns(key=String, version=Integer)
_PG_LOCK_VERSIONS_NOWAIT = text(f"{_PG_LOCK_VERSIONS_SQL} NOWAIT").columns(
    key=String, version=Integer
)

#: The characters of ``data`` in one of MariaDB's conditional updates, at most.
_MYSQL_CHUNK_CHARACTERS: Final = 1 << 20
#: The most rows MariaDB updates at their versions with no read of the versions first.
_MARIADB_UPDATE_ROWS: Final = 128
#: The values of one row in MariaDB's conditional update, in the order of its placeholders.
_MYSQL_VALUES: Final = ("k", "expected", "codec", "data", "version", "data_version", "expires_at")


@functools.lru_cache(maxsize=2 * _MARIADB_UPDATE_ROWS)
def _mariadb_update_at_versions(count: int, *, wait: bool) -> str:
    """MariaDB's update of ``count`` rows at the versions they were read (``%s`` placeholders:
    each row's :data:`_MYSQL_VALUES`, then ``touched_at`` and the namespace)."""
    first = ", ".join(f"%s AS {name}" for name in _MYSQL_VALUES)
    more = ", ".join(["(" + ", ".join(["%s"] * len(_MYSQL_VALUES)) + ")"] * (count - 1))
    values = f"SELECT {first}" + (f" UNION ALL VALUES {more}" if more else "")
    prefix = "" if wait else "SET STATEMENT innodb_lock_wait_timeout = 0 FOR "
    return (
        f"{prefix}UPDATE {_TABLE.name} AS t JOIN ({values}) AS v "
        "ON t.`key` = v.k AND t.version = v.expected "
        "SET t.codec = v.codec, t.data = v.data, t.version = v.version, "
        "t.data_version = v.data_version, t.touched_at = %s, t.expires_at = v.expires_at "
        "WHERE t.namespace = %s"
    )


_DIALECTS: dict[str, Dialect] = {
    "sqlite": _SQLite(),
    "postgresql": _PostgreSQL(),
    "mysql": _MySQL(),
    "mariadb": _MySQL(),
}


def _chunks_of_size(writes: Sequence[RowWrite], limit: int) -> Iterator[Sequence[RowWrite]]:
    """``writes`` in consecutive chunks whose ``data`` add up to at most ``limit`` characters
    (a larger one on its own)."""
    start = size = 0
    for end, write in enumerate(writes):
        length = len(write.data or "")
        size += length
        if size > limit and end > start:
            yield writes[start:end]
            start, size = end, length
    if start < len(writes):
        yield writes[start:]


def dialect_for(backend: str) -> Dialect:
    """The :class:`Dialect` of an SQLAlchemy backend name (``URL.get_backend_name()``)."""
    try:
        return _DIALECTS[backend]
    except KeyError:
        raise ValueError(
            f"ptb-sessions supports SQLite, PostgreSQL, MariaDB and MySQL, not {backend!r}"
        ) from None


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
    if options.get(AUTOCOMMIT_OPTION) or options.get("isolation_level") == "AUTOCOMMIT":
        return
    connection.exec_driver_sql(
        "BEGIN" if options.get("ptb_sessions_read_only") else "BEGIN IMMEDIATE"
    )
