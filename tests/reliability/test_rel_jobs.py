"""Stored jobs across processes: three bot processes on one database run each due run of a
job exactly once, and a bot killed with SIGKILL while it schedules jobs never loses a job that
was already stored."""

from __future__ import annotations

import datetime as dtm
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _bot import builder
from _jobs_callbacks import idle, record_run
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from ptb_sessions import SQLAlchemyPersistence
from ptb_sessions._schema import StoredJob

BOT = Path(__file__).with_name("jobs_bot.py")
PROCESSES = 3
INTERVAL = 0.5
WINDOW = 5.0
#: Seconds from the bots being ready to the first run, and from the last run to their stop.
LEAD = 2.0
TAIL = 3.0


def _app(url: str) -> Any:
    return builder().persistence(SQLAlchemyPersistence(url, store_jobs=True)).build()


async def _stored_ids(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return set((await connection.execute(select(StoredJob.id))).scalars())
    finally:
        await engine.dispose()


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(BOT), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_three_processes_run_each_due_run_exactly_once(db_url: str, tmp_path: Path) -> None:
    runs_file = tmp_path / "runs.txt"
    go = tmp_path / "go"
    readies = [tmp_path / f"ready{n}" for n in range(PROCESSES)]
    seeder = _app(db_url)
    await seeder.initialize()  # creates the schema
    until = time.time() + 120  # replaced below, once the job's times are known
    bots: list[subprocess.Popen[str]] = []
    try:
        until_file = tmp_path / "until"
        until_file.write_text("")
        deadline = time.monotonic() + 60
        first = last = dtm.datetime.now(dtm.timezone.utc)
        bots = [
            _spawn("run", db_url, str(ready), str(go), str(until_file), str(runs_file))
            for ready in readies
        ]
        while not all(ready.exists() for ready in readies):
            assert time.monotonic() < deadline, "the bots did not start"
            assert all(bot.poll() is None for bot in bots), [b.communicate() for b in bots]
            time.sleep(0.05)  # noqa: ASYNC251  (nothing else runs on this loop meanwhile)
        first = dtm.datetime.now(dtm.timezone.utc) + dtm.timedelta(seconds=LEAD)
        last = first + dtm.timedelta(seconds=WINDOW)
        assert seeder.job_queue is not None
        seeder.job_queue.run_repeating(
            record_run,
            INTERVAL,
            first=first,
            last=last,
            data={"file": str(runs_file)},
            name="tick",
            # Late runs (a loaded machine) still run, each one: every fire time is accounted.
            job_kwargs={"coalesce": False, "misfire_grace_time": None},
        )
        await seeder.shutdown()  # writes the job
        assert len(await _stored_ids(db_url)) == 1
        until = last.timestamp() + TAIL
        until_file.write_text(str(until))
        go.touch()
        outputs = [bot.communicate(timeout=120) for bot in bots]
    finally:
        for bot in bots:
            if bot.poll() is None:
                bot.kill()
    for bot, (_, err) in zip(bots, outputs, strict=True):
        assert bot.returncode == 0, err
    lines = [line.split() for line in runs_file.read_text().splitlines()]
    submitted = [float(line[1]) for line in lines if line[0] == "submitted"]
    ran = [line[1] for line in lines if line[0] == "ran"]
    assert len(submitted) == len(set(submitted)), "a run was submitted in two processes"
    fire_times = round(WINDOW / INTERVAL) + 1  # the first and the last included
    expected = {round(first.timestamp() + k * INTERVAL, 3) for k in range(fire_times)}
    assert abs(len(submitted) - fire_times) <= 1, (len(submitted), fire_times)
    assert set(submitted) <= expected
    assert len(ran) == len(submitted)  # every submitted run executed its callback once
    assert set(ran) <= {str(bot.pid) for bot in bots}
    assert await _stored_ids(db_url) == set()  # the job ended with its last run


def _read_lines(process: subprocess.Popen[str], into: queue.Queue[str | None]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        into.put(line.strip())
    into.put(None)


async def test_sigkill_never_loses_a_stored_job(db_url: str) -> None:
    seeder = _app(db_url)
    await seeder.initialize()  # creates the schema before the bot starts
    await seeder.shutdown()
    bot = _spawn("churn", db_url)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(bot, lines), daemon=True).start()
    reported: list[str] = []
    deadline = time.monotonic() + 90
    try:
        while len(reported) < 40:
            assert time.monotonic() < deadline, bot.stderr.read() if bot.stderr else ""
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            assert line is not None, bot.stderr.read() if bot.stderr else ""
            reported.append(line.removeprefix("stored "))
    finally:
        bot.send_signal(signal.SIGKILL)
        bot.wait(timeout=30)
    stored = await _stored_ids(db_url)
    assert set(reported) <= stored
    # Every stored row restores: nothing half-written.
    again = _app(db_url)
    await again.initialize()
    assert again.job_queue is not None
    restored = {job.id for job in again.job_queue.jobs()}
    await again.shutdown()
    assert restored == stored
    assert {job.callback for job in again.job_queue.jobs()} <= {idle}
