"""``SessionHandler(lock="database")`` under ``concurrent_updates``: the updates that hold row
locks (each on a pooled connection of its own) never take the connections their own reads
and writes need."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _bot import builder, message_update
from telegram.ext import MessageHandler, filters

from ptb_sessions import SessionHandler, SQLAlchemyPersistence

CHATS = 40
ROUNDS = 3


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_many_concurrent_locked_updates_do_not_starve_the_pool(fresh_db_url: str) -> None:
    # A short deadline: an update waiting for a connection fails fast instead of hanging.
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url, timeout=5)
    storage = persistence.storage()
    errors: list[BaseException] = []

    async def count(update: Any, context: Any) -> None:
        context.session["n"] += 1

    async def collect(update: Any, context: Any) -> None:
        errors.append(context.error)

    app = builder().build()
    app.add_handler(
        SessionHandler(
            [MessageHandler(filters.TEXT, count)],
            storage=storage,
            initial=lambda: {"n": 0},
            lock="database",
        )
    )
    app.add_error_handler(collect)
    try:
        async with app:
            updates = [message_update(chat) for _ in range(ROUNDS) for chat in range(CHATS)]
            for update in updates:
                update.set_bot(app.bot)
                assert update.message is not None
                update.message.set_bot(app.bot)
            await asyncio.wait_for(
                asyncio.gather(*(app.process_update(update) for update in updates)), 120
            )
        assert errors == []
        assert {key: value async for key, value in storage.items()} == {
            str(chat): {"n": ROUNDS} for chat in range(CHATS)
        }
    finally:
        await persistence.flush()
