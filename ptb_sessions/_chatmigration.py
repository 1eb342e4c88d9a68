"""Moving a group's data to its new supergroup id: :class:`ChatMigrationHandler` and
:meth:`SQLAlchemyPersistence.migrate_chat <ptb_sessions.SQLAlchemyPersistence.migrate_chat>`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from telegram import Update
from telegram.ext import Application, BaseHandler
from telegram.ext._utils.types import CCT

from ptb_sessions._sessionhandler import SessionHandler
from ptb_sessions._sqlalchemypersistence import SQLAlchemyPersistence

__all__ = ["ChatMigrationHandler", "session_prefixes"]

RT = TypeVar("RT")


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
        await self.persistence.migrate_chat(old, new, prefixes=prefixes)

    async def _migrate(self, update: Update, context: Any) -> None:  # pragma: no cover
        raise NotImplementedError  # handle_update does the work


def session_prefixes(application: Application[Any, Any, Any, Any, Any, Any]) -> set[str]:
    """The key prefixes of the application's :class:`~ptb_sessions.SessionHandler`\\ s and
    fragments (always including ``""``)."""
    prefixes = {""}
    stack: list[Any] = [h for group in application.handlers.values() for h in group]
    while stack:
        handler = stack.pop()
        if isinstance(handler, SessionHandler):
            prefixes.update(handler.key_prefixes)
        states = getattr(handler, "states", None)
        if isinstance(states, dict):  # ConversationHandler: SessionHandlers in its states
            for handlers in states.values():
                stack.extend(handlers)
    return prefixes
