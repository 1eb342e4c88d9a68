"""The :class:`SQLAlchemyPersistence`: PTB's data, one row per key, in any SQL database."""

from __future__ import annotations

import asyncio
import datetime as dtm
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from telegram import Bot
from telegram.ext import Application, BasePersistence, ContextTypes, PersistenceInput
from telegram.ext._utils.types import CDCData, ConversationDict, ConversationKey

from ptb_sessions._codec import Codec, JSONCodec, bind_codec, storable_state
from ptb_sessions._errors import ConflictError, SerializationError, StorageError
from ptb_sessions._rows import DEFAULT_MAX_VALUE_SIZE, decode_record, encode_value
from ptb_sessions._store import (
    ANY_VERSION,
    DEFAULT_TIMEOUT,
    Database,
    PendingWrites,
    Record,
    Write,
    check_key,
)
from ptb_sessions._url import DEFAULT_URL
from ptb_sessions.storage._enhance import apply_migrations, normalize_ttl, sorted_migrations

if TYPE_CHECKING:
    from ptb_sessions.storage._sqlalchemy import SQLAlchemyStorage

__all__ = ["SQLAlchemyPersistence"]

_LOGGER = logging.getLogger(__name__)

UD = TypeVar("UD")
CD = TypeVar("CD")
BD = TypeVar("BD")

_BOT_KEY = "bot"
_CALLBACK_KEY = "callback_data"
_CONVERSATION_PREFIX = "conversation:"
#: The namespaces of PTB's own data; everything else in the table is a session namespace.
BUILTIN_NAMESPACES = frozenset({"user_data", "chat_data", "bot_data", "callback_data"})


class _Kind:
    """The bookkeeping of one kind of per-id data (chat_data or user_data).

    ``loaded`` maps the ids whose data PTB holds to the very object PTB holds (identity tells
    a reload from a dict PTB replaced), in least-recently-used order; ``state`` maps ids to
    ``(row version, hash of the stored encoding)``; ``failed`` holds the ids whose load failed
    (never written until they load); ``stale`` the ids to read again after a conflict.
    """

    __slots__ = ("failed", "loaded", "loading", "name", "stale", "state")

    def __init__(self, name: str) -> None:
        self.name = name
        self.loaded: dict[int, Any] = {}
        self.state: dict[int, tuple[int | None, int | None]] = {}
        self.failed: set[int] = set()
        self.stale: set[int] = set()
        self.loading: dict[int, asyncio.Future[None]] = {}

    def forget(self, item_id: int) -> None:
        self.loaded.pop(item_id, None)
        self.state.pop(item_id, None)
        self.failed.discard(item_id)
        self.stale.discard(item_id)


class SQLAlchemyPersistence(BasePersistence[UD, CD, BD], Generic[UD, CD, BD]):
    """A :class:`telegram.ext.BasePersistence` that stores PTB's data in any SQL database
    SQLAlchemy speaks: SQLite (the default, a local file), PostgreSQL, MariaDB or MySQL.

    Every user's and chat's data, the bot data, the callback data and every conversation state
    is one row, so a write touches only what changed: at each
    :meth:`~telegram.ext.Application.update_persistence` the rows whose encoded value changed
    are written in one transaction, and nothing blocks the event loop.

    .. code-block:: python

        persistence = SQLAlchemyPersistence("postgresql://bot@localhost/bot")
        application = ApplicationBuilder().token(TOKEN).persistence(persistence).build()

    Args:
        url: An SQLAlchemy URL or :class:`~sqlalchemy.ext.asyncio.AsyncEngine`. Plain sync URLs
            (``sqlite:///bot.db``, ``postgresql://...``, ``mysql://...``) run on their asyncio
            driver. An engine created from a URL is disposed at :meth:`flush`; an engine passed
            in never is.
        store_data: Which kinds of data to store; all by default.
        update_interval: Seconds between two :meth:`~telegram.ext.Application.update_persistence`
            runs of the application.
        lazy: Load a chat's or user's row on its first update instead of loading all of them in
            :meth:`~telegram.ext.Application.initialize`.
        max_cached: With ``lazy``, keep at most this many chats (and users) in the
            application's memory: the least recently used leave it once their data is written.
        ttl: Seconds (or a :class:`~datetime.timedelta`) after which chat_data and user_data
            rows that were neither loaded nor written expire.
        migrations: Versioned data migrations applied to chat_data and user_data when loaded;
            see :func:`~ptb_sessions.enhance_storage`.
        codec: How values are encoded; :class:`~ptb_sessions.JSONCodec` by default.
        auto_upgrade: Create or upgrade the schema on first use. If :obj:`False`, an outdated
            database raises :class:`~ptb_sessions.SchemaError` naming the command to run.
        context_types: The :class:`~telegram.ext.ContextTypes` of the application, if custom
            types are used for user_data, chat_data or bot_data.
        clock: Seconds since the epoch; injected in tests.
        max_value_size: The largest encoded value in bytes (default 1 MiB); larger ones are
            rejected with :class:`~ptb_sessions.SerializationError`. :obj:`None`: no limit.
        timeout: Seconds any one database call may take (default 30); a server that stops
            answering gives :class:`~ptb_sessions.StorageError` naming the key.
    """

    __slots__ = (
        "_app",
        "_batch_task",
        "_bot_state",
        "_callback_state",
        "_chats",
        "_conversations",
        "_migration_lock",
        "_migrations",
        "_pending",
        "_ttl",
        "_users",
        "_write_lock",
        "clock",
        "codec",
        "context_types",
        "database",
        "lazy",
        "max_cached",
        "max_value_size",
    )

    @overload
    def __init__(
        self: SQLAlchemyPersistence[dict[Any, Any], dict[Any, Any], dict[Any, Any]],
        url: str | URL | AsyncEngine = DEFAULT_URL,
        *,
        store_data: PersistenceInput | None = None,
        update_interval: float = 60,
        lazy: bool = False,
        max_cached: int | None = None,
        ttl: float | dtm.timedelta | None = None,
        migrations: Mapping[float, Callable[[Any], Any]] | None = None,
        codec: Codec | None = None,
        auto_upgrade: bool = True,
        context_types: None = None,
        clock: Callable[[], float] = time.time,
        max_value_size: int | None = DEFAULT_MAX_VALUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None: ...

    @overload
    def __init__(
        self: SQLAlchemyPersistence[UD, CD, BD],
        url: str | URL | AsyncEngine = DEFAULT_URL,
        *,
        store_data: PersistenceInput | None = None,
        update_interval: float = 60,
        lazy: bool = False,
        max_cached: int | None = None,
        ttl: float | dtm.timedelta | None = None,
        migrations: Mapping[float, Callable[[Any], Any]] | None = None,
        codec: Codec | None = None,
        auto_upgrade: bool = True,
        context_types: ContextTypes[Any, UD, CD, BD],
        clock: Callable[[], float] = time.time,
        max_value_size: int | None = DEFAULT_MAX_VALUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None: ...

    def __init__(
        self,
        url: str | URL | AsyncEngine = DEFAULT_URL,
        *,
        store_data: PersistenceInput | None = None,
        update_interval: float = 60,
        lazy: bool = False,
        max_cached: int | None = None,
        ttl: float | dtm.timedelta | None = None,
        migrations: Mapping[float, Callable[[Any], Any]] | None = None,
        codec: Codec | None = None,
        auto_upgrade: bool = True,
        context_types: ContextTypes[Any, UD, CD, BD] | None = None,
        clock: Callable[[], float] = time.time,
        max_value_size: int | None = DEFAULT_MAX_VALUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(store_data=store_data, update_interval=update_interval)
        if max_cached is not None:
            if not lazy:
                raise ValueError("max_cached needs lazy=True: eager loading keeps every chat")
            if max_cached < 1:
                raise ValueError(f"max_cached must be at least 1, not {max_cached}")
        self.database = Database(url, auto_upgrade=auto_upgrade, clock=clock, timeout=timeout)
        self.lazy = lazy
        self.max_cached = max_cached
        self._ttl = normalize_ttl(ttl)
        self._migrations = sorted_migrations(migrations) if migrations is not None else None
        self.codec: Codec = codec if codec is not None else JSONCodec()
        self.context_types: ContextTypes[Any, UD, CD, BD] = cast(
            "ContextTypes[Any, UD, CD, BD]", context_types or ContextTypes()
        )
        self.clock = clock
        self.max_value_size = max_value_size
        self._chats = _Kind("chat_data")
        self._users = _Kind("user_data")
        self._bot_state: tuple[int | None, int | None] | None = None
        self._callback_state: tuple[int | None, int | None] | None = None
        self._conversations: dict[str, dict[str, tuple[int | None, int | None]]] = {}
        self._pending = PendingWrites()
        self._write_lock = asyncio.Lock()
        self._migration_lock = asyncio.Lock()
        self._batch_task: (
            asyncio.Task[tuple[dict[tuple[str, str], StorageError], StorageError | None]] | None
        ) = None
        self._app: Application[Any, Any, Any, Any, Any, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.database.masked_url!r}, lazy={self.lazy}, "
            f"max_cached={self.max_cached}, ttl={self._ttl})"
        )

    # -- helpers --------------------------------------------------------------------------

    def storage(self, namespace: str = "session") -> SQLAlchemyStorage:
        """A :class:`~ptb_sessions.SQLAlchemyStorage` on this persistence's database, for
        :class:`~ptb_sessions.SessionHandler`: sessions and PTB's data share one database and
        one schema.

        Args:
            namespace: The namespace of the session rows; not one of PTB's own.
        """
        from ptb_sessions.storage._sqlalchemy import SQLAlchemyStorage

        if namespace in BUILTIN_NAMESPACES or namespace.startswith(_CONVERSATION_PREFIX):
            raise ValueError(f"The namespace {namespace!r} is used by PTB's own data")
        return SQLAlchemyStorage(
            self.database,
            namespace=namespace,
            codec=self.codec,
            clock=self.clock,
            max_value_size=self.max_value_size,
        )

    @property
    def application(self) -> Application[Any, Any, Any, Any, Any, Any] | None:
        """The application this persistence belongs to, found when the application loads its
        data in :meth:`~telegram.ext.Application.initialize` (or set with
        :meth:`bind_application`). Needed for ``max_cached`` and :meth:`migrate_chat`."""
        return self._app

    def bind_application(self, application: Application[Any, Any, Any, Any, Any, Any]) -> None:
        """Tell the persistence which application it serves. Only needed if the application
        was not found automatically (a warning says so)."""
        if application.persistence is not self:
            raise ValueError("This application does not use this persistence")
        self._adopt(application)

    def _adopt(self, application: Application[Any, Any, Any, Any, Any, Any]) -> None:
        """Serve ``application``: take its ContextTypes (its chat_data class is what new chats
        get), and let the codec store their classes and give its bot to TelegramObjects."""
        self._app = application
        self.context_types = application.context_types
        bind_codec(self.codec, application.bot, self.context_types)

    def set_bot(self, bot: Bot) -> None:
        """Called by :meth:`~telegram.ext.ApplicationBuilder.build`. The codec gives ``bot`` to
        the TelegramObjects it decodes (so ``message.reply_text()`` works after a restart), and
        stores the classes of :attr:`context_types` (see :class:`~ptb_sessions.JSONCodec`)."""
        super().set_bot(bot)
        bind_codec(self.codec, bot, self.context_types)

    def _find_application(self) -> None:
        if self._app is not None:
            return
        # Called from Application._initialize_persistence: the application is `self` in one
        # of the calling frames.
        frame = sys._getframe(1)
        for _ in range(8):
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Application) and candidate.persistence is self:
                self._adopt(candidate)
                return
            frame = frame.f_back  # type: ignore[assignment]
        if self.max_cached is not None:
            _LOGGER.warning(
                "SQLAlchemyPersistence could not find its Application; max_cached has no "
                "effect until persistence.bind_application(application) is called"
            )

    def _expires_at(self) -> float | None:
        return None if self._ttl is None else self.clock() + self._ttl

    def _latest_version(self) -> float | None:
        return None if self._migrations is None else self._migrations[-1][0]

    def _decode_data(self, kind: _Kind, item_id: int, record: Record) -> Any:
        key = str(item_id)
        value = decode_record(self.codec, record, kind.name, key)
        if self._migrations is not None:
            value, _ = apply_migrations(
                value, record.data_version, self._migrations, key=f"{kind.name}[{key}]"
            )
        factory = (
            self.context_types.chat_data if kind is self._chats else self.context_types.user_data
        )
        return self._as_type(factory, value, f"{kind.name}[{key}]")

    @staticmethod
    def _as_type(factory: Callable[[], Any], value: Any, where: str) -> Any:
        if isinstance(factory, type) and isinstance(value, factory):
            return value
        container = factory()
        if isinstance(container, dict) and isinstance(value, Mapping):
            container.update(value)
            return container
        if type(container) is type(value):
            return value
        raise StorageError(
            f"The stored value of {where} is a {type(value).__name__}, not a "
            f"{type(container).__name__} as the application's ContextTypes require"
        )

    def _expired(self, record: Record) -> bool:
        return record.expires_at is not None and record.expires_at < self.clock()

    # -- loading --------------------------------------------------------------------------

    async def _load_all(self, kind: _Kind) -> dict[int, Any]:
        self._find_application()
        if self.lazy:
            return {}
        result: dict[int, Any] = {}
        expired = 0
        async for key, record in self.database.scan(kind.name):
            try:
                item_id = int(key)
            except ValueError:
                _LOGGER.error("Skipping %s[%r]: the key is not an integer id", kind.name, key)
                continue
            if self._expired(record):
                expired += 1
                continue
            try:
                value = self._decode_data(kind, item_id, record)
            except Exception:
                kind.failed.add(item_id)
                _LOGGER.exception(
                    "Skipping %s[%s]; it is not written until it loads", kind.name, key
                )
                continue
            result[item_id] = value
            kind.loaded[item_id] = value
            kind.state[item_id] = (record.version, hash(record.data))
        if expired:
            await self.database.purge_expired(kind.name)
        if self._ttl is not None:
            await self.database.touch_namespace(kind.name, cast(float, self._expires_at()))
        return result

    async def get_user_data(self) -> dict[int, UD]:
        """Called once by :meth:`telegram.ext.Application.initialize`. Returns every stored
        user's data, or nothing with ``lazy=True`` (each user's row is then loaded by
        :meth:`refresh_user_data`)."""
        return await self._load_all(self._users)

    async def get_chat_data(self) -> dict[int, CD]:
        """Called once by :meth:`telegram.ext.Application.initialize`. Returns every stored
        chat's data, or nothing with ``lazy=True`` (each chat's row is then loaded by
        :meth:`refresh_chat_data`)."""
        return await self._load_all(self._chats)

    async def _refresh(self, kind: _Kind, item_id: int, data: Any) -> None:
        loaded = kind.loaded.get(item_id, _MISSING)
        if loaded is data and item_id not in kind.stale:
            if self.max_cached is not None:  # least recently used order
                kind.loaded[item_id] = kind.loaded.pop(item_id)
            return
        if loaded is not _MISSING and item_id not in kind.stale:
            # PTB replaced the object under this id: the old one was dropped (the delete is
            # not yet written) or migrated away. Never bring the stored row back.
            kind.loaded[item_id] = data
            kind.state[item_id] = (ANY_VERSION, None)
            kind.failed.discard(item_id)
            return
        if data and item_id not in kind.stale:
            # PTB already holds data for this id that did not come from here (it was moved
            # here by Application.migrate_chat_data): keep it, do not overwrite it.
            kind.loaded[item_id] = data
            kind.state[item_id] = (ANY_VERSION, None)
            return
        if not self.lazy and item_id not in kind.stale and item_id not in kind.failed:
            # Eager: everything stored was loaded at start, so this id had no row. (Should
            # another process have created one since, the version check reports it.)
            kind.loaded[item_id] = data
            kind.state[item_id] = (None, None)
            return
        waiting = kind.loading.get(item_id)
        if waiting is not None:
            await asyncio.shield(waiting)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        kind.loading[item_id] = future
        try:
            await self._load_into(kind, item_id, data)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: the waiters re-raise it themselves
            raise
        finally:
            del kind.loading[item_id]
        self._evict(kind, keep=item_id)

    async def _load_into(self, kind: _Kind, item_id: int, data: Any) -> None:
        key = str(item_id)
        try:
            record = await self.database.get(kind.name, key)
            if record is not None and self._expired(record):
                await self.database.delete_if_expired(kind.name, key)
                record = None
            value = None if record is None else self._decode_data(kind, item_id, record)
            if record is not None and self._ttl is not None:
                await self.database.touch(kind.name, [key], self._expires_at())
        except BaseException:
            kind.failed.add(item_id)
            kind.loaded.pop(item_id, None)
            raise
        data.clear()
        if value is not None:
            data.update(value)
        kind.loaded[item_id] = data
        kind.state[item_id] = (
            (None, None) if record is None else (record.version, hash(record.data))
        )
        kind.failed.discard(item_id)
        kind.stale.discard(item_id)

    async def refresh_user_data(self, user_id: int, user_data: UD) -> None:
        """Called by PTB before the first matching handler of each update and before each job.
        Loads the user's row into ``user_data`` (in place) the first time the user is seen,
        and again after a :class:`~ptb_sessions.ConflictError`; otherwise does nothing."""
        await self._refresh(self._users, user_id, user_data)

    async def refresh_chat_data(self, chat_id: int, chat_data: CD) -> None:
        """Called by PTB before the first matching handler of each update and before each job.
        Loads the chat's row into ``chat_data`` (in place) the first time the chat is seen,
        and again after a :class:`~ptb_sessions.ConflictError`; otherwise does nothing."""
        await self._refresh(self._chats, chat_id, chat_data)

    async def refresh_bot_data(self, bot_data: BD) -> None:
        """Does nothing: bot_data is loaded once, by :meth:`get_bot_data`."""

    async def get_bot_data(self) -> BD:
        """Called once by :meth:`telegram.ext.Application.initialize`."""
        self._find_application()
        record = await self.database.get("bot_data", _BOT_KEY)
        if record is None:
            self._bot_state = (None, None)
            return self.context_types.bot_data()
        value = decode_record(self.codec, record, "bot_data", _BOT_KEY)
        self._bot_state = (record.version, hash(record.data))
        return cast(BD, self._as_type(self.context_types.bot_data, value, "bot_data"))

    async def get_callback_data(self) -> CDCData | None:
        """Called once by :meth:`telegram.ext.Application.initialize` if the bot has arbitrary
        callback data. Returns what :meth:`update_callback_data` stored, as PTB's tuple."""
        record = await self.database.get("callback_data", _CALLBACK_KEY)
        if record is None:
            self._callback_state = (None, None)
            return None
        value = decode_record(self.codec, record, "callback_data", _CALLBACK_KEY)
        self._callback_state = (record.version, hash(record.data))
        keyboards, queries = value
        return [tuple(entry) for entry in keyboards], dict(queries)

    async def get_conversations(self, name: str) -> ConversationDict:
        """Called by :meth:`telegram.ext.Application.initialize` for each persistent
        :class:`~telegram.ext.ConversationHandler`. Conversations are always loaded whole:
        PTB reads their states synchronously."""
        namespace = _CONVERSATION_PREFIX + name
        states: dict[str, tuple[int | None, int | None]] = {}
        result: dict[ConversationKey, object] = {}
        async for key, record in self.database.scan(namespace):
            try:
                conversation_key = tuple(json.loads(key))
                state = decode_record(self.codec, record, namespace, key)
            except StorageError:
                _LOGGER.exception("Skipping a conversation state of %r", name)
                continue
            except ValueError:
                _LOGGER.error("Skipping %s[%r]: not a conversation key", namespace, key)
                continue
            result[conversation_key] = state
            states[key] = (record.version, hash(record.data))
        self._conversations[name] = states
        return result

    # -- writing --------------------------------------------------------------------------

    async def _submit(self, write: Write) -> None:
        """Queue ``write`` for this loop tick's batch.

        Every ``update_*`` call of one :meth:`~telegram.ext.Application.update_persistence`
        run starts in the same loop iteration (PTB gathers them), so they share one batch and
        one transaction. The first caller of a batch (its leader) waits for it and raises its
        errors, so ``update_persistence`` returns once the batch is written and the
        application's error handler hears of a failure once; the others return at once.
        """
        self._pending.put(write)
        if self._batch_task is not None:
            return
        task = self._batch_task = asyncio.create_task(self._run_batch())
        errors, batch_error = await asyncio.shield(task)
        if batch_error is not None:
            raise batch_error
        if len(errors) == 1:
            raise next(iter(errors.values()))
        if errors:
            kind = (
                ConflictError
                if all(isinstance(e, ConflictError) for e in errors.values())
                else StorageError
            )
            raise kind(
                f"{len(errors)} writes failed: " + "; ".join(str(e) for e in errors.values())
            )

    async def _run_batch(self) -> tuple[dict[tuple[str, str], StorageError], StorageError | None]:
        await asyncio.sleep(0)  # let every update_* call of this run join
        self._batch_task = None
        writes = self._pending.take()
        try:
            async with self._write_lock:
                errors = await self.database.apply(writes)
        except StorageError as exc:
            for write in writes:  # kept, and retried at the next run and at flush()
                self._pending.keep(write)
            _LOGGER.error("%d writes are kept for the next try: %s", len(writes), exc)
            return {}, exc
        for write in writes:
            self._after_write(write, errors.get((write.namespace, write.key)))
        for error in errors.values():
            _LOGGER.error("%s", error)
        self._evict(self._chats)
        self._evict(self._users)
        return errors, None

    def _after_write(self, write: Write, error: StorageError | None) -> None:
        kind = {"chat_data": self._chats, "user_data": self._users}.get(write.namespace)
        state = (
            None
            if error is not None
            else (write.new_version, None if write.data is None else hash(write.data))
        )
        if isinstance(error, ConflictError):
            # Dropped; the row is read again at the next update of this id.
            if kind is not None:
                kind.stale.add(int(write.key))
                kind.state.pop(int(write.key), None)
            return
        if error is not None:
            # Rejected by the database for this key only: keep it for the next try.
            self._pending.keep(write)
            return
        if kind is not None:
            item_id = int(write.key)
            if write.data is None:
                kind.forget(item_id)
            else:
                kind.state[item_id] = cast("tuple[int | None, int | None]", state)
        elif write.namespace == "bot_data":
            self._bot_state = state
        elif write.namespace == "callback_data":
            self._callback_state = state
        elif write.namespace.startswith(_CONVERSATION_PREFIX):
            states = self._conversations.setdefault(
                write.namespace[len(_CONVERSATION_PREFIX) :], {}
            )
            if write.data is None:
                states.pop(write.key, None)
            else:
                states[write.key] = cast("tuple[int | None, int | None]", state)

    async def _write_if_changed(
        self,
        namespace: str,
        key: str,
        value: Any,
        state: tuple[int | None, int | None] | None,
        *,
        expires_at: float | None = None,
        data_version: float | None = None,
    ) -> None:
        check_key(namespace, key)
        if (
            state == (None, None)
            and isinstance(value, Mapping)
            and not value
            and not getattr(value, "__dict__", None)  # a dict subclass's attributes are data
        ):
            return  # nothing stored and nothing to store
        codec, encoded = encode_value(
            self.codec, value, f"{namespace}[{key}]", self.max_value_size
        )
        if (
            state is not None
            and state[1] == hash(encoded)
            and (namespace, key) not in self._pending
            and expires_at is None
        ):
            return
        expected = ANY_VERSION if state is None else state[0]
        await self._submit(
            Write(
                namespace,
                key,
                encoded,
                codec,
                expected_version=expected,
                data_version=data_version,
                expires_at=expires_at,
            )
        )

    async def _update(self, kind: _Kind, item_id: int, data: Any) -> None:
        if item_id in kind.failed:
            raise StorageError(
                f"{kind.name}[{item_id}] is not written: its stored row could not be loaded "
                "(see the earlier error), and writing would replace it"
            )
        if item_id in kind.stale:
            return  # a conflict dropped this data; the row is read again first
        state = kind.state.get(item_id)
        if state is None and not self.lazy:
            state = (None, None)  # eager: every stored row was loaded at start
        if state is None:
            # Never loaded here (lazy, or an id touched only through
            # Application.mark_data_for_update_persistence): load the row first and merge.
            data = await self._merge_unloaded(kind, item_id, data)
            state = kind.state.get(item_id)
        await self._write_if_changed(
            kind.name,
            str(item_id),
            data,
            state,
            expires_at=self._expires_at(),
            data_version=self._latest_version(),
        )

    async def _merge_unloaded(self, kind: _Kind, item_id: int, data: Any) -> Any:
        try:
            record = await self.database.get(kind.name, str(item_id))
        except StorageError:
            kind.failed.add(item_id)
            raise
        if record is None or self._expired(record):
            kind.state[item_id] = (None, None) if record is None else (record.version, None)
            return data
        try:
            stored = self._decode_data(kind, item_id, record)
        except Exception:
            kind.failed.add(item_id)
            raise
        stored.update(data)
        kind.state[item_id] = (record.version, hash(record.data))
        live = self._live(kind).get(item_id) if self._app is not None else None
        if isinstance(live, dict):
            live.update(stored)
            kind.loaded[item_id] = live
        return stored

    async def update_user_data(self, user_id: int, data: UD) -> None:
        """Called by :meth:`~telegram.ext.Application.update_persistence` for each user whose
        data may have changed. Writes the row only if its encoding changed."""
        await self._update(self._users, user_id, data)

    async def update_chat_data(self, chat_id: int, data: CD) -> None:
        """Called by :meth:`~telegram.ext.Application.update_persistence` for each chat whose
        data may have changed. Writes the row only if its encoding changed."""
        await self._update(self._chats, chat_id, data)

    async def update_bot_data(self, data: BD) -> None:
        """Called at every :meth:`~telegram.ext.Application.update_persistence`; writes only if
        the bot data changed."""
        await self._write_if_changed("bot_data", _BOT_KEY, data, self._bot_state)

    async def update_callback_data(self, data: CDCData) -> None:
        """Called at every :meth:`~telegram.ext.Application.update_persistence`; writes only if
        the callback data changed."""
        await self._write_if_changed("callback_data", _CALLBACK_KEY, data, self._callback_state)

    async def update_conversation(
        self, name: str, key: ConversationKey, new_state: object | None
    ) -> None:
        """Called by :meth:`~telegram.ext.Application.update_persistence` for each changed
        conversation; :obj:`None` (the conversation ended) deletes the row."""
        namespace = _CONVERSATION_PREFIX + name
        row_key = json.dumps(list(key), separators=(",", ":"))
        states = self._conversations.setdefault(name, {})
        state = states.get(row_key)
        if new_state is None:
            await self._submit(Write(namespace, row_key, None))
            return
        await self._write_if_changed(
            namespace, row_key, storable_state(self.codec, new_state), state
        )

    async def _drop(self, kind: _Kind, item_id: int) -> None:
        kind.forget(item_id)
        await self._submit(Write(kind.name, str(item_id), None))

    async def drop_chat_data(self, chat_id: int) -> None:
        """Called by :meth:`~telegram.ext.Application.update_persistence` after
        :meth:`~telegram.ext.Application.drop_chat_data`: deletes the chat's row."""
        await self._drop(self._chats, chat_id)

    async def drop_user_data(self, user_id: int) -> None:
        """Called by :meth:`~telegram.ext.Application.update_persistence` after
        :meth:`~telegram.ext.Application.drop_user_data`: deletes the user's row."""
        await self._drop(self._users, user_id)

    async def flush(self) -> None:
        """Called by :meth:`~telegram.ext.Application.shutdown`: writes what is still pending
        (earlier failed writes) and disposes the engine created from the URL.

        Raises:
            StorageError: Pending writes could not be written; they are kept in memory, and a
                later :meth:`flush` tries again.
        """
        try:
            if self._batch_task is not None:
                await asyncio.shield(self._batch_task)
            if self._pending:
                errors, error = await self._run_batch()
                error = error or next(iter(errors.values()), None)
                if error is not None and self._pending:
                    raise StorageError(
                        f"{len(self._pending)} writes could not be written at flush(): {error}"
                    ) from error
        finally:
            await self.database.dispose()

    async def purge_expired(self) -> int:
        """Delete every expired row of every namespace (one indexed statement).

        Returns:
            The number of deleted rows.
        """
        return await self.database.purge_expired()

    # -- max_cached -----------------------------------------------------------------------

    def _live(self, kind: _Kind) -> dict[int, Any]:
        assert self._app is not None
        return cast(
            "dict[int, Any]",
            self._app._chat_data if kind is self._chats else self._app._user_data,
        )

    def _evict(self, kind: _Kind, keep: int | None = None) -> None:
        """Drop the least recently used ids from the application's memory, down to
        ``max_cached``, if their data is written and unchanged since."""
        if self.max_cached is None or self._app is None:
            return
        live = self._live(kind)
        excess = len(live) - self.max_cached
        if excess <= 0:
            return
        marked = (
            self._app._chat_ids_to_be_updated_in_persistence
            if kind is self._chats
            else self._app._user_ids_to_be_updated_in_persistence
        )
        for item_id in list(kind.loaded):
            if excess <= 0:
                break
            if item_id == keep or item_id in marked or item_id in kind.loading:
                continue
            data = live.get(item_id)
            state = kind.state.get(item_id)
            if data is None or data is not kind.loaded[item_id] or state is None:
                continue
            if (kind.name, str(item_id)) in self._pending:
                continue
            try:
                _, encoded = encode_value(self.codec, data, kind.name, None)
            except SerializationError:
                continue
            if state[0] is None and not data:
                pass  # never stored and empty: nothing to lose
            elif state[1] != hash(encoded):
                continue
            del live[item_id]
            kind.forget(item_id)
            excess -= 1
        # ids PTB created but never refreshed (e.g. by looking one up) are not ours to keep
        for item_id in list(live):
            if excess <= 0:
                break
            if item_id not in kind.loaded and item_id not in marked and not live[item_id]:
                del live[item_id]
                excess -= 1

    # -- chat migration -------------------------------------------------------------------

    async def migrate_chat(
        self, old_chat_id: int, new_chat_id: int, *, prefixes: tuple[str, ...] = ("",)
    ) -> bool:
        """Move everything keyed by ``old_chat_id`` to ``new_chat_id`` in one transaction:
        PTB's chat_data and the session rows whose key (after one of ``prefixes``) is
        ``<old>``, ``<old>/<thread>`` or ``<user>/<old>``. Idempotent. If the new chat
        already has data, nothing is overwritten: the old data stays and a warning is logged.

        Returns:
            Whether anything was moved.
        """
        from ptb_sessions._chatmigration import migrate_chat

        return await migrate_chat(self, old_chat_id, new_chat_id, prefixes=prefixes)


_MISSING: Any = object()
