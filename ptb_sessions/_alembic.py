"""The alembic migrations of ptb-sessions, run from code (``auto_upgrade``, the command line)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "VERSION_TABLE",
    "alembic_config",
    "current_revision",
    "downgrade",
    "head_revision",
    "upgrade",
]

VERSION_TABLE = "ptb_sessions_alembic_version"


def alembic_config(connection: Connection | None = None) -> Config:
    """An alembic :class:`~alembic.config.Config` for the migrations shipped in the package. If
    ``connection`` is given, ``env.py`` runs on it instead of opening its own."""
    config = Config()
    config.set_main_option("script_location", str(files("ptb_sessions.migrations")))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The revision this version of ptb-sessions needs."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _current(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at, or :obj:`None` if it was never migrated."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


async def _run(engine: AsyncEngine, fn: Any, revision: str) -> None:
    def run(connection: Connection) -> None:
        fn(alembic_config(connection), revision)

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (default: the newest)."""
    await _run(engine, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str) -> None:
    """Downgrade the database to ``revision`` (``base`` removes every table of ptb-sessions)."""
    await _run(engine, command.downgrade, revision)
