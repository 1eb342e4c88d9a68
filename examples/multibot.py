"""A multi session: per-chat statistics and per-user settings, stored separately.

``context.session.chat`` is shared by everyone in a chat (key
:func:`~ptb_sessions.by_chat`), ``context.session.user`` follows a user across chats (key
:func:`~ptb_sessions.by_user`). ``/lang de`` sets your language, ``/stats`` answers in it with
the chat's message count, ``/forget`` deletes your settings (only yours: the chat's count stays).

With an :class:`~ptb_sessions.SQLAlchemyPersistence` each fragment gets its own namespace;
the prefixes let the two fragments share any other storage too.

Run it with ``TELEGRAM_BOT_TOKEN=123:ABC python examples/multibot.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Protocol, TypedDict

from telegram import Update
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from ptb_sessions import Fragment, SessionContext, SessionHandler, SQLAlchemyPersistence, by_user

GREETINGS = {"en": "Messages in this chat: {}", "de": "Nachrichten in diesem Chat: {}"}


class ChatStats(TypedDict):
    messages: int


class UserSettings(TypedDict):
    language: str


class Fragments(Protocol):
    """``context.session``: one attribute per fragment."""

    chat: ChatStats
    user: UserSettings | None


Context = SessionContext[Fragments]


async def count(update: Update, context: Context) -> None:
    context.session.chat["messages"] += 1


async def lang(update: Update, context: Context) -> None:
    language = (context.args or ["en"])[0]
    if language not in GREETINGS:
        await update.effective_message.reply_text(f"I speak {', '.join(GREETINGS)}.")  # type: ignore[union-attr]
        return
    context.session.user = {"language": language}
    await update.effective_message.reply_text(f"Language: {language}")  # type: ignore[union-attr]


async def stats(update: Update, context: Context) -> None:
    settings = context.session.user or {"language": "en"}
    text = GREETINGS[settings["language"]].format(context.session.chat["messages"])
    await update.effective_message.reply_text(text)  # type: ignore[union-attr]


async def forget(update: Update, context: Context) -> None:
    context.session.user = None  # deletes this fragment only
    await update.effective_message.reply_text("Forgot your settings.")  # type: ignore[union-attr]


def build_application(
    builder: ApplicationBuilder[Any, Any, Any, Any, Any, Any], storage: object | None = None
) -> Application[Any, Any, Any, Any, Any, Any]:
    """The bot, built from ``builder``, keeping its sessions in ``storage``."""
    application = builder.context_types(ContextTypes(context=SessionContext)).build()
    application.add_handler(
        SessionHandler(
            [
                CommandHandler("lang", lang),
                CommandHandler("stats", stats),
                CommandHandler("forget", forget),
                MessageHandler(filters.TEXT & ~filters.COMMAND, count),
            ],
            storage=storage,
            fragments={
                "chat": Fragment(prefix="chat:", initial=lambda: {"messages": 0}),
                "user": Fragment(prefix="user:", key=by_user),
            },
        )
    )
    return application


def main() -> None:
    token = os.environ.get("TELEGRAM_BOT_TOKEN")
    if not token:
        sys.exit("Set TELEGRAM_BOT_TOKEN to your bot's token.")
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        "sqlite:///multibot.sqlite3"
    )
    builder = Application.builder().token(token).persistence(persistence)
    build_application(builder, persistence).run_polling(allowed_updates=Update.ALL_TYPES)


if __name__ == "__main__":
    main()
