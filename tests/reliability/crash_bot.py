"""A counter bot for the crash test, run as a subprocess and killed with SIGKILL.

``python crash_bot.py session URL CHATS``: a real PTB Application (offline) with a
``SessionHandler`` on ``SQLAlchemyPersistence(URL)``; it handles text updates from CHATS chats
one after the other, forever, and after each ``process_update`` returned (the session is saved
by then) prints ``done <chat> <count>``.

``python crash_bot.py persistence URL CHATS K``: ``SQLAlchemyPersistence(URL)`` alone, the count
in ``chat_data``; it prints ``done <chat> <count>`` after each update (nothing saved yet) and,
every K updates, prints ``persisting {"<chat>": <count>, ...}``, calls ``update_persistence`` and
then prints ``saved {...}`` with the same counts (or ``error ...`` if the run reported one).

Every line is flushed at once, so the parent knows what had completed when it kills.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from _bot import builder, message_update  # noqa: E402
from telegram import Update  # noqa: E402
from telegram.ext import CallbackContext, MessageHandler, filters  # noqa: E402

from ptb_sessions import SessionHandler, SQLAlchemyPersistence  # noqa: E402


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def run_sessions(url: str, chats: int) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url)
    seen: dict[int, int] = {}

    async def count(update: Update, context: Any) -> None:
        context.session["n"] += 1
        context.session["log"] = context.session.get("log", "") + "x"  # a growing value
        seen[update.effective_chat.id] = context.session["n"]  # type: ignore[union-attr]

    app = builder().build()
    app.add_handler(
        SessionHandler(
            [MessageHandler(filters.TEXT, count)],
            storage=persistence.storage(),
            initial=lambda: {"n": 0},
        )
    )

    async def on_error(update: object, context: CallbackContext[Any, Any, Any, Any]) -> None:
        say(f"error {context.error!r}")

    app.add_error_handler(on_error)
    async with app:
        say("ready")
        i = 0
        while True:
            chat = -(1 + i % chats)
            i += 1
            update = message_update(chat, "hi", bot=app.bot)
            seen.pop(chat, None)
            await app.process_update(update)
            if chat in seen:
                say(f"done {chat} {seen[chat]}")


async def run_persistence(url: str, chats: int, every: int) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        url, update_interval=10**6
    )

    async def count(update: Update, context: Any) -> None:
        context.chat_data["n"] = context.chat_data.get("n", 0) + 1
        context.chat_data["log"] = context.chat_data.get("log", "") + "x"

    app = builder().persistence(persistence).build()
    app.add_handler(MessageHandler(filters.TEXT, count))
    errors: list[BaseException] = []

    async def on_error(update: object, context: CallbackContext[Any, Any, Any, Any]) -> None:
        assert context.error is not None
        errors.append(context.error)
        say(f"error {context.error!r}")

    app.add_error_handler(on_error)
    async with app:
        say("ready")
        i = 0
        while True:
            chat = -(1 + i % chats)
            i += 1
            await app.process_update(message_update(chat, "hi", bot=app.bot))
            say(f"done {chat} {app.chat_data[chat]['n']}")
            if i % every == 0:
                snapshot = {c: data["n"] for c, data in app.chat_data.items() if "n" in data}
                say(f"persisting {json.dumps(snapshot)}")
                await app.update_persistence()
                for _ in range(5):  # PTB reports update_persistence errors in a task
                    await asyncio.sleep(0)
                if not errors:
                    say(f"saved {json.dumps(snapshot)}")


if __name__ == "__main__":
    mode, url, chats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "session":
        asyncio.run(run_sessions(url, chats))
    else:
        asyncio.run(run_persistence(url, chats, int(sys.argv[4])))
