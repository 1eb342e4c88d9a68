"""Scenarios 3 and 4: whatever values and keys a bot throws at the storage, and oversized values.

A generated value is either stored and read back equal, with the same types all the way down,
or rejected with ``SerializationError`` when it is written; it is never stored corrupted. Both
through a session storage (``persistence.storage("x").write``) and through ``chat_data`` and a
real ``Application.update_persistence``.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import decimal
import math
import threading
import unicodedata
from collections.abc import Coroutine
from typing import Any

import pytest
from _bot import builder, message_update, process
from _reliability import collect_errors, raw_rows
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from telegram import Update
from telegram.ext import MessageHandler, filters

from ptb_sessions import (
    JSONCodec,
    SerializationError,
    SQLAlchemyPersistence,
    SQLAlchemyStorage,
    StorageError,
)
from ptb_sessions._rows import encode_value

SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- what a bot may store ---------------------------------------------------------------------

TZ = (
    st.none()
    | st.just(dtm.timezone.utc)
    | st.builds(
        dtm.timezone,
        st.timedeltas(min_value=-dtm.timedelta(hours=23), max_value=dtm.timedelta(hours=23)),
    )
)
HASHABLE = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.dates()
    | st.uuids()
    | st.decimals(allow_nan=False)
)
ATOMS = (
    HASHABLE
    | st.floats()
    | st.decimals(allow_nan=True)
    | st.datetimes(timezones=TZ)
    | st.times(timezones=TZ)
    | st.timedeltas()
)


class Opaque:
    """Something no JSON codec can store."""


UNSTORABLE = (
    st.builds(Opaque)
    | st.builds(threading.Lock)
    | st.complex_numbers(max_magnitude=10)
    | st.just("\ud800 lone surrogate")
    | st.just(int)
)

DICT_KEYS = st.text(max_size=10) | st.integers() | st.booleans() | st.none() | st.floats()


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(DICT_KEYS, inner, max_size=4)
        | st.sets(HASHABLE, max_size=4)
        | st.frozensets(HASHABLE, max_size=4)
    )


VALUES = st.recursive(ATOMS | UNSTORABLE, containers, max_leaves=12)
# PTB deep-copies chat_data in update_persistence, and a Lock cannot be deep-copied (PTB's
# update_persistence itself raises then): chat_data gets only deep-copyable unstorable values.
DEEPCOPYABLE = st.recursive(
    ATOMS | st.builds(Opaque) | st.complex_numbers(max_magnitude=10) | st.just("\ud800 x"),
    containers,
    max_leaves=12,
)
CHAT_DATA = st.dictionaries(st.text(max_size=10) | st.integers(), DEEPCOPYABLE, max_size=4)

SPECIAL_KEYS = [
    "plain",
    'it\'s "quoted" `back`',
    "'; DROP TABLE ptb_sessions_data; --",
    "Robert'); DELETE FROM ptb_sessions_data WHERE ('1'='1",
    "%_ like wildcards \\ backslash",
    "emoji 🍕👩‍👩‍👧‍👦",
    "RTL שלום مرحبا \u202e reversed",
    "combining e\u0301 vs \u00e9",
    "a" * 512,
    "é" * 512,
    "🍕" * 512,
    "a" * 513,
    "a" * 1000,
    "",
    " ",
    "nul \x00 inside",
    "lone \ud800 surrogate",
]
KEYS = st.sampled_from(SPECIAL_KEYS) | st.text(max_size=600)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same types, recursively (NaN equals NaN; Decimals equal as text, so
    ``1.10`` stays ``1.10``; datetimes keep their UTC offset)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)
        )
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, dtm.datetime | dtm.time):
        return (
            a == b and a.utcoffset() == b.utcoffset() and (a.tzinfo is None) == (b.tzinfo is None)
        )
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            same(ka, kb) and same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items())
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, set | frozenset):
        return a == b and all(any(same(x, y) for y in b) for x in a)
    return bool(a == b)


def codec_accepts(value: Any) -> bool:
    """Whether the write path (codec, then the checks of the row's text) accepts ``value``."""
    try:
        encode_value(JSONCodec(), value, "value", None)
    except SerializationError:
        return False
    return True


class Loop:
    """An event loop kept across hypothesis examples (one engine for all of them)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.close()


# -- 3a. through a session storage --------------------------------------------------------------


def test_generated_values_and_keys_via_storage_write(db_url: str) -> None:
    loop = Loop()
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(db_url)
    storage = persistence.storage("x")
    outcomes = {"stored": 0, "rejected value": 0, "rejected key": 0}

    async def check(key: str, value: Any) -> None:
        if _key_ok(key):
            await storage.delete(key)  # the same key may come again with another value
        try:
            await storage.write(key, value)
        except SerializationError as exc:
            assert not codec_accepts(value) or "max_value_size" in str(exc), exc
            assert f"x[{key!r}]" in str(exc), exc
            assert await storage.read(key) is None, "a rejected value left a row behind"
            outcomes["rejected value"] += 1
            return
        except ValueError as exc:
            assert not isinstance(exc, SerializationError)
            assert not _key_ok(key)
            if len(key) > 512:
                assert str(len(key)) in str(exc) and "512" in str(exc)
            outcomes["rejected key"] += 1
            return
        assert _key_ok(key), f"the key {key!r} was accepted"
        back = await storage.read(key)
        assert same(back, value), (value, back)
        # the row is stored under exactly this key, nowhere else
        rows = [r for r in await raw_rows(db_url, "x") if r[1] == key]
        assert len(rows) == 1
        outcomes["stored"] += 1

    @SETTINGS
    @given(key=KEYS, value=VALUES)
    @example(key="'; DROP TABLE ptb_sessions_data; --", value={"'; DROP TABLE x; --": 1})
    @example(key="k", value="\ud800 lone surrogate")
    @example(key="k", value={"$t": "dt", "v": "not a tag"})
    @example(key="k", value={1: "a", "1": "b", (): "c"})
    def prop(key: str, value: Any) -> None:
        loop.run(check(key, value))

    try:
        prop()

        # every stored row still decodes: nothing was stored corrupted
        async def everything() -> dict[str, Any]:
            return {k: v async for k, v in storage.items()}

        loop.run(everything())
        print("storage outcomes", outcomes)
        assert outcomes["stored"] > 0 and outcomes["rejected value"] > 0, outcomes
    finally:
        loop.run(persistence.flush())
        loop.close()


def _key_ok(key: str) -> bool:
    return len(key) <= 512 and "\x00" not in key and not _has_surrogate(key)


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


@pytest.mark.parametrize("key", SPECIAL_KEYS, ids=range(len(SPECIAL_KEYS)))
async def test_special_keys_are_stored_verbatim_or_rejected_clearly(
    fresh_db_url: str, key: str
) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(fresh_db_url)
    storage = persistence.storage()
    await persistence.database.ensure_schema()
    try:
        if not _key_ok(key):
            with pytest.raises((ValueError, StorageError)) as info:
                await storage.write(key, {"k": key})
            message = str(info.value)
            if len(key) > 512:
                assert isinstance(info.value, ValueError)
                assert f"{len(key)} characters" in message and "512" in message
            elif "\x00" in key:
                assert "NUL" in message
            else:
                assert isinstance(info.value, ValueError) and "lone surrogates" in message
            assert await raw_rows(fresh_db_url) == []
            return
        await storage.write(key, {"k": key})
        await storage.write(key + "!", {"k": key + "!"}) if len(key) < 512 else None
        rows = {r[1]: r for r in await raw_rows(fresh_db_url, "session")}
        assert key in rows, "stored under exactly this key"
        assert await storage.read(key) == {"k": key}
        assert [k async for k in storage.keys() if k == key]  # noqa: SIM118 == [key]
        # the table survived the key that looks like SQL
        assert len(rows) == (2 if len(key) < 512 else 1)
    finally:
        await persistence.flush()


async def test_keys_differing_in_case_spaces_or_normalization_stay_apart(
    fresh_db_url: str,
) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(fresh_db_url)
    storage = persistence.storage()
    keys = ["a", "A", "a ", " a", "é", unicodedata.normalize("NFD", "é"), "ß", "ss", "\u0131", "i"]
    try:
        for i, key in enumerate(keys):
            await storage.write(key, i)
        assert [await storage.read(key) for key in keys] == list(range(len(keys)))
        assert sorted(r[1] for r in await raw_rows(fresh_db_url, "session")) == sorted(keys)
    finally:
        await persistence.flush()


# -- 3b. through chat_data and a real update_persistence ------------------------------------------


def test_generated_chat_data_via_update_persistence(db_url: str) -> None:
    loop = Loop()
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        db_url, update_interval=10**6
    )
    app = builder().persistence(persistence).build()
    errors = collect_errors(app)
    current: list[Any] = [None]

    async def store(update: Update, context: Any) -> None:
        context.chat_data.update(current[0])

    app.add_handler(MessageHandler(filters.ALL, store))
    reader = SQLAlchemyStorage(db_url, namespace="chat_data")
    chat_ids = iter(range(1, 10**6))
    outcomes = {"stored": 0, "rejected": 0}

    async def check(value: dict[Any, Any]) -> None:
        chat = next(chat_ids)
        current[0] = value
        mark = len(errors)
        await process(app, message_update(chat))
        await app.update_persistence()
        stored = await reader.read(str(chat))
        if stored is None and value:
            for _ in range(400):  # PTB hands update_persistence errors to a task
                if len(errors) > mark:
                    break
                await asyncio.sleep(0.005)
            new = errors[mark:]
            assert len(new) == 1 and isinstance(new[0], SerializationError), new
            assert f"chat_data[{chat}]" in str(new[0])
            assert not codec_accepts(value)
            outcomes["rejected"] += 1
            return
        assert errors[mark:] == []
        assert codec_accepts(value)
        assert same(stored if value else {}, value), (value, stored)
        outcomes["stored"] += 1

    @SETTINGS
    @given(value=CHAT_DATA)
    @example(value={"when": dtm.datetime(2026, 1, 1, tzinfo=dtm.timezone.utc), 1: (1, {2})})
    @example(value={"bad": [1, Opaque()]})
    def prop(value: dict[Any, Any]) -> None:
        loop.run(check(value))

    async def start() -> None:
        await app.initialize()

    async def stop() -> dict[int, Any]:
        await app.shutdown()
        fresh: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(db_url)
        try:
            return await fresh.get_chat_data()  # every stored row still decodes
        finally:
            await fresh.flush()
            await reader.close()

    loop.run(start())
    try:
        prop()
    finally:
        reloaded = loop.run(stop())
        loop.close()
    print("chat_data outcomes", outcomes)
    assert outcomes["stored"] > 0 and outcomes["rejected"] > 0, outcomes
    assert len(reloaded) <= outcomes["stored"]


# -- 4. oversized values ------------------------------------------------------------------------


async def test_oversized_chat_data_is_rejected_naming_key_and_limit(fresh_db_url: str) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        fresh_db_url, update_interval=10**6
    )
    assert persistence.max_value_size == 1 << 20
    app = builder().persistence(persistence).build()
    errors = collect_errors(app)
    sizes = {1: 1000, 2: (1 << 20) + 1, 3: (1 << 20) - 100, 4: (1 << 18) + 1}

    async def store(update: Update, context: Any) -> None:
        chat = update.effective_chat.id  # type: ignore[union-attr]
        # chat 4: a quarter MiB of 4-byte characters is more than 1 MiB of UTF-8
        context.chat_data["blob"] = ("🍕" if chat == 4 else "x") * sizes[chat]

    app.add_handler(MessageHandler(filters.ALL, store))
    async with app:
        await process(app, *(message_update(chat) for chat in sizes))
        await app.update_persistence()
        for _ in range(400):
            if len(errors) >= 2:
                break
            await asyncio.sleep(0.005)
    assert len(errors) == 2 and all(isinstance(e, SerializationError) for e in errors), errors
    messages = sorted(str(e) for e in errors)
    assert "chat_data[2]" in messages[0] and "1,048,576" in messages[0], messages
    assert "chat_data[4]" in messages[1] and "1,048,576" in messages[1], messages
    check: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(fresh_db_url)
    stored = await check.get_chat_data()
    await check.flush()
    assert {chat: len(data["blob"]) for chat, data in stored.items()} == {1: 1000, 3: sizes[3]}


async def test_custom_max_value_size_on_persistence_and_its_storages(fresh_db_url: str) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        fresh_db_url, max_value_size=100
    )
    storage = persistence.storage()
    try:
        await storage.write("small", "x" * 50)
        with pytest.raises(SerializationError) as info:
            await storage.write("big", "x" * 200)
        assert "session['big']" in str(info.value) and "100" in str(info.value)
        assert await storage.read("big") is None and await storage.read("small") == "x" * 50
    finally:
        await persistence.flush()


async def test_session_storage_enforces_the_default_limit(fresh_db_url: str) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(fresh_db_url)
    standalone = SQLAlchemyStorage(fresh_db_url, namespace="alone")
    await persistence.database.ensure_schema()
    try:
        for storage, name in ((persistence.storage(), "session"), (standalone, "alone")):
            with pytest.raises(SerializationError) as info:
                await storage.write("big", "x" * (2 << 20))
            assert f"{name}['big']" in str(info.value) and "1,048,576" in str(info.value)
            assert await storage.read("big") is None
        assert await raw_rows(fresh_db_url) == []
    finally:
        await persistence.flush()
        await standalone.close()
