"""Shared helpers of the reliability suite: a counter bot, error collection, raw row access."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Sequence
from typing import Any, cast

from _bot import builder
from sqlalchemy import Table, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from telegram import Update
from telegram.ext import Application, CallbackContext, MessageHandler, TypeHandler, filters

from ptb_sessions import SessionHandler
from ptb_sessions._schema import StoredRow

TABLE = cast(Table, StoredRow.__table__)

#: Passwords that must never be logged (conftest.py adds those of the server URLs).
SECRETS: set[str] = {"s3cret"}


class SecretWatch(logging.Handler):
    """Formats every record (with its traceback) and keeps those that show a secret."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.count = 0
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        try:
            line = self.format(record)
        except Exception as exc:  # a record that cannot be formatted
            line = f"{record.msg!r} {record.args!r} ({exc!r})"
        if any(secret in line for secret in SECRETS):
            self.leaks.append(line)


def collect_errors(app: Application) -> list[BaseException]:  # type: ignore[type-arg]
    """Register an error handler on ``app``; returns the list it fills."""
    errors: list[BaseException] = []

    async def on_error(update: object, context: CallbackContext[Any, Any, Any, Any]) -> None:
        assert context.error is not None
        errors.append(context.error)

    app.add_error_handler(on_error)
    return errors


def counter_handler(storage: Any, *, lazy: bool = False, **kwargs: Any) -> SessionHandler[Any]:
    """A SessionHandler that counts the text messages of each chat in ``session['n']``."""

    async def count(update: Update, context: Any) -> None:
        session = (await context.session) if lazy else context.session
        session["n"] += 1

    return SessionHandler(
        [MessageHandler(filters.TEXT, count)],
        storage=storage,
        initial=lambda: {"n": 0},
        lazy=lazy,
        **kwargs,
    )


def counter_app(storage: Any, *, concurrent: int = 1) -> Application:  # type: ignore[type-arg]
    app: Application = builder().concurrent_updates(concurrent).build()  # type: ignore[type-arg]
    app.add_handler(counter_handler(storage))
    return app


class Feeder:
    """Feeds updates to a running application's queue and waits until they were handled (a
    ``TypeHandler`` in group 1000 counts every update once all other groups ran)."""

    def __init__(self, app: Application) -> None:  # type: ignore[type-arg]
        self.app = app
        self.handled = 0
        self.target = 0
        self.done = asyncio.Event()

        async def watch(update: object, context: Any) -> None:
            self.handled += 1
            if self.handled >= self.target:
                self.done.set()

        app.add_handler(TypeHandler(object, watch), group=1000)

    async def feed(self, updates: Sequence[Update], timeout: float = 600) -> None:
        self.done.clear()
        self.target = self.handled + len(updates)
        for update in updates:
            update.set_bot(self.app.bot)
            if update.message is not None:
                update.message.set_bot(self.app.bot)
            self.app.update_queue.put_nowait(update)
        await asyncio.wait_for(self.done.wait(), timeout)


async def raw_rows(url: str, namespace: str | None = None) -> list[tuple[str, str, str, Any]]:
    """``(namespace, key, codec, data)`` of every stored row, read with a fresh engine."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            query = select(TABLE.c.namespace, TABLE.c.key, TABLE.c.codec, TABLE.c.data)
            if namespace is not None:
                query = query.where(TABLE.c.namespace == namespace)
            return [tuple(row) for row in await conn.execute(query)]  # type: ignore[misc]
    finally:
        await engine.dispose()


async def raw_execute(url: str, sql: Any, params: dict[str, Any] | None = None) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(sql) if isinstance(sql, str) else sql, params or {})
    finally:
        await engine.dispose()


def sqlite_integrity(url: str) -> str:
    """``PRAGMA integrity_check`` of the SQLite file of ``url`` (``ok`` when sound)."""
    path = make_url(url).database or ""
    connection = sqlite3.connect(path)
    try:
        return str(connection.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        connection.close()


def decode_json_rows(rows: Sequence[tuple[str, str, str, Any]]) -> dict[tuple[str, str], Any]:
    """Every row's data parsed as JSON (raises if any is not): no half-written row."""
    return {(ns, key): json.loads(data) for ns, key, _codec, data in rows}


# -- outages ------------------------------------------------------------------------------


class OutageRun:
    """A bot on ``url`` (reached through an :class:`OutageProxy`) that counts per chat both in
    a session (``SessionHandler`` on the persistence's database) and in ``chat_data``, and a
    third counter in memory only, while the proxy is cut and restored.

    Chats 1..5 exist before the outage; chat 6 first writes during it.
    """

    def __init__(self, bot_url: str) -> None:
        from ptb_sessions import SQLAlchemyPersistence

        self.persistence: Any = SQLAlchemyPersistence(bot_url, update_interval=10**6)
        self.storage = self.persistence.storage()
        self.app = builder().persistence(self.persistence).concurrent_updates(8).build()
        self.sessions_run: dict[int, int] = {}
        self.handled: dict[int, int] = {}

        async def session_count(update: Update, context: Any) -> None:
            context.session["n"] += 1
            chat = update.effective_chat.id  # type: ignore[union-attr]
            self.sessions_run[chat] = self.sessions_run.get(chat, 0) + 1

        async def data_count(update: Update, context: Any) -> None:
            context.chat_data["n"] = context.chat_data.get("n", 0) + 1
            chat = update.effective_chat.id  # type: ignore[union-attr]
            self.handled[chat] = self.handled.get(chat, 0) + 1

        self.app.add_handler(
            SessionHandler(
                [MessageHandler(filters.TEXT, session_count)],
                storage=self.storage,
                initial=lambda: {"n": 0},
            )
        )
        self.app.add_handler(MessageHandler(filters.TEXT, data_count), group=1)
        self.errors = collect_errors(self.app)
        self.feeder = Feeder(self.app)

    async def run(self, cut: Any, restore: Any, outage_seconds: float = 2.0) -> dict[str, Any]:
        """Updates before, during and after the outage; returns what happened."""
        import time

        from _bot import message_update

        report: dict[str, Any] = {}
        async with self.app:
            await self.app.start()
            await self.feeder.feed([message_update(c) for c in range(1, 6) for _ in range(3)])
            await self.app.update_persistence()
            report["errors_before"] = list(self.errors)
            report["sessions_before"] = dict(self.sessions_run)
            cut()
            during: list[int] = []
            deadline = time.monotonic() + outage_seconds
            while time.monotonic() < deadline:  # updates keep flowing for a few seconds
                chats = [1, 2, 3, 4, 5, 6]
                during.extend(chats)
                await self.feeder.feed([message_update(c) for c in chats], timeout=60)
                await self.app.update_persistence()
                await asyncio.sleep(0.05)  # PTB reports update_persistence errors in a task
            report["during"] = during
            report["errors_during"] = list(self.errors)
            report["sessions_at_restore"] = dict(self.sessions_run)
            restore()
            mark = len(self.errors)
            await self.feeder.feed([message_update(c) for c in range(1, 7) for _ in range(2)])
            await self.app.update_persistence()
            await asyncio.sleep(0.05)
            report["errors_after"] = self.errors[mark:]
            report["running"] = self.app.running
            await self.app.stop()
        return report
