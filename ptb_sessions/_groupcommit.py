"""Group commit: the single-row session reads and writes of concurrent callers, sent to the
database together, and the rows this process last read or wrote, kept in a bounded cache.

A caller queues its operation and waits for its own result. An operation that finds nothing
running nor queued goes at once, in the caller's task; whatever is queued while a batch runs
goes, as one batch, when it returns: no timer delays a lone operation. A batch of one runs as
its single statement (:meth:`Database.get`, :meth:`Database.write_one`); a larger one reads
with one statement per namespace and writes with one statement, committed once
(:meth:`Database.apply_batch`).

Nothing one key does holds back another: a batch does not wait for a row that another
transaction locked, and a batch that fails for any reason is sent again at once as
single-row statements, side by side, so each caller gets the result of its own key. A batch
still running after :data:`STALLED_AFTER` seconds (a lone statement waiting for a row lock)
no longer holds the next batch back.

The cache (least recently used first out, the database's ``session_cache`` rows,
:data:`DEFAULT_CACHE_SIZE` by default) holds each row as this process last read or wrote it,
with its version, so the next update of a key needs no read. A write based on a cached row
that another process changed is a :class:`~ptb_sessions.ConflictError`, as any stale write
is, and any failed write drops the key from the cache, so the key is read again next time.
Under a database lock (``SessionHandler(lock="database")``) a key is always read from the
database (:meth:`GroupCommit.forget`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any, Final, TypeVar

from ptb_sessions._errors import StorageError
from ptb_sessions._store import DEFAULT_SESSION_CACHE, Database, Record, Write

__all__ = ["DEFAULT_CACHE_SIZE", "STALLED_AFTER", "GroupCommit"]

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Seconds after which a running batch no longer holds back the next one.
STALLED_AFTER: Final = 0.25
#: How many rows the per-process cache keeps by default.
DEFAULT_CACHE_SIZE: Final = DEFAULT_SESSION_CACHE

_Where = tuple[str, str]
_GROUPS: weakref.WeakKeyDictionary[Database, GroupCommit] = weakref.WeakKeyDictionary()


class GroupCommit:
    """The session reads and writes of one :class:`~ptb_sessions._store.Database`.

    Use :meth:`of` to get the one instance of a database, so that every storage on it shares
    the batches and the cache.
    """

    __slots__ = ("_cache", "_database", "_inflight", "_reads", "_running", "_writes", "cache_size")

    def __init__(self, database: Database, *, cache_size: int | None = None) -> None:
        self._database = database
        self._cache: OrderedDict[_Where, Record | None] = OrderedDict()
        if cache_size is None:
            cache_size = database.session_cache
        #: How many rows the cache keeps (0: none).
        self.cache_size = cache_size
        self._reads: dict[_Where, asyncio.Future[Record | None]] = {}
        self._writes: dict[_Where, tuple[Write, asyncio.Future[None]]] = {}
        self._running = False  # whether a task sends the queued operations
        self._inflight: asyncio.Future[None] | None = None  # done when the last batch returns

    @classmethod
    def of(cls, database: Database) -> GroupCommit:
        """The group commit of ``database`` (created on first use)."""
        group = _GROUPS.get(database)
        if group is None:
            group = _GROUPS[database] = cls(database)
        return group

    # -- the cache ------------------------------------------------------------------------

    def __len__(self) -> int:
        """How many rows the cache holds."""
        return len(self._cache)

    def forget(self, namespace: str, key: str) -> None:
        """Drop the cached row of ``key``: its next read goes to the database (another
        process may have changed it)."""
        self._cache.pop((namespace, key), None)

    async def touch(self, namespace: str, key: str, expires_at: float | None) -> None:
        """Refresh the expiry of ``key`` (a read under a ttl), in the database and in the
        cached row."""
        await self._database.touch(namespace, [key], expires_at)
        where = (namespace, key)
        cached = self._cache.get(where)
        if cached is not None:
            self._cache[where] = dataclasses.replace(
                cached, expires_at=expires_at, touched_at=self._database.clock()
            )

    def clear(self) -> None:
        """Drop every cached row (rows were changed outside the sessions, e.g. moved)."""
        self._cache.clear()

    def _remember(self, where: _Where, record: Record | None) -> None:
        if self.cache_size <= 0:
            return
        cache = self._cache
        cache[where] = record
        cache.move_to_end(where)
        if len(cache) > self.cache_size:
            cache.popitem(last=False)

    # -- reads and writes ----------------------------------------------------------------

    async def read(self, namespace: str, key: str) -> Record | None:
        """The row of ``key``, or :obj:`None`: as cached, else read together with the reads
        of concurrent callers."""
        where = (namespace, key)
        cache = self._cache
        if where in cache:
            cache.move_to_end(where)
            return cache[where]
        if self._idle:
            record = await self._alone(self._database.get(namespace, key))
        else:
            waiting = self._reads.get(where)
            if waiting is None:
                waiting = self._reads[where] = asyncio.get_running_loop().create_future()
                self._start()
            record = await asyncio.shield(waiting)
        self._remember(where, record)
        return record

    async def write(self, write: Write) -> None:
        """Apply ``write`` (see :meth:`Database.write_one`), committed together with the
        writes of concurrent callers; returns once it is committed.

        Raises:
            ConflictError: The stored version is not the expected one (the key's cached row
                is dropped, as after any failure).
            StorageError: The database failed.
        """
        where = write.where
        self._cache.pop(where, None)  # unknown until the write returns
        try:
            if self._idle:
                await self._alone(self._database.write_one(write))
            else:
                while where in self._writes:  # one write per key and batch
                    # the earlier write's outcome is its own: wait for it, never raise it
                    await asyncio.wait((self._writes[where][1],))
                done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._writes[where] = (write, done)
                self._start()
                try:
                    await done  # this caller's own future: cancelling the caller cancels it only
                except asyncio.CancelledError:
                    if self._writes.get(where, (write, None))[1] is done:
                        del self._writes[where]  # not sent yet, and now never sent
                    raise
        except BaseException:
            self._cache.pop(where, None)
            raise
        self._remember(where, _written(write, self._database.clock()))

    @property
    def _idle(self) -> bool:
        """Whether nothing is being sent nor queued: an operation may go at once, alone."""
        return self._inflight is None and not self._running

    async def _alone(self, work: Awaitable[_T]) -> _T:
        """Run ``work``, a single-row operation, in the caller's task, as a batch of one
        (what is queued meanwhile waits for it, as for any batch)."""
        batch: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight = batch
        try:
            return await work
        finally:
            batch.set_result(None)
            self._batch_returned(batch)

    def _batch_returned(self, batch: asyncio.Future[None]) -> None:
        if self._inflight is batch:
            self._inflight = None

    def _start(self) -> None:
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._send_batches())

    async def _send_batches(self) -> None:
        try:
            await asyncio.sleep(0)  # let the callers of this loop iteration join
            while self._reads or self._writes:
                previous = self._inflight
                if previous is not None:
                    done, _ = await asyncio.wait({previous}, timeout=STALLED_AFTER)
                    if not done:
                        _LOGGER.debug("A batch is slow; the next one goes without waiting")
                reads, self._reads = self._reads, {}
                writes, self._writes = self._writes, {}
                batch = self._inflight = asyncio.ensure_future(self._send(reads, writes))
                batch.add_done_callback(self._batch_returned)
        finally:
            self._running = False

    async def _send(
        self,
        reads: dict[_Where, asyncio.Future[Record | None]],
        writes: dict[_Where, tuple[Write, asyncio.Future[None]]],
    ) -> None:
        try:
            if not reads:
                await self._send_writes(writes)
            elif not writes:
                await self._send_reads(reads)
            else:
                await asyncio.gather(self._send_reads(reads), self._send_writes(writes))
        finally:
            waiters: list[asyncio.Future[Any]] = [*reads.values()]
            waiters += [done for _, done in writes.values()]
            for waiting in waiters:
                waiting.cancel()  # only those still waiting (the batch was cancelled)

    async def _send_reads(self, reads: dict[_Where, asyncio.Future[Record | None]]) -> None:
        if len(reads) == 1:
            (((namespace, key), waiting),) = reads.items()
            await _settle(waiting, self._database.get(namespace, key))
            return
        by_namespace: dict[str, list[str]] = {}
        for namespace, key in reads:
            by_namespace.setdefault(namespace, []).append(key)
        for namespace, keys in by_namespace.items():
            try:
                found = await self._database.get_many(namespace, keys)
            except StorageError:
                # each key on its own, so that each gets an error naming it (or its row)
                await asyncio.gather(
                    *(_settle(reads[namespace, k], self._database.get(namespace, k)) for k in keys)
                )
                continue
            for key in keys:
                waiting = reads[namespace, key]
                if not waiting.done():
                    waiting.set_result(found.get(key))

    async def _send_writes(self, writes: dict[_Where, tuple[Write, asyncio.Future[None]]]) -> None:
        if len(writes) == 1:
            ((write, done),) = writes.values()
            await _settle(done, self._database.write_one(write))
            return
        batch = [write for write, _ in writes.values()]
        try:
            errors = await self._database.apply_batch(batch)
        except StorageError as exc:
            await self._send_one_by_one(writes, exc)
            return
        for where, (_, done) in writes.items():
            error = errors.get(where)
            if done.done():
                continue
            if error is None:
                done.set_result(None)
            else:
                _fail(done, error)

    async def _send_one_by_one(
        self, writes: dict[_Where, tuple[Write, asyncio.Future[None]]], exc: StorageError
    ) -> None:
        """After the batch of ``writes`` failed with ``exc``: each write on its own, side by
        side (a locked row waits for its lock alone), unless the database is unreachable."""
        if self._database.is_connection_error(exc) and not await self._database.reachable():
            for write, done in writes.values():
                _fail(done, _for_key(exc, write.namespace, write.key))
            return
        _LOGGER.debug(
            "A batch of %d writes failed (%s); sending them one by one", len(writes), exc
        )
        await asyncio.gather(
            *(_settle(done, self._database.write_one(write)) for write, done in writes.values())
        )


def _written(write: Write, now: float) -> Record | None:
    """The row as ``write`` left it (:obj:`None`: deleted)."""
    if write.data is None:
        return None
    return Record(
        codec=write.codec,
        data=write.data,
        version=write.version,
        data_version=write.data_version,
        touched_at=now,
        expires_at=write.expires_at,
    )


async def _settle(future: asyncio.Future[_T], work: Awaitable[_T]) -> None:
    try:
        result = await work
    except Exception as exc:  # the waiter raises it
        _fail(future, exc)
    else:
        if not future.done():
            future.set_result(result)


def _for_key(exc: StorageError, namespace: str, key: str) -> StorageError:
    """``exc`` of a whole batch, as the error of one of its keys (naming that key)."""
    error = type(exc)(f"{namespace}[{key!r}]: {exc}")
    error.__cause__ = exc
    return error


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved: the waiter raises it
