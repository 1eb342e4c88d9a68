"""Benchmark: start-up time and memory with many stored chats, and memory under a flood of
distinct chats.

* ``await app.initialize()`` (``time.perf_counter`` around exactly that call) and memory with
  100,000 and 1,000,000 stored chats: ``SQLAlchemyPersistence(lazy=True)`` vs PTB's
  ``PicklePersistence`` (which always loads everything), and the eager
  ``SQLAlchemyPersistence`` at 100,000.
* Memory after N distinct chats sent one update each through ``app.process_update``
  (``update_persistence`` every 1,000 updates): ``SQLAlchemyPersistence(lazy=True,
  max_cached=1000)`` vs ``PicklePersistence(on_flush=True)``, with the RSS at checkpoints.

Every measurement runs in a fresh subprocess. Memory is peak RSS (``VmHWM`` of
``/proc/self/status``: the kernel's high-water mark that ``resource.getrusage`` reports as
``ru_maxrss``, read there because ``ru_maxrss`` keeps the parent's peak across fork + exec) of
that process minus the peak RSS of a baseline process that imports exactly
the same modules (the measured process's ``sys.modules``) and builds and initializes the same
offline Application without a persistence. It is the whole process's memory, not only Python
allocations.

Usage: python bench/startup.py [--backends sqlite,postgresql,mariadb] [--quick]
       [--flood N] (default 20,000 chats; 1,000,000 is possible but slow) [--only startup|flood]
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

# Only the light helpers at module level: a baseline child must import nothing more than the
# measured child did.
import _offline

TARGET_TIME = 0.1
TARGET_MIB = 20.0


# -- children -----------------------------------------------------------------------------


def _persistence(spec: dict[str, Any]) -> Any:
    kind = spec["kind"]
    if kind in ("pickle", "flood-pickle"):
        from telegram.ext import PicklePersistence

        return PicklePersistence(spec["path"], on_flush=kind == "flood-pickle")
    from ptb_sessions import SQLAlchemyPersistence

    if kind == "eager":
        return SQLAlchemyPersistence(spec["url"])
    if kind == "lazy":
        return SQLAlchemyPersistence(spec["url"], lazy=True)
    if kind == "flood-bounded":
        return SQLAlchemyPersistence(spec["url"], lazy=True, max_cached=spec["max_cached"])
    raise ValueError(kind)


async def _child_measure(spec: dict[str, Any]) -> dict[str, Any]:
    from telegram.ext import MessageHandler, filters

    app = _offline.builder().persistence(_persistence(spec)).build()
    result: dict[str, Any] = {}
    if spec["kind"].startswith("flood"):

        async def pizza(update: Any, context: Any) -> None:
            context.chat_data["pizzas"] = context.chat_data.get("pizzas", 0) + 1

        app.add_handler(MessageHandler(filters.ALL, pizza))
    gc.collect()
    start = time.perf_counter()
    await app.initialize()
    result["init_s"] = time.perf_counter() - start
    result["chats_loaded"] = len(app.chat_data)
    if spec["kind"].startswith("flood"):
        n = spec["n"]
        marks = {n // 10, n // 4, n // 2, 3 * n // 4, n}
        checkpoints = []
        bot = app.bot
        gc.collect()
        result["rss_before_flood"] = _offline.current_rss_mib()
        start = time.perf_counter()
        for i in range(1, n + 1):
            await app.process_update(_offline.message_update(_offline.CHAT_ID_BASE + i, bot=bot))
            if i % 1000 == 0:
                await app.update_persistence()
            if i in marks:
                gc.collect()
                checkpoints.append((i, _offline.current_rss_mib(), len(app.chat_data)))
        result["flood_s"] = time.perf_counter() - start
        result["checkpoints"] = checkpoints
    result["max_rss"] = _offline.max_rss_mib()
    result["modules"] = sorted(sys.modules)
    await app.shutdown()
    return result


async def _child_baseline() -> dict[str, Any]:
    app = _offline.builder().build()
    await app.initialize()
    await app.shutdown()
    return {"max_rss": _offline.max_rss_mib()}


def child_main(spec: dict[str, Any]) -> None:
    if spec["kind"] == "baseline":
        for name in spec["modules"]:
            try:
                importlib.import_module(name)
            except Exception:
                continue
        result = asyncio.run(_child_baseline())
    else:
        result = asyncio.run(_child_measure(spec))
    print(json.dumps(result))


# -- parent -------------------------------------------------------------------------------


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    return _offline.run_child(__file__, spec)


_baselines: dict[tuple[str, ...], float] = {}


def baseline_for(modules: list[str]) -> float:
    key = tuple(modules)
    if key not in _baselines:
        _baselines[key] = min(
            run_child({"kind": "baseline", "modules": modules})["max_rss"] for _ in range(2)
        )
    return _baselines[key]


def measure(spec: dict[str, Any], repeats: int) -> dict[str, Any]:
    """Median init time and memory (peak RSS minus baseline) over ``repeats`` fresh processes."""
    runs = [run_child(spec) for _ in range(repeats)]
    base = baseline_for(runs[0]["modules"])
    last = runs[-1]
    return {
        "init_s": _offline.median(r["init_s"] for r in runs),
        "mem": _offline.median(r["max_rss"] - base for r in runs),
        "chats_loaded": last["chats_loaded"],
        "checkpoints": [
            (i, rss - last["rss_before_flood"], chats)
            for i, rss, chats in last.get("checkpoints", [])
        ],
        "flood_s": last.get("flood_s"),
        "base": base,
    }


async def parent_main() -> None:
    def extra(parser: Any) -> None:
        parser.add_argument(
            "--flood",
            type=int,
            default=None,
            help="distinct chats (one update each) of the flood test; default 20,000",
        )
        parser.add_argument(
            "--only", choices=("startup", "flood"), default=None, help="run only one part"
        )

    args = _offline.parse_args(__doc__.splitlines()[0], extra)
    sizes = (10_000, 100_000) if args.quick else (100_000, 1_000_000)
    repeats = 1 if args.quick else 3
    flood = args.flood or (2_000 if args.quick else 20_000)
    max_cached = 1000
    backends = await _offline.usable_backends(args.backends)
    fmt_s, fmt_mib = _offline.fmt_s, _offline.fmt_mib
    startup_rows: list[list[object]] = []
    flood_rows: list[list[object]] = []

    def verdict(result: dict[str, Any], n: int, backend: str) -> str:
        if n != sizes[-1] or args.quick:
            return ""
        ok = result["init_s"] < TARGET_TIME and result["mem"] < TARGET_MIB
        targeted = backend in ("sqlite", "postgresql")
        return ("met" if ok else "MISSED") + ("" if targeted else " (not a target backend)")

    with _offline.temp_dir("ptb-sessions-bench-") as tmp:
        for backend in backends if args.only != "flood" else ():
            url = _offline.backend_url(backend, tmp)
            await _offline.reset_database(url)
            try:
                seeded = 0
                for n in sizes:
                    took = await _offline.seed_rows(url, n, start=seeded)
                    seeded = n
                    print(f"{backend}: {n:,} rows stored ({took:.1f} s)", file=sys.stderr)
                    lazy = measure({"kind": "lazy", "url": url}, repeats)
                    assert lazy["chats_loaded"] == 0
                    startup_rows.append(
                        [
                            f"SQLAlchemyPersistence(lazy=True), {backend}",
                            f"{n:,}",
                            fmt_s(lazy["init_s"]),
                            fmt_mib(lazy["mem"]),
                            verdict(lazy, n, backend),
                        ]
                    )
                    if n == sizes[0]:
                        eager = measure({"kind": "eager", "url": url}, repeats)
                        assert eager["chats_loaded"] == n
                        startup_rows.append(
                            [
                                f"SQLAlchemyPersistence (eager), {backend}",
                                f"{n:,}",
                                fmt_s(eager["init_s"]),
                                fmt_mib(eager["mem"]),
                                "",
                            ]
                        )
            finally:
                await _offline.reset_database(url)

        path = str(Path(tmp) / "bench.pickle")
        for n in sizes if args.only != "flood" else ():
            _offline.write_pickle_file(path, n)
            # the largest pickle takes ~20 s per process: measured once
            result = measure({"kind": "pickle", "path": path}, repeats if n < sizes[-1] else 1)
            assert result["chats_loaded"] == n
            startup_rows.append(
                [
                    "PicklePersistence",
                    f"{n:,}",
                    fmt_s(result["init_s"]),
                    fmt_mib(result["mem"]),
                    "",
                ]
            )
            print(f"pickle: {n:,} done", file=sys.stderr)
        Path(path).unlink(missing_ok=True)  # noqa: ASYNC240

        def flood_row(name: str, result: dict[str, Any]) -> list[object]:
            points = ", ".join(f"{i:,}: {rss:.0f}" for i, rss, _ in result["checkpoints"])
            chats = result["checkpoints"][-1][2]
            return [
                name,
                f"{flood:,}",
                f"{flood / result['flood_s']:,.0f}/s",
                points,
                fmt_mib(result["mem"]),
                f"{chats:,}",
            ]

        for backend in backends if args.only != "startup" else ():
            url = _offline.backend_url(backend, tmp)
            await _offline.reset_database(url)
            try:
                result = measure(
                    {"kind": "flood-bounded", "url": url, "n": flood, "max_cached": max_cached}, 1
                )
            finally:
                await _offline.reset_database(url)
            flood_rows.append(
                flood_row(
                    f"SQLAlchemyPersistence(lazy=True, max_cached={max_cached}), {backend}", result
                )
            )
            print(f"flood {backend} done", file=sys.stderr)
        if args.only != "startup":
            result = measure({"kind": "flood-pickle", "path": path, "n": flood}, 1)
            Path(path).unlink(missing_ok=True)  # noqa: ASYNC240
            flood_rows.append(flood_row("PicklePersistence(on_flush=True)", result))

    print(f"\n{_offline.machine_line()}\n")
    if startup_rows:
        print(
            _offline.markdown_table(
                [
                    "persistence",
                    "stored chats",
                    "initialize()",
                    "memory (peak RSS - baseline)",
                    f"target (< {TARGET_TIME:g} s, < {TARGET_MIB:g} MiB)",
                ],
                startup_rows,
            )
        )
        print(
            f"\nmedian of {repeats} fresh processes each (the largest pickle: one); "
            "memory = peak RSS (VmHWM) of the "
            "process minus that of a process importing the same modules and initializing the "
            "same Application without persistence.\n"
        )
    if flood_rows:
        print(
            _offline.markdown_table(
                [
                    "persistence",
                    "distinct chats, one update each",
                    "updates/s",
                    "RSS growth since the first update (MiB), after N updates",
                    "peak RSS - baseline",
                    "chats in memory at end",
                ],
                flood_rows,
            )
        )
        note = (
            ""
            if flood >= 1_000_000
            else (
                f" {flood:,} updates rather than 1,000,000: at the rates shown, 1,000,000 would "
                "take far too long for this benchmark (--flood N sets it)."
            )
        )
        print(
            "\nupdates through app.process_update, update_persistence every 1,000 updates, one "
            "fresh process each; RSS (/proc/self/statm) after gc.collect() at each checkpoint, "
            f"minus the RSS after initialize().{note}"
        )


if __name__ == "__main__":
    spec = _offline.child_spec()
    if spec is not None:
        child_main(spec)
    else:
        asyncio.run(parent_main())
