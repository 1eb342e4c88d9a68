"""Timers that survive a restart: PTB's ``timerbot.py`` with its jobs stored in the database.

``/set 30`` sets a timer for 30 seconds in this chat, ``/unset`` cancels it. The timer is a
JobQueue job like in PTB's timer bot, but the persistence is built with ``store_jobs=True``:
stop the bot after ``/set 30``, start it again, and the "Beep!" still comes (at once, if the
timer fell due while the bot was down).

The callback ``alarm`` is a top-level async function of this module, so it is stored by
reference (``__main__:alarm`` when the file is run as a script); its seconds travel as the
job's ``data`` and the chat as its ``chat_id``.

Run it with ``TELEGRAM_BOT_TOKEN=123:ABC python examples/reminderbot.py``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from telegram import Update
from telegram.ext import Application, ApplicationBuilder, CommandHandler, ContextTypes

from ptb_sessions import SQLAlchemyPersistence


async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    await update.effective_message.reply_text("Hi! Use /set <seconds> to set a timer")  # type: ignore[union-attr]


async def alarm(context: ContextTypes.DEFAULT_TYPE) -> None:
    """Send the alarm message."""
    job = context.job
    assert job is not None and job.chat_id is not None
    await context.bot.send_message(job.chat_id, text=f"Beep! {job.data} seconds are over!")


def remove_job_if_exists(name: str, context: ContextTypes.DEFAULT_TYPE) -> bool:
    """Remove the job with the given name; whether one was removed."""
    assert context.job_queue is not None
    current_jobs = context.job_queue.get_jobs_by_name(name)
    for job in current_jobs:
        job.schedule_removal()
    return bool(current_jobs)


async def set_timer(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Add a job to the queue: it is stored, and survives a restart."""
    message = update.effective_message
    assert message is not None and context.job_queue is not None
    chat_id = message.chat_id
    try:
        due = float(context.args[0])  # type: ignore[index]
    except (IndexError, ValueError):
        await message.reply_text("Usage: /set <seconds>")
        return
    if due < 0:
        await message.reply_text("Sorry we can not go back to future!")
        return
    job_removed = remove_job_if_exists(str(chat_id), context)
    context.job_queue.run_once(alarm, due, chat_id=chat_id, name=str(chat_id), data=due)
    text = "Timer successfully set!"
    if job_removed:
        text += " Old one was removed."
    await message.reply_text(text)


async def unset(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Remove the job if the user changed their mind."""
    message = update.effective_message
    assert message is not None
    job_removed = remove_job_if_exists(str(message.chat_id), context)
    text = "Timer successfully cancelled!" if job_removed else "You have no active timer."
    await message.reply_text(text)


def build_application(
    builder: ApplicationBuilder[Any, Any, Any, Any, Any, Any], url: str
) -> Application[Any, Any, Any, Any, Any, Any]:
    """The bot, built from ``builder``, with its data and jobs in the database at ``url``."""
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url, store_jobs=True)
    application = builder.persistence(persistence).build()
    application.add_handler(CommandHandler(["start", "help"], start))
    application.add_handler(CommandHandler("set", set_timer))
    application.add_handler(CommandHandler("unset", unset))
    return application


def main() -> None:
    token = os.environ.get("TELEGRAM_BOT_TOKEN")
    if not token:
        sys.exit("Set TELEGRAM_BOT_TOKEN to your bot's token.")
    builder = Application.builder().token(token)
    application = build_application(builder, "sqlite:///reminderbot.sqlite3")
    application.run_polling(allowed_updates=Update.ALL_TYPES)


if __name__ == "__main__":
    main()
