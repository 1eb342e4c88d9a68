"""The ``ptb-sessions`` command (SPEC section 8), run in-process through ``main(argv)`` on every
backend, and as a subprocess where only a real process shows a traceback."""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import fractions
import io
import json
import os
import pickle
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _bot import builder, message_update, process
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import InvalidToken
from telegram.ext import (
    Application,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    ExtBot,
    MessageHandler,
    PicklePersistence,
    filters,
)

from ptb_sessions import (
    JSONCodec,
    PickleCodec,
    SchemaError,
    SQLAlchemyPersistence,
    StorageError,
    _alembic,
    _cli_transfer,
    _demo,
)
from ptb_sessions._demo import count_pizzas
from ptb_sessions._schema import StoredRow
from ptb_sessions._sessionhandler import SessionHandler
from ptb_sessions._url import mask_url, to_async_url
from ptb_sessions.cli import build_parser, main

UNREACHABLE = "postgresql://someone:s3cr3t-pw@127.0.0.1:1/nothing"
UNREACHABLE_MARIADB = "mysql://someone:s3cr3t-pw@127.0.0.1:1/nothing"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PTB_SESSIONS_URL", raising=False)
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``ptb-sessions argv`` in-process: (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ptb-sessions: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def all_rows(url: str) -> list[tuple[Any, ...]]:
    """Every row, every column, sorted by namespace and key."""

    async def read() -> list[tuple[Any, ...]]:
        engine = create_async_engine(to_async_url(url), poolclass=NullPool)
        try:
            async with engine.connect() as connection:
                result = await connection.execute(select(StoredRow.__table__))
                return sorted(tuple(row) for row in result)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def revision(url: str) -> str | None:
    async def read() -> str | None:
        engine = create_async_engine(to_async_url(url), poolclass=NullPool)
        try:
            return await _alembic.current_revision(engine)
        finally:
            await engine.dispose()

    return asyncio.run(read())


def sqlite_file(url: str) -> Path | None:
    return Path(url.split(":///", 1)[1]) if url.startswith("sqlite") else None


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def populate(url: str) -> None:
    """Rows of every kind: PTB's data, a conversation, sessions (one pickled, one migrated),
    one expired row, keys whose order depends on collations."""
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url)
    await persistence.update_chat_data(-100123, {"cart": [1, 2], "note": "pizza 🍕"})
    await persistence.update_user_data(7, {"name": "Ann"})
    await persistence.update_bot_data({"total": 3})
    await persistence.update_conversation("order", (5, 7), 1)
    storage = persistence.storage("session")
    for key in ("B", "a", "_x", "é", "Z", "10", "9", "a b", "ä"):
        await storage.write(key, {"key": key})
    await persistence.flush()
    migrated: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        url, migrations={1: lambda v: v, 2.5: lambda v: v}
    )
    await migrated.update_user_data(8, {"v": 2})
    await migrated.flush()
    pickled: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url, codec=PickleCodec())
    await pickled.storage("pickled").write("f", fractions.Fraction(1, 3))
    await pickled.flush()
    expired: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        url, ttl=10, clock=Clock(1000.0)
    )
    await expired.update_user_data(9, {"old": True})
    await expired.flush()


# -- db ----------------------------------------------------------------------------------


def test_db_upgrade_current_check_downgrade(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    head = _alembic.head_revision()
    code, out, err = cli(capsys, "--url", db_url, "db", "current")
    assert (code, out.strip(), err) == (0, "none (not migrated)", "")
    code, out, err = cli(capsys, "--url", db_url, "db", "check")
    assert_one_error_line(code, err, "not migrated", f"not at head {head}", "db upgrade")
    assert out == ""
    if (path := sqlite_file(db_url)) is not None:
        assert not path.exists()  # current and check do not create the file

    code, out, err = cli(capsys, "--url", db_url, "db", "upgrade")
    assert (code, err) == (0, "")
    assert f"none -> {head}" in out
    assert revision(db_url) == head
    code, out, _ = cli(capsys, "--url", db_url, "db", "current")
    assert (code, out.strip()) == (0, f"{head} (head)")
    code, out, err = cli(capsys, "--url", db_url, "db", "check")
    assert (code, err) == (0, "")
    assert f"at head {head}" in out
    code, out, _ = cli(capsys, "--url", db_url, "db", "upgrade")
    assert code == 0
    assert f"stays at revision {head}" in out

    code, out, err = cli(capsys, "--url", db_url, "db", "downgrade", "base")
    assert (code, err) == (0, "")
    assert f"{head} -> none" in out
    assert revision(db_url) is None
    code, _, err = cli(capsys, "--url", db_url, "db", "check")
    assert code == 1
    code, _, err = cli(capsys, "--url", db_url, "db", "downgrade", "nonsense")
    assert_one_error_line(code, err, "nonsense")


def test_url_from_environment_and_default(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = cli(capsys, "db", "upgrade")
    assert code == 0
    assert (tmp_path / "ptb_sessions.sqlite3").exists()
    assert "ptb_sessions.sqlite3" in out
    monkeypatch.setenv("PTB_SESSIONS_URL", f"sqlite:///{tmp_path / 'env.sqlite3'}")
    code, out, _ = cli(capsys, "db", "upgrade")
    assert code == 0
    assert (tmp_path / "env.sqlite3").exists()
    assert "env.sqlite3" in out


# -- stats, show, purge-expired ---------------------------------------------------------------


def _table_row(out: str, name: str) -> list[str]:
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.strip("│┃ ").split("│")]
        if cells and cells[0] == name:
            return cells[1:]
    raise AssertionError(f"no row {name!r} in\n{out}")


def test_stats_show_and_purge_expired(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(populate(db_url))
    code, out, err = cli(capsys, "--url", db_url, "stats")
    assert (code, err) == (0, "")
    assert _table_row(out, "chat_data")[0] == "1"
    assert _table_row(out, "session")[0] == "9"
    assert _table_row(out, "user_data")[0] == "3"
    assert _table_row(out, "user_data")[2] == "1"  # expired
    assert _table_row(out, "conversation:order")[0] == "1"
    assert _table_row(out, "total")[0] == "16"
    assert int(_table_row(out, "bot_data")[1]) == len('{"total":3}')

    code, out, err = cli(capsys, "--url", db_url, "show", "chat_data", "-100123")
    assert (code, err) == (0, "")
    assert "chat_data['-100123']" in out
    assert "'cart': [1, 2]" in out
    assert "'note': 'pizza 🍕'" in out
    assert "codec json" in out
    code, out, _ = cli(capsys, "--url", db_url, "show", "bot_data")
    assert (code, "'total': 3" in out) == (0, True)
    code, out, _ = cli(capsys, "--url", db_url, "show", "conversation:order", "[5, 7]")
    assert code == 0
    assert out.splitlines()[-1] == "1"
    code, out, _ = cli(capsys, "--url", db_url, "show", "user_data", "8")
    assert code == 0
    assert "data version 2.5" in out
    code, out, err = cli(capsys, "--url", db_url, "show", "pickled", "f")
    assert code == 0
    assert "codec pickle" in out
    assert "Fraction" not in out
    assert "--allow-pickle" in err
    code, out, _ = cli(capsys, "--url", db_url, "show", "pickled", "f", "--allow-pickle")
    assert code == 0
    assert "Fraction(1, 3)" in out
    code, out, _ = cli(capsys, "--url", db_url, "show", "user_data", "9")
    assert code == 0
    assert "expired" in out
    code, out, _ = cli(capsys, "--url", db_url, "show", "session", "é", "--raw")
    assert code == 0
    assert out.splitlines()[-1] == '{"key":"é"}'

    code, _, err = cli(capsys, "--url", db_url, "show", "nonsense", "1")
    assert_one_error_line(code, err, "unknown namespace 'nonsense'", "chat_data", "session")
    code, _, err = cli(capsys, "--url", db_url, "show", "chat_data", "abc")
    assert_one_error_line(code, err, "chat ids", "'abc'")
    code, _, err = cli(capsys, "--url", db_url, "show", "chat_data", "42")
    assert_one_error_line(code, err, "chat_data['42'] is not stored")
    code, out, err = cli(capsys, "--url", db_url, "show", "session")
    assert code == 0
    assert out.splitlines() == ["10", "9", "B", "Z", "_x", "a", "a b", "ä", "é"]
    assert err == "(9 keys)\n"

    code, out, err = cli(capsys, "--url", db_url, "purge-expired")
    assert (code, err) == (0, "")
    assert "deleted 1 expired row from" in out
    code, out, _ = cli(capsys, "--url", db_url, "stats")
    assert _table_row(out, "user_data") == ["2", _table_row(out, "user_data")[1], "0"]
    code, _, err = cli(capsys, "--url", db_url, "show", "user_data", "9")
    assert_one_error_line(code, err, "is not stored")


@pytest.mark.parametrize(
    "argv",
    [
        ["stats"],
        ["show", "chat_data", "1"],
        ["purge-expired"],
        ["export", "out.jsonl"],
    ],
    ids=lambda argv: argv[0],
)
def test_read_commands_never_upgrade(
    db_url: str, argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "--url", db_url, *argv)
    assert out == ""
    if (path := sqlite_file(db_url)) is not None:
        assert_one_error_line(code, err, "no database file", "db upgrade")
        assert not path.exists()
    else:
        assert_one_error_line(code, err, "is not migrated", "db upgrade")
        assert revision(db_url) is None
    assert not (tmp_path / "out.jsonl").exists()


def test_read_commands_refuse_an_old_schema(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "--url", db_url, "db", "upgrade")[0] == 0
    assert cli(capsys, "--url", db_url, "db", "downgrade", "base")[0] == 0
    code, _, err = cli(capsys, "--url", db_url, "stats")
    assert_one_error_line(code, err, "is not migrated", "db upgrade")
    assert revision(db_url) is None


# -- export / import -----------------------------------------------------------------------


def test_export_import_round_trip(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(populate(db_url))
    before = all_rows(db_url)
    backup = tmp_path / "backup.jsonl"
    code, out, err = cli(capsys, "--url", db_url, "export", str(backup))
    assert (code, err) == (0, "")
    assert f"exported {len(before)} rows" in out
    lines = backup.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(before)
    objects = [json.loads(line) for line in lines]
    assert list(objects[0]) == list(_cli_transfer.FIELDS)
    order = [(o["namespace"], o["key"]) for o in objects]
    assert order == sorted(order)  # code point order on every backend
    assert '"key":"é"' in backup.read_text(encoding="utf-8")  # readable, not \u escapes

    # into an empty, unmigrated database
    assert cli(capsys, "--url", db_url, "db", "downgrade", "base", "--yes")[0] == 0
    code, out, err = cli(capsys, "--url", db_url, "import", str(backup))
    assert (code, err) == (0, "")
    assert f"imported {len(before)} rows" in out
    assert all_rows(db_url) == before  # every column, version and timestamps included

    again = tmp_path / "again.jsonl"
    assert cli(capsys, "--url", db_url, "export", str(again))[0] == 0
    assert again.read_bytes() == backup.read_bytes()

    # a second import collides; --replace overwrites
    code, _, err = cli(capsys, "--url", db_url, "import", str(backup))
    assert_one_error_line(code, err, "is already in", "nothing was imported", "--replace")
    assert all_rows(db_url) == before
    objects[0]["data"] = '{"changed":true}'
    changed = tmp_path / "changed.jsonl"
    changed.write_text("".join(json.dumps(o) + "\n" for o in objects), encoding="utf-8")
    code, _, err = cli(capsys, "--url", db_url, "import", "--replace", str(changed))
    assert (code, err) == (0, "")
    after = all_rows(db_url)
    assert after != before
    assert len(after) == len(before)
    assert {row[3] for row in after} >= {'{"changed":true}'}


def _corrupt(lines: list[str], how: str) -> tuple[str, int]:
    if how == "truncated":
        return "".join(lines[:2]) + lines[2][: len(lines[2]) // 2], 3
    if how == "not json":
        return "".join([lines[0], "{not json\n", *lines[2:]]), 2
    if how == "wrong field":
        obj = json.loads(lines[3])
        obj["version"] = "seven"
        return "".join([*lines[:3], json.dumps(obj) + "\n", *lines[4:]]), 4
    if how == "duplicate":
        return "".join([*lines, lines[1]]), len(lines) + 1
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "not json", "wrong field", "duplicate"])
def test_import_of_a_bad_file_names_the_line_and_writes_nothing(
    db_url: str, how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(populate(db_url))
    backup = tmp_path / "backup.jsonl"
    assert cli(capsys, "--url", db_url, "export", str(backup))[0] == 0
    assert cli(capsys, "--url", db_url, "db", "downgrade", "base", "--yes")[0] == 0
    text, line = _corrupt(backup.read_text(encoding="utf-8").splitlines(True), how)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text, encoding="utf-8")
    code, out, err = cli(capsys, "--url", db_url, "import", str(bad))
    assert_one_error_line(code, err, f"bad.jsonl:{line}:", "nothing was imported")
    if how == "truncated":
        assert "truncated" in err
    assert out == ""
    assert revision(db_url) is None  # checked before the database was touched


def test_import_failing_halfway_commits_nothing(
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    asyncio.run(populate(db_url))
    backup = tmp_path / "backup.jsonl"
    assert cli(capsys, "--url", db_url, "export", str(backup))[0] == 0
    lines = backup.read_text(encoding="utf-8").splitlines(True)
    existing = all_rows(db_url)
    # new rows first, then a row that is already stored: the collision is found after the
    # first chunks were inserted
    fresh = []
    for index in range(6):
        obj = json.loads(lines[0])
        obj["namespace"], obj["key"] = "fresh", f"k{index}"
        fresh.append(json.dumps(obj) + "\n")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join([*fresh, lines[-1]]), encoding="utf-8")
    monkeypatch.setattr(_cli_transfer, "_CHUNK", 2)
    code, _, err = cli(capsys, "--url", db_url, "import", str(mixed))
    assert_one_error_line(code, err, "is already in", "nothing was imported")
    assert all_rows(db_url) == existing


# -- import-pickle -------------------------------------------------------------------------

START, TOPPING = range(2)


def _handlers() -> list[Any]:
    async def remember(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        context.chat_data["messages"] = context.chat_data.get("messages", 0) + 1
        context.user_data["name"] = update.effective_user.first_name  # type: ignore[union-attr]
        context.bot_data.setdefault("chats", []).append(update.effective_chat.id)  # type: ignore[union-attr]
        await update.effective_message.reply_text(  # type: ignore[union-attr]
            "menu",
            reply_markup=InlineKeyboardMarkup(
                [[InlineKeyboardButton("🍕", callback_data=("pizza", 1))]]
            ),
        )

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
        return TOPPING

    async def topping(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
        context.chat_data["topping"] = update.effective_message.text  # type: ignore[union-attr]
        return ConversationHandler.END

    conversation = ConversationHandler(
        entry_points=[CommandHandler("order", start)],
        states={TOPPING: [MessageHandler(filters.TEXT & ~filters.COMMAND, topping)]},
        fallbacks=[],
        name="order",
        persistent=True,
    )
    return [conversation, MessageHandler(filters.Regex("^hi"), remember)]


def _snapshot(app: Any) -> dict[str, Any]:
    conversation = app.handlers[0][0]
    return {
        "chat_data": {k: dict(v) for k, v in app.chat_data.items() if v},
        "user_data": {k: dict(v) for k, v in app.user_data.items() if v},
        "bot_data": dict(app.bot_data),
        "callback_data": app.bot.callback_data_cache.persistence_data,
        "conversations": dict(conversation._conversations),
    }


async def _write_pickle(path: Path, single_file: bool, extra: Any = None) -> dict[str, Any]:
    persistence: PicklePersistence[Any, Any, Any] = PicklePersistence(
        path, single_file=single_file
    )
    app = builder().persistence(persistence).arbitrary_callback_data(True).build()
    for handler in _handlers():
        app.add_handler(handler)
    async with app:
        await process(
            app,
            message_update(-100123, "hi there", user_id=7),
            message_update(42, "hi"),
            message_update(-100123, "/order", user_id=8),
            message_update(42, "/order"),
            message_update(42, "margherita"),  # ends 42's conversation
        )
        if extra is not None:
            app.chat_data[5]["odd"] = extra
            app.mark_data_for_update_persistence(chat_ids=5)
        snapshot = _snapshot(app)
    assert snapshot["conversations"] == {(-100123, 8): TOPPING}
    return snapshot


async def _load_sqlalchemy(url: str, codec: Any = None) -> tuple[dict[str, Any], list[str]]:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url, codec=codec)
    app = builder().persistence(persistence).arbitrary_callback_data(True).build()
    for handler in _handlers():
        app.add_handler(handler)
    async with app:
        snapshot = _snapshot(app)
        # the imported conversation goes on where it stopped
        request = app.bot.request
        await process(app, message_update(-100123, "funghi", user_id=8))
        texts = [str(p.get("text")) for m, p in request.calls if m == "sendMessage"]
        assert app.chat_data[-100123]["topping"] == "funghi"
    return snapshot, texts


@pytest.mark.parametrize("single_file", [True, False], ids=["single_file", "multi_file"])
def test_import_pickle_gives_the_same_data(
    db_url: str, single_file: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bot.pickle"
    expected = asyncio.run(_write_pickle(path, single_file))
    assert path.exists() == single_file
    assert expected["callback_data"][0]  # a keyboard was cached
    assert expected["bot_data"] == {"chats": [-100123, 42]}

    code, out, err = cli(capsys, "--url", db_url, "import-pickle", str(path))
    assert (code, err) == (0, "")
    assert "conversation:order" in out

    loaded, _ = asyncio.run(_load_sqlalchemy(db_url))
    assert loaded == expected
    assert loaded["chat_data"][-100123] == {"messages": 1}

    # a second import would overwrite: refused unless asked for
    code, _, err = cli(capsys, "--url", db_url, "import-pickle", str(path))
    assert_one_error_line(code, err, "already holds PTB data", "--replace")
    code, _, err = cli(capsys, "--url", db_url, "import-pickle", "--replace", str(path))
    assert (code, err) == (0, "")
    assert asyncio.run(_load_sqlalchemy(db_url))[0]["chat_data"][-100123] == {"messages": 1}


def test_import_pickle_of_values_json_cannot_encode(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bot.pickle"
    asyncio.run(_write_pickle(path, True, extra=fractions.Fraction(1, 3)))
    code, _, err = cli(capsys, "--url", db_url, "import-pickle", str(path))
    assert_one_error_line(
        code, err, "chat_data[5]['odd']", "nothing was imported", "--codec pickle"
    )
    assert revision(db_url) is None  # checked before the database was touched

    code, _, err = cli(capsys, "--url", db_url, "import-pickle", "--codec", "pickle", str(path))
    assert (code, err) == (0, "")
    loaded, _ = asyncio.run(_load_sqlalchemy(db_url, PickleCodec()))
    assert loaded["chat_data"][5] == {"odd": fractions.Fraction(1, 3)}


# -- demo ----------------------------------------------------------------------------------


def test_demo_twice_doubles_the_total(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "demo", "--chats", "7", "--updates", "150")
    assert code == 0, err
    last = out.splitlines()[-1]
    assert last.startswith("total pizzas: ")
    first = int(last.removeprefix("total pizzas: "))
    assert first > 0
    url = f"sqlite+aiosqlite:///{tmp_path / 'ptb_sessions_demo.sqlite3'}"
    counts = asyncio.run(count_pizzas(to_async_url(url)))
    assert len(counts) == 7
    assert sum(counts.values()) == first
    assert "updates/s" in out
    assert "replies sent" in out

    code, out, _ = cli(capsys, "demo", "--chats", "7", "--updates", "150")
    assert code == 0
    assert out.splitlines()[-1] == f"total pizzas: {2 * first}"
    assert f"{first} before this run" in out
    assert asyncio.run(count_pizzas(to_async_url(url))) == {k: 2 * v for k, v in counts.items()}

    # --db elsewhere: a fresh database, the same deterministic count
    code, out, _ = cli(capsys, "demo", "--chats", "7", "--updates", "150", "--db", "other.db")
    assert code == 0
    assert out.splitlines()[-1] == f"total pizzas: {first}"
    assert (tmp_path / "other.db").exists()


def test_demo_with_a_token_polls_the_same_bot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started: list[Any] = []

    async def username(token: str) -> str:
        assert token == "42:from-env"
        return "pizza_bot"

    def run_polling(self: Application[Any, Any, Any, Any, Any, Any], **kwargs: Any) -> None:
        started.append((self, kwargs))

    monkeypatch.setattr(_demo, "bot_username", username)
    monkeypatch.setattr(Application, "run_polling", run_polling)
    code, out, err = cli(capsys, "demo", "--token", "42:from-env")
    assert (code, err) == (0, "")
    assert "@pizza_bot" in out
    assert out.splitlines()[-1] == "total pizzas: 0"
    ((app, kwargs),) = started
    assert app.bot.token == "42:from-env"
    assert isinstance(app.persistence, SQLAlchemyPersistence)
    assert isinstance(app.handlers[0][0], SessionHandler)
    assert kwargs == {"allowed_updates": Update.ALL_TYPES}


def test_demo_with_a_rejected_token_is_one_line_without_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def username(token: str) -> str:
        raise InvalidToken(f"The token `{token}` was rejected by the server.")

    monkeypatch.setattr(_demo, "bot_username", username)
    code, _, err = cli(capsys, "demo", "--token", "42:s3cr3t-token")
    assert_one_error_line(code, err, "InvalidToken", "***", "rejected")
    assert "s3cr3t-token" not in err


# -- errors --------------------------------------------------------------------------------


@pytest.fixture
def pickle_file(tmp_path: Path) -> Path:
    path = tmp_path / "valid.pickle"
    asyncio.run(_write_pickle(path, True))
    return path


@pytest.fixture
def jsonl_file(tmp_path: Path) -> Path:
    path = tmp_path / "valid.jsonl"
    row = dict.fromkeys(_cli_transfer.FIELDS)
    row.update(namespace="session", key="1", codec="json", data="{}", version=1, touched_at=1.0)
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    return path


def _unreachable_cases() -> Iterator[Any]:
    commands = [
        ["db", "upgrade"],
        ["db", "downgrade", "base"],
        ["db", "current"],
        ["db", "check"],
        ["stats"],
        ["show", "chat_data", "1"],
        ["purge-expired"],
        ["export", "out.jsonl"],
        ["import", "{jsonl}"],
        ["import-pickle", "{pickle}"],
        ["demo", "--updates", "3"],
    ]
    for url in (UNREACHABLE, UNREACHABLE_MARIADB):
        for argv in commands:
            yield pytest.param(url, argv, id=f"{url.split(':')[0]}-{'-'.join(argv[:2])}")


@pytest.mark.parametrize(("url", "argv"), list(_unreachable_cases()))
def test_unreachable_server_is_one_line_without_password(
    url: str,
    argv: list[str],
    jsonl_file: Path,
    pickle_file: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [a.format(jsonl=jsonl_file, pickle=pickle_file) for a in argv]
    code, out, err = cli(capsys, "--url", url, *argv)
    assert_one_error_line(code, err, "127.0.0.1:1", "***")
    assert "s3cr3t-pw" not in out + err


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--url", "not a url", "stats"], ["Invalid database URL"]),
        (["--url", "oracle://u:s3cr3t-pw@h/db", "stats"], ["unsupported database URL", "***"]),
        (["--url", "sqlite:///missing.sqlite3", "show", "session", "1"], ["no database file"]),
        (["import", "missing.jsonl"], ["there is no file missing.jsonl"]),
        (["import-pickle", "missing"], ["no PicklePersistence file missing"]),
        (["export", "no/such/dir/x.jsonl"], ["cannot write no/such/dir/x.jsonl"]),
        (["demo", "--updates", "3", "--db", "no/such/dir/demo.db"], ["no/such/dir/demo.db"]),
    ],
    ids=[
        "bad-url",
        "unsupported",
        "missing-db",
        "missing-jsonl",
        "missing-pickle",
        "export-dir",
        "demo-dir",
    ],
)
def test_mistakes_are_one_line(
    argv: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    if argv[0] == "export":
        assert cli(capsys, "db", "upgrade")[0] == 0
    code, _, err = cli(capsys, *argv)
    assert_one_error_line(code, err, *fragments)
    assert "s3cr3t-pw" not in err


def test_unreadable_pickle_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.pickle").write_bytes(b"this is not a pickle")
    code, _, err = cli(capsys, "import-pickle", "broken.pickle")
    assert_one_error_line(code, err, "cannot read broken.pickle")


@pytest.mark.parametrize(
    "argv",
    [
        ["--url", UNREACHABLE, "stats"],
        ["--url", UNREACHABLE, "db", "upgrade"],
        ["--url", "::::", "db", "upgrade"],
        ["show", "chat_data", "1"],
        ["import-pickle", "missing.pickle"],
        ["demo", "--updates", "2", "--db", "no/such/dir/demo.db"],
    ],
    ids=["unreachable-stats", "unreachable-upgrade", "bad-url", "not-migrated", "missing", "demo"],
)
def test_console_script_prints_no_traceback(argv: list[str], tmp_path: Path) -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in ("PTB_SESSIONS_URL", "TELEGRAM_BOT_TOKEN")
    }
    result = subprocess.run(
        [sys.executable, "-m", "ptb_sessions.cli", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("ptb-sessions: error: ")
    assert "Traceback" not in result.stderr
    assert "s3cr3t-pw" not in result.stdout + result.stderr


# -- safe to operate (issue 10) ---------------------------------------------------------------


def _jsonl(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        full = dict.fromkeys(_cli_transfer.FIELDS)
        full.update(codec="json", data="{}", version=1, touched_at=1.0)
        full.update(row)
        lines.append(json.dumps(full) + "\n")
    return "".join(lines)


def _import_rows(
    capsys: pytest.CaptureFixture[str], url: str, path: Path, rows: list[dict[str, Any]]
) -> None:
    path.write_text(_jsonl(rows), encoding="utf-8")
    code, _, err = cli(capsys, "--url", url, "import", str(path))
    assert (code, err) == (0, "")


def test_downgrade_that_drops_rows_needs_yes(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(populate(db_url))
    before = all_rows(db_url)
    head = _alembic.head_revision()
    code, out, err = cli(capsys, "--url", db_url, "db", "downgrade", "base")
    assert_one_error_line(code, err, f"would destroy {len(before)} stored rows", "export", "--yes")
    assert out == ""
    assert revision(db_url) == head
    assert all_rows(db_url) == before
    # 0002 -> 0001 drops the jobs table only: there are no jobs, so nothing is destroyed
    code, out, err = cli(capsys, "--url", db_url, "db", "downgrade", "-1")
    assert (code, err) == (0, "")
    assert f"{head} -> 0001" in out
    assert all_rows(db_url) == before
    code, out, err = cli(capsys, "--url", db_url, "db", "downgrade", "-1")
    assert_one_error_line(code, err, f"would destroy {len(before)} stored rows", "--yes")
    assert revision(db_url) == "0001"
    code, out, err = cli(capsys, "--url", db_url, "db", "downgrade", "base", "--yes")
    assert (code, err) == (0, "")
    assert "0001 -> none" in out
    assert revision(db_url) is None


def test_db_upgrade_head_is_accepted(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "--url", db_url, "db", "upgrade", "head")
    assert (code, err) == (0, "")
    assert f"none -> {_alembic.head_revision()}" in out
    assert revision(db_url) == _alembic.head_revision()


def test_export_dash_is_standard_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'bot.sqlite3'}"
    asyncio.run(populate(url))
    rows = all_rows(url)
    code, out, err = cli(capsys, "--url", url, "export", "-")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == len(rows)
    assert all(isinstance(json.loads(line), dict) for line in lines)  # only the rows
    assert f"exported {len(rows)} rows" in err
    assert "standard output" in err
    assert not (tmp_path / "-").exists()

    # and `import -` reads them back from standard input
    assert cli(capsys, "--url", url, "db", "downgrade", "base", "--yes")[0] == 0
    stdin = io.TextIOWrapper(io.BytesIO(out.encode("utf-8")), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "stdin", stdin)
        code, out2, err = cli(capsys, "--url", url, "import", "-")
    assert (code, err) == (0, "")
    assert f"imported {len(rows)} rows from standard input" in out2
    assert all_rows(url) == rows


def test_export_never_replaces_a_file_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'bot.sqlite3'}"
    asyncio.run(populate(url))
    count = len(all_rows(url))
    existing = tmp_path / "existing.jsonl"
    existing.write_text("precious\n", encoding="utf-8")
    link = tmp_path / "link.jsonl"
    link.symlink_to(existing)
    for target in (existing, link):
        code, _, err = cli(capsys, "--url", url, "export", str(target))
        assert_one_error_line(code, err, f"{target} already exists", "--force")
        assert existing.read_text(encoding="utf-8") == "precious\n"
    assert link.is_symlink()

    # --force through the symlink replaces its target; the symlink stays a symlink
    code, _, err = cli(capsys, "--url", url, "export", str(link), "--force")
    assert (code, err) == (0, "")
    assert link.is_symlink()
    assert link.resolve() == existing.resolve()
    assert len(existing.read_text(encoding="utf-8").splitlines()) == count
    existing.write_text("precious\n", encoding="utf-8")
    code, _, err = cli(capsys, "--url", url, "export", str(existing), "--force")
    assert (code, err) == (0, "")
    assert len(existing.read_text(encoding="utf-8").splitlines()) == count
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_export_writes_through_a_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'bot.sqlite3'}"
    asyncio.run(populate(url))
    count = len(all_rows(url))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "pipe-link"
    link.symlink_to(fifo)
    received: list[bytes] = []

    def read() -> None:
        with fifo.open("rb") as pipe:
            received.append(pipe.read())

    for target in (fifo, link):
        reader = threading.Thread(target=read)
        reader.start()
        code, _, err = cli(capsys, "--url", url, "export", str(target))
        reader.join(60)
        assert (code, err) == (0, "")
        assert stat.S_ISFIFO(fifo.lstat().st_mode)  # written through, never replaced
        assert len(received.pop().decode("utf-8").splitlines()) == count
    assert link.is_symlink()


class _Payload:
    """Unpickling it creates the file ``path``: stands for any code a planted row runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def test_read_commands_never_unpickle(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "code-ran"
    planted = base64.b64encode(pickle.dumps(_Payload(marker))).decode("ascii")
    _import_rows(
        capsys,
        db_url,
        tmp_path / "planted.jsonl",
        [
            {"namespace": "session", "key": "1", "codec": "pickle", "data": planted},
            {"namespace": "chat_data", "key": "5", "codec": "pickle", "data": planted},
        ],
    )
    for argv in (
        ["show", "session", "1"],
        ["show", "chat_data", "5"],
        ["show", "session"],
        ["keys", "session"],
        ["stats"],
        ["export", "out.jsonl"],
    ):
        code, out, err = cli(capsys, "--url", db_url, *argv)
        assert code == 0, err
        assert not marker.exists(), argv
    code, out, err = cli(capsys, "--url", db_url, "show", "session", "1")
    assert f"codec pickle, {len(planted)} bytes" in out
    assert "--allow-pickle" in err
    # the payload is real: --allow-pickle runs it
    code, out, err = cli(capsys, "--url", db_url, "show", "session", "1", "--allow-pickle")
    assert code == 0, err
    assert marker.exists()


HOSTILE_NAMESPACES = [
    "[/]",
    "[link=https://evil.example]click[/link]",
    "esc\x1b[31mred",
    "bell\x07\x9b",
    ":pizza:",
    "rtl\u202eoverride",
]


def test_database_values_are_printed_literally(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [{"namespace": ns, "key": f"k\x1b[2J{i}"} for i, ns in enumerate(HOSTILE_NAMESPACES)]
    rows.append({"namespace": "session", "key": "x", "codec": "json", "data": '"\x1b]8;;x\x07"'})
    _import_rows(capsys, db_url, tmp_path / "hostile.jsonl", rows)
    code, out, err = cli(capsys, "--url", db_url, "stats")
    assert (code, err) == (0, "")
    for shown in (
        "[/]",
        "[link=https://evil.example]click[/link]",
        "esc\\x1b[31mred",
        "bell\\x07\\x9b",
        ":pizza:",
        "rtl\\u202eoverride",
    ):
        assert shown in out
    outputs = [out]
    code, out, err = cli(capsys, "--url", db_url, "keys", "esc\x1b[31mred")
    assert (code, out) == (0, "k\\x1b[2J2\n")
    outputs.append(out + err)
    code, out, err = cli(capsys, "--url", db_url, "show", "[/]", "k\x1b[2J0")
    assert code == 0, err
    assert out.startswith("[/]['k\\x1b[2J0']")
    outputs.append(out + err)
    code, out, err = cli(capsys, "--url", db_url, "show", "session", "x", "--raw")
    assert code == 0, err
    assert out.splitlines()[-1] == '"\\x1b]8;;x\\x07"'
    outputs.append(out + err)
    code, _, err = cli(capsys, "--url", db_url, "show", "nonsense")
    assert_one_error_line(code, err, "unknown namespace 'nonsense'", "esc\\x1b[31mred")
    outputs.append(err)
    for printed in outputs:
        assert "\x1b" not in printed
        assert "\x07" not in printed
        assert "\u202e" not in printed
        assert "\N{SLICE OF PIZZA}" not in printed


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://someone@127.0.0.1:1/nothing?password=s3cr3t-pw",
        "mysql://someone@127.0.0.1:1/nothing?charset=utf8mb4&password=s3cr3t-pw",
        "postgresql://someone:s3cr3t@pw-x9@127.0.0.1:1/nothing",
        "postgresql://someone:s3cr3t%40pw-x9@127.0.0.1:1/nothing",
    ],
    ids=["query-password", "query-password-mysql", "at-sign", "escaped-at-sign"],
)
def test_passwords_are_masked_wherever_the_url_has_them(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    def leaks(text: str) -> list[str]:
        return [part for part in ("s3cr3t", "pw-x9", "%40pw") if part in text]

    assert leaks(mask_url(url)) == []
    assert "***" in mask_url(url)
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url)
    assert leaks(repr(persistence)) == []
    assert "127.0.0.1:1" in repr(persistence)  # the host is the real one, after the last @
    with pytest.raises(StorageError) as caught:
        asyncio.run(persistence.get_bot_data())
    assert leaks(str(caught.value)) == []
    assert "127.0.0.1:1" in str(caught.value)
    code, out, err = cli(capsys, "--url", url, "stats")
    assert_one_error_line(code, err, "127.0.0.1:1", "***")
    assert leaks(out + err) == []


def _set_revision(url: str, value: str) -> None:
    async def run() -> None:
        engine = create_async_engine(to_async_url(url), poolclass=NullPool)
        try:
            async with engine.begin() as connection:
                await connection.execute(
                    text(f"UPDATE {_alembic.VERSION_TABLE} SET version_num = :v"), {"v": value}
                )
        finally:
            await engine.dispose()

    asyncio.run(run())


def test_database_at_a_newer_revision_is_left_untouched(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(populate(db_url))
    _set_revision(db_url, "0099")
    before = all_rows(db_url)
    for auto_upgrade in (True, False):
        persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
            db_url, auto_upgrade=auto_upgrade
        )
        with pytest.raises(SchemaError) as caught:
            asyncio.run(persistence.get_bot_data())
        message = str(caught.value)
        assert "revision 0099" in message
        assert "newer than this version of ptb-sessions knows" in message
        assert "Upgrade ptb-sessions" in message
        asyncio.run(persistence.database.dispose())
    for argv in (["db", "upgrade"], ["db", "downgrade", "base", "--yes"], ["db", "check"]):
        code, out, err = cli(capsys, "--url", db_url, *argv)
        assert_one_error_line(code, err, "revision 0099", "newer", "Upgrade ptb-sessions")
        assert out == ""
    for argv in (["stats"], ["show", "bot_data"], ["export", "out.jsonl"]):
        code, _, err = cli(capsys, "--url", db_url, *argv)
        assert_one_error_line(code, err, "revision 0099", "newer")
    code, out, _ = cli(capsys, "--url", db_url, "db", "current")
    assert (code, out.split()[0]) == (0, "0099")
    assert "newer" in out
    assert revision(db_url) == "0099"
    assert all_rows(db_url) == before


def test_auto_upgrade_false_leaves_no_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        f"sqlite:///{path}", auto_upgrade=False
    )
    with pytest.raises(SchemaError, match="db upgrade"):
        asyncio.run(persistence.get_bot_data())
    asyncio.run(persistence.database.dispose())
    assert not path.exists()


def test_sqlite_url_with_two_slashes_gets_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "--url", "sqlite://bot.sqlite3", "db", "upgrade")
    assert_one_error_line(code, err, "three slashes", "sqlite:///bot.sqlite3")
    with pytest.raises(ValueError, match="three slashes"):
        SQLAlchemyPersistence("sqlite://bot.sqlite3")


def test_keys_with_prefix_and_limit(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(populate(db_url))
    code, out, err = cli(capsys, "--url", db_url, "keys", "session")
    assert (code, out.splitlines()) == (0, ["10", "9", "B", "Z", "_x", "a", "a b", "ä", "é"])
    assert err == "(9 keys)\n"
    code, out, err = cli(capsys, "--url", db_url, "keys", "session", "--prefix", "a")
    assert (code, out.splitlines(), err) == (0, ["a", "a b"], "(2 keys starting with 'a')\n")
    code, out, err = cli(capsys, "--url", db_url, "keys", "session", "--limit", "3")
    assert (code, out.splitlines()) == (0, ["10", "9", "B"])
    assert err == "(3 of 9 keys; --limit shows more)\n"
    code, out, err = cli(capsys, "--url", db_url, "keys", "session", "--prefix", "_")
    assert (code, out.splitlines(), err) == (0, ["_x"], "(1 key starting with '_')\n")
    code, out, err = cli(capsys, "--url", db_url, "keys", "session", "--prefix", "%")
    assert (code, out, err) == (0, "", "(0 keys starting with '%')\n")  # no LIKE wildcards
    code, out, _ = cli(capsys, "--url", db_url, "keys", "user_data")
    assert (code, out.splitlines()) == (0, ["7", "8", "9"])
    code, out, err = cli(capsys, "--url", db_url, "keys", "sesion")
    assert_one_error_line(code, err, "unknown namespace 'sesion'", "this database has", "session")
    code, out, err = cli(capsys, "--url", db_url, "show", "sesion")
    assert_one_error_line(code, err, "unknown namespace 'sesion'", "this database has", "session")


def _subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[Any]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subcommands(sub, (*prefix, name))


def test_every_subcommand_help_has_a_description(capsys: pytest.CaptureFixture[str]) -> None:
    names = []
    for argv, parser in _subcommands(build_parser()):
        names.append(" ".join(argv))
        code, out, _ = cli(capsys, *argv, "--help")
        assert code == 0
        assert parser.description, argv
        assert " ".join(parser.description.split()[:4]) in " ".join(out.split()), argv
    assert {"db upgrade", "db downgrade", "keys", "show", "import-pickle", "demo"} <= set(names)
    code, out, _ = cli(capsys, "--help")
    read_commands = " ".join(out.split()).split("read commands", 1)[1].split(")", 1)[0]
    assert "stats" in read_commands
    assert "purge-expired" not in read_commands


def test_import_and_purge_say_one_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'bot.sqlite3'}"
    path = tmp_path / "one.jsonl"
    path.write_text(_jsonl([{"namespace": "session", "key": "1", "expires_at": 5.0}]))
    code, out, _ = cli(capsys, "--url", url, "import", str(path))
    assert (code, f"imported 1 row from {path}" in out) == (0, True)
    code, out, _ = cli(capsys, "--url", url, "export", "out.jsonl")
    assert (code, "exported 1 row from" in out) == (0, True)
    code, out, _ = cli(capsys, "--url", url, "purge-expired")
    assert (code, "deleted 1 expired row from" in out) == (0, True)


def test_demo_goes_online_only_with_an_explicit_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def username(token: str) -> str:
        raise AssertionError("the demo went online")

    monkeypatch.setattr(_demo, "bot_username", username)
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", "42:from-env")
    code, out, err = cli(capsys, "demo", "--chats", "3", "--updates", "20")
    assert (code, err) == (0, "")
    assert "updates/s" in out  # the offline run
    assert out.splitlines()[-1].startswith("total pizzas: ")


def test_demo_refuses_a_database_with_other_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bot.sqlite3"
    url = f"sqlite:///{path}"
    asyncio.run(populate(url))
    before = all_rows(url)
    code, out, err = cli(capsys, "demo", "--db", str(path), "--updates", "20")
    assert_one_error_line(code, err, "holds other data", "chat_data", "--db", "--yes")
    assert out == ""
    assert all_rows(url) == before
    code, out, err = cli(capsys, "--url", url, "demo", "--updates", "20")
    assert_one_error_line(code, err, "holds other data")
    assert all_rows(url) == before
    code, out, err = cli(capsys, "demo", "--db", str(path), "--updates", "20", "--yes")
    assert (code, err) == (0, "")
    assert len(all_rows(url)) > len(before)


@pytest.mark.parametrize("scheme", ["postgresql", "mysql"])
@pytest.mark.parametrize(
    "argv",
    [["stats"], ["db", "upgrade"], ["export", "-"], ["jobs"], ["jobs", "remove", "x"]],
    ids=str,
)
def test_a_server_that_never_answers_gives_one_line_within_timeout(
    scheme: str, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        url = f"{scheme}://someone:s3cr3t-pw@127.0.0.1:{port}/nothing"
        code, out, err = cli(capsys, "--url", url, "--timeout", "0.5", *argv)
    assert_one_error_line(code, err, "no answer within 0.5 s", "***")
    assert out == ""
    assert "s3cr3t-pw" not in err


_CART_MODULE = """
class Cart:
    def __init__(self, items):
        self.items = items

    def __eq__(self, other):
        return isinstance(other, Cart) and other.items == self.items
"""


def _pickle_with(path: Path, value: Any) -> None:
    async def write() -> None:
        persistence: PicklePersistence[Any, Any, Any] = PicklePersistence(path)
        persistence.set_bot(ExtBot("123:placeholder"))
        # what Application.initialize loads
        await persistence.get_user_data()
        await persistence.get_chat_data()
        await persistence.get_bot_data()
        await persistence.get_callback_data()
        await persistence.update_chat_data(5, {"cart": value})
        await persistence.flush()

    asyncio.run(write())


def test_import_pickle_finds_classes_only_through_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = tmp_path / "botmodules"
    modules.mkdir()
    (modules / "ptbs_cartmod.py").write_text(_CART_MODULE, encoding="utf-8")
    # the current directory holds the module too: it must not be searched
    (tmp_path / "ptbs_cartmod.py").write_text(_CART_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(modules))
    import ptbs_cartmod  # type: ignore[import-not-found]

    path = tmp_path / "bot.pickle"
    _pickle_with(path, ptbs_cartmod.Cart([1, 2]))
    monkeypatch.delitem(sys.modules, "ptbs_cartmod")
    sys.path.remove(str(modules))
    url = f"sqlite:///{tmp_path / 'bot.sqlite3'}"

    code, _, err = cli(capsys, "--url", url, "import-pickle", str(path), "--codec", "pickle")
    assert_one_error_line(code, err, "'ptbs_cartmod'", "cannot be imported", "--path DIR")
    assert not (tmp_path / "bot.sqlite3").exists()
    code, _, err = cli(
        capsys, "--url", url, "import-pickle", str(path), "--codec", "pickle", "--path", "nowhere"
    )
    assert_one_error_line(code, err, "--path", "nowhere", "not a directory")

    code, out, err = cli(
        capsys,
        "--url",
        url,
        "import-pickle",
        str(path),
        "--codec",
        "pickle",
        "--path",
        str(modules),
    )
    assert (code, err) == (0, ""), err
    assert str(modules) not in sys.path  # only while reading the file
    code, out, _ = cli(capsys, "--url", url, "show", "chat_data", "5", "--allow-pickle")
    assert code == 0
    assert "Cart object" in out


def test_import_pickle_of_classes_from_the_bots_main_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main_module = sys.modules["__main__"]
    cart = type("BotMainCart", (), {"__module__": "__main__"})
    monkeypatch.setattr(main_module, "BotMainCart", cart, raising=False)
    path = tmp_path / "bot.pickle"
    _pickle_with(path, cart())
    monkeypatch.delattr(main_module, "BotMainCart")
    code, _, err = cli(capsys, "import-pickle", str(path), "--codec", "pickle")
    assert_one_error_line(
        code, err, "BotMainCart", "__main__", "into a module of their own", "--path DIR"
    )


#: A bot script whose classes live in its __main__: it writes a PicklePersistence file, or
#: reads the rows import-pickle made with the types the command names, and says whether they
#: equal what it pickled (types included).
_BOT_SCRIPT = """
import asyncio, dataclasses, enum, sys
from telegram.ext import ExtBot, PicklePersistence

@dataclasses.dataclass(frozen=True)
class Choice:
    item: int
    size: str = "large"

class S(enum.IntEnum):
    START = 1
    ORDER = 2

class ChatData(dict):
    def clicks(self):
        return self.get("clicks", 0)

def originals():
    chat = ChatData(clicks=3, choice=Choice(2), seen={S.START})
    return {5: chat}, {7: {"state": S.ORDER}}, {"order": {(5, 7): S.ORDER}}

def same(a, b):
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (set, frozenset)):
        return {(type(x), x) for x in a} == {(type(x), x) for x in b}
    return a == b

async def write(path):
    persistence = PicklePersistence(path)
    persistence.set_bot(ExtBot("123:placeholder"))
    for load in (persistence.get_user_data, persistence.get_chat_data,
                 persistence.get_bot_data, persistence.get_callback_data):
        await load()
    await persistence.get_conversations("order")
    chats, users, conversations = originals()
    await persistence.update_chat_data(5, chats[5])
    await persistence.update_user_data(7, users[7])
    await persistence.update_conversation("order", (5, 7), S.ORDER)
    await persistence.flush()

async def read(url):
    from ptb_sessions import JSONCodec, SQLAlchemyPersistence
    persistence = SQLAlchemyPersistence(url, codec=JSONCodec(types=[Choice, ChatData, S]))
    loaded = (await persistence.get_chat_data(), await persistence.get_user_data(),
              {"order": await persistence.get_conversations("order")})
    print("same" if all(map(same, loaded, originals())) else f"different: {loaded!r}")
    await persistence.flush()

if __name__ == "__main__":
    asyncio.run((write if sys.argv[1] == "write" else read)(sys.argv[2]))
"""


def _run_bot(script: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=script.parent,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_import_pickle_stores_the_bot_scripts_classes_as_registered_types(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bot_dir = tmp_path / "bot"
    bot_dir.mkdir()
    script = bot_dir / "pizzabot.py"
    script.write_text(_BOT_SCRIPT, encoding="utf-8")
    (bot_dir / "other.py").write_text("x = 1\n", encoding="utf-8")  # searched, not run
    path = tmp_path / "bot.pickle"
    _run_bot(script, "write", str(path))

    code, _, err = cli(capsys, "--url", db_url, "import-pickle", str(path))
    assert_one_error_line(code, err, "__main__", "--path DIR")  # no --path: nothing found
    code, out, err = cli(
        capsys, "--url", db_url, "import-pickle", str(path), "--path", str(bot_dir)
    )
    assert (code, err) == (0, "")
    flat = " ".join(out.split())
    assert "codec=JSONCodec(types=[ChatData, Choice, S])" in flat
    assert "__main__" in sys.modules and not hasattr(sys.modules["__main__"], "Choice")
    assert "_ptb_sessions_bot_script" not in sys.modules

    # a pickled row could not name the script's classes as the bot has them
    code, _, err = cli(
        capsys,
        "--url",
        db_url,
        "import-pickle",
        str(path),
        "--path",
        str(bot_dir),
        "--codec",
        "pickle",
        "--replace",
    )
    assert_one_error_line(code, err, "__main__ script", "nothing was imported", "JSON codec")

    # the bot, given those types, reads the rows back equal to the originals
    assert _run_bot(script, "read", db_url).strip() == "same"

    # show and export do not know the bot's types: the stored JSON, as it is
    code, out, err = cli(capsys, "--url", db_url, "show", "chat_data", "5")
    assert code == 0
    assert "__main__.Choice" in out and '"item": 2' in out
    assert "not decoded" in err and "is not registered" in err
    backup = tmp_path / "backup.jsonl"
    code, out, err = cli(capsys, "--url", db_url, "export", str(backup))
    assert (code, err) == (0, "")
    rows = [json.loads(line) for line in backup.read_text(encoding="utf-8").splitlines()]
    assert any("__main__.Choice" in row["data"] for row in rows)


def test_a_bot_script_whose_classes_json_cannot_store_keeps_the_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bot_dir = tmp_path / "bot"
    bot_dir.mkdir()
    script = bot_dir / "slotsbot.py"
    script.write_text(
        _BOT_SCRIPT.replace("class ChatData(dict):", "class ChatData(dict):\n    __slots__ = ()")
        .replace("chat = ChatData(", "chat = {'slots': Slotted()} or ChatData(")
        .replace("def originals():", "class Slotted:\n    __slots__ = ('a',)\n\ndef originals():"),
        encoding="utf-8",
    )
    path = tmp_path / "bot.pickle"
    _run_bot(script, "write", str(path))
    url = f"sqlite:///{tmp_path / 'bot.sqlite3'}"
    code, _, err = cli(capsys, "--url", url, "import-pickle", str(path), "--path", str(bot_dir))
    assert_one_error_line(code, err, "chat_data[5]['slots']", "Slotted", "--codec pickle")
    assert not (tmp_path / "bot.sqlite3").exists()


@dataclasses.dataclass
class Topping:
    name: str


def test_show_and_export_take_rows_of_types_they_do_not_know_as_stored(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def write() -> None:
        persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
            db_url, codec=JSONCodec(types={"Topping": Topping})
        )
        await persistence.update_chat_data(5, {"topping": Topping("funghi\x1b[31m")})
        await persistence.flush()

    asyncio.run(write())
    code, out, err = cli(capsys, "--url", db_url, "show", "chat_data", "5")
    assert code == 0, err
    assert '"Topping"' in out and '"name": "funghi\\u001b[31m"' in out and "\x1b" not in out
    assert "not decoded" in err and "'Topping' is not registered" in err
    before = all_rows(db_url)
    backup = tmp_path / "backup.jsonl"
    assert cli(capsys, "--url", db_url, "export", str(backup))[0] == 0
    assert cli(capsys, "--url", db_url, "db", "downgrade", "base", "--yes")[0] == 0
    assert cli(capsys, "--url", db_url, "import", str(backup))[0] == 0
    assert all_rows(db_url) == before  # copied verbatim


def test_import_pickle_help_warns_that_it_runs_code(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "import-pickle", "--help")
    assert code == 0
    flat = " ".join(out.split())
    assert "WARNING: reading a pickle file runs any code it holds" in flat
    assert "--path DIR" in flat
