"""Backends for the test suite.

Every storage test takes the ``db_url`` fixture, which is parametrized over SQLite (a fresh file
per test), PostgreSQL (127.0.0.1:5432, database ``test``) and MariaDB (127.0.0.1:3306, database
``test``); the server URLs can be changed with ``PTB_SESSIONS_TEST_POSTGRESQL`` and
``PTB_SESSIONS_TEST_MARIADB``. Before each test the tables of ptb-sessions are dropped, so every
test starts from an empty, unmigrated database.

With ``CI=true`` an unreachable server fails the test; elsewhere the test is skipped with the
reason.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).parent))

SERVER_URLS = {
    "postgresql": os.environ.get(
        "PTB_SESSIONS_TEST_POSTGRESQL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    ),
    "mariadb": os.environ.get(
        "PTB_SESSIONS_TEST_MARIADB", "mysql+asyncmy://root@127.0.0.1:3306/test"
    ),
}
BACKENDS = ["sqlite", "postgresql", "mariadb"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_unreachable: dict[str, str] = {}


async def reset_database(url: str) -> None:
    """Drop the tables of ptb-sessions, so the database is empty and unmigrated."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            for table in ("ptb_sessions_data", "ptb_sessions_alembic_version"):
                await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    finally:
        await engine.dispose()


def _unavailable(backend: str, reason: str) -> None:
    _unreachable[backend] = reason
    if IN_CI:
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


async def async_server_url(backend: str) -> str:
    """The URL of ``backend``'s empty test database, failing (CI) or skipping the test if the
    server is down. For async code; :func:`server_url` for sync code."""
    url = SERVER_URLS[backend]
    if backend in _unreachable:
        _unavailable(backend, _unreachable[backend])
    try:
        await asyncio.wait_for(reset_database(url), 15)
    except Exception as exc:
        _unavailable(
            backend, f"{backend} server at {url} unreachable: {type(exc).__name__}: {exc}"
        )
    return url


def server_url(backend: str) -> str:
    """The URL of ``backend``'s empty test database (see :func:`async_server_url`)."""
    return asyncio.run(async_server_url(backend))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of the backend under test: ``sqlite``, ``postgresql`` or ``mariadb``."""
    return str(request.param)


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> str:
    """An asyncio URL of an empty, unmigrated database of ``backend``."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite3'}"
    return server_url(backend)


@pytest.fixture
async def fresh_db_url(db_url: str) -> AsyncIterator[str]:
    """Like ``db_url``, usable from async tests; drops the tables again afterwards."""
    yield db_url
    if not db_url.startswith("sqlite"):
        await reset_database(db_url)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"ptb-sessions backends: {', '.join(BACKENDS)} (CI={IN_CI})"]
