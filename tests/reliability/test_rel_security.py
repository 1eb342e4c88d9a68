"""Scenario 7: a pickle payload planted in the database is never executed under the default
JSON codec, and the database password never shows in logs (DEBUG level), errors or reprs.

The password check also runs around every test of this directory (``debug_log_watch`` in
conftest.py captures all logging at DEBUG level and fails a test whose records show a password).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import pickle
import traceback
from pathlib import Path
from typing import Any

import pytest
from _bot import builder, message_update, process
from _proxy import OutageProxy
from _reliability import (
    TABLE,
    OutageRun,
    SecretWatch,
    collect_errors,
    counter_handler,
    raw_execute,
    raw_rows,
)
from sqlalchemy import insert
from sqlalchemy.engine import make_url
from telegram.ext import MessageHandler, filters

from ptb_sessions import SQLAlchemyPersistence, StorageError

SECRET = "s3cret"


class Exploit:
    """Unpickling this creates the marker file: code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def payloads(marker: Path) -> dict[str, tuple[str, str]]:
    """``key -> (codec column, data column)``: the pickle in every shape a row could hold."""
    raw = pickle.dumps(Exploit(marker))
    text0 = pickle.dumps(Exploit(marker), protocol=0).decode("latin-1")
    b64 = base64.b64encode(raw).decode("ascii")
    return {
        "11": ("pickle", b64),  # what PickleCodec itself would have written
        "12": ("json", b64),
        "13": ("json", text0),
        "14": ("json", f'{{"$t": "pickle", "v": "{b64}"}}'),
        "15": ("json", f'{{"$t": "bytes", "v": "{b64}"}}'),  # valid bytes: data, not code
    }


async def plant(url: str, namespace: str, rows: dict[str, tuple[str, str]]) -> None:
    await raw_execute(
        url,
        insert(TABLE),
        [  # type: ignore[arg-type]
            {
                "namespace": namespace,
                "key": key,
                "codec": codec,
                "data": data,
                "version": 1,
                "data_version": None,
                "touched_at": 0.0,
                "expires_at": None,
            }
            for key, (codec, data) in rows.items()
        ],
    )


async def test_pickle_payload_is_never_executed_with_the_json_codec(
    fresh_db_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    rows = payloads(marker)
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        fresh_db_url, update_interval=10**6
    )
    await persistence.database.ensure_schema()
    await plant(fresh_db_url, "chat_data", rows)
    await plant(fresh_db_url, "session", rows)
    assert not marker.exists()

    app = builder().persistence(persistence).build()
    ran: list[int] = []

    async def touch(update: Any, context: Any) -> None:
        ran.append(update.effective_chat.id)

    app.add_handler(MessageHandler(filters.TEXT, touch))  # uses chat_data (refreshes it)
    app.add_handler(counter_handler(persistence.storage()), group=1)
    errors = collect_errors(app)
    async with app:
        # eager load: the planted chat_data rows are skipped (logged), never unpickled
        assert dict(app.chat_data) == {}
        await process(app, *(message_update(int(key)) for key in rows))
    assert ran == [], "no handler ran on a chat whose chat_data failed to load"
    assert not marker.exists(), "the pickle payload was executed"
    storage_errors = [e for e in errors if isinstance(e, StorageError)]
    for key in ("11", "12", "13", "14"):
        assert any(f"session['{key}']" in str(e) for e in storage_errors), (key, errors)
        assert any(f"chat_data['{key}']" in str(e) for e in storage_errors), (key, errors)
    # each read fails again: the rows were left as they were, and still never run
    for key in ("11", "12", "13", "14"):
        with pytest.raises(StorageError):
            await persistence.storage().read(key)
    # a valid bytes tag is data: the pickle's bytes come back, unexecuted
    assert await persistence.storage().read("15") == pickle.dumps(Exploit(marker))
    await persistence.flush()
    assert not marker.exists(), "the pickle payload was executed"
    # every planted row is still there, unchanged (never overwritten by a default value)
    stored = {(ns, key): (codec, data) for ns, key, codec, data in await raw_rows(fresh_db_url)}
    assert stored == {
        (ns, key): row for ns in ("chat_data", "session") for key, row in rows.items()
    }


def password_url(url: str) -> str:
    """The PostgreSQL test URL with a password (trust auth ignores it, so it connects)."""
    return make_url(url).set(password=SECRET).render_as_string(hide_password=False)


def all_text_of(error: BaseException) -> str:
    return "\n".join(
        [str(error), repr(error), *traceback.format_exception(error)]
        + [repr(a) for a in getattr(error, "args", ())]
    )


@pytest.mark.parametrize("backend", ["postgresql"])
def test_password_never_shown_through_an_outage_at_debug_level(
    db_url: str, debug_log_watch: SecretWatch
) -> None:
    # the watch would see a password if one were logged
    probe = SecretWatch()
    probe.handle(logging.LogRecord("x", logging.DEBUG, __file__, 1, "url %s", (SECRET,), None))
    assert probe.leaks
    assert logging.getLogger("sqlalchemy.engine").isEnabledFor(logging.DEBUG)

    url = password_url(db_url)
    assert SECRET in url
    parsed = make_url(url)
    proxy = OutageProxy(parsed.host or "127.0.0.1", parsed.port or 0)
    try:
        bot_url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(
            hide_password=False
        )
        run = OutageRun(bot_url)
        report = asyncio.run(run.run(proxy.cut, proxy.restore, outage_seconds=1.0))
    finally:
        proxy.close()
    assert report["errors_during"], "the outage produced errors"
    for error in run.errors:
        assert SECRET not in all_text_of(error)
    for obj in (run.persistence, run.storage, run.persistence.database, run.app):
        assert SECRET not in repr(obj) and SECRET not in str(obj)
    assert "***" in repr(run.persistence)
    assert debug_log_watch.count > 100, "DEBUG records of the drivers and PTB were seen"
    assert debug_log_watch.leaks == []
