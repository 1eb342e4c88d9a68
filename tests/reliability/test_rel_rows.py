"""One row policy (issue 9, points 13-16): any codec round-trips, ttl is idle time with a cheap
touch, old rows start their clock at their first read, and a migrated value is written back
once. On SQLite, PostgreSQL and MariaDB, through a real Application with a SessionHandler."""

from __future__ import annotations

import base64
import json
import pickle
import zlib
from typing import Any

import pytest
from _bot import builder, message_update, process
from _statements import StatementLog
from telegram import Update
from telegram.ext import Application, ContextTypes, MessageHandler, filters

from ptb_sessions import (
    PickleCodec,
    SessionHandler,
    SQLAlchemyPersistence,
    SQLAlchemyStorage,
    StorageError,
)
from ptb_sessions._store import Record, Write


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TextCodec:
    """A custom codec that returns ``str`` under a name other than ``"json"``."""

    name = "text-json"

    def encode(self, value: Any) -> str:
        return json.dumps(value)

    def decode(self, data: str | bytes) -> Any:
        return json.loads(data)


class ZippedCodec:
    """A custom codec that returns ``bytes``."""

    name = "zjson"

    def encode(self, value: Any) -> bytes:
        return zlib.compress(json.dumps(value).encode())

    def decode(self, data: str | bytes) -> Any:
        if not isinstance(data, bytes):
            raise ValueError("zjson decodes bytes")
        return json.loads(zlib.decompress(data))


class PrefixCodec(TextCodec):
    """Text that starts like the layout's own markers."""

    name = "prefix"

    def encode(self, value: Any) -> str:
        return f"{value['start']}{json.dumps(value)}"

    def decode(self, data: str | bytes) -> Any:
        text = data if isinstance(data, str) else data.decode()
        return json.loads(text[text.index("{") :])


WRITES = ("INSERT", "UPDATE", "DELETE")

VALUES = [
    {"start": "", "n": 1, "text": "plain"},
    {"start": "base64:", "n": 2, "text": "looks like bytes"},
    {"start": "text:", "n": 3, "text": "looks escaped"},
]


def session_app(
    storage: SQLAlchemyStorage, seen: list[Any], *, initial: Any = None, **options: Any
) -> Application:  # type: ignore[type-arg]
    """A real Application whose handler records the session and, for "+", increments it."""

    async def handle(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        session = context.session  # type: ignore[attr-defined]
        seen.append(None if session is None else dict(session))
        if update.effective_message.text == "+":  # type: ignore[union-attr]
            session["n"] += 1

    app = builder().build()
    app.add_handler(
        SessionHandler(
            [MessageHandler(filters.TEXT, handle)],
            storage=storage,
            initial=initial,
            **options,
        )
    )
    return app


# --- point 13: any codec that honours the protocol round-trips ----------------------------


CODECS = [TextCodec(), ZippedCodec(), PrefixCodec()]


@pytest.mark.parametrize("codec", CODECS, ids=[codec.name for codec in CODECS])
async def test_a_custom_codec_round_trips_in_the_persistence_and_the_sessions(
    fresh_db_url: str, codec: Any
) -> None:
    """Failed before on every backend for a ``str`` codec not named "json" ("Only base64 data
    is allowed")."""
    values = VALUES if isinstance(codec, PrefixCodec) else [{**v, "start": ""} for v in VALUES]
    first: SQLAlchemyPersistence = SQLAlchemyPersistence(fresh_db_url, codec=codec)
    await first.get_chat_data()
    for chat_id, value in enumerate(values, 1):
        await first.update_chat_data(chat_id, dict(value))
    storage = first.storage()
    for key, value in enumerate(values, 1):
        await storage.write(str(key), value)
    await first.flush()

    second: SQLAlchemyPersistence = SQLAlchemyPersistence(fresh_db_url, codec=codec)
    try:
        assert await second.get_chat_data() == dict(enumerate(values, 1))
        storage = second.storage()
        for key, value in enumerate(values, 1):
            assert await storage.read(str(key)) == value
    finally:
        await second.flush()


async def test_integers_beyond_64_bits_round_trip_exactly_through_every_store(
    fresh_db_url: str,
) -> None:
    """The JSON codec's fast path (orjson) reads such integers as floats: they go through the
    standard library, in the persistence and the sessions alike."""
    value = {"id": 2**64 + 1, "neg": -(10**20) - 3, "ids": [10**30 + 7], "n": 5}
    first: SQLAlchemyPersistence = SQLAlchemyPersistence(fresh_db_url)
    await first.get_chat_data()
    await first.update_chat_data(1, dict(value))
    await first.storage().write("1", value)
    await first.flush()

    second: SQLAlchemyPersistence = SQLAlchemyPersistence(fresh_db_url)
    try:
        loaded = (await second.get_chat_data())[1]
        read = await second.storage().read("1")
        for got in (loaded, read):
            assert got == value
            assert [type(got[k]) for k in ("id", "neg", "n")] == [int, int, int]
            assert type(got["ids"][0]) is int
    finally:
        await second.flush()


async def test_rows_of_the_earlier_layout_are_still_read(fresh_db_url: str) -> None:
    """A pickle row stored as bare base64 (before the ``base64:`` marker) still decodes."""
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(fresh_db_url, codec=PickleCodec())
    await persistence.get_chat_data()
    legacy = base64.b64encode(pickle.dumps({"n": 7})).decode("ascii")
    errors = await persistence.database.apply([Write("chat_data", "5", legacy, "pickle")])
    assert errors == {}
    await persistence.flush()
    again: SQLAlchemyPersistence = SQLAlchemyPersistence(fresh_db_url, codec=PickleCodec())
    try:
        assert await again.get_chat_data() == {5: {"n": 7}}
    finally:
        await again.flush()


async def test_a_row_that_is_neither_text_nor_base64_names_its_key(fresh_db_url: str) -> None:
    storage = SQLAlchemyStorage(fresh_db_url, codec=ZippedCodec())
    try:
        await storage.database.apply([Write("session", "9", "not base64 !", "zjson")])
        with pytest.raises(StorageError, match=r"session\['9'\]"):
            await storage.read("9")
        record = await storage.database.get("session", "9")
        assert record is not None and record.data == "not base64 !"  # left as it was
    finally:
        await storage.close()


# --- points 14 and 15: ttl is idle time; a read touches, never rewrites --------------------


async def row(storage: SQLAlchemyStorage, key: str) -> Record:
    record = await storage.database.get(storage.namespace, key)
    assert record is not None
    return record


async def test_a_session_read_but_not_changed_never_expires_while_in_use(
    fresh_db_url: str,
) -> None:
    """``ttl=60`` and a read every 40 s: failed before with ``[None, {...}, None, {...}]``."""
    clock = Clock()
    storage = SQLAlchemyStorage(fresh_db_url, clock=clock)
    seen: list[Any] = []
    app = session_app(storage, seen, initial=lambda: {"n": 0}, ttl=60, clock=clock)
    async with app:
        await process(app, message_update(1, "+"))
        written = await row(storage, "1")
        log = StatementLog(storage.database)
        for _ in range(4):
            clock.now += 40
            await process(app, message_update(1, "?"))
        touched = await row(storage, "1")
        statements = list(log.statements)
        clock.now += 61  # then left alone for longer than the ttl
        await process(app, message_update(1, "?"))
    await storage.close()
    assert seen == [{"n": 0}, {"n": 1}, {"n": 1}, {"n": 1}, {"n": 1}, {"n": 0}]
    # the reads refreshed the expiry with an UPDATE of the expiry alone, never a rewrite
    assert touched.version == written.version and touched.data == written.data
    assert touched.expires_at == 1_000_000.0 + 160 + 60
    writes = [sql.upper() for sql, _, _ in statements if sql.lstrip().upper().startswith(WRITES)]
    assert len(writes) == 4  # one touch per read: each came after more than a tenth of the ttl
    for sql in writes:
        assigned = sql.split(" SET ", 1)[-1].split("WHERE")[0]
        assert sql.lstrip().startswith("UPDATE") and "EXPIRES_AT" in assigned
        assert "DATA" not in assigned.replace("DATA_VERSION", "") and "VERSION" not in assigned


async def test_a_value_stored_before_the_ttl_starts_its_clock_at_its_first_read(
    fresh_db_url: str,
) -> None:
    """Failed before: a row with no expiry never expired once a ttl was turned on."""
    clock = Clock()
    plain = SQLAlchemyStorage(fresh_db_url, clock=clock)
    await plain.write("1", {"n": 5})
    await plain.write("2", {"n": 6})
    await plain.close()
    clock.now += 10_000  # long before the ttl was turned on: does not count
    storage = SQLAlchemyStorage(fresh_db_url, clock=clock)
    seen: list[Any] = []
    app = session_app(storage, seen, initial=lambda: {"n": 0}, ttl=60, clock=clock)
    async with app:
        await process(app, message_update(1, "?"), message_update(2, "?"))
        assert (await row(storage, "1")).expires_at == clock.now + 60
        clock.now += 30
        await process(app, message_update(1, "?"))  # read again within the ttl
        clock.now += 61
        await process(app, message_update(1, "?"), message_update(2, "?"))
    await storage.close()
    # chat 1: read at +0, +30, +91 (idle 61 s since +30: expired); chat 2: idle 91 s
    assert seen == [{"n": 5}, {"n": 6}, {"n": 5}, {"n": 0}, {"n": 0}]


# --- point 16: a value migrated on load is written back at the latest version, once ---------


async def test_a_migrated_session_is_written_back_once(fresh_db_url: str) -> None:
    """Failed before: the row stayed at its old version and was migrated on every read."""
    plain = SQLAlchemyStorage(fresh_db_url)
    await plain.write("1", {"count": 4})  # stored before migrations existed: no version
    await plain.close()
    calls: list[int] = []

    def to_n(old: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        return {"n": old["count"]}

    def add_unit(old: dict[str, Any]) -> dict[str, Any]:
        calls.append(2)
        return {**old, "unit": "pcs"}

    storage = SQLAlchemyStorage(fresh_db_url)
    seen: list[Any] = []
    app = session_app(storage, seen, migrations={1: to_n, 2: add_unit})
    async with app:
        await process(app, message_update(1, "?"), message_update(1, "?"))
    await storage.close()
    assert seen == [{"n": 4, "unit": "pcs"}, {"n": 4, "unit": "pcs"}]
    assert calls == [1, 2]  # migrated once, then read at the latest version
    check = SQLAlchemyStorage(fresh_db_url)
    try:
        record = await row(check, "1")
        assert record.data_version == 2
        assert json.loads(record.data or "") == {"n": 4, "unit": "pcs"}
    finally:
        await check.close()
