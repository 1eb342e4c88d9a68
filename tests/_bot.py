"""A real PTB ``Application`` with no network: a ``BaseRequest`` that answers Bot API calls
in-process, and builders of real ``telegram.Update`` objects."""

from __future__ import annotations

import itertools
from typing import Any

from telegram import Bot, Chat, InlineQuery, Message, Update, User
from telegram.ext import Application, ApplicationBuilder
from telegram.request import RequestData

from ptb_sessions._demo import OfflineRequest as PackageOfflineRequest

TOKEN = "123456:ABCDEF-offline-test-token"
BOT_USER = {"id": 123456, "is_bot": True, "first_name": "Offline", "username": "offline_bot"}
_update_ids = itertools.count(1)
_message_ids = itertools.count(1)


class OfflineRequest(PackageOfflineRequest):
    """The demo's in-process ``BaseRequest`` (``getMe`` and ``sendMessage`` answered like the
    Bot API would), recording every call in :attr:`calls` as ``(method, params)``."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = None,
        write_timeout: Any = None,
        connect_timeout: Any = None,
        pool_timeout: Any = None,
    ) -> tuple[int, bytes]:
        params = dict(request_data.parameters) if request_data is not None else {}
        self.calls.append((url.rsplit("/", 1)[-1], params))
        return await super().do_request(url, method, request_data)

    def texts(self, chat_id: int | None = None) -> list[str]:
        """The texts sent with ``sendMessage``, optionally only those to ``chat_id``."""
        return [
            str(p.get("text"))
            for m, p in self.calls
            if m == "sendMessage" and (chat_id is None or int(p["chat_id"]) == chat_id)
        ]


def builder(request: OfflineRequest | None = None) -> ApplicationBuilder:  # type: ignore[type-arg]
    """An ``ApplicationBuilder`` that talks to an :class:`OfflineRequest` and has no updater."""
    request = request or OfflineRequest()
    return (
        ApplicationBuilder()
        .token(TOKEN)
        .request(request)
        .get_updates_request(request)
        .updater(None)
    )


def _chat(chat_id: int, chat_type: str | None = None, *, is_forum: bool = False) -> Chat:
    if chat_type is None:
        chat_type = Chat.PRIVATE if chat_id > 0 else Chat.SUPERGROUP
    return Chat(id=chat_id, type=chat_type, is_forum=is_forum or None)


def message_update(
    chat_id: int,
    text: str = "hi",
    *,
    user_id: int | None = None,
    chat_type: str | None = None,
    thread_id: int | None = None,
    bot: Bot | None = None,
    **message_kwargs: Any,
) -> Update:
    """An update with a text message (a command if ``text`` starts with ``/``) in ``chat_id``,
    from ``user_id`` (default: ``chat_id`` if positive, else 1). ``thread_id`` makes it a topic
    message in a forum."""
    if user_id is None:
        user_id = chat_id if chat_id > 0 else 1
    entities = None
    if text.startswith("/"):
        from telegram import MessageEntity

        entities = [MessageEntity(MessageEntity.BOT_COMMAND, 0, len(text.split()[0]))]
    message = Message(
        message_id=next(_message_ids),
        date=_now(),
        chat=_chat(chat_id, chat_type, is_forum=thread_id is not None),
        from_user=User(id=user_id, is_bot=False, first_name=f"user{user_id}"),
        text=text,
        entities=entities,
        message_thread_id=thread_id,
        is_topic_message=True if thread_id is not None else None,
        **message_kwargs,
    )
    update = Update(update_id=next(_update_ids), message=message)
    if bot is not None:
        update.set_bot(bot)
        message.set_bot(bot)
    return update


def inline_query_update(user_id: int, query: str = "q") -> Update:
    """An inline query: it has a user but no chat."""
    return Update(
        update_id=next(_update_ids),
        inline_query=InlineQuery(
            id=str(next(_message_ids)),
            from_user=User(id=user_id, is_bot=False, first_name=f"user{user_id}"),
            query=query,
            offset="",
        ),
    )


def migrate_updates(old_chat_id: int, new_chat_id: int, user_id: int = 1) -> tuple[Update, Update]:
    """The two service messages of a group -> supergroup migration: ``migrate_to_chat_id`` in
    the old group and ``migrate_from_chat_id`` in the new supergroup."""
    user = User(id=user_id, is_bot=False, first_name="admin")
    to_msg = Message(
        message_id=next(_message_ids),
        date=_now(),
        chat=Chat(id=old_chat_id, type=Chat.GROUP),
        from_user=user,
        migrate_to_chat_id=new_chat_id,
    )
    from_msg = Message(
        message_id=next(_message_ids),
        date=_now(),
        chat=Chat(id=new_chat_id, type=Chat.SUPERGROUP),
        from_user=user,
        migrate_from_chat_id=old_chat_id,
    )
    return (
        Update(update_id=next(_update_ids), message=to_msg),
        Update(update_id=next(_update_ids), message=from_msg),
    )


def _now() -> Any:
    import datetime as dtm

    return dtm.datetime.now(dtm.timezone.utc).replace(microsecond=0)


async def process(app: Application, *updates: Update) -> None:  # type: ignore[type-arg]
    """Feed ``updates`` to ``app.process_update`` one after the other, binding them to the bot."""
    for update in updates:
        update.set_bot(app.bot)
        if update.message is not None:
            update.message.set_bot(app.bot)
        await app.process_update(update)
