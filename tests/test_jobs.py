"""Jobs that survive restarts (``store_jobs=True``), on every backend, with a real
``Application`` and its real ``JobQueue`` (APScheduler): stored rows, restore, catch-up runs,
pauses, removals, references that are never imported, and bad input."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dtm
import enum
import io
import json
import logging
import socket
import sys
import threading
import zoneinfo
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from _bot import builder
from apscheduler.events import EVENT_JOB_MISSED
from sqlalchemy import Table, delete, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from telegram.ext import Application, CallbackContext, ContextTypes

from ptb_sessions import JSONCodec, SerializationError, SQLAlchemyPersistence, StorageError
from ptb_sessions._schema import StoredJob, StoredRow
from ptb_sessions.cli import main as cli_main

JOBS: Table = StoredJob.__table__  # type: ignore[assignment]
#: What the job callbacks saw: (job name, data, chat_id, chat_data).
RUNS: list[tuple[str | None, Any, int | None, Any]] = []
RAN = asyncio.Event()


async def tick(context: CallbackContext[Any, Any, Any, Any]) -> None:
    job = context.job
    assert job is not None
    chat_data = None if context.chat_data is None else dict(context.chat_data)
    RUNS.append((job.name, job.data, job.chat_id, chat_data))
    RAN.set()


async def report(context: CallbackContext[Any, Any, Any, Any]) -> None:
    await tick(context)


class Reminders:
    @staticmethod
    async def static(context: CallbackContext[Any, Any, Any, Any]) -> None:
        await tick(context)

    @classmethod
    async def of_class(cls, context: CallbackContext[Any, Any, Any, Any]) -> None:
        await tick(context)

    async def bound(self, context: CallbackContext[Any, Any, Any, Any]) -> None:
        await tick(context)


@pytest.fixture(autouse=True)
def _fresh_runs() -> None:
    global RAN
    RUNS.clear()
    RAN = asyncio.Event()  # bound to this test's event loop


App = Application[Any, Any, Any, Any, Any, Any]


def make_app(url: str, post_init: Callable[[App], Awaitable[None]] | None = None) -> App:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url, store_jobs=True)
    made = builder().persistence(persistence)
    if post_init is not None:
        made = made.post_init(post_init)
    return made.build()  # type: ignore[no-any-return]


async def start(app: App) -> App:
    await app.initialize()
    if app.post_init is not None:
        await app.post_init(app)
    await app.start()
    return app


async def stop(app: App) -> None:
    if app.running:
        await app.stop()
    await app.shutdown()


async def eventually(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait (generously) until ``condition`` holds."""
    for _ in range(600):
        if await condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def rows(url: str) -> dict[str, dict[str, Any]]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(select(JOBS))
            return {row.id: dict(row._mapping) for row in result}
    finally:
        await engine.dispose()


async def change_rows(url: str, statement: Any) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(statement)
    finally:
        await engine.dispose()


async def stored(url: str, count: int) -> dict[str, dict[str, Any]]:
    """The stored rows, once there are ``count`` of them."""
    found: dict[str, dict[str, Any]] = {}

    async def there() -> bool:
        found.clear()
        found.update(await rows(url))
        return len(found) == count

    await eventually(there, f"{count} stored jobs")
    return found


@pytest.fixture
async def url(db_url: str) -> AsyncIterator[str]:
    yield db_url


# -- 1. one readable row per job, restored as it was ----------------------------------------


async def test_every_kind_of_job_is_one_readable_row_and_restored_as_it_was(url: str) -> None:
    app = await start(make_app(url))
    queue = app.job_queue
    assert queue is not None
    queue.run_once(tick, 3600, data={"a": [1, 2]}, name="once", chat_id=42, user_id=7)
    queue.run_repeating(tick, 60, first=600, name="repeating", data=dtm.date(2024, 1, 2))
    queue.run_daily(tick, dtm.time(9, 30), days=(1, 3), name="daily")
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    queue.run_daily(tick, dtm.time(7, 15, tzinfo=berlin), name="berlin")
    queue.run_once(tick, dtm.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=berlin), name="date")
    queue.run_monthly(Reminders.static, dtm.time(8, 0), day=-1, name="monthly")
    queue.run_custom(
        Reminders.of_class,
        job_kwargs={
            "trigger": "interval",
            "minutes": 5,
            "id": "custom",
            "misfire_grace_time": 30,
            "coalesce": False,
            "max_instances": 2,
        },
        name="custom",
    )
    before = {job.name: job for job in queue.jobs()}
    found = await stored(url, 7)
    by_name = {row["name"]: row for row in found.values()}
    once = by_name["once"]
    assert once["callback"] == f"{__name__}:tick"
    assert json.loads(once["data"]) == {"a": [1, 2]}
    assert (once["chat_id"], once["user_id"], once["enabled"]) == (42, 7, True)
    assert json.loads(once["trigger"])["type"] == "date"
    assert once["next_run_at"] == before["once"].next_t.timestamp()  # type: ignore[union-attr]
    assert json.loads(by_name["repeating"]["trigger"])["seconds"] == 60
    assert json.loads(by_name["daily"]["trigger"])["day_of_week"] == "mon,wed"
    assert json.loads(by_name["monthly"]["trigger"])["day"] == "last"
    assert by_name["monthly"]["callback"] == f"{__name__}:Reminders.static"
    assert by_name["custom"]["id"] == "custom"
    assert json.loads(by_name["custom"]["options"]) == {
        "misfire_grace_time": 30,
        "coalesce": False,
        "max_instances": 2,
        "executor": "default",
    }
    await stop(app)

    again = make_app(url)
    await again.initialize()  # restored before post_init, before start
    assert again.job_queue is not None
    after = {job.name: job for job in again.job_queue.jobs()}
    assert set(after) == set(before)
    for name, job in before.items():
        restored = after[name]
        assert restored.id == job.id
        assert restored.next_t == job.next_t
        assert (restored.data, restored.chat_id, restored.user_id) == (
            job.data,
            job.chat_id,
            job.user_id,
        )
        assert restored.callback == job.callback
        assert str(restored.job.trigger) == str(job.job.trigger)
        for option in ("misfire_grace_time", "coalesce", "max_instances"):
            assert getattr(restored.job, option) == getattr(job.job, option)
    assert json.loads(by_name["berlin"]["trigger"])["timezone"] == "Europe/Berlin"
    assert after["berlin"].job.trigger.timezone == berlin
    await stop(again)
    assert len(await rows(url)) == 7


# -- 2. runs: context, catch-up, misfires, the end of a run_once ---------------------------


async def test_a_restored_job_runs_with_its_data_chat_id_and_chat_data(url: str) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None and app.persistence is not None
    app.job_queue.run_repeating(tick, 3600, first=3600, data=["x"], name="hello", chat_id=42)
    await app.persistence.update_chat_data(42, {"lang": "en"})
    await stored(url, 1)
    await stop(app)
    past = dtm.datetime.now(dtm.timezone.utc).timestamp() - 10
    await change_rows(url, update(JOBS).values(next_run_at=past))  # fell due while down

    again = await start(make_app(url))
    await asyncio.wait_for(RAN.wait(), 30)
    assert RUNS == [("hello", ["x"], 42, {"lang": "en"})]
    await stop(again)


async def test_a_job_that_fell_due_while_down_runs_once_and_keeps_its_rhythm(url: str) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None
    app.job_queue.run_repeating(tick, 600, first=600, name="rhythm")
    first = next(iter((await stored(url, 1)).values()))["next_run_at"]
    await stop(app)
    missed = first - 3 * 600 - 5  # three runs and a bit were missed while the bot was down
    await change_rows(url, update(JOBS).values(next_run_at=missed))

    again = await start(make_app(url))
    await asyncio.wait_for(RAN.wait(), 30)
    now = dtm.datetime.now(dtm.timezone.utc).timestamp()

    async def moved_on() -> bool:
        (row,) = (await rows(url)).values()
        return bool(row["next_run_at"] > now)

    await eventually(moved_on, "the next run time to move on")
    await stop(again)
    assert len(RUNS) == 1  # coalesced
    (row,) = (await rows(url)).values()
    steps = (row["next_run_at"] - missed) / 600
    assert abs(steps - round(steps)) < 1e-6  # on the job's own rhythm


async def test_downtime_is_a_misfire_only_with_the_jobs_own_misfire_grace_time(
    url: str,
) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None
    app.job_queue.run_repeating(
        tick, 600, first=600, name="strict", job_kwargs={"misfire_grace_time": 5}
    )
    await stored(url, 1)
    await stop(app)
    past = dtm.datetime.now(dtm.timezone.utc).timestamp() - 60
    await change_rows(url, update(JOBS).values(next_run_at=past))

    again = make_app(url)
    missed = asyncio.Event()
    await again.initialize()
    assert again.job_queue is not None
    again.job_queue.scheduler.add_listener(lambda event: missed.set(), EVENT_JOB_MISSED)
    await again.start()
    await asyncio.wait_for(missed.wait(), 30)
    await again.job_queue.stop()  # waits for anything submitted
    await stop(again)
    assert RUNS == []


async def test_a_run_once_that_ran_is_gone(url: str) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None
    app.job_queue.run_once(tick, 0.3, name="soon")
    await asyncio.wait_for(RAN.wait(), 30)
    await stored(url, 0)
    await stop(app)
    again = make_app(url)
    await again.initialize()
    assert again.job_queue is not None and again.job_queue.jobs() == ()
    await stop(again)
    assert RUNS == [("soon", None, None, None)]


async def test_pause_removal_and_reschedule_are_written_and_survive_a_restart(url: str) -> None:
    app = await start(make_app(url))
    queue = app.job_queue
    assert queue is not None
    paused = queue.run_repeating(tick, 600, name="paused")
    removed = queue.run_repeating(tick, 600, name="removed")
    moved = queue.run_repeating(tick, 600, name="moved")
    await stored(url, 3)
    paused.enabled = False
    removed.schedule_removal()
    moved.job.reschedule("interval", seconds=1234)

    async def written() -> bool:
        found = {row["name"]: row for row in (await rows(url)).values()}
        return (
            set(found) == {"paused", "moved"}
            and not found["paused"]["enabled"]
            and found["paused"]["next_run_at"] is None
            and json.loads(found["moved"]["trigger"])["seconds"] == 1234
        )

    await eventually(written, "the pause, the removal and the reschedule to be written")
    expected_next = moved.next_t
    await stop(app)

    again = make_app(url)
    await again.initialize()
    assert again.job_queue is not None
    jobs = {job.name: job for job in again.job_queue.jobs()}
    assert set(jobs) == {"paused", "moved"}
    assert jobs["paused"].next_t is None  # stays paused
    assert jobs["moved"].next_t == expected_next
    assert jobs["moved"].job.trigger.interval == dtm.timedelta(seconds=1234)
    jobs["paused"].enabled = True  # and can be resumed

    async def resumed() -> bool:
        found = {row["name"]: row for row in (await rows(url)).values()}
        return bool(found["paused"]["enabled"])

    await eventually(resumed, "the resume to be written")
    await stop(again)


# -- 3. callbacks by reference only --------------------------------------------------------


def _closure() -> Callable[[Any], Awaitable[None]]:
    async def inner(context: Any) -> None:
        await tick(context)

    return inner


@pytest.mark.parametrize(
    ("make_callback", "reason"),
    [
        (lambda: lambda context: tick(context), "lambda"),
        (_closure, "closure"),
        (lambda: Reminders().bound, "bound to an object"),
    ],
    ids=["lambda", "closure", "bound-method"],
)
async def test_a_callback_that_cannot_be_found_by_reference_raises_when_scheduled(
    url: str, make_callback: Callable[[], Any], reason: str
) -> None:
    errors: list[SerializationError] = []

    async def post_init(app: App) -> None:
        assert app.job_queue is not None
        with pytest.raises(SerializationError) as info:
            app.job_queue.run_repeating(make_callback(), 60, name="bad-in-post-init")
        errors.append(info.value)

    app = await start(make_app(url, post_init))
    assert app.job_queue is not None
    with pytest.raises(SerializationError) as info:
        app.job_queue.run_once(make_callback(), 60, name="bad")
    await stop(app)
    message = str(info.value)
    assert "job 'bad'" in message and reason in message and "top level of a module" in message
    assert "job 'bad-in-post-init'" in str(errors[0])
    assert await rows(url) == {}


@dataclasses.dataclass(frozen=True)
class Reminder:
    text: str
    level: Level
    at: dtm.datetime


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


async def test_job_data_of_registered_types_is_stored_readably_and_restored_exactly(
    url: str,
) -> None:
    def app_with_types() -> App:
        persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
            url, store_jobs=True, codec=JSONCodec(types={"Reminder": Reminder, "Level": Level})
        )
        return builder().persistence(persistence).build()  # type: ignore[no-any-return]

    data = Reminder("pizza", Level.HIGH, dtm.datetime(2026, 12, 1, 20, tzinfo=dtm.timezone.utc))
    app = await start(app_with_types())
    assert app.job_queue is not None
    app.job_queue.run_once(tick, 3600, name="typed", data=data)
    (row,) = (await stored(url, 1)).values()
    await stop(app)
    assert '"Reminder"' in row["data"] and '"pizza"' in row["data"]  # readable in SQL

    again = await start(app_with_types())
    assert again.job_queue is not None
    (job,) = again.job_queue.jobs()
    assert job.data == data and type(job.data.level) is Level
    await stop(again)


async def test_job_data_that_cannot_be_encoded_raises_when_scheduled(url: str) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None
    with pytest.raises(SerializationError) as info:
        app.job_queue.run_once(tick, 60, data={"lock": threading.Lock()}, name="locked")
    app.job_queue.run_once(tick, 60, data={"fine": 1}, name="fine")
    found = await stored(url, 1)
    await stop(app)
    assert "job 'locked'" in str(info.value) and "['lock']" in str(info.value)
    assert [row["name"] for row in found.values()] == ["fine"]


async def test_a_stored_module_that_is_not_imported_is_never_imported_and_kept(
    url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = "ptbs_never_imported_module"
    (tmp_path / f"{module}.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n"
        "async def callback(context):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # importable, but nothing may import it
    app = await start(make_app(url))
    assert app.job_queue is not None
    app.job_queue.run_repeating(tick, 600, name="renamed")
    (job_id,) = await stored(url, 1)
    await stop(app)
    await change_rows(url, update(JOBS).values(callback=f"{module}:callback"))
    before = await rows(url)

    caplog.set_level(logging.ERROR)
    again = make_app(url)
    await again.initialize()
    await again.start()
    assert again.job_queue is not None and again.job_queue.jobs() == ()
    await stop(again)
    assert module not in sys.modules
    assert not (tmp_path / f"{module}.ran").exists()
    assert any(
        "'renamed'" in record.getMessage() and job_id in record.getMessage()
        for record in caplog.records
    )
    assert await rows(url) == before  # kept as it was, never deleted

    # The command line lists it and removes it.
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["--url", url, "jobs"]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and "renamed" in listing and f"{module}:callback" in listing
    assert await asyncio.to_thread(cli_main, ["--url", url, "jobs", "remove", job_id]) == 0
    assert await rows(url) == {}
    assert await asyncio.to_thread(cli_main, ["--url", url, "jobs", "remove", job_id]) == 1
    assert "no stored job" in capsys.readouterr().err


async def test_an_undecodable_row_fails_for_that_job_only_and_is_never_overwritten(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None
    app.job_queue.run_repeating(tick, 600, name="good", job_kwargs={"id": "good"})
    app.job_queue.run_repeating(tick, 600, name="bad", job_kwargs={"id": "bad"})
    await stored(url, 2)
    await stop(app)
    await change_rows(url, update(JOBS).where(JOBS.c.id == "bad").values(data="{not json"))
    before = await rows(url)

    caplog.set_level(logging.ERROR)
    again = await start(make_app(url))
    assert again.job_queue is not None
    assert [job.name for job in again.job_queue.jobs()] == ["good"]
    with pytest.raises(StorageError, match="bad"):
        again.job_queue.run_repeating(
            tick, 60, name="bad", job_kwargs={"id": "bad", "replace_existing": True}
        )
    await stop(again)
    assert any("'bad'" in record.getMessage() for record in caplog.records)
    assert (await rows(url))["bad"] == before["bad"]


# -- 4. jobs created at every start -------------------------------------------------------


async def _every_start_with_id(app: App) -> None:
    assert app.job_queue is not None
    app.job_queue.run_repeating(
        report, 3600, name="report", job_kwargs={"id": "daily-report", "replace_existing": True}
    )


async def _every_start_without_id(app: App) -> None:
    assert app.job_queue is not None
    app.job_queue.run_repeating(report, 3600, name="report", data={"v": 1})


@pytest.mark.parametrize(
    "post_init", [_every_start_with_id, _every_start_without_id], ids=["with-id", "without-id"]
)
async def test_a_job_created_at_every_start_replaces_its_restored_copy(
    url: str, post_init: Callable[[App], Awaitable[None]]
) -> None:
    ids = []
    for _ in range(3):
        app = await start(make_app(url, post_init))
        assert app.job_queue is not None
        jobs = app.job_queue.jobs()
        assert [job.name for job in jobs] == ["report"]
        found = await stored(url, 1)
        ids.append(next(iter(found)))
        await stop(app)
    assert len(await rows(url)) == 1
    if post_init is _every_start_with_id:
        assert ids == ["daily-report"] * 3


async def test_jobs_made_while_running_never_replace_restored_ones(url: str) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None
    app.job_queue.run_once(tick, 3600, name="reminder", data=1)
    await stored(url, 1)
    await stop(app)
    again = await start(make_app(url))
    assert again.job_queue is not None
    again.job_queue.run_once(tick, 3600, name="reminder", data=2)  # a second reminder
    found = await stored(url, 2)
    await stop(again)
    assert sorted(json.loads(row["data"]) for row in found.values()) == [1, 2]


# -- 5. bad input and dependencies ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_an_unreachable_database_at_start_is_a_storage_error(
    db_url: str, backend: str, tmp_path: Path
) -> None:
    if backend == "sqlite":
        bad = f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'dir' / 'bot.db'}"
    else:
        bad = make_url(db_url).set(port=_free_port()).render_as_string(hide_password=False)
    app = make_app(bad)
    with pytest.raises(StorageError):
        await app.initialize()
    assert app.job_queue is not None and not app.job_queue.scheduler.running
    assert app.persistence is not None
    await app.persistence.flush()
    await asyncio.sleep(0.05)  # aiosqlite's thread reports the failed open to the loop


async def test_store_jobs_without_a_job_queue_is_a_clear_error_at_initialize(url: str) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url, store_jobs=True)
    app = builder().persistence(persistence).job_queue(None).build()
    with pytest.raises(RuntimeError, match=r"JobQueue.*ptb-sessions\[jobs\]"):
        await app.initialize()
    await persistence.flush()


async def test_jobs_are_not_stored_without_store_jobs(url: str) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url)
    app = builder().persistence(persistence).context_types(ContextTypes()).build()
    await start(app)
    assert app.job_queue is not None
    app.job_queue.run_once(lambda context: tick(context), 3600)  # anything goes in memory
    await stop(app)
    assert await rows(url) == {}


async def test_a_removed_row_stays_removed_when_another_process_ran_it(url: str) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None
    job = app.job_queue.run_repeating(tick, 1.5, name="elsewhere")
    await stored(url, 1)
    await change_rows(url, delete(JOBS))  # another process removed it

    async def gone() -> bool:
        return job.id not in {j.id for j in app.job_queue.jobs()}  # type: ignore[union-attr]

    await eventually(gone, "the job to be taken over as removed")
    await stop(app)
    assert RUNS == []


async def test_the_command_line_lists_every_stored_job(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None
    app.job_queue.run_repeating(tick, 90, name="every-90", chat_id=-100123, user_id=5)
    app.job_queue.run_daily(tick, dtm.time(9, 30), name="[bold]daily\x1b[31m")
    paused = app.job_queue.run_once(tick, 3600, name="paused")
    paused.enabled = False
    await stored(url, 3)

    async def written() -> bool:
        return not any(
            row["name"] == "paused" and row["enabled"] for row in (await rows(url)).values()
        )

    await eventually(written, "the pause to be written")
    await stop(app)
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["--url", url, "jobs"]) == 0
    out = capsys.readouterr().out
    assert "every 90s" in out and "-100123" in out and f"{__name__}:tick" in out
    assert "hour=9 minute=30 second=0" in out
    assert "[bold]daily\\x1b[31m" in out and "\x1b" not in out  # printed literally
    assert "paused" in out and "3 stored jobs" in out


async def test_export_and_import_include_the_stored_jobs(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = await start(make_app(url))
    assert app.job_queue is not None
    app.job_queue.run_repeating(tick, 90, name="exported", data={"é": [1]}, chat_id=-5)
    app.job_queue.run_once(tick, 3600, name="paused").enabled = False
    await stored(url, 2)
    await app.persistence.update_chat_data(1, {"n": 1})  # type: ignore[union-attr]

    async def written() -> bool:
        return not any(
            row["enabled"] for row in (await rows(url)).values() if row["name"] == "paused"
        )

    await eventually(written, "the pause to be written")
    await stop(app)
    before = await rows(url)
    backup = tmp_path / "backup.jsonl"
    assert await asyncio.to_thread(cli_main, ["--url", url, "export", str(backup)]) == 0
    assert sum('"job":' in line for line in backup.read_text().splitlines()) == 2

    await change_rows(url, delete(JOBS))
    assert await asyncio.to_thread(cli_main, ["--url", url, "import", str(backup)]) == 1
    assert "already in" in capsys.readouterr().err  # the chat_data row is still there
    assert await rows(url) == {}  # nothing was imported
    assert (
        await asyncio.to_thread(cli_main, ["--url", url, "import", "--replace", str(backup)]) == 0
    )
    assert await rows(url) == before
    assert await asyncio.to_thread(cli_main, ["--url", url, "import", str(backup)]) == 1
    assert "already in" in capsys.readouterr().err


async def _jobs_and_a_chat(url: str) -> dict[str, dict[str, Any]]:
    """Two stored jobs (one paused) and one chat_data row, written; the stored jobs."""
    app = await start(make_app(url))
    assert app.job_queue is not None
    app.job_queue.run_repeating(tick, 90, name="every-90", data={"é": [1]}, chat_id=-5)
    app.job_queue.run_once(tick, 3600, name="paused").enabled = False
    await app.persistence.update_chat_data(1, {"n": 1})  # type: ignore[union-attr]

    async def written() -> bool:
        found = await rows(url)
        return len(found) == 2 and not any(
            row["enabled"] for row in found.values() if row["name"] == "paused"
        )

    await eventually(written, "the jobs and the pause to be written")
    await stop(app)
    return await rows(url)


async def test_export_and_import_through_standard_output_and_input_carry_the_jobs(
    url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await _jobs_and_a_chat(url)
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["--url", url, "export", "-"]) == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]  # standard output: lines only
    jobs = [line["job"] for line in lines if "job" in line]
    assert sorted(job["id"] for job in jobs) == sorted(before)
    assert lines[-len(jobs) :] == [{"job": job} for job in jobs]  # after the rows
    assert "and 2 jobs" in err and "standard output" in err

    assert (
        await asyncio.to_thread(cli_main, ["--url", url, "db", "downgrade", "base", "--yes"]) == 0
    )
    stdin = io.TextIOWrapper(io.BytesIO(out.encode("utf-8")), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert await asyncio.to_thread(cli_main, ["--url", url, "import", "-"]) == 0
    assert "2 jobs from standard input" in capsys.readouterr().out
    assert await rows(url) == before


async def test_import_never_overwrites_a_stored_job_without_replace(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await _jobs_and_a_chat(url)
    backup = tmp_path / "backup.jsonl"
    assert await asyncio.to_thread(cli_main, ["--url", url, "export", str(backup)]) == 0
    await change_rows(url, delete(StoredRow.__table__))  # no session row collides
    await change_rows(url, update(JOBS).values(name="changed since"))
    changed = await rows(url)
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["--url", url, "import", str(backup)]) == 1
    err = capsys.readouterr().err
    assert "the job" in err and "is already in" in err and "--replace" in err
    assert await rows(url) == changed  # the stored jobs are untouched
    assert (
        await asyncio.to_thread(cli_main, ["--url", url, "import", "--replace", str(backup)]) == 0
    )
    assert await rows(url) == before


async def test_a_bad_job_line_is_named_and_nothing_is_imported(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _jobs_and_a_chat(url)
    backup = tmp_path / "backup.jsonl"
    assert await asyncio.to_thread(cli_main, ["--url", url, "export", str(backup)]) == 0
    lines = backup.read_text(encoding="utf-8").splitlines(keepends=True)
    assert (
        await asyncio.to_thread(cli_main, ["--url", url, "db", "downgrade", "base", "--yes"]) == 0
    )
    for bad, fragment in [
        (lambda job: job.update(chat_id="-5"), "chat_id must be an integer or null"),
        (lambda job: job.pop("trigger"), "a job needs exactly the fields"),
        (lambda job: job.update(options="{"), "options must be JSON text"),
    ]:
        job_line = json.loads(lines[-1])
        bad(job_line["job"])
        corrupted = tmp_path / "corrupted.jsonl"
        corrupted.write_text("".join(lines[:-1]) + json.dumps(job_line) + "\n", encoding="utf-8")
        capsys.readouterr()
        assert await asyncio.to_thread(cli_main, ["--url", url, "import", str(corrupted)]) == 1
        err = capsys.readouterr().err
        assert f"corrupted.jsonl:{len(lines)}: not a stored job" in err and fragment in err, err
        assert "nothing was imported" in err
    doubled = tmp_path / "doubled.jsonl"
    doubled.write_text("".join(lines) + lines[-1], encoding="utf-8")
    assert await asyncio.to_thread(cli_main, ["--url", url, "import", str(doubled)]) == 1
    assert f"is already on line {len(lines)}" in capsys.readouterr().err
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["--url", url, "db", "current"]) == 0
    assert capsys.readouterr().out.startswith("none")  # not even the schema was created


async def test_a_downgrade_that_drops_the_jobs_table_counts_the_jobs(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await _jobs_and_a_chat(url)
    capsys.readouterr()
    for target, destroyed in [
        ("-1", "2 stored jobs of"),
        ("base", "1 stored row and 2 stored jobs"),
    ]:
        assert await asyncio.to_thread(cli_main, ["--url", url, "db", "downgrade", target]) == 1
        err = capsys.readouterr().err
        assert f"would destroy {destroyed}" in err and "--yes" in err and "export" in err, err
        assert await rows(url) == before
    assert await asyncio.to_thread(cli_main, ["--url", url, "db", "downgrade", "-1", "--yes"]) == 0
    assert "-> 0001" in capsys.readouterr().out


async def test_a_database_at_revision_0001_exports_its_rows_only(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await _jobs_and_a_chat(url)
    assert (
        await asyncio.to_thread(cli_main, ["--url", url, "db", "downgrade", "0001", "--yes"]) == 0
    )
    backup = tmp_path / "backup.jsonl"
    capsys.readouterr()
    assert await asyncio.to_thread(cli_main, ["--url", url, "export", str(backup)]) == 0
    assert "exported 1 row from" in capsys.readouterr().out
    (line,) = backup.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["namespace"] == "chat_data"
    assert await asyncio.to_thread(cli_main, ["--url", url, "db", "current"]) == 0
    assert capsys.readouterr().out.startswith("0001")  # export changed nothing


@pytest.mark.parametrize("server", ["postgresql", "mariadb"])
async def test_a_silent_server_gives_the_job_store_a_storage_error_within_its_timeout(
    server: str, caplog: pytest.LogCaptureFixture
) -> None:
    from _proxy import OutageProxy
    from conftest import async_server_url

    url = await async_server_url(server)
    parsed = make_url(url)
    proxy = OutageProxy(parsed.host or "127.0.0.1", parsed.port or 0)
    try:
        through = parsed.set(host="127.0.0.1", port=proxy.port)
        persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
            through.render_as_string(hide_password=False), store_jobs=True, timeout=1
        )
        app = await start(builder().persistence(persistence).build())
        assert app.job_queue is not None
        # no misfire limit: its run, held back by the silent server, still runs afterwards
        app.job_queue.run_once(tick, 2, name="due", job_kwargs={"misfire_grace_time": None})
        await stored(url, 1)
        proxy.stall()
        with caplog.at_level(logging.ERROR, logger="ptb_sessions"):

            def failed(what: str) -> Callable[[], Awaitable[bool]]:
                async def logged() -> bool:
                    return any(
                        what in r.getMessage() and "no answer within 1 s" in r.getMessage()
                        for r in caplog.records
                    )

                return logged

            await eventually(failed("Due jobs are not run"), "the claim to hit its deadline")
            app.job_queue.run_repeating(tick, 600, name="written later")
            await eventually(failed("job changes are kept"), "the write to hit its deadline")
        assert RUNS == []
        proxy.restore()
        await asyncio.wait_for(RAN.wait(), 30)  # claimed on a fresh connection, and run
        await stored(url, 1)  # "written later" is there; "due" ended with its run
        assert {row["name"] for row in (await rows(url)).values()} == {"written later"}
        await stop(app)
    finally:
        proxy.close()


async def test_ptbs_own_timerbot_keeps_its_timers_across_a_restart(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from _bot import OfflineRequest, message_update, process
    from _ptb_examples import load_example

    def timerbot(request: OfflineRequest) -> App:
        persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
            url, store_jobs=True
        )
        _, app = load_example(
            "timerbot", lambda: builder(request).persistence(persistence), None, monkeypatch
        )
        return app  # type: ignore[no-any-return]

    request = OfflineRequest()
    app = timerbot(request)
    async with app:
        await app.start()
        await process(app, message_update(5, "/set 30"), message_update(6, "/set 40"))
        await process(app, message_update(6, "/unset"))
        await app.stop()
    assert len(request.texts(5)) == len(request.texts(6)) - 1 == 1
    (stored_job,) = (await stored(url, 1)).values()
    assert stored_job["callback"] == "ptb_example_timerbot:alarm" and stored_job["chat_id"] == 5

    await change_rows(url, update(JOBS).values(next_run_at=0.0))  # the 30 s pass while down
    request = OfflineRequest()
    restarted = timerbot(request)  # the example's module is loaded again, as at a restart
    async with restarted:
        await restarted.start()

        async def beeped() -> bool:
            return len(request.texts(5)) == 1

        await eventually(beeped, "the restored timer to go off")
        await restarted.stop()
    assert "30" in request.texts(5)[0] and request.texts(6) == []
    assert await rows(url) == {}  # the run_once ran: gone


async def test_job_changes_during_an_outage_never_block_and_are_written_when_it_ends(
    db_url: str,
) -> None:
    from test_persistence import Outage

    outage = Outage(db_url)
    try:
        app = await start(make_app(outage.bot_url))
        assert app.job_queue is not None
        kept = app.job_queue.run_repeating(tick, 600, name="kept")
        removed = app.job_queue.run_repeating(tick, 600, name="removed")
        await stored(db_url, 2)
        outage.cut()
        added = app.job_queue.run_once(tick, 3600, name="added")  # returns at once
        removed.schedule_removal()
        kept.enabled = False
        await asyncio.sleep(1.5)  # the writer fails meanwhile; the bot runs on
        assert {row["name"] for row in (await rows(db_url)).values()} == {"kept", "removed"}
        outage.restore()

        async def written() -> bool:
            found = {row["id"]: row for row in (await rows(db_url)).values()}
            return set(found) == {kept.id, added.id} and not found[kept.id]["enabled"]

        await eventually(written, "the changes to be written after the outage")
        await stop(app)
    finally:
        outage.close()


def test_the_jobs_extra_pulls_in_ptbs_job_queue() -> None:
    """``pip install 'ptb-sessions[jobs]'`` brings APScheduler through PTB's own extra."""
    import importlib.metadata

    requires = importlib.metadata.requires("ptb-sessions") or []
    jobs = [r for r in requires if r.replace(" ", "").endswith('extra=="jobs"')]
    assert len(jobs) == 1 and jobs[0].startswith("python-telegram-bot[job-queue]")
