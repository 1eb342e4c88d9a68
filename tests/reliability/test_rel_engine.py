"""The row engine under races and failures (issue "Nothing lost", points 1, 5, 6, 7, 8, 9).

Each test checks every stored value at the end. Races use two ``Database`` objects, so two
connections, as two bot processes would; network failures go through the loopback
:class:`OutageProxy`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _bot import builder, message_update, process
from _proxy import OutageProxy
from _reliability import collect_errors, raw_execute, raw_rows
from sqlalchemy import Table, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from telegram.ext import MessageHandler, filters

from ptb_sessions import ConflictError, SQLAlchemyPersistence, StorageError
from ptb_sessions._schema import StoredRow
from ptb_sessions._store import Database, Write

TABLE: Table = StoredRow.__table__  # type: ignore[assignment]

SERVERS = ["postgresql", "mariadb"]


def proxied(url: str, proxy: OutageProxy) -> str:
    return (
        make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    )


@pytest.fixture
async def proxy(db_url: str) -> AsyncIterator[OutageProxy]:
    parsed = make_url(db_url)
    running = OutageProxy(parsed.host or "127.0.0.1", parsed.port or 0)
    try:
        yield running
    finally:
        running.close()


async def stored(url: str, namespace: str) -> dict[str, Any]:
    return {key: json.loads(data) for _, key, _, data in await raw_rows(url, namespace)}


def counting_app(persistence: SQLAlchemyPersistence[Any, Any, Any]) -> Any:
    app = builder().persistence(persistence).build()

    async def count(update: Any, context: Any) -> None:
        context.chat_data["n"] = context.chat_data.get("n", 0) + 1

    app.add_handler(MessageHandler(filters.TEXT, count))
    return app


# -- point 1: two writers create the same new row at the same moment ----------------------


async def _hold_table(url: str, backend: str, release: asyncio.Event) -> None:
    """Keep the table locked against both writers until ``release`` (PostgreSQL), so that
    both read "no row" before either inserts."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            if backend == "postgresql":
                await connection.execute(text("LOCK TABLE ptb_sessions_data IN EXCLUSIVE MODE"))
            await release.wait()
    finally:
        await engine.dispose()


@pytest.mark.parametrize("rounds", [12])
async def test_two_writers_creating_one_new_row_one_wins_one_conflicts(
    backend: str, fresh_db_url: str, rounds: int
) -> None:
    first, second = Database(fresh_db_url), Database(fresh_db_url)
    try:
        await first.ensure_schema()
        await second.ensure_schema()
        for round_ in range(rounds):
            key = f"new-{round_}"
            release = asyncio.Event()
            holder = asyncio.create_task(_hold_table(fresh_db_url, backend, release))
            await asyncio.sleep(0.2)  # the lock is taken (if not, the writers merely serialize)
            writes = [
                Write("chat_data", key, f'{{"by":{who}}}', expected_version=None) for who in (1, 2)
            ]
            racing = [
                asyncio.create_task(db.apply([write]))
                for db, write in zip((first, second), writes)
            ]
            await asyncio.sleep(0.2)
            release.set()
            await holder
            results = await asyncio.gather(*racing)
            winners = [i for i, errors in enumerate(results) if not errors]
            losers = [i for i, errors in enumerate(results) if errors]
            assert len(winners) == 1, (key, results)
            (error,) = results[losers[0]].values()
            assert isinstance(error, ConflictError)
            assert key in str(error)
            assert (await stored(fresh_db_url, "chat_data"))[key] == {"by": winners[0] + 1}
    finally:
        await first.dispose()
        await second.dispose()


async def test_two_session_writers_creating_one_key_one_conflicts(fresh_db_url: str) -> None:
    persistences = [SQLAlchemyPersistence[Any, Any, Any](fresh_db_url) for _ in range(2)]
    storages = [p.storage() for p in persistences]
    try:
        both_read = asyncio.Barrier(2)

        async def create(i: int) -> None:
            assert await storages[i].read("k") is None
            await both_read.wait()
            await storages[i].write("k", {"by": i})

        outcomes = await asyncio.gather(create(0), create(1), return_exceptions=True)
        assert sum(o is None for o in outcomes) == 1
        assert sum(isinstance(o, ConflictError) for o in outcomes) == 1
        winner = outcomes.index(None)
        assert await stored(fresh_db_url, "session") == {"k": {"by": winner}}
    finally:
        for persistence in persistences:
            await persistence.flush()


# -- point 5: a COMMIT whose reply is lost ------------------------------------------------


@pytest.mark.parametrize("backend", SERVERS)
async def test_a_lost_commit_reply_is_recognised_on_the_retry(
    db_url: str, proxy: OutageProxy
) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](
        proxied(db_url, proxy), update_interval=10**6
    )
    app = counting_app(persistence)
    errors = collect_errors(app)
    async with app:
        await process(app, message_update(1), message_update(2))
        await app.update_persistence()
        await process(app, message_update(1))  # chat 1: n = 2
        proxy.drop_reply_to(b"COMMIT")
        await app.update_persistence()  # committed, reply lost, retried: its own version
        assert proxy.dropped == 1
        await process(app, message_update(1))
        await app.update_persistence()
        assert errors == []
    assert await stored(db_url, "chat_data") == {"1": {"n": 3}, "2": {"n": 1}}


@pytest.mark.parametrize("backend", SERVERS)
async def test_a_kept_write_whose_commit_landed_is_no_conflict(
    db_url: str, proxy: OutageProxy
) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](
        proxied(db_url, proxy), update_interval=10**6
    )
    app = counting_app(persistence)
    errors = collect_errors(app)
    async with app:
        await process(app, message_update(1), message_update(2))
        await app.update_persistence()
        await process(app, message_update(1))  # chat 1: n = 2
        proxy.drop_reply_to(b"COMMIT", times=2)  # the first try and its retry
        with pytest.raises(StorageError):
            await persistence.update_chat_data(1, app.chat_data[1])  # committed; kept
        assert proxy.dropped == 2
        assert (await stored(db_url, "chat_data"))["1"] == {"n": 2}, "the commit went through"
        await process(app, message_update(1), message_update(2))  # chat 1: n = 3, chat 2: 2
        await app.update_persistence()  # the kept write is replaced by the newer one
        assert errors == []
    assert await stored(db_url, "chat_data") == {"1": {"n": 3}, "2": {"n": 2}}


@pytest.mark.parametrize("backend", SERVERS)
async def test_a_lost_reply_of_a_session_write_loses_nothing(
    db_url: str, proxy: OutageProxy
) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](proxied(db_url, proxy))
    storage = persistence.storage()
    try:
        await storage.read("k")
        await storage.write("k", {"n": 1})
        await storage.read("k")
        # One autocommitted statement, whose reply is lost; it is retried. (The marker is in
        # the statement's parameters: a prepared statement's text is sent only once.)
        proxy.drop_reply_to(b"SECOND")
        await storage.write("k", {"n": 2, "tag": "second"})
        assert await storage.read("k") == {"n": 2, "tag": "second"}
        proxy.drop_reply_to(b"THIRD", times=2)
        with pytest.raises(StorageError):
            await storage.write("k", {"n": 3, "tag": "third"})
        assert await storage.read("k") == {"n": 3, "tag": "third"}, "the write went through"
        await storage.write("k", {"n": 4})
        assert proxy.dropped == 3
        assert await stored(db_url, "session") == {"k": {"n": 4}}
    finally:
        await persistence.flush()


# -- point 6: dead pooled connections after a server restart ------------------------------


@pytest.mark.parametrize("backend", SERVERS)
async def test_no_update_fails_after_the_connections_were_dropped(
    db_url: str, proxy: OutageProxy
) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](
        proxied(db_url, proxy), lazy=True, update_interval=10**6
    )
    storage = persistence.storage()
    app = counting_app(persistence)
    errors = collect_errors(app)
    async with app:
        # several pooled connections, all idle
        await asyncio.gather(*(storage.write(f"s{i}", {"i": i}) for i in range(4)))
        await process(app, *(message_update(chat) for chat in range(1, 5)))
        await app.update_persistence()
        proxy.cut()  # the server went away: every pooled connection is dead ...
        proxy.restore()  # ... and it is back
        assert await asyncio.gather(*(storage.read(f"s{i}") for i in range(4))) == [
            {"i": i} for i in range(4)
        ]
        await process(app, *(message_update(chat) for chat in range(1, 7)))
        await app.update_persistence()
        assert errors == []
    assert await stored(db_url, "chat_data") == {
        "1": {"n": 2},
        "2": {"n": 2},
        "3": {"n": 2},
        "4": {"n": 2},
        "5": {"n": 1},
        "6": {"n": 1},
    }


# -- point 7: a server that accepts the connection but never answers ----------------------


@pytest.mark.parametrize("backend", SERVERS)
async def test_a_silent_server_gives_storage_error_within_the_deadline(
    db_url: str, proxy: OutageProxy
) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](
        proxied(db_url, proxy), lazy=True, update_interval=10**6, timeout=1
    )
    app = counting_app(persistence)
    errors = collect_errors(app)
    async with app:
        await process(app, message_update(1))
        await app.update_persistence()
        proxy.stall()
        # generous: the deadline is 1 s per call; the point is that it returns at all
        await asyncio.wait_for(process(app, message_update(2)), 60)
        assert [type(e) for e in errors] == [StorageError]
        assert "chat_data['2']" in str(errors[0]) or "chat_data[2]" in str(errors[0])
        assert "timeout" in str(errors[0])
        with pytest.raises(StorageError):
            await asyncio.wait_for(persistence.update_chat_data(1, {"n": 5}), 60)
        proxy.restore()
        await persistence.update_chat_data(1, {"n": 5})  # the kept write, on a new connection
    assert await stored(db_url, "chat_data") == {"1": {"n": 5}}


@pytest.mark.parametrize("backend", SERVERS)
async def test_one_locked_key_does_not_hold_back_other_keys(fresh_db_url: str) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url, timeout=2)
    storage = persistence.storage()
    blocker = create_async_engine(fresh_db_url, poolclass=NullPool)
    try:
        for key in ("slow", "fast"):
            await storage.read(key)
            await storage.write(key, {"n": 1})
            await storage.read(key)
        async with blocker.begin() as connection:
            await connection.execute(
                select(TABLE.c.version)
                .where(TABLE.c.namespace == "session", TABLE.c.key == "slow")
                .with_for_update()
            )
            slow = asyncio.create_task(storage.write("slow", {"n": 2}))
            await asyncio.sleep(0.1)
            await asyncio.wait_for(storage.write("fast", {"n": 2}), 60)
            assert not slow.done(), "the fast key finished while the slow one waits"
            with pytest.raises(StorageError, match="slow"):
                await asyncio.wait_for(slow, 60)
        assert await stored(fresh_db_url, "session") == {"slow": {"n": 1}, "fast": {"n": 2}}
    finally:
        await blocker.dispose()
        await persistence.flush()


# -- point 8: one row larger than the server accepts --------------------------------------


async def test_an_oversized_row_fails_for_its_key_only(fresh_db_url: str) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](
        fresh_db_url, max_value_size=None, update_interval=10**6
    )
    app = counting_app(persistence)
    errors = collect_errors(app)
    huge = "x" * (20 << 20)  # larger than MariaDB's default max_allowed_packet (16 MiB)
    async with app:
        await process(app, *(message_update(chat) for chat in range(1, 6)))
        app.chat_data[3]["blob"] = huge
        await app.update_persistence()
        after = await stored(fresh_db_url, "chat_data")
        for chat in (1, 2, 4, 5):
            assert after[str(chat)] == {"n": 1}
        if "3" in after:  # the server took it (PostgreSQL, SQLite)
            assert after["3"] == {"n": 1, "blob": huge}
            assert errors == []
        else:
            assert len(errors) == 1 and "chat_data['3']" in str(errors[0])
            del app.chat_data[3]["blob"]
            await process(app, message_update(3))
            await app.update_persistence()
    assert (await stored(fresh_db_url, "chat_data")).keys() == {"1", "2", "3", "4", "5"}


# -- point 9: a batch that fails for a reason other than a lock ---------------------------

_REJECT_KEY_13 = {
    "sqlite": [
        "CREATE TRIGGER reject13 BEFORE INSERT ON ptb_sessions_data WHEN NEW.key = '13' "
        "BEGIN SELECT RAISE(ABORT, 'row 13 rejected'); END"
    ],
    "postgresql": [
        "CREATE FUNCTION reject13() RETURNS trigger AS $$ BEGIN IF NEW.key = '13' THEN "
        "RAISE EXCEPTION 'row 13 rejected'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER reject13 BEFORE INSERT ON ptb_sessions_data FOR EACH ROW "
        "EXECUTE FUNCTION reject13()",
    ],
    "mariadb": [
        "CREATE TRIGGER reject13 BEFORE INSERT ON ptb_sessions_data FOR EACH ROW BEGIN "
        "IF NEW.`key` = '13' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'row 13 rejected'; "
        "END IF; END"
    ],
}
_DROP_REJECT = {
    "sqlite": ["DROP TRIGGER reject13"],
    "postgresql": ["DROP TRIGGER reject13 ON ptb_sessions_data"],
    "mariadb": ["DROP TRIGGER reject13"],
}


async def test_a_rejected_row_is_kept_retried_and_fails_alone(
    backend: str, fresh_db_url: str
) -> None:
    persistence = SQLAlchemyPersistence[Any, Any, Any](fresh_db_url, update_interval=10**6)
    app = counting_app(persistence)
    errors = collect_errors(app)
    async with app:
        await persistence.database.ensure_schema()
        for statement in _REJECT_KEY_13[backend]:
            await raw_execute(fresh_db_url, statement)
        await process(app, *(message_update(chat) for chat in range(10, 16)))
        await app.update_persistence()
        assert len(errors) == 1
        assert isinstance(errors[0], StorageError)
        assert "chat_data['13']" in str(errors[0]) and "rejected" in str(errors[0])
        assert (await stored(fresh_db_url, "chat_data")).keys() == {"10", "11", "12", "14", "15"}
        for statement in _DROP_REJECT[backend]:
            await raw_execute(fresh_db_url, statement)
    # the kept write of chat 13 is written at shutdown (flush)
    assert await stored(fresh_db_url, "chat_data") == {
        str(chat): {"n": 1} for chat in range(10, 16)
    }
