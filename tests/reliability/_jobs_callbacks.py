"""Job callbacks shared by ``test_rel_jobs.py`` and the bot processes of ``jobs_bot.py``: the
stored reference (``_jobs_callbacks:record_run``) resolves in both."""

from __future__ import annotations

import os
from typing import Any


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as runs:  # one small O_APPEND write per line
        runs.write(line)


async def record_run(context: Any) -> None:
    """Append ``ran <pid>`` to the file named by the job's data."""
    _append(context.job.data["file"], f"ran {os.getpid()}\n")


def record_submissions(path: str) -> Any:
    """An APScheduler listener of ``EVENT_JOB_SUBMITTED`` that appends ``submitted <scheduled
    run time> <pid>`` to ``path`` for each run time the scheduler of this process submitted."""

    def listener(event: Any) -> None:
        for moment in event.scheduled_run_times:
            _append(path, f"submitted {moment.timestamp():.3f} {os.getpid()}\n")

    return listener


async def idle(context: Any) -> None:
    """A job that does nothing."""
