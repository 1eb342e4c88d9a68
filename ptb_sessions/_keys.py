"""Session key functions: ``(Update) -> str | None``.

A key function tells a :class:`~ptb_sessions.SessionHandler` which session an update belongs to.
:obj:`None` means the update has no session (e.g. an inline query has no chat); using
``context.session`` then raises :class:`~ptb_sessions.SessionKeyError`, whose message names the
key function by its ``__name__``.
"""

from __future__ import annotations

from telegram import Update

__all__ = ["by_chat", "by_chat_and_thread", "by_user", "by_user_and_chat"]


def by_chat(update: Update) -> str | None:
    """One session per chat: ``str(update.effective_chat.id)``, e.g. ``"-1001234"``.

    The default key. Every member of a group shares the group's session.

    Args:
        update (:class:`telegram.Update`): The update.

    Returns:
        :obj:`str` | :obj:`None`: The chat id, or :obj:`None` if the update has no chat (e.g.
        an inline query).
    """
    chat = update.effective_chat
    return None if chat is None else str(chat.id)


def by_user(update: Update) -> str | None:
    """One session per user, across all chats: ``str(update.effective_user.id)``.

    Args:
        update (:class:`telegram.Update`): The update.

    Returns:
        :obj:`str` | :obj:`None`: The user id, or :obj:`None` if the update has no user (e.g. a
        channel post).
    """
    user = update.effective_user
    return None if user is None else str(user.id)


def by_user_and_chat(update: Update) -> str | None:
    """One session per user in each chat: ``"<user id>/<chat id>"``, e.g. ``"42/-1001234"``.

    Args:
        update (:class:`telegram.Update`): The update.

    Returns:
        :obj:`str` | :obj:`None`: The key, or :obj:`None` if the update has no user or no chat.
    """
    user = update.effective_user
    chat = update.effective_chat
    if user is None or chat is None:
        return None
    return f"{user.id}/{chat.id}"


def by_chat_and_thread(update: Update) -> str | None:
    """One session per forum topic: ``"<chat id>/<message_thread_id>"`` for topic messages in
    forums (:attr:`telegram.Message.is_topic_message`), else ``"<chat id>"`` like
    :func:`by_chat`.

    Messages in a forum's *General* topic and replies in non-forum groups (which also carry a
    :attr:`~telegram.Message.message_thread_id`) share the chat's session.

    Args:
        update (:class:`telegram.Update`): The update.

    Returns:
        :obj:`str` | :obj:`None`: The key, or :obj:`None` if the update has no chat.
    """
    chat = update.effective_chat
    if chat is None:
        return None
    message = update.effective_message
    if message is not None and message.is_topic_message and message.message_thread_id is not None:
        return f"{chat.id}/{message.message_thread_id}"
    return str(chat.id)
