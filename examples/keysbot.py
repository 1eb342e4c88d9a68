"""Session keys: one counter per user (across all chats) and one per user in each chat.

Every text message counts for its sender twice: in the per-user session (key
:func:`~ptb_sessions.by_user`) and in the per-user-in-this-chat session (key
:func:`~ptb_sessions.by_user_and_chat`). ``/me`` shows the first, ``/here`` the second. Both
sessions share one storage, told apart by their prefixes.

Run it with ``TELEGRAM_BOT_TOKEN=123:ABC python examples/keysbot.py``.
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

from ptb_sessions import (
    SessionContext,
    SessionHandler,
    SQLAlchemyPersistence,
    by_user,
    by_user_and_chat,
)

Context = SessionContext[dict[str, int]]
TEXT = filters.TEXT & ~filters.COMMAND


def new_counter() -> dict[str, int]:
    return {"messages": 0}


async def count(update: Update, context: Context) -> None:
    context.session["messages"] += 1


async def me(update: Update, context: Context) -> None:
    messages = context.session["messages"]
    await update.effective_message.reply_text(f"You wrote {messages} messages in all chats.")  # type: ignore[union-attr]


async def here(update: Update, context: Context) -> None:
    messages = context.session["messages"]
    await update.effective_message.reply_text(f"You wrote {messages} messages in this chat.")  # type: ignore[union-attr]


def build_application(
    builder: ApplicationBuilder[Any, Any, Any, Any, Any, Any], storage: object | None = None
) -> Application[Any, Any, Any, Any, Any, Any]:
    """The bot, built from ``builder``, keeping its sessions in ``storage``."""
    application = builder.context_types(ContextTypes(context=SessionContext)).build()
    # one handler per group: a text message is counted by both sessions
    application.add_handler(
        SessionHandler(
            [MessageHandler(TEXT, count), CommandHandler("me", me)],
            key=by_user,
            prefix="user:",
            initial=new_counter,
            storage=storage,
        ),
        group=0,
    )
    application.add_handler(
        SessionHandler(
            [MessageHandler(TEXT, count), CommandHandler("here", here)],
            key=by_user_and_chat,
            prefix="member:",
            initial=new_counter,
            storage=storage,
        ),
        group=1,
    )
    return application


def main() -> None:
    token = os.environ.get("TELEGRAM_BOT_TOKEN")
    if not token:
        sys.exit("Set TELEGRAM_BOT_TOKEN to your bot's token.")
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        "sqlite:///keysbot.sqlite3"
    )
    builder = Application.builder().token(token).persistence(persistence)
    build_application(builder, persistence).run_polling(allowed_updates=Update.ALL_TYPES)


if __name__ == "__main__":
    main()
