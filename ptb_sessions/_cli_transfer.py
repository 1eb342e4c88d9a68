"""``ptb-sessions export``, ``import`` and ``import-pickle``: moving rows in and out.

The JSONL format of ``export`` / ``import`` is a lossless backup a user can read and diff: one
JSON object per line. First the rows, with the fields of :data:`FIELDS` in that order, sorted
by namespace and key (by code point, on every backend); ``data`` is the stored text as is
(JSON, or base64 for pickled rows), so importing it gives identical rows, ``version`` and
timestamps included. Then the stored jobs of ``store_jobs=True``, one line
``{"job": {<its columns>}}`` each, sorted by id (see :mod:`ptb_sessions._cli_jobs`); a
database at revision 0001 has no jobs table and exports rows only.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import math
import os
import pickle
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Literal, TextIO, cast

from sqlalchemy import Table, delete, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection
from telegram.ext import ExtBot, PicklePersistence

from ptb_sessions._cli_botscript import (
    MAIN,
    as_main,
    is_from_script,
    load_script,
    missing_main_name,
    scripts_defining,
)
from ptb_sessions._cli_common import (
    PROG,
    CLIError,
    Deadline,
    dispose,
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
from ptb_sessions._codec import Codec, JSONCodec, PickleCodec
from ptb_sessions._errors import SerializationError
from ptb_sessions._rows import encode_value
from ptb_sessions._schema import MAX_NAMESPACE_LENGTH, StoredRow
from ptb_sessions._sqlalchemypersistence import BUILTIN_NAMESPACES, SQLAlchemyPersistence
from ptb_sessions._store import Database, check_key
from ptb_sessions._types import default_name, registrable_classes

__all__ = [
    "FIELDS",
    "PickleImport",
    "Transferred",
    "export_jsonl",
    "import_jsonl",
    "import_pickle",
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
#: The suffixes of the files of a ``PicklePersistence(single_file=False)``.
PICKLE_SUFFIXES: Final = ("user_data", "chat_data", "bot_data", "callback_data", "conversations")
#: A token for the bot that unpickling puts where the pickled data held PTB's bot.
_PLACEHOLDER_TOKEN: Final = "123456:ptb-sessions-import-placeholder"


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
    namespace, key = _C.namespace, _C.key
    if database.dialect == "postgresql":  # code point order, whatever the database's collation
        namespace, key = namespace.collate("C"), key.collate("C")  # type: ignore[assignment]
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


# -- import-pickle --------------------------------------------------------------------------


def _pickle_layout(path: Path) -> bool:
    """Whether ``path`` is a single-file ``PicklePersistence`` (else the prefix of its files).

    Raises:
        CLIError: Neither ``path`` nor any ``path_<kind>`` file exists.
    """
    if path.is_file():
        return True
    if any(Path(f"{path}_{suffix}").is_file() for suffix in PICKLE_SUFFIXES):
        return False
    raise CLIError(
        f"there is no PicklePersistence file {path} (single_file=True), nor "
        f"{path}_user_data, {path}_chat_data, ... (single_file=False)"
    )


def _unpickling_error(path: Path, cause: BaseException | None, paths: Sequence[Path]) -> str:
    """Why the objects of the pickle file at ``path`` could not be rebuilt, and what to do."""
    searched = (
        f"--path {' '.join(str(p) for p in paths)}"
        if paths
        else "no --path was given (the current directory is not searched)"
    )
    if isinstance(cause, ModuleNotFoundError):
        return (
            f"cannot read {path}: its objects need the module {cause.name!r}, which cannot be "
            f"imported ({searched}); pass --path DIR, the directory of your bot's modules"
        )
    name = missing_main_name(cause)
    if name is not None:
        scripts = scripts_defining(name, paths)
        found = (
            f"the scripts {', '.join(map(str, scripts))} all define {name}, pass --path with "
            "the directory of the bot's alone"
            if len(scripts) > 1
            else f"no script directly in {searched} defines {name} at its top level"
        )
        return (
            f"cannot read {path}: its objects are of classes defined in the bot's __main__ "
            f"script ({cause}); {found}. Pass --path DIR with the directory of the bot's "
            "script (its top level runs, as an import would; its `if __name__ == "
            "'__main__':` part does not), or move those classes into a module of their own "
            "that the bot imports (e.g. models.py), run the bot once so PicklePersistence "
            f"saves the file again, then run `{PROG} import-pickle --path DIR`"
        )
    if isinstance(cause, AttributeError | ImportError):
        return (
            f"cannot read {path}: its objects need a class that cannot be found ({cause}; "
            f"{searched}); pass --path DIR, the directory of your bot's modules"
        )
    reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return f"cannot read {path}: not a PicklePersistence file{reason}"


@contextlib.contextmanager
def _importable_from(paths: Sequence[Path]) -> Iterator[None]:
    """Let unpickling import modules from ``paths`` (and only from the usual places else)."""
    added = [str(p.resolve()) for p in paths]
    for directory in added:
        if not Path(directory).is_dir():
            raise CLIError(f"--path {directory}: not a directory")
    sys.path[:0] = added
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for directory in added:
            sys.path.remove(directory)


@dataclass(frozen=True, slots=True)
class PickleImport:
    """What ``import-pickle`` did."""

    #: How many entries of each kind were copied.
    counts: dict[str, int]
    #: What the bot must pass as its codec to read the rows (``JSONCodec(types=[Cart])``),
    #: if they hold its own classes.
    codec: str | None


@dataclass(frozen=True, slots=True)
class _Pickled:
    """What a ``PicklePersistence`` file holds, and the bot script its classes came from."""

    data: dict[str, Any]
    script: ModuleType | None


async def _read_pickle(path: Path, single_file: bool) -> dict[str, Any]:
    source: PicklePersistence[Any, Any, Any] = PicklePersistence(path, single_file=single_file)
    # Pickled data may hold PTB's bot (replaced by a marker when pickled): a placeholder bot
    # stands in for it.
    source.set_bot(ExtBot(_PLACEHOLDER_TOKEN))
    data = {
        "user_data": await source.get_user_data(),
        "chat_data": await source.get_chat_data(),
        "bot_data": await source.get_bot_data(),
        "callback_data": await source.get_callback_data(),
    }
    if not single_file:  # a single file holds them (None if never loaded)
        await source.get_conversations("")
    conversations = {
        name: {key: state for key, state in states.items() if state is not None}
        for name, states in (source.conversations or {}).items()
    }
    data["conversations"] = {name: states for name, states in conversations.items() if states}
    callback_data = data["callback_data"]
    if not (isinstance(callback_data, tuple | list) and len(callback_data) == 2):
        data["callback_data"] = None  # old files hold {} when there is none
    return data


def _bot_script_for(cause: BaseException | None, paths: Sequence[Path]) -> ModuleType | None:
    """The bot script in ``paths`` that defines the ``__main__`` class unpickling missed
    (``cause``), loaded; :obj:`None` if there is not exactly one."""
    name = missing_main_name(cause)
    scripts = [] if name is None else scripts_defining(name, paths)
    if len(scripts) != 1:
        return None
    try:
        return load_script(scripts[0])
    except Exception as exc:
        raise CLIError(
            f"cannot load the bot script {scripts[0]} (for the class {name} of the pickle): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


async def _load_pickle(path: Path, paths: Sequence[Path]) -> _Pickled:
    """Everything a ``PicklePersistence`` stored at ``path``, read by PTB's own class. This
    unpickles the file, which runs any code it holds. The modules of its objects' classes are
    imported from ``paths``; classes of the bot's ``__main__`` come from the bot script in
    ``paths`` that defines them (see :mod:`ptb_sessions._cli_botscript`)."""
    single_file = _pickle_layout(path)
    script: ModuleType | None = None
    while True:
        try:
            with _importable_from(paths), as_main(script):
                return _Pickled(await _read_pickle(path, single_file), script)
        except TypeError as exc:  # how PicklePersistence reports unreadable files
            cause = exc.__cause__
            if cause is None or isinstance(cause, pickle.UnpicklingError | EOFError):
                reason = (
                    f"{exc} ({type(cause).__name__}: {cause})" if cause is not None else str(exc)
                )
                raise CLIError(f"cannot read {path}: {reason}") from exc
            if script is None:
                with _importable_from(paths):
                    script = _bot_script_for(cause, paths)
                if script is not None:
                    continue  # once more, with the bot script as __main__
            raise CLIError(_unpickling_error(path, cause, paths)) from exc


def _own_types(data: dict[str, Any], script: ModuleType | None) -> dict[str, type]:
    """The registrable classes in ``data``, by the name the bot's
    :class:`~ptb_sessions.JSONCodec` stores them under: ``module.QualName``, where the module
    of a class of the bot script is ``__main__``, as when the bot runs."""
    return {
        f"{MAIN}.{cls.__qualname__}" if is_from_script(cls, script) else default_name(cls): cls
        for cls in registrable_classes(data)
    }


def _types_argument(types: dict[str, type], script: ModuleType | None) -> str:
    """What the bot passes to read what was imported: ``JSONCodec(types=[Cart, models.S])``."""
    names = sorted(
        cls.__qualname__ if is_from_script(cls, script) else default_name(cls)
        for cls in types.values()
    )
    return f"JSONCodec(types=[{', '.join(names)}])"


def _check_encodable(codec: Codec, data: dict[str, Any]) -> None:
    """Encode every value before writing any, so an unencodable one stops the import whole."""

    def values() -> Iterator[tuple[str, Any]]:
        for kind in ("user_data", "chat_data"):
            for item_id, value in data[kind].items():
                yield f"{kind}[{item_id}]", value
        if data["bot_data"]:
            yield "bot_data", data["bot_data"]
        if data["callback_data"] is not None:
            yield "callback_data", data["callback_data"]
        for name, states in data["conversations"].items():
            for key, state in states.items():
                yield f"conversation:{name}[{list(key)}]", state

    for root, value in values():
        try:
            encode_value(codec, value, root, None)
        except SerializationError as exc:
            hint = (
                " (pass --codec pickle to store arbitrary objects)" if codec.name == "json" else ""
            )
            raise CLIError(f"{exc}; nothing was imported{hint}") from None


async def import_pickle(
    url: Any,
    path: Path,
    *,
    codec_name: str = "json",
    replace: bool = False,
    paths: Sequence[Path] = (),
    deadline: Deadline,
) -> PickleImport:
    """Copy the data of a ``PicklePersistence`` into the database through
    :class:`~ptb_sessions.SQLAlchemyPersistence`'s own ``update_*`` methods, then
    :meth:`~ptb_sessions.SQLAlchemyPersistence.flush`, so the rows are exactly those the
    persistence would write. Creates or upgrades the schema if needed. Reading the file runs
    any code it holds (it is a pickle); the classes of its objects are imported from
    ``paths``, and those of the bot's ``__main__`` script from that script in ``paths``. With
    the JSON codec, the objects of classes it supports are stored as registered types.

    Returns:
        How many entries of each kind were copied, and the ``types`` the bot must give its
        codec to read them.

    Raises:
        CLIError: The file is missing or unreadable, a class of its objects cannot be
            imported, a value cannot be encoded, or the database already holds PTB data
            (without ``replace``).
    """
    pickled = await _load_pickle(path, paths)
    if codec_name == "pickle" and pickled.script is not None:
        raise CLIError(
            f"the objects of {path} are of classes of the bot's __main__ script, which a "
            "pickled row could only name by a module the bot does not have; nothing was "
            "imported (import them with the JSON codec, the default: it stores them as "
            "registered types)"
        )
    data = pickled.data
    types = {} if codec_name == "pickle" else _own_types(data, pickled.script)
    codec: Codec = PickleCodec() if codec_name == "pickle" else JSONCodec(types=types)
    _check_encodable(codec, data)
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        url, codec=codec, timeout=deadline.seconds
    )
    database = persistence.database
    try:
        if not replace:
            await deadline(database.ensure_schema(), "Checking the schema")
            taken = [
                f"{namespace} ({rows} rows)"
                for namespace, rows, _, _ in await deadline(database.stats(), "Counting rows")
                if namespace in BUILTIN_NAMESPACES or namespace.startswith("conversation:")
            ]
            if taken:
                raise CLIError(
                    f"the database {database.masked_url} already holds PTB data: "
                    f"{', '.join(taken)}; nothing was imported (pass --replace to replace "
                    "the entries of the pickle file and keep the others)"
                )
        # Load what is stored, as Application.initialize does, so replaced rows are written
        # with their current versions.
        loads: list[Awaitable[Any]] = [
            persistence.get_user_data(),
            persistence.get_chat_data(),
            persistence.get_bot_data(),
            persistence.get_callback_data(),
        ]
        loads.extend(persistence.get_conversations(name) for name in data["conversations"])
        for load in loads:
            await deadline(load, "Reading the stored data")
        counts = await _write_pickled(persistence, data, path, deadline)
        await deadline(persistence.flush(), "Writing the rows")
    except BaseException:
        await dispose(database, deadline)
        raise
    return PickleImport(counts, _types_argument(types, pickled.script) if types else None)


async def _write_pickled(
    persistence: SQLAlchemyPersistence[Any, Any, Any],
    data: dict[str, Any],
    path: Path,
    deadline: Deadline,
) -> dict[str, int]:
    calls: list[Any] = []
    counts = {"user_data": 0, "chat_data": 0, "bot_data": 0, "callback_data": 0}
    for user_id, value in data["user_data"].items():
        calls.append((persistence.update_user_data, (user_id, value)))
    counts["user_data"] = len(data["user_data"])
    for chat_id, value in data["chat_data"].items():
        calls.append((persistence.update_chat_data, (chat_id, value)))
    counts["chat_data"] = len(data["chat_data"])
    if data["bot_data"]:
        calls.append((persistence.update_bot_data, (data["bot_data"],)))
        counts["bot_data"] = 1
    if data["callback_data"] is not None:
        calls.append((persistence.update_callback_data, (data["callback_data"],)))
        counts["callback_data"] = 1
    for name, states in data["conversations"].items():
        for key, state in states.items():
            calls.append((persistence.update_conversation, (name, key, state)))
        counts[f"conversation:{name}"] = len(states)
    with progress_bar() as bar:
        task = bar.add_task(f"Importing {path.name}", total=len(calls))
        for start in range(0, len(calls), _CHUNK):
            chunk = calls[start : start + _CHUNK]
            # started in one loop iteration, like Application.update_persistence does: the
            # persistence writes each chunk in one transaction
            await deadline(
                asyncio.gather(*(method(*args) for method, args in chunk)), "Writing the rows"
            )
            bar.advance(task, len(chunk))
    return counts
