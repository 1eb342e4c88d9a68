"""SQLAlchemyPersistence on SQLite, PostgreSQL and MariaDB, driven by a real Application."""

from __future__ import annotations

import asyncio
import datetime as dtm
import decimal
import gc
import logging
import sqlite3
import uuid
from typing import Any

import pytest
from _bot import OfflineRequest, builder, message_update, process
from _proxy import OutageProxy
from _statements import StatementLog
from sqlalchemy import text, update
from sqlalchemy.engine import make_url
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.ext import (
    Application,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    filters,
)

from ptb_sessions import (
    SchemaError,
    SerializationError,
    SQLAlchemyPersistence,
    StorageError,
)
from ptb_sessions._alembic import head_revision
from ptb_sessions._schema import StoredRow
from ptb_sessions._store import Write

TABLE = StoredRow.__table__
RICH_VALUE = {
    "count": 3,
    1: "int key",
    "1": "str key that looks like a number",
    "tuple": (1, "a", (2.5, None)),
    "set": {1, 2, 3},
    "frozen": frozenset({"x"}),
    "when": dtm.datetime(2026, 11, 26, 12, 30, 1, 123456, tzinfo=dtm.timezone.utc),
    "day": dtm.date(2026, 1, 2),
    "decimal": decimal.Decimal("1.10"),
    "bytes": b"\x00\xff",
    "uuid": uuid.UUID(int=7),
    "nested": [{"a": [True, False, None]}],
}


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types, recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(
            same(a[k], b[k]) and type(k) is type(next(x for x in b if x == k)) for k in a
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def errors_of(app: Application) -> list[BaseException]:  # type: ignore[type-arg]
    errors: list[BaseException] = []

    async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        assert context.error is not None
        errors.append(context.error)

    app.add_error_handler(on_error)
    return errors


async def write_chats(url: str, chats: dict[int, dict[str, Any]]) -> None:
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(url)
    await persistence.get_chat_data()
    await asyncio.gather(*(persistence.update_chat_data(k, v) for k, v in chats.items()))
    await persistence.flush()


# -- 1. everything is back after a restart -------------------------------------------------

ASK, ANSWER = range(2)


def restart_app(url: str) -> tuple[Application, OfflineRequest]:  # type: ignore[type-arg]
    request = OfflineRequest()
    app = (
        builder(request)
        .persistence(SQLAlchemyPersistence(url))
        .arbitrary_callback_data(True)
        .build()
    )

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
        await update.effective_message.reply_text(  # type: ignore[union-attr]
            "pick",
            reply_markup=InlineKeyboardMarkup(
                [[InlineKeyboardButton("x", callback_data=("pick", 1))]]
            ),
        )
        return ASK

    async def answer(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
        context.user_data["answer"] = update.effective_message.text  # type: ignore[index,union-attr]
        return ConversationHandler.END

    async def remember(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        context.chat_data.update(RICH_VALUE)  # type: ignore[union-attr]
        context.user_data["tags"] = ("a", "b")  # type: ignore[index]
        context.bot_data["started"] = dtm.date(2026, 11, 26)

    app.add_handler(
        ConversationHandler(
            entry_points=[CommandHandler("start", start)],
            states={ASK: [MessageHandler(filters.TEXT & ~filters.COMMAND, answer)]},
            fallbacks=[],
            name="quiz",
            persistent=True,
        )
    )
    app.add_handler(CommandHandler("remember", remember), group=1)
    return app, request


async def test_everything_survives_a_restart(db_url: str) -> None:
    app, request = restart_app(db_url)
    async with app:
        await process(app, message_update(7, "/remember"), message_update(7, "/start"))
        keyboards_before = app.bot.callback_data_cache.persistence_data  # type: ignore[attr-defined]
        chat_before = dict(app.chat_data[7])
        user_before = dict(app.user_data[7])
        bot_before = dict(app.bot_data)
    assert keyboards_before[0], "the /start reply stored callback data"
    assert request.texts(7) == ["pick"]

    app2, _ = restart_app(db_url)
    async with app2:
        assert same(dict(app2.chat_data[7]), chat_before)
        assert same(dict(app2.user_data[7]), user_before)
        assert same(dict(app2.bot_data), bot_before)
        keyboards_after = app2.bot.callback_data_cache.persistence_data  # type: ignore[attr-defined]
        assert same(keyboards_after[0], keyboards_before[0])
        assert keyboards_after[1] == keyboards_before[1]
        conversation = app2.handlers[0][0]
        assert conversation._conversations == {(7, 7): ASK}
        # The conversation goes on where it stopped: the answer ends it.
        await process(app2, message_update(7, "forty-two"))
        assert app2.user_data[7]["answer"] == "forty-two"
    app3, _ = restart_app(db_url)
    async with app3:
        assert app3.handlers[0][0]._conversations == {}
        assert app3.user_data[7]["answer"] == "forty-two"


# -- 2. only changed rows, one transaction --------------------------------------------------


async def test_only_changed_rows_are_written_in_one_transaction(db_url: str) -> None:
    await write_chats(db_url, {chat: {"n": 0} for chat in range(1, 1001)})
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    app = builder().persistence(persistence).build()

    async def touch(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        chat_id = update.effective_chat.id  # type: ignore[union-attr]
        if chat_id % 100 == 0:
            context.chat_data["n"] += 1  # type: ignore[index]
        else:
            context.chat_data["n"] += 0  # type: ignore[index]

    app.add_handler(MessageHandler(filters.ALL, touch))
    async with app:
        await process(app, *(message_update(chat) for chat in range(1, 1001)))
        log = StatementLog(persistence.database)
        await app.update_persistence()
    assert log.rows_written() == 10
    assert log.commits == 1
    check: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    stored = await check.get_chat_data()
    await check.flush()
    assert {chat for chat, data in stored.items() if data["n"] == 1} == set(range(100, 1001, 100))


# -- 3. a value that cannot be encoded --------------------------------------------------------


class Cart:
    """Deep-copyable, but not something JSON can hold."""


async def test_unencodable_value_fails_for_its_chat_only(db_url: str) -> None:
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    app = builder().persistence(persistence).build()
    errors = errors_of(app)

    async def store(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        chat_id = update.effective_chat.id  # type: ignore[union-attr]
        context.chat_data["n"] = chat_id  # type: ignore[index]
        if chat_id == 42:
            context.chat_data["lock"] = Cart()  # type: ignore[index]

    app.add_handler(MessageHandler(filters.ALL, store))
    async with app:
        await process(app, *(message_update(chat) for chat in (41, 42, 43)))
        await app.update_persistence()
        await asyncio.sleep(0.05)  # PTB hands errors of update_persistence to a task
    serialization = [e for e in errors if isinstance(e, SerializationError)]
    assert len(serialization) == 1
    assert "chat_data[42]['lock']" in str(serialization[0])
    assert "Cart" in str(serialization[0])
    check: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    stored = await check.get_chat_data()
    await check.flush()
    assert stored == {41: {"n": 41}, 43: {"n": 43}}


# -- 4. the database goes away and comes back ------------------------------------------------


class Outage:
    """Makes the database unreachable and reachable again: a TCP proxy cut for servers, an
    exclusive lock held by another connection for SQLite. The bot's persistence gets a short
    deadline (:attr:`TIMEOUT`), so that a locked SQLite file fails soon."""

    TIMEOUT = 1.0

    def __init__(self, url: str) -> None:
        self.url = url
        self.proxy: OutageProxy | None = None
        self.lock: sqlite3.Connection | None = None
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            self.bot_url = url
        else:
            self.proxy = OutageProxy(parsed.host or "127.0.0.1", parsed.port or 0)
            self.bot_url = parsed.set(host="127.0.0.1", port=self.proxy.port).render_as_string(
                hide_password=False
            )

    def cut(self) -> None:
        if self.proxy is not None:
            self.proxy.cut()
        else:
            self.lock = sqlite3.connect(make_url(self.url).database or "", isolation_level=None)
            self.lock.execute("BEGIN EXCLUSIVE")

    def restore(self) -> None:
        if self.proxy is not None:
            self.proxy.restore()
        elif self.lock is not None:
            self.lock.execute("COMMIT")
            self.lock.close()

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.close()


async def test_database_outage_keeps_writes_until_it_is_back(db_url: str) -> None:
    outage = Outage(db_url)
    try:
        persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(
            outage.bot_url, timeout=Outage.TIMEOUT
        )
        app = builder().persistence(persistence).build()
        errors = errors_of(app)

        async def count(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            context.chat_data["n"] = context.chat_data.get("n", 0) + 1  # type: ignore[union-attr]

        app.add_handler(MessageHandler(filters.ALL, count))
        async with app:
            await process(app, message_update(1), message_update(2))
            await app.update_persistence()
            outage.cut()
            await process(app, message_update(1), message_update(3))
            await app.update_persistence()
            await asyncio.sleep(0.05)
            assert any(isinstance(e, StorageError) for e in errors), errors
            assert "failed on" in str(next(e for e in errors if isinstance(e, StorageError)))
            # The bot keeps running: chat 1's update is handled while the database is away.
            await process(app, message_update(1))
            assert app.chat_data[1]["n"] == 3
            outage.restore()
            await app.update_persistence()
        check: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
        stored = await check.get_chat_data()
        await check.flush()
        assert stored == {1: {"n": 3}, 2: {"n": 1}, 3: {"n": 1}}
    finally:
        outage.close()


# -- 5. a row edited by hand into invalid JSON ------------------------------------------------


async def corrupt_chat_row(persistence: SQLAlchemyPersistence, key: str) -> None:
    """Make the stored chat_data row of ``key`` invalid JSON."""
    async with persistence.database.connect("corrupting") as connection:
        await connection.execute(
            update(TABLE)
            .where(TABLE.c.namespace == "chat_data", TABLE.c.key == key)
            .values(data='{"n": oops')
        )


async def test_undecodable_row_fails_for_its_key_only(db_url: str) -> None:
    await write_chats(db_url, {1: {"n": 1}, 2: {"n": 2}})
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    await corrupt_chat_row(persistence, "2")
    app = builder().persistence(persistence).build()
    errors = errors_of(app)

    async def count(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        context.chat_data["n"] = context.chat_data.get("n", 0) + 1  # type: ignore[union-attr]

    app.add_handler(MessageHandler(filters.ALL, count), group=1)
    async with app:
        assert app.chat_data[1] == {"n": 1}
        assert 2 not in app.chat_data
        await process(app, message_update(1), message_update(2))
        await app.update_persistence()
        await asyncio.sleep(0.05)
    messages = [str(e) for e in errors if isinstance(e, StorageError)]
    assert any("chat_data['2']" in m and "cannot be decoded" in m for m in messages), messages
    check: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    record = await check.database.get("chat_data", "2")
    assert record is not None and record.data == '{"n": oops', "the bad row was not overwritten"
    stored = await check.get_chat_data()
    await check.flush()
    assert stored == {1: {"n": 2}}


@pytest.mark.parametrize("collector", [True, False], ids=["gc-enabled", "gc-disabled"])
async def test_loading_at_start_pauses_the_garbage_collector_and_leaves_it_as_it_was(
    db_url: str, collector: bool
) -> None:
    """The cyclic collector would walk the growing heap again and again while every row is
    read; it is paused for the load, also past a row that fails, and left as it was."""
    await write_chats(db_url, {1: {"n": 1}, 2: {"n": 2}, 3: {"n": 3}})
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    await corrupt_chat_row(persistence, "2")
    collecting: list[bool] = []

    class Watched(dict[Any, Any]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            collecting.append(gc.isenabled())

    app = builder().persistence(persistence).context_types(ContextTypes(chat_data=Watched)).build()
    enabled_before = gc.isenabled()
    if not collector:
        gc.disable()
    try:
        async with app:
            assert collecting == [False, False], "chats 1 and 3 were loaded with it paused"
            assert gc.isenabled() is collector
            assert app.chat_data[1] == {"n": 1} and app.chat_data[3] == {"n": 3}
            assert 2 not in app.chat_data
    finally:
        if enabled_before:
            gc.enable()
        else:
            gc.disable()


# -- 6. an unmigrated database and passwords -------------------------------------------------


async def test_unmigrated_database_raises_schema_error(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = with_password(db_url)
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(url, auto_upgrade=False)
    with pytest.raises(SchemaError) as info:
        await persistence.get_chat_data()
    message = str(info.value)
    assert "none (empty database)" in message and head_revision() in message
    assert "ptb-sessions --url" in message and "db upgrade" in message
    assert "s3cret" not in message and "s3cret" not in repr(persistence)
    assert all("s3cret" not in record.getMessage() for record in caplog.records)
    await persistence.flush()
    # The database was left untouched: still no table.
    fresh: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url, auto_upgrade=False)
    with pytest.raises(SchemaError):
        await fresh.get_chat_data()
    await fresh.flush()


def with_password(url: str) -> str:
    """The URL with a password that the server ignores (PostgreSQL's trust auth) or a user that
    has it (MariaDB); SQLite ignores it."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "mysql":
        return parsed.set(username="ptbs_test", password="s3cret").render_as_string(
            hide_password=False
        )
    if parsed.get_backend_name() == "postgresql":
        return parsed.set(password="s3cret").render_as_string(hide_password=False)
    return url


@pytest.fixture(autouse=True)
async def _mariadb_password_user(backend: str, db_url: str) -> None:
    if backend != "mariadb":
        return
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(db_url)
    async with engine.begin() as connection:
        await connection.execute(
            text("CREATE USER IF NOT EXISTS 'ptbs_test'@'%' IDENTIFIED BY 's3cret'")
        )
        await connection.execute(
            text("CREATE USER IF NOT EXISTS 'ptbs_test'@'localhost' IDENTIFIED BY 's3cret'")
        )
        database = make_url(db_url).database
        await connection.execute(text(f"GRANT ALL ON `{database}`.* TO 'ptbs_test'@'%'"))
        await connection.execute(text(f"GRANT ALL ON `{database}`.* TO 'ptbs_test'@'localhost'"))
    await engine.dispose()


async def test_password_never_shown_when_the_server_is_down() -> None:
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(
        "postgresql://bot:s3cret@127.0.0.1:1/nothing"
    )
    with pytest.raises(StorageError) as info:
        await persistence.get_chat_data()
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    assert "s3cret" not in repr(persistence)
    await persistence.flush()


# -- 7. unreadable and malformed conversation and callback rows --------------------------------


async def put_rows(url: str, *writes: Write) -> None:
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(url)
    try:
        await persistence.get_chat_data()  # creates the schema
        assert await persistence.database.apply(writes) == {}
    finally:
        await persistence.flush()


async def stored_record(url: str, namespace: str, key: str) -> Any:
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(url)
    try:
        return await persistence.database.get(namespace, key)
    finally:
        await persistence.flush()


async def test_an_unreadable_conversation_row_is_never_overwritten(db_url: str) -> None:
    app, _ = restart_app(db_url)
    async with app:
        await process(app, message_update(7, "/start"))
    corrupter: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    async with corrupter.database.connect("corrupting") as connection:
        await connection.execute(
            update(TABLE).where(TABLE.c.namespace == "conversation:quiz").values(data="{")
        )
    await corrupter.flush()
    before = await stored_record(db_url, "conversation:quiz", "[7,7]")
    app2, _ = restart_app(db_url)
    errors = errors_of(app2)
    async with app2:
        assert app2.handlers[0][0]._conversations == {}
        await process(app2, message_update(7, "/start"))  # starts it again, in memory
        await app2.update_persistence()
        await asyncio.sleep(0.05)
    assert any("conversation:quiz['[7,7]']" in str(e) for e in errors), errors
    assert all(isinstance(e, StorageError) for e in errors), errors
    after = await stored_record(db_url, "conversation:quiz", "[7,7]")
    assert after == before and after.data == "{"


async def test_malformed_conversation_rows_are_skipped_naming_their_key(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await put_rows(
        db_url,
        Write("conversation:quiz", "[1,1]", "0", expected_version=None),  # good: ASK
        Write("conversation:quiz", "5", "0", expected_version=None),  # a key that is no list
        Write("conversation:quiz", '[2,{"a":1}]', "0", expected_version=None),  # no id
        Write("conversation:quiz", "[3,3]", '{"a":[1]}', expected_version=None),  # unhashable
    )
    app, _ = restart_app(db_url)
    with caplog.at_level(logging.ERROR):
        async with app:
            assert app.handlers[0][0]._conversations == {(1, 1): ASK}
            await app.update_persistence()
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    for key in ("'5'", """'[2,{"a":1}]'""", "'[3,3]'"):
        assert any(f"conversation:quiz[{key}]" in m for m in logged), (key, logged)
    assert (await stored_record(db_url, "conversation:quiz", "5")).data == "0"
    assert (await stored_record(db_url, "conversation:quiz", "[3,3]")).data == '{"a":[1]}'


@pytest.mark.parametrize("data", ["[1,2,3]", '{"a":1}', "[[1],{}]", '[[["k",1.5,{}]],[]]'])
async def test_callback_data_of_the_wrong_shape_names_the_command_to_inspect_it(
    db_url: str, data: str
) -> None:
    await put_rows(db_url, Write("callback_data", "callback_data", data, expected_version=None))
    app, _ = restart_app(db_url)
    with pytest.raises(StorageError) as info:
        await app.initialize()
    message = str(info.value)
    assert "callback_data['callback_data']" in message, message
    assert "ptb-sessions show callback_data" in message, message
    await app.persistence.flush()  # type: ignore[union-attr]
    assert (await stored_record(db_url, "callback_data", "callback_data")).data == data


async def test_bot_data_changed_by_another_process_is_read_again_after_the_conflict(
    db_url: str,
) -> None:
    first: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    second: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    apps = [builder().persistence(p).build() for p in (first, second)]
    errors = [errors_of(app) for app in apps]

    async def count(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        context.bot_data["n"] = context.bot_data.get("n", 0) + 1

    for app in apps:
        app.add_handler(MessageHandler(filters.ALL, count))
    async with apps[0], apps[1]:
        await process(apps[0], message_update(1))
        await apps[0].update_persistence()
        await process(apps[1], message_update(2))  # started before it saw the first's write
        await apps[1].update_persistence()
        await asyncio.sleep(0.05)
        assert errors[0] == [] and len(errors[1]) == 1, errors
        assert "bot_data['bot']" in str(errors[1][0])
        await process(apps[1], message_update(2))  # reads bot_data again, then counts
        assert apps[1].bot_data == {"n": 2}
        await apps[1].update_persistence()
        await asyncio.sleep(0.05)
    assert len(errors[1]) == 1, errors
    check: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    assert await check.get_bot_data() == {"n": 2}
    await check.flush()
