"""``SessionHandler``: grammY's sessions for python-telegram-bot, as ``context.session``."""

from __future__ import annotations

import datetime as dtm
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast

from telegram import Update
from telegram.ext import ApplicationHandlerStop, BaseHandler, ConversationHandler
from telegram.ext._utils.types import CCT

from ptb_sessions._codec import JSONCodec
from ptb_sessions._keys import by_chat
from ptb_sessions._sessioncontext import SessionContext, current_binding
from ptb_sessions._sessioncore import (
    MISSING,
    Binding,
    Cell,
    LazySession,
    MultiBinding,
    Spec,
)
from ptb_sessions.storage._enhance import enhance_storage
from ptb_sessions.storage._memory import MemoryStorage

if TYPE_CHECKING:
    from telegram.ext import Application

    from ptb_sessions.storage._base import StorageAdapter

__all__ = ["Fragment", "LazySession", "SessionContext", "SessionHandler"]

_LOGGER = logging.getLogger("ptb_sessions.SessionHandler")

KeyFunction = Callable[[Update], "str | None"]
Migrations = Mapping[float, Callable[[Any], Any]]


class Fragment:
    """The configuration of one fragment of a multi session (``SessionHandler(fragments=...)``):
    ``context.session.<name>`` with its own storage, key, initial value and options.

    Every argument means what it means for :class:`SessionHandler`.

    Args:
        initial (Callable[[], Any], optional): Makes the value of a new key (a fresh object each
            time). Defaults to :obj:`None`: a new key reads :obj:`None`.
        key (Callable[[:class:`telegram.Update`], :obj:`str` | :obj:`None`], optional): The
            session key function. Defaults to :func:`~ptb_sessions.by_chat`.
        storage (:class:`~ptb_sessions.StorageAdapter` | \
            :class:`~ptb_sessions.SQLAlchemyPersistence`,
            optional): Where the fragment lives; a persistence stores it in the namespace named
            after the fragment. Defaults to the handler's ``storage`` (a fresh
            :class:`~ptb_sessions.MemoryStorage` if that is :obj:`None` too).
        prefix (:obj:`str`, optional): Put in front of every key. Defaults to ``""``.
        lazy (:obj:`bool`, optional): Whether ``context.session.<name>`` is a
            :class:`~ptb_sessions.LazySession`. Defaults to :obj:`False`.
        ttl (:obj:`float` | :class:`datetime.timedelta`, optional): Values neither read nor
            written for this long expire. Defaults to :obj:`None`.
        migrations (Mapping[:obj:`float`, Callable[[Any], Any]], optional): Versioned data
            migrations. Defaults to :obj:`None`.
        clock (Callable[[], :obj:`float`], optional): The time in seconds, for ``ttl``. Defaults
            to the handler's ``clock``.
    """

    __slots__ = ("clock", "initial", "key", "lazy", "migrations", "prefix", "storage", "ttl")

    def __init__(
        self,
        *,
        initial: Callable[[], Any] | None = None,
        key: KeyFunction = by_chat,
        storage: object | None = None,
        prefix: str = "",
        lazy: bool = False,
        ttl: float | dtm.timedelta | None = None,
        migrations: Migrations | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.initial = initial
        self.key = key
        self.storage = storage
        self.prefix = prefix
        self.lazy = lazy
        self.ttl = ttl
        self.migrations = migrations
        self.clock = clock

    def __repr__(self) -> str:
        return (
            f"Fragment(key={getattr(self.key, '__qualname__', self.key)}, prefix={self.prefix!r}, "
            f"lazy={self.lazy}, storage={self.storage!r})"
        )


def _is_persistence(storage: object) -> bool:
    """Whether ``storage`` is a :class:`~ptb_sessions.SQLAlchemyPersistence` (duck-typed)."""
    return not hasattr(storage, "read") and callable(getattr(storage, "storage", None))


def lock_scope(storage: object) -> tuple[int, str]:
    """What the per-key lock table calls ``storage``: its database and namespace if it has them
    (every :class:`~ptb_sessions.SQLAlchemyStorage` of one namespace shares the locks, however
    many objects :meth:`~ptb_sessions.SQLAlchemyPersistence.storage` made), else the object."""
    database = getattr(storage, "database", None)
    namespace = getattr(storage, "namespace", None)
    if database is not None and isinstance(namespace, str):
        return id(database), namespace
    return id(storage), ""


def _check_storage(storage: object, where: str) -> None:
    missing = [m for m in ("read", "write", "delete") if not callable(getattr(storage, m, None))]
    if missing:
        raise TypeError(
            f"{where}: {storage!r} is not a StorageAdapter (it has no {', '.join(missing)}) "
            "nor an SQLAlchemyPersistence"
        )


class SessionHandler(BaseHandler[Update, CCT, object]):
    """Wraps a group of handlers, like :class:`~telegram.ext.ConversationHandler` does, and
    gives them ``context.session``: grammY's sessions for python-telegram-bot.

    It handles an update when one of :paramref:`handlers` does (the first that matches, in
    order). Around that handler it loads the session of the update's key into
    ``context.session`` and, afterwards, writes it back if its encoding changed::

        async def pizza(update: Update, context: SessionContext[dict[str, int]]) -> None:
            context.session["pizzas"] += 1

        app.add_handler(
            SessionHandler(
                [MessageHandler(filters.Regex("🍕"), pizza)],
                initial=lambda: {"pizzas": 0},
                storage=SQLAlchemyPersistence("sqlite:///bot.db"),
            )
        )

    * **Strict** (default): ``context.session`` is the stored value, or ``initial()`` (a fresh
      object each time) when nothing is stored. It is written back only if its encoding
      changed, so an untouched initial value is not written; ``context.session = None``
      deletes the stored value.
    * If the handler raises, nothing is written and the error goes to the error handlers;
      :class:`~telegram.ext.ApplicationHandlerStop` saves, then stops. A storage that cannot
      be read raises too: the session never falls back to ``initial()`` over real data.
    * **No key** (e.g. an inline query with :func:`~ptb_sessions.by_chat`): the handler runs,
      and any use of ``context.session`` raises :class:`~ptb_sessions.SessionKeyError` naming
      the update type and the key function (with a plain
      :class:`~telegram.ext.CallbackContext`, an assignment raises when the handler returns).
    * **Lazy** (``lazy=True``): ``context.session`` is a :class:`~ptb_sessions.LazySession`:
      ``await context.session`` reads once per update, assigning replaces it without reading,
      never touching it means no read and no write.
    * **Multi** (``fragments={name: Fragment(...)}``): ``context.session.<name>`` per
      fragment, each with its own storage, key, initial value, prefix, laziness, ttl and
      migrations. A fragment without a key fails only when used;
      ``context.session.<name> = None`` deletes that fragment, ``context.session = None`` all.
    * Updates with the same key (per storage) are handled one at a time in this process, from
      load to save, by every :class:`SessionHandler`, so ``concurrent_updates`` never loses a
      write. With ``lock="database"`` the storage's ``lock(key)`` (a row lock in PostgreSQL
      or MariaDB) is held as well, so several processes take turns. A lazy session takes
      these locks when first used (its read, or the write of an assigned value), so an update
      that never touches it neither waits nor locks.
    * The wrapped handlers' own ``block`` is ignored; :paramref:`block` counts. The previous
      ``context.session`` is restored afterwards (one context serves all handler groups).

    Args:
        handlers (Sequence[:class:`telegram.ext.BaseHandler`]): The handlers that get
            ``context.session``. A persistent :class:`~telegram.ext.ConversationHandler` cannot
            be wrapped: put the :class:`SessionHandler` inside its states instead.
        initial (Callable[[], Any], optional): Makes the value of a new key (a fresh object each
            time). Defaults to :obj:`None`: a new key reads :obj:`None`.
        key (Callable[[:class:`telegram.Update`], :obj:`str` | :obj:`None`], optional): The
            session key function. Defaults to :func:`~ptb_sessions.by_chat`.
        storage (:class:`~ptb_sessions.StorageAdapter` | \
            :class:`~ptb_sessions.SQLAlchemyPersistence`,
            optional): Where sessions live. A persistence stores them in its database in the
            namespace ``"session"`` (a fragment: its name). Defaults to a
            :class:`~ptb_sessions.MemoryStorage` (data is lost on restart; a warning is logged).
        prefix (:obj:`str`, optional): Put in front of every key, e.g. to share a storage.
            Defaults to ``""``.
        lazy (:obj:`bool`, optional): Lazy sessions. Defaults to :obj:`False`.
        ttl (:obj:`float` | :class:`datetime.timedelta`, optional): Values neither read nor
            written for this long expire (see :func:`~ptb_sessions.enhance_storage`). Defaults
            to :obj:`None`.
        migrations (Mapping[:obj:`float`, Callable[[Any], Any]], optional): Versioned data
            migrations (see :func:`~ptb_sessions.enhance_storage`). Defaults to :obj:`None`.
        fragments (Mapping[:obj:`str`, :class:`Fragment`], optional): Makes this a multi
            session. The handler's :paramref:`storage` is then the default of fragments without
            one, and :paramref:`initial`, :paramref:`key`, :paramref:`prefix`,
            :paramref:`lazy`, :paramref:`ttl` and :paramref:`migrations` must stay unset.
        lock (:obj:`str`, optional): ``"process"`` (default): a per-key lock in this process.
            ``"database"``: also hold the storage's ``lock(key)`` from load to save.
        block (:obj:`bool`, optional): Whether the application waits for the handler. Defaults
            to :obj:`True`.
        clock (Callable[[], :obj:`float`], optional): The time in seconds, for ``ttl``. Defaults
            to :func:`time.time`.

    Raises:
        ValueError: Invalid arguments (see above), or ``lock="database"`` with a storage that
            has no ``lock`` method.
    """

    __slots__ = ("_fragments", "_handlers", "_lock", "_multi", "_single", "_specs")

    def __init__(
        self,
        handlers: Sequence[BaseHandler[Any, CCT, Any]],
        *,
        initial: Callable[[], Any] | None = None,
        key: KeyFunction = by_chat,
        storage: object | None = None,
        prefix: str = "",
        lazy: bool = False,
        ttl: float | dtm.timedelta | None = None,
        migrations: Migrations | None = None,
        fragments: Mapping[str, Fragment] | None = None,
        lock: Literal["process", "database"] = "process",
        block: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # no callback of its own: BaseHandler.__init__ is not called, like ConversationHandler
        self.block = block
        self._handlers = tuple(handlers)
        for handler in self._handlers:
            if not isinstance(handler, BaseHandler):
                raise TypeError(f"SessionHandler handlers must be BaseHandlers, not {handler!r}")
            if isinstance(handler, ConversationHandler) and handler.persistent:
                raise ValueError(
                    f"SessionHandler cannot wrap the persistent ConversationHandler "
                    f"{handler.name!r}: PTB only loads top-level persistent conversations. "
                    "Put the SessionHandler inside the conversation's states instead."
                )
        if lock not in ("process", "database"):
            raise ValueError(f"lock must be 'process' or 'database', not {lock!r}")
        self._lock = lock
        self._multi = fragments is not None
        self._fragments = MappingProxyType(dict(fragments)) if fragments is not None else None
        defaults: list[str] = []
        if fragments is not None:
            given = {
                "initial": initial is not None,
                "key": key is not by_chat,
                "prefix": prefix != "",
                "lazy": lazy,
                "ttl": ttl is not None,
                "migrations": migrations is not None,
            }
            bad = [name for name, set_ in given.items() if set_]
            if bad:
                raise ValueError(
                    f"With fragments, set {', '.join(bad)} on each Fragment, not on the "
                    "SessionHandler (only storage, lock, block and clock apply to all fragments)."
                )
            configs: list[tuple[str | None, Fragment]] = []
            for name, fragment in fragments.items():
                if not isinstance(fragment, Fragment):
                    raise TypeError(f"Fragment {name!r} must be a Fragment, not {fragment!r}")
                if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
                    raise ValueError(
                        f"Fragment names must be identifiers not starting with '_', not {name!r}"
                    )
                configs.append((name, fragment))
        else:
            configs = [
                (
                    None,
                    Fragment(
                        initial=initial,
                        key=key,
                        storage=storage,
                        prefix=prefix,
                        lazy=lazy,
                        ttl=ttl,
                        migrations=migrations,
                        clock=clock,
                    ),
                )
            ]
        specs = [self._spec(name, frag, storage, clock, defaults) for name, frag in configs]
        if defaults:
            _LOGGER.warning(
                "SessionHandler without storage: %s kept in memory and lost on restart. Pass "
                "storage=SQLAlchemyPersistence(...) (or another storage) to keep them.",
                "sessions are" if not self._multi else f"fragments {', '.join(defaults)} are",
            )
        seen: dict[tuple[tuple[int, str], str], str] = {}
        for spec in specs:
            name = cast(str, spec.name)
            other = seen.setdefault((spec.lock_id, spec.prefix), name)
            if other != name:
                raise ValueError(
                    f"Fragments {other!r} and {name!r} share a storage and a prefix, so their "
                    f"keys may collide: give them different prefixes, e.g. prefix='{name}:'."
                )
        self._specs = tuple(specs)
        self._single = None if self._multi else specs[0]

    def _spec(
        self,
        name: str | None,
        frag: Fragment,
        default_storage: object | None,
        clock: Callable[[], float],
        defaults: list[str],
    ) -> Spec:
        where = "SessionHandler" if name is None else f"Fragment {name!r}"
        storage = frag.storage if frag.storage is not None else default_storage
        if storage is None:
            storage = MemoryStorage()
            defaults.append(repr(name))
        elif _is_persistence(storage):
            storage = cast(Any, storage).storage("session" if name is None else name)
        else:
            _check_storage(storage, where)
        base = storage
        frag_clock = clock if frag.clock is time.time else frag.clock
        if frag.ttl is not None or frag.migrations is not None:
            storage = enhance_storage(
                cast("StorageAdapter", storage),
                ttl=frag.ttl,
                migrations=frag.migrations,
                clock=frag_clock,
            )
        db_lock = self._lock == "database"
        if db_lock and not callable(getattr(storage, "lock", None)):
            raise ValueError(
                f"{where}: lock='database' needs a storage with a lock(key) method (e.g. "
                f"SQLAlchemyStorage on PostgreSQL or MariaDB), and {base!r} has none."
            )
        codec = getattr(base, "codec", None)
        if not callable(getattr(codec, "encode", None)):
            codec = JSONCodec()
        return Spec(
            name=name,
            storage=storage,
            lock_id=lock_scope(base),
            key_fn=frag.key,
            prefix=frag.prefix,
            initial=frag.initial,
            lazy=frag.lazy,
            db_lock=db_lock,
            codec=codec,
        )

    @property
    def handlers(self) -> tuple[BaseHandler[Any, CCT, Any], ...]:
        """tuple[:class:`telegram.ext.BaseHandler`]: The wrapped handlers."""
        return self._handlers

    @property
    def fragments(self) -> Mapping[str, Fragment] | None:
        """Mapping[:obj:`str`, :class:`Fragment`] | :obj:`None`: The fragments of a multi
        session, or :obj:`None`."""
        return self._fragments

    @property
    def storage(self) -> Any:
        """:class:`~ptb_sessions.StorageAdapter` | :obj:`None`: The storage of a single session
        (after any ``ttl``/``migrations`` enhancement); :obj:`None` for a multi session."""
        return None if self._multi else self._specs[0].storage

    @property
    def key_prefixes(self) -> frozenset[str]:
        """frozenset[:obj:`str`]: The key prefixes of the session, or of each fragment."""
        return frozenset(spec.prefix for spec in self._specs)

    @property
    def lock(self) -> str:
        """:obj:`str`: ``"process"`` or ``"database"``."""
        return self._lock

    def __repr__(self) -> str:
        inner = ", ".join(repr(h) for h in self._handlers[:3])
        more = ", ..." if len(self._handlers) > 3 else ""
        return f"SessionHandler[{inner}{more}]"

    def check_update(self, update: object) -> tuple[BaseHandler[Any, CCT, Any], object] | None:
        """The first wrapped handler that handles ``update``, with its check result.

        Args:
            update (:obj:`object` | :class:`telegram.Update`): The update.

        Returns:
            tuple | :obj:`None`: ``(handler, check result)``, or :obj:`None`.
        """
        for handler in self._handlers:
            check = handler.check_update(update)
            if check is not None and check is not False:
                return handler, check
        return None

    async def handle_update(  # type: ignore[override]
        self,
        update: Update,
        application: Application[Any, CCT, Any, Any, Any, Any],
        check_result: tuple[BaseHandler[Any, CCT, Any], object],
        context: CCT,
    ) -> object:
        """Load the session, run the wrapped handler chosen by :meth:`check_update`, save.

        Args:
            update (:class:`telegram.Update`): The update.
            application (:class:`telegram.ext.Application`): The application.
            check_result (tuple): The result of :meth:`check_update`.
            context (:class:`telegram.ext.CallbackContext`): The context.

        Returns:
            The wrapped handler's result (a new state inside a ConversationHandler).
        """
        # One body for every kind of session, kept short: it runs for every update (see
        # bench/sessions.py). A lazy session is one small object that takes its locks only
        # when first used, so an untouched one costs no lock, no I/O and no key function call:
        # with a plain context, three calls (LazySession, public, finish).
        spec = self._single
        binding: Binding
        if spec is not None and spec.lazy:
            binding = LazySession(spec, update)  # opens nothing
        else:
            binding = (
                MultiBinding([Cell(fragment, update) for fragment in self._specs])
                if spec is None
                else Cell(spec, update)
            )
            opening = binding.open()
            if opening is not None:
                try:
                    await opening
                except BaseException:
                    await _closed(binding)
                    raise
        handler, check = check_result
        if isinstance(context, SessionContext):
            token = current_binding.set(binding)
            try:
                try:
                    result = await handler.handle_update(update, application, check, context)
                except ApplicationHandlerStop:
                    await _saved(binding)
                    raise
                await _saved(binding)
                return result
            finally:
                current_binding.reset(token)
                closing = binding.close()  # here, not in _closed(): one coroutine less
                if closing is not None:
                    await closing
        attrs = context.__dict__
        previous = attrs.get("session", MISSING)
        attrs["session"] = binding.public()
        stop: ApplicationHandlerStop | None = None
        try:
            try:
                result = await handler.handle_update(update, application, check, context)
            finally:  # what the handler left in context.session, and the previous one back
                left = attrs.pop("session", MISSING)
                if previous is not MISSING:
                    attrs["session"] = previous
        except ApplicationHandlerStop as exc:  # a stop still saves, then goes on to PTB
            stop, result = exc, None
        except BaseException:
            await _closed(binding)
            raise
        finishing = binding.finish(left)
        if finishing is not None:
            await finishing
        if stop is not None:
            raise stop
        return result


async def _saved(binding: Binding) -> None:
    """Save ``binding``, if there is anything to save."""
    saving = binding.save()
    if saving is not None:
        await saving


async def _closed(binding: Binding) -> None:
    """Close ``binding``, if there is anything to close."""
    closing = binding.close()
    if closing is not None:
        await closing
