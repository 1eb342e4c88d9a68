"""Job callbacks shared by ``test_rel_jobs.py`` and the bot processes of ``jobs_bot.py``: the
stored reference (``_jobs_callbacks:record_run``) resolves in both."""

from __future__ import annotations

import os
from typing import Any


async def record_run(context: Any) -> None:
    """Append ``<scheduled run time> <pid>`` to the file named by the job's data.

    The scheduler has already moved the job on when its callback runs: the run's own time is
    the previous fire time, or the job's last ``next_t`` if this was its last run (the job is
    then gone from the scheduler)."""
    job = context.job
    interval = float(job.data["interval"])
    last_run = context.job_queue.scheduler.get_job(job.id) is None
    scheduled = job.next_t.timestamp() if last_run else job.next_t.timestamp() - interval
    _append(job.data["file"], f"{scheduled:.3f} {os.getpid()}\n")


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as runs:  # one small O_APPEND write per run
        runs.write(line)


async def idle(context: Any) -> None:
    """A job that does nothing."""
