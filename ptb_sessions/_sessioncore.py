"""The engine behind ``context.session``: one :class:`Cell` per session property and update.

A cell loads (strict) or prepares (lazy) one value, hands it to the handler through a facade
(the value itself, a :class:`LazySession`, a :class:`_MultiSession` or a :class:`_NoKeySession`)
and, after the handler, writes it back only if its encoding changed. Strict, lazy and multi
sessions are all made of cells; only the facades differ.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Generator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Final, Generic, Protocol, TypeVar, cast

from telegram import Update

from ptb_sessions import _sessionlock
from ptb_sessions._errors import SerializationError, SessionKeyError

__all__ = ["MISSING", "UNREAD", "Binding", "Cell", "LazySession", "MultiBinding", "Spec"]

T = TypeVar("T")

MISSING: Final[Any] = object()
"""Marks an absent attribute of a plain :class:`~telegram.ext.CallbackContext`."""
_UNKNOWN: Final[Any] = object()
"""A baseline that equals no encoding: the value is always written."""

UNREAD, _LOADING, _PENDING, _READY = 0, 1, 2, 3
_KEY_REASONS: Final = {
    "by_chat": "does not belong to a chat",
    "by_chat_and_thread": "does not belong to a chat",
    "by_user": "has no user",
    "by_user_and_chat": "does not have both a user and a chat",
}


class _Encoder(Protocol):
    """What a cell needs of a codec."""

    def encode(self, value: Any) -> str | bytes: ...


class Spec:
    """The fixed configuration of one session property (the session, or one fragment).

    Args:
        name: The fragment name, or :obj:`None` for a single session.
        storage: The storage (after :func:`~ptb_sessions.enhance_storage`, if any).
        lock_id: What the per-key lock table calls the storage (see ``lock_scope``), so every
            handler on one storage shares the locks.
        key_fn: The key function.
        prefix: Put in front of every key.
        initial: Makes the value of a new key, or :obj:`None`.
        lazy: Whether the value is read only when awaited.
        db_lock: Whether ``storage.lock(key)`` is held from load to save.
        codec: Encodes values to detect changes.

    Attributes:
        needs_writeback: The storage's optional ``needs_writeback(key)``: whether the value just
            read must be written back even if unchanged (it was migrated); :obj:`None` if the
            storage has no such method.
    """

    __slots__ = (
        "builtin_key",
        "codec",
        "db_lock",
        "initial",
        "key_fn",
        "lazy",
        "lock_id",
        "name",
        "needs_writeback",
        "prefix",
        "storage",
    )

    def __init__(
        self,
        *,
        name: str | None,
        storage: Any,
        lock_id: tuple[int, str],
        key_fn: Callable[[Update], str | None],
        prefix: str,
        initial: Callable[[], Any] | None,
        lazy: bool,
        db_lock: bool,
        codec: Any,
    ) -> None:
        self.name = name
        self.storage = storage
        self.lock_id = lock_id
        self.key_fn = key_fn
        self.prefix = prefix
        self.initial = initial
        self.lazy = lazy
        self.db_lock = db_lock
        self.codec: _Encoder = codec
        self.builtin_key = getattr(key_fn, "__module__", None) == "ptb_sessions._keys"
        self.needs_writeback: Callable[[str], bool] | None = getattr(
            storage, "needs_writeback", None
        )


def update_type(update: object) -> str:
    """The kind of ``update`` for messages, e.g. ``"inline_query"``."""
    if isinstance(update, Update):
        for kind in Update.ALL_TYPES:
            if getattr(update, kind, None) is not None:
                return str(kind)
        return "unknown"
    return type(update).__name__


def no_key_error(spec: Spec, update: object, action: str) -> SessionKeyError:
    """The :class:`~ptb_sessions.SessionKeyError` for using ``spec``'s session on ``update``,
    whose key function returned :obj:`None`. ``action`` is ``"access"`` or ``"assign"``."""
    lazy = "lazy " if spec.lazy else ""
    what = f"{lazy}session data" if spec.name is None else f"{lazy}session fragment {spec.name!r}"
    fn = spec.key_fn
    name = getattr(fn, "__qualname__", None) or repr(fn)
    kind = update_type(update)
    reason = (
        _KEY_REASONS.get(name) if getattr(fn, "__module__", "") == "ptb_sessions._keys" else None
    )
    if reason is not None:
        why = f"this {kind} update {reason}, so the session key function {name} returned None"
    else:
        why = f"the custom session key function {name} returned None for this {kind} update"
    return SessionKeyError(
        f"Cannot {action} {what} because {why}. Use the session only in updates that have a "
        "key (e.g. filter the handlers), or choose a key function that fits these updates."
    )


class LazySession(Generic[T]):
    """``context.session`` of a lazy session (``SessionHandler(..., lazy=True)``): a value that
    is read from the storage only when awaited.

    * ``await context.session`` reads the stored value (or makes :paramref:`initial`) once per
      update; later awaits return the same object.
    * ``context.session = value`` replaces it without reading; ``value`` may be an awaitable,
      which is awaited before the value is written (or when ``context.session`` is awaited).
    * If the session is never awaited nor assigned, nothing is read and nothing is written.

    The value is written back after the handler if its encoding changed, like a strict session.
    With a plain :class:`~telegram.ext.CallbackContext` an assignment replaces the
    :class:`LazySession` itself, so await it before assigning (or use
    :class:`~ptb_sessions.SessionContext`, whose ``session`` keeps returning it).
    """

    # An untouched single session costs this one object: its cell, and the key function call,
    # come on first use. The object is also that session's Binding (used by SessionHandler).
    __slots__ = ("_cell", "_locks", "_spec", "_update")

    def __init__(self, spec: Spec, update: object, cell: Cell | None = None) -> None:
        self._spec = spec
        self._update = update
        self._cell = cell
        self._locks = True  # whether the first use takes the key's locks

    def _use(self) -> Cell:
        cell = self._cell
        if cell is None:
            cell = self._cell = Cell(self._spec, self._update, facade=self, locks=self._locks)
        return cell

    def __await__(self) -> Generator[Any, None, T]:
        return cast(Generator[Any, None, T], self._use().resolve().__await__())

    def __repr__(self) -> str:
        cell = self._use()
        state = "read" if cell.state == _READY else "not read"
        return f"<LazySession key={cell.key!r} ({state})>"

    # --- the Binding of a single lazy session ----------------------------------------------

    def get(self) -> Any:
        """:meth:`Binding.get` (for :class:`~ptb_sessions.SessionHandler`)."""
        return self._use().get()

    def set(self, value: Any) -> None:
        """:meth:`Binding.set` (for :class:`~ptb_sessions.SessionHandler`)."""
        self._use().set(value)

    def public(self) -> Any:
        """:meth:`Binding.public` (for :class:`~ptb_sessions.SessionHandler`)."""
        return self

    def adopt(self, value: Any) -> None:
        """:meth:`Binding.adopt` (for :class:`~ptb_sessions.SessionHandler`)."""
        if value is not self:
            self._use().adopt(value)

    def save(self) -> Awaitable[None] | None:
        """:meth:`Binding.save` (for :class:`~ptb_sessions.SessionHandler`): :obj:`None` if
        the session was not used."""
        cell = self._cell
        return None if cell is None else cell.save()

    def open(self) -> Awaitable[None] | None:
        """:meth:`Binding.open` (for :class:`~ptb_sessions.SessionHandler`): nothing, a lazy
        session is read when awaited."""
        return None

    def close(self) -> Awaitable[None] | None:
        """:meth:`Binding.close` (for :class:`~ptb_sessions.SessionHandler`)."""
        self._locks = False  # a later first use (e.g. from a task) takes no lock
        cell = self._cell
        return None if cell is None else cell.close()

    def finish(self, left: Any) -> Awaitable[None] | None:
        """:meth:`Binding.finish`: :obj:`None` if the session was never used (no call beyond
        this one)."""
        if left is self and self._cell is None:
            self._locks = False
            return None
        return finished(self, left)


class _NoKeySession:
    """``context.session`` of a plain :class:`~telegram.ext.CallbackContext` when the update has
    no session key: any use raises :class:`~ptb_sessions.SessionKeyError`."""

    __slots__ = ("_spec", "_update")

    def __init__(self, spec: Spec, update: object) -> None:
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "_update", update)

    def _fail(self, *_: object, **__: object) -> Any:
        raise no_key_error(self._spec, self._update, "access")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._fail()

    def __setattr__(self, name: str, value: object) -> None:
        self._fail()

    def __delattr__(self, name: str) -> None:
        self._fail()

    def __repr__(self) -> str:
        name = getattr(self._spec.key_fn, "__qualname__", "the key function")
        return f"<no session: {name} returned None>"

    __hash__ = object.__hash__


for _name in (
    "__getitem__", "__setitem__", "__delitem__", "__iter__", "__aiter__", "__len__",
    "__bool__", "__contains__", "__await__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__",
    "__ge__", "__call__", "__str__", "__int__", "__float__", "__index__", "__add__", "__radd__",
    "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__or__", "__and__", "__neg__",
    "__enter__", "__aenter__", "__reversed__",
):  # fmt: skip
    setattr(_NoKeySession, _name, _NoKeySession._fail)


class Cell:
    """One session property (the session or one fragment) during one update.

    States: unread (lazy, untouched), loading (a read is in flight), pending (an awaitable was
    assigned) and ready (the value is known).

    The cell also holds the locks of its key, taken on first use: before its first read or
    write (:meth:`load`, :meth:`execute`) it acquires its key in the per-key lock table if
    ``need_lock`` and enters the storage's ``lock(key)`` if ``db_pending``; :meth:`unlock`
    gives them back. A strict session loads at once, so it holds them from load to save; a
    lazy session that is never used takes none. (A :class:`MultiBinding` takes the per-key
    locks of all its cells up front instead.)

    A strict single session's cell is its own binding (see :class:`Binding`). A lazy single
    session's :class:`LazySession` makes its cell on first use; a lazy fragment's cell makes
    its :class:`LazySession`.
    """

    __slots__ = (
        "baseline",
        "db_lock",
        "db_pending",
        "entry",
        "facade",
        "gen",
        "key",
        "lock_key",
        "need_lock",
        "pending",
        "previous",
        "spec",
        "state",
        "stored",
        "update",
        "value",
        "waiter",
    )

    def __init__(
        self, spec: Spec, update: object, *, facade: Any = None, locks: bool = True
    ) -> None:
        self.spec = spec
        self.update = update
        # The key: ``prefix + key_fn(update)``, or None if the update has none. A key that is
        # not a str is converted; the built-in key functions give no key for updates that are
        # not telegram.Update (e.g. custom updates of a TypeHandler).
        if spec.builtin_key and not isinstance(update, Update):
            key = None
        else:
            key = spec.key_fn(update)  # type: ignore[arg-type]
            if key is not None:
                key = spec.prefix + (key if isinstance(key, str) else str(key))
        self.key: str | None = key
        self.state = UNREAD
        self.value: Any = None
        self.baseline: Any = _UNKNOWN  # encoding of the value as loaded; None: nothing
        self.stored: bool | None = None  # whether the storage has a value; None: unknown
        self.gen = 0  # bumped by every assignment, so an older read does not overwrite it
        self.pending: Awaitable[Any] | None = None
        self.previous: Any = None  # (state, value, pending, previous) before an awaitable
        self.waiter: asyncio.Future[None] | None = None
        if facade is None and spec.lazy and key is not None:
            facade = LazySession(spec, update, self)
        self.facade: Any = facade
        # whether to acquire the key lock on first use, and to enter storage.lock(key)
        self.need_lock = locks and key is not None
        self.db_pending = locks and spec.db_lock and key is not None
        self.lock_key: _sessionlock.LockKey | None = None  # the acquired key lock ...
        self.entry: Any = None  # ... and its entry in the lock table
        self.db_lock: AbstractAsyncContextManager[Any] | None = None  # entered, to exit

    # --- locking -------------------------------------------------------------------------

    async def lock(self) -> None:
        """Take the locks of the key that are not taken yet (see the class docstring)."""
        if self.need_lock:
            lock_key = (*self.spec.lock_id, cast(str, self.key))
            entry = _sessionlock.try_acquire(lock_key)  # a free key: no coroutine, no switch
            self.entry = entry if entry is not None else await _sessionlock.acquire(lock_key)
            self.lock_key = lock_key
            self.need_lock = False
        if self.db_pending:
            manager = cast(AbstractAsyncContextManager[Any], self.spec.storage.lock(self.key))
            await manager.__aenter__()
            self.db_lock = manager
            self.db_pending = False

    async def acquire(self) -> None:
        """Acquire the key in the per-key lock table (alone: a multi session takes all its
        keys before any database lock)."""
        lock_key = (*self.spec.lock_id, cast(str, self.key))
        entry = _sessionlock.try_acquire(lock_key)
        self.entry = entry if entry is not None else await _sessionlock.acquire(lock_key)
        self.lock_key = lock_key
        self.need_lock = False

    async def unlock(self) -> None:
        """Exit the database lock, if entered, and :meth:`release`."""
        manager = self.db_lock
        try:
            if manager is not None:
                self.db_lock = None
                await manager.__aexit__(None, None, None)
        finally:
            self.release()

    def release(self) -> None:
        """Give the key back to the lock table, if this cell acquired it."""
        entry = self.entry
        if entry is not None:
            self.entry = None
            _sessionlock.release(cast(_sessionlock.LockKey, self.lock_key), entry)

    def open(self) -> Awaitable[None] | None:
        """The load of a strict single session, under its locks (see :class:`Binding`); a lazy
        one, or one without a key, loads nothing."""
        return None if self.key is None or self.spec.lazy else self.load()

    def close(self) -> Awaitable[None] | None:
        """After the update: a later use (e.g. from a task) takes no lock; the unlock, if this
        cell holds a lock (see :class:`Binding`)."""
        self.need_lock = self.db_pending = False
        if self.entry is None and self.db_lock is None:
            return None
        return self.unlock()

    def finish(self, left: Any) -> Awaitable[None]:
        """:meth:`Binding.finish`."""
        return finished(self, left)

    # --- loading -------------------------------------------------------------------------

    def _encode(self, value: Any) -> str | bytes:
        try:
            return self.spec.codec.encode(value)
        except SerializationError as exc:
            name = "session" if self.spec.name is None else f"session.{self.spec.name}"
            raise exc.located(f"{name}[{self.key!r}]") from exc

    def _baseline(self, value: Any) -> Any:
        if value is None:
            return None
        try:
            return self.spec.codec.encode(value)
        except SerializationError:
            return _UNKNOWN  # compared unequal: the save encodes again and reports the error

    async def load(self) -> None:
        """Read the stored value (or make the initial one) and remember its encoding."""
        if self.need_lock or self.db_pending:
            await self.lock()
        spec = self.spec
        gen = self.gen
        value = await spec.storage.read(self.key)
        if value is None:
            self.stored = False
            if spec.initial is not None:
                value = spec.initial()
        else:
            self.stored = True
        writeback = spec.needs_writeback
        if self.stored and writeback is not None and writeback(cast(str, self.key)):
            self.baseline = _UNKNOWN  # migrated on load: written back even if unchanged
        else:
            # an untouched initial value is not written: its encoding is the baseline
            self.baseline = self._baseline(value)
        if gen == self.gen:  # else assigned while reading: the assigned value wins
            self.value = value
            self.state = _READY

    async def resolve(self) -> Any:
        """The value, reading it or awaiting an assigned awaitable first if needed."""
        while self.state != _READY:
            if self.key is None:
                raise no_key_error(self.spec, self.update, "access")
            if self.state == _PENDING:
                await self._resolve_pending()
                continue
            waiter = self.waiter
            if waiter is not None:
                await asyncio.shield(waiter)
                continue
            waiter = self.waiter = asyncio.get_running_loop().create_future()
            gen = self.gen
            try:
                self.state = _LOADING
                await self.load()
            except BaseException:
                if gen == self.gen:
                    self.state = UNREAD
                raise
            finally:
                self.waiter = None
                waiter.set_result(None)
        return self.value

    async def _resolve_pending(self) -> None:
        """Await the assigned awaitable. While it runs, the session is what it was before the
        assignment, so ``context.session = change(context.session)`` works."""
        awaitable = cast(Awaitable[Any], self.pending)
        self.state, self.value, self.pending, self.previous = self.previous
        gen = self.gen
        value = await awaitable
        if gen == self.gen:  # else assigned again meanwhile: that assignment wins
            self.value = value
            self.state = _READY

    def assign(self, value: Any) -> None:
        """Replace the value (lazy): no read; an awaitable is awaited before the write."""
        if value is self.facade:
            return
        self.gen += 1
        if inspect.isawaitable(value):
            self.previous = (self.state, self.value, self.pending, self.previous)
            self.pending = value
            self.state = _PENDING
        else:
            self.pending = None
            self.previous = None
            self.value = value
            self.state = _READY

    # --- the binding to the context ------------------------------------------------------

    def get(self) -> Any:
        """``context.session`` (or the fragment) as a :class:`SessionContext` returns it."""
        if self.key is None:
            raise no_key_error(self.spec, self.update, "access")
        if self.spec.lazy:
            return self.facade
        return self.value

    def set(self, value: Any) -> None:
        """``context.session = value`` on a :class:`SessionContext` (or a fragment)."""
        if self.key is None:
            raise no_key_error(self.spec, self.update, "assign")
        if self.spec.lazy:
            self.assign(value)
        else:
            self.value = value

    def public(self) -> Any:
        """What is put into ``context.session`` of a plain context."""
        facade = self.facade
        if facade is not None:  # lazy
            return facade
        if self.key is None:
            facade = self.facade = _NoKeySession(self.spec, self.update)
            return facade
        return self.value

    def adopt(self, value: Any) -> None:
        """Take over what the handler left in ``context.session`` of a plain context."""
        facade = self.facade
        if value is facade and facade is not None:  # lazy or no key, left as it was
            return
        if self.key is None:
            raise no_key_error(self.spec, self.update, "assign")
        if value is MISSING:
            value = None
        if self.spec.lazy:
            self.assign(value)
        else:
            self.value = value

    # --- saving --------------------------------------------------------------------------

    async def settle(self) -> None:
        """Finish a read in flight or an assigned awaitable before saving."""
        if self.key is not None and self.state not in (UNREAD, _READY):
            await self.resolve()

    def plan(self) -> tuple[bool, Any] | None:
        """What to save: ``(True, value)`` to write, ``(False, None)`` to delete, :obj:`None`
        for nothing. Raises :class:`~ptb_sessions.SerializationError` for a value that cannot
        be encoded."""
        if self.key is None or self.state != _READY:
            return None
        value = self.value
        if value is None:
            return None if self.stored is False else (False, None)
        if self._encode(value) == self.baseline:
            return None
        return True, value

    async def save(self) -> None:
        """Write back (or delete) the value if its encoding changed (a single session's cell is
        its own :class:`Binding`)."""
        state = self.state
        if state != _READY:
            if state == UNREAD:
                return
            await self.settle()
        plan = self.plan()
        if plan is not None:
            await self.execute(plan)

    async def execute(self, plan: tuple[bool, Any]) -> None:
        """Carry out :meth:`plan`'s result (taking the locks first, if not yet taken)."""
        if self.need_lock or self.db_pending:
            await self.lock()
        storage = self.spec.storage
        if plan[0]:
            await storage.write(self.key, plan[1])
        else:
            await storage.delete(self.key)


class _MultiSession:
    """``context.session`` of a multi session: one attribute per fragment."""

    __slots__ = ("_cells",)

    def __init__(self, cells: dict[str, Cell]) -> None:
        object.__setattr__(self, "_cells", cells)

    def __getattr__(self, name: str) -> Any:
        cell = self._cells.get(name)
        if cell is None:
            raise AttributeError(self._unknown(name))
        return cell.get()

    def __setattr__(self, name: str, value: Any) -> None:
        cell = self._cells.get(name)
        if cell is None:
            raise AttributeError(self._unknown(name))
        cell.set(value)

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)

    def __dir__(self) -> list[str]:
        return sorted(self._cells)

    def __repr__(self) -> str:
        return f"<multi session: {', '.join(self._cells)}>"

    def _unknown(self, name: str) -> str:
        return (
            f"The session has no fragment {name!r} (fragments: {', '.join(self._cells)}). "
            "Only configured fragments are saved: add it to SessionHandler(fragments=...)."
        )


class Binding(Protocol):
    """The session of one update and how ``context.session`` shows it: a strict single
    session's :class:`Cell`, a lazy single session's :class:`LazySession`, or a
    :class:`MultiBinding`.

    :class:`~ptb_sessions.SessionHandler` awaits :meth:`open` before the handler,
    :meth:`save` after it and :meth:`close` at the end, each only if it returned an awaitable
    (most updates need no coroutine for them). With a plain context, :meth:`finish` does the
    last two, after taking over what the handler left in ``context.session``.
    """

    def open(self) -> Awaitable[None] | None:
        """Take the locks and load what must be loaded before the handler, if anything."""

    def close(self) -> Awaitable[None] | None:
        """Give back every lock taken; a later use (from a task) takes none."""

    def get(self) -> Any:
        """``context.session`` as a :class:`~ptb_sessions.SessionContext` returns it."""

    def set(self, value: Any) -> None:
        """``context.session = value`` on a :class:`~ptb_sessions.SessionContext`."""

    def public(self) -> Any:
        """What is put into ``context.session`` of a plain context."""

    def adopt(self, value: Any) -> None:
        """Take over what the handler left in ``context.session`` of a plain context."""

    def save(self) -> Awaitable[None] | None:
        """The write-back (or delete) of the values whose encoding changed, to await;
        :obj:`None` if there is nothing to save (a lazy session that was never used)."""

    def finish(self, left: Any) -> Awaitable[None] | None:
        """After the handler, with a plain context: :func:`finished`, to await; :obj:`None`
        if there is nothing to do (a lazy session that was never used)."""


class MultiBinding:
    """The :class:`Binding` of a multi session: one cell per fragment."""

    __slots__ = ("cells", "facade", "heads")

    def __init__(self, cells: Sequence[Cell]) -> None:
        self.cells = cells
        named = {cast(str, cell.spec.name): cell for cell in cells}
        self.facade = _MultiSession(named)
        # The per-key locks of all its keys are taken up front, in a fixed order (two updates
        # that used their fragments in opposite orders could otherwise wait for each other
        # forever); so are the database locks of the strict fragments, while a lazy fragment
        # enters its own when it is first used. ``heads``: (cell that locks, lock eagerly).
        groups: dict[tuple[int, str, str], list[Cell]] = {}
        for cell in cells:
            if cell.key is not None:
                groups.setdefault((*cell.spec.lock_id, cell.key), []).append(cell)
                cell.need_lock = False  # taken by open()
        self.heads: list[tuple[Cell, bool]] = []
        for lock_key in sorted(groups):
            head, *others = groups[lock_key]
            for other in others:  # keys that collide: the head takes the locks for all
                other.db_pending = False
            self.heads.append((head, bool(others) or not head.spec.lazy))

    async def open(self) -> None:
        """Take the per-key locks of all keys, the database locks of the strict fragments, and
        load the strict fragments."""
        for head, _ in self.heads:
            await head.acquire()
        for head, eager in self.heads:
            if eager and head.db_pending:
                await head.lock()
        for cell in self.cells:
            if cell.key is not None and not cell.spec.lazy:
                await cell.load()

    async def close(self) -> None:
        """Give back every lock (all of them, even if one fails; then raise its error)."""
        for cell in self.cells:
            cell.db_pending = False  # a later use (from a task) locks nothing
        error: BaseException | None = None
        for head, _ in reversed(self.heads):
            try:
                await head.unlock()
            except BaseException as exc:  # unlock the others, then raise
                error = error or exc
        if error is not None:
            raise error

    def get(self) -> Any:
        return self.facade

    def set(self, value: Any) -> None:
        if value is self.facade:
            return
        if value is not None:
            raise TypeError(
                "A multi session cannot be replaced: assign its fragments "
                "(context.session.<fragment> = ...), or None to delete them all."
            )
        for cell in self.cells:
            if cell.key is not None:  # keyless fragments have nothing to delete
                cell.set(None)

    def public(self) -> Any:
        return self.facade

    def adopt(self, value: Any) -> None:
        self.set(None if value is MISSING else value)

    def finish(self, left: Any) -> Awaitable[None]:
        """:meth:`Binding.finish`."""
        return finished(self, left)

    async def save(self) -> None:
        """Write back (or delete) the values whose encoding changed. Every value is encoded
        before anything is written, so an unencodable fragment stops all writes."""
        cells = self.cells
        for cell in cells:
            await cell.settle()
        plans = [(cell, cell.plan()) for cell in cells]
        for cell, plan in plans:
            if plan is not None:
                await cell.execute(plan)


async def finished(binding: Binding, left: Any) -> None:
    """The end of an update with a plain context: take over ``left`` (what the handler left
    in ``context.session``), save, then close (also if the save failed)."""
    try:
        if left is not binding.public():
            binding.adopt(left)
        saving = binding.save()
        if saving is not None:
            await saving
    finally:
        closing = binding.close()
        if closing is not None:
            await closing
