"""``ptb-sessions jobs``: the stored JobQueue jobs of ``store_jobs=True``.

.. code-block:: text

    ptb-sessions [--url URL] jobs              list the stored jobs
    ptb-sessions [--url URL] jobs remove ID    remove one, by its APScheduler job id

Removing a job works while the bot runs: the bot drops it at its next due run (it finds no
stored run to claim). Nothing here imports a stored callback or decodes a job's data.
"""

from __future__ import annotations

import argparse
import datetime as dtm
import json
import sys
from typing import Any, Final, cast

from rich.console import Console
from rich.table import Table as RichTable
from rich.text import Text
from sqlalchemy import Table, delete, select
from sqlalchemy.engine import URL

from ptb_sessions._cli_common import CLIError, open_database, require_head, stdout_console
from ptb_sessions._schema import StoredJob

__all__ = ["COMMAND", "add_jobs_parser", "run_jobs"]

#: The name of the command.
COMMAND: Final = "jobs"
_TABLE = cast(Table, StoredJob.__table__)
_C = _TABLE.c
_TRIGGER_OPTIONS: Final = ("start_date", "end_date", "timezone", "jitter", "type")


def add_jobs_parser(commands: Any) -> None:
    """Add ``jobs`` to the subcommands ``commands`` of ``ptb-sessions``."""
    jobs = commands.add_parser(
        COMMAND, help="list the stored JobQueue jobs (store_jobs=True), or remove one"
    )
    actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    remove = actions.add_parser("remove", help="remove the stored job ID (as the list shows it)")
    remove.add_argument("job_id", metavar="ID")


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "paused"
    moment = dtm.datetime.fromtimestamp(seconds, dtm.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


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


async def _list(url: URL) -> int:
    database = open_database(url, create=False)
    try:
        await require_head(database)
        async with database.connect("Reading the stored jobs", read_only=True) as connection:
            result = await connection.execute(select(_TABLE).order_by(_C.next_run_at, _C.id))
            rows = list(result)
    finally:
        await database.dispose()
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
            _cell(_when(row.next_run_at)),
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


async def _remove(url: URL, job_id: str) -> int:
    database = open_database(url, create=False)
    try:
        await require_head(database)
        async with database.connect(f"Removing the job {job_id!r}") as connection:
            result = await connection.execute(delete(_TABLE).where(_C.id == job_id))
            removed = result.rowcount
    finally:
        await database.dispose()
    if not removed:
        raise CLIError(
            f"there is no stored job with the id {job_id!r} in {database.masked_url} (see "
            "`ptb-sessions jobs`)"
        )
    stdout_console().print(f"removed the job {job_id!r} from {database.masked_url}", markup=False)
    return 0


async def run_jobs(url: URL, args: argparse.Namespace) -> int:
    """Run ``ptb-sessions jobs`` with the parsed ``args``."""
    if args.jobs_command == "remove":
        return await _remove(url, args.job_id)
    return await _list(url)
