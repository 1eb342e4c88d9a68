"""Group commit (issue "Fast sessions"): the session reads and writes of updates in flight at
the same moment go to the database together, and every guarantee of a single write holds."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from _bot import builder, message_update, process
from _proxy import OutageProxy
from _statements import StatementLog
from sqlalchemy import Table, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from telegram.ext import MessageHandler, TypeHandler, filters

from ptb_sessions import (
    ConflictError,
    SessionHandler,
    SQLAlchemyPersistence,
    SQLAlchemyStorage,
    StorageError,
)
from ptb_sessions._groupcommit import DEFAULT_CACHE_SIZE, GroupCommit
from ptb_sessions._schema import StoredRow
from ptb_sessions._store import Write

TABLE: Table = StoredRow.__table__  # type: ignore[assignment]

CHATS = 40


async def stored_sessions(url: str) -> dict[str, Any]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                select(TABLE.c.key, TABLE.c.data).where(TABLE.c.namespace == "session")
            )
            return {key: json.loads(data) for key, data in rows}
    finally:
        await engine.dispose()


async def test_concurrent_updates_share_reads_and_commits(fresh_db_url: str) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url)
    storage = persistence.storage()
    gate = asyncio.Event()
    handled = 0
    all_handled = asyncio.Event()

    async def count(update: Any, context: Any) -> None:
        await gate.wait()  # every update has read its session before any writes
        context.session["n"] += 1

    async def done(update: Any, context: Any) -> None:
        nonlocal handled
        handled += 1
        if handled == 2 * CHATS:
            all_handled.set()

    app = builder().concurrent_updates(2 * CHATS).build()
    app.add_handler(
        SessionHandler(
            [MessageHandler(filters.TEXT, count)], storage=storage, initial=lambda: {"n": 0}
        )
    )
    app.add_handler(TypeHandler(object, done), group=1)
    async with app:
        await app.start()
        await storage.read("warm-up")  # the schema exists before the counted run
        log = StatementLog(persistence.database)
        for chat in range(1, CHATS + 1):
            for _ in range(2):
                update = message_update(chat)
                update.set_bot(app.bot)
                assert update.message is not None
                update.message.set_bot(app.bot)
                app.update_queue.put_nowait(update)
        await asyncio.sleep(0.5)  # the first update of each chat has read its session
        gate.set()
        await asyncio.wait_for(all_handled.wait(), 120)
        await app.stop()
    await persistence.flush()
    assert await stored_sessions(fresh_db_url) == {
        str(chat): {"n": 2} for chat in range(1, CHATS + 1)
    }
    session_statements = log.mentioning("session")
    # 4 * CHATS single-row statements without group commit (a read and a write per update)
    assert len(session_statements) < 2 * CHATS, len(session_statements)


async def test_one_conflict_or_bad_row_in_a_batch_fails_only_its_writer(
    fresh_db_url: str,
) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url)
    database = persistence.database
    try:
        await database.apply(
            [Write("session", k, '{"v":0}', expected_version=None) for k in "abc"]
        )
        versions = {k: (await database.get("session", k)).version for k in "abc"}  # type: ignore[union-attr]
        writes = [
            Write("session", "a", '{"v":1}', expected_version=versions["a"]),
            Write("session", "b", '{"v":1}', expected_version=versions["b"] + 1),  # stale
            Write("session", "c", '{"v":1}', expected_version=versions["c"]),
            Write("session", "new", '{"v":1}', expected_version=None),
        ]
        outcomes = await asyncio.gather(
            *(database.write_one(write) for write in writes), return_exceptions=True
        )
        assert outcomes[0] is None and outcomes[2] is None and outcomes[3] is None
        assert isinstance(outcomes[1], ConflictError) and "'b'" in str(outcomes[1])
        assert await stored_sessions(fresh_db_url) == {
            "a": {"v": 1},
            "b": {"v": 0},
            "c": {"v": 1},
            "new": {"v": 1},
        }
        if fresh_db_url.startswith("sqlite"):
            return  # SQLite stores any length; the servers reject the codec name below
        # a row the database rejects (too long a codec name) fails for its writer only
        bad = Write("session", "a", '{"v":2}', codec="x" * 300, expected_version=writes[0].version)
        good = Write("session", "c", '{"v":2}', expected_version=writes[2].version)
        outcomes = await asyncio.gather(
            database.write_one(bad), database.write_one(good), return_exceptions=True
        )
        assert isinstance(outcomes[0], StorageError) and outcomes[1] is None
        assert (await stored_sessions(fresh_db_url))["c"] == {"v": 2}
        assert (await stored_sessions(fresh_db_url))["a"] == {"v": 1}
    finally:
        await persistence.flush()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_a_locked_row_in_a_batch_holds_back_no_other_key(fresh_db_url: str) -> None:
    # A deadline far longer than the wait below: the other keys must not wait for it.
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url, timeout=120)
    storage = persistence.storage()
    blocker = create_async_engine(fresh_db_url, poolclass=NullPool)
    keys = ["slow", "fast1", "fast2"]
    try:
        for key in keys:
            await storage.read(key)
            await storage.write(key, {"n": 1})
        await asyncio.gather(*(storage.read(key) for key in keys))
        async with blocker.connect() as connection:
            transaction = await connection.begin()
            await connection.execute(
                select(TABLE.c.version)
                .where(TABLE.c.namespace == "session", TABLE.c.key == "slow")
                .with_for_update()
            )
            writes = {key: asyncio.ensure_future(storage.write(key, {"n": 2})) for key in keys}
            await asyncio.wait_for(asyncio.gather(writes["fast1"], writes["fast2"]), 30)
            assert not writes["slow"].done(), "the locked key finished while locked"
            await transaction.rollback()
        await asyncio.wait_for(writes["slow"], 30)
        assert await stored_sessions(fresh_db_url) == {key: {"n": 2} for key in keys}
    finally:
        await blocker.dispose()
        await persistence.flush()


# -- the per-process session cache --------------------------------------------------------


def counting_session_app(storage: Any, errors: list[BaseException], **options: Any) -> Any:
    app = builder().build()

    async def count(update: Any, context: Any) -> None:
        context.session["n"] += 1

    async def collect(update: Any, context: Any) -> None:
        errors.append(context.error)

    app.add_handler(
        SessionHandler(
            [MessageHandler(filters.TEXT, count)],
            storage=storage,
            initial=lambda: {"n": 0},
            **options,
        )
    )
    app.add_error_handler(collect)
    return app


def selects(log: StatementLog) -> list[str]:
    return [sql for sql, _, _ in log.statements if sql.lstrip().upper().startswith("SELECT")]


async def test_a_second_update_of_a_key_reads_nothing(fresh_db_url: str) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url)
    errors: list[BaseException] = []
    app = counting_session_app(persistence.storage(), errors)
    async with app:
        await process(app, message_update(1))
        log = StatementLog(persistence.database)
        await process(app, message_update(1), message_update(1))
    await persistence.flush()
    assert errors == []
    assert selects(log) == []
    assert log.rows_written() == 2
    assert await stored_sessions(fresh_db_url) == {"1": {"n": 3}}


async def test_a_write_by_another_process_is_a_conflict_then_reloads(fresh_db_url: str) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url)
    other = SQLAlchemyStorage(fresh_db_url)  # another process: its own database objects
    errors: list[BaseException] = []
    app = counting_session_app(persistence.storage(), errors)
    try:
        async with app:
            await process(app, message_update(1))
            assert await other.read("1") == {"n": 1}
            await other.write("1", {"n": 10})
            await process(app, message_update(1))  # based on the cached {"n": 1}
            assert [type(error) for error in errors] == [ConflictError]
            assert await stored_sessions(fresh_db_url) == {"1": {"n": 10}}
            await process(app, message_update(1))  # read again
        assert await stored_sessions(fresh_db_url) == {"1": {"n": 11}}
    finally:
        await other.close()
        await persistence.flush()


async def test_lock_database_reads_every_update_from_the_database(fresh_db_url: str) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url)
    other = SQLAlchemyStorage(fresh_db_url)
    errors: list[BaseException] = []
    app = counting_session_app(persistence.storage(), errors, lock="database")
    try:
        async with app:
            await process(app, message_update(1))
            assert await other.read("1") == {"n": 1}
            await other.write("1", {"n": 10})
            await process(app, message_update(1))
            assert len(GroupCommit.of(persistence.database)) == 0  # the cache is off for it
        assert errors == []
        assert await stored_sessions(fresh_db_url) == {"1": {"n": 11}}
    finally:
        await other.close()
        await persistence.flush()


async def test_the_cache_is_on_by_default_and_session_cache_sets_its_size(
    fresh_db_url: str,
) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url)
    uncached = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url, session_cache=0)
    storage = SQLAlchemyStorage(fresh_db_url, session_cache=3)
    try:
        assert GroupCommit.of(persistence.database).cache_size == DEFAULT_CACHE_SIZE
        assert GroupCommit.of(storage.database).cache_size == 3
        sessions = uncached.storage()
        assert await sessions.read("k") is None
        await sessions.write("k", {"n": 1})
        log = StatementLog(uncached.database)
        assert await sessions.read("k") == {"n": 1}
        assert len(selects(log)) == 1  # read from the database: nothing was kept
        with pytest.raises(ValueError, match="session_cache must be 0 or more rows, not -1"):
            SQLAlchemyPersistence(fresh_db_url, session_cache=-1)
    finally:
        await storage.close()
        await uncached.flush()
        await persistence.flush()


async def test_the_cache_keeps_at_most_cache_size_rows(fresh_db_url: str) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url)
    group = GroupCommit.of(persistence.database)
    group.cache_size = 2
    storage = persistence.storage()
    try:
        for key in "abc":
            await storage.read(key)
            await storage.write(key, {"k": key})
        log = StatementLog(persistence.database)
        assert [await storage.read(key) for key in "bc"] == [{"k": "b"}, {"k": "c"}]
        assert selects(log) == []
        assert await storage.read("a") == {"k": "a"}  # the least recently used left
        assert len(selects(log)) == 1
    finally:
        await persistence.flush()


async def test_a_single_read_or_write_on_a_server_is_one_round_trip(fresh_db_url: str) -> None:
    parsed = make_url(fresh_db_url)
    if parsed.get_backend_name() == "sqlite":
        pytest.skip("SQLite is a file on this machine: there are no round trips to count")
    proxy = OutageProxy(parsed.host or "127.0.0.1", parsed.port or 0)
    url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    storage = SQLAlchemyStorage(url, session_cache=0)  # every read goes to the server
    try:
        for value in ({"n": 0}, {"n": 1}):  # the schema, a pooled connection, its statements
            await storage.read("k")
            await storage.write("k", value)
            await storage.database.get_many("session", ["k", "other"])
        before = proxy.requests
        assert await storage.read("k") == {"n": 1}
        await storage.write("k", {"n": 2})
        assert proxy.requests - before == 2  # no ROLLBACK when the connection is returned
        before = proxy.requests
        found = await storage.database.get_many("session", ["k", "other"])
        assert list(found) == ["k"]
        assert proxy.requests - before == 1  # no BEGIN, COMMIT nor ROLLBACK around the read
    finally:
        await storage.close()
        proxy.close()


async def test_a_write_queued_behind_another_of_its_key_gets_its_own_outcome(
    fresh_db_url: str,
) -> None:
    """Two writes of one key queued in the same batch window go one after the other; the
    second gets the result of its own write, not the first one's error or cancellation."""
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url)
    database = persistence.database
    group = GroupCommit.of(database)
    try:
        await database.apply([Write("session", "k", '{"v":0}', expected_version=None)])
        stored = await database.get("session", "k")
        assert stored is not None
        for ending in ("conflict", "cancelled"):
            # a write of another key is in flight, so the next ones are queued
            in_flight = asyncio.ensure_future(
                group.write(Write("session", "other", '{"v":0}', expected_version=None))
            )
            await asyncio.sleep(0)
            stale = Write("session", "k", '{"v":"stale"}', expected_version=stored.version + 1)
            first = asyncio.ensure_future(group.write(stale))
            await asyncio.sleep(0)
            second = asyncio.ensure_future(
                group.write(Write("session", "k", f'{{"v":"{ending}"}}'))  # no version check
            )
            await asyncio.sleep(0)
            if ending == "cancelled":
                first.cancel()
            outcomes = await asyncio.gather(in_flight, first, second, return_exceptions=True)
            expected_first = ConflictError if ending == "conflict" else asyncio.CancelledError
            assert isinstance(outcomes[1], expected_first), outcomes
            assert outcomes[0] is None and outcomes[2] is None, outcomes
            assert (await stored_sessions(fresh_db_url))["k"] == {"v": ending}
            await database.apply([Write("session", "other", None)])
            stored = await database.get("session", "k")
            assert stored is not None
    finally:
        await persistence.flush()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_a_batch_of_changes_is_one_statement_committed_by_itself(fresh_db_url: str) -> None:
    """The changes of a batch at the versions they were read go to the server as one statement
    that commits by itself: one round trip, no BEGIN, version read nor COMMIT."""
    parsed = make_url(fresh_db_url)
    proxy = OutageProxy(parsed.host or "127.0.0.1", parsed.port or 0)
    url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    persistence = SQLAlchemyPersistence[Any, Any, Any](url)
    database = persistence.database
    keys = [str(i) for i in range(20)]
    try:
        for round_ in range(3):  # the schema, pooled connections, prepared statements
            stored = await database.get_many("session", keys)
            writes = [
                Write(
                    "session",
                    key,
                    json.dumps({"n": round_}),
                    expected_version=stored[key].version if key in stored else None,
                )
                for key in keys
            ]
            before = proxy.requests
            assert await database.apply_batch(writes) == {}
        assert proxy.requests - before == 1
        assert await stored_sessions(fresh_db_url) == {key: {"n": 2} for key in keys}
    finally:
        await persistence.flush()
        proxy.close()


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
async def test_a_batch_with_a_locked_row_fails_at_once_and_writes_nothing_else(
    fresh_db_url: str,
) -> None:
    # A deadline far longer than the wait below: the batch must fail, not wait for the lock.
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url, timeout=120)
    database = persistence.database
    blocker = create_async_engine(fresh_db_url, poolclass=NullPool)
    keys = ["locked", "free1", "free2"]
    try:
        await database.apply([Write("session", k, '{"n":1}', expected_version=None) for k in keys])
        stored = await database.get_many("session", keys)
        async with blocker.connect() as connection:
            transaction = await connection.begin()
            await connection.execute(
                select(TABLE.c.version)
                .where(TABLE.c.namespace == "session", TABLE.c.key == "locked")
                .with_for_update()
            )
            writes = [
                Write("session", k, '{"n":2}', expected_version=stored[k].version) for k in keys
            ]
            with pytest.raises(StorageError):
                await asyncio.wait_for(database.apply_batch(writes), 30)
            await transaction.rollback()
        assert await stored_sessions(fresh_db_url) == {key: {"n": 1} for key in keys}
    finally:
        await blocker.dispose()
        await persistence.flush()
