"""A lazy session: the database is only asked when a handler needs the session.

The bot sits in busy groups and only reacts to ``/note <text>`` (remember a note for the
chat, without reading the old one), ``/notes`` (list them) and ``/clear``. Every other message
passes the :class:`~ptb_sessions.SessionHandler` without a single read or write, because
``context.session`` is a :class:`~ptb_sessions.LazySession` that reads only when awaited.

Run it with ``TELEGRAM_BOT_TOKEN=123:ABC python examples/lazybot.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from telegram import Update
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from ptb_sessions import LazySession, SessionContext, SessionHandler, SQLAlchemyPersistence

Context = SessionContext[LazySession[list[str]]]


async def note(update: Update, context: Context) -> None:
    text = " ".join(context.args or [])
    if not text:
        await update.effective_message.reply_text("Usage: /note <text>")  # type: ignore[union-attr]
        return
    notes = await context.session  # read once: later awaits return the same list
    notes.append(text)
    await update.effective_message.reply_text(f"Noted ({len(notes)} notes).")  # type: ignore[union-attr]


async def notes(update: Update, context: Context) -> None:
    saved = await context.session
    text = "\n".join(f"• {n}" for n in saved) if saved else "No notes."
    await update.effective_message.reply_text(text)  # type: ignore[union-attr]


async def clear(update: Update, context: Context) -> None:
    context.session = None  # deletes without reading
    await update.effective_message.reply_text("Cleared.")  # type: ignore[union-attr]


async def chatter(update: Update, context: Context) -> None:
    """Every other message: the session is not touched, so nothing is read or written."""


def build_application(
    builder: ApplicationBuilder[Any, Any, Any, Any, Any, Any], storage: object | None = None
) -> Application[Any, Any, Any, Any, Any, Any]:
    """The bot, built from ``builder``, keeping its sessions in ``storage``."""
    application = builder.context_types(ContextTypes(context=SessionContext)).build()
    application.add_handler(
        SessionHandler(
            [
                CommandHandler("note", note),
                CommandHandler("notes", notes),
                CommandHandler("clear", clear),
                MessageHandler(filters.ALL, chatter),
            ],
            lazy=True,
            initial=list,
            storage=storage,
        )
    )
    return application


def main() -> None:
    token = os.environ.get("TELEGRAM_BOT_TOKEN")
    if not token:
        sys.exit("Set TELEGRAM_BOT_TOKEN to your bot's token.")
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        "sqlite:///lazybot.sqlite3"
    )
    builder = Application.builder().token(token).persistence(persistence)
    build_application(builder, persistence).run_polling(allowed_updates=Update.ALL_TYPES)


if __name__ == "__main__":
    main()
