"""Moving a group's data to its new supergroup id: :class:`ChatMigrationHandler` and
:meth:`SQLAlchemyPersistence.migrate_chat <ptb_sessions.SQLAlchemyPersistence.migrate_chat>`."""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from telegram import Update
from telegram.ext import Application, BaseHandler
from telegram.ext._utils.types import CCT

if TYPE_CHECKING:
    from ptb_sessions._sqlalchemypersistence import SQLAlchemyPersistence

__all__ = ["ChatMigrationHandler", "migrate_chat"]

_LOGGER = logging.getLogger(__name__)
RT = TypeVar("RT")


def _session_moves(
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


async def migrate_chat(
    persistence: SQLAlchemyPersistence[Any, Any, Any],
    old_chat_id: int,
    new_chat_id: int,
    *,
    prefixes: Iterable[str] = ("",),
) -> bool:
    """See :meth:`ptb_sessions.SQLAlchemyPersistence.migrate_chat`."""
    from ptb_sessions._sqlalchemypersistence import BUILTIN_NAMESPACES

    old, new = str(old_chat_id), str(new_chat_id)
    app = persistence.application
    chats = persistence._chats
    async with persistence._migration_lock:
        live: dict[int, Any] | None = app._chat_data if app is not None else None
        # The old chat's newest data goes to the database first, so the move takes all of it.
        if live is not None and chats.loaded.get(old_chat_id) is not None:
            held = live.get(old_chat_id)
            if held is not None and held is chats.loaded[old_chat_id]:
                await persistence._update(chats, old_chat_id, copy.deepcopy(held))
        database = persistence.database
        moves = [("chat_data", old, new)]
        for namespace in await database.namespaces():
            if namespace in BUILTIN_NAMESPACES or namespace.startswith("conversation:"):
                continue
            keys = await database.keys_containing(namespace, old)
            moves += _session_moves(namespace, keys, old, new, prefixes)
        done, skipped = await database.move_keys(moves)
        for namespace, old_key, new_key in skipped:
            _LOGGER.warning(
                "Chat migration %s -> %s: %s[%r] was not moved because %r already has data; "
                "the old data stays under the old key",
                old,
                new,
                namespace,
                old_key,
                new_key,
            )
        moved_chat_data = ("chat_data", old, new) in done
        chats.forget(old_chat_id)
        if live is not None:
            _move_in_memory(persistence, live, old_chat_id, new_chat_id, moved_chat_data)
        if done:
            _LOGGER.info("Chat migration %s -> %s moved %d rows", old, new, len(done))
        return bool(done)


def _move_in_memory(
    persistence: SQLAlchemyPersistence[Any, Any, Any],
    live: dict[int, Any],
    old_chat_id: int,
    new_chat_id: int,
    moved: bool,
) -> None:
    chats = persistence._chats
    held_old = live.get(old_chat_id)
    held_new = live.get(new_chat_id)
    if held_new:
        if moved:  # the new chat's memory was ahead of the database: read it again
            chats.stale.add(new_chat_id)
        return
    if moved:
        live.pop(old_chat_id, None)
        if held_new is not None and held_old:
            held_new.update(held_old)  # in place: a running handler may hold this object
        elif held_old is not None:
            live[new_chat_id] = held_old
        chats.forget(new_chat_id)
        chats.stale.add(new_chat_id)  # the next update of the new chat reads the moved row


class ChatMigrationHandler(BaseHandler[Update, CCT, None]):
    r"""Moves all data of a group to its new supergroup id when Telegram migrates it.

    Reacts to both service messages (``migrate_to_chat_id`` in the old group and
    ``migrate_from_chat_id`` in the new supergroup); either order, and duplicates, give the
    same result. PTB's chat_data and the session rows of every
    :class:`~ptb_sessions.SessionHandler` of the application that are keyed by the old chat
    (``by_chat``, ``by_user_and_chat``, ``by_chat_and_thread``, after the handler's
    ``prefix``) move in one transaction; conversation states do not. Existing data of the new
    chat is never overwritten.

    Add it in an early group, before the handlers that use the data::

        application.add_handler(ChatMigrationHandler(persistence), group=-1)

    Args:
        persistence: The application's :class:`~ptb_sessions.SQLAlchemyPersistence`.
        prefixes: Key prefixes of session rows to move besides those of the application's
            :class:`~ptb_sessions.SessionHandler`\ s (e.g. sessions of another process).
        block: Whether the application waits for the migration before the next handlers.
    """

    __slots__ = ("persistence", "prefixes")

    def __init__(
        self,
        persistence: SQLAlchemyPersistence[Any, Any, Any],
        *,
        prefixes: Iterable[str] = (),
        block: bool = True,
    ) -> None:
        super().__init__(self._migrate, block=block)
        self.persistence = persistence
        self.prefixes = tuple(prefixes)

    def check_update(self, update: object) -> tuple[int, int] | None:
        """The ``(old, new)`` chat ids if ``update`` is a migration service message."""
        if not isinstance(update, Update) or update.message is None:
            return None
        message = update.message
        if message.migrate_to_chat_id is not None:
            return message.chat.id, message.migrate_to_chat_id
        if message.migrate_from_chat_id is not None:
            return message.migrate_from_chat_id, message.chat.id
        return None

    async def handle_update(
        self,
        update: Update,
        application: Application[Any, CCT, Any, Any, Any, Any],
        check_result: object,
        context: CCT,
    ) -> None:
        """Moves the data; called by the application."""
        assert isinstance(check_result, tuple)
        if self.persistence.application is None:
            self.persistence.bind_application(application)
        old, new = check_result
        prefixes = session_prefixes(application).union(self.prefixes)
        await self.persistence.migrate_chat(old, new, prefixes=tuple(prefixes))

    async def _migrate(self, update: Update, context: Any) -> None:  # pragma: no cover
        raise NotImplementedError  # handle_update does the work


def session_prefixes(application: Application[Any, Any, Any, Any, Any, Any]) -> set[str]:
    """The key prefixes of the application's :class:`~ptb_sessions.SessionHandler`\\ s and
    fragments (always including ``""``)."""
    from ptb_sessions._sessionhandler import SessionHandler

    prefixes = {""}
    stack: list[Any] = [h for group in application.handlers.values() for h in group]
    while stack:
        handler = stack.pop()
        if isinstance(handler, SessionHandler):
            prefixes.update(spec.prefix for spec in handler._specs)
        states = getattr(handler, "states", None)
        if isinstance(states, dict):  # ConversationHandler: SessionHandlers in its states
            for handlers in states.values():
                stack.extend(handlers)
    return prefixes
