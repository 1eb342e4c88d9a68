"""Benchmark: writing and loading PTB's chat_data with SQLAlchemyPersistence vs PicklePersistence.

Measures, around exactly the call (``time.perf_counter``):

* ``await app.update_persistence()`` after 10,000 chats changed: first as 10,000 new chats
  (inserts), then with every one of them changed again (updates of existing rows), then with
  all 10,000 marked for update but unchanged (nothing to write);
* ``await app.initialize()`` of a new application with 100,000 chats stored.

SQLAlchemyPersistence runs on SQLite, PostgreSQL and MariaDB, side by side with PTB's own
``PicklePersistence`` in its default mode (``on_flush=False``: every ``update_chat_data`` call
rewrites the whole file, so 10,000 chats are measured with fewer chats and extrapolated, as
the table says) and with ``on_flush=True`` (``update_persistence`` only copies into memory;
the file is written by ``flush()``, timed separately). A third baseline, a persistence that
stores nothing, is PTB's own part of ``update_persistence`` (a deep copy and a coroutine per
chat, and their gather): the floor under every persistence. Each write column gives the ratio to
``PicklePersistence(on_flush=True)`` of the same run, with the target of each backend.

Each persistence's writes, and each ``initialize()``, are measured in a fresh Python process
(``_offline.run_child``), one after another, as ``startup.py`` does: no measurement runs on a
heap that an earlier one left, which changes when the cyclic garbage collector runs.

Usage: python bench/persistence_write.py [--backends sqlite,postgresql,mariadb] [--quick]
       [--clock wall|cpu]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from _offline import (
    CHAT_ID_BASE,
    Timer,
    backend_url,
    builder,
    chat_value,
    child_spec,
    fmt_s,
    machine_line,
    markdown_table,
    median,
    parse_args,
    reset_database,
    run_child,
    seed_rows,
    temp_dir,
    usable_backends,
    write_pickle_file,
)
from telegram.ext import Application, BasePersistence, PicklePersistence

from ptb_sessions import SQLAlchemyPersistence

TARGETS = {"sqlite": 0.2, "postgresql": 1.0, "mariadb": 1.0}
#: At most this many times PicklePersistence(on_flush=True)'s update_persistence, per backend.
RATIO_TARGETS = {"sqlite": 1.3, "postgresql": 2.0, "mariadb": 2.0}


def change(app: Application, ids: range, round_: int) -> None:  # type: ignore[type-arg]
    """Change the chat_data of ``ids`` (creating it if new) and mark them for persistence."""
    for i in ids:
        data = app.chat_data[CHAT_ID_BASE + i]  # type: ignore[index]
        data.update(chat_value(i))
        data["pizzas"] = round_
    app.mark_data_for_update_persistence(chat_ids=[CHAT_ID_BASE + i for i in ids])


def mark(app: Application, ids: range) -> None:  # type: ignore[type-arg]
    app.mark_data_for_update_persistence(chat_ids=[CHAT_ID_BASE + i for i in ids])


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


async def measure_writes(
    make_app: Any, n: int, repeats: int, after_flush: bool = False, clock: str = "wall"
) -> dict[str, float]:
    """Median seconds of update_persistence: n new chats, n changed chats, n unchanged."""
    app = make_app()
    await app.initialize()
    new, changed, unchanged, flushes = [], [], [], []
    try:
        for rep in range(repeats):
            ids = range(rep * n, (rep + 1) * n)  # fresh ids: inserts
            change(app, ids, 0)
            with Timer(CLOCKS[clock]) as t:
                await app.update_persistence()
            new.append(t.seconds)
        ids = range(n)
        for rep in range(repeats):
            change(app, ids, rep + 1)
            with Timer(CLOCKS[clock]) as t:
                await app.update_persistence()
            changed.append(t.seconds)
            if after_flush:
                with Timer(CLOCKS[clock]) as t:
                    await app.persistence.flush()
                flushes.append(t.seconds)
        for _ in range(repeats):
            mark(app, ids)
            with Timer(CLOCKS[clock]) as t:
                await app.update_persistence()
            unchanged.append(t.seconds)
    finally:
        await app.shutdown()
    result = {"new": median(new), "changed": median(changed), "unchanged": median(unchanged)}
    if flushes:
        result["flush"] = median(flushes)
    return result


async def measure_initialize(make_app: Any, n: int, repeats: int, clock: str = "wall") -> float:
    times = []
    for _ in range(repeats):
        app = make_app()
        with Timer(CLOCKS[clock]) as t:
            await app.initialize()
        times.append(t.seconds)
        assert len(app.chat_data) == n, (len(app.chat_data), n)
        await app.shutdown()
        del app
    return median(times)


class FloorPersistence(BasePersistence[Any, Any, Any]):
    """A persistence that stores nothing and returns at once: what remains of
    ``update_persistence`` is PTB's own part."""

    async def get_user_data(self) -> dict[int, Any]:
        return {}

    async def get_chat_data(self) -> dict[int, Any]:
        return {}

    async def get_bot_data(self) -> dict[Any, Any]:
        return {}

    async def get_callback_data(self) -> None:
        return None

    async def get_conversations(self, name: str) -> dict[Any, Any]:
        return {}

    async def update_user_data(self, user_id: int, data: Any) -> None:
        pass

    async def update_chat_data(self, chat_id: int, data: Any) -> None:
        pass

    async def update_bot_data(self, data: Any) -> None:
        pass

    async def update_callback_data(self, data: Any) -> None:
        pass

    async def update_conversation(self, name: str, key: Any, new_state: object) -> None:
        pass

    async def drop_chat_data(self, chat_id: int) -> None:
        pass

    async def drop_user_data(self, user_id: int) -> None:
        pass

    async def refresh_user_data(self, user_id: int, user_data: Any) -> None:
        pass

    async def refresh_chat_data(self, chat_id: int, chat_data: Any) -> None:
        pass

    async def refresh_bot_data(self, bot_data: Any) -> None:
        pass

    async def flush(self) -> None:
        pass


# -- children: one measurement each -------------------------------------------------------


def app_maker(spec: dict[str, Any]) -> Callable[[], Application]:  # type: ignore[type-arg]
    """A maker of offline applications with the persistence that ``spec`` names."""

    def make() -> Application:  # type: ignore[type-arg]
        if spec["kind"] == "sqlalchemy":
            persistence: Any = SQLAlchemyPersistence(spec["url"])
        elif spec["kind"] == "floor":
            persistence = FloorPersistence()
        else:
            persistence = PicklePersistence(
                spec["path"], on_flush=spec["kind"] == "pickle-on-flush"
            )
        return builder().persistence(persistence).build()

    return make


async def child_measure(spec: dict[str, Any]) -> dict[str, float]:
    make_app = app_maker(spec)
    if spec["measure"] == "writes":
        return await measure_writes(
            make_app,
            spec["n"],
            spec["repeats"],
            after_flush=spec["kind"] == "pickle-on-flush",
            clock=spec["clock"],
        )
    return {
        "initialize": await measure_initialize(
            make_app, spec["n"], spec["repeats"], clock=spec["clock"]
        )
    }


# -- parent -------------------------------------------------------------------------------


def _clock_option(parser: Any) -> None:
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: time.perf_counter (default); cpu: time.process_time, the CPU time of every "
        "thread of the measuring process (SQLite's database thread included, a server's work "
        "not)",
    )


def ratio(seconds: float, baseline: float, target: float | None = None) -> str:
    """``seconds`` as a multiple of ``baseline``, with the verdict on ``target`` if given."""
    text = f"{seconds / baseline:.2f}x"
    if target is None:
        return text
    return f"{text} (target {target:g}x: {'met' if seconds <= target * baseline else 'MISSED'})"


def write_cells(
    writes: dict[str, float], baseline: dict[str, float], target: float | None
) -> list[str]:
    """The new, changed and unchanged columns: each time and its ratio to ``baseline``; the
    changed one also with the verdict on ``target`` (the issue's target is for changed chats)."""
    return [
        f"{fmt_s(writes[column])}, "
        f"{ratio(writes[column], baseline[column], target if column == 'changed' else None)}"
        for column in ("new", "changed", "unchanged")
    ]


async def main() -> None:
    args = parse_args(__doc__.splitlines()[0], _clock_option)

    def measured(**spec: Any) -> dict[str, float]:
        return run_child(__file__, {**spec, "clock": args.clock})

    n_write = 1_000 if args.quick else 10_000
    n_pickle = 200 if args.quick else 1_000  # the default PicklePersistence rewrites per chat
    n_stored = 10_000 if args.quick else 100_000
    repeats = 1 if args.quick else 3
    backends = await usable_backends(args.backends)
    rows: list[list[object]] = []

    with temp_dir("ptb-sessions-bench-") as tmp:
        path = Path(tmp) / "bench.pickle"
        # The baselines first: every other write column is given as a ratio to on_flush.
        on_flush = measured(
            kind="pickle-on-flush", path=str(path), measure="writes", n=n_write, repeats=repeats
        )
        path.unlink(missing_ok=True)
        floor = measured(kind="floor", measure="writes", n=n_write, repeats=repeats)
        print("done: baselines", file=sys.stderr)

        for backend in backends:
            url = backend_url(backend, tmp)
            await reset_database(url)
            try:
                writes = measured(
                    kind="sqlalchemy", url=url, measure="writes", n=n_write, repeats=repeats
                )
                await reset_database(url)
                await seed_rows(url, n_stored)
                init = measured(
                    kind="sqlalchemy", url=url, measure="initialize", n=n_stored, repeats=repeats
                )["initialize"]
            finally:
                await reset_database(url)
            target = TARGETS[backend]
            verdict = "met" if writes["changed"] < target and writes["new"] < target else "MISSED"
            rows.append(
                [
                    f"SQLAlchemyPersistence, {backend}",
                    *write_cells(writes, on_flush, RATIO_TARGETS[backend]),
                    fmt_s(init),
                    f"< {target:g} s: {verdict}",
                ]
            )
            print(f"done: {backend}", file=sys.stderr)

        # PicklePersistence, default mode: one whole-file rewrite per changed chat.
        small = measured(kind="pickle", path=str(path), measure="writes", n=n_pickle, repeats=1)
        factor = (n_write / n_pickle) ** 2
        path.unlink(missing_ok=True)
        write_pickle_file(path, n_stored)
        pickle_init = measured(
            kind="pickle", path=str(path), measure="initialize", n=n_stored, repeats=repeats
        )["initialize"]
        path.unlink(missing_ok=True)
        rows.append(
            [
                f"PicklePersistence(on_flush=False), measured with {n_pickle:,} chats x "
                f"{factor:g} (n² growth)",
                f"~{fmt_s(small['new'] * factor)} ({fmt_s(small['new'])} for {n_pickle:,})",
                f"~{fmt_s(small['changed'] * factor)} "
                f"({fmt_s(small['changed'])} for {n_pickle:,})",
                f"~{fmt_s(small['unchanged'] * n_write / n_pickle)} (linear)",
                fmt_s(pickle_init),
                "",
            ]
        )
        print("done: pickle on_flush=False", file=sys.stderr)
        rows.append(
            [
                "PicklePersistence(on_flush=True): update_persistence (memory only), the baseline",
                *write_cells(on_flush, on_flush, None),
                "same file format as above",
                "",
            ]
        )
        rows.append(
            [
                "PicklePersistence(on_flush=True): flush() writing the file "
                f"({n_write * repeats:,} chats)",
                "",
                fmt_s(on_flush["flush"]),
                "",
                "",
                "",
            ]
        )
        rows.append(
            [
                "PTB's own part (a persistence that stores nothing): the floor",
                *write_cells(floor, on_flush, None),
                "",
                "",
            ]
        )

    print(f"\n{machine_line()}\n")
    print(
        markdown_table(
            [
                "persistence",
                f"update_persistence, {n_write:,} new chats, vs on_flush=True",
                f"update_persistence, {n_write:,} changed chats, vs on_flush=True",
                f"{n_write:,} marked, unchanged, vs on_flush=True",
                f"initialize(), {n_stored:,} stored chats",
                "target (10,000-chat write)",
            ],
            rows,
        )
    )
    print(
        f"\nmedian of {repeats} runs each; time.{CLOCKS[args.clock].__name__} around exactly "
        "the call; each persistence's writes, and each initialize(), in a fresh process."
    )


if __name__ == "__main__":
    spec = child_spec()
    if spec is not None:
        print(json.dumps(asyncio.run(child_measure(spec))))
    else:
        asyncio.run(main())
