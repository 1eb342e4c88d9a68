"""The ``ptb-sessions`` command: manage the schema, look into the stored data, back it up, move
a ``PicklePersistence`` over, and run the pizza demo.

.. code-block:: text

    ptb-sessions [--url URL] db upgrade | db downgrade REV | db current | db check
    ptb-sessions [--url URL] stats
    ptb-sessions [--url URL] show NAMESPACE [KEY] [--raw]
    ptb-sessions [--url URL] purge-expired
    ptb-sessions [--url URL] import-pickle FILE [--codec json|pickle] [--overwrite]
    ptb-sessions [--url URL] export FILE.jsonl
    ptb-sessions [--url URL] import FILE.jsonl [--replace]
    ptb-sessions [--url URL] demo [--chats N] [--updates N] [--db PATH] [--token TOKEN]
    ptb-sessions [--url URL] jobs [remove ID]

The database URL is ``--url``, else the environment variable ``PTB_SESSIONS_URL``, else the
SQLite file ``ptb_sessions.sqlite3`` in the current directory. Plain sync URLs
(``postgresql://...``, ``mysql://...``, ``sqlite:///file``) run on their asyncio driver.

Only ``db upgrade`` / ``db downgrade``, ``import``, ``import-pickle`` and ``demo`` create or
change the schema. The other commands never do: on a database that is not at the newest
revision they stop with an error naming the ``db upgrade`` command to run, and they never
create a missing SQLite file.

Every mistake or failure (a bad URL, an unreachable server, an unknown namespace, a missing
file, a database that is not migrated) is one line on stderr, ``ptb-sessions: error: ...``
with any password masked as ``***``, and a non-zero exit status; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dtm
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from alembic.util import CommandError
from rich.pretty import Pretty
from rich.table import Table
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

from ptb_sessions import _alembic
from ptb_sessions._cli_common import (
    CLIError,
    current_revision,
    open_database,
    require_head,
    sqlite_path,
    stdout_console,
)
from ptb_sessions._cli_jobs import COMMAND as JOBS_COMMAND
from ptb_sessions._cli_jobs import add_jobs_parser, run_jobs
from ptb_sessions._codec import Codec, JSONCodec, PickleCodec
from ptb_sessions._errors import PTBSessionsError
from ptb_sessions._rows import decode_record
from ptb_sessions._sqlalchemypersistence import BUILTIN_NAMESPACES
from ptb_sessions._store import Record
from ptb_sessions._url import DEFAULT_URL, mask_url, to_async_url

__all__ = ["main"]

PROG: Final = "ptb-sessions"
#: The environment variable read when ``--url`` is not given.
URL_VARIABLE: Final = "PTB_SESSIONS_URL"
#: The environment variable read by ``demo`` when ``--token`` is not given.
TOKEN_VARIABLE: Final = "TELEGRAM_BOT_TOKEN"
#: The SQLite file of ``demo`` unless ``--db`` or ``--url`` says otherwise.
DEMO_FILE: Final = "ptb_sessions_demo.sqlite3"
_SINGLE_KEYS: Final = {"bot_data": "bot", "callback_data": "callback_data"}
_ID_NAMESPACES: Final = ("chat_data", "user_data")
_CONVERSATION_PREFIX: Final = "conversation:"


# -- arguments ----------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ptb-sessions``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage the database of ptb-sessions (python-telegram-bot persistence and "
        "sessions on SQLAlchemy), and run its demo.",
        epilog=f"The URL is --url, else ${URL_VARIABLE}, else the SQLite file "
        "ptb_sessions.sqlite3 in the current directory. Read commands (db current/check, "
        "stats, show, export, purge-expired) never create or upgrade the schema.",
    )
    parser.add_argument(
        "--url",
        help=f"the database URL, e.g. postgresql://user:password@host/db (default: "
        f"${URL_VARIABLE}, else sqlite:///ptb_sessions.sqlite3)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    db = commands.add_parser("db", help="the database schema (alembic migrations)")
    db_commands = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    db_commands.add_parser("upgrade", help="create or upgrade the schema to the newest revision")
    downgrade = db_commands.add_parser(
        "downgrade", help="downgrade the schema to REV ('base' drops the tables and all data)"
    )
    downgrade.add_argument("revision", metavar="REV")
    db_commands.add_parser("current", help="print the schema revision of the database")
    db_commands.add_parser(
        "check", help="exit with status 0 if the schema is at the newest revision, else 1"
    )

    commands.add_parser("stats", help="rows, bytes and expired rows per namespace")
    show = commands.add_parser("show", help="print one stored value, decoded")
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
    commands.add_parser("purge-expired", help="delete every expired row")

    pickle = commands.add_parser(
        "import-pickle", help="copy the data of a PTB PicklePersistence file into the database"
    )
    pickle.add_argument(
        "file",
        metavar="FILE",
        type=Path,
        help="the PicklePersistence filepath (single_file=False: the prefix of its files "
        "FILE_user_data, FILE_chat_data, ...)",
    )
    pickle.add_argument(
        "--codec",
        choices=("json", "pickle"),
        default="json",
        help="the codec of SQLAlchemyPersistence the bot will use (default: json)",
    )
    pickle.add_argument(
        "--overwrite",
        action="store_true",
        help="import even if the database holds PTB data: the file's entries replace theirs",
    )
    export = commands.add_parser("export", help="write every row to a JSONL file (a backup)")
    export.add_argument("file", metavar="FILE.jsonl", type=Path)
    import_ = commands.add_parser("import", help="insert the rows of an exported JSONL file")
    import_.add_argument("file", metavar="FILE.jsonl", type=Path)
    import_.add_argument(
        "--replace", action="store_true", help="overwrite rows that already exist"
    )

    demo = commands.add_parser(
        "demo",
        help="run the pizza-counter bot: offline on simulated updates, or for real with a token",
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
        help=f"run the bot for real with this token (default: ${TOKEN_VARIABLE}); it polls "
        "Telegram until Ctrl+C",
    )
    add_jobs_parser(commands)
    return parser


# -- output helpers -----------------------------------------------------------------------


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    moment = dtm.datetime.fromtimestamp(seconds, dtm.timezone.utc)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- commands -----------------------------------------------------------------------------


async def _db(url: URL, args: argparse.Namespace) -> int:
    action: str = args.db_command
    path = sqlite_path(url)
    missing = path is not None and not path.exists()
    # A missing SQLite file is a database that is not migrated; only upgrade creates it.
    database = open_database(url, create=action != "downgrade")
    head = _alembic.head_revision()
    out = stdout_console()
    try:
        current = None if missing and action != "upgrade" else await current_revision(database)
        if action == "current":
            if current is None:
                out.print("none (not migrated)")
            elif current == head:
                out.print(f"{current} (head)")
            else:
                out.print(f"{current} (head is {head}: run `{PROG} db upgrade`)")
            return 0
        if action == "check":
            if current != head:
                state = "not migrated" if current is None else f"at revision {current}"
                raise CLIError(
                    f"the database {database.masked_url} is {state}, not at head {head}: run "
                    f"`{PROG} --url '{database.masked_url}' db upgrade`"
                )
            out.print(f"{database.masked_url} is at head {head}")
            return 0
        try:
            if action == "upgrade":
                await _alembic.upgrade(database.engine, "head")
            else:
                await _alembic.downgrade(database.engine, args.revision)
            after = await _alembic.current_revision(database.engine)
        except (SQLAlchemyError, OSError) as exc:
            raise database.error(exc, f"db {action}") from exc
        except CommandError as exc:  # an unknown revision, ...
            raise CLIError(f"db {action}: {exc}") from exc
        if after == current:
            out.print(f"{database.masked_url} stays at revision {after or 'none'}")
        else:
            out.print(f"{database.masked_url}: revision {current or 'none'} -> {after or 'none'}")
        return 0
    finally:
        await database.dispose()


async def _stats(url: URL) -> int:
    database = open_database(url, create=False)
    try:
        head = await require_head(database)
        rows = await database.stats()
    finally:
        await database.dispose()
    table = Table()
    table.add_column("namespace")
    table.add_column("rows", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("expired", justify="right")
    for namespace, count, size, expired in rows:
        table.add_row(namespace, f"{count:,}", f"{size:,}", f"{expired:,}")
    table.add_section()
    table.add_row(
        "total",
        f"{sum(r[1] for r in rows):,}",
        f"{sum(r[2] for r in rows):,}",
        f"{sum(r[3] for r in rows):,}",
    )
    out = stdout_console()
    out.print(f"{database.masked_url} (schema revision {head})", markup=False)
    out.print(table)
    return 0


def _show_key(namespace: str, key: str | None) -> str:
    """The stored key for what the user typed: ids for chat_data/user_data, compact JSON for
    conversations."""
    if key is None:
        if namespace in _SINGLE_KEYS:
            return _SINGLE_KEYS[namespace]
        raise CLIError(f"show {namespace}: give the KEY to show")
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


def _codec_for(record: Record) -> Codec:
    if record.codec == "json":
        return JSONCodec()
    if record.codec == "pickle":
        return PickleCodec()
    raise CLIError(f"the row was written with the unknown codec {record.codec!r}; use --raw")


async def _show(url: URL, args: argparse.Namespace) -> int:
    namespace: str = args.namespace
    database = open_database(url, create=False)
    try:
        await require_head(database)
        key = _show_key(namespace, args.key)
        known = await database.namespaces()
        if namespace not in known and namespace not in BUILTIN_NAMESPACES:
            raise CLIError(
                f"unknown namespace {namespace!r}; this database has "
                f"{', '.join(known) if known else 'no rows'}"
            )
        record = await database.get(namespace, key)
    finally:
        await database.dispose()
    if record is None:
        raise CLIError(f"{namespace}[{key!r}] is not stored")
    out = stdout_console()
    expired = record.expires_at is not None and record.expires_at < database.clock()
    out.print(f"{namespace}[{key!r}]", markup=False)
    out.print(
        f"codec {record.codec}, version {record.version}, data version "
        f"{record.data_version if record.data_version is not None else 'none'}",
        markup=False,
    )
    out.print(
        f"written or loaded {_when(record.touched_at)}, expires {_when(record.expires_at)}"
        + (" (expired: never returned, deleted by purge-expired)" if expired else ""),
        markup=False,
    )
    if args.raw:
        out.print(record.data if record.data is not None else "null", markup=False)
    else:
        value = decode_record(_codec_for(record), record, namespace, key)
        out.print(Pretty(value, indent_guides=False))
    return 0


async def _purge(url: URL) -> int:
    database = open_database(url, create=False)
    try:
        await require_head(database)
        count = await database.purge_expired()
    finally:
        await database.dispose()
    stdout_console().print(f"deleted {count:,} expired rows from {database.masked_url}")
    return 0


async def _export(url: URL, path: Path) -> int:
    from ptb_sessions._cli_transfer import export_jsonl

    database = open_database(url, create=False)
    try:
        count = await export_jsonl(database, path)
    finally:
        await database.dispose()
    stdout_console().print(f"exported {count:,} rows from {database.masked_url} to {path}")
    return 0


async def _import(url: URL, path: Path, replace: bool) -> int:
    from ptb_sessions._cli_transfer import import_jsonl

    database = open_database(url, create=True)
    try:
        count = await import_jsonl(database, path, replace=replace)
    finally:
        await database.dispose()
    stdout_console().print(f"imported {count:,} rows from {path} into {database.masked_url}")
    return 0


async def _import_pickle(url: URL, args: argparse.Namespace) -> int:
    from ptb_sessions._cli_transfer import import_pickle

    counts = await import_pickle(url, args.file, codec_name=args.codec, overwrite=args.overwrite)
    table = Table()
    table.add_column("namespace")
    table.add_column("entries", justify="right")
    for namespace, count in counts.items():
        table.add_row(namespace, f"{count:,}")
    out = stdout_console()
    out.print(f"imported {args.file} into {mask_url(url)}", markup=False)
    out.print(table)
    return 0


def _demo_url(args: argparse.Namespace) -> URL:
    if args.db is not None:
        return to_async_url(URL.create("sqlite", database=str(args.db)))
    if args.url is not None:
        return to_async_url(args.url)
    return to_async_url(URL.create("sqlite", database=DEMO_FILE))


async def _demo(url: URL, args: argparse.Namespace) -> int:
    from ptb_sessions._demo import chat_ids, file_size, run_offline

    result = await run_offline(url, chats=args.chats, updates=args.updates)
    total = sum(result.after.values())
    before = sum(result.before.values())
    path = sqlite_path(url)
    summary = Table(
        title="ptb-sessions demo: the pizza counter", title_justify="left", show_header=False
    )
    summary.add_column("", style="bold")
    summary.add_column("")
    summary.add_row("updates", f"{result.updates:,} ({args.chats:,} chats)")
    rate = result.updates / result.seconds if result.seconds else float("inf")
    summary.add_row("time", f"{result.seconds:.2f} s, {rate:,.0f} updates/s")
    summary.add_row("replies sent", f"{result.replies:,} (to /hunger)")
    summary.add_row("database", mask_url(url))
    if path is not None:
        summary.add_row("file size", _size(file_size(path)))
    summary.add_row("rows", f"{len(result.after):,} sessions")
    summary.add_row("pizzas", f"{before:,} before this run, {total:,} now")
    out = stdout_console()
    out.print(summary)
    chats = Table(title="a few chats", title_justify="left")
    chats.add_column("chat id", justify="right")
    chats.add_column("before", justify="right")
    chats.add_column("pizza_count", justify="right")
    for chat_id in chat_ids(min(args.chats, 5)):
        key = str(chat_id)
        chats.add_row(key, str(result.before.get(key, 0)), str(result.after.get(key, 0)))
    out.print(chats)
    print(f"total pizzas: {total}", flush=True)
    return 0


def _demo_polling(url: URL, token: str) -> int:
    from ptb_sessions._demo import bot_username, count_pizzas, run_polling

    before = sum(asyncio.run(count_pizzas(url)).values())  # the database works: go on
    username = asyncio.run(bot_username(token))  # the token works: go on
    stdout_console().print(
        f"Running @{username} with polling, {before:,} pizzas so far in {mask_url(url)}. Send "
        "it 🍕 or /hunger; Ctrl+C stops.",
        markup=False,
    )
    run_polling(token, url)
    print(f"total pizzas: {sum(asyncio.run(count_pizzas(url)).values())}", flush=True)
    return 0


# -- main ---------------------------------------------------------------------------------


class _OneLineFormatter(logging.Formatter):
    """Log records as ``ptb-sessions: warning: message (Error: reason)``, never a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message = f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message += f" ({type(exc).__name__}: {exc})"
        return message.replace("\n", " ")


def _password(url: str) -> str | None:
    try:
        return make_url(url).password
    except Exception:
        return None


def _one_line(message: str, *secrets: str | None) -> str:
    """``message`` on one line, with ``secrets`` (the URL's password, the bot token) masked."""
    for secret in secrets:
        if secret:
            message = message.replace(secret, "***")
    return " ".join(message.split())


_BACKENDS: Final = ("sqlite", "postgresql", "mysql", "mariadb")


def _database_url(raw: str) -> URL:
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


_COMMANDS: Final = {
    JOBS_COMMAND: lambda url, args: run_jobs(url, args),
    "db": lambda url, args: _db(url, args),
    "stats": lambda url, args: _stats(url),
    "show": lambda url, args: _show(url, args),
    "purge-expired": lambda url, args: _purge(url),
    "export": lambda url, args: _export(url, args.file),
    "import": lambda url, args: _import(url, args.file, args.replace),
    "import-pickle": lambda url, args: _import_pickle(url, args),
    "demo": lambda url, args: _demo(url, args),
}


async def _run(url: URL, args: argparse.Namespace) -> int:
    try:
        return int(await _COMMANDS[args.command](url, args))
    except BaseException:
        # aiosqlite stops the worker thread of a connection that failed to open and reports
        # back to the event loop; give it a moment, or asyncio.run closes the loop first and
        # the thread prints a traceback.
        await asyncio.sleep(0.05)
        raise


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
    password = _password(raw_url)
    token: str | None = None
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
        if args.command == "demo":
            url = _demo_url(args)
            token = args.token or os.environ.get(TOKEN_VARIABLE) or None
            if token:
                return _demo_polling(url, token)
        else:
            url = _database_url(raw_url)
        return asyncio.run(_run(url, args))
    except CLIError as exc:
        print(f"{PROG}: error: {_one_line(str(exc), password, token)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except (PTBSessionsError, ValueError, SQLAlchemyError, OSError) as exc:
        print(f"{PROG}: error: {_one_line(str(exc), password, token)}", file=sys.stderr)
        return 1
    except Exception as exc:
        reason = _one_line(f"{type(exc).__name__}: {exc}", password, token)
        print(f"{PROG}: error: {reason}", file=sys.stderr)
        return 1
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        driver_logger.setLevel(old_driver_level)


if __name__ == "__main__":
    sys.exit(main())
