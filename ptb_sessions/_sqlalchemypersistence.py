"""The :class:`SQLAlchemyPersistence`: PTB's data, one row per key, in any SQL database."""

from __future__ import annotations

import asyncio
import copy
import datetime as dtm
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Coroutine, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast, overload

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from telegram import Bot, Update
from telegram.ext import (
    Application,
    BasePersistence,
    ContextTypes,
    MessageHandler,
    PersistenceInput,
    filters,
)
from telegram.ext._utils.types import CDCData, ConversationDict, ConversationKey

from ptb_sessions._codec import Codec, JSONCodec, bind_codec, storable_state
from ptb_sessions._errors import ConflictError, SerializationError, StorageError
from ptb_sessions._gcpause import collector_paused
from ptb_sessions._groupcommit import GroupCommit
from ptb_sessions._keytracker import NOTHING, KeyState, KeyTracker, TrackedKey, UpdateHolds
from ptb_sessions._rowpolicy import DEFAULT_MAX_VALUE_SIZE, RowPolicy
from ptb_sessions._store import (
    ANY_VERSION,
    DEFAULT_SESSION_CACHE,
    DEFAULT_TIMEOUT,
    Database,
    PendingWrites,
    Record,
    Write,
    check_key,
)
from ptb_sessions._url import DEFAULT_URL
from ptb_sessions.storage._sqlalchemy import SQLAlchemyStorage

if TYPE_CHECKING:
    from ptb_sessions._jobs import StoredJobs

__all__ = ["SQLAlchemyPersistence"]

_LOGGER = logging.getLogger(__name__)
#: How many of the least recently used ids a load looks at when evicting (see ``_evict``).
_EVICTION_LOOKS = 32

UD = TypeVar("UD")
CD = TypeVar("CD")
BD = TypeVar("BD")

#: The handler group of :meth:`~SQLAlchemyPersistence._load_migration_source`: before every
#: group of the bot's own.
_FIRST_GROUP = -(10**18)
_BOT_KEY = "bot"
_CALLBACK_KEY = "callback_data"
_CONVERSATION_PREFIX = "conversation:"
#: The namespaces of PTB's own data; everything else in the table is a session namespace.
BUILTIN_NAMESPACES = frozenset({"user_data", "chat_data", "bot_data", "callback_data"})


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
            :meth:`~telegram.ext.Application.initialize`. The persistence then adds a handler
            of the migration service messages to the application, in group ``-10**18``: it
            loads the old group too, so that PTB's
            ``migrate_chat_data(message=update.message)`` moves its stored data.
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
        store_jobs: Store the application's :class:`~telegram.ext.JobQueue` jobs in the same
            database and restore them in :meth:`~telegram.ext.Application.initialize`, before
            ``post_init`` (needs ``ptb-sessions[jobs]``). See the README, "Jobs that survive
            restarts".
        timeout: Seconds any one database call may take (default 30); a server that stops
            answering gives :class:`~ptb_sessions.StorageError` naming the key.
        session_cache: How many session rows (of :meth:`storage` and of a
            :class:`~ptb_sessions.SessionHandler` on this persistence) this process keeps, with
            their versions, after reading or writing them (default 10,000, least recently used
            first out), so that the next update of a key reads nothing. A write based on a row
            that another process changed meanwhile is a :class:`~ptb_sessions.ConflictError`:
            several processes should use ``SessionHandler(lock="database")``, which always
            reads from the database. ``0``: every read goes to the database.
    """

    __slots__ = (
        "_app",
        "_batch_task",
        "_bot",
        "_callback",
        "_chats",
        "_conversations",
        "_data_policy",
        "_holds",
        "_jobs",
        "_migration_lock",
        "_pending",
        "_policy",
        "_store_jobs",
        "_touches",
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
        store_jobs: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        session_cache: int = DEFAULT_SESSION_CACHE,
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
        store_jobs: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        session_cache: int = DEFAULT_SESSION_CACHE,
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
        store_jobs: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        session_cache: int = DEFAULT_SESSION_CACHE,
    ) -> None:
        super().__init__(store_data=store_data, update_interval=update_interval)
        if max_cached is not None:
            if not lazy:
                raise ValueError("max_cached needs lazy=True: eager loading keeps every chat")
            if max_cached < 1:
                raise ValueError(f"max_cached must be at least 1, not {max_cached}")
        self.database = Database(
            url,
            auto_upgrade=auto_upgrade,
            clock=clock,
            timeout=timeout,
            session_cache=session_cache,
        )
        self.lazy = lazy
        self.max_cached = max_cached
        self.codec: Codec = codec if codec is not None else JSONCodec()
        # bot_data, callback_data and conversations: codec and size limit only.
        self._policy = RowPolicy(self.codec, max_value_size=max_value_size, clock=clock)
        # chat_data and user_data: also the ttl and the data migrations.
        self._data_policy = RowPolicy(
            self.codec,
            max_value_size=max_value_size,
            ttl=ttl,
            migrations=migrations,
            clock=clock,
        )
        self.context_types: ContextTypes[Any, UD, CD, BD] = cast(
            "ContextTypes[Any, UD, CD, BD]", context_types or ContextTypes()
        )
        self.clock = clock
        self.max_value_size = max_value_size
        self._chats: KeyTracker[int] = KeyTracker("chat_data")
        self._users: KeyTracker[int] = KeyTracker("user_data")
        self._bot: KeyTracker[str] = KeyTracker("bot_data")
        self._callback: KeyTracker[str] = KeyTracker("callback_data")
        self._conversations: dict[str, KeyTracker[str]] = {}
        self._holds = UpdateHolds()
        self._pending = PendingWrites()
        self._touches: set[tuple[str, str]] = set()
        self._write_lock = asyncio.Lock()
        self._migration_lock = asyncio.Lock()
        self._batch_task: (
            asyncio.Task[tuple[dict[tuple[str, str], StorageError], StorageError | None]] | None
        ) = None
        self._app: Application[Any, Any, Any, Any, Any, Any] | None = None
        self._store_jobs = store_jobs
        self._jobs: StoredJobs | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.database.masked_url!r}, lazy={self.lazy}, "
            f"max_cached={self.max_cached}, ttl={self._data_policy.ttl})"
        )

    # -- helpers --------------------------------------------------------------------------

    def storage(self, namespace: str = "session") -> SQLAlchemyStorage:
        """A :class:`~ptb_sessions.SQLAlchemyStorage` on this persistence's database, for
        :class:`~ptb_sessions.SessionHandler`: sessions and PTB's data share one database and
        one schema.

        Args:
            namespace: The namespace of the session rows; not one of PTB's own.
        """
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
        get), and let the codec store their classes and give its bot to TelegramObjects. With
        ``lazy``, also load the old group of a migration (see :meth:`_load_migration_source`).
        """
        if self.lazy and application is not self._app:
            application.add_handler(
                MessageHandler(filters.StatusUpdate.MIGRATE, self._load_migration_source),
                group=_FIRST_GROUP,
            )
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

    async def _attach_jobs(self) -> None:
        """With ``store_jobs``: restore the stored jobs into the application's job queue, from
        :meth:`~telegram.ext.Application.initialize` (before ``post_init``)."""
        if not self._store_jobs:
            return
        if self._app is None:
            raise RuntimeError(
                "SQLAlchemyPersistence(store_jobs=True) could not find its Application; call "
                "persistence.bind_application(application) before initialize()"
            )
        if self._app.job_queue is None:
            raise RuntimeError(
                "SQLAlchemyPersistence(store_jobs=True) needs the application's JobQueue, and "
                "this application has none: install it with `pip install "
                "'ptb-sessions[jobs]'` (or 'python-telegram-bot[job-queue]') and do not build "
                "the application with .job_queue(None)"
            )
        if self._jobs is None:
            # Imported here, not at the top: APScheduler is the optional extra
            # ptb-sessions[jobs], present whenever the application has a JobQueue.
            from ptb_sessions._jobs import StoredJobs

            self._jobs = StoredJobs(self.database, self.codec, self.max_value_size, self.clock)
        await self._jobs.attach(self._app)

    def _per_id(self, tracker: KeyTracker[int]) -> Callable[[], Any]:
        """The factory of the application's chat_data or user_data objects."""
        return (
            self.context_types.chat_data
            if tracker is self._chats
            else self.context_types.user_data
        )

    def _decode_data(self, tracker: KeyTracker[int], record: Record, key: str) -> tuple[Any, bool]:
        """The value of a chat_data or user_data row, migrated, and whether it must be written
        back (it was stored at an older data version)."""
        where = f"{tracker.namespace}[{key}]"
        value = self._data_policy.decode(record, tracker.namespace, key)
        value, writeback = self._data_policy.migrate(value, record.data_version, where)
        return self._as_type(self._per_id(tracker), value, where), writeback

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
        return self._data_policy.is_expired(record.expires_at)

    def _mark_for_writeback(self, tracker: KeyTracker[int], ids: list[int]) -> None:
        """Have the application hand ``ids`` to the next ``update_persistence`` run (their
        values were migrated on load and are written back at the latest version)."""
        if not ids or self._app is None:
            return
        if tracker is self._chats:
            self._app.mark_data_for_update_persistence(chat_ids=ids)
        else:
            self._app.mark_data_for_update_persistence(user_ids=ids)

    def _conversation_tracker(self, name: str) -> KeyTracker[str]:
        tracker = self._conversations.get(name)
        if tracker is None:
            tracker = self._conversations[name] = KeyTracker(_CONVERSATION_PREFIX + name)
        return tracker

    def _tracked(self, namespace: str, key: str) -> tuple[KeyTracker[Any], Hashable]:
        """The tracker of a row, and the row's key in it."""
        if namespace == "chat_data":
            return self._chats, int(key)
        if namespace == "user_data":
            return self._users, int(key)
        if namespace == "bot_data":
            return self._bot, key
        if namespace == "callback_data":
            return self._callback, key
        return self._conversation_tracker(namespace[len(_CONVERSATION_PREFIX) :]), key

    # -- loading --------------------------------------------------------------------------

    async def _load_all(self, tracker: KeyTracker[int]) -> dict[int, Any]:
        self._find_application()
        await self._attach_jobs()
        if self.lazy:
            return {}
        expires_at = self._data_policy.expires_at()
        with collector_paused():
            result, expired, writeback = await self._read_all(tracker, expires_at)
        if expired:
            await self.database.purge_expired(tracker.namespace, now=self._data_policy.clock())
        if expires_at is not None:
            await self.database.touch_namespace(tracker.namespace, expires_at)
        self._mark_for_writeback(tracker, writeback)
        return result

    async def _read_all(
        self, tracker: KeyTracker[int], expires_at: float | None
    ) -> tuple[dict[int, Any], int, list[int]]:
        """Every stored value of ``tracker``'s namespace, tracked as loaded; how many had
        expired; the ids to write back (migrated on load)."""
        result: dict[int, Any] = {}
        expired = 0
        writeback: list[int] = []
        async for key, record in self.database.scan(tracker.namespace):
            try:
                item_id = int(key)
            except ValueError:
                _LOGGER.error(
                    "Skipping %s[%r]: the key is not an integer id", tracker.namespace, key
                )
                continue
            if self._expired(record):
                expired += 1
                continue
            try:
                value, needs_writeback = self._decode_data(tracker, record, key)
            except Exception:
                tracker.failed(item_id)
                _LOGGER.exception(
                    "Skipping %s[%s]; it is not written until it loads", tracker.namespace, key
                )
                continue
            result[item_id] = value
            tracker.loaded(
                item_id,
                record.version,
                hash(record.data),
                held=value,
                needs_writeback=needs_writeback,
                expires_at=expires_at,
            )
            if needs_writeback:
                writeback.append(item_id)
        return result, expired, writeback

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

    async def _refresh(
        self, tracker: KeyTracker[int], item_id: int, data: Any, *, also: bool = False
    ) -> None:
        self._holds.hold(tracker, item_id, also=also)
        entry = tracker.get(item_id)
        state = KeyState.UNLOADED if entry is None else entry.state
        merge = state is KeyState.UNLOADED
        if entry is not None and state is KeyState.LOADED:
            if entry.held is data:
                if self.max_cached is not None:
                    tracker.used(item_id)
                return
            if entry.held is not NOTHING:
                # PTB replaced the object under this id: the old one was dropped (the delete
                # is not yet written) or migrated away. Never bring the stored row back.
                tracker.replaced(item_id, data)
                return
            if not self.lazy:
                entry.held = data  # written before PTB's object was seen here
                return
            merge = True  # lazy, written before PTB's object was seen here: read it into it
        if state is KeyState.UNLOADED and not self.lazy:
            # Eager: everything stored was loaded at start, so this id had no row. (Should
            # another process have created one since, the version check reports it.)
            tracker.loaded(item_id, None, None, held=data)
            return
        waiting = tracker.loading.get(item_id)
        if waiting is not None:
            await asyncio.shield(waiting)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        tracker.loading[item_id] = future
        try:
            await self._load_into(tracker, item_id, data, merge=merge)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: the waiters re-raise it themselves
            raise
        finally:
            del tracker.loading[item_id]
        self._evict(tracker, keep=item_id)

    async def _read_live(self, tracker: KeyTracker[int], key: str) -> Record | None:
        """The unexpired row of ``key`` (an expired one is deleted), its expiry refreshed."""
        policy = self._data_policy
        record = await self.database.get(tracker.namespace, key)
        if record is not None and self._expired(record):
            await self.database.delete_if_expired(tracker.namespace, key, now=policy.clock())
            return None
        if record is not None and policy.touch_due(record.expires_at):
            await self.database.touch(tracker.namespace, [key], policy.expires_at())
        return record

    async def _load_into(
        self, tracker: KeyTracker[int], item_id: int, data: Any, *, merge: bool
    ) -> None:
        """Read the row of ``item_id`` into PTB's ``data`` (in place). With ``merge``, what
        PTB already holds there (written by another chat's handler before this chat's first
        update) is applied over the stored value, as in eager mode."""
        key = str(item_id)
        try:
            record = await self._read_live(tracker, key)
            value, needs_writeback = (
                (None, False) if record is None else self._decode_data(tracker, record, key)
            )
        except BaseException:
            tracker.failed(item_id)
            raise
        held_before = dict(data) if merge and data else None
        data.clear()
        if value is not None:
            data.update(value)
        if held_before:
            data.update(held_before)
        tracker.loaded(
            item_id,
            None if record is None else record.version,
            None if record is None else hash(record.data),
            held=data,
            needs_writeback=needs_writeback,
            expires_at=None if record is None else self._data_policy.expires_at(),
        )
        if needs_writeback:
            self._mark_for_writeback(tracker, [item_id])

    async def _load_migration_source(self, update: Update, context: Any) -> None:
        """With ``lazy``, the handler of the migration service messages, in a group before all
        of the bot's own: for the one in the new supergroup, load the old group's row too (PTB
        loads only the update's own chat), held beside it. A later handler's
        :meth:`Application.migrate_chat_data(message=...)
        <telegram.ext.Application.migrate_chat_data>` then moves the stored data, as in eager
        mode."""
        old = None if update.message is None else update.message.migrate_from_chat_id
        if old is not None and self.store_data.chat_data:
            await self._refresh(self._chats, old, context.application.chat_data[old], also=True)

    async def refresh_user_data(self, user_id: int, user_data: UD) -> None:
        """Called by PTB before the first matching handler of each update and before each job.
        Loads the user's row into ``user_data`` (in place) the first time the user is seen,
        and again after a :class:`~ptb_sessions.ConflictError`; otherwise does nothing. The
        user is in use (never evicted by ``max_cached``) until the update ends."""
        await self._refresh(self._users, user_id, user_data)

    async def refresh_chat_data(self, chat_id: int, chat_data: CD) -> None:
        """Called by PTB before the first matching handler of each update and before each job.
        Loads the chat's row into ``chat_data`` (in place) the first time the chat is seen,
        and again after a :class:`~ptb_sessions.ConflictError`; otherwise does nothing. The
        chat is in use (never evicted by ``max_cached``) until the update ends."""
        await self._refresh(self._chats, chat_id, chat_data)

    async def refresh_bot_data(self, bot_data: BD) -> None:
        """Called by PTB before the first matching handler of each update and before each job.
        bot_data is loaded once, by :meth:`get_bot_data`; this reads it again (in place) only
        after a :class:`~ptb_sessions.ConflictError` dropped a write of it."""
        if self._bot.state(_BOT_KEY) is not KeyState.STALE or not isinstance(bot_data, dict):
            return
        waiting = self._bot.loading.get(_BOT_KEY)
        if waiting is not None:
            await asyncio.shield(waiting)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._bot.loading[_BOT_KEY] = future
        try:
            value = await self._read_bot_data()
            bot_data.clear()
            bot_data.update(value)
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: the waiters re-raise it themselves
            raise
        finally:
            del self._bot.loading[_BOT_KEY]

    async def _read_bot_data(self) -> Any:
        """The stored bot data (a new object if none is stored); tracked as loaded or failed."""
        record = await self.database.get("bot_data", _BOT_KEY)
        if record is None:
            self._bot.loaded(_BOT_KEY, None, None)
            return self.context_types.bot_data()
        try:
            value = self._policy.decode(record, "bot_data", _BOT_KEY)
            value = self._as_type(self.context_types.bot_data, value, "bot_data")
        except StorageError:
            self._bot.failed(_BOT_KEY)
            raise
        self._bot.loaded(_BOT_KEY, record.version, hash(record.data))
        return value

    async def get_bot_data(self) -> BD:
        """Called once by :meth:`telegram.ext.Application.initialize`.

        Raises:
            StorageError: The stored bot data cannot be read; it is never written over.
        """
        self._find_application()
        await self._attach_jobs()
        return cast(BD, await self._read_bot_data())

    async def get_callback_data(self) -> CDCData | None:
        """Called once by :meth:`telegram.ext.Application.initialize` if the bot has arbitrary
        callback data. Returns what :meth:`update_callback_data` stored, as PTB's tuple.

        Raises:
            StorageError: The stored callback data cannot be read or is not of PTB's shape;
                it is never written over.
        """
        record = await self.database.get("callback_data", _CALLBACK_KEY)
        if record is None:
            self._callback.loaded(_CALLBACK_KEY, None, None)
            return None
        try:
            value = self._policy.decode(record, "callback_data", _CALLBACK_KEY)
            result = _callback_data(value)
        except StorageError:
            self._callback.failed(_CALLBACK_KEY)
            raise
        self._callback.loaded(_CALLBACK_KEY, record.version, hash(record.data))
        return result

    async def get_conversations(self, name: str) -> ConversationDict:
        """Called by :meth:`telegram.ext.Application.initialize` for each persistent
        :class:`~telegram.ext.ConversationHandler`. Conversations are always loaded whole:
        PTB reads their states synchronously. A row that cannot be read is skipped (and
        logged), and never written over."""
        tracker = self._conversation_tracker(name)
        result: dict[ConversationKey, object] = {}
        async for key, record in self.database.scan(tracker.namespace):
            try:
                conversation_key = _conversation_key(tracker.namespace, key)
                state = self._policy.decode(record, tracker.namespace, key)
                _check_hashable_state(tracker.namespace, key, state)
            except StorageError as exc:
                tracker.failed(key)
                _LOGGER.error(
                    "Skipping a conversation state; it is not written until it loads: %s", exc
                )
                continue
            result[conversation_key] = state
            tracker.loaded(key, record.version, hash(record.data))
        return result

    # -- writing --------------------------------------------------------------------------

    async def _submit(self, write: Write) -> None:
        """Queue ``write`` for this loop tick's batch (see :meth:`_join_batch`)."""
        self._pending.put(write)
        if self._batch_task is None:  # else a batch of this loop tick will carry it
            await self._join_batch()

    async def _join_batch(self) -> None:
        """Every ``update_*`` call of one :meth:`~telegram.ext.Application.update_persistence`
        run starts in the same loop iteration (PTB gathers them), so they share one batch and
        one transaction. The first caller of a batch (its leader) waits for it and raises its
        errors, so ``update_persistence`` returns once the batch is written and the
        application's error handler hears of a failure once; the others return at once.
        """
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
        await self._apply_touches()
        self._evict(self._chats)
        self._evict(self._users)
        return errors, None

    async def _apply_touches(self) -> None:
        """Refresh the expiry of the unchanged rows (a cheap update, never a rewrite)."""
        touches, self._touches = self._touches, set()
        by_namespace: dict[str, list[str]] = {}
        for namespace, key in touches:
            by_namespace.setdefault(namespace, []).append(key)
        expires_at = self._data_policy.expires_at()
        for namespace, keys in by_namespace.items():
            try:
                async with self._write_lock:
                    await self.database.touch(namespace, keys, expires_at)
            except StorageError as exc:
                self._touches.update((namespace, key) for key in keys)  # tried again
                _LOGGER.warning("The expiry of %d rows is refreshed later: %s", len(keys), exc)
                continue
            for key in keys:
                tracker, tracked_key = self._tracked(namespace, key)
                tracker.touched(tracked_key, expires_at)

    def _after_write(self, write: Write, error: StorageError | None) -> None:
        tracker, key = self._tracked(write.namespace, write.key)
        if isinstance(error, ConflictError):
            # Dropped. Chat, user and bot data are read again at their next update; callback
            # data and conversations have no refresh, so their next write fails again, loudly.
            if tracker is self._chats or tracker is self._users or tracker is self._bot:
                tracker.stale(key)
            return
        if error is not None:
            # Rejected by the database for this key only: keep it for the next try.
            self._pending.keep(write)
            return
        if write.data is None:
            tracker.forget(key)
        else:
            tracker.written(key, write.new_version, hash(write.data), write.expires_at)

    def _queue_if_changed(
        self,
        tracker: KeyTracker[Any],
        key: str,
        value: Any,
        entry: TrackedKey | None,
        policy: RowPolicy,
    ) -> bool:
        """Queue the write of ``value`` if its encoding differs from the stored one (or the
        refresh of its expiry if only that is due). Whether anything was queued: then the
        caller joins this loop tick's batch (:meth:`_join_batch`).

        Synchronous, so that the many ``update_*`` calls of one run (one coroutine each, in
        PTB's gather) cost one encode each and no coroutine of their own.

        Raises:
            SerializationError: ``value`` cannot be encoded or is too large.
        """
        namespace = tracker.namespace
        check_key(namespace, key)
        loaded = entry is not None and entry.state is KeyState.LOADED
        if (
            loaded
            and entry.version is None  # type: ignore[union-attr]
            and not value
            and isinstance(value, Mapping)
            and not getattr(value, "__dict__", None)  # a dict subclass's attributes are data
        ):
            return False  # nothing stored and nothing to store
        encoded = policy.encode(value, f"{namespace}[{key}]")
        if entry is not None and entry.is_unchanged(hash(encoded[1])):
            where = (namespace, key)
            if where not in self._pending:  # else this write replaces an older queued one
                if not policy.touch_due(entry.expires_at):
                    return False
                self._touches.add(where)  # unchanged, but its expiry is refreshed
                return True
        expected = entry.version if loaded else ANY_VERSION  # type: ignore[union-attr]
        self._pending.put(policy.write_encoded(namespace, key, encoded, expected_version=expected))
        return True

    async def _write_if_changed(
        self,
        tracker: KeyTracker[Any],
        key: str,
        value: Any,
        entry: TrackedKey | None,
        policy: RowPolicy,
    ) -> None:
        if self._queue_if_changed(tracker, key, value, entry, policy):
            await self._join_batch()

    def _update(
        self, tracker: KeyTracker[int], item_id: int, data: Any
    ) -> Coroutine[Any, Any, None] | None:
        """Queue the write of ``data`` for ``item_id`` if it changed. Returns what the caller
        must await, if anything: the batch, for its first caller (see :meth:`_join_batch`),
        or the load of a row never loaded. Every other call (most of one
        ``update_persistence`` run) is done without a coroutine of its own.

        Raises:
            StorageError: The key's load failed; it is not written.
            SerializationError: ``data`` cannot be encoded or is too large.
        """
        entry = tracker.check_writable(item_id)
        if entry is None or entry.state is not KeyState.LOADED:
            if entry is not None and entry.state is KeyState.STALE:
                return None  # a conflict dropped this data; the row is read again first
            if self.lazy:
                return self._update_unloaded(tracker, item_id, data)
            entry = tracker.loaded(item_id, None, None)  # eager: every row was loaded
        if (
            self._queue_if_changed(tracker, str(item_id), data, entry, self._data_policy)
            and self._batch_task is None
        ):
            return self._join_batch()
        return None

    async def _update_unloaded(self, tracker: KeyTracker[int], item_id: int, data: Any) -> None:
        """Never loaded here (lazy, or an id touched only through
        Application.mark_data_for_update_persistence): load the row first and merge."""
        data = await self._merge_unloaded(tracker, item_id, data)
        await self._write_if_changed(
            tracker, str(item_id), data, tracker.get(item_id), self._data_policy
        )

    async def _merge_unloaded(self, tracker: KeyTracker[int], item_id: int, data: Any) -> Any:
        key = str(item_id)
        try:
            record = await self.database.get(tracker.namespace, key)
            expired = record is not None and self._expired(record)
            stored, needs_writeback = (
                (None, False)
                if record is None or expired
                else self._decode_data(tracker, record, key)
            )
        except BaseException:
            tracker.failed(item_id)
            raise
        if stored is None:
            version = None if record is None else record.version
            tracker.loaded(item_id, version, None)
            return data
        stored.update(data)
        live = self._live(tracker).get(item_id) if self._app is not None else None
        held = NOTHING
        if isinstance(live, dict):
            live.update(stored)
            held = live
        tracker.loaded(
            item_id,
            record.version,  # type: ignore[union-attr]
            hash(record.data),  # type: ignore[union-attr]
            held=held,
            needs_writeback=needs_writeback,
        )
        return stored

    async def update_user_data(self, user_id: int, data: UD) -> None:
        """Called by :meth:`~telegram.ext.Application.update_persistence` for each user whose
        data may have changed. Writes the row only if its encoding changed."""
        waiting = self._update(self._users, user_id, data)
        if waiting is not None:
            await waiting

    async def update_chat_data(self, chat_id: int, data: CD) -> None:
        """Called by :meth:`~telegram.ext.Application.update_persistence` for each chat whose
        data may have changed. Writes the row only if its encoding changed."""
        waiting = self._update(self._chats, chat_id, data)
        if waiting is not None:
            await waiting

    async def update_bot_data(self, data: BD) -> None:
        """Called at every :meth:`~telegram.ext.Application.update_persistence`; writes only if
        the bot data changed."""
        self._bot.check_writable(_BOT_KEY)
        if self._bot.state(_BOT_KEY) is KeyState.STALE:
            return  # a conflict dropped this data; it is read again first
        await self._write_if_changed(
            self._bot, _BOT_KEY, data, self._bot.get(_BOT_KEY), self._policy
        )

    async def update_callback_data(self, data: CDCData) -> None:
        """Called at every :meth:`~telegram.ext.Application.update_persistence`; writes only if
        the callback data changed."""
        self._callback.check_writable(_CALLBACK_KEY)
        await self._write_if_changed(
            self._callback, _CALLBACK_KEY, data, self._callback.get(_CALLBACK_KEY), self._policy
        )

    async def update_conversation(
        self, name: str, key: ConversationKey, new_state: object | None
    ) -> None:
        """Called by :meth:`~telegram.ext.Application.update_persistence` for each changed
        conversation; :obj:`None` (the conversation ended) deletes the row. A conversation
        whose stored row could not be read is not written."""
        tracker = self._conversation_tracker(name)
        row_key = json.dumps(list(key), separators=(",", ":"))
        tracker.check_writable(row_key)
        if new_state is None:
            await self._submit(Write(tracker.namespace, row_key, None))
            return
        await self._write_if_changed(
            tracker,
            row_key,
            storable_state(self.codec, new_state),
            tracker.get(row_key),
            self._policy,
        )

    async def _drop(self, tracker: KeyTracker[int], item_id: int) -> None:
        tracker.forget(item_id)
        await self._submit(Write(tracker.namespace, str(item_id), None))

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
            if self._pending or self._touches:
                errors, error = await self._run_batch()
                error = error or next(iter(errors.values()), None)
                if error is not None and self._pending:
                    raise StorageError(
                        f"{len(self._pending)} writes could not be written at flush(): {error}"
                    ) from error
        finally:
            try:
                if self._jobs is not None:
                    await self._jobs.close()
            finally:
                await self.database.dispose()

    async def purge_expired(self) -> int:
        """Delete every expired row of every namespace (one indexed statement).

        Returns:
            The number of deleted rows.
        """
        return await self.database.purge_expired()

    # -- max_cached -----------------------------------------------------------------------

    def _live(self, tracker: KeyTracker[int]) -> dict[int, Any]:
        assert self._app is not None
        return _application_memory(self._app, tracker.namespace)[0]

    def _is_written(self, namespace: str, entry: TrackedKey, data: Any) -> bool:
        """Whether ``data`` is what is stored (or is empty with nothing stored)."""
        if entry.version is None and not data:
            return True
        try:
            _, encoded = self._data_policy.encode(data, namespace)
        except SerializationError:
            return False
        return entry.is_unchanged(hash(encoded))

    def _evict(self, tracker: KeyTracker[int], keep: int | None = None) -> None:
        """Drop the least recently used ids from the application's memory, down to
        ``max_cached``, if no running update uses them and their data is written and
        unchanged since.

        After a write (no ``keep``) every tracked id is looked at. After a load (``keep``: the
        id just loaded) only a few of the least recently used: one that cannot go now (in use,
        changed, marked) counts as used, so the next load looks at others and a load costs
        the same with 10 or 100,000 chats in memory.
        """
        if self.max_cached is None or self._app is None:
            return
        live, marked = _application_memory(self._app, tracker.namespace)
        excess = len(live) - self.max_cached
        if excess <= 0:
            return
        limit = None if keep is None else _EVICTION_LOOKS
        for item_id, entry in tracker.least_recently_used(limit):
            if excess <= 0:
                break
            if item_id == keep or not self._can_evict(tracker, item_id, entry, live, marked):
                tracker.used(item_id)
                continue
            del live[item_id]
            tracker.forget(item_id)
            excess -= 1
        if keep is not None:
            return
        # ids PTB created but never refreshed (e.g. by looking one up) are not ours to keep
        for item_id in list(live):
            if excess <= 0:
                break
            if tracker.get(item_id) is None and item_id not in marked and not live[item_id]:
                del live[item_id]
                excess -= 1

    def _can_evict(
        self,
        tracker: KeyTracker[int],
        item_id: int,
        entry: TrackedKey,
        live: dict[int, Any],
        marked: set[int],
    ) -> bool:
        """Whether ``item_id`` may leave memory now: tracked and idle, PTB's object the one
        tracked, not marked for the next save, and written as it is."""
        if item_id in marked or not tracker.may_evict(item_id, entry):
            return False
        data = live.get(item_id)
        if data is None or data is not entry.held:
            return False
        return (tracker.namespace, str(item_id)) not in self._pending and self._is_written(
            tracker.namespace, entry, data
        )

    # -- chat migration -------------------------------------------------------------------

    async def migrate_chat(
        self, old_chat_id: int, new_chat_id: int, *, prefixes: Iterable[str] = ("",)
    ) -> bool:
        """Move everything keyed by ``old_chat_id`` to ``new_chat_id`` in one transaction:
        PTB's chat_data and the session rows whose key (after one of ``prefixes``) is
        ``<old>``, ``<old>/<thread>`` or ``<user>/<old>``. Idempotent. If the new chat
        already has data (stored, or only in memory so far), nothing is overwritten: the old
        data stays and a warning is logged. Called by
        :class:`~ptb_sessions.ChatMigrationHandler`.

        Returns:
            Whether anything was moved.
        """
        old, new = str(old_chat_id), str(new_chat_id)
        async with self._migration_lock:
            # Both chats' newest data goes to the database first: the move then takes all of
            # the old chat's, and sees that the new chat has data of its own.
            for chat_id in (old_chat_id, new_chat_id):
                await self._write_held(chat_id)
            moves = [("chat_data", old, new)]
            for namespace in await self.database.namespaces():
                if namespace in BUILTIN_NAMESPACES or namespace.startswith(_CONVERSATION_PREFIX):
                    continue
                keys = await self.database.keys_containing(namespace, old)
                moves += _session_key_moves(namespace, keys, old, new, prefixes)
            done, skipped = await self.database.move_keys(moves)
            GroupCommit.of(self.database).clear()  # the sessions' cached rows moved too
            for namespace, old_key, new_key in skipped:
                _LOGGER.warning(
                    "Chat migration %s -> %s: %s[%r] was not moved because %r already has "
                    "data; the old data stays under the old key",
                    old,
                    new,
                    namespace,
                    old_key,
                    new_key,
                )
            if ("chat_data", old, new) in done:
                self._moved_in_memory(old_chat_id, new_chat_id)
            if done:
                _LOGGER.info("Chat migration %s -> %s moved %d rows", old, new, len(done))
            return bool(done)

    async def _write_held(self, chat_id: int) -> None:
        """Write the chat data the application holds for ``chat_id``, if it is ours and
        changed."""
        if self._app is None:
            return
        entry = self._chats.get(chat_id)
        held = self._live(self._chats).get(chat_id)
        if entry is None or entry.state is not KeyState.LOADED or held is None:
            return
        if held is entry.held:
            waiting = self._update(self._chats, chat_id, copy.deepcopy(held))
            if waiting is not None:
                await waiting

    def _moved_in_memory(self, old_chat_id: int, new_chat_id: int) -> None:
        """The old chat's row moved to the new chat: so does the data the application holds."""
        self._chats.forget(old_chat_id)
        self._chats.stale(new_chat_id)  # the next update of the new chat reads the moved row
        if self._app is None:
            return
        live = self._live(self._chats)
        held_old = live.pop(old_chat_id, None)
        held_new = live.get(new_chat_id)
        if held_new is not None:
            if held_old:
                held_new.update(held_old)  # in place: a running handler may hold this object
        elif held_old is not None:
            live[new_chat_id] = held_old


def _application_memory(
    application: Application[Any, Any, Any, Any, Any, Any], namespace: str
) -> tuple[dict[int, Any], set[int]]:
    """The application's chat_data (or user_data) dict and the ids marked for its next
    ``update_persistence`` run.

    PTB offers no way to remove an id from memory without deleting its data (``drop_*``), nor
    to see which ids are marked, so ``max_cached`` and the chat migration use the dicts behind
    :attr:`~telegram.ext.Application.chat_data` / ``user_data``: this is the only place that
    reaches into the application.
    """
    if namespace == "chat_data":
        return application._chat_data, application._chat_ids_to_be_updated_in_persistence
    return application._user_data, application._user_ids_to_be_updated_in_persistence


def _conversation_key(namespace: str, key: str) -> tuple[int | str, ...]:
    """The conversation key stored as ``key`` (a JSON list of ids and strings).

    Raises:
        StorageError: ``key`` is not such a list.
    """
    try:
        parsed = json.loads(key)
    except ValueError:
        parsed = None
    if not isinstance(parsed, list) or not all(
        isinstance(part, int | str) and not isinstance(part, bool) for part in parsed
    ):
        raise StorageError(
            f"{namespace}[{key!r}] is not a conversation key (a JSON list of chat, user and "
            "message ids)"
        )
    return tuple(parsed)


def _check_hashable_state(namespace: str, key: str, state: object) -> None:
    try:
        hash(state)
    except TypeError:
        raise StorageError(
            f"The stored row of {namespace}[{key!r}] holds a {type(state).__name__}, which "
            "cannot be a conversation state (states are hashable)"
        ) from None


_CALLBACK_SHAPE = (
    "PTB's callback data: [[keyboard id, access time, {button id: data}], ...] and "
    "{callback query id: keyboard id}"
)


def _callback_data(value: Any) -> CDCData:
    """The stored callback data as PTB's tuple.

    Raises:
        StorageError: ``value`` does not have the shape of PTB's callback data.
    """
    problem = None
    if not isinstance(value, list | tuple) or len(value) != 2:
        problem = f"a {type(value).__name__}, not a pair"
    else:
        keyboards, queries = value
        if not isinstance(keyboards, list | tuple) or not all(
            isinstance(entry, list | tuple)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and isinstance(entry[1], int | float)
            and isinstance(entry[2], dict)
            for entry in keyboards
        ):
            problem = "its keyboards are not [keyboard id, access time, {button id: data}]"
        elif not isinstance(queries, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in queries.items()
        ):
            problem = "its queries are not {callback query id: keyboard id}"
    if problem is not None:
        raise StorageError(
            f"The stored row of callback_data[{_CALLBACK_KEY!r}] is not {_CALLBACK_SHAPE}: it "
            f"is {problem}. Inspect it with `ptb-sessions show callback_data`"
        )
    keyboards, queries = value
    return [cast("tuple[str, float, dict[str, Any]]", tuple(e)) for e in keyboards], dict(queries)


def _session_key_moves(
    namespace: str, keys: Iterable[str], old: str, new: str, prefixes: Iterable[str]
) -> list[tuple[str, str, str]]:
    """The renames of the session keys of ``old``: ``<p><old>``, ``<p><old>/<thread>`` and
    ``<p><user>/<old>`` for each prefix ``p``."""
    moves = []
    patterns = [
        re.compile(
            rf"^(?P<p>{re.escape(prefix)})(?:(?P<chat>{re.escape(old)})(?P<thread>/\d+)?"
            rf"|(?P<user>\d+)/{re.escape(old)})$"
        )
        for prefix in sorted({"", *prefixes}, key=len, reverse=True)
    ]
    for key in keys:
        for pattern in patterns:
            match = pattern.match(key)
            if match is None:
                continue
            if match["chat"] is not None:
                moves.append((namespace, key, f"{match['p']}{new}{match['thread'] or ''}"))
            else:
                moves.append((namespace, key, f"{match['p']}{match['user']}/{new}"))
            break
    return moves
