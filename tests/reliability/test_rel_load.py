"""Scenario 6: load. UPDATES updates over CHATS chats through a real Application with
``concurrent_updates(128)`` and a ``SessionHandler`` counter on ``SQLAlchemyPersistence(url)``:
every counter is exact, no error reaches the error handler, and memory stays flat.

Memory is the process's resident set size (``/proc/self/statm``, after ``gc.collect()``),
measured after the first 5,000 updates and after the last; the end must be within 20% of the
first. The updates are fed 5,000 at a time (each batch waits until every update was handled),
so what is measured is what the bot keeps, not the backlog of the queue.

Like every test in this directory, it runs with all logging at DEBUG level (see conftest.py).

Sizes: 50,000 updates over 5,000 chats on SQLite and on PostgreSQL, as the issue asks (about
40 s and 100 s on the 2-core development machine: at DEBUG level SQLAlchemy logs every statement
PostgreSQL runs). ``PTB_SESSIONS_LOAD_UPDATES`` and ``PTB_SESSIONS_LOAD_CHATS`` override the
sizes (both backends).
"""

from __future__ import annotations

import gc
import os
import resource
import time
from typing import Any

import pytest
from _bot import message_update
from _reliability import Feeder, collect_errors, counter_app, raw_rows

from ptb_sessions import SQLAlchemyPersistence, _sessionlock

UPDATES = {"sqlite": 50_000, "postgresql": 50_000}
if "PTB_SESSIONS_LOAD_UPDATES" in os.environ:
    UPDATES = dict.fromkeys(UPDATES, int(os.environ["PTB_SESSIONS_LOAD_UPDATES"]))
CHATS = int(os.environ.get("PTB_SESSIONS_LOAD_CHATS", "5000"))
BATCH = 5000
CONCURRENCY = 128


def rss() -> int:
    """Resident set size of this process in bytes, after a full collection."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_load_every_counter_exact_and_memory_flat(backend: str, fresh_db_url: str) -> None:
    import json

    total = UPDATES[backend]

    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(fresh_db_url)
    app = counter_app(persistence.storage(), concurrent=CONCURRENCY)
    errors = collect_errors(app)
    feeder = Feeder(app)
    memory: list[int] = []
    started = time.perf_counter()
    async with app:
        await app.start()
        for first in range(0, total, BATCH):
            updates = [
                message_update(-(1 + i % CHATS)) for i in range(first, min(first + BATCH, total))
            ]
            await feeder.feed(updates)
            del updates
            memory.append(rss())
        await app.stop()
    elapsed = time.perf_counter() - started
    await persistence.flush()
    rate = total / elapsed
    growth = memory[-1] / memory[0] - 1
    print(
        f"\nload {backend}: {total} updates over {CHATS} chats in "
        f"{elapsed:.1f} s = {rate:.0f} updates/s; RSS after first {BATCH}: "
        f"{memory[0] / 2**20:.1f} MiB, at the end: {memory[-1] / 2**20:.1f} MiB "
        f"({growth:+.1%})"
    )
    assert errors == []
    assert feeder.handled == total
    rows = await raw_rows(fresh_db_url, "session")
    counts = {key: json.loads(data)["n"] for _ns, key, _codec, data in rows}
    per_chat = total // CHATS
    expected = {str(-(1 + c)): per_chat + (1 if c < total % CHATS else 0) for c in range(CHATS)}
    assert counts == expected
    assert _sessionlock.locked_keys() == 0
    assert growth < 0.20, memory
