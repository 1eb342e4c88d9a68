"""Group -> supergroup migrations: PTB's chat_data and session rows move, in either order of
the two service messages, idempotently, never over existing data."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from _bot import builder, message_update, migrate_updates, process
from telegram import Update
from telegram.ext import Application, ContextTypes, MessageHandler, filters

from ptb_sessions import SQLAlchemyPersistence
from ptb_sessions._chatmigration import ChatMigrationHandler

OLD, NEW, USER = -100, -1_000_000_000_100, 5

SESSIONS = {
    f"{OLD}": {"pizza_count": 3},  # by_chat
    f"{USER}/{OLD}": {"mine": 1},  # by_user_and_chat
    f"{OLD}/7": {"topic": True},  # by_chat_and_thread
    f"p:{OLD}": {"prefixed": True},  # a handler with prefix "p:"
    f"{USER}": {"user only": True},  # by_user: not the chat's, stays
    f"1{OLD}": {"other": True},  # a different chat id that merely contains the old one
}


async def prepare(url: str) -> None:
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(url)
    await persistence.get_chat_data()
    await persistence.update_chat_data(OLD, {"group": "data"})
    storage = persistence.storage("session")
    for key, value in SESSIONS.items():
        await storage.write(key, value)
    await persistence.flush()


def app_for(url: str, **kwargs: Any) -> tuple[Application, SQLAlchemyPersistence]:  # type: ignore[type-arg]
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(url, **kwargs)
    app = builder().persistence(persistence).build()
    app.add_handler(ChatMigrationHandler(persistence, prefixes=("p:",)), group=-1)

    async def peek(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        context.bot_data.setdefault("seen", []).append(dict(context.chat_data or {}))

    app.add_handler(MessageHandler(filters.TEXT, peek))
    return app, persistence


async def sessions_after(url: str) -> dict[str, Any]:
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(url)
    items = {key: value async for key, value in persistence.storage("session").items()}
    await persistence.flush()
    return items


EXPECTED_SESSIONS = {
    f"{NEW}": {"pizza_count": 3},
    f"{USER}/{NEW}": {"mine": 1},
    f"{NEW}/7": {"topic": True},
    f"p:{NEW}": {"prefixed": True},
    f"{USER}": {"user only": True},
    f"1{OLD}": {"other": True},
}


@pytest.mark.parametrize("order", ["to-then-from", "from-then-to", "new-chat-first"])
@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
async def test_migration_moves_everything_in_any_order(
    db_url: str, order: str, lazy: bool
) -> None:
    await prepare(db_url)
    app, _ = app_for(db_url, lazy=lazy)
    to_old, from_new = migrate_updates(OLD, NEW, user_id=USER)
    async with app:
        if order == "new-chat-first":
            await process(app, message_update(NEW, "hello", user_id=USER))
        updates = [to_old, from_new] if order != "from-then-to" else [from_new, to_old]
        await process(app, *updates)
        await process(app, *migrate_updates(OLD, NEW, user_id=USER))  # duplicates
        await process(app, message_update(NEW, "peek", user_id=USER))
        assert app.bot_data["seen"][-1] == {"group": "data"}
        assert app.chat_data.get(OLD, {}) == {}
        await app.update_persistence()
    check: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    chats = await check.get_chat_data()
    await check.flush()
    assert chats == {NEW: {"group": "data"}}
    assert await sessions_after(db_url) == EXPECTED_SESSIONS


async def test_repeat_changes_nothing(db_url: str) -> None:
    await prepare(db_url)
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    await persistence.get_chat_data()
    assert await persistence.migrate_chat(OLD, NEW, prefixes=("p:",)) is True
    assert await persistence.migrate_chat(OLD, NEW, prefixes=("p:",)) is False
    await persistence.flush()
    assert await sessions_after(db_url) == EXPECTED_SESSIONS


async def test_existing_data_in_the_new_chat_is_never_overwritten(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await prepare(db_url)
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    await persistence.get_chat_data()
    await persistence.update_chat_data(NEW, {"already": "here"})
    await persistence.flush()
    app, _ = app_for(db_url)
    with caplog.at_level(logging.WARNING):
        async with app:
            await process(app, *migrate_updates(OLD, NEW, user_id=USER))
            assert app.chat_data[NEW] == {"already": "here"}
            assert app.chat_data[OLD] == {"group": "data"}
    assert any("already has data" in r.getMessage() for r in caplog.records)
    check: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    chats = await check.get_chat_data()
    await check.flush()
    assert chats == {OLD: {"group": "data"}, NEW: {"already": "here"}}
    # The sessions moved: the new chat had none of its own.
    assert await sessions_after(db_url) == EXPECTED_SESSIONS


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
async def test_unsaved_data_of_the_new_chat_is_never_overwritten(
    db_url: str, lazy: bool, caplog: pytest.LogCaptureFixture
) -> None:
    await prepare(db_url)
    app, _ = app_for(db_url, lazy=lazy)

    async def remember(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        context.chat_data["early"] = update.effective_message.text  # type: ignore[index,union-attr]

    app.add_handler(MessageHandler(filters.TEXT, remember), group=1)
    with caplog.at_level(logging.WARNING):
        async with app:
            # the supergroup gets a message before the old group's service message
            await process(app, message_update(NEW, "first", user_id=USER))
            await process(app, *migrate_updates(OLD, NEW, user_id=USER))
            await process(app, message_update(NEW, "peek", user_id=USER))
            assert app.chat_data[NEW] == {"early": "peek"}
    assert any("already has data" in r.getMessage() for r in caplog.records)
    check: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    chats = await check.get_chat_data()
    await check.flush()
    assert chats == {OLD: {"group": "data"}, NEW: {"early": "peek"}}
