"""One batch of writes, as :meth:`Database.apply` decides it: the writes whose statement checks
the version by itself (a change at the version read, a new row) and those decided by the
stored versions, in any mix, with every stored row checked at the end."""

from __future__ import annotations

import contextlib
import unicodedata
from typing import Any

import pytest
from _statements import StatementLog

from ptb_sessions import ConflictError
from ptb_sessions._store import ANY_VERSION, Database, Write


async def stored(database: Database, namespace: str) -> dict[str, tuple[str | None, int]]:
    return {key: (record.data, record.version) async for key, record in database.scan(namespace)}


async def test_every_kind_of_write_in_one_batch(fresh_db_url: str) -> None:
    database = Database(fresh_db_url)
    other = Database(fresh_db_url)  # another process
    try:
        first = [Write("chat_data", key, f'"{key}0"', expected_version=None) for key in "abcde"]
        assert await database.apply([*first, Write("user_data", "a", '"ua0"')]) == {}
        version = {write.key: write.version for write in first}
        moved = Write("chat_data", "b", '"b-other"', expected_version=version["b"])
        taken = Write("chat_data", "x", '"x-other"', expected_version=None)
        assert await other.apply([moved, taken]) == {}
        lost = Write("chat_data", "c", '"c1"', expected_version=version["c"])
        assert await database.apply([lost]) == {}  # its reply lost: written again, replaced
        retry = Write("chat_data", "c", '"c2"', expected_version=version["c"]).replacing(lost)

        batch = [
            Write("chat_data", "a", '"a1"', expected_version=version["a"]),  # applies
            Write("chat_data", "b", '"b1"', expected_version=version["b"]),  # conflict
            retry,  # the row is at its own earlier version: applies
            Write("chat_data", "d", None, expected_version=version["d"]),  # deleted
            Write("chat_data", "e", '"e1"'),  # no check
            Write("chat_data", "x", '"x1"', expected_version=None),  # created meanwhile
            Write("chat_data", "y", '"y1"', expected_version=None),  # new
            Write("user_data", "y", '"uy1"', expected_version=None),  # new, same key
            Write("user_data", "a", '"ua1"', expected_version=None),  # exists: conflict
        ]
        errors = await database.apply(batch)
        assert set(errors) == {("chat_data", "b"), ("chat_data", "x"), ("user_data", "a")}
        assert all(isinstance(error, ConflictError) for error in errors.values())

        chats = await stored(database, "chat_data")
        assert {key: data for key, (data, _) in chats.items()} == {
            "a": '"a1"',
            "b": '"b-other"',
            "c": '"c2"',
            "e": '"e1"',
            "x": '"x-other"',
            "y": '"y1"',
        }
        written = {write.key: write.version for write in batch if write.namespace == "chat_data"}
        assert {key: chats[key][1] for key in "acey"} == {key: written[key] for key in "acey"}
        users = await stored(database, "user_data")
        assert {key: data for key, (data, _) in users.items()} == {"a": '"ua0"', "y": '"uy1"'}

        again = await database.apply(batch)  # every applied write is recognised as done
        assert set(again) <= {("chat_data", "b"), ("chat_data", "x"), ("user_data", "a")}
        assert await stored(database, "chat_data") == chats
    finally:
        await database.dispose()
        await other.dispose()


async def test_a_batch_of_changes_reads_no_versions_when_all_match(
    backend: str, fresh_db_url: str
) -> None:
    if backend == "mariadb":
        pytest.skip("MariaDB's driver runs an UPDATE executemany row by row: versions are read")
    database = Database(fresh_db_url)
    try:
        new = [Write("chat_data", str(i), f"{i}", expected_version=None) for i in range(50)]
        assert await database.apply(new) == {}
        changed = [
            Write("chat_data", write.key, f"{write.data}0", expected_version=write.version)
            for write in new
        ]
        log = StatementLog(database)
        assert await database.apply(changed) == {}
        assert not [
            sql for sql, _, _ in log.statements if sql.lstrip().upper().startswith("SELECT")
        ]
        assert log.rows_written() == 50
        rows = await stored(database, "chat_data")
        assert rows == {write.key: (write.data, write.version) for write in changed}
    finally:
        await database.dispose()


async def test_writes_without_a_check_still_apply(fresh_db_url: str) -> None:
    database = Database(fresh_db_url)
    try:
        blind: list[Any] = [Write("bot_data", "", "1", expected_version=ANY_VERSION)]
        assert await database.apply(blind) == {}
        assert await database.apply([Write("bot_data", "", "2")]) == {}
        assert {key: data for key, (data, _) in (await stored(database, "bot_data")).items()} == {
            "": "2"
        }
    finally:
        await database.dispose()


def test_rows_are_chunked_by_the_size_of_their_data() -> None:
    from ptb_sessions._dialects import _chunks_of_size

    writes = [Write("chat_data", str(i), "x" * size) for i, size in enumerate((5, 5, 20, 1, 1, 1))]
    chunks = [[len(w.data or "") for w in chunk] for chunk in _chunks_of_size(writes, 10)]
    assert chunks == [[5, 5], [20], [1, 1, 1]]


#: Keys that a case- or space-insensitive collation, or Unicode normalization, would take for
#: one another.
LOOKALIKE_KEYS = [
    "a",
    "A",
    "a ",
    " a",
    "é",
    unicodedata.normalize("NFD", "é"),
    "ß",
    "ss",
    "ı",
    "i",
]


async def test_lookalike_keys_stay_apart_in_batches_decided_by_stored_versions(
    fresh_db_url: str,
) -> None:
    """New rows, changes at the version read (one of them a conflict) and writes without a
    check, each kind as one batch: the batch statements bind every key exactly as it is,
    and the stored versions they read are matched to the right keys."""
    database = Database(fresh_db_url)
    other = Database(fresh_db_url)  # another process
    try:
        new = [
            Write("chat_data", key, f'"{i}"', expected_version=None)
            for i, key in enumerate(LOOKALIKE_KEYS)
        ]
        assert await database.apply(new) == {}
        changed = [
            Write("chat_data", w.key, f'"{i}-1"', expected_version=w.version)
            for i, w in enumerate(new)
        ]
        assert await database.apply(changed) == {}
        moved = Write("chat_data", "A", '"other"', expected_version=changed[1].version)
        assert await other.apply([moved]) == {}

        late = [
            Write("chat_data", w.key, f'"{i}-2"', expected_version=w.version)
            for i, w in enumerate(changed)
        ]
        errors = await database.apply(late)
        assert set(errors) == {("chat_data", "A")}
        assert isinstance(errors[("chat_data", "A")], ConflictError)
        expected = {w.key: (w.data, w.version) for w in late if w.key != "A"}
        assert await stored(database, "chat_data") == {**expected, "A": ('"other"', moved.version)}

        blind = [Write("chat_data", key, f'"{i}-3"') for i, key in enumerate(LOOKALIKE_KEYS)]
        assert await database.apply(blind) == {}
        assert await stored(database, "chat_data") == {w.key: (w.data, w.version) for w in blind}
    finally:
        await database.dispose()
        await other.dispose()


async def test_a_change_without_an_expiry_clears_a_stored_one(fresh_db_url: str) -> None:
    """ttl turned off: a batch of changes at the version read, some of whose rows still have
    an expiry, stores every row without one (else the purge would delete them later)."""
    database = Database(fresh_db_url)
    try:
        expires = database.clock() + 3600
        new = [
            Write("chat_data", str(i), f'"{i}"', expected_version=None, expires_at=expires)
            for i in range(3)
        ] + [Write("chat_data", str(i), f'"{i}"', expected_version=None) for i in range(3, 6)]
        assert await database.apply(new) == {}
        changed = [
            Write("chat_data", w.key, f'"{w.key}-1"', expected_version=w.version) for w in new
        ]
        assert await database.apply(changed) == {}
        rows = {key: record async for key, record in database.scan("chat_data")}
        assert {key: (r.data, r.version, r.expires_at) for key, r in rows.items()} == {
            w.key: (w.data, w.version, None) for w in changed
        }
        assert await database.purge_expired(now=expires + 1) == 0
    finally:
        await database.dispose()


async def test_a_single_change_without_an_expiry_clears_a_stored_one(fresh_db_url: str) -> None:
    """A session's write (one row, ttl turned off) to a row that still has an expiry: the
    value is stored and the expiry goes, even where the statement of a write without an
    expiry applies only to rows without one (SQLite)."""
    database = Database(fresh_db_url)
    try:
        first = Write(
            "session", "k", '"1"', expected_version=None, expires_at=database.clock() + 3600
        )
        await database.write_one(first)
        change = Write("session", "k", '"2"', expected_version=first.version)
        await database.write_one(change)
        record = await database.get("session", "k")
        assert record is not None
        assert (record.data, record.version, record.expires_at) == ('"2"', change.version, None)
        stale = Write("session", "k", '"3"', expected_version=first.version)
        with pytest.raises(ConflictError):
            await database.write_one(stale)
        assert await stored(database, "session") == {"k": ('"2"', change.version)}
    finally:
        await database.dispose()


async def test_scan_returns_every_row_in_key_order_and_may_stop_early(fresh_db_url: str) -> None:
    """Rows come in batches, the next fetched while the caller takes this one's; a caller that
    stops early leaves nothing running (the batch fetched ahead is cancelled)."""
    database = Database(fresh_db_url)
    try:
        writes = [
            Write("chat_data", f"{i:03d}", f'"{i}"', expected_version=None) for i in range(25)
        ]
        assert await database.apply(writes) == {}
        rows = [
            (key, record.data) async for key, record in database.scan("chat_data", batch_size=10)
        ]
        assert rows == [(f"{i:03d}", f'"{i}"') for i in range(25)]
        taken: list[str] = []
        async with contextlib.aclosing(database.scan("chat_data", batch_size=10)) as scan:
            async for key, _ in scan:
                taken.append(key)
                if len(taken) == 12:
                    break
        assert taken == [key for key, _ in rows[:12]]
        assert await stored(database, "chat_data") == {w.key: (w.data, w.version) for w in writes}
    finally:
        await database.dispose()
