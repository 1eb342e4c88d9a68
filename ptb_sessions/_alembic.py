"""The alembic migrations of ptb-sessions, run from code (``auto_upgrade``, the command line)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from ptb_sessions._errors import SchemaError
from ptb_sessions._url import mask_url, sqlite_path

__all__ = [
    "VERSION_TABLE",
    "alembic_config",
    "checked_revision",
    "current_revision",
    "downgrade",
    "head_revision",
    "is_known",
    "newer_revision_error",
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


def is_known(revision: str | None) -> bool:
    """Whether ``revision`` (:obj:`None`: not migrated) is one of the revisions of this version
    of ptb-sessions."""
    if revision is None:
        return True
    try:
        return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
    except (ResolutionError, CommandError):
        return False


def newer_revision_error(revision: str, masked_url: str) -> SchemaError:
    """The error for a database at a revision this version does not know: a newer version of
    ptb-sessions migrated it."""
    return SchemaError(
        f"The database {masked_url} is at schema revision {revision}, which is newer than this "
        f"version of ptb-sessions knows (its newest is {head_revision()}): another program "
        "with a newer ptb-sessions migrated it. Upgrade ptb-sessions; the database was left "
        "untouched."
    )


async def checked_revision(engine: AsyncEngine, *, create: bool) -> str | None:
    """The revision the database is at (:obj:`None`: not migrated), for ``ensure_schema``.

    Args:
        engine: The database's engine.
        create: Whether the database may be created. If not, a missing SQLite file is
            reported as not migrated without connecting, which would create it empty.

    Raises:
        SchemaError: The database is at a revision this version does not know.
    """
    path = sqlite_path(engine.url)
    if not create and path is not None and not path.exists():
        return None
    current = await current_revision(engine)
    if not is_known(current):
        assert current is not None
        raise newer_revision_error(current, mask_url(engine.url))
    return current


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
