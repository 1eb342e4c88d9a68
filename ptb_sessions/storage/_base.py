"""The storage adapter protocol and the versioning contract of storages that keep versions."""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from ptb_sessions._errors import ConflictError

__all__ = ["MAX_READ_VERSIONS", "ReadVersions", "StorageAdapter", "conflict_error"]

V = TypeVar("V")

MAX_READ_VERSIONS = 100_000
"""How many keys a :class:`ReadVersions` remembers before it drops the least recently read."""


@runtime_checkable
class StorageAdapter(Protocol):
    """Where sessions live: the grammY ``StorageAdapter`` for Python.

    Any object with these three coroutine methods is a storage adapter, e.g.::

        class DictStorage:
            def __init__(self) -> None:
                self.data: dict[str, Any] = {}

            async def read(self, key: str) -> Any | None:
                return self.data.get(key)

            async def write(self, key: str, value: Any) -> None:
                self.data[key] = value

            async def delete(self, key: str) -> None:
                self.data.pop(key, None)

    .. rubric:: Optional methods

    An adapter may also offer these; ptb-sessions uses them when present (check with
    :func:`hasattr`), the session middleware itself never needs them:

    * ``async has(key: str) -> bool``: whether a (non-expired) value is stored for ``key``.
    * ``keys() -> AsyncIterator[str]``: the stored keys.
    * ``items() -> AsyncIterator[tuple[str, Any]]``: the stored ``(key, value)`` pairs.
    * ``lock(key: str) -> AbstractAsyncContextManager[Any]``: a lock on ``key`` held from load
      to save with ``lock="database"`` (e.g. a row lock).
    * ``needs_writeback(key: str) -> bool``: whether the value that :meth:`read` just returned
      to this task must be written back after the handler even if unchanged (it was migrated
      to the latest data version, or a plain adapter's expiry needs a refresh).

    .. rubric:: Storages that keep versions

    A storage that *keeps versions* (:class:`~ptb_sessions.MemoryStorage`,
    :class:`~ptb_sessions.SQLAlchemyStorage`) turns a lost update into a
    :class:`~ptb_sessions.ConflictError`:

    * Each stored value has a version; every successful :meth:`write` gives the key a new
      version. Versions of a key never repeat, not even after a :meth:`delete` (use a
      storage-wide counter or a random token, not "previous + 1 starting from 1"), so a delete
      and a rewrite between a read and a write are detected.
    * The storage remembers, per key, the version that :meth:`read` last returned in this
      process, *including* "nothing stored". It remembers it for the asyncio task that read
      (see :class:`ReadVersions`: bounded, least recently read keys are dropped), so two tasks
      of one process that interleave read -> write on a key conflict too. :meth:`write` and
      :meth:`delete` forget it.
    * :meth:`write` and :meth:`delete` of a key with a remembered version succeed only if the
      stored version still equals it ("nothing stored" must still be nothing stored); otherwise
      they raise :class:`~ptb_sessions.ConflictError` naming the key, and nothing is changed.
      Deleting a key that was read as absent and is still absent is a no-op.
    * With no remembered version (the key was never read by this task, or was forgotten, e.g. a
      lazy session assigned without reading), the write or delete is unconditional.
    * Iterating with ``keys()``/``items()`` and :meth:`has` remember nothing.

    :class:`~ptb_sessions.SessionHandler` reads and writes a key in one task and serializes
    read -> write per (storage, key) inside a process, so in-process conflicts only come from
    code that bypasses it; across processes the versions catch what the lock does not.
    """

    async def read(self, key: str) -> Any | None:
        """Return the value stored for ``key``, or :obj:`None` if there is none (or it expired).

        Args:
            key (:obj:`str`): The session key, including any prefix.
        """

    async def write(self, key: str, value: Any) -> None:
        """Store ``value`` for ``key``, replacing any stored value.

        Args:
            key (:obj:`str`): The session key, including any prefix.
            value (:obj:`object`): The value.
        """

    async def delete(self, key: str) -> None:
        """Remove the value stored for ``key``; nothing happens if there is none.

        Args:
            key (:obj:`str`): The session key, including any prefix.
        """


class ReadVersions(Generic[V]):
    """The per-key versions that a storage keeping versions last returned from ``read()``.

    Versions are remembered per asyncio task (the reader; outside a task, per process), so a
    write compares against what *this* task read. Bounded: at most ``maxsize`` keys per task,
    the least recently read is dropped first (its next write is then unconditional); a task's
    versions go away with the task. A remembered version of :obj:`None` means "read found
    nothing".

    Args:
        maxsize (:obj:`int`, optional): How many keys to remember per task. Defaults to
            :data:`MAX_READ_VERSIONS`.
    """

    __slots__ = ("_by_task", "_maxsize", "_untasked")

    def __init__(self, maxsize: int = MAX_READ_VERSIONS) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, not {maxsize}")
        self._maxsize = maxsize
        self._by_task: weakref.WeakKeyDictionary[asyncio.Task[Any], OrderedDict[str, V | None]] = (
            weakref.WeakKeyDictionary()
        )
        self._untasked: OrderedDict[str, V | None] = OrderedDict()

    def _scope(self, create: bool) -> OrderedDict[str, V | None] | None:
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running event loop
            task = None
        if task is None:
            return self._untasked
        scope = self._by_task.get(task)
        if scope is None and create:
            scope = self._by_task[task] = OrderedDict()
        return scope

    def __len__(self) -> int:
        """How many keys the current task remembers."""
        scope = self._scope(create=False)
        return 0 if scope is None else len(scope)

    def __contains__(self, key: object) -> bool:
        scope = self._scope(create=False)
        return scope is not None and key in scope

    def remember(self, key: str, version: V | None) -> None:
        """Remember that ``read(key)`` returned ``version`` (:obj:`None`: nothing stored)."""
        scope = self._scope(create=True)
        if scope is None:  # pragma: no cover - create=True always gives a scope
            return
        scope[key] = version
        scope.move_to_end(key)
        if len(scope) > self._maxsize:
            scope.popitem(last=False)

    def pop(self, key: str) -> tuple[bool, V | None]:
        """Forget ``key`` for the current task.

        Returns:
            tuple[:obj:`bool`, version | :obj:`None`]: ``(True, version)`` if a version was
            remembered (:obj:`None`: the read found nothing), else ``(False, None)``.
        """
        scope = self._scope(create=False)
        if scope is not None and key in scope:
            return True, scope.pop(key)
        return False, None

    def peek(self, key: str) -> tuple[bool, V | None]:
        """Like :meth:`pop`, but remembers ``key`` still."""
        scope = self._scope(create=False)
        if scope is not None and key in scope:
            return True, scope[key]
        return False, None

    def clear(self) -> None:
        """Forget every key of every task."""
        self._by_task.clear()
        self._untasked.clear()


def conflict_error(key: str, where: str = "") -> ConflictError:
    """The :class:`~ptb_sessions.ConflictError` of a storage that keeps versions: another writer
    changed ``key`` since it was read.

    Args:
        key (:obj:`str`): The key.
        where (:obj:`str`, optional): Where the key lives, e.g. ``"namespace 'session'"``.
    """
    place = f" in {where}" if where else ""
    return ConflictError(
        f"Session key {key!r}{place} was changed by another writer since it was read; nothing "
        "was overwritten. Read it again and redo the change."
    )
