"""What the commands of ``ptb-sessions`` share: the error that becomes one line on stderr,
opening a database without creating or changing it, deadlines for database calls, printing
database values literally, progress bars and consoles."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import re
import sys
from collections.abc import Awaitable
from typing import Final, TextIO, TypeVar, cast

from alembic.script import ScriptDirectory
from alembic.script.revision import ResolutionError
from alembic.util import CommandError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy import Table, func, inspect, select
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from ptb_sessions import _alembic
from ptb_sessions._schema import StoredJob, StoredRow
from ptb_sessions._store import DEFAULT_TIMEOUT, Database
from ptb_sessions._url import sqlite_path

__all__ = [
    "DEFAULT_TIMEOUT",
    "PROG",
    "CLIError",
    "Deadline",
    "current_revision",
    "destroyed_by_downgrade",
    "dispose",
    "has_table",
    "literal",
    "open_database",
    "plural",
    "progress_bar",
    "require_head",
    "require_migrated",
    "stderr_console",
    "stdout_console",
    "utc_time",
]

_T = TypeVar("_T")
PROG: Final = "ptb-sessions"
#: The table each revision creates (and its downgrade drops), and what its rows are called.
_CREATED_BY: Final = {
    "0001": (cast(Table, StoredRow.__table__), "stored row"),
    "0002": (cast(Table, StoredJob.__table__), "stored job"),
}
_RELATIVE: Final = re.compile(r"-[0-9]+")
# C0 and C1 control characters, DEL, and the bidirectional controls that reorder what a
# terminal shows.
_UNPRINTABLE: Final = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


class CLIError(Exception):
    """A mistake or failure the command reports as one line on stderr (``ptb-sessions:
    error: <message>``) before exiting with :attr:`exit_code`."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def literal(text: str) -> str:
    r"""``text`` with every control character escaped (``\x1b``, ``\u202e``), so a value from
    the database cannot move the cursor, recolor the terminal or reorder what it shows."""

    def escape(match: re.Match[str]) -> str:
        char = match.group(0)
        return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"

    return _UNPRINTABLE.sub(escape, text)


def plural(count: int, noun: str) -> str:
    """``1 row``, ``2 rows``, ``1,000 rows``."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


class Deadline:
    """Bounds each database call of a command by ``--timeout`` seconds.

    Args:
        seconds: The longest one call may take.
        where: The masked URL of the database, for the error.
    """

    __slots__ = ("seconds", "where")

    def __init__(self, seconds: float, where: str) -> None:
        self.seconds = seconds
        self.where = where

    async def __call__(self, call: Awaitable[_T], what: str) -> _T:
        """The result of ``call``.

        Raises:
            CLIError: ``call`` took longer than :attr:`seconds`.
        """
        try:
            return await asyncio.wait_for(call, self.seconds)
        except asyncio.TimeoutError:
            raise CLIError(
                f"{what} failed on {self.where}: no answer within {self.seconds:g} s (--timeout)"
            ) from None


def stdout_console(file: TextIO | None = None) -> Console:
    """A console on stdout (looked up at call time, so redirections and tests see it). It
    interprets no markup and no emoji codes: what it prints is printed as it is."""
    return Console(
        file=file or sys.stdout, highlight=False, soft_wrap=True, markup=False, emoji=False
    )


def stderr_console() -> Console:
    """A console on stderr, for progress bars and messages."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True, markup=False, emoji=False)


def progress_bar() -> Progress:
    """A progress bar on stderr. It is drawn only when stderr is a terminal and vanishes when
    done, so piped output and error messages stay clean."""
    console = stderr_console()
    return Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


async def dispose(database: Database, deadline: Deadline) -> None:
    """Close ``database``'s connections at the end of a command, within ``deadline``; a
    stalled server is ignored here (the command's own error says so)."""
    with contextlib.suppress(CLIError):
        await deadline(database.dispose(), "Closing the connections")


def open_database(url: URL, *, create: bool, timeout: float = DEFAULT_TIMEOUT) -> Database:
    """A :class:`~ptb_sessions._store.Database` on ``url``.

    Args:
        url: The asyncio URL.
        create: Whether the command may create the database (and its schema). If not, the
            database must already be migrated to head (checked by :func:`require_head`) and
            a missing SQLite file is an error rather than created empty.
        timeout: Seconds any one database call may take (``--timeout``).

    Raises:
        CLIError: ``create`` is false and the SQLite file does not exist.
    """
    database = Database(url, auto_upgrade=create, timeout=timeout)
    path = sqlite_path(url)
    if not create and path is not None and not path.exists():
        raise CLIError(
            f"there is no database file {path} (run `{PROG} --url "
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


def _downgraded_revisions(current: str, target: str) -> list[str] | None:
    """The revisions whose downgrade runs to go from ``current`` down to ``target`` (``base``,
    a revision, or ``-N``); :obj:`None` if alembic cannot tell."""
    script = ScriptDirectory.from_config(_alembic.alembic_config())
    if _RELATIVE.fullmatch(target):
        steps, revisions = int(target[1:]), []
        revision: str | None = current
        while steps and revision is not None:
            revisions.append(revision)
            down = script.get_revision(revision).down_revision
            revision = down if isinstance(down, str) or down is None else None
            steps -= 1
        return revisions
    try:
        return [step.revision for step in script.iterate_revisions(current, target)]
    except (CommandError, ResolutionError):
        return None


def _has_table(connection: Connection, name: str) -> bool:
    return inspect(connection).has_table(name)


async def has_table(connection: AsyncConnection, table: Table) -> bool:
    """Whether the database of ``connection`` holds ``table`` (the schema revisions add
    tables: the jobs table comes with 0002)."""
    return await connection.run_sync(_has_table, table.name)


async def destroyed_by_downgrade(database: Database, current: str, target: str) -> list[str]:
    """What ``db downgrade target`` would destroy, e.g. ``["12 stored rows", "2 stored
    jobs"]`` (only what is there). A target alembic cannot resolve counts everything."""
    revisions = _downgraded_revisions(current, target)
    dropped = [
        (table, noun)
        for revision, (table, noun) in _CREATED_BY.items()
        if revisions is None or revision in revisions
    ]
    counts: list[str] = []
    try:
        async with database.engine.connect() as connection:
            for table, noun in dropped:
                if not await has_table(connection, table):
                    continue
                result = await connection.execute(select(func.count()).select_from(table))
                if count := int(result.scalar_one()):
                    counts.append(plural(count, noun))
    except (SQLAlchemyError, OSError) as exc:
        raise database.error(exc, "Counting the rows") from exc
    return counts


async def require_migrated(database: Database) -> str:
    """Check that ``database`` is migrated to a revision this version knows, without changing
    it (``export`` reads an older revision too: the backup before an upgrade).

    Returns:
        The revision the database is at.

    Raises:
        CLIError: The database is not migrated.
        ptb_sessions.SchemaError: The database is at a revision newer than this version knows.
    """
    current = await current_revision(database)
    if not _alembic.is_known(current):
        assert current is not None
        raise _alembic.newer_revision_error(current, database.masked_url)
    if current is None:
        raise _not_at_head(database, current)
    return current


def _not_at_head(database: Database, current: str | None) -> CLIError:
    state = "is not migrated" if current is None else f"is at schema revision {current}"
    return CLIError(
        f"the database {database.masked_url} {state}, but ptb-sessions needs revision "
        f"{_alembic.head_revision()}: run `{PROG} --url '{database.masked_url}' db upgrade` "
        "first (this command never changes the schema)"
    )


async def require_head(database: Database) -> str:
    """Check that ``database`` is at the schema revision this version needs, without changing
    it: the read commands never create or upgrade the schema.

    Returns:
        The head revision.

    Raises:
        CLIError: The database is not migrated, or at another revision.
        ptb_sessions.SchemaError: The database is at a revision newer than this version knows.
    """
    current = await require_migrated(database)
    if current != _alembic.head_revision():
        raise _not_at_head(database, current)
    return current


def utc_time(seconds: float | None, missing: str) -> str:
    """``seconds`` since the epoch as an ISO 8601 UTC time (``2026-12-01T09:00:00Z``), or
    ``missing`` for :obj:`None`."""
    if seconds is None:
        return missing
    moment = dtm.datetime.fromtimestamp(seconds, dtm.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
