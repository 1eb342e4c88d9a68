"""Backends for the test suite.

Every storage test takes the ``db_url`` fixture, which is parametrized over SQLite (a fresh file
per test), PostgreSQL (127.0.0.1:5432) and MariaDB (127.0.0.1:3306); the servers can be changed
with ``PTB_SESSIONS_TEST_POSTGRESQL`` and ``PTB_SESSIONS_TEST_MARIADB`` (URLs whose database part
is ignored). Each test process (each pytest-xdist worker) creates its own database on each
server, named ``ptbs_test_<random>``, on first use, and drops it when the process ends; before
each test the tables in that database are dropped, so every test starts from an empty,
unmigrated database. The suite never touches a database it did not create, and two runs at once
on one machine do not meet.

With ``CI=true`` an unreachable server fails the test; elsewhere the test is skipped with the
reason.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).parent))

#: The servers (their database part is replaced by the database this process creates).
SERVER_ROOTS = {
    "postgresql": os.environ.get(
        "PTB_SESSIONS_TEST_POSTGRESQL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    ),
    "mariadb": os.environ.get(
        "PTB_SESSIONS_TEST_MARIADB", "mysql+asyncmy://root@127.0.0.1:3306/mysql"
    ),
}
#: The name of the database this test process owns on each server.
TEST_DATABASE = f"ptbs_test_{secrets.token_hex(5)}"
SERVER_URLS = {
    backend: make_url(root).set(database=TEST_DATABASE).render_as_string(hide_password=False)
    for backend, root in SERVER_ROOTS.items()
}
BACKENDS = ["sqlite", "postgresql", "mariadb"]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_unreachable: dict[str, str] = {}
_created: set[str] = set()


async def _on_server(backend: str, statement: str) -> None:
    engine = create_async_engine(
        SERVER_ROOTS[backend], poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def create_database(backend: str, name: str) -> None:
    """Create the database ``name`` on ``backend``'s server (for tests that need another)."""
    quoted = f'"{name}"' if backend == "postgresql" else f"`{name}`"
    await _on_server(backend, f"CREATE DATABASE {quoted}")


async def drop_database(backend: str, name: str) -> None:
    """Drop the database ``name`` on ``backend``'s server; only ever one this suite created."""
    assert name.startswith("ptbs_"), name
    if backend == "postgresql":
        await _on_server(backend, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        await _on_server(backend, f"DROP DATABASE IF EXISTS `{name}`")


async def reset_database(url: str) -> None:
    """Drop every table of this process's own test database at ``url``."""
    assert make_url(url).database == TEST_DATABASE, url
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            names = await conn.run_sync(lambda sync: sync.dialect.get_table_names(sync))
            for table in names:
                quoted = conn.dialect.identifier_preparer.quote(table)
                await conn.execute(text(f"DROP TABLE IF EXISTS {quoted}"))
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
        if backend not in _created:
            await asyncio.wait_for(create_database(backend, TEST_DATABASE), 15)
            _created.add(backend)
        await asyncio.wait_for(reset_database(url), 15)
    except Exception as exc:
        _unavailable(
            backend,
            f"{backend} server at {make_url(url).render_as_string()} unreachable: "
            f"{type(exc).__name__}: {exc}",
        )
    return url


def server_url(backend: str) -> str:
    """The URL of ``backend``'s empty test database (see :func:`async_server_url`)."""
    return asyncio.run(async_server_url(backend))


@pytest.fixture(scope="session", autouse=True)
def _drop_own_databases() -> Iterator[None]:
    """Drop the databases this process created, when it ends."""
    yield
    for backend in sorted(_created):
        asyncio.run(drop_database(backend, TEST_DATABASE))
    _created.clear()


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
