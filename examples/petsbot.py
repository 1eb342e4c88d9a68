"""Data migrations: the pets example of grammY's session docs.

Version 0 of this bot stored pet names only: ``{"petNames": ["Rex"]}``. Now every pet is an
object with an optional birthday: ``{"pets": [{"name": "Rex", "birthday": None}]}``. The
migration in :data:`MIGRATIONS` upgrades old sessions when they are read, so the handlers only
ever see the new shape.

``/add <name>`` adds a pet, ``/birthday <name> <YYYY-MM-DD>`` sets its birthday, ``/pets``
lists them.

Run it with ``TELEGRAM_BOT_TOKEN=123:ABC python examples/petsbot.py``.
"""

from __future__ import annotations

import datetime as dtm
import os
import sys
from collections.abc import Callable
from typing import Any, TypedDict

from telegram import Update
from telegram.ext import Application, ApplicationBuilder, CommandHandler, ContextTypes

from ptb_sessions import SessionContext, SessionHandler, SQLAlchemyPersistence, by_user


class Pet(TypedDict):
    name: str
    birthday: str | None


class SessionData(TypedDict):
    pets: list[Pet]


def add_birthday_to_pets(old: dict[str, Any]) -> SessionData:
    """Version 1: pet names become pet objects with a birthday."""
    return {"pets": [{"name": name, "birthday": None} for name in old["petNames"]]}


MIGRATIONS: dict[float, Callable[[Any], Any]] = {1: add_birthday_to_pets}
Context = SessionContext[SessionData]


async def add(update: Update, context: Context) -> None:
    name = " ".join(context.args or [])
    if name:
        context.session["pets"].append({"name": name, "birthday": None})
    await update.effective_message.reply_text(f"You have {len(context.session['pets'])} pets.")  # type: ignore[union-attr]


async def birthday(update: Update, context: Context) -> None:
    try:
        name, day = context.args or []
        date = dtm.date.fromisoformat(day)
    except ValueError:
        await update.effective_message.reply_text("Usage: /birthday <name> <YYYY-MM-DD>")  # type: ignore[union-attr]
        return
    for pet in context.session["pets"]:
        if pet["name"] == name:
            pet["birthday"] = date.isoformat()
            await update.effective_message.reply_text(f"{name} was born on {date}.")  # type: ignore[union-attr]
            return
    await update.effective_message.reply_text(f"You have no pet called {name}.")  # type: ignore[union-attr]


async def pets(update: Update, context: Context) -> None:
    lines = [
        f"{pet['name']} (born {pet['birthday'] or 'unknown'})" for pet in context.session["pets"]
    ]
    await update.effective_message.reply_text("\n".join(lines) or "No pets yet.")  # type: ignore[union-attr]


def build_application(
    builder: ApplicationBuilder[Any, Any, Any, Any, Any, Any], storage: object | None = None
) -> Application[Any, Any, Any, Any, Any, Any]:
    """The bot, built from ``builder``, keeping its sessions in ``storage``."""
    application = builder.context_types(ContextTypes(context=SessionContext)).build()
    application.add_handler(
        SessionHandler(
            [
                CommandHandler("add", add),
                CommandHandler("birthday", birthday),
                CommandHandler("pets", pets),
            ],
            key=by_user,
            initial=lambda: {"pets": []},
            migrations=MIGRATIONS,
            storage=storage,
        )
    )
    return application


def main() -> None:
    token = os.environ.get("TELEGRAM_BOT_TOKEN")
    if not token:
        sys.exit("Set TELEGRAM_BOT_TOKEN to your bot's token.")
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        "sqlite:///petsbot.sqlite3"
    )
    builder = Application.builder().token(token).persistence(persistence)
    build_application(builder, persistence).run_polling(allowed_updates=Update.ALL_TYPES)


if __name__ == "__main__":
    main()
