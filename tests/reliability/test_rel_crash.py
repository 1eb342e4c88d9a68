"""Scenario 1: the bot process is killed with SIGKILL in the middle of a burst of updates.

The bot runs as a subprocess (``crash_bot.py``) that handles updates as fast as it can and
prints a flushed line after each completed step; the test kills it after a random number of
lines, reads what it had printed, and checks the database: it opens cleanly (schema at head
without upgrading, ``PRAGMA integrity_check`` on SQLite), every row decodes and is internally
consistent (``n == len(log)``: no half-written value), and nothing that was reported complete
is missing. Each test kills the bot twice on the same database (the second run starts from what
the first left).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _reliability import raw_rows, sqlite_integrity

from ptb_sessions import SQLAlchemyPersistence

BOT = Path(__file__).with_name("crash_bot.py")
CHATS = 7


def run_and_kill(args: list[str], kill_after: int) -> list[str]:
    """Start ``crash_bot.py args``, SIGKILL it once it printed ``kill_after`` lines of work, and
    return every line it printed (those still in the pipe included)."""
    process = subprocess.Popen(
        [sys.executable, str(BOT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    printed: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while sum(line.startswith("done") for line in printed) < kill_after:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"the bot made no progress in 60 s; printed {printed[-5:]}")
            if line is None:
                stderr = process.stderr.read() if process.stderr else ""
                pytest.fail(f"the bot died by itself: {printed[-5:]}\n{stderr}")
            printed.append(line)
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
    reader.join(30)
    while (line := lines.get_nowait() if not lines.empty() else None) is not None:
        printed.append(line)
    assert process.returncode == -signal.SIGKILL
    assert not [line for line in printed if line.startswith("error")], printed
    return printed


async def check_database(url: str, namespace: str) -> dict[int, int]:
    """Open the killed bot's database the way a restarted bot does and check every row.
    Returns the stored count of each chat."""
    if url.startswith("sqlite"):
        assert sqlite_integrity(url) == "ok"
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        url, auto_upgrade=False
    )
    try:
        await persistence.database.ensure_schema()  # SchemaError if not at head
        rows = await raw_rows(url)
        assert {ns for ns, *_ in rows} <= {namespace}
        counts: dict[int, int] = {}
        for _ns, key, codec, data in rows:
            assert codec == "json"
            value = json.loads(data)  # every row decodes
            assert value["n"] == len(value["log"]), f"half-written row {key}: {value}"
            counts[int(key)] = value["n"]
        if namespace == "session":
            decoded = {k: v async for k, v in persistence.storage().items()}
        else:
            decoded = {str(k): v for k, v in (await persistence.get_chat_data()).items()}
        assert {int(k): v["n"] for k, v in decoded.items()} == counts
        return counts
    finally:
        await persistence.flush()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_mid_burst_loses_no_saved_session(db_url: str) -> None:
    rng = random.Random()
    previous: dict[int, int] = {}
    for _round in range(2):
        printed = run_and_kill(["session", db_url, str(CHATS)], kill_after=rng.randint(150, 400))
        reported: dict[int, int] = dict(previous)
        for line in printed:
            if line.startswith("done "):
                _, chat, n = line.split()
                reported[int(chat)] = int(n)
        stored = asyncio.run(check_database(db_url, "session"))
        # Every update whose handler returned (and whose session was saved) is stored; at most
        # the one update in flight at the kill is stored without having been reported.
        assert set(stored) == set(reported)
        assert all(stored[c] >= reported[c] for c in reported), (stored, reported)
        assert sum(stored[c] - reported[c] for c in reported) <= 1, (stored, reported)
        # The second run went on from what the first one stored.
        assert all(reported[c] > previous.get(c, 0) for c in reported)
        previous = stored


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_loses_at_most_the_data_since_the_last_update_persistence(db_url: str) -> None:
    rng = random.Random()
    every = 9  # update_persistence every 9 updates of 7 chats
    for _round in range(2):
        printed = run_and_kill(
            ["persistence", db_url, str(CHATS), str(every)], kill_after=rng.randint(150, 400)
        )
        saved: dict[str, int] = {}
        persisting: dict[str, int] = {}
        for line in printed:
            word, _, rest = line.partition(" ")
            if word == "saved":
                saved = json.loads(rest)
            elif word == "persisting":
                persisting = json.loads(rest)
        assert saved, "the bot completed update_persistence at least once before the kill"
        stored = {str(k): v for k, v in asyncio.run(check_database(db_url, "chat_data")).items()}
        # One update_persistence run is one transaction: the database holds exactly the last
        # completed run, or the one in progress at the kill. Never anything older.
        assert stored in (saved, persisting), (stored, saved, persisting)
