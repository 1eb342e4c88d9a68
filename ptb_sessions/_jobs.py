"""Jobs that survive restarts (``SQLAlchemyPersistence(store_jobs=True)``).

The application's :class:`~telegram.ext.JobQueue` is left as PTB builds it. Its APScheduler
scheduler gets one job store, :class:`DatabaseJobStore`, as its ``"default"`` store. APScheduler
calls a job store synchronously from the event loop, so the store keeps every job in memory and
hands each change to one asynchronous worker task, which writes it to the database at once
(write-behind: nothing blocks the event loop).

The same worker decides when a job is due. It claims each due run in the database first (a
conditional ``UPDATE`` that moves the stored next run time forward, or a conditional
``DELETE`` of a job's last run) and only then shows the job to the scheduler as due, so with
several processes on one database each run executes in exactly one of them. A process that
loses a claim takes the stored next run time over.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dtm
import heapq
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, cast

from apscheduler.job import Job as APSJob  # type: ignore[import-untyped,unused-ignore]
from apscheduler.jobstores.base import BaseJobStore, ConflictingIdError, JobLookupError  # type: ignore[import-untyped,unused-ignore]
from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.engine import Connection
from telegram.ext import Application, Job, JobQueue

from ptb_sessions._codec import Codec
from ptb_sessions._errors import SerializationError, StorageError
from ptb_sessions._jobrows import (
    DEFAULT_MISFIRE_GRACE_TIME,
    JobRow,
    callback_reference,
    decode_data,
    decode_trigger,
    encode_data,
    encode_trigger,
    from_timestamp,
    resolve_callback,
    to_timestamp,
)
from ptb_sessions._schema import MAX_JOB_ID_LENGTH, StoredJob
from ptb_sessions._store import Database

__all__ = ["DatabaseJobStore", "StoredJobs", "load_job_rows"]

_LOGGER = logging.getLogger(__name__)
_TABLE: Table = cast(Table, StoredJob.__table__)
_C = _TABLE.c
#: How many rows go into one statement.
_CHUNK: Final = 100
#: How many job changes one transaction writes (see ``DatabaseJobStore._write_pending``).
_WRITE_PART: Final = 1000
#: How many due runs are claimed in one transaction.
_CLAIMS_PER_TRANSACTION: Final = 200
#: Seconds before a failed write or claim is tried again.
_RETRY_AFTER: Final = 1.0
#: Seconds between two looks at whether the application has started, while a job is due.
_START_POLL: Final = 0.05

_AnyApplication = Application[Any, Any, Any, Any, Any, Any]


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _row_of(record: Any) -> JobRow:
    return JobRow(**{name: getattr(record, name) for name in JobRow.__slots__})


class _Gone:
    """The stored row of a job no longer exists."""

    __slots__ = ()


_GONE: Final = _Gone()


def _read_rows(connection: Connection) -> list[JobRow]:
    result = connection.execute(select(_TABLE).order_by(_C.next_run_at))
    return [_row_of(record) for record in result]


async def load_job_rows(database: Database) -> list[JobRow]:
    """Every stored job row.

    Raises:
        StorageError: The database cannot be read, or gave no answer within its timeout.
    """
    return await database.run("Loading the stored jobs", _read_rows, read_only=True)


def _replace_rows(ids: Sequence[str], rows: Sequence[JobRow]) -> Callable[[Connection], None]:
    """The work that deletes the jobs ``ids`` and inserts ``rows`` (safe to run twice)."""

    def replace(connection: Connection) -> None:
        # In chunks, each built just before it is sent: with an asyncio driver the event loop
        # runs between them, however many jobs were scheduled at once.
        for chunk in _chunks(ids):
            connection.execute(delete(_TABLE).where(_C.id.in_(chunk)))
        for rows_chunk in _chunks(rows):
            connection.execute(insert(_TABLE), [row.values() for row in rows_chunk])

    return replace


def _claimed(
    connection: Connection, job_id: str, before: float | None, after: float | None, now: float
) -> bool:
    """Claim the due run of ``job_id``: move its stored next run time from ``before`` to
    ``after`` (delete the job for a last run). Whether this process won it."""
    claimed = _C.id == job_id
    claimed &= _C.next_run_at.is_(None) if before is None else _C.next_run_at == before
    if after is None:  # the last run: the job ends with it
        result = connection.execute(delete(_TABLE).where(claimed))
    else:
        result = connection.execute(
            update(_TABLE).where(claimed).values(next_run_at=after, updated_at=now)
        )
    return bool(result.rowcount == 1)


def _stored_next_run(connection: Connection, job_id: str) -> float | _Gone | None:
    found = connection.execute(select(_C.next_run_at).where(_C.id == job_id)).first()
    return _GONE if found is None else cast("float | None", found[0])


_Claims = tuple[dict[str, float | None], dict[str, float | _Gone | None]]


def _claim_runs(
    claims: Sequence[tuple[str, float | None, float | None]], clock: Callable[[], float]
) -> Callable[[Connection], _Claims]:
    """The work that claims each ``(job id, stored next run, next run after it)``: the runs
    won (id -> the next run stored) and lost (id -> what another process stored).

    Safe to run again after a dead connection: claims that were not committed changed
    nothing, and claims whose commit reached the server are then lost to ourselves, so such
    a run is skipped, never run twice."""

    def claim(connection: Connection) -> _Claims:
        won: dict[str, float | None] = {}
        lost: dict[str, float | _Gone | None] = {}
        for job_id, before, after in claims:
            if _claimed(connection, job_id, before, after, clock()):
                won[job_id] = after
            else:
                lost[job_id] = _stored_next_run(connection, job_id)
        return won, lost

    return claim


def _next_fire_after(job: APSJob, now: dtm.datetime) -> dtm.datetime | None:
    """The first fire time of ``job`` after its runs due at ``now`` (as APScheduler's
    scheduler computes it once it has submitted them)."""
    run_time = job.next_run_time
    while run_time is not None and run_time <= now:
        run_time = job.trigger.get_next_fire_time(run_time, now)
    return cast("dtm.datetime | None", run_time)


class DatabaseJobStore(BaseJobStore):  # type: ignore[misc]
    """The APScheduler job store of ``store_jobs=True``: jobs in memory, every change written
    to the database by a worker task, and each due run claimed in the database before the
    scheduler sees it.

    Only jobs made through the application's :class:`~telegram.ext.JobQueue` are stored, and
    only if their callback can be found by reference and their data encoded (else
    :class:`~ptb_sessions.SerializationError`, raised when the job is scheduled).

    Args:
        application: The application whose job queue this store serves; runs are claimed only
            while it is running.
        database: The persistence's database.
        codec: Encodes the jobs' data.
        max_value_size: The largest encoded data in bytes.
        clock: Seconds since the epoch, for ``updated_at``.
    """

    __slots__ = (
        "_application",
        "_broken",
        "_catch_up",
        "_caught_up",
        "_claimed",
        "_heap",
        "_jobs",
        "_pending",
        "_references",
        "_restored",
        "_restored_keys",
        "_retry_at",
        "_sequence",
        "_stopping",
        "_stored_next",
        "_syncing",
        "_task",
        "_wake",
        "clock",
        "codec",
        "database",
        "max_value_size",
    )

    def __init__(
        self,
        application: _AnyApplication,
        database: Database,
        codec: Codec,
        max_value_size: int | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self._application = application
        self.database = database
        self.codec = codec
        self.max_value_size = max_value_size
        self.clock = clock
        self._jobs: dict[str, APSJob] = {}
        #: The next run time stored in the database, as far as this process knows.
        self._stored_next: dict[str, float | None] = {}
        #: Rows (or deletions: None) not yet written.
        self._pending: dict[str, JobRow | None] = {}
        #: Jobs whose due run this process claimed: id -> the next run time it stored.
        self._claimed: dict[str, float | None] = {}
        #: (next run, sequence, id); entries whose time is no longer the job's are skipped.
        self._heap: list[tuple[float, int, str]] = []
        self._sequence = itertools.count()
        #: Restored jobs that a job made before the application starts may replace.
        self._restored: dict[tuple[str | None, str], list[str]] = {}
        self._restored_keys: dict[str, tuple[str | None, str]] = {}
        #: Rows that could not be restored: id -> why. Kept, never run, never overwritten.
        self._broken: dict[str, str] = {}
        #: Restored overdue jobs run without a misfire limit once: id -> the limit after it.
        self._catch_up: dict[str, int | None] = {}
        #: Catch-up jobs whose catch-up run was claimed: their next claim restores the limit.
        self._caught_up: set[str] = set()
        #: The import references of the callbacks seen so far (checked once each).
        self._references: dict[Callable[..., Any], str] = {}
        self._syncing = False
        self._stopping = False
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- restoring ------------------------------------------------------------------------

    def restore(
        self, row: JobRow, job_queue: JobQueue[Any], now: dtm.datetime, cache: _RestoreCache
    ) -> None:
        """Put the stored job ``row`` back (before the scheduler starts); a row that cannot be
        restored is logged with the job's name and kept as it is."""
        try:
            job = self._job_of(row, job_queue, now, cache)
        except Exception as exc:
            self._broken[row.id] = str(exc)
            _LOGGER.error(
                "The stored job %r (id %r) is not restored, not run and kept in the database "
                "as it is: %s. Fix the cause, or remove the job with `ptb-sessions jobs "
                "remove %s`",
                row.name,
                row.id,
                exc,
                row.id,
            )
            return
        self._jobs[job.id] = job
        self._stored_next[job.id] = row.next_run_at
        self._restored.setdefault((row.name, row.callback), []).append(job.id)
        self._restored_keys[job.id] = (row.name, row.callback)
        self._schedule(job)

    def _job_of(
        self, row: JobRow, job_queue: JobQueue[Any], now: dtm.datetime, cache: _RestoreCache
    ) -> APSJob:
        callback = cache.callback(row.callback)
        if callback is None:
            raise LookupError(
                f"its callback {row.callback} is not an async function of a module the bot "
                "has imported before Application.initialize() (nothing is imported because a "
                "stored row names it)"
            )
        data = decode_data(self.codec, row)
        trigger = cache.trigger(row.trigger)
        options = cache.options(row.options)
        next_run = from_timestamp(row.next_run_at, job_queue.scheduler.timezone)
        grace = options["misfire_grace_time"]
        if next_run is not None and next_run < now and grace == DEFAULT_MISFIRE_GRACE_TIME:
            # Fell due while the bot was down: that is not a misfire (the run is coalesced),
            # unless the job has a misfire_grace_time of its own.
            self._catch_up[row.id] = grace
            grace = None
        ptb_job = Job(callback, data=data, name=row.name, chat_id=row.chat_id, user_id=row.user_id)
        aps_job = APSJob(
            job_queue.scheduler,
            id=row.id,
            func=job_queue.job_callback,
            args=(job_queue, ptb_job),
            kwargs={},
            name=row.name,
            trigger=trigger,
            executor=options["executor"],
            misfire_grace_time=grace,
            coalesce=options["coalesce"],
            max_instances=options["max_instances"],
            next_run_time=next_run,
        )
        Job.from_aps_job(aps_job)
        return aps_job

    # -- rows ----------------------------------------------------------------------------

    def _row(self, job: APSJob) -> JobRow:
        """The row of ``job``, checked for being storable.

        Raises:
            SerializationError: The job cannot be stored (the message names it and the fix).
        """
        ptb_job = job.args[1] if len(job.args) == 2 else None
        if not isinstance(ptb_job, Job) or not isinstance(job.args[0], JobQueue):
            raise SerializationError(
                "only jobs made through application.job_queue (run_once, run_repeating, "
                "run_daily, run_monthly, run_custom) can be stored; use those instead of the "
                "scheduler's add_job",
                root=f"job {job.name!r} (id {job.id!r})",
            )
        if len(job.id) > MAX_JOB_ID_LENGTH:
            raise SerializationError(
                f"the id is {len(job.id)} characters long; at most {MAX_JOB_ID_LENGTH} can be "
                "stored",
                root=f"job {job.name!r}",
            )
        callback = self._references.get(ptb_job.callback)
        if callback is None:
            callback = callback_reference(ptb_job.callback, ptb_job.name, job.id)
            self._references[ptb_job.callback] = callback
        codec, data = encode_data(
            self.codec, ptb_job.data, ptb_job.name, job.id, self.max_value_size
        )
        options = {
            "misfire_grace_time": self._catch_up.get(job.id, job.misfire_grace_time),
            "coalesce": job.coalesce,
            "max_instances": job.max_instances,
            "executor": job.executor,
        }
        next_run_at = to_timestamp(job.next_run_time)
        return JobRow(
            id=job.id,
            name=ptb_job.name,
            callback=callback,
            codec=codec,
            data=data,
            chat_id=ptb_job.chat_id,
            user_id=ptb_job.user_id,
            trigger=encode_trigger(job.trigger, ptb_job.name, job.id),
            options=json.dumps(options, separators=(",", ":")),
            enabled=next_run_at is not None,
            next_run_at=next_run_at,
            updated_at=self.clock(),
        )

    def _write_later(self, job_id: str, row: JobRow | None) -> None:
        self._pending[job_id] = row
        self._wake.set()

    def _schedule(self, job: APSJob) -> None:
        """Let the worker claim ``job``'s next run when it falls due."""
        moment = to_timestamp(job.next_run_time)
        if moment is not None:
            heapq.heappush(self._heap, (moment, next(self._sequence), job.id))
            self._wake.set()

    def _refuse_broken(self, job_id: str) -> None:
        if job_id in self._broken:
            raise StorageError(
                f"The stored job {job_id!r} could not be restored ({self._broken[job_id]}); "
                f"it is not replaced. Remove it first with `ptb-sessions jobs remove {job_id}`"
            )

    # -- the APScheduler job store API ---------------------------------------------------

    def start(self, scheduler: Any, alias: str) -> None:
        """Called by the scheduler when it starts: starts the worker task."""
        super().start(scheduler, alias)
        self._stopping = False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._work(), name="ptb_sessions:jobs"
            )

    def shutdown(self) -> None:
        """Called by the scheduler when it shuts down: the worker writes what is pending, then
        ends (:meth:`StoredJobs.close` waits for it)."""
        self._stopping = True
        self._wake.set()

    def lookup_job(self, job_id: str) -> APSJob | None:
        return self._jobs.get(job_id)

    def get_due_jobs(self, now: dtm.datetime) -> list[APSJob]:
        """Only the jobs whose run this process has claimed are due here."""
        due = [
            job
            for job in (self._jobs.get(job_id) for job_id in self._claimed)
            if job is not None and job.next_run_time is not None and job.next_run_time <= now
        ]
        return sorted(due, key=lambda job: job.next_run_time)

    def get_next_run_time(self) -> dtm.datetime | None:
        """The earliest claimed run (the worker wakes the scheduler for the others)."""
        times = [
            job.next_run_time
            for job in (self._jobs.get(job_id) for job_id in self._claimed)
            if job is not None and job.next_run_time is not None
        ]
        return min(times, default=None)

    def get_all_jobs(self) -> list[APSJob]:
        jobs = list(self._jobs.values())
        jobs.sort(key=lambda job: (job.next_run_time is None, to_timestamp(job.next_run_time)))
        return jobs

    def add_job(self, job: APSJob) -> None:
        if job.id in self._jobs or job.id in self._broken:
            raise ConflictingIdError(job.id)
        row = self._row(job)
        if not self._application.running:
            self._replace_restored_copy(job, row)
        self._jobs[job.id] = job
        self._write_later(job.id, row)
        self._schedule(job)

    def _replace_restored_copy(self, job: APSJob, row: JobRow) -> None:
        """A job made while the application starts up (e.g. in ``post_init``) with the name
        and callback of a restored job replaces it, instead of doubling it at every start."""
        candidates = self._restored.get((row.name, row.callback))
        while candidates:
            old_id = candidates.pop(0)
            self._restored_keys.pop(old_id, None)
            if old_id in self._jobs:
                _LOGGER.info(
                    "The job %r (id %r) replaces the restored job of the same name and "
                    "callback (id %r)",
                    row.name,
                    job.id,
                    old_id,
                )
                self._forget(old_id)
                self._write_later(old_id, None)
                return

    def _no_longer_restored(self, job_id: str) -> None:
        key = self._restored_keys.pop(job_id, None)
        if key is not None and job_id in self._restored.get(key, ()):
            self._restored[key].remove(job_id)

    def update_job(self, job: APSJob) -> None:
        self._refuse_broken(job.id)
        if job.id not in self._jobs:
            raise JobLookupError(job.id)
        if self._syncing:
            self._jobs[job.id] = job
            self._schedule(job)
            return
        claimed = self._claimed.pop(job.id, _UNCLAIMED)
        self._jobs[job.id] = job
        if claimed is not _UNCLAIMED and to_timestamp(job.next_run_time) == claimed:
            self._schedule(job)  # the claim already stored this next run time
            return
        if job.misfire_grace_time is not None:  # the job's own limit, set since its restore
            self._catch_up.pop(job.id, None)
        row = self._row(job)
        self._no_longer_restored(job.id)  # replaced (replace_existing) or changed
        self._write_later(job.id, row)
        self._schedule(job)

    def remove_job(self, job_id: str) -> None:
        if job_id not in self._jobs:
            raise JobLookupError(job_id)
        claimed = self._claimed.get(job_id, _UNCLAIMED)
        self._forget(job_id)
        if self._syncing or (claimed is None and job_id not in self._pending):
            return  # removed in the database already (elsewhere, or by the claim of its end)
        self._write_later(job_id, None)

    def remove_all_jobs(self) -> None:
        for job_id in list(self._jobs):
            self.remove_job(job_id)

    def _forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)
        self._claimed.pop(job_id, None)
        self._catch_up.pop(job_id, None)
        self._caught_up.discard(job_id)
        self._stored_next.pop(job_id, None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} ({self.database.masked_url}, {len(self._jobs)} jobs)>"

    # -- the worker ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """How many job changes are not written yet."""
        return len(self._pending)

    async def _work(self) -> None:
        while True:
            if not self._pending or time.monotonic() < self._retry_at:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._seconds_to_wait())
            self._wake.clear()
            try:
                if self._pending and time.monotonic() >= self._retry_at:
                    await self._write_pending()
                if self._stopping and (not self._pending or time.monotonic() < self._retry_at):
                    return
                if self._application.running and time.monotonic() >= self._retry_at:
                    await self._claim_due()
            except Exception:  # never end silently: the next round tries again
                _LOGGER.exception("The job store's worker failed; it tries again")
                self._retry_at = time.monotonic() + _RETRY_AFTER

    def _seconds_to_wait(self) -> float | None:
        waits: list[float] = []
        if self._pending or self._stopping:
            waits.append(max(self._retry_at - time.monotonic(), 0))
        self._drop_stale_heads()
        if self._heap:
            until_due = self._heap[0][0] - time.time()
            if until_due <= 0 and not self._application.running:
                until_due = _START_POLL  # runs start with Application.start()
            waits.append(max(until_due, self._retry_at - time.monotonic(), 0))
        return min(waits, default=None)

    def _drop_stale_heads(self) -> None:
        while self._heap and not self._is_current(*self._heap[0]):
            heapq.heappop(self._heap)

    def _is_current(self, moment: float, _sequence: int, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        return (
            job is not None
            and job_id not in self._claimed
            and to_timestamp(job.next_run_time) == moment
        )

    async def _write_pending(self) -> None:
        """Write the pending job changes, one transaction per ``_WRITE_PART`` jobs, so the
        event loop runs between them however many jobs were scheduled at once (each job's row
        stands alone: a part written is written)."""
        batch, self._pending = self._pending, {}
        ids = list(batch)
        for start in range(0, len(ids), _WRITE_PART):
            part = ids[start : start + _WRITE_PART]
            rows = [row for job_id in part if (row := batch[job_id]) is not None]
            try:
                await self.database.run(
                    f"Writing {len(part)} job changes", _replace_rows(part, rows)
                )
            except StorageError as exc:
                for job_id in ids[start:]:  # kept; newer changes win
                    self._pending.setdefault(job_id, batch[job_id])
                self._retry_at = time.monotonic() + _RETRY_AFTER
                _LOGGER.error(
                    "%d job changes are kept for the next try: %s", len(ids) - start, exc
                )
                return
            for job_id in part:
                if job_id in self._jobs and job_id not in self._pending:
                    row = batch[job_id]
                    self._stored_next[job_id] = None if row is None else row.next_run_at
        self._wake.set()  # look for due jobs again: they were held back while unwritten

    def _due_now(self, now: float) -> list[APSJob]:
        due: list[APSJob] = []
        held: list[tuple[float, int, str]] = []
        while self._heap and self._heap[0][0] <= now and len(due) < _CLAIMS_PER_TRANSACTION:
            entry = heapq.heappop(self._heap)
            if not self._is_current(*entry) or any(job.id == entry[2] for job in due):
                continue
            if entry[2] in self._pending or entry[2] not in self._stored_next:
                held.append(entry)  # claimed once its change is written
                continue
            due.append(self._jobs[entry[2]])
        for entry in held:
            heapq.heappush(self._heap, entry)
        return due

    async def _claim_due(self) -> None:
        if self._restored:  # running: jobs made from now on never replace restored ones
            self._restored.clear()
            self._restored_keys.clear()
        now = dtm.datetime.now(dtm.timezone.utc)
        due = self._due_now(now.timestamp())
        if not due:
            return
        for job in due:
            self._end_catch_up(job)
        # What each claim moves the stored next run time from and to, fixed before the
        # first await: the jobs may change or go while the claims are on their way.
        claims = [
            (
                job,
                to_timestamp(job.next_run_time),
                self._stored_next[job.id],
                to_timestamp(_next_fire_after(job, now)),
            )
            for job in due
        ]
        try:
            won, lost = await self.database.run(
                f"Claiming {len(due)} due job runs",
                _claim_runs(
                    [(job.id, before, after) for job, _, before, after in claims], self.clock
                ),
            )
        except StorageError as exc:
            _LOGGER.error("Due jobs are not run until they can be claimed: %s", exc)
            self._retry_at = time.monotonic() + _RETRY_AFTER
            for job in due:
                self._schedule(job)
            return
        for claimed_job, due_at, _, after in claims:
            job_id, next_at = claimed_job.id, to_timestamp(claimed_job.next_run_time)
            if self._jobs.get(job_id) is not claimed_job or next_at != due_at:
                continue  # changed meanwhile: its own write decides, not this claim
            if job_id in won:
                self._claimed[job_id] = after
                self._stored_next[job_id] = after
            else:
                self._take_over(job_id, lost[job_id])
        if won:
            self._scheduler.wakeup()
        self._wake.set()

    def _take_over(self, job_id: str, stored: float | _Gone | None) -> None:
        """Another process ran (or removed, or changed) this job: take its state over."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        self._syncing = True
        try:
            if isinstance(stored, _Gone):
                job.remove()
            else:
                self._stored_next[job_id] = stored
                job.modify(next_run_time=from_timestamp(stored, self._scheduler.timezone))
        finally:
            self._syncing = False

    def _end_catch_up(self, job: APSJob) -> None:
        """A restored overdue job runs without a misfire limit once; its next run has its
        limit again (the executor has read the old one by now)."""
        if job.id not in self._catch_up:
            return
        if job.id not in self._caught_up:
            self._caught_up.add(job.id)  # this claim is for the catch-up run itself
            return
        grace = self._catch_up.pop(job.id)
        self._caught_up.discard(job.id)
        if grace != job.misfire_grace_time:
            self._syncing = True
            try:
                job.modify(misfire_grace_time=grace)
            finally:
                self._syncing = False

    async def stop(self) -> None:
        """Write what is pending and end the worker.

        Raises:
            StorageError: Job changes could not be written.
        """
        self.shutdown()
        self._retry_at = 0.0
        if self._task is not None:
            await self._task
            self._task = None
        if self._pending:  # changes made after the worker ended (e.g. in post_stop)
            await self._write_pending()
        if self._pending:
            raise StorageError(
                f"{len(self._pending)} job changes could not be written at shutdown "
                "(see the errors logged before)"
            )


class _RestoreCache:
    """What many stored jobs share, decoded once per restore: callbacks (looked up when the
    restore starts), triggers (stateless, so one object can serve several jobs) and options."""

    __slots__ = ("_callbacks", "_options", "_triggers")

    def __init__(self) -> None:
        self._callbacks: dict[str, Callable[..., Any] | None] = {}
        self._triggers: dict[str, Any] = {}
        self._options: dict[str, dict[str, Any]] = {}

    def callback(self, reference: str) -> Callable[..., Any] | None:
        if reference not in self._callbacks:
            self._callbacks[reference] = resolve_callback(reference)
        return self._callbacks[reference]

    def trigger(self, text: str) -> Any:
        if text not in self._triggers:
            self._triggers[text] = decode_trigger(text)
        return self._triggers[text]

    def options(self, text: str) -> dict[str, Any]:
        if text not in self._options:
            self._options[text] = dict(json.loads(text))
        return self._options[text]


_UNCLAIMED: Any = object()


class StoredJobs:
    """``store_jobs=True`` of one persistence: restores the jobs at
    :meth:`~telegram.ext.Application.initialize` and writes them until
    :meth:`~telegram.ext.Application.shutdown`.

    Args:
        database: The persistence's database.
        codec: Encodes the jobs' data.
        max_value_size: The largest encoded data in bytes.
        clock: Seconds since the epoch.
    """

    __slots__ = ("_application", "clock", "codec", "database", "max_value_size", "store")

    def __init__(
        self,
        database: Database,
        codec: Codec,
        max_value_size: int | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database = database
        self.codec = codec
        self.max_value_size = max_value_size
        self.clock = clock
        self.store: DatabaseJobStore | None = None
        self._application: _AnyApplication | None = None

    async def attach(self, application: _AnyApplication) -> None:
        """Restore the stored jobs into ``application``'s job queue and start its scheduler
        (held back: no job runs before :meth:`~telegram.ext.Application.start`), so jobs made
        in ``post_init`` are checked and stored when they are made.

        Raises:
            RuntimeError: The application has no job queue, or its scheduler already runs.
            StorageError: The stored jobs cannot be read.
        """
        if self._application is application and self.store is not None:
            return
        job_queue = application.job_queue
        if job_queue is None:
            raise RuntimeError("The application has no JobQueue")
        scheduler = job_queue.scheduler
        if scheduler.running:
            raise RuntimeError(
                "SQLAlchemyPersistence(store_jobs=True) restores the jobs before the JobQueue "
                "starts, but its scheduler is already running"
            )
        rows = await load_job_rows(self.database)
        store = DatabaseJobStore(
            application, self.database, self.codec, self.max_value_size, self.clock
        )
        now = dtm.datetime.now(dtm.timezone.utc)
        cache = _RestoreCache()
        for row in rows:
            store.restore(row, job_queue, now, cache)
        try:
            scheduler.add_jobstore(store, "default")
        except ValueError as exc:
            raise RuntimeError(
                "SQLAlchemyPersistence(store_jobs=True) brings the JobQueue's 'default' job "
                "store, but the scheduler already has one"
            ) from exc
        self.store = store
        self._application = application
        scheduler.start()  # jobs made before initialize() are checked and stored here

    async def close(self) -> None:
        """Write the pending job changes and detach the job store from the scheduler (so the
        application can be initialized again).

        Raises:
            StorageError: Job changes could not be written.
        """
        store, application = self.store, self._application
        if store is None or application is None:
            return
        self.store = self._application = None
        job_queue = application.job_queue
        if job_queue is not None and job_queue.scheduler.running:
            job_queue.scheduler.shutdown(wait=False)
            await asyncio.sleep(0)  # AsyncIOScheduler shuts down in the next loop iteration
        try:
            await store.stop()
        finally:
            if job_queue is not None and not job_queue.scheduler.running:
                job_queue.scheduler.remove_jobstore("default", shutdown=False)
