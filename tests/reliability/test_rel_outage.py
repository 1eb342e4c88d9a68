"""Scenario 2: the database server is unreachable for a few seconds while updates flow.

Stopping the PostgreSQL or MariaDB server would be the most literal outage, but these servers are
shared by every test run on the machine (other developers' suites run at the same time), so
stopping them would break those runs. Instead the bot reaches its server through an
``OutageProxy`` (tests/_proxy.py), a real TCP proxy: cutting it aborts every open connection
(the driver sees the connection die mid-statement, exactly as when the server goes away) and
refuses new ones until it is restored. From the bot's side this is the same failure as a
stopped server or a network partition.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _proxy import OutageProxy
from _reliability import OutageRun
from sqlalchemy.engine import make_url

from ptb_sessions import SQLAlchemyPersistence, StorageError


def proxied(url: str, proxy: OutageProxy) -> str:
    return (
        make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    )


async def stored_counts(url: str) -> tuple[dict[int, Any], dict[str, Any]]:
    check: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url)
    try:
        chat_data = {k: dict(v) for k, v in (await check.get_chat_data()).items()}
        sessions = {k: v async for k, v in check.storage().items()}
        return chat_data, sessions
    finally:
        await check.flush()


async def check_outage(url: str, bot_url: str, proxy: OutageProxy) -> dict[str, Any]:
    run = OutageRun(bot_url)
    report = await run.run(proxy.cut, proxy.restore)
    assert report["errors_before"] == []
    rounds = len(report["during"]) // 6
    assert rounds >= 2, "updates kept flowing during the outage"
    # Every update during the outage was handled (the process never died) ...
    assert run.handled == {c: (3 if c <= 5 else 0) + rounds + 2 for c in range(1, 7)}
    assert report["running"]
    # ... but the session handler never ran without its session, and no initial() stood in
    # for the stored one. The first update of each chat this process knew found its session
    # in the process's cache and ran; its write failed and dropped it from the cache. Every
    # later update needed a read. Each got a StorageError naming the key.
    ran = {
        c: report["sessions_at_restore"].get(c, 0) - report["sessions_before"].get(c, 0)
        for c in range(1, 7)
    }
    assert ran == {c: 1 if c <= 5 else 0 for c in range(1, 7)}
    session_errors = [
        e for e in report["errors_during"] if isinstance(e, StorageError) and "session[" in str(e)
    ]
    assert len(session_errors) == len(report["during"])
    for chat in range(1, 7):
        assert sum(f"session['{chat}']" in str(e) for e in session_errors) == rounds
    # update_persistence failed during the outage (StorageError), and nothing failed after.
    assert any("Writing" in str(e) for e in report["errors_during"])  # one or a batch
    assert all(isinstance(e, StorageError) for e in report["errors_during"])
    assert report["errors_after"] == []
    # After the restore: sessions went on from the stored values, and the chat_data written
    # during the outage landed.
    chat_data, sessions = await stored_counts(url)
    assert chat_data == {c: {"n": (3 if c <= 5 else 0) + rounds + 2} for c in range(1, 7)}
    assert sessions == {str(c): {"n": 5 if c <= 5 else 2} for c in range(1, 7)}
    return report


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_server_outage_fails_reads_keeps_writes_and_never_kills_the_bot(db_url: str) -> None:
    parsed = make_url(db_url)
    proxy = OutageProxy(parsed.host or "127.0.0.1", parsed.port or 0)
    try:
        asyncio.run(check_outage(db_url, proxied(db_url, proxy), proxy))
    finally:
        proxy.close()
