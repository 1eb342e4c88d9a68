"""Scenario 5: rows edited by hand (or by a newer or broken bot) into something this bot cannot
read. Each fails for its own key only, with an error naming the namespace and the key; the other
keys load and work; the bad row is never overwritten.

Keys 1 and 7 are good; 2 holds invalid JSON, 3 an unknown codec in the codec column, 4 a JSON
object with an unknown type tag, 5 a data version newer than the latest migration, 6 NULL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import pytest
from _bot import builder, message_update, process
from _reliability import TABLE, collect_errors, counter_handler, raw_execute
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from telegram import Update
from telegram.ext import MessageHandler, filters

from ptb_sessions import MigrationError, SQLAlchemyPersistence, StorageError

MIGRATIONS: dict[float, Any] = {1: lambda value: value}
GOOD = (1, 7)
BAD: dict[int, dict[str, Any]] = {
    2: {"data": '{"n": oops'},
    3: {"codec": "msgpack"},
    4: {"data": '{"$t": "no-such-type", "v": 1}'},
    5: {"data_version": 99.0},
    6: {"data": None},
}
CHATS = range(1, 8)


async def corrupt(url: str, namespace: str) -> dict[str, tuple[Any, ...]]:
    """Make the rows of BAD hostile; return every row of ``namespace`` as stored then."""
    for key, values in BAD.items():
        await raw_execute(
            url,
            update(TABLE)
            .where(TABLE.c.namespace == namespace, TABLE.c.key == str(key))
            .values(**values),
        )
    return await snapshot(url, namespace)


async def snapshot(url: str, namespace: str) -> dict[str, tuple[Any, ...]]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                select(
                    TABLE.c.key, TABLE.c.codec, TABLE.c.data, TABLE.c.version, TABLE.c.data_version
                ).where(TABLE.c.namespace == namespace)
            )
            return {row[0]: tuple(row[1:]) for row in result}
    finally:
        await engine.dispose()


def names(error: BaseException, namespace: str, key: int) -> bool:
    """Whether the error's message names ``namespace[key]`` (the key quoted or not)."""
    return re.search(rf"{namespace}\[['\"]?{key}['\"]?\]", str(error)) is not None


def assert_errors_name_bad_keys_only(errors: list[BaseException], namespace: str) -> None:
    assert all(isinstance(e, StorageError | MigrationError) for e in errors), errors
    for key in BAD:
        assert any(names(e, namespace, key) for e in errors), (key, errors)
    for key in GOOD:
        assert not any(names(e, namespace, key) for e in errors), (key, errors)
    for error in errors:
        assert any(names(error, namespace, key) for key in BAD), error
    migration = [e for e in errors if names(e, namespace, 5)]
    assert all(isinstance(e, MigrationError) for e in migration), migration


async def wait_for_errors(errors: list[BaseException], count: int) -> None:
    for _ in range(400):  # PTB hands update_persistence errors to a task
        if len(errors) >= count:
            return
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
async def test_hostile_chat_data_rows_fail_for_their_key_only(
    fresh_db_url: str, lazy: bool, caplog: pytest.LogCaptureFixture
) -> None:
    seed: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        fresh_db_url, migrations=MIGRATIONS
    )
    await seed.get_chat_data()
    for chat in CHATS:
        await seed.update_chat_data(chat, {"n": chat})
    await seed.flush()
    before = await corrupt(fresh_db_url, "chat_data")

    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        fresh_db_url, lazy=lazy, migrations=MIGRATIONS, update_interval=10**6
    )
    app = builder().persistence(persistence).build()
    errors = collect_errors(app)
    ran: list[int] = []

    async def count(update: Update, context: Any) -> None:
        ran.append(update.effective_chat.id)  # type: ignore[union-attr]
        context.chat_data["n"] += 1

    app.add_handler(MessageHandler(filters.TEXT, count))
    caplog.set_level(logging.ERROR)
    async with app:
        if not lazy:
            # the good rows loaded at start; each bad one was logged, naming its key
            assert dict(app.chat_data) == {1: {"n": 1}, 7: {"n": 7}}
            logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            for key in BAD:
                assert any(f"chat_data[{key}]" in m for m in logged), (key, logged)
        await process(app, *(message_update(chat) for chat in CHATS))
        await app.update_persistence()
        await wait_for_errors(errors, len(BAD))
    assert sorted(ran) == list(GOOD)
    assert_errors_name_bad_keys_only(errors, "chat_data")
    after = await snapshot(fresh_db_url, "chat_data")
    for key in BAD:
        assert after[str(key)] == before[str(key)], "a bad row was overwritten"
    assert {k: json.loads(after[str(k)][1])["n"] for k in GOOD} == {1: 2, 7: 8}


@pytest.mark.parametrize("lazy", [False, True], ids=["strict", "lazy"])
async def test_hostile_session_rows_fail_for_their_key_only(fresh_db_url: str, lazy: bool) -> None:
    persistences: list[SQLAlchemyPersistence[Any, Any, Any]] = []

    def make_app() -> Any:
        # a new persistence each time: the rows are corrupted while the bot is stopped (a
        # running bot's session cache would still hold the rows as it wrote them)
        persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(fresh_db_url)
        persistences.append(persistence)
        app = builder().build()
        app.add_handler(counter_handler(persistence.storage(), lazy=lazy, migrations=MIGRATIONS))
        return app, collect_errors(app)

    try:
        app, errors = make_app()
        async with app:
            await process(app, *(message_update(chat) for chat in CHATS))
        assert errors == []
        await persistences.pop().flush()
        before = await corrupt(fresh_db_url, "session")
        app, errors = make_app()
        async with app:
            await process(app, *(message_update(chat) for chat in CHATS))
        assert len(errors) == len(BAD)
        assert_errors_name_bad_keys_only(errors, "session")
        after = await snapshot(fresh_db_url, "session")
        for key in BAD:
            assert after[str(key)] == before[str(key)], "a bad row was overwritten"
        assert {k: json.loads(after[str(k)][1])["n"] for k in GOOD} == {1: 2, 7: 2}
    finally:
        for persistence in persistences:
            await persistence.flush()
