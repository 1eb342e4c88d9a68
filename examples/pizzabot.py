"""The pizza counter of grammY's session docs, on python-telegram-bot.

Counts the 🍕 in every chat's messages; ``/hunger`` tells the chat its count. The counts are kept
in an SQLite file next to the script and survive restarts.

Run it with ``TELEGRAM_BOT_TOKEN=123:ABC python examples/pizzabot.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TypedDict

from telegram import Update
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from ptb_sessions import SessionContext, SessionHandler, SQLAlchemyPersistence


class SessionData(TypedDict):
    """What the bot remembers per chat."""

    pizza_count: int


Context = SessionContext[SessionData]


def initial() -> SessionData:
    """The session of a chat the bot has not seen yet (a new object every time)."""
    return {"pizza_count": 0}


async def hunger(update: Update, context: Context) -> None:
    count = context.session["pizza_count"]
    await update.effective_message.reply_text(f"Your hunger level is {count}!")  # type: ignore[union-attr]


async def pizza(update: Update, context: Context) -> None:
    context.session["pizza_count"] += update.effective_message.text.count("🍕")  # type: ignore[union-attr]


def build_application(
    builder: ApplicationBuilder[Any, Any, Any, Any, Any, Any], storage: object | None = None
) -> Application[Any, Any, Any, Any, Any, Any]:
    """The bot, built from ``builder``, keeping its sessions in ``storage``."""
    application = builder.context_types(ContextTypes(context=SessionContext)).build()
    application.add_handler(
        SessionHandler(
            [CommandHandler("hunger", hunger), MessageHandler(filters.Regex("🍕"), pizza)],
            initial=initial,
            storage=storage,
        )
    )
    return application


def main() -> None:
    token = os.environ.get("TELEGRAM_BOT_TOKEN")
    if not token:
        sys.exit("Set TELEGRAM_BOT_TOKEN to your bot's token.")
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        "sqlite:///pizzabot.sqlite3"
    )
    builder = Application.builder().token(token).persistence(persistence)
    build_application(builder, persistence).run_polling(allowed_updates=Update.ALL_TYPES)


if __name__ == "__main__":
    main()
