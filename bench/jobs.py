"""Benchmark: 10,000 JobQueue jobs with ``SQLAlchemyPersistence(store_jobs=True)``.

* Start-up: ``initialize()`` + ``start()`` of an application that restores 10,000 stored jobs,
  next to the same application without a persistence that creates its 10,000 jobs in memory
  (as such a bot must, at every start): the time of creating them plus ``initialize()`` +
  ``start()``. Memory is the growth of the process's RSS over that step (each run in a fresh
  subprocess).
* Scheduling: the time of 10,000 ``run_repeating`` calls on a running application, with and
  without ``store_jobs``; then, with ``store_jobs``, the time until all 10,000 rows are in the
  database, and the event-loop stall meanwhile: the longest gap between two ticks of a task
  that sleeps 1 ms in a loop (for scale, the same over 2 s after the in-memory scheduling).

Targets: start-up within 2x the in-memory figure, no stall over 20 ms.

Each server backend runs in a database of its own (``ptbs_bench_jobs_<random>``), created for
the run and dropped at its end.

Usage: python bench/jobs.py [--backends sqlite,postgresql,mariadb] [--quick] [--jobs N]
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import contextlib

import _offline
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

TARGET_RATIO = 2.0
TARGET_STALL = 0.020


async def idle(context: Any) -> None:
    """The jobs' callback (stored as ``__main__:idle``)."""


def _schedule(app: Any, count: int) -> None:
    first = dtm.datetime.now(dtm.timezone.utc) + dtm.timedelta(hours=1)
    for number in range(count):
        app.job_queue.run_repeating(
            idle,
            3600 + number % 60,
            first=first,
            name=f"job {number}",
            data={"n": number},
            chat_id=number,
        )


async def _wait_until_stored(url: str, count: int) -> None:
    """Poll (one kept connection, every 20 ms) until ``count`` rows are stored."""
    from ptb_sessions._schema import StoredJob

    engine = create_async_engine(url, poolclass=NullPool)
    statement = select(func.count()).select_from(StoredJob)
    try:
        async with engine.connect() as connection:
            while int((await connection.scalar(statement)) or 0) < count:
                await connection.rollback()  # a fresh snapshot for the next look
                await asyncio.sleep(0.02)
    finally:
        await engine.dispose()


class Heartbeat:
    """A task that sleeps 1 ms in a loop and keeps the longest gap between two ticks: in wall
    time, and in CPU time of the loop's thread (what the loop itself did between two ticks;
    unlike wall time, not inflated when other processes hold the CPU)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.worst_cpu = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _beat(self) -> None:
        last, last_cpu = time.perf_counter(), time.thread_time()
        while True:
            await asyncio.sleep(0.001)
            now, now_cpu = time.perf_counter(), time.thread_time()
            self.worst = max(self.worst, now - last)
            self.worst_cpu = max(self.worst_cpu, now_cpu - last_cpu)
            last, last_cpu = now, now_cpu

    def start(self) -> None:
        self._task = asyncio.create_task(self._beat())

    async def stop(self) -> float:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.worst


def _app(url: str | None) -> Any:
    builder = _offline.builder()
    if url is not None:
        from ptb_sessions import SQLAlchemyPersistence

        builder = builder.persistence(SQLAlchemyPersistence(url, store_jobs=True))
    return builder.build()


# -- children (one measurement each, in a fresh process) ------------------------------------


async def child_startup(url: str | None, count: int) -> dict[str, float]:
    app = _app(url)
    before = _offline.current_rss_mib()
    started, started_cpu = time.perf_counter(), time.process_time()
    if url is None:
        _schedule(app, count)
    await app.initialize()
    await app.start()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - started_cpu
    grown = _offline.current_rss_mib() - before
    jobs = len(app.job_queue.jobs())
    await app.stop()
    await app.shutdown()
    return {"seconds": elapsed, "cpu": cpu, "mib": grown, "jobs": jobs}


async def child_schedule(url: str | None, count: int) -> dict[str, float]:
    app = _app(url)
    await app.initialize()
    await app.start()
    started, started_cpu = time.perf_counter(), time.process_time()
    _schedule(app, count)
    scheduled = time.perf_counter() - started
    result = {"schedule": scheduled, "schedule_cpu": time.process_time() - started_cpu}
    heartbeat = Heartbeat()
    heartbeat.start()
    if url is not None:
        await _wait_until_stored(url, count)
        result["written"] = time.perf_counter() - started
    else:  # the same application's own stall (the scheduler, garbage collection) for scale
        await asyncio.sleep(2)
    result["stall"] = await heartbeat.stop()
    result["stall_cpu"] = heartbeat.worst_cpu
    await app.stop()
    await app.shutdown()
    return result


def run_child(kind: str, url: str | None, count: int) -> dict[str, float]:
    spec = json.dumps({"kind": kind, "url": url, "count": count})
    done = subprocess.run(
        [sys.executable, __file__, "--child", spec],
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} child failed: {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# -- databases ------------------------------------------------------------------------------


async def _on_server(backend: str, statement: str) -> None:
    engine = create_async_engine(
        _offline.SERVER_URLS[backend], poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def own_database(backend: str, directory: str) -> tuple[str, str | None]:
    """A fresh database for ``backend``: ``(url, name to drop afterwards)``."""
    if backend == "sqlite":
        return _offline.sqlite_url(directory, "jobs.sqlite3"), None
    name = f"ptbs_bench_jobs_{secrets.token_hex(4)}"
    quoted = f'"{name}"' if backend == "postgresql" else f"`{name}`"
    await _on_server(backend, f"CREATE DATABASE {quoted}")
    url = make_url(_offline.SERVER_URLS[backend]).set(database=name)
    return url.render_as_string(hide_password=False), name


async def drop_database(backend: str, name: str) -> None:
    assert name.startswith("ptbs_bench_jobs_")
    if backend == "postgresql":
        await _on_server(backend, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    else:
        await _on_server(backend, f"DROP DATABASE IF EXISTS `{name}`")


async def seed(url: str, count: int) -> None:
    """Store ``count`` jobs through a real application."""
    app = _app(url)
    await app.initialize()
    await app.start()
    _schedule(app, count)
    await _wait_until_stored(url, count)
    await app.stop()
    await app.shutdown()


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        run = child_startup if spec["kind"].startswith("startup") else child_schedule
        print(json.dumps(asyncio.run(run(spec["url"], spec["count"]))))
        return
    args = _offline.parse_args(
        "10,000 stored JobQueue jobs: start-up, scheduling, event-loop stall",
        lambda parser: parser.add_argument("--jobs", type=int, default=None),
    )
    count = args.jobs or (1_000 if args.quick else 10_000)
    print(_offline.machine_line())
    backends = asyncio.run(_offline.usable_backends(args.backends))
    header = [
        "backend",
        "start-up (in memory)",
        "start-up (stored)",
        "ratio",
        "ratio of CPU time",
        "RSS growth (in memory / stored)",
        "schedule (in memory / stored)",
        "all rows written",
        "longest stall (in memory / stored)",
        "longest stall, CPU (in memory / stored)",
    ]
    rows = []
    with _offline.temp_dir("ptbs-bench-jobs-") as directory:
        for backend in backends:
            # The in-memory figures next to each backend's, under the same load.
            memory_start = run_child("startup-memory", None, count)
            memory_schedule = run_child("schedule-memory", None, count)
            url, name = asyncio.run(own_database(backend, directory))
            try:
                asyncio.run(seed(url, count))
                stored_start = run_child("startup-stored", url, count)
                assert stored_start["jobs"] == count, stored_start
                asyncio.run(_offline.reset_database(url)) if name is None else None
                if name is not None:
                    asyncio.run(drop_database(backend, name))
                    url, name = asyncio.run(own_database(backend, directory))
                stored_schedule = run_child("schedule-stored", url, count)
            finally:
                if name is not None:
                    asyncio.run(drop_database(backend, name))
            ratio = stored_start["seconds"] / memory_start["seconds"]
            cpu_ratio = stored_start["cpu"] / memory_start["cpu"]
            rows.append(
                [
                    backend,
                    _offline.fmt_s(memory_start["seconds"]),
                    _offline.fmt_s(stored_start["seconds"]),
                    f"{ratio:.2f}x {'ok' if ratio <= TARGET_RATIO else 'MISSED'}",
                    f"{cpu_ratio:.2f}x {'ok' if cpu_ratio <= TARGET_RATIO else 'MISSED'}",
                    f"{_offline.fmt_mib(memory_start['mib'])} / "
                    f"{_offline.fmt_mib(stored_start['mib'])}",
                    f"{_offline.fmt_s(memory_schedule['schedule'])} / "
                    f"{_offline.fmt_s(stored_schedule['schedule'])} (CPU "
                    f"{_offline.fmt_s(memory_schedule['schedule_cpu'])} / "
                    f"{_offline.fmt_s(stored_schedule['schedule_cpu'])})",
                    _offline.fmt_s(stored_schedule["written"]),
                    f"{memory_schedule['stall'] * 1000:.1f} ms / "
                    f"{stored_schedule['stall'] * 1000:.1f} ms "
                    f"{'ok' if stored_schedule['stall'] <= TARGET_STALL else 'MISSED'}",
                    f"{memory_schedule['stall_cpu'] * 1000:.1f} ms / "
                    f"{stored_schedule['stall_cpu'] * 1000:.1f} ms "
                    f"{'ok' if stored_schedule['stall_cpu'] <= TARGET_STALL else 'MISSED'}",
                ]
            )
    print(f"{count:,} jobs; load average {os.getloadavg()[0]:.1f} at the end")
    print(_offline.markdown_table(header, rows))


if __name__ == "__main__":
    main()
