"""Shared helpers of the benchmarks: a PTB ``Application`` with no network, real ``Update``
objects, the database backends (URLs, reset, fast seeding) and table printing.

Copied (not imported) from ``tests/_bot.py``: the benchmarks must not depend on the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dtm
import gc
import itertools
import json
import logging
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from telegram import Bot, Chat, Message, Update, User
from telegram.ext import Application, ApplicationBuilder

TOKEN = "123456:ABCDEF-offline-bench-token"
BOT_USER = {"id": 123456, "is_bot": True, "first_name": "Offline", "username": "offline_bot"}
_update_ids = itertools.count(1)
_message_ids = itertools.count(1)
_DATE = dtm.datetime(2026, 1, 1, tzinfo=dtm.timezone.utc)

#: Chat ids of the benchmarks: realistic magnitudes (private chats).
CHAT_ID_BASE = 1_000_000_000

BACKENDS = ("sqlite", "postgresql", "mariadb")
#: The benchmarks' own database on each server, created if missing: the benchmarks drop and
#: create tables there, and never touch another database.
BENCH_DATABASE = "ptbs_bench"
SERVER_URLS = {
    "postgresql": os.environ.get(
        "PTB_SESSIONS_BENCH_POSTGRESQL",
        f"postgresql+asyncpg://postgres@127.0.0.1:5432/{BENCH_DATABASE}",
    ),
    "mariadb": os.environ.get(
        "PTB_SESSIONS_BENCH_MARIADB", f"mysql+asyncmy://root@127.0.0.1:3306/{BENCH_DATABASE}"
    ),
}
_SERVER_DATABASES = {"postgresql": "postgres", "mariadb": "mysql"}
TABLES = ("ptb_sessions_data", "ptb_sessions_jobs", "ptb_sessions_alembic_version")

# MariaDB notes (e.g. "Unknown table" on DROP TABLE IF EXISTS) are logged by the driver.
logging.getLogger("asyncmy").setLevel(logging.ERROR)


# -- offline application ------------------------------------------------------------------

from ptb_sessions._demo import OfflineRequest  # noqa: E402 - the demo's in-process Bot API


def builder() -> ApplicationBuilder:  # type: ignore[type-arg]
    """An ``ApplicationBuilder`` that talks to an :class:`OfflineRequest` and has no updater."""
    request = OfflineRequest()
    return (
        ApplicationBuilder()
        .token(TOKEN)
        .request(request)
        .get_updates_request(request)
        .updater(None)
    )


def message_update(chat_id: int, text: str = "hi", bot: Bot | None = None) -> Update:
    """A text message in the private chat ``chat_id`` from the user ``chat_id``."""
    chat = Chat(id=chat_id, type=Chat.PRIVATE if chat_id > 0 else Chat.SUPERGROUP)
    user_id = chat_id if chat_id > 0 else 1
    message = Message(
        message_id=next(_message_ids),
        date=_DATE,
        chat=chat,
        from_user=User(id=user_id, is_bot=False, first_name=f"user{user_id}"),
        text=text,
    )
    update = Update(update_id=next(_update_ids), message=message)
    if bot is not None:
        update.set_bot(bot)
        message.set_bot(bot)
    return update


async def process(app: Application, *updates: Update) -> None:  # type: ignore[type-arg]
    """Feed ``updates`` to ``app.process_update`` one after the other."""
    for update in updates:
        await app.process_update(update)


# -- backends -----------------------------------------------------------------------------


def sqlite_url(directory: str | Path, name: str = "bench.sqlite3") -> str:
    return f"sqlite+aiosqlite:///{Path(directory) / name}"


def backend_url(backend: str, directory: str | Path) -> str:
    """The URL of ``backend``: a file in ``directory`` for SQLite, else the server."""
    if backend == "sqlite":
        return sqlite_url(directory)
    return SERVER_URLS[backend]


async def reset_database(url: str) -> None:
    """Drop the tables of ptb-sessions (an SQLite file is deleted with its WAL files)."""
    if url.startswith("sqlite"):
        path = Path(url.split(":///", 1)[1])
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(str(path) + suffix).unlink(missing_ok=True)  # noqa: ASYNC240
        return
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            for table in TABLES:
                await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
    finally:
        await engine.dispose()


async def create_database(backend: str) -> None:
    """Create the benchmarks' database on ``backend``'s server if it does not exist."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    url = make_url(SERVER_URLS[backend])
    server = url.set(database=_SERVER_DATABASES[backend])
    engine = create_async_engine(server, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            if backend == "postgresql":
                exists = await conn.scalar(
                    text("SELECT 1 FROM pg_database WHERE datname = :name"),
                    {"name": url.database},
                )
                if not exists:
                    await conn.execute(text(f'CREATE DATABASE "{url.database}"'))
            else:
                await conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{url.database}`"))
    finally:
        await engine.dispose()


async def reachable(backend: str) -> str | None:
    """``None`` if ``backend`` can be used, else why not."""
    if backend == "sqlite":
        return None
    try:
        await asyncio.wait_for(create_database(backend), 15)
        await asyncio.wait_for(reset_database(SERVER_URLS[backend]), 15)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def chat_value(i: int) -> dict[str, Any]:
    """A small, realistic chat_data value."""
    return {"pizzas": i % 7, "name": f"user{i}", "lang": "en", "orders": [i % 3, i % 5]}


async def seed_rows(
    url: str, n: int, namespace: str = "chat_data", start: int = 0, chunk: int = 20_000
) -> float:
    """Create the schema and store the rows ``start`` to ``n - 1`` of ``namespace`` directly,
    the way the persistence stores them (keys ``CHAT_ID_BASE + i``, values :func:`chat_value`
    as JSONCodec text), through the raw driver (COPY on PostgreSQL, ``executemany`` in one
    transaction elsewhere). Returns the seconds it took."""
    from ptb_sessions._codec import JSONCodec
    from ptb_sessions._store import Database

    begin = time.perf_counter()
    database = Database(url)
    await database.ensure_schema()
    now = time.time()
    encode = JSONCodec().encode
    columns = (
        "namespace",
        "key",
        "codec",
        "data",
        "version",
        "data_version",
        "touched_at",
        "expires_at",
    )
    dialect = database.dialect
    try:
        async with database.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            for lo in range(start, n, chunk):
                rows = [
                    (
                        namespace,
                        str(CHAT_ID_BASE + i),
                        "json",
                        encode(chat_value(i)),
                        1,
                        None,
                        now,
                        None,
                    )
                    for i in range(lo, min(n, lo + chunk))
                ]
                if dialect == "postgresql":
                    await driver.copy_records_to_table(
                        "ptb_sessions_data", records=rows, columns=columns
                    )
                elif dialect == "sqlite":
                    await driver.execute("BEGIN")
                    await driver.executemany(
                        f"INSERT INTO ptb_sessions_data ({', '.join(columns)}) VALUES "
                        f"({', '.join('?' * len(columns))})",
                        rows,
                    )
                    await driver.execute("COMMIT")
                else:
                    async with driver.cursor() as cursor:
                        await cursor.executemany(
                            f"INSERT INTO ptb_sessions_data (`{'`, `'.join(columns)}`) VALUES "
                            f"({', '.join(['%s'] * len(columns))})",
                            rows,
                        )
                    await driver.commit()
            await conn.rollback()
    finally:
        await database.dispose()
    return time.perf_counter() - begin


def write_pickle_file(path: str | Path, n: int) -> float:
    """Write a ``PicklePersistence`` single file holding ``n`` chats. Returns the seconds."""
    start = time.perf_counter()
    data = {
        "conversations": {},
        "user_data": {},
        "chat_data": {CHAT_ID_BASE + i: chat_value(i) for i in range(n)},
        "bot_data": {},
        "callback_data": None,
    }
    with open(path, "wb") as file:
        pickle.dump(data, file, protocol=pickle.HIGHEST_PROTOCOL)
    return time.perf_counter() - start


# -- measuring ----------------------------------------------------------------------------


class Timer:
    """``with Timer() as t: ...``; ``t.seconds`` after the block, by ``clock``
    (``time.perf_counter`` by default; ``time.process_time`` is the CPU time of every thread
    of this process, which a busy host's other guests do not stretch)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock

    def __enter__(self) -> Timer:
        gc.collect()
        self.seconds = 0.0
        self._start = self.clock()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = self.clock() - self._start


def max_rss_mib() -> float:
    """The peak resident set size of this process, MiB: ``VmHWM`` of ``/proc/self/status``
    (what ``resource.getrusage`` reports as ``ru_maxrss``, except that ``ru_maxrss`` keeps the
    parent's peak across fork + exec, so a subprocess of a big parent would report the
    parent's size)."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """The resident set size of this process now (``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as file:
        pages = int(file.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


# -- output -------------------------------------------------------------------------------


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def fmt_mib(mib: float | None) -> str:
    return "-" if mib is None else f"{mib:.1f} MiB"


def fmt_rate(per_second: float | None) -> str:
    return "-" if per_second is None else f"{per_second:,.0f}/s"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def machine_line() -> str:
    import platform

    import sqlalchemy
    import telegram

    return (
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, python-telegram-bot {telegram.__version__}, "
        f"SQLAlchemy {sqlalchemy.__version__}"
    )


def parse_args(
    description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated: sqlite,postgresql,mariadb (default: all three)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    return args


async def usable_backends(backends: Sequence[str]) -> list[str]:
    """The backends that are reachable; the others are reported on stderr and skipped."""
    usable = []
    for backend in backends:
        reason = await reachable(backend)
        if reason is None:
            usable.append(backend)
        else:
            print(f"skipping {backend}: {reason}", file=sys.stderr)
    return usable


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix)


def run_child(script: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``script --child <spec as JSON>`` in a fresh Python process and return the JSON
    object it prints last. A fresh process measures one thing alone: nothing that an earlier
    measurement left on the heap changes when the garbage collector runs."""
    out = subprocess.run(
        [sys.executable, script, "--child", json.dumps(spec)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def child_spec() -> dict[str, Any] | None:
    """The spec of a process started by :func:`run_child`, or :obj:`None` in the parent."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec: dict[str, Any] = json.loads(sys.argv[2])
        return spec
    return None
