"""A bot process of ``test_rel_jobs.py``: a real offline PTB ``Application`` with
``SQLAlchemyPersistence(store_jobs=True)``.

Usage:
    python jobs_bot.py run URL READY_FILE GO_FILE UNTIL_FILE RUNS_FILE
        create READY_FILE (everything is imported), wait for GO_FILE, initialize (restoring
        the stored jobs) and start, run the jobs until the time (``time.time()``) written in
        UNTIL_FILE, stop and shut down; the run times its scheduler submitted go to
        RUNS_FILE.
    python jobs_bot.py churn URL
        start, then schedule a new job every 20 ms and print ``stored ID`` (flushed) for each
        job once its row is in the database, until killed.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from _bot import builder
from _jobs_callbacks import idle, record_run, record_submissions  # noqa: F401
from apscheduler.events import EVENT_JOB_SUBMITTED
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from ptb_sessions import SQLAlchemyPersistence
from ptb_sessions._schema import StoredJob


def application(url: str):  # type: ignore[no-untyped-def]
    return builder().persistence(SQLAlchemyPersistence(url, store_jobs=True)).build()


def barrier(ready: Path, go: Path, until_file: Path) -> float:
    """Say this process is ready, wait until the test says go; the time to stop at."""
    ready.touch()
    deadline = time.monotonic() + 120
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} did not appear")
        time.sleep(0.005)
    return float(until_file.read_text())


async def run(url: str, until: float, runs_file: str) -> None:
    app = application(url)
    app.job_queue.scheduler.add_listener(record_submissions(runs_file), EVENT_JOB_SUBMITTED)
    await app.initialize()
    await app.start()
    await asyncio.sleep(max(until - time.time(), 0))
    await app.stop()
    await app.shutdown()


async def churn(url: str) -> None:
    app = application(url)
    await app.initialize()
    await app.start()
    assert app.job_queue is not None
    engine = create_async_engine(url)
    reported: set[str] = set()
    for number in range(1_000_000):
        app.job_queue.run_once(idle, 3600, name=f"job {number}", job_kwargs={"id": f"j{number}"})
        await asyncio.sleep(0.02)
        if number % 5 == 0:
            async with engine.connect() as connection:
                ids = set((await connection.execute(select(StoredJob.id))).scalars())
            for job_id in sorted(ids - reported):
                print(f"stored {job_id}", flush=True)
            reported |= ids


if __name__ == "__main__":
    if sys.argv[1] == "run":
        stop_at = barrier(Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
        asyncio.run(run(sys.argv[2], stop_at, sys.argv[6]))
    else:
        asyncio.run(churn(sys.argv[2]))
