"""Benchmark: updates per second through a real Application with a SessionHandler.

* Strict ``SessionHandler`` (one read and one changed write per update, ``context.session["n"]
  += 1``) over 1,000 chats, on ``MemoryStorage`` and ``SQLAlchemyStorage`` on SQLite,
  PostgreSQL and MariaDB, side by side with the same bot on plain ``context.chat_data`` and no
  persistence. Sequential (``await app.process_update(update)`` in a loop) and concurrent
  (``ApplicationBuilder().concurrent_updates(64)``, every update put into
  ``app.update_queue`` after ``app.start()``, timed until the last one is handled).
* Lazy ``SessionHandler`` whose handler never touches the session vs the same handler with no
  SessionHandler at all (sequential, alternating runs, median).
* Scaling (``--scaling``, needs PostgreSQL): 1, 2 and 4 bot processes on one PostgreSQL
  database with ``SessionHandler(lock="database")``, each running the concurrent workload on
  chats of its own, started together; the aggregate is every process's updates over the time
  from the first start to the last end.

Every chat got one update before the timed run (its row exists). ``time.perf_counter`` around
exactly the loop (sequential) or from the first ``put`` to the last handled update
(concurrent). A group-1 ``TypeHandler`` counts handled updates in every configuration.

Usage: python bench/sessions.py [--backends sqlite,postgresql,mariadb] [--quick] [--scaling]
"""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _offline import (
    CHAT_ID_BASE,
    Timer,
    backend_url,
    builder,
    fmt_rate,
    machine_line,
    markdown_table,
    median,
    message_update,
    parse_args,
    reset_database,
    temp_dir,
    usable_backends,
)
from telegram import Update
from telegram.ext import Application, MessageHandler, TypeHandler, filters

from ptb_sessions import MemoryStorage, SQLAlchemyStorage

try:
    from ptb_sessions import SessionHandler
except ImportError:  # not yet exported at the top level
    from ptb_sessions._sessionhandler import SessionHandler  # type: ignore[no-redef]

CHATS = 1_000
CONCURRENCY = 64
#: Issue "Fast sessions": updates/s as a share of MemoryStorage's in the same run, by backend:
#: (sequential, concurrent); None: no target.
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "sqlite": (0.20, 0.50),
    "postgresql": (None, 0.25),
    "mariadb": (None, 0.25),
}


def share_and_target(rate: float, memory: float, target: float | None) -> str:
    """``rate`` as a share of MemoryStorage's ``memory``, and whether it meets ``target``."""
    share = f"{rate / memory:.0%} of memory"
    if target is None:
        return share
    return f"{share} (target {target:.0%}: {'met' if rate / memory >= target else 'MISSED'})"


class Counter:
    def __init__(self) -> None:
        self.handled = 0
        self.errors = 0
        self.expected = 0
        self.done = asyncio.Event()
        self.first_error: BaseException | None = None

    async def count(self, update: object, context: object) -> None:
        self.handled += 1
        if self.handled >= self.expected:
            self.done.set()

    async def error(self, update: object, context: Any) -> None:
        self.errors += 1
        if self.first_error is None:
            self.first_error = context.error

    def arm(self, expected: int) -> None:
        self.handled = 0
        self.expected = expected
        self.done.clear()


async def on_session(update: Update, context: Any) -> None:
    context.session["n"] += 1


async def on_chat_data(update: Update, context: Any) -> None:
    context.chat_data["n"] = context.chat_data.get("n", 0) + 1


async def untouched(update: Update, context: Any) -> None:
    pass


async def untouched_reply(update: Update, context: Any) -> None:
    await update.message.reply_text("ok")  # type: ignore[union-attr]


def build(
    add_handlers: Callable[[Application], None], concurrent: bool
) -> tuple[Application, Counter]:  # type: ignore[type-arg]
    b = builder()
    if concurrent:
        b = b.concurrent_updates(CONCURRENCY)
    app = b.build()
    add_handlers(app)
    counter = Counter()
    app.add_handler(TypeHandler(Update, counter.count), group=1)
    app.add_error_handler(counter.error)
    return app, counter


def updates_for(
    app: Application,  # type: ignore[type-arg]
    n: int,
    start: int = 0,
    chats_from: int = CHAT_ID_BASE,
) -> list[Update]:
    return [message_update(chats_from + (i % CHATS), bot=app.bot) for i in range(start, start + n)]


async def run_sequential(add_handlers: Callable[[Application], None], n: int) -> tuple[float, int]:  # type: ignore[type-arg]
    """Updates per second, errors."""
    app, counter = build(add_handlers, concurrent=False)
    await app.initialize()
    try:
        counter.arm(CHATS)
        for update in updates_for(app, CHATS):  # warm-up: one update per chat
            await app.process_update(update)
        updates = updates_for(app, n, CHATS)
        counter.arm(n)
        with Timer() as t:
            for update in updates:
                await app.process_update(update)
        assert counter.handled == n, (counter.handled, n)
    finally:
        await app.shutdown()
    if counter.errors:
        print(f"  {counter.errors} errors, first: {counter.first_error!r}", file=sys.stderr)
    return n / t.seconds, counter.errors


async def run_concurrent(
    add_handlers: Callable[[Application], None],  # type: ignore[type-arg]
    n: int,
    chats_from: int = CHAT_ID_BASE,
    ready: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """Updates per second, errors. ``ready`` is called after the warm-up, just before the
    timed run."""
    app, counter = build(add_handlers, concurrent=True)
    await app.initialize()
    try:
        counter.arm(CHATS)
        for update in updates_for(app, CHATS, chats_from=chats_from):
            await app.process_update(update)
        updates = updates_for(app, n, CHATS, chats_from=chats_from)
        counter.arm(n)
        if ready is not None:
            ready()
        await app.start()
        try:
            with Timer() as t:
                for update in updates:
                    app.update_queue.put_nowait(update)
                await asyncio.wait_for(counter.done.wait(), 600)
        finally:
            await app.stop()
    finally:
        await app.shutdown()
    if counter.errors:
        print(f"  {counter.errors} errors, first: {counter.first_error!r}", file=sys.stderr)
    return n / t.seconds, counter.errors


def session_handlers(storage: Any, **options: Any) -> Callable[[Application], None]:  # type: ignore[type-arg]
    def add(app: Application) -> None:  # type: ignore[type-arg]
        app.add_handler(
            SessionHandler(
                [MessageHandler(filters.TEXT, on_session)],
                initial=lambda: {"n": 0},
                storage=storage,
                **options,
            )
        )

    return add


def scaling_process(url: str, index: int, n: int, barrier: Any, results: Any) -> None:
    """One bot process of the scaling run: the concurrent workload on chats of its own, with
    ``lock="database"``; puts ``(start, end, updates, errors)`` into ``results``."""

    async def run() -> None:
        storage = SQLAlchemyStorage(url)
        try:
            rate, errors = await run_concurrent(
                session_handlers(storage, lock="database"),
                n,
                chats_from=CHAT_ID_BASE + index * CHATS,
                ready=lambda: barrier.wait(120),
            )
        finally:
            await storage.close()
        end = time.time()
        results.put((end - n / rate, end, n, errors))

    asyncio.run(run())


async def scaling_rows(url: str, n: int) -> list[list[object]]:
    """The aggregate updates/s of 1, 2 and 4 processes (see the module docstring)."""
    spawn = multiprocessing.get_context("spawn")
    rows: list[list[object]] = []
    single: float | None = None
    for processes in (1, 2, 4):
        await reset_database(url)
        barrier, results = spawn.Barrier(processes), spawn.Queue()
        children = [
            spawn.Process(target=scaling_process, args=(url, i, n, barrier, results))
            for i in range(processes)
        ]
        for child in children:
            child.start()
        outcomes = [results.get(timeout=900) for _ in children]
        for child in children:
            child.join()
        start = min(o[0] for o in outcomes)
        end = max(o[1] for o in outcomes)
        total = sum(o[2] for o in outcomes)
        rate = total / (end - start)
        single = single or rate
        errors = sum(o[3] for o in outcomes)
        ratio = f"{rate / single:.2f}x"
        rows.append([str(processes), f"{total:,}", fmt_rate(rate), ratio, str(errors)])
        print(f"done: scaling, {processes} processes", file=sys.stderr)
    await reset_database(url)
    return rows


def chat_data_handlers(app: Application) -> None:  # type: ignore[type-arg]
    app.add_handler(MessageHandler(filters.TEXT, on_chat_data))


def _scaling_option(parser: Any) -> None:
    parser.add_argument(
        "--scaling", action="store_true", help="also run 1, 2 and 4 processes on PostgreSQL"
    )


Run = Callable[[], Awaitable[tuple[float, int]]]


async def medians_abba(runs: Sequence[Run], rounds: int) -> list[tuple[float, int]]:
    """Each run's median updates/s over ``rounds`` rounds, and its errors summed. The order of
    the runs reverses every round (ABBA), so that none is always first or last and a machine
    whose speed drifts moves every run alike."""
    rates: list[list[float]] = [[] for _ in runs]
    errors = [0] * len(runs)
    order = list(range(len(runs)))
    for round_ in range(rounds):
        for i in order if round_ % 2 == 0 else order[::-1]:
            rate, errs = await runs[i]()
            rates[i].append(rate)
            errors[i] += errs
    return [(median(r), e) for r, e in zip(rates, errors)]


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _scaling_option)
    n = 1_000 if args.quick else 5_000
    n_lazy = 2_000 if args.quick else 40_000
    rounds = 1 if args.quick else 5
    lazy_rounds = 1 if args.quick else 7
    backends = await usable_backends(args.backends)
    rows: list[list[object]] = []

    def row(
        name: str,
        seq: tuple[float, int],
        conc: tuple[float, int],
        shares: tuple[str, str] = ("", ""),
    ) -> None:
        errors = seq[1] + conc[1]
        rows.append(
            [
                name,
                fmt_rate(seq[0]),
                shares[0],
                fmt_rate(conc[0]),
                shares[1],
                f"{conc[0] / seq[0]:.2f}x",
                str(errors),
            ]
        )

    with temp_dir("ptb-sessions-bench-") as tmp:
        # every configuration of the main table, measured in the same rounds (ABBA)
        urls = [backend_url(backend, tmp) for backend in backends]
        for url in urls:
            await reset_database(url)
        storages = [SQLAlchemyStorage(url) for url in urls]
        try:
            configs = [
                chat_data_handlers,
                session_handlers(MemoryStorage()),
                *(session_handlers(storage) for storage in storages),
            ]
            seq = await medians_abba(
                [functools.partial(run_sequential, add, n) for add in configs], rounds
            )
            print("done: sequential", file=sys.stderr)
            conc = await medians_abba(
                [functools.partial(run_concurrent, add, n) for add in configs], rounds
            )
            print("done: concurrent", file=sys.stderr)
        finally:
            for storage in storages:
                await storage.close()
            for url in urls:
                await reset_database(url)
        row("plain context.chat_data, no persistence", seq[0], conc[0])
        row("SessionHandler, MemoryStorage", seq[1], conc[1])
        for i, backend in enumerate(backends, start=2):
            seq_target, conc_target = TARGETS[backend]
            shares = (
                share_and_target(seq[i][0], seq[1][0], seq_target),
                share_and_target(conc[i][0], conc[1][0], conc_target),
            )
            row(f"SessionHandler, SQLAlchemyStorage, {backend}", seq[i], conc[i], shares)

        # lazy, never touched vs no SessionHandler at all; an empty handler and one that
        # replies (a Bot API call answered in-process)
        url = backend_url("sqlite", tmp)
        await reset_database(url)
        storage = SQLAlchemyStorage(url)
        lazy_rows: list[list[object]] = []

        def with_session(callback: Any) -> Callable[[Application], None]:  # type: ignore[type-arg]
            def add(app: Application) -> None:  # type: ignore[type-arg]
                app.add_handler(
                    SessionHandler(
                        [MessageHandler(filters.TEXT, callback)], lazy=True, storage=storage
                    )
                )

            return add

        def without_session(callback: Any) -> Callable[[Application], None]:  # type: ignore[type-arg]
            def add(app: Application) -> None:  # type: ignore[type-arg]
                app.add_handler(MessageHandler(filters.TEXT, callback))

            return add

        try:
            for label, callback, count in (
                ("empty handler", untouched, n_lazy),
                ("handler that replies", untouched_reply, n_lazy // 4),
            ):
                (bare_rate, _), (lazy_rate, _) = await medians_abba(
                    [
                        functools.partial(run_sequential, without_session(callback), count),
                        functools.partial(run_sequential, with_session(callback), count),
                    ],
                    lazy_rounds,
                )
                slowdown = 1 - lazy_rate / bare_rate
                overhead = 1 / lazy_rate - 1 / bare_rate
                lazy_rows.append(
                    [f"{label}, no SessionHandler", f"{count:,}", fmt_rate(bare_rate), "", "", ""]
                )
                lazy_rows.append(
                    [
                        f"{label}, SessionHandler(lazy=True, SQLite), never touched",
                        f"{count:,}",
                        fmt_rate(lazy_rate),
                        f"{-slowdown:+.1%}",
                        f"{overhead * 1e6:+.1f} µs",
                        "met" if slowdown <= 0.10 else "MISSED",
                    ]
                )
                print(f"done: lazy, {label}", file=sys.stderr)
        finally:
            await storage.close()
            await reset_database(url)

    print(f"\n{machine_line()}\n")
    print(
        markdown_table(
            [
                "configuration",
                f"sequential ({n:,} updates), median of {rounds}",
                "vs MemoryStorage",
                f"concurrent_updates({CONCURRENCY}) ({n:,} updates), median of {rounds}",
                "vs MemoryStorage",
                "concurrent / sequential",
                "errors",
            ],
            rows,
        )
    )
    print(
        f"\n{CHATS:,} chats, round robin; strict session: one read and one changed write per "
        "update. Each chat had one update before the timed run. Every configuration ran in "
        "each round, in an order that reverses every round (ABBA).\n"
    )
    print(
        markdown_table(
            [
                "configuration",
                "updates",
                f"sequential, median of {lazy_rounds}",
                "vs no SessionHandler",
                "extra time per update",
                "target (within 10%)",
            ],
            lazy_rows,
        )
    )
    if args.scaling and "postgresql" in backends:
        url = backend_url("postgresql", "")
        rows = await scaling_rows(url, n)
        print(
            f"\nScaling: bot processes on one PostgreSQL database, SessionHandler(lock="
            f'"database"), concurrent_updates({CONCURRENCY}), {n:,} updates per process on '
            f"{CHATS:,} chats of its own, started together.\n"
        )
        print(
            markdown_table(
                ["processes", "updates", "aggregate updates/s", "vs 1 process", "errors"], rows
            )
        )


if __name__ == "__main__":
    asyncio.run(main())
