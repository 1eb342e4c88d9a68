"""Two bot processes on one database increment the same chat's session.

Each process (``tests/_multiprocess_bot.py``) runs a real offline PTB ``Application`` with a
``SessionHandler`` on ``SQLAlchemyPersistence(url)`` whose handler reads ``n``, sleeps a little
and writes ``n + 1``; both feed 1,000 updates of one chat, starting at the same moment.

* ``lock="database"``: the row lock makes the processes take turns, so no increment is lost:
  ``n == 2000`` and no ``ConflictError``.
* ``lock="process"``: the processes race; the versioned writes of ``SQLAlchemyStorage`` turn
  every lost increment into a ``ConflictError``: ``n + conflicts == 2000``, nothing vanishes
  silently.

PostgreSQL and MariaDB only (SQLite is not a target for several processes).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import server_url

from ptb_sessions import SQLAlchemyStorage

SCRIPT = Path(__file__).parent / "_multiprocess_bot.py"
UPDATES = 500  # per process
CHAT_ID = -1001
TIMEOUT = 120  # seconds for one run of both processes; it takes a few seconds


async def _create_schema(url: str) -> None:
    """Create the table before the processes start. (Two processes that both find an empty
    database both run the migrations, and one of them fails its first update with a
    StorageError, "table already exists": ``Database.ensure_schema`` serializes upgrades
    within a process only. Not what this test is about.)"""
    storage = SQLAlchemyStorage(url)
    try:
        assert await storage.read("nothing") is None
    finally:
        await storage.close()


async def _read(url: str, key: str) -> Any:
    storage = SQLAlchemyStorage(url)
    try:
        return await storage.read(key)
    finally:
        await storage.close()


def _run_two_bots(url: str, lock: str, tmp_path: Path) -> list[dict[str, Any]]:
    """Start two bot processes, release them at once, and return what each printed."""
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    processes = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), url, lock, str(UPDATES), str(CHAT_ID), str(r), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in ready):
            for process in processes:
                if process.poll() is not None:
                    _, err = process.communicate()
                    pytest.fail(f"a bot process exited early ({process.returncode}):\n{err}")
            if time.monotonic() > deadline:
                pytest.fail("the bot processes did not start within 60 s")
            time.sleep(0.01)
        go.touch()  # the barrier: both start feeding updates now
        results = []
        for process in processes:
            out, err = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, f"bot process failed ({process.returncode}):\n{err}"
            results.append(json.loads(out.strip().splitlines()[-1]))
        return results
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.mark.parametrize("lock", ["database", "process"])
@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
def test_two_processes_increment_one_chat(server: str, lock: str, tmp_path: Path) -> None:
    url = server_url(server)
    asyncio.run(_create_schema(url))
    results = _run_two_bots(url, lock, tmp_path)
    for result in results:
        assert result["handled"] == UPDATES
        assert result["other_errors"] == []
    # the two runs overlapped: neither had finished when the other started
    assert [r["done_before_start"] for r in results] == [[], []]
    conflicts = sum(result["conflicts"] for result in results)
    final = asyncio.run(_read(url, str(CHAT_ID)))
    assert final is not None
    if lock == "database":
        assert final["n"] == 2 * UPDATES
        assert conflicts == 0
    else:
        # every increment either landed or was reported: none vanished silently
        assert final["n"] + conflicts == 2 * UPDATES, (final["n"], conflicts)
        assert conflicts > 0  # else the processes did not race and the test proves nothing
