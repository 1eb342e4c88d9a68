"""The session key functions on real ``telegram.Update`` objects."""

from __future__ import annotations

import datetime as dtm

import pytest
from _bot import inline_query_update, message_update
from telegram import CallbackQuery, Chat, Message, Update, User

from ptb_sessions._keys import by_chat, by_chat_and_thread, by_user, by_user_and_chat

_DATE = dtm.datetime(2024, 1, 1, tzinfo=dtm.timezone.utc)


def channel_post_update(chat_id: int = -1001) -> Update:
    """A channel post: a chat, but no user."""
    chat = Chat(id=chat_id, type=Chat.CHANNEL)
    return Update(
        update_id=1,
        channel_post=Message(message_id=1, date=_DATE, chat=chat, sender_chat=chat, text="x"),
    )


def group_reply_update(chat_id: int, thread_id: int) -> Update:
    """A reply in a group that is not a forum: it has a message_thread_id but is no topic."""
    message = Message(
        message_id=2,
        date=_DATE,
        chat=Chat(id=chat_id, type=Chat.SUPERGROUP),
        from_user=User(id=7, is_bot=False, first_name="u"),
        text="reply",
        message_thread_id=thread_id,
    )
    return Update(update_id=2, message=message)


def callback_query_update(message: Message, user_id: int = 7) -> Update:
    return Update(
        update_id=3,
        callback_query=CallbackQuery(
            id="cq",
            from_user=User(id=user_id, is_bot=False, first_name="u"),
            chat_instance="ci",
            message=message,
            data="x",
        ),
    )


def test_by_chat() -> None:
    assert by_chat(message_update(42)) == "42"
    assert by_chat(message_update(-1001234, user_id=7)) == "-1001234"
    assert by_chat(channel_post_update(-1005)) == "-1005"
    assert by_chat(inline_query_update(7)) is None


def test_by_user() -> None:
    assert by_user(message_update(-1001234, user_id=7)) == "7"
    assert by_user(inline_query_update(99)) == "99"
    assert by_user(channel_post_update()) is None


def test_by_user_and_chat() -> None:
    assert by_user_and_chat(message_update(-1001234, user_id=7)) == "7/-1001234"
    assert by_user_and_chat(message_update(42)) == "42/42"
    assert by_user_and_chat(inline_query_update(7)) is None  # no chat
    assert by_user_and_chat(channel_post_update()) is None  # no user


def test_by_chat_and_thread_topic_message() -> None:
    update = message_update(-1001234, user_id=7, thread_id=55)
    assert update.effective_message is not None
    assert update.effective_message.is_topic_message
    assert by_chat_and_thread(update) == "-1001234/55"


def test_by_chat_and_thread_without_topic() -> None:
    # a forum's General topic and ordinary chats: no thread id
    assert by_chat_and_thread(message_update(-1001234, user_id=7)) == "-1001234"
    assert by_chat_and_thread(message_update(42)) == "42"
    # a reply in a non-forum group has a message_thread_id, but is not a topic message
    update = group_reply_update(-1009, 77)
    assert update.effective_message is not None
    assert update.effective_message.message_thread_id == 77
    assert by_chat_and_thread(update) == "-1009"


def test_by_chat_and_thread_callback_query_in_topic() -> None:
    topic_message = message_update(-1001234, user_id=7, thread_id=3).message
    assert topic_message is not None
    assert by_chat_and_thread(callback_query_update(topic_message)) == "-1001234/3"


def test_by_chat_and_thread_no_chat() -> None:
    assert by_chat_and_thread(inline_query_update(7)) is None


@pytest.mark.parametrize(
    ("function", "name"),
    [
        (by_chat, "by_chat"),
        (by_user, "by_user"),
        (by_user_and_chat, "by_user_and_chat"),
        (by_chat_and_thread, "by_chat_and_thread"),
    ],
)
def test_names_and_docs(function: object, name: str) -> None:
    assert getattr(function, "__name__", None) == name
    doc = getattr(function, "__doc__", None)
    assert doc
    assert "None" in doc
