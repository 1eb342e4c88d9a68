"""What the commands of ``ptb-sessions`` share: the error that becomes one line on stderr,
opening a database without creating or changing it, progress bars and consoles."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy.engine import URL
from sqlalchemy.exc import SQLAlchemyError

from ptb_sessions import _alembic
from ptb_sessions._store import Database

__all__ = [
    "CLIError",
    "current_revision",
    "open_database",
    "progress_bar",
    "require_head",
    "stderr_console",
    "stdout_console",
]


class CLIError(Exception):
    """A mistake or failure the command reports as one line on stderr (``ptb-sessions:
    error: <message>``) before exiting with :attr:`exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def stdout_console(file: TextIO | None = None) -> Console:
    """A console on stdout (looked up at call time, so redirections and tests see it)."""
    return Console(file=file or sys.stdout, highlight=False, soft_wrap=True)


def stderr_console() -> Console:
    """A console on stderr, for progress bars."""
    return Console(file=sys.stderr, highlight=False)


def progress_bar() -> Progress:
    """A progress bar on stderr. It is drawn only when stderr is a terminal and vanishes when
    done, so piped output and error messages stay clean."""
    console = stderr_console()
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


def sqlite_path(url: URL) -> Path | None:
    """The file of an SQLite URL, or :obj:`None` (not SQLite, or an in-memory database)."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def open_database(url: URL, *, create: bool) -> Database:
    """A :class:`~ptb_sessions._store.Database` on ``url``.

    Args:
        url: The asyncio URL.
        create: Whether the command may create the database (and its schema). If not, the
            database must already be migrated to head (checked by :func:`require_head`) and
            a missing SQLite file is an error rather than created empty.

    Raises:
        CLIError: ``create`` is false and the SQLite file does not exist.
    """
    database = Database(url, auto_upgrade=create)
    path = sqlite_path(url)
    if not create and path is not None and not path.exists():
        raise CLIError(
            f"there is no database file {path} (run `ptb-sessions --url "
            f"'{database.masked_url}' db upgrade` to create it)"
        )
    return database


async def current_revision(database: Database) -> str | None:
    """The schema revision of ``database`` (:obj:`None`: not migrated).

    Raises:
        ptb_sessions.StorageError: The database cannot be reached (password masked).
    """
    try:
        return await _alembic.current_revision(database.engine)
    except (SQLAlchemyError, OSError) as exc:
        raise database.error(exc, "Reading the schema revision") from exc


async def require_head(database: Database) -> str:
    """Check that ``database`` is at the schema revision this version needs, without changing
    it: the read commands never create or upgrade the schema.

    Returns:
        The head revision.

    Raises:
        CLIError: The database is not migrated, or at another revision.
    """
    head = _alembic.head_revision()
    current = await current_revision(database)
    if current != head:
        state = "is not migrated" if current is None else f"is at schema revision {current}"
        raise CLIError(
            f"the database {database.masked_url} {state}, but ptb-sessions needs revision "
            f"{head}: run `ptb-sessions --url '{database.masked_url}' db upgrade` first (this "
            "command never changes the schema)"
        )
    return head
