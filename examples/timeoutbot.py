"""Session timeouts: a shopping list that forgets itself after 30 minutes without use.

``/add <item>`` puts an item on the chat's list, ``/list`` shows it. A list that was neither
changed nor looked at for :data:`TTL` expires: the next update starts from an empty list again.
Every use restarts the period (the ttl is idle time).

Run it with ``TELEGRAM_BOT_TOKEN=123:ABC python examples/timeoutbot.py``.
"""

from __future__ import annotations

import datetime as dtm
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from telegram import Update
from telegram.ext import Application, ApplicationBuilder, CommandHandler, ContextTypes

from ptb_sessions import SessionContext, SessionHandler, SQLAlchemyPersistence

TTL = dtm.timedelta(minutes=30)
Context = SessionContext[list[str]]


async def add(update: Update, context: Context) -> None:
    item = " ".join(context.args or [])
    if item:
        context.session.append(item)
    await update.effective_message.reply_text(f"{len(context.session)} items on the list.")  # type: ignore[union-attr]


async def show(update: Update, context: Context) -> None:
    text = ", ".join(context.session) if context.session else "The list is empty."
    await update.effective_message.reply_text(text)  # type: ignore[union-attr]


def build_application(
    builder: ApplicationBuilder[Any, Any, Any, Any, Any, Any],
    storage: object | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> Application[Any, Any, Any, Any, Any, Any]:
    """The bot, built from ``builder``, keeping its sessions in ``storage``; ``clock`` tells
    the time (tests pass a fake one)."""
    application = builder.context_types(ContextTypes(context=SessionContext)).build()
    application.add_handler(
        SessionHandler(
            [CommandHandler("add", add), CommandHandler("list", show)],
            initial=list,
            ttl=TTL,
            clock=clock,
            storage=storage,
        )
    )
    return application


def main() -> None:
    token = os.environ.get("TELEGRAM_BOT_TOKEN")
    if not token:
        sys.exit("Set TELEGRAM_BOT_TOKEN to your bot's token.")
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        "sqlite:///timeoutbot.sqlite3"
    )
    builder = Application.builder().token(token).persistence(persistence)
    build_application(builder, persistence).run_polling(allowed_updates=Update.ALL_TYPES)


if __name__ == "__main__":
    main()
