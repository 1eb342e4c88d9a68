"""``ptb-sessions export`` and ``import``: a backup of the rows and jobs, and back.

The JSONL format of ``export`` / ``import`` is a lossless backup a user can read and diff: one
JSON object per line. First the rows, with the fields of :data:`FIELDS` in that order, sorted
by namespace and key (by code point, on every backend); ``data`` is the stored text as is
(JSON, or base64 for pickled rows), so importing it gives identical rows, ``version`` and
timestamps included. Then the stored jobs of ``store_jobs=True``, one line
``{"job": {<its columns>}}`` each, sorted by id (see :mod:`ptb_sessions._cli_jobs`); a
database at revision 0001 has no jobs table and exports rows only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO, cast

from sqlalchemy import Table, delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from ptb_sessions._cli_common import (
    CLIError,
    Deadline,
    plural,
    progress_bar,
    require_migrated,
)
from ptb_sessions._cli_jobs import (
    COUNT_JOBS,
    JOBS_QUERY,
    has_jobs_table,
    insert_jobs,
    is_job_line,
    job_line,
    parse_job_line,
)
from ptb_sessions._schema import MAX_NAMESPACE_LENGTH, StoredRow
from ptb_sessions._store import Database, check_key

__all__ = [
    "FIELDS",
    "Transferred",
    "export_jsonl",
    "import_jsonl",
]

#: The fields of one exported row, in the order they are written.
FIELDS: Final = (
    "namespace",
    "key",
    "codec",
    "data",
    "version",
    "data_version",
    "touched_at",
    "expires_at",
)
_TABLE = cast(Table, StoredRow.__table__)
_C = _TABLE.c
_CHUNK: Final = 500
_BATCH: Final = 1000
_INT32: Final = 1 << 31


@dataclass(frozen=True, slots=True)
class Transferred:
    """How much ``export`` wrote or ``import`` inserted."""

    rows: int
    jobs: int

    def __str__(self) -> str:
        if not self.jobs:
            return plural(self.rows, "row")
        return f"{plural(self.rows, 'row')} and {plural(self.jobs, 'job')}"


# -- export -------------------------------------------------------------------------------


def _row_line(row: Sequence[Any]) -> str:
    obj = dict(zip(FIELDS, row))
    for name in ("data_version", "touched_at", "expires_at"):
        if obj[name] is not None:
            obj[name] = float(obj[name])
    obj["version"] = int(obj["version"])
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"


def _write(file: TextIO, line: str, name: str) -> None:
    try:
        file.write(line)
    except OSError as exc:
        raise CLIError(f"cannot write {name}: {exc.strerror or exc}") from exc


def _export_target(name: str, *, force: bool) -> tuple[Path | None, Path | None]:
    """Where ``export`` writes ``name``: ``(file to open directly, None)`` for a device, pipe
    or socket (also through a symlink), ``(None, regular file to replace)`` otherwise;
    ``(None, None)`` for standard output.

    Raises:
        CLIError: ``name`` is an existing regular file (directly or through a symlink) and
            ``force`` is false, or a directory.
    """
    if name == "-":
        return None, None
    path = Path(name)
    try:
        status = path.stat()  # follows symlinks
    except FileNotFoundError:
        return None, Path(os.path.realpath(path))  # a dangling symlink: create its target
    except OSError as exc:
        raise CLIError(f"cannot write {name}: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(status.st_mode):
        raise CLIError(f"cannot write {name}: it is a directory")
    if not stat.S_ISREG(status.st_mode):
        return path, None  # a device, pipe or socket: written through, never replaced
    if not force:
        link = " (through a symlink)" if path.is_symlink() else ""
        raise CLIError(
            f"{name} already exists{link}; nothing was written (pass --force to replace it, "
            "or export to a new file)"
        )
    return None, Path(os.path.realpath(path))  # replace the file, keep the symlink


async def _batches(
    connection: AsyncConnection, query: Any, deadline: Deadline, what: str
) -> AsyncIterator[Sequence[Any]]:
    """The result rows of ``query``, streamed in batches, each fetch within the deadline."""
    result = await deadline(connection.stream(query.execution_options(yield_per=_BATCH)), what)
    while rows := await deadline(result.fetchmany(_BATCH), what):
        yield rows


async def _count(connection: AsyncConnection, query: Any, deadline: Deadline, what: str) -> int:
    return int((await deadline(connection.execute(query), what)).scalar_one())


async def _write_lines(
    database: Database, file: TextIO, name: str, deadline: Deadline
) -> Transferred:
    namespace, key = database.code_point_order(_C.namespace), database.code_point_order(_C.key)
    rows_query = select(*(_C[field] for field in FIELDS)).order_by(namespace, key)
    written = {"rows": 0, "jobs": 0}
    with progress_bar() as bar:
        try:
            async with contextlib.AsyncExitStack() as stack:
                connection = await deadline(
                    stack.enter_async_context(database.engine.connect()), "Connecting"
                )
                await connection.execution_options(ptb_sessions_read_only=True)
                # one snapshot of both tables
                await deadline(stack.enter_async_context(connection.begin()), "Exporting")
                parts: list[tuple[str, Any, Any, Callable[[Sequence[Any]], str]]] = [
                    ("rows", select(func.count()).select_from(_TABLE), rows_query, _row_line)
                ]
                if await deadline(has_jobs_table(connection), "Reading the schema"):
                    parts.append(("jobs", COUNT_JOBS, JOBS_QUERY, job_line))
                total = 0
                for what, count, _, _ in parts:
                    total += await _count(connection, count, deadline, f"Counting the {what}")
                task = bar.add_task(f"Exporting to {name}", total=total)
                for what, _, query, line_of in parts:
                    async for batch in _batches(connection, query, deadline, f"Exporting {what}"):
                        for row in batch:
                            _write(file, line_of(row), name)
                        written[what] += len(batch)
                        bar.advance(task, len(batch))
        except (SQLAlchemyError, OSError) as exc:
            raise database.error(exc, "Exporting the rows") from exc
    return Transferred(written["rows"], written["jobs"])


async def export_jsonl(
    database: Database, name: str, *, force: bool = False, deadline: Deadline
) -> Transferred:
    """Write every row and stored job of ``database`` to the file ``name`` (JSONL, see the
    module docs; ``-`` is standard output). A regular file is written atomically (it appears
    only once complete) and replaces an existing one only with ``force``; a device or pipe is
    written through. Any migrated revision can be exported (a backup before an upgrade).

    Raises:
        CLIError: The database is not migrated, or the file cannot be written.
        ptb_sessions.StorageError: The database failed.
    """
    direct, replaced = _export_target(name, force=force)
    await deadline(require_migrated(database), "Reading the schema revision")
    if replaced is None:
        if direct is None:
            written = await _write_lines(database, sys.stdout, name, deadline)
            sys.stdout.flush()
            return written
        try:
            file = direct.open("w", encoding="utf-8", newline="\n")
        except OSError as exc:
            raise CLIError(f"cannot write {name}: {exc.strerror or exc}") from exc
        with file:
            return await _write_lines(database, file, name, deadline)
    temporary = replaced.with_name(f".{replaced.name}.{os.getpid()}.tmp")
    try:
        try:
            file = temporary.open("x", encoding="utf-8", newline="\n")
        except OSError as exc:
            raise CLIError(f"cannot write {name}: {exc.strerror or exc}") from exc
        with file:
            written = await _write_lines(database, file, name, deadline)
        try:
            temporary.replace(replaced)
        except OSError as exc:
            raise CLIError(f"cannot write {name}: {exc.strerror or exc}") from exc
    finally:
        temporary.unlink(missing_ok=True)
    return written


# -- import -------------------------------------------------------------------------------


def _number(obj: dict[str, Any], name: str, *, optional: bool) -> float | None:
    value = obj[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name!r} must be a number{' or null' if optional else ''}")
    return float(value)


def _validate(obj: Any) -> dict[str, Any]:
    """The row to insert for one parsed line. Raises :exc:`ValueError` saying what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
    missing = [name for name in FIELDS if name not in obj]
    unknown = sorted(set(obj) - set(FIELDS))
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if unknown:
            parts.append(f"unknown {', '.join(unknown)}")
        raise ValueError(f"fields: {'; '.join(parts)}")
    namespace, key, codec, data = obj["namespace"], obj["key"], obj["codec"], obj["data"]
    if not isinstance(namespace, str) or not isinstance(key, str):
        raise ValueError("'namespace' and 'key' must be strings")
    if len(namespace) > MAX_NAMESPACE_LENGTH:
        raise ValueError(f"'namespace' is longer than {MAX_NAMESPACE_LENGTH} characters")
    check_key(namespace, key)
    if not isinstance(codec, str) or not 0 < len(codec) <= 16:
        raise ValueError("'codec' must be a string of 1 to 16 characters")
    if data is not None and not isinstance(data, str):
        raise ValueError("'data' must be a string or null")
    version = obj["version"]
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not -_INT32 <= version < _INT32
    ):
        raise ValueError("'version' must be a 32-bit integer")
    return {
        "namespace": namespace,
        "key": key,
        "codec": codec,
        "data": data,
        "version": version,
        "data_version": _number(obj, "data_version", optional=True),
        "touched_at": _number(obj, "touched_at", optional=False),
        "expires_at": _number(obj, "expires_at", optional=True),
    }


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


@dataclass(frozen=True, slots=True)
class _Line:
    """One checked line of an ``export`` file: a row or a stored job, as column values."""

    number: int
    kind: Literal["row", "job"]
    values: dict[str, Any]

    @property
    def identity(self) -> tuple[str, ...]:
        """What two lines of one file must not share."""
        if self.kind == "job":
            return ("job", self.values["id"])
        return ("row", self.values["namespace"], self.values["key"])

    def describe(self) -> str:
        if self.kind == "job":
            return f"the job {self.values['id']!r}"
        return f"{self.values['namespace']}[{self.values['key']!r}]"


def _parsed(obj: Any) -> tuple[Literal["row", "job"], dict[str, Any]]:
    """What one decoded line holds. Raises :exc:`ValueError` saying what is wrong."""
    if is_job_line(obj):
        return "job", parse_job_line(obj)
    return "row", _validate(obj)


def _lines(path: Path, name: str) -> Iterator[_Line]:
    """Each line of ``path`` (called ``name`` in errors), checked.

    Raises:
        CLIError: A line is not a valid row or job (a truncated or corrupted file), naming
            the line.
    """
    try:
        with path.open("rb") as file:
            for number, raw in enumerate(file, 1):
                where = f"{name}:{number}"
                if not raw.endswith(b"\n"):
                    # the last line of a complete export ends with a newline
                    hint = "the file is truncated (the last line has no newline)"
                else:
                    hint = "the file is corrupted"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise CLIError(
                        f"{where}: not UTF-8 ({exc.reason} at byte {exc.start}); {hint}; "
                        "nothing was imported"
                    ) from None
                if not text.strip():
                    raise CLIError(f"{where}: empty line; {hint}; nothing was imported")
                try:
                    obj = json.loads(text, parse_constant=_reject_constant)
                except ValueError as exc:
                    detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                    column = (
                        f" at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
                    )
                    raise CLIError(
                        f"{where}: not valid JSON ({detail}{column}); {hint}; nothing was imported"
                    ) from None
                try:
                    kind, values = _parsed(obj)
                except ValueError as exc:
                    what = "stored job" if is_job_line(obj) else "ptb-sessions row"
                    raise CLIError(
                        f"{where}: not a {what} ({exc}); {hint}; nothing was imported"
                    ) from None
                yield _Line(number, kind, values)
    except OSError as exc:
        raise CLIError(f"cannot read {name}: {exc.strerror or exc}") from exc


def _check_file(path: Path, name: str) -> Transferred:
    """Validate every line of ``path`` before anything is written. Returns what it holds."""
    if not path.exists():
        raise CLIError(f"there is no file {name}")
    if path.is_dir():
        raise CLIError(f"cannot read {name}: it is a directory")
    seen: dict[tuple[str, ...], int] = {}
    jobs = 0
    for line in _lines(path, name):
        first = seen.setdefault(line.identity, line.number)
        if first != line.number:
            raise CLIError(
                f"{name}:{line.number}: {line.describe()} is already on line {first}; "
                "nothing was imported"
            )
        jobs += line.kind == "job"
    return Transferred(len(seen) - jobs, jobs)


@contextlib.contextmanager
def _readable_twice(name: str) -> Iterator[Path]:
    """A path to read the rows of ``name`` from twice (checked, then inserted): the file
    itself, or for ``-`` (standard input) and pipes a temporary copy."""
    path = Path(name)
    if name != "-" and (not path.exists() or path.is_file() or path.is_dir()):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="ptb-sessions-import-") as directory:
        copy = Path(directory) / "rows.jsonl"
        try:
            with copy.open("wb") as out:
                if name == "-":
                    shutil.copyfileobj(sys.stdin.buffer, out)
                else:
                    with path.open("rb") as source:
                        shutil.copyfileobj(source, out)
        except OSError as exc:
            raise CLIError(f"cannot read {name}: {exc.strerror or exc}") from exc
        yield copy


async def _insert_chunk(
    connection: AsyncConnection, rows: list[dict[str, Any]], *, replace: bool, url: str
) -> None:
    by_namespace: dict[str, list[str]] = {}
    for row in rows:
        by_namespace.setdefault(row["namespace"], []).append(row["key"])
    for namespace, keys in by_namespace.items():
        taken = (
            await connection.execute(
                select(_C.key).where(_C.namespace == namespace, _C.key.in_(keys)).limit(1)
            )
        ).first()
        if taken is None:
            continue
        if not replace:
            raise CLIError(
                f"{namespace}[{taken[0]!r}] is already in {url}; nothing was imported (import "
                "into an empty database, or pass --replace to overwrite the rows of the file)"
            )
        await connection.execute(delete(_TABLE).where(_C.namespace == namespace, _C.key.in_(keys)))
    await connection.execute(_TABLE.insert(), rows)


async def import_jsonl(
    database: Database, name: str, *, replace: bool = False, deadline: Deadline
) -> Transferred:
    """Insert the rows and stored jobs of the file ``name`` (written by :func:`export_jsonl`;
    ``-`` is standard input) as they are, in one transaction: first every line is checked,
    then everything is written or nothing. Creates or upgrades the schema if needed.

    Raises:
        CLIError: The file is missing, a line is not a valid row or job (naming the line), or
            a row or job already exists (without ``replace``).
        ptb_sessions.StorageError: The database failed; nothing was written.
    """
    shown = "<stdin>" if name == "-" else name
    url = database.masked_url
    with _readable_twice(name) as path:
        total = _check_file(path, shown)
        what = f"Importing {shown}"
        with progress_bar() as bar:
            task = bar.add_task(what, total=total.rows + total.jobs)
            async with contextlib.AsyncExitStack() as stack:
                connection = await deadline(
                    stack.enter_async_context(database.connect(what)), what
                )

                async def insert(kind: str, chunk: list[dict[str, Any]]) -> None:
                    if kind == "job":
                        inserting = insert_jobs(connection, chunk, replace=replace, url=url)
                    else:
                        inserting = _insert_chunk(connection, chunk, replace=replace, url=url)
                    await deadline(inserting, what)
                    bar.advance(task, len(chunk))

                chunks: dict[str, list[dict[str, Any]]] = {"row": [], "job": []}
                for line in _lines(path, shown):
                    chunk = chunks[line.kind]
                    chunk.append(line.values)
                    if len(chunk) == _CHUNK:
                        await insert(line.kind, chunk)
                        chunks[line.kind] = []
                for kind, chunk in chunks.items():
                    if chunk:
                        await insert(kind, chunk)
                await deadline(stack.aclose(), what)  # the commit
    return total
