"""The ``ptb-sessions`` command: manage the schema, look into the stored data, back it up, move
a ``PicklePersistence`` over, and run the pizza demo.

.. code-block:: text

    ptb-sessions [--url URL] [--timeout SECONDS] COMMAND
    db upgrade [REV] | db downgrade REV [--yes] | db current | db check
    stats
    keys NAMESPACE [--prefix P] [--limit N]
    show NAMESPACE [KEY] [--raw] [--allow-pickle]
    purge-expired
    import-pickle FILE [--path DIR] [--codec json|pickle] [--replace]
    export FILE.jsonl|- [--force]
    import FILE.jsonl|- [--replace]
    demo [--chats N] [--updates N] [--db PATH] [--token TOKEN] [--yes]
    jobs [remove ID]

The database URL is ``--url``, else the environment variable ``PTB_SESSIONS_URL``, else the
SQLite file ``ptb_sessions.sqlite3`` in the current directory. Plain sync URLs
(``postgresql://...``, ``mysql://...``, ``sqlite:///file``) run on their asyncio driver.

Only ``db upgrade`` / ``db downgrade``, ``import``, ``import-pickle`` and ``demo`` create or
change the schema. The read commands (``db current``, ``db check``, ``stats``, ``keys``,
``show``, ``export``) never do, never write and never unpickle: on a database that is not at
the newest revision they stop with an error naming the ``db upgrade`` command to run (``export``
also reads an older revision, so a backup can come before the upgrade), and they never create
a missing SQLite file.

Every mistake or failure (a bad URL, an unreachable server, an unknown namespace, a missing
file, a database that is not migrated) is one line on stderr, ``ptb-sessions: error: ...``
with any password masked as ``***``, and a non-zero exit status; never a traceback.

Each subcommand is registered by a function that adds its parser and sets the coroutine that
runs it (``run``); see :data:`REGISTRARS`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, cast

from alembic.util import CommandError
from rich.pretty import Pretty
from rich.table import Table
from rich.text import Text
from sqlalchemy import Table as SQLTable
from sqlalchemy import func, select
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import SQLAlchemyError

from ptb_sessions import _alembic, _demo
from ptb_sessions._cli_common import (
    DEFAULT_TIMEOUT,
    PROG,
    CLIError,
    Deadline,
    current_revision,
    destroyed_by_downgrade,
    dispose,
    literal,
    open_database,
    plural,
    require_head,
    stderr_console,
    stdout_console,
    utc_time,
)
from ptb_sessions._cli_jobs import add_jobs_parser
from ptb_sessions._cli_pickle import import_pickle
from ptb_sessions._cli_transfer import export_jsonl, import_jsonl
from ptb_sessions._codec import JSONCodec, PickleCodec
from ptb_sessions._errors import PTBSessionsError, StorageError
from ptb_sessions._rowpolicy import past_expiry
from ptb_sessions._rows import decode_record
from ptb_sessions._schema import StoredRow
from ptb_sessions._sqlalchemypersistence import BUILTIN_NAMESPACES
from ptb_sessions._store import Database, Record
from ptb_sessions._url import DEFAULT_URL, mask_secrets, mask_url, sqlite_path, to_async_url

__all__ = ["REGISTRARS", "build_parser", "main"]

#: The environment variable read when ``--url`` is not given.
URL_VARIABLE: Final = "PTB_SESSIONS_URL"
#: The SQLite file of ``demo`` unless ``--db`` or ``--url`` says otherwise.
DEMO_FILE: Final = "ptb_sessions_demo.sqlite3"
_SINGLE_KEYS: Final = {"bot_data": "bot", "callback_data": "callback_data"}
_ID_NAMESPACES: Final = ("chat_data", "user_data")
_CONVERSATION_PREFIX: Final = "conversation:"
_TABLE = cast(SQLTable, StoredRow.__table__)
_C = _TABLE.c
_BACKENDS: Final = ("sqlite", "postgresql", "mysql", "mariadb")

#: What runs a subcommand: ``run(url, args, deadline)``, returning the exit status.
Runner = Callable[[URL, argparse.Namespace, Deadline], Awaitable[int]]


# -- arguments ----------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _add(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser whose ``--help`` starts with ``description``."""
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=summary, description=description
    )
    return parser


# -- output helpers -----------------------------------------------------------------------


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _shown(namespace: str, key: str) -> str:
    """``namespace['key']``, escaped for printing."""
    return literal(f"{namespace}[{key!r}]")


# -- db -----------------------------------------------------------------------------------


def _register_db(commands: Any) -> None:
    db = _add(
        commands,
        "db",
        "the database schema (alembic migrations)",
        "Create, upgrade, downgrade or check the schema of ptb-sessions in the database, with "
        "the alembic revisions shipped in the package.",
    )
    actions = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = _add(
        actions,
        "upgrade",
        "create or upgrade the schema to the newest revision",
        "Create the schema, or upgrade it to REV (default: head, the newest revision).",
    )
    upgrade.add_argument("revision", metavar="REV", nargs="?", default="head")
    downgrade = _add(
        actions,
        "downgrade",
        "downgrade the schema to REV ('base' drops the table and all data)",
        "Downgrade the schema to REV ('base' removes every table of ptb-sessions). A "
        "downgrade of a database that holds rows refuses without --yes: make a backup with "
        "export first.",
    )
    downgrade.add_argument("revision", metavar="REV")
    downgrade.add_argument(
        "--yes", action="store_true", help="downgrade even though stored rows are destroyed"
    )
    _add(
        actions,
        "current",
        "print the schema revision of the database",
        "Print the schema revision of the database, and whether it is the newest.",
    )
    _add(
        actions,
        "check",
        "exit with status 0 if the schema is at the newest revision, else 1",
        "Exit with status 0 if the schema is at the newest revision, else print why and exit "
        "with status 1 (for deployment scripts).",
    )
    db.set_defaults(run=_db)


def _state(current: str | None, head: str) -> str:
    if current is None:
        return "none (not migrated)"
    if current == head:
        return f"{current} (head)"
    if not _alembic.is_known(current):
        return (
            f"{current} (newer than this ptb-sessions knows, its head is {head}: upgrade "
            "ptb-sessions)"
        )
    return f"{current} (head is {head}: run `{PROG} db upgrade`)"


async def _migrate(database: Database, args: argparse.Namespace, deadline: Deadline) -> int:
    action: str = args.db_command
    current = await deadline(current_revision(database), "Reading the schema revision")
    if not _alembic.is_known(current):
        assert current is not None
        raise _alembic.newer_revision_error(current, database.masked_url)
    if action == "downgrade" and not args.yes and current is not None:
        destroyed = await deadline(
            destroyed_by_downgrade(database, current, args.revision), "Counting the rows"
        )
        if destroyed:
            raise CLIError(
                f"db downgrade {args.revision} would destroy {' and '.join(destroyed)} of "
                f"{database.masked_url}; nothing was changed (back them up with `{PROG} --url "
                f"'{database.masked_url}' export FILE.jsonl`, then pass --yes)"
            )
    try:
        if action == "upgrade":
            migration = _alembic.upgrade(database.engine, args.revision)
        else:
            migration = _alembic.downgrade(database.engine, args.revision)
        await deadline(migration, f"db {action}")
        after = await deadline(_alembic.current_revision(database.engine), f"db {action}")
    except (SQLAlchemyError, OSError) as exc:
        raise database.error(exc, f"db {action}") from exc
    except CommandError as exc:  # an unknown revision, ...
        raise CLIError(f"db {action}: {exc}") from exc
    out = stdout_console()
    if after == current:
        out.print(f"{database.masked_url} stays at revision {after or 'none'}")
    else:
        out.print(f"{database.masked_url}: revision {current or 'none'} -> {after or 'none'}")
    return 0


async def _db(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    action: str = args.db_command
    path = sqlite_path(url)
    missing = path is not None and not path.exists()
    # A missing SQLite file is a database that is not migrated; only upgrade creates it.
    database = open_database(url, create=action != "downgrade", timeout=deadline.seconds)
    head = _alembic.head_revision()
    try:
        if action in ("upgrade", "downgrade"):
            return await _migrate(database, args, deadline)
        current = None
        if not missing:
            current = await deadline(current_revision(database), "Reading the schema revision")
        if action == "current":
            stdout_console().print(_state(current, head))
            return 0
        if current != head:
            if not _alembic.is_known(current):
                assert current is not None
                raise _alembic.newer_revision_error(current, database.masked_url)
            state = "not migrated" if current is None else f"at revision {current}"
            raise CLIError(
                f"the database {database.masked_url} is {state}, not at head {head}: run "
                f"`{PROG} --url '{database.masked_url}' db upgrade`"
            )
        stdout_console().print(f"{database.masked_url} is at head {head}")
        return 0
    finally:
        await dispose(database, deadline)


# -- stats, keys, show, purge-expired -------------------------------------------------------


def _register_stats(commands: Any) -> None:
    parser = _add(
        commands,
        "stats",
        "rows, bytes and expired rows per namespace",
        "Print the number of rows, their bytes and the expired rows of each namespace. Never "
        "writes, never decodes a value.",
    )
    parser.set_defaults(run=_stats)


async def _stats(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    database = open_database(url, create=False, timeout=deadline.seconds)
    try:
        head = await deadline(require_head(database), "Reading the schema revision")
        rows = await deadline(database.stats(), "Counting the rows")
    finally:
        await dispose(database, deadline)
    table = Table()
    table.add_column("namespace")
    table.add_column("rows", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("expired", justify="right")
    for namespace, count, size, expired in rows:
        table.add_row(Text(literal(namespace)), f"{count:,}", f"{size:,}", f"{expired:,}")
    table.add_section()
    table.add_row(
        "total",
        f"{sum(r[1] for r in rows):,}",
        f"{sum(r[2] for r in rows):,}",
        f"{sum(r[3] for r in rows):,}",
    )
    out = stdout_console()
    out.print(f"{database.masked_url} (schema revision {head})")
    out.print(table)
    return 0


def _register_keys(commands: Any) -> None:
    parser = _add(
        commands,
        "keys",
        "list the keys of a namespace",
        "Print the keys of NAMESPACE, one a line, in code point order.",
    )
    parser.add_argument("namespace", metavar="NAMESPACE")
    parser.add_argument("--prefix", default="", help="only the keys that start with P")
    parser.add_argument(
        "--limit", type=_positive, default=None, help="at most N keys (default: all)"
    )
    parser.set_defaults(run=_keys)


async def _check_namespace(database: Database, namespace: str, deadline: Deadline) -> None:
    """Raise the "unknown namespace" error if ``namespace`` has no rows and is not PTB's."""
    if namespace in BUILTIN_NAMESPACES:
        return
    known = await deadline(database.namespaces(), "Listing the namespaces")
    if namespace not in known:
        raise CLIError(
            f"unknown namespace {namespace!r}; this database has "
            f"{', '.join(known) if known else 'no rows'}"
        )


async def _list_keys(
    database: Database, namespace: str, prefix: str, limit: int | None, deadline: Deadline
) -> tuple[list[str], int]:
    """The first ``limit`` keys of ``namespace`` starting with ``prefix``, and how many there
    are in all."""
    where = [_C.namespace == namespace]
    if prefix:
        where.append(_C.key.startswith(prefix, autoescape=True))
    query = select(_C.key).where(*where).order_by(database.code_point_order(_C.key))
    if limit is not None:
        query = query.limit(limit)

    def read(connection: Connection) -> tuple[list[str], int]:
        keys = list(connection.execute(query).scalars())
        total = len(keys)
        if limit is not None and total == limit:
            count = select(func.count()).select_from(_TABLE).where(*where)
            total = int(connection.execute(count).scalar_one())
        return keys, total

    what = f"Listing the keys of {namespace}"
    return await deadline(database.run(what, read, read_only=True), what)


async def _print_keys(
    database: Database,
    namespace: str,
    prefix: str,
    limit: int | None,
    deadline: Deadline,
) -> int:
    await _check_namespace(database, namespace, deadline)
    keys, total = await _list_keys(database, namespace, prefix, limit, deadline)
    out = stdout_console()
    for key in keys:
        out.print(literal(key))
    matching = f" starting with {prefix!r}" if prefix else ""
    if len(keys) < total:
        summary = f"({len(keys):,} of {plural(total, 'key')}{matching}; --limit shows more)"
    else:
        summary = f"({plural(total, 'key')}{matching})"
    stderr_console().print(literal(summary))
    return 0


async def _keys(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    database = open_database(url, create=False, timeout=deadline.seconds)
    try:
        await deadline(require_head(database), "Reading the schema revision")
        return await _print_keys(database, args.namespace, args.prefix, args.limit, deadline)
    finally:
        await dispose(database, deadline)


def _register_show(commands: Any) -> None:
    show = _add(
        commands,
        "show",
        "print one stored value, decoded (without KEY: the keys)",
        "Print the row of KEY in NAMESPACE: its codec, versions and timestamps, and its "
        "value decoded. Without KEY, list the keys of NAMESPACE (as the keys command). Rows "
        "written with PickleCodec are never unpickled unless --allow-pickle is given.",
    )
    show.add_argument(
        "namespace",
        metavar="NAMESPACE",
        help="chat_data, user_data, bot_data, callback_data, conversation:NAME or a session "
        "namespace (e.g. session)",
    )
    show.add_argument(
        "key",
        metavar="KEY",
        nargs="?",
        help="the chat or user id for chat_data/user_data, the conversation key as a JSON "
        "list (e.g. [123,456]), the session key; not needed for bot_data and callback_data",
    )
    show.add_argument("--raw", action="store_true", help="print the stored text undecoded")
    show.add_argument(
        "--allow-pickle",
        action="store_true",
        help="unpickle a row written with PickleCodec: this runs whatever code the row holds, "
        "so only for a database nobody else can write",
    )
    show.set_defaults(run=_show)


def _stored_key(namespace: str, key: str) -> str:
    """The stored key for what the user typed: ids for chat_data/user_data, compact JSON for
    conversations."""
    if namespace in _ID_NAMESPACES:
        try:
            return str(int(key))
        except ValueError:
            kind = namespace.split("_", 1)[0]
            raise CLIError(
                f"the keys of {namespace} are {kind} ids (whole numbers), not {key!r}"
            ) from None
    if namespace.startswith(_CONVERSATION_PREFIX):
        try:
            parsed = json.loads(key)
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            return json.dumps(parsed, separators=(",", ":"))
    return key


def _decoded(record: Record, namespace: str, key: str, args: argparse.Namespace) -> Any:
    """The value of ``record``, decoded by the codec its row names.

    Raises:
        CLIError: The row is pickled and ``--allow-pickle`` was not given, or its codec is
            unknown.
    """
    if record.codec == "json":
        return decode_record(JSONCodec(), record, namespace, key)
    if record.codec == "pickle":
        if not args.allow_pickle:
            return None
        return decode_record(PickleCodec(), record, namespace, key)
    raise CLIError(
        f"{_shown(namespace, key)} was written with the unknown codec "
        f"{literal(repr(record.codec))}; use --raw"
    )


async def _show(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    namespace: str = args.namespace
    database = open_database(url, create=False, timeout=deadline.seconds)
    try:
        await deadline(require_head(database), "Reading the schema revision")
        if args.key is None and namespace not in _SINGLE_KEYS:
            return await _print_keys(database, namespace, "", None, deadline)
        key = _SINGLE_KEYS[namespace] if args.key is None else _stored_key(namespace, args.key)
        await _check_namespace(database, namespace, deadline)
        record = await deadline(database.get(namespace, key), f"Reading {namespace}")
    finally:
        await dispose(database, deadline)
    if record is None:
        raise CLIError(f"{_shown(namespace, key)} is not stored")
    out = stdout_console()
    expired = past_expiry(record.expires_at, database.clock())
    size = len(record.data) if record.data is not None else 0
    out.print(_shown(namespace, key))
    out.print(
        literal(
            f"codec {record.codec}, {plural(size, 'byte')}, version {record.version}, data "
            f"version {record.data_version if record.data_version is not None else 'none'}"
        )
    )
    out.print(
        f"written or loaded {utc_time(record.touched_at, 'never')}, "
        f"expires {utc_time(record.expires_at, 'never')}"
        + (" (expired: never returned, deleted by purge-expired)" if expired else "")
    )
    if args.raw:
        out.print(literal(record.data) if record.data is not None else "null")
        return 0
    if record.codec == "pickle" and not args.allow_pickle:
        stderr_console().print(
            "not shown: the row is pickled, and unpickling runs whatever code it holds; "
            f"`{PROG} show {literal(namespace)} KEY --allow-pickle` unpickles it (only if "
            "nobody else can write this database), --raw prints its base64 text"
        )
        return 0
    try:
        value = _decoded(record, namespace, key, args)
    except StorageError as exc:
        if record.codec != "json" or record.data is None:
            raise
        # e.g. a registered type of the bot's that this command does not know: the stored
        # JSON is readable as it is
        stderr_console().print(f"not decoded ({literal(str(exc))}); the stored JSON follows")
        for line in _readable_json(record.data).splitlines():
            out.print(literal(line))
        return 0
    out.print(Pretty(value, indent_guides=False))
    return 0


def _readable_json(text: str) -> str:
    """``text`` indented for reading, if it is JSON; else as it is."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def _register_purge(commands: Any) -> None:
    parser = _add(
        commands,
        "purge-expired",
        "delete every expired row",
        "Delete every row whose ttl has run out (such rows are never returned anyway).",
    )
    parser.set_defaults(run=_purge)


async def _purge(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    database = open_database(url, create=False, timeout=deadline.seconds)
    try:
        await deadline(require_head(database), "Reading the schema revision")
        count = await deadline(database.purge_expired(), "Deleting the expired rows")
    finally:
        await dispose(database, deadline)
    stdout_console().print(f"deleted {plural(count, 'expired row')} from {database.masked_url}")
    return 0


# -- import-pickle, export, import ----------------------------------------------------------


def _register_import_pickle(commands: Any) -> None:
    parser = _add(
        commands,
        "import-pickle",
        "copy the data of a PTB PicklePersistence file into the database",
        "Copy user_data, chat_data, bot_data, callback_data and the conversations of a "
        "PicklePersistence file into the database. WARNING: reading a pickle file runs any "
        "code it holds; import only a file your own bot wrote. The classes of the pickled "
        "objects are imported from --path (the current directory is not searched).",
    )
    parser.add_argument(
        "file",
        metavar="FILE",
        type=Path,
        help="the PicklePersistence filepath (single_file=False: the prefix of its files "
        "FILE_user_data, FILE_chat_data, ...)",
    )
    parser.add_argument(
        "--path",
        metavar="DIR",
        type=Path,
        action="append",
        default=[],
        help="a directory to import the classes of the pickled objects from (your bot's "
        "modules); may be given more than once",
    )
    parser.add_argument(
        "--codec",
        choices=("json", "pickle"),
        default="json",
        help="the codec of SQLAlchemyPersistence the bot will use (default: json)",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="import even if the database holds PTB data: the file's entries replace theirs",
    )
    parser.set_defaults(run=_import_pickle)


async def _import_pickle(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    imported = await import_pickle(
        url,
        args.file,
        codec_name=args.codec,
        replace=args.replace,
        paths=args.path,
        deadline=deadline,
    )
    table = Table()
    table.add_column("namespace")
    table.add_column("entries", justify="right")
    for namespace, count in imported.counts.items():
        table.add_row(Text(literal(namespace)), f"{count:,}")
    out = stdout_console()
    out.print(f"imported {args.file} into {mask_url(url)}")
    out.print(table)
    if imported.codec is not None:
        out.print(
            "The rows hold your own classes, stored as registered types: the bot reads them "
            f"with SQLAlchemyPersistence(..., codec={literal(imported.codec)}) (the classes of "
            "its ContextTypes are registered without it)"
        )
    return 0


def _register_export(commands: Any) -> None:
    parser = _add(
        commands,
        "export",
        "write every row to a JSONL file (a backup)",
        "Write every row, then every stored job, to FILE.jsonl, one JSON object a line (a "
        "lossless backup that import restores). '-' writes to standard output. An existing "
        "regular file is replaced only with --force; a symlink, device or pipe is written "
        "through. A database at an older revision is exported too (a backup before db upgrade).",
    )
    parser.add_argument("file", metavar="FILE.jsonl")
    parser.add_argument(
        "--force", action="store_true", help="replace FILE.jsonl if it is an existing file"
    )
    parser.set_defaults(run=_export)


async def _export(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    database = open_database(url, create=False, timeout=deadline.seconds)
    try:
        written = await export_jsonl(database, args.file, force=args.force, deadline=deadline)
    finally:
        await dispose(database, deadline)
    # with `export -`, standard output carries only the rows
    console = stderr_console() if args.file == "-" else stdout_console()
    target = "standard output" if args.file == "-" else args.file
    console.print(f"exported {written} from {database.masked_url} to {target}")
    return 0


def _register_import(commands: Any) -> None:
    parser = _add(
        commands,
        "import",
        "insert the rows of an exported JSONL file",
        "Insert the rows and jobs of a file written by export ('-': standard input), as they "
        "are, in one transaction: every line is checked first, then everything is written or "
        "nothing. Existing rows or jobs are overwritten only with --replace.",
    )
    parser.add_argument("file", metavar="FILE.jsonl")
    parser.add_argument(
        "--replace", action="store_true", help="overwrite rows and jobs that already exist"
    )
    parser.set_defaults(run=_import)


async def _import(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    database = open_database(url, create=True, timeout=deadline.seconds)
    try:
        inserted = await import_jsonl(database, args.file, replace=args.replace, deadline=deadline)
    finally:
        await dispose(database, deadline)
    source = "standard input" if args.file == "-" else args.file
    stdout_console().print(f"imported {inserted} from {source} into {database.masked_url}")
    return 0


# -- demo -----------------------------------------------------------------------------------


def _register_demo(commands: Any) -> None:
    demo = _add(
        commands,
        "demo",
        "run the pizza-counter bot: offline on simulated updates, or for real with --token",
        "Run grammY's pizza-counter bot in a real PTB Application, offline: simulated "
        "updates from many chats, the counters stored in a local SQLite file; run it again "
        "and the counts survived. With --token it runs the bot for real (polling Telegram).",
    )
    demo.add_argument("--chats", type=_positive, default=50, help="simulated chats (default 50)")
    demo.add_argument(
        "--updates", type=_positive, default=1000, help="simulated updates (default 1000)"
    )
    demo.add_argument(
        "--db",
        type=Path,
        help=f"the SQLite file (default: --url if given, else ./{DEMO_FILE})",
    )
    demo.add_argument(
        "--token",
        help="run the bot for real with this token; it polls Telegram until Ctrl+C (no "
        "environment variable does this: only this option takes the demo online)",
    )
    demo.add_argument(
        "--yes",
        action="store_true",
        help="write into a database that holds other data too",
    )
    demo.set_defaults(run=_run_demo, url_of=_demo_url, start=_start_demo)


def _demo_url(args: argparse.Namespace, raw_url: str) -> URL:
    if args.db is not None:
        return to_async_url(URL.create("sqlite", database=str(args.db)))
    if args.url is not None:
        return to_async_url(args.url)
    return to_async_url(URL.create("sqlite", database=DEMO_FILE))


async def _check_demo_database(url: URL, args: argparse.Namespace, deadline: Deadline) -> None:
    """Refuse to write into a database that holds more than the demo's own rows, unless
    ``--yes``."""
    path = sqlite_path(url)
    if args.yes or (path is not None and not path.exists()):
        return
    database = open_database(url, create=False, timeout=deadline.seconds)
    try:
        revision = await deadline(current_revision(database), "Reading the schema revision")
        if revision is None:
            return
        await deadline(require_head(database), "Reading the schema revision")
        others = [
            ns
            for ns in await deadline(database.namespaces(), "Listing the namespaces")
            if ns != _demo.DEMO_NAMESPACE
        ]
    finally:
        await dispose(database, deadline)
    if others:
        raise CLIError(
            f"{database.masked_url} holds other data ({', '.join(others)}); the demo "
            f"would write its pizza counters into its namespace {_demo.DEMO_NAMESPACE!r} there. "
            "Nothing was written: use --db FILE for a demo database of its own, or pass --yes"
        )


async def _run_demo(url: URL, args: argparse.Namespace, deadline: Deadline) -> int:
    await _check_demo_database(url, args, deadline)
    result = await _demo.run_offline(
        url, chats=args.chats, updates=args.updates, deadline=deadline
    )
    total = sum(result.after.values())
    before = sum(result.before.values())
    path = sqlite_path(url)
    summary = Table(
        title="ptb-sessions demo: the pizza counter", title_justify="left", show_header=False
    )
    summary.add_column("", style="bold")
    summary.add_column("")
    summary.add_row("updates", f"{result.updates:,} ({plural(args.chats, 'chat')})")
    rate = result.updates / result.seconds if result.seconds else float("inf")
    summary.add_row("time", f"{result.seconds:.2f} s, {rate:,.0f} updates/s")
    summary.add_row("replies sent", f"{result.replies:,} (to /hunger)")
    summary.add_row("database", mask_url(url))
    if path is not None:
        summary.add_row("file size", _size(_demo.file_size(path)))
    summary.add_row("rows", plural(len(result.after), "session"))
    summary.add_row("pizzas", f"{before:,} before this run, {total:,} now")
    out = stdout_console()
    out.print(summary)
    chats = Table(title="a few chats", title_justify="left")
    chats.add_column("chat id", justify="right")
    chats.add_column("before", justify="right")
    chats.add_column("pizza_count", justify="right")
    for chat_id in _demo.chat_ids(min(args.chats, 5)):
        key = str(chat_id)
        chats.add_row(key, str(result.before.get(key, 0)), str(result.after.get(key, 0)))
    out.print(chats)
    print(f"total pizzas: {total}", flush=True)
    return 0


def _start_demo(args: argparse.Namespace, url: URL) -> int:
    """Run the demo: offline, or for real with ``--token``."""
    if not args.token:
        return _start(args, url)
    deadline = Deadline(args.timeout, mask_url(url))
    asyncio.run(_check_demo_database(url, args, deadline))
    before = sum(asyncio.run(deadline(_demo.count_pizzas(url), "Reading the counters")).values())
    username = asyncio.run(_demo.bot_username(args.token))  # the token works: go on
    stdout_console().print(
        f"Running @{username} with polling, {before:,} pizzas so far in {mask_url(url)}. Send "
        "it 🍕 or /hunger; Ctrl+C stops."
    )
    _demo.run_polling(args.token, url)
    print(f"total pizzas: {sum(asyncio.run(_demo.count_pizzas(url)).values())}", flush=True)
    return 0


# -- the parser -------------------------------------------------------------------------------

#: The functions that add the subcommands, in the order ``--help`` lists them. Each adds its
#: parser to the subparsers it is given and sets ``run`` (a :data:`Runner`) as its default;
#: optionally ``url_of(args, raw_url)`` (the URL to use) and ``start(args, url)`` (a
#: synchronous start instead of ``asyncio.run(run(...))``).
REGISTRARS: Final[tuple[Callable[[Any], None], ...]] = (
    _register_db,
    _register_stats,
    _register_keys,
    _register_show,
    _register_purge,
    _register_import_pickle,
    _register_export,
    _register_import,
    _register_demo,
    add_jobs_parser,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ptb-sessions``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the database of ptb-sessions (python-telegram-bot persistence and "
        "sessions on SQLAlchemy), and run its demo.",
        epilog=f"The URL is --url, else ${URL_VARIABLE}, else the SQLite file "
        "ptb_sessions.sqlite3 in the current directory. The read commands (db current, db "
        "check, stats, keys, show, export) never create, upgrade or write the database, and "
        "never unpickle.",
    )
    parser.add_argument(
        "--url",
        help=f"the database URL, e.g. postgresql://user:password@host/db (default: "
        f"${URL_VARIABLE}, else sqlite:///ptb_sessions.sqlite3)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"the longest any one database call may take (default {DEFAULT_TIMEOUT:g})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in REGISTRARS:
        register(commands)
    return parser


# -- main ---------------------------------------------------------------------------------


class _OneLineFormatter(logging.Formatter):
    """Log records as ``ptb-sessions: warning: message (Error: reason)``, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message += f" ({type(exc).__name__}: {exc})"
        return literal(message.replace("\n", " "))


def _one_line(message: str, raw_url: str, token: str | None) -> str:
    """``message`` on one line, with the URL's passwords and the bot token masked, and its
    control characters escaped."""
    message = mask_secrets(message, raw_url)
    if token:
        message = message.replace(token, "***")
    return literal(" ".join(message.split()))


def _database_url(args: argparse.Namespace, raw: str) -> URL:
    """The asyncio URL of ``raw``.

    Raises:
        CLIError: ``raw`` is not a URL of a database ptb-sessions supports.
    """
    url = to_async_url(raw)
    if url.get_backend_name() not in _BACKENDS:
        raise CLIError(
            f"unsupported database URL {mask_url(url)!r}: ptb-sessions works with sqlite:///"
            "FILE, postgresql://..., mysql://... and mariadb://... URLs"
        )
    return url


async def _run(url: URL, args: argparse.Namespace) -> int:
    try:
        run: Runner = args.run
        return int(await run(url, args, Deadline(args.timeout, mask_url(url))))
    except BaseException:
        # aiosqlite stops the worker thread of a connection that failed to open and reports
        # back to the event loop; give it a moment, or asyncio.run closes the loop first and
        # the thread prints a traceback.
        await asyncio.sleep(0.05)
        raise


def _start(args: argparse.Namespace, url: URL) -> int:
    return asyncio.run(_run(url, args))


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``ptb-sessions`` with ``argv`` (default: the command line's arguments).

    Returns:
        The exit status: 0 on success, 1 on an error (reported as one line on stderr), 2 on
        wrong arguments, 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or wrong arguments (argparse printed the usage)
        return exc.code if isinstance(exc.code, int) else 2
    raw_url: str = args.url or os.environ.get(URL_VARIABLE) or DEFAULT_URL
    token: str | None = getattr(args, "token", None)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.WARNING)
    # MariaDB's notes ("Name ... ignored for PRIMARY key") are logged by the driver as warnings
    driver_logger = logging.getLogger("asyncmy")
    old_driver_level = driver_logger.level
    driver_logger.setLevel(logging.ERROR)
    try:
        url_of: Callable[[argparse.Namespace, str], URL] = getattr(args, "url_of", _database_url)
        start: Callable[[argparse.Namespace, URL], int] = getattr(args, "start", _start)
        return start(args, url_of(args, raw_url))
    except CLIError as exc:
        print(f"{PROG}: error: {_one_line(str(exc), raw_url, token)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except (PTBSessionsError, ValueError, SQLAlchemyError, OSError) as exc:
        print(f"{PROG}: error: {_one_line(str(exc), raw_url, token)}", file=sys.stderr)
        return 1
    except Exception as exc:
        reason = _one_line(f"{type(exc).__name__}: {exc}", raw_url, token)
        print(f"{PROG}: error: {reason}", file=sys.stderr)
        return 1
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        driver_logger.setLevel(old_driver_level)


if __name__ == "__main__":
    sys.exit(main())
