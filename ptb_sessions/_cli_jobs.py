"""``ptb-sessions jobs``: the stored JobQueue jobs of ``store_jobs=True``.

.. code-block:: text

    ptb-sessions [--url URL] jobs              list the stored jobs
    ptb-sessions [--url URL] jobs remove ID    remove one, by its APScheduler job id

Removing a job works while the bot runs: the bot drops it at its next due run (it finds no
stored run to claim). Nothing here imports a stored callback or decodes a job's data.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text
from sqlalchemy import Table, delete, func, select
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from ptb_sessions._cli_common import (
    CLIError,
    Deadline,
    dispose,
    has_table,
    open_database,
    require_head,
    stdout_console,
    utc_time,
)
from ptb_sessions._schema import MAX_JOB_ID_LENGTH, StoredJob

__all__ = [
    "COMMAND",
    "COUNT_JOBS",
    "JOBS_QUERY",
    "JOB_LINE_KEY",
    "add_jobs_parser",
    "has_jobs_table",
    "insert_jobs",
    "is_job_line",
    "job_line",
    "parse_job_line",
    "run_jobs",
]

#: The name of the command.
COMMAND: Final = "jobs"
#: In an ``export`` file, a stored job is the line ``{"job": {<its columns>}}``.
JOB_LINE_KEY: Final = "job"
_COLUMNS: Final = (
    "id",
    "name",
    "callback",
    "codec",
    "data",
    "chat_id",
    "user_id",
    "trigger",
    "options",
    "enabled",
    "next_run_at",
    "updated_at",
)
_TABLE = cast(Table, StoredJob.__table__)
_C = _TABLE.c
_TRIGGER_OPTIONS: Final = ("start_date", "end_date", "timezone", "jitter", "type")


def add_jobs_parser(commands: Any) -> None:
    """Add ``jobs`` to the subcommands ``commands`` of ``ptb-sessions``."""
    jobs = commands.add_parser(
        COMMAND,
        help="list the stored JobQueue jobs (store_jobs=True), or remove one",
        description="List the stored JobQueue jobs (id, name, callback, trigger, next run, chat, "
        "user, enabled), or remove one by its id. Never runs a job or imports its callback.",
    )
    jobs.set_defaults(run=run_jobs)
    actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    remove = actions.add_parser(
        "remove",
        help="remove the stored job ID (as the list shows it)",
        description="Remove the stored job ID, as `ptb-sessions jobs` lists it; the job never "
        "runs again, in any process.",
    )
    remove.add_argument("job_id", metavar="ID")


def describe_trigger(text: str) -> str:
    """A short description of a stored trigger, e.g. ``every 60s`` or ``cron hour=9``."""
    try:
        fields = json.loads(text)
        kind = fields.get("type")
    except (ValueError, AttributeError):
        return text
    if kind == "date":
        return f"once at {fields.get('run_date')}"
    if kind == "interval":
        return f"every {fields.get('seconds'):g}s"
    if kind == "cron":
        parts = [
            f"{name}={value}" for name, value in fields.items() if name not in _TRIGGER_OPTIONS
        ]
        return "cron " + " ".join(parts)
    return text


def _cell(value: Any) -> Text:
    """A table cell printed literally: no markup or escape sequence in it is interpreted."""
    text = "" if value is None else str(value)
    return Text(
        "".join(
            char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
            for char in text
        )
    )


def _read_jobs(connection: Connection) -> list[Any]:
    return list(connection.execute(select(_TABLE).order_by(_C.next_run_at, _C.id)))


def _delete_job(job_id: str) -> Callable[[Connection], int]:
    def remove(connection: Connection) -> int:
        return int(connection.execute(delete(_TABLE).where(_C.id == job_id)).rowcount or 0)

    return remove


async def _list(url: URL, deadline: Deadline) -> int:
    database = open_database(url, create=False, timeout=deadline.seconds)
    try:
        await deadline(require_head(database), "Reading the schema revision")
        rows = await database.run("Reading the stored jobs", _read_jobs, read_only=True)
    finally:
        await dispose(database, deadline)
    table = RichTable()
    table.add_column("id", no_wrap=True)
    for column in ("name", "callback", "trigger", "next run", "chat", "user", "enabled"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            _cell(row.id),
            _cell(row.name),
            _cell(row.callback),
            _cell(describe_trigger(row.trigger)),
            _cell(utc_time(row.next_run_at, "paused")),
            _cell(row.chat_id),
            _cell(row.user_id),
            _cell("yes" if row.enabled else "no"),
        )
    out = stdout_console()
    if not out.is_terminal:  # piped: every id and reference whole, one job per line
        out = Console(file=sys.stdout, highlight=False, width=100_000)
    out.print(table)
    out.print(f"{len(rows):,} stored jobs in {database.masked_url}", markup=False)
    return 0


async def _remove(url: URL, job_id: str, deadline: Deadline) -> int:
    database = open_database(url, create=False, timeout=deadline.seconds)
    try:
        await deadline(require_head(database), "Reading the schema revision")
        removed = await database.run(f"Removing the job {job_id!r}", _delete_job(job_id))
    finally:
        await dispose(database, deadline)
    if not removed:
        raise CLIError(
            f"there is no stored job with the id {job_id!r} in {database.masked_url} (see "
            "`ptb-sessions jobs`)"
        )
    stdout_console().print(f"removed the job {job_id!r} from {database.masked_url}", markup=False)
    return 0


async def run_jobs(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    """Run ``ptb-sessions jobs`` with the parsed ``args``; every database call within
    ``deadline``."""
    if args.jobs_command == "remove":
        return await _remove(url, args.job_id, deadline)
    return await _list(url, deadline)


# -- export and import ----------------------------------------------------------------------
#
# In an ``export`` file a stored job is one line ``{"job": {<its columns>}}``, after the rows.


#: The stored jobs, in the order ``export`` writes them.
JOBS_QUERY: Final = select(*(_C[name] for name in _COLUMNS)).order_by(_C.id)
#: The statement that counts the stored jobs.
COUNT_JOBS: Final = select(func.count()).select_from(_TABLE)


async def has_jobs_table(connection: AsyncConnection) -> bool:
    """Whether the database holds the table of the stored jobs (revision 0002 and later)."""
    return await has_table(connection, _TABLE)


def job_line(row: Sequence[Any]) -> str:
    """The line of an ``export`` file for ``row`` (a result row of :data:`JOBS_QUERY`)."""
    values = dict(zip(_COLUMNS, row))
    values["enabled"] = bool(values["enabled"])
    for name in ("next_run_at", "updated_at"):
        if values[name] is not None:
            values[name] = float(values[name])
    line = {JOB_LINE_KEY: values}
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"


def is_job_line(obj: Any) -> bool:
    """Whether a decoded line of an ``export`` file is a stored job."""
    return isinstance(obj, dict) and set(obj) == {JOB_LINE_KEY}


def _json_text(values: dict[str, Any], name: str) -> None:
    try:
        json.loads(values[name])
    except ValueError:
        raise ValueError(f"the job's {name} must be JSON text") from None


def parse_job_line(obj: dict[str, Any]) -> dict[str, Any]:
    """The column values of the job line ``obj`` (see :func:`is_job_line`).

    Raises:
        ValueError: ``obj`` is not a stored job; the message says which field is wrong.
    """
    values = obj[JOB_LINE_KEY]
    if not isinstance(values, dict) or set(values) != set(_COLUMNS):
        raise ValueError(f"a job needs exactly the fields {', '.join(_COLUMNS)}")
    for name in ("id", "callback", "codec", "trigger", "options"):
        if not isinstance(values[name], str):
            raise ValueError(f"the job's {name} must be a string")
    if not 0 < len(values["id"]) <= MAX_JOB_ID_LENGTH:
        raise ValueError(f"the job's id must have 1 to {MAX_JOB_ID_LENGTH} characters")
    for name in ("name", "data"):
        if values[name] is not None and not isinstance(values[name], str):
            raise ValueError(f"the job's {name} must be a string or null")
    for name in ("chat_id", "user_id"):
        if values[name] is not None and type(values[name]) is not int:
            raise ValueError(f"the job's {name} must be an integer or null")
    if not isinstance(values["enabled"], bool):
        raise ValueError("the job's enabled must be true or false")
    for name in ("next_run_at", "updated_at"):
        value = values[name]
        if value is None and name == "next_run_at":
            continue
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"the job's {name} must be a number")
    _json_text(values, "trigger")
    _json_text(values, "options")
    return dict(values)


async def insert_jobs(
    connection: AsyncConnection, rows: Sequence[dict[str, Any]], *, replace: bool, url: str
) -> None:
    """Insert the stored jobs ``rows`` (from :func:`parse_job_line`).

    Raises:
        CLIError: A job with one of these ids is already stored, and not ``replace``.
    """
    ids = [row["id"] for row in rows]
    taken = (await connection.execute(select(_C.id).where(_C.id.in_(ids)).limit(1))).first()
    if taken is not None:
        if not replace:
            raise CLIError(
                f"the job {taken[0]!r} is already in {url}; nothing was imported (pass "
                "--replace to overwrite the jobs of the file)"
            )
        await connection.execute(delete(_TABLE).where(_C.id.in_(ids)))
    await connection.execute(_TABLE.insert(), list(rows))
