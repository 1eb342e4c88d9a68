"""The schema lives in the alembic revisions of ``migrations/``: the alembic CLI, the code path
of ``auto_upgrade`` and the models agree on every backend."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, select
from sqlalchemy.ext.asyncio import create_async_engine

from ptb_sessions import SQLAlchemyPersistence
from ptb_sessions._alembic import (
    VERSION_TABLE,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
)
from ptb_sessions._schema import JOBS_TABLE_NAME, TABLE_NAME, StoredRow, metadata

ROOT = Path(__file__).resolve().parent.parent


def alembic(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
        check=False,
    )


async def tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    async with engine.connect() as connection:
        names = await connection.run_sync(lambda c: set(inspect(c).get_table_names()))
    await engine.dispose()
    return names & {TABLE_NAME, JOBS_TABLE_NAME, VERSION_TABLE}


async def test_alembic_cli_upgrades_and_downgrades(db_url: str) -> None:
    # A plain sync URL, as a user would write it, given with -x url=...
    sync_url = db_url.replace("+aiosqlite", "").replace("+asyncpg", "").replace("+asyncmy", "")
    result = alembic("-x", f"url={sync_url}", "upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert await tables(db_url) == {TABLE_NAME, JOBS_TABLE_NAME, VERSION_TABLE}
    engine = create_async_engine(db_url)
    assert await current_revision(engine) == head_revision()
    await engine.dispose()
    result = alembic("downgrade", "base", env={"PTB_SESSIONS_URL": db_url})
    assert result.returncode == 0, result.stderr
    assert await tables(db_url) == {VERSION_TABLE}
    result = alembic("current", env={"PTB_SESSIONS_URL": db_url})
    assert result.returncode == 0 and "0001" not in result.stdout


async def test_auto_upgrade_creates_the_schema_and_autogenerate_finds_no_difference(
    db_url: str,
) -> None:
    persistence: SQLAlchemyPersistence = SQLAlchemyPersistence(db_url)
    assert await persistence.get_chat_data() == {}
    await persistence.flush()
    assert await tables(db_url) == {TABLE_NAME, JOBS_TABLE_NAME, VERSION_TABLE}

    def diff(connection):  # type: ignore[no-untyped-def]
        context = MigrationContext.configure(
            connection,
            opts={
                "compare_type": True,
                "include_object": lambda o, name, type_, r, c: (
                    type_ != "table" or name in (TABLE_NAME, JOBS_TABLE_NAME)
                ),
            },
        )
        return compare_metadata(context, metadata)

    engine = create_async_engine(db_url)
    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    await engine.dispose()
    assert differences == []


async def test_upgrade_from_0001_keeps_every_row_and_0002_downgrades(db_url: str) -> None:
    engine = create_async_engine(db_url)
    await upgrade(engine, "0001")
    table = StoredRow.__table__
    rows = [
        {"namespace": "chat_data", "key": str(i), "codec": "json", "data": f'{{"n":{i}}}'}
        for i in range(50)
    ]
    async with engine.begin() as connection:
        await connection.execute(insert(table).values(version=1, touched_at=0), rows)
    select_all = select(table.c.namespace, table.c.key, table.c.data).order_by(table.c.data)

    async def stored() -> list[tuple[str, str, str]]:
        async with engine.connect() as connection:
            result = await connection.execute(select_all)
            return [(r[0], r[1], r[2]) for r in result]

    before = await stored()
    assert len(before) == 50
    await upgrade(engine, "0002")
    assert await current_revision(engine) == "0002"
    assert await tables(db_url) == {TABLE_NAME, JOBS_TABLE_NAME, VERSION_TABLE}
    assert await stored() == before
    await downgrade(engine, "0001")
    assert await current_revision(engine) == "0001"
    assert await tables(db_url) == {TABLE_NAME, VERSION_TABLE}
    assert await stored() == before
    await engine.dispose()
