"""The database layer shared by :class:`~ptb_sessions.SQLAlchemyPersistence` and
:class:`~ptb_sessions.SQLAlchemyStorage`: one table, versioned rows, batched writes.

Nothing here knows about PTB or about codecs beyond the text stored in a row: callers encode
values and compare encodings; this module reads and writes rows, checks row versions and turns
database failures into :class:`~ptb_sessions.StorageError` with the URL's password masked.

Versions: every write carries the version it stores, drawn at random when the write is made
and kept when it is tried again. A write applies if the stored row is at the version its
writer read; if the row is at the version the write itself carries (or one of the writes it
replaced carried), an earlier attempt committed and only its reply was lost, and the write
counts as done. A new row is inserted only if it still does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

from sqlalchemy import Table, bindparam, case, create_engine, delete, func, select, text, update
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ptb_sessions import _alembic
from ptb_sessions._dialects import (
    AUTOCOMMIT_OPTION,
    ONE_ROW,
    POOL_OVERFLOW,
    VALUE_PARAMS,
    Dialect,
    dialect_for,
)
from ptb_sessions._errors import ConflictError, SchemaError, StorageError
from ptb_sessions._schema import MAX_KEY_LENGTH, MAX_NAMESPACE_LENGTH, StoredRow
from ptb_sessions._url import mask_secrets, mask_url, to_async_url

if sys.version_info >= (3, 11):
    from asyncio import timeout as _deadline
else:  # pragma: no cover - the backport of asyncio.timeout
    from async_timeout import timeout as _deadline

__all__ = [
    "ANY_VERSION",
    "DEFAULT_SESSION_CACHE",
    "DEFAULT_TIMEOUT",
    "Database",
    "PendingWrites",
    "Record",
    "Write",
]

_LOGGER = logging.getLogger(__name__)
_TABLE: Table = cast(Table, StoredRow.__table__)
_C = _TABLE.c
_T = TypeVar("_T")

#: ``Write.expected_version`` that skips the version check (a blind write).
ANY_VERSION: Final = -1
#: Seconds any one database call may take.
DEFAULT_TIMEOUT: Final = 30.0
#: How many session rows a process keeps by default (see :class:`Database`).
DEFAULT_SESSION_CACHE: Final = 10_000
#: How often a transaction that lost a deadlock to another process is tried again.
_DEADLOCK_RETRIES: Final = 5
#: How many keys go into one ``IN (...)`` list.
_CHUNK: Final = 500
#: Pooled connections left to reads and writes while the others hold row locks.
_CONNECTIONS_FOR_DATA: Final = 3


#: The source of row versions: seeded from the operating system, and again in a forked child
#: (so parent and child never draw the same versions); not the module's shared generator, which
#: an application may seed with a constant.
_VERSIONS: Final = random.Random()
if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX system has it
    os.register_at_fork(after_in_child=_VERSIONS.seed)
_VERSION_LIMIT: Final = (1 << 31) - 1


def new_version() -> int:
    """A row version: random, so that no two writes store the same one (a key deleted and
    written again never shows another writer its old version, and a write recognises its own
    commit). Between 1 and 2**31 - 2."""
    while True:
        version = _VERSIONS.getrandbits(31)
        if 0 < version < _VERSION_LIMIT:
            return version


@dataclass(slots=True, frozen=True)
class Record:
    """A stored row as read from the database (the value still encoded)."""

    codec: str
    data: str | None
    version: int
    data_version: float | None
    touched_at: float
    expires_at: float | None


class _Verdict(enum.Enum):
    APPLY = "apply"
    DONE = "done"  # an earlier attempt of this write committed
    CONFLICT = "conflict"


@dataclass(slots=True)
class Write:
    """One pending change of a row.

    ``data`` is :obj:`None` to delete the row. ``expected_version`` is the version the writer
    read (:obj:`None`: the writer saw no row; :data:`ANY_VERSION`: no check). ``version`` is
    the version this write stores; ``own_versions`` those of earlier writes of the same key
    that this one replaced before they were acknowledged (see :meth:`replacing`).
    """

    namespace: str
    key: str
    data: str | None
    codec: str = "json"
    expected_version: int | None = ANY_VERSION
    data_version: float | None = None
    expires_at: float | None = None
    version: int = field(default_factory=new_version, compare=False)
    own_versions: frozenset[int] = field(default=frozenset(), compare=False)

    @property
    def where(self) -> tuple[str, str]:
        """``(namespace, key)``."""
        return self.namespace, self.key

    @property
    def new_version(self) -> int | None:
        """The version stored once this write is applied (:obj:`None` for a delete)."""
        return None if self.data is None else self.version

    def replacing(self, earlier: Write | None) -> Write:
        """This write, as the successor of ``earlier``, a write of the same key that was not
        acknowledged (it failed, or its reply was lost): a row at one of its versions was
        written by this writer, not by another."""
        if earlier is None:
            return self
        self.own_versions = earlier.own_versions | {earlier.version}
        return self

    def verdict(self, stored: int | None) -> _Verdict:
        """Whether this write applies to a row stored at version ``stored`` (:obj:`None`: no
        row), is already done, or conflicts."""
        if stored is not None and stored == self.version:
            return _Verdict.DONE  # an earlier attempt of this very write committed
        if stored in self.own_versions or self.expected_version in (ANY_VERSION, stored):
            return _Verdict.APPLY  # the row is as this writer last left it
        if stored is None and self.data is None:
            return _Verdict.DONE  # the row to delete is gone already
        return _Verdict.CONFLICT

    def conflict(self, stored: int | None) -> ConflictError:
        """The error of this write when the row is at ``stored``."""
        found = "no row" if stored is None else f"version {stored}"
        read = "no row" if self.expected_version is None else f"version {self.expected_version}"
        return ConflictError(
            f"{self.namespace}[{self.key!r}] was changed by another writer since it was read "
            f"(stored: {found}; read: {read}); this write was dropped and nothing was "
            "overwritten"
        )

    def row(self, now: float) -> dict[str, Any]:
        """The row's columns, for the batch statements."""
        return {
            "namespace": self.namespace,
            "key": self.key,
            "codec": self.codec,
            "data": self.data,
            "version": self.version,
            "data_version": self.data_version,
            "touched_at": now,
            "expires_at": self.expires_at,
        }

    def params(self, now: float) -> dict[str, Any]:
        """The parameters of the single-row statements."""
        return {
            "ns": self.namespace,
            "k": self.key,
            "codec": self.codec,
            "data": self.data,
            "version": self.version,
            "data_version": self.data_version,
            "touched_at": now,
            "expires_at": self.expires_at,
            "expected": self.expected_version,
        }

    def execute_single(
        self, connection: Connection, statements: _Statements, params: dict[str, Any]
    ) -> bool:
        """Run this write as one statement that checks the version itself. Whether it
        changed the row (if not, the stored version tells why)."""
        expected = self.expected_version
        if self.data is None:
            if expected is None:
                return False  # nothing to delete, if the row is still absent
            if expected == ANY_VERSION:
                connection.execute(_DELETE_ONE, params)
                return True
            return bool((connection.execute(_DELETE_IF_VERSION, params)).rowcount)
        if expected is None:
            result = connection.execute(statements.insert_one, params)
            return result.first() is not None
        if expected == ANY_VERSION:
            connection.execute(statements.upsert_one, params)
            return True
        return statements.update_one(connection, self, params)


@dataclass(slots=True, frozen=True)
class _Statements:
    """The writes of one dialect, built once (SQLAlchemy caches their compiled form)."""

    insert_many: Any
    upsert_one: Any
    insert_one: Any
    update_one: Callable[[Connection, Write, dict[str, Any]], bool]

    @staticmethod
    def of(dialect: Dialect) -> _Statements:
        statements = _STATEMENTS.get(dialect.name)
        if statements is None:
            statements = _STATEMENTS[dialect.name] = _Statements(
                insert_many=dialect.insert_new(),
                upsert_one=dialect.upsert().values(_INSERT_VALUES),
                insert_one=dialect.insert_new().values(_INSERT_VALUES),
                update_one=dialect.update_one_at_version,
            )
        return statements


_STATEMENTS: dict[str, _Statements] = {}


class PendingWrites:
    """Writes not yet acknowledged, at most one per key, in the order they were queued.

    A newer write of a key replaces an older one and inherits its versions (see
    :meth:`Write.replacing`), so a write whose commit reached the database but whose reply
    was lost is recognised as this writer's own when the newer write is applied.
    """

    __slots__ = ("_writes",)

    def __init__(self) -> None:
        self._writes: dict[tuple[str, str], Write] = {}

    def __len__(self) -> int:
        return len(self._writes)

    def __contains__(self, where: object) -> bool:
        return where in self._writes

    def put(self, write: Write) -> None:
        """Queue ``write``, replacing an older write of its key."""
        where = write.where
        self._writes[where] = write.replacing(self._writes.pop(where, None))

    def keep(self, write: Write) -> None:
        """Queue ``write`` again after it failed, unless a newer write of its key was queued
        meanwhile (which then inherits its versions)."""
        newer = self._writes.get(write.where)
        if newer is None:
            self._writes[write.where] = write
        else:
            newer.own_versions |= write.own_versions | {write.version}

    def take(self) -> list[Write]:
        """Every queued write, removed from the queue."""
        writes = list(self._writes.values())
        self._writes.clear()
        return writes


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


def _keys_by_namespace(writes: Iterable[Write]) -> dict[str, list[str]]:
    by_namespace: dict[str, list[str]] = {}
    for write in writes:
        by_namespace.setdefault(write.namespace, []).append(write.key)
    return by_namespace


def _discard(task: asyncio.Future[Any]) -> None:
    """Cancel ``task``, whose result nobody will take (its error, if any, is taken too)."""
    if task.done():
        if not task.cancelled():
            task.exception()
    else:
        task.cancel()


def _fetch_all(statement: Any) -> Callable[[Connection], list[Any]]:
    def fetch(connection: Connection) -> list[Any]:
        return list(connection.execute(statement).all())

    return fetch


def _rowcount(statement: Any) -> Callable[[Connection], int]:
    def count(connection: Connection) -> int:
        return int(connection.execute(statement).rowcount or 0)

    return count


def _select_one(connection: Connection) -> None:
    connection.execute(text("SELECT 1"))


class Database:
    """The table of ptb-sessions in one database: operations only.

    Every statement runs through SQLAlchemy's execution layer inside :meth:`_run`, which gives
    it a deadline (``timeout``), retries it once on a fresh connection when the pooled one
    turns out dead (a server restart), and turns every driver error into a
    :class:`~ptb_sessions.StorageError` with the URL's password masked. What differs between
    backends comes from the URL's :class:`~ptb_sessions._dialects.Dialect`.

    Args:
        url: An SQLAlchemy URL (sync URLs are run on their asyncio driver) or an
            :class:`~sqlalchemy.ext.asyncio.AsyncEngine`. An engine created here is disposed by
            :meth:`dispose` and created again when used afterwards; an engine passed in is never
            disposed here.
        auto_upgrade: Upgrade the schema to the newest revision on first use. If :obj:`False`,
            an outdated schema raises :class:`~ptb_sessions.SchemaError`.
        clock: Seconds since the epoch, for ``touched_at``.
        timeout: Seconds any one database call may take before it fails with
            :class:`~ptb_sessions.StorageError`.
        session_cache: How many session rows this process keeps after reading or writing
            them, so that the next update of a key reads nothing (0: none).
    """

    __slots__ = (
        "__weakref__",
        "_dialect",
        "_engine",
        "_lock_slots",
        "_owns_engine",
        "_ready",
        "_ready_lock",
        "_route_",
        "_statements",
        "_url",
        "auto_upgrade",
        "clock",
        "session_cache",
        "timeout",
    )

    def __init__(
        self,
        url: str | URL | AsyncEngine,
        *,
        auto_upgrade: bool = True,
        clock: Callable[[], float] = time.time,
        timeout: float = DEFAULT_TIMEOUT,
        session_cache: int = DEFAULT_SESSION_CACHE,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout}")
        if session_cache < 0:
            raise ValueError(f"session_cache must be 0 or more rows, not {session_cache}")
        if isinstance(url, AsyncEngine):
            self._engine: AsyncEngine | None = url
            self._url: URL = url.url
            self._owns_engine = False
        else:
            self._engine = None
            self._url = to_async_url(url)
            self._owns_engine = True
        self._dialect = dialect_for(self._url.get_backend_name())
        self._statements = _Statements.of(self._dialect)
        self._route_: _Route | None = None
        self._lock_slots: asyncio.Semaphore | None = None
        self.auto_upgrade = auto_upgrade
        self.clock = clock
        self.timeout = timeout
        self.session_cache = session_cache
        self._ready = False
        self._ready_lock = asyncio.Lock()

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

    def code_point_order(self, column: Any) -> Any:
        """``column`` for ``ORDER BY`` in code point order, whatever the database's collation."""
        return self._dialect.code_point_order(column)

    @property
    def engine(self) -> AsyncEngine:
        """The engine, created on first use (the schema upgrades run on it)."""
        if self._engine is None:
            self._engine = create_async_engine(
                self._url, **self._dialect.engine_options(self.timeout)
            )
            self._dialect.prepare_engine(self._engine.sync_engine)
        return self._engine

    @property
    def _route(self) -> _Route:
        if self._route_ is None:
            if self._owns_engine and self._dialect.threaded:
                sync = create_engine(
                    self._url.set(drivername=self._dialect.name),
                    **self._dialect.engine_options(self.timeout),
                )
                self._dialect.prepare_engine(sync)
                self._route_ = _ThreadRoute(sync)
            elif self._owns_engine:
                # Each statement commits itself: returning the connection to the pool needs
                # no ROLLBACK (a round trip on MariaDB and MySQL).
                autocommit = create_async_engine(
                    self._url,
                    isolation_level="AUTOCOMMIT",
                    skip_autocommit_rollback=True,
                    execution_options={AUTOCOMMIT_OPTION: True},
                    **self._dialect.engine_options(self.timeout),
                )
                self._route_ = _AsyncRoute(self.engine, autocommit, owned=True)
            else:
                # An engine passed in: its listeners and logging see every statement.
                autocommit = self.engine.execution_options(
                    isolation_level="AUTOCOMMIT", **{AUTOCOMMIT_OPTION: True}
                )
                self._route_ = _AsyncRoute(self.engine, autocommit, owned=False)
        return self._route_

    @property
    def engines(self) -> tuple[Engine, ...]:
        """The (sync) engines that run this database's reads and writes: attach event
        listeners to these to see every statement."""
        return self._route.engines

    async def dispose(self) -> None:
        """Close the pooled connections, if the engine was created here."""
        route, self._route_ = self._route_, None
        if route is not None:
            await route.dispose()
        if self._owns_engine and self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.dispose()

    # -- running statements: deadlines, retries, errors ---------------------------------

    def error(self, exc: BaseException, what: str) -> StorageError:
        """A :class:`~ptb_sessions.StorageError` for ``exc`` raised while doing ``what``."""
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, asyncio.TimeoutError):
            return StorageError(
                f"{what} failed on {self.masked_url}: no answer within {self.timeout:g} s "
                "(timeout)"
            )
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        reason = detail[0] if detail else type(exc).__name__
        reason = mask_secrets(reason, self._url)
        return StorageError(f"{what} failed on {self.masked_url}: {type(exc).__name__}: {reason}")

    def is_connection_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` (or the error it wraps) means the connection or the server failed,
        rather than a row being bad."""
        return self._dialect.is_connection_error(exc.__cause__ or exc)

    async def _run(
        self,
        what: str,
        work: Callable[[Connection], _T],
        *,
        autocommit: bool = False,
        read_only: bool = False,
    ) -> _T:
        """Run ``work`` on a connection: in a transaction committed at the end, or in
        autocommit mode; within the deadline; once more on a fresh connection if the pooled
        one was dead. Errors become :class:`~ptb_sessions.StorageError`."""
        await self.ensure_schema()
        for attempt in range(2):
            try:
                # A deadline on this task, not a task of its own (as wait_for would make):
                # no extra trips through the event loop per statement.
                async with _deadline(self.timeout):
                    return await self._route.run(work, autocommit=autocommit, read_only=read_only)
            except (SQLAlchemyError, OSError, asyncio.TimeoutError) as exc:
                dead = isinstance(exc, DBAPIError) and exc.connection_invalidated
                if attempt == 0 and dead:
                    _LOGGER.info("%s: a pooled connection was dead; trying a new one", what)
                    continue
                raise self.error(exc, what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def reachable(self) -> bool:
        """Whether a new connection to the database answers a trivial query."""
        try:
            await self._run("Checking the connection", _select_one, autocommit=True)
        except StorageError:
            return False
        return True

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
            try:
                current = await asyncio.wait_for(self._upgrade_if_allowed(), self.timeout * 10)
            except (SQLAlchemyError, OSError, asyncio.TimeoutError) as exc:
                raise self.error(exc, "Checking the database schema") from exc
            head = _alembic.head_revision()
            if current != head:
                raise SchemaError(
                    f"The database {self.masked_url} is at schema revision "
                    f"{current or 'none (empty database)'}, but ptb-sessions needs revision "
                    f"{head}. Run `ptb-sessions --url '{self.masked_url}' db upgrade` (or "
                    f"`alembic -x url='{self.masked_url}' upgrade head` from the ptb-sessions "
                    f"repository), or pass auto_upgrade=True."
                )
            self._ready = True

    async def _upgrade_if_allowed(self) -> str | None:
        """The schema revision, after upgrading to head if ``auto_upgrade``."""
        head = _alembic.head_revision()
        current = await _alembic.checked_revision(self.engine, create=self.auto_upgrade)
        if current == head or not self.auto_upgrade:
            return current
        async with self._dialect.schema_lock(self.engine):
            # Another process may have upgraded while this one waited.
            current = await _alembic.current_revision(self.engine)
            if current != head:
                _LOGGER.info("Upgrading %s from revision %s to %s", self.masked_url, current, head)
                await _alembic.upgrade(self.engine, head)
                current = await _alembic.current_revision(self.engine)
        return current

    @contextlib.asynccontextmanager
    async def connect(
        self, what: str, *, read_only: bool = False
    ) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, committed at the end; errors become StorageError.

        For callers outside this module that run statements of their own (on their own
        tables): the body gets no deadline and no retry (it is not a function that can be run
        again); prefer :meth:`run`.
        """
        await self.ensure_schema()
        try:
            async with self.engine.connect() as connection:
                if read_only:
                    await connection.execution_options(ptb_sessions_read_only=True)
                async with connection.begin():
                    yield connection
        except (SQLAlchemyError, OSError) as exc:
            raise self.error(exc, what) from exc

    async def run(
        self,
        what: str,
        work: Callable[[Connection], _T],
        *,
        read_only: bool = False,
    ) -> _T:
        """Run ``work(connection)``, a function of a sync
        :class:`~sqlalchemy.engine.Connection`, in one transaction, with this database's
        deadline, retry and error translation (see :meth:`_run`); it must be safe to run
        twice (after a dead connection)."""
        return await self._run(what, work, read_only=read_only)

    # -- reads --------------------------------------------------------------------------

    async def get(self, namespace: str, key: str) -> Record | None:
        """The row of ``key`` in ``namespace``, or :obj:`None`."""

        def read(connection: Connection) -> Record | None:
            row = (connection.execute(_GET_ONE, {"ns": namespace, "k": key})).first()
            return None if row is None else Record(*row)

        return await self._run(f"Reading {namespace}[{key!r}]", read, autocommit=True)

    async def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, Record]:
        """The rows of ``keys`` that exist in ``namespace``: one statement per 500 keys, each
        atomic by itself (no transaction: no ``BEGIN`` and ``COMMIT`` round trips)."""

        def read(connection: Connection) -> dict[str, Record]:
            found: dict[str, Record] = {}
            for chunk in _chunks(keys):
                result = connection.execute(
                    select(_C.key, *_RECORD_COLUMNS).where(
                        _C.namespace == namespace, self._dialect.key_in(chunk)
                    )
                )
                for key, *rest in result:
                    found[key] = Record(*rest)
            return found

        return await self._run(f"Reading {len(keys)} keys of {namespace}", read, autocommit=True)

    async def scan(
        self, namespace: str, *, batch_size: int = 5000
    ) -> AsyncIterator[tuple[str, Record]]:
        """Every row of ``namespace``, in key order, fetched in batches (keyset pagination, so
        memory does not grow with the table). The next batch is fetched while the caller
        takes the rows of this one."""

        def page(after: str | None) -> Awaitable[list[Any]]:
            query = select(_C.key, *_RECORD_COLUMNS).where(_C.namespace == namespace)
            if after is not None:
                query = query.where(_C.key > after)
            query = query.order_by(_C.key).limit(batch_size)
            return self._run(f"Reading {namespace}", _fetch_all(query), read_only=True)

        rows = await page(None)
        while True:
            following = (
                asyncio.ensure_future(page(rows[-1][0])) if len(rows) == batch_size else None
            )
            try:
                for key, *rest in rows:
                    yield key, Record(*rest)
            except BaseException:  # the caller stopped early, or failed
                if following is not None:
                    _discard(following)
                raise
            if following is None:
                return
            rows = await following

    async def namespaces(self) -> list[str]:
        """Every namespace that has rows."""
        rows = await self._run(
            "Listing namespaces", _fetch_all(select(_C.namespace).distinct()), read_only=True
        )
        return sorted(row[0] for row in rows)

    # -- writes -------------------------------------------------------------------------

    async def apply(self, writes: Sequence[Write]) -> dict[tuple[str, str], StorageError]:
        """Apply ``writes`` in one transaction, checking row versions.

        A write is applied if the stored row is at its ``expected_version`` (or at a version
        one of its earlier, unacknowledged attempts wrote: then that attempt committed and its
        reply was lost); else it gets a :class:`~ptb_sessions.ConflictError` and the others
        are applied. Changes at the version read and new rows go first, as statements that
        check the version themselves; the stored versions are read (and locked) only for the
        writes those did not apply. If the transaction fails for another reason while the
        database is reachable, the writes are applied one by one, each in its own transaction,
        so a row the database rejects (whatever the failure looks like, even a dropped
        connection) fails for its key only.

        Returns:
            The errors of the writes that were not applied, by ``(namespace, key)``.

        Raises:
            StorageError: The database cannot be reached; nothing was applied.
        """
        if not writes:
            return {}
        try:
            return await self._apply_batch(writes)
        except StorageError as exc:
            if self.is_connection_error(exc) and not await self.reachable():
                raise
            if len(writes) == 1:
                return {writes[0].where: exc}
            _LOGGER.warning(
                "A batch of %d writes failed (%s); retrying one by one", len(writes), exc
            )
        errors: dict[tuple[str, str], StorageError] = {}
        for write in writes:
            try:
                errors.update(await self._apply_batch([write]))
            except StorageError as exc:
                if self.is_connection_error(exc) and not await self.reachable():
                    raise
                errors[write.where] = exc
        return errors

    async def apply_batch(self, writes: Sequence[Write]) -> dict[tuple[str, str], StorageError]:
        """Apply the independent ``writes`` of several callers (group commit), checking row
        versions as :meth:`apply` does, in as few statements as possible, and never waiting for
        a row that another transaction locked: such a row fails the statement at once. There is
        no fallback: a failed statement raises, and only what it wrote is not applied.

        On a server, the changes at the version read and the new rows go first, each kind as
        one statement committed by itself (one round trip, no ``BEGIN`` nor ``COMMIT``); the
        rest, if any, in one transaction after reading the stored versions. Where a transaction
        costs no round trip (SQLite), all of it is one transaction.

        Returns:
            The conflicts of the writes that were not applied, by ``(namespace, key)``.

        Raises:
            StorageError: A statement failed; the writes it carried were not applied.
        """
        if not writes:
            return {}
        if self._dialect.cheap_transactions:
            return await self._apply_batch(writes, wait_for_locks=False)
        unsure: Sequence[Write] = writes
        if any(self._checks_itself(write) for write in writes):
            unsure = await self._run(
                f"Writing {len(writes)} rows",
                lambda connection: self._write_self_checked(
                    connection, writes, self.clock(), wait_for_locks=False
                ),
                autocommit=True,
            )
        if not unsure:
            return {}
        return await self._apply_batch(unsure, wait_for_locks=False, self_checked=False)

    async def _apply_batch(
        self,
        writes: Sequence[Write],
        *,
        wait_for_locks: bool = True,
        self_checked: bool = True,
    ) -> dict[tuple[str, str], StorageError]:
        """One transaction of ``writes`` (tried again if it lost a deadlock); with
        ``self_checked=False``, they were tried by :meth:`_write_self_checked` already."""
        what = (
            f"Writing {writes[0].namespace}[{writes[0].key!r}]"
            if len(writes) == 1
            else f"Writing {len(writes)} rows"
        )
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                return await self._run(
                    what,
                    lambda connection: self._write_batch(
                        connection, writes, wait_for_locks, self_checked=self_checked
                    ),
                )
            except StorageError as exc:
                if attempt + 1 == _DEADLOCK_RETRIES or not self._dialect.is_deadlock(
                    exc.__cause__ or exc
                ):
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _write_batch(
        self,
        connection: Connection,
        writes: Sequence[Write],
        wait_for_locks: bool = True,
        *,
        self_checked: bool = True,
    ) -> dict[tuple[str, str], StorageError]:
        now = self.clock()
        unsure = (
            self._write_self_checked(connection, writes, now, wait_for_locks=wait_for_locks)
            if self_checked
            else writes
        )
        return self._write_checked(connection, unsure, now, wait_for_locks) if unsure else {}

    def _checks_itself(self, write: Write) -> bool:
        """Whether ``write`` has a statement that checks the stored version by itself (see
        :meth:`_write_self_checked`)."""
        expected = write.expected_version
        if write.data is None or expected == ANY_VERSION:
            return False
        return expected is None or self._dialect.updates_at_versions

    def _write_self_checked(
        self,
        connection: Connection,
        writes: Sequence[Write],
        now: float,
        *,
        wait_for_locks: bool = True,
    ) -> list[Write]:
        """Apply the writes whose statement checks the version by itself, with no read of the
        stored versions first: a change of a row at the version it was read at (an update on
        that condition) and a new row (an insert-only). With ``wait_for_locks=False``, a change
        of a row that another transaction locked fails the statement at once. Returns the
        writes not known to be applied; :meth:`_write_checked` decides them by the stored
        version (a write applied here shows as done there, by the version it stored)."""
        changes: dict[str, list[Write]] = {}
        creates: list[Write] = []
        unsure: list[Write] = []
        for write in writes:
            if not self._checks_itself(write):
                unsure.append(write)
            elif write.expected_version is None:
                creates.append(write)
            else:
                changes.setdefault(write.namespace, []).append(write)
        for namespace, group in changes.items():
            updated = self._dialect.update_at_versions(
                connection, namespace, group, now, wait=wait_for_locks
            )
            unsure.extend(write for write in group if write.key not in updated)
        if creates:
            inserted = self._dialect.insert_absent(connection, creates, now)
            unsure.extend(write for write in creates if write.where not in inserted)
        return unsure

    def _write_checked(
        self,
        connection: Connection,
        writes: Sequence[Write],
        now: float,
        wait_for_locks: bool,
    ) -> dict[tuple[str, str], StorageError]:
        """Apply ``writes`` after locking their rows and reading their versions."""
        stored: dict[tuple[str, str], int] = {}
        for namespace, keys in _keys_by_namespace(writes).items():
            for chunk in _chunks(keys):
                locked = self._dialect.lock_versions(
                    connection, namespace, chunk, wait=wait_for_locks
                )
                stored.update(((namespace, key), version) for key, version in locked.items())
        errors: dict[tuple[str, str], StorageError] = {}
        deletes: dict[str, list[str]] = {}
        inserts: list[dict[str, Any]] = []
        upserts: list[Write] = []
        for write in writes:
            verdict = write.verdict(stored.get(write.where))
            if verdict is _Verdict.CONFLICT:
                errors[write.where] = write.conflict(stored.get(write.where))
            elif verdict is _Verdict.DONE:
                continue
            elif write.data is None:
                deletes.setdefault(write.namespace, []).append(write.key)
            elif write.where in stored:
                upserts.append(write)
            else:
                inserts.append(write.row(now))
        for namespace, keys in deletes.items():
            for chunk in _chunks(keys):
                connection.execute(
                    delete(_TABLE).where(_C.namespace == namespace, self._dialect.key_in(chunk))
                )
        if upserts:
            self._dialect.upsert_rows(connection, upserts, now)
        if inserts:
            # Insert-only: a row that another writer created since our read (locking a row
            # that does not exist yet locks nothing on PostgreSQL) is a conflict, not ours.
            result = connection.execute(self._statements.insert_many, inserts)
            inserted = {(row[0], row[1]) for row in result}
            for row in inserts:
                where = (row["namespace"], row["key"])
                if where not in inserted:
                    errors[where] = ConflictError(
                        f"{where[0]}[{where[1]!r}] was created by another writer since it was "
                        "read; this write was dropped and the key will be read again"
                    )
        return errors

    async def write_one(self, write: Write) -> None:
        """Apply one write with a single statement, atomic by itself (no transaction): a
        conditional ``UPDATE``/``DELETE`` (version check), an insert-only ``INSERT`` (nothing
        stored expected), or an upsert/delete without a check. When the statement changes no
        row, the stored version decides, by the same rule as :meth:`apply`.

        Raises:
            ConflictError: The stored version is not the expected one.
            StorageError: The database failed.
        """

        def attempt(connection: Connection) -> StorageError | _Verdict | None:
            params = write.params(self.clock())
            if write.execute_single(connection, self._statements, params):
                return None
            row = (connection.execute(_GET_VERSION, params)).first()
            current = None if row is None else row[0]
            verdict = write.verdict(current)
            return write.conflict(current) if verdict is _Verdict.CONFLICT else verdict

        outcome = await self._run(
            f"Writing {write.namespace}[{write.key!r}]", attempt, autocommit=True
        )
        if outcome is _Verdict.APPLY:
            # The row is as this writer left it, yet the statement did not apply (SQLite's
            # update of a write without an expiry to a row that still has one): the checked
            # way, in a transaction, writes it.
            outcome = (await self._apply_batch([write], self_checked=False)).get(write.where)
        if isinstance(outcome, StorageError):
            raise outcome

    async def touch(self, namespace: str, keys: Sequence[str], expires_at: float | None) -> None:
        """Set ``touched_at`` to now and ``expires_at`` of ``keys`` (a read with a ttl)."""
        now = self.clock()

        def work(connection: Connection) -> None:
            for chunk in _chunks(keys):
                connection.execute(
                    update(_TABLE)
                    .where(_C.namespace == namespace, self._dialect.key_in(chunk))
                    .values(touched_at=now, expires_at=expires_at)
                )

        await self._run(f"Refreshing the expiry of {namespace}", work)

    async def touch_namespace(self, namespace: str, expires_at: float) -> None:
        """Set ``expires_at`` of every unexpired row of ``namespace`` (an eager load)."""
        now = self.clock()
        statement = (
            update(_TABLE)
            .where(
                _C.namespace == namespace,
                (_C.expires_at.is_(None)) | (_C.expires_at >= now),
            )
            .values(touched_at=now, expires_at=expires_at)
        )
        await self._run(f"Refreshing the expiry of {namespace}", _rowcount(statement))

    async def delete_if_expired(self, namespace: str, key: str, *, now: float) -> bool:
        """Delete the row of ``key`` if it has expired by ``now`` (the clock of the policy
        that decided it expired). Whether it was deleted."""
        statement = delete(_TABLE).where(
            _C.namespace == namespace, _C.key == key, _C.expires_at < now
        )
        count = await self._run(
            f"Deleting the expired {namespace}[{key!r}]", _rowcount(statement), autocommit=True
        )
        return bool(count)

    async def purge_expired(
        self, namespace: str | None = None, *, now: float | None = None
    ) -> int:
        """Delete every row expired by ``now`` (the policy's clock; the database's by default;
        uses the index on ``expires_at``). Returns the count."""
        statement = delete(_TABLE).where(_C.expires_at < (self.clock() if now is None else now))
        if namespace is not None:
            statement = statement.where(_C.namespace == namespace)
        return await self._run("Deleting expired rows", _rowcount(statement))

    async def move_keys(
        self, moves: Sequence[tuple[str, str, str]]
    ) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
        """Rename rows ``(namespace, old_key, new_key)`` in one transaction. A row whose new key
        already exists is left where it is.

        Returns:
            The moves done and the moves skipped because the new key was taken.
        """

        def work(
            connection: Connection,
        ) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
            done: list[tuple[str, str, str]] = []
            skipped: list[tuple[str, str, str]] = []
            for namespace, old, new in moves:
                locked = self._dialect.lock_versions(connection, namespace, [old, new])
                if old not in locked:
                    continue
                if new in locked:
                    skipped.append((namespace, old, new))
                    continue
                connection.execute(
                    update(_TABLE)
                    .where(_C.namespace == namespace, _C.key == old)
                    .values(key=new, version=new_version())
                )
                done.append((namespace, old, new))
            return done, skipped

        if not moves:
            return [], []
        return await self._run(f"Moving {len(moves)} rows", work)

    async def keys_containing(self, namespace: str, part: str) -> list[str]:
        """The keys of ``namespace`` that contain ``part`` (a scan: for rare maintenance)."""
        escaped = part.replace("!", "!!").replace("%", "!%").replace("_", "!_")
        query = select(_C.key).where(
            _C.namespace == namespace, _C.key.like(f"%{escaped}%", escape="!")
        )
        rows = await self._run(f"Searching {namespace}", _fetch_all(query), read_only=True)
        return sorted(row[0] for row in rows)

    async def stats(self) -> list[tuple[str, int, int, int]]:
        """``(namespace, rows, bytes, expired rows)`` per namespace."""
        query = (
            select(
                _C.namespace,
                func.count(),
                func.coalesce(func.sum(func.length(_C.data)), 0),
                func.coalesce(func.sum(case((_C.expires_at < self.clock(), 1), else_=0)), 0),
            )
            .group_by(_C.namespace)
            .order_by(_C.namespace)
        )
        rows = await self._run("Counting rows", _fetch_all(query), read_only=True)
        return [(ns, int(n), int(b), int(e)) for ns, n, b, e in rows]

    # -- database row locks (several processes) ------------------------------------------

    @contextlib.asynccontextmanager
    async def row_lock(self, namespace: str, key: str, timeout: float = 60) -> AsyncIterator[None]:
        """Hold a database lock on ``(namespace, key)`` across processes until exit.

        PostgreSQL uses a transaction-level advisory lock, MariaDB/MySQL ``GET_LOCK``; both
        lock the key whether or not its row exists. SQLite has one writer at a time and a
        single process in practice: nothing is locked there.
        """
        if not self._dialect.row_locks:
            yield
            return
        await self.ensure_schema()
        what = f"Locking {namespace}[{key!r}]"
        slots = self._row_lock_slots()
        try:
            await asyncio.wait_for(slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise StorageError(
                f"Could not lock {namespace}[{key!r}] within {timeout} s on {self.masked_url}: "
                "every connection for row locks is taken by other updates"
            ) from None
        try:
            async with self._locked(namespace, key, timeout, what):
                yield
        finally:
            slots.release()

    def _row_lock_slots(self) -> asyncio.Semaphore:
        """How many row locks this process may hold at once: each holds a pooled connection
        of its own, and the holders' reads and writes must still find one (else they would
        wait for each other until the deadline)."""
        if self._lock_slots is None:
            size = getattr(self.engine.sync_engine.pool, "size", None)
            overflow = POOL_OVERFLOW if self._owns_engine else 0  # unknown: none
            capacity = size() + overflow if callable(size) else 1 << 16  # else: no pool
            self._lock_slots = asyncio.Semaphore(max(1, capacity - _CONNECTIONS_FOR_DATA))
        return self._lock_slots

    @contextlib.asynccontextmanager
    async def _locked(
        self, namespace: str, key: str, timeout: float, what: str
    ) -> AsyncIterator[None]:
        try:
            connection = await asyncio.wait_for(self.engine.connect(), self.timeout)
        except (SQLAlchemyError, OSError, asyncio.TimeoutError) as exc:
            raise self.error(exc, what) from exc
        try:
            name = f"ptb_sessions:{namespace}:{key}"
            async with self._dialect.row_lock(connection, name, timeout) as got:
                if not got:
                    raise StorageError(
                        f"Could not lock {namespace}[{key!r}] within {timeout} s on "
                        f"{self.masked_url}"
                    )
                yield
        except (SQLAlchemyError, OSError) as exc:
            raise self.error(exc, what) from exc
        finally:
            with contextlib.suppress(Exception):
                await connection.close()


class _Route:
    """How work functions (of a sync :class:`~sqlalchemy.engine.Connection`) reach the
    database."""

    __slots__ = ()

    @property
    def engines(self) -> tuple[Engine, ...]:
        raise NotImplementedError

    def run(
        self, work: Callable[[Connection], _T], *, autocommit: bool, read_only: bool
    ) -> Awaitable[_T]:
        raise NotImplementedError

    async def dispose(self) -> None:
        raise NotImplementedError


class _AsyncRoute(_Route):
    """An asyncio driver: each work function runs on a pooled connection through SQLAlchemy's
    ``run_sync`` bridge; single statements use an autocommit engine."""

    __slots__ = ("_autocommit", "_engine", "_owned")

    def __init__(self, engine: AsyncEngine, autocommit: AsyncEngine, *, owned: bool) -> None:
        self._engine = engine
        self._autocommit = autocommit
        self._owned = owned

    @property
    def engines(self) -> tuple[Engine, ...]:
        engines = (self._engine.sync_engine, self._autocommit.sync_engine)
        return engines if self._owned else engines[:1]

    async def run(
        self, work: Callable[[Connection], _T], *, autocommit: bool, read_only: bool
    ) -> _T:
        connection = await (self._autocommit if autocommit else self._engine).connect()
        try:
            if autocommit:
                result = await connection.run_sync(work)
            else:
                async with connection.begin():
                    result = await connection.run_sync(work)
        except BaseException:
            # Also on cancellation by the deadline: dropping the connection needs no answer
            # from a server that may have stopped answering.
            with contextlib.suppress(Exception):
                await connection.invalidate()
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        await connection.close()
        return result

    async def dispose(self) -> None:
        if self._owned:
            await self._autocommit.dispose()


class _ThreadRoute(_Route):
    """SQLite, a file on this machine: SQLAlchemy's sync engine in one thread of its own,
    so a work function costs one hop to that thread (not one per cursor call, as through
    aiosqlite), and the event loop never blocks.

    The thread keeps its two connections (one for transactions, one in autocommit mode for
    single statements) open between calls instead of checking one out of the pool each time;
    a connection on which a call failed is closed and opened again by the next call.
    """

    __slots__ = ("_autocommit", "_engine", "_executor", "_transactional")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ptb_sessions-sqlite")
        self._autocommit: Connection | None = None
        self._transactional: Connection | None = None

    @property
    def engines(self) -> tuple[Engine, ...]:
        return (self._engine,)

    def run(
        self, work: Callable[[Connection], _T], *, autocommit: bool, read_only: bool
    ) -> asyncio.Future[_T]:
        call = functools.partial(self._run, work, autocommit=autocommit, read_only=read_only)
        return asyncio.get_running_loop().run_in_executor(self._executor, call)

    def _run(self, work: Callable[[Connection], _T], *, autocommit: bool, read_only: bool) -> _T:
        if autocommit:
            connection = self._autocommit
            if connection is None:
                connection = self._autocommit = self._engine.connect()
                connection.execution_options(**{AUTOCOMMIT_OPTION: True})
        else:
            connection = self._transactional
            if connection is None:
                connection = self._transactional = self._engine.connect()
        try:
            if autocommit:
                # The driver commits every statement itself (see _sqlite_on_begin): the
                # transaction that SQLAlchemy began on this connection stays open and empty.
                return work(connection)
            connection.execution_options(ptb_sessions_read_only=read_only)
            with connection.begin():
                return work(connection)
        except BaseException:
            self._drop(connection)
            raise

    def _drop(self, connection: Connection) -> None:
        if connection is self._autocommit:
            self._autocommit = None
        elif connection is self._transactional:
            self._transactional = None
        with contextlib.suppress(Exception):
            connection.invalidate()
        with contextlib.suppress(Exception):
            connection.close()

    def _close(self) -> None:
        for connection in (self._autocommit, self._transactional):
            if connection is not None:
                with contextlib.suppress(Exception):
                    connection.close()
        self._autocommit = self._transactional = None
        self._engine.dispose()

    async def dispose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=False)


_RECORD_COLUMNS = (
    _C.codec,
    _C.data,
    _C.version,
    _C.data_version,
    _C.touched_at,
    _C.expires_at,
)
_GET_ONE = select(*_RECORD_COLUMNS).where(ONE_ROW)
_GET_VERSION = select(_C.version).where(ONE_ROW)
_DELETE_ONE = delete(_TABLE).where(ONE_ROW)
_DELETE_IF_VERSION = delete(_TABLE).where(ONE_ROW, _C.version == bindparam("expected"))
_INSERT_VALUES = {"namespace": bindparam("ns"), "key": bindparam("k"), **VALUE_PARAMS}
