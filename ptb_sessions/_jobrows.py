"""A JobQueue job as a row of readable JSON, and back: callbacks as import references,
APScheduler's triggers (date, interval, cron) as their fields, data through the codec.

Nothing here touches the database or imports a module: a stored callback is looked up only
among the modules already in :data:`sys.modules`.
"""

from __future__ import annotations

import datetime as dtm
import inspect
import json
import sys
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from apscheduler.triggers.base import BaseTrigger  # type: ignore[import-untyped,unused-ignore]
from apscheduler.triggers.cron import CronTrigger  # type: ignore[import-untyped,unused-ignore]
from apscheduler.triggers.date import DateTrigger  # type: ignore[import-untyped,unused-ignore]
from apscheduler.triggers.interval import IntervalTrigger  # type: ignore[import-untyped,unused-ignore]

from ptb_sessions._codec import Codec
from ptb_sessions._errors import SerializationError, StorageError
from ptb_sessions._rows import decode_record, encode_value
from ptb_sessions._store import Record

__all__ = [
    "DEFAULT_MISFIRE_GRACE_TIME",
    "JobRow",
    "callback_reference",
    "decode_data",
    "decode_trigger",
    "encode_trigger",
    "from_timestamp",
    "resolve_callback",
    "to_timestamp",
]

#: APScheduler's default ``misfire_grace_time``: a job that has it was given none of its own.
DEFAULT_MISFIRE_GRACE_TIME: Final = 1


@dataclass(slots=True)
class JobRow:
    """The stored form of one job: the columns of ``ptb_sessions_jobs``."""

    id: str
    name: str | None
    callback: str
    codec: str
    data: str | None
    chat_id: int | None
    user_id: int | None
    trigger: str
    options: str
    enabled: bool
    next_run_at: float | None
    updated_at: float

    def values(self) -> dict[str, Any]:
        """The row as column values."""
        return {name: getattr(self, name) for name in self.__slots__}


def _where(job_name: str | None, job_id: str) -> str:
    return f"job {job_name!r} (id {job_id!r})"


# -- callbacks ----------------------------------------------------------------------------


def callback_reference(callback: Callable[..., Any], job_name: str | None, job_id: str) -> str:
    """The import reference ``module:qualname`` of ``callback``.

    Raises:
        SerializationError: ``callback`` cannot be found again by that reference (a lambda, a
            closure, a bound method of an object, a callable instance, a decorated copy).
    """
    where = _where(job_name, job_id)
    fix = (
        "define the callback as an async function at the top level of a module (or a "
        "@staticmethod/@classmethod of a top-level class) and pass the data it needs as "
        "the job's data=, chat_id= or user_id="
    )
    module = getattr(callback, "__module__", None)
    qualname = getattr(callback, "__qualname__", None)
    if inspect.ismethod(callback) and not inspect.isclass(callback.__self__):
        reason = "a method bound to an object cannot be stored"
    elif not isinstance(module, str) or not isinstance(qualname, str):
        reason = f"the callback {callback!r} has no module and qualified name"
    elif "<lambda>" in qualname:
        reason = "a lambda cannot be stored"
    elif "<locals>" in qualname:
        reason = f"the function {qualname} is defined inside another function (a closure)"
    elif not inspect.iscoroutinefunction(callback):
        reason = f"the callback {qualname} is not an async function"
    else:
        reference = f"{module}:{qualname}"
        if resolve_callback(reference) != callback:
            reason = f"{reference} does not lead back to the callback (it was replaced)"
        else:
            return reference
    raise SerializationError(
        f"the callback cannot be stored by reference: {reason}; {fix}",
        root=f"{where}.callback",
    )


def resolve_callback(reference: str) -> Callable[..., Any] | None:
    """The callable that ``reference`` (``module:qualname``) names, looked up only among the
    modules already imported: nothing is imported because a stored row names it. :obj:`None`
    if it is not found, or is not an async function."""
    module_name, _, qualname = reference.partition(":")
    owner: Any = None
    target: Any = sys.modules.get(module_name)
    if target is None or not qualname:
        return None
    for part in qualname.split("."):
        if part.startswith("__"):
            return None
        owner = target
        try:
            target = inspect.getattr_static(target, part)
        except AttributeError:
            return None
    if isinstance(target, staticmethod):
        target = target.__func__
    elif isinstance(target, classmethod):
        target = target.__get__(None, owner)
    if not inspect.iscoroutinefunction(target):
        return None
    return target  # type: ignore[no-any-return]


# -- time ---------------------------------------------------------------------------------


def to_timestamp(moment: dtm.datetime | None) -> float | None:
    """Seconds since the epoch of an aware datetime."""
    return None if moment is None else moment.timestamp()


def from_timestamp(seconds: float | None, tz: dtm.tzinfo) -> dtm.datetime | None:
    """The aware datetime of ``seconds`` since the epoch, in ``tz``."""
    return None if seconds is None else dtm.datetime.fromtimestamp(seconds, tz)


def _tz_name(tz: dtm.tzinfo, where: str) -> str:
    if isinstance(tz, zoneinfo.ZoneInfo):
        return tz.key
    zone = getattr(tz, "zone", None)  # pytz
    if isinstance(zone, str):
        return zone
    if isinstance(tz, dtm.timezone):
        offset = tz.utcoffset(None)
        if not offset:
            return "UTC"
        sign = "-" if offset < dtm.timedelta(0) else "+"
        seconds = int(abs(offset).total_seconds())
        return f"{sign}{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    raise SerializationError(
        f"the time zone {tz!r} cannot be stored; use a zoneinfo.ZoneInfo or a fixed offset",
        root=where,
    )


def _tz(name: str) -> dtm.tzinfo:
    if name == "UTC":
        return dtm.timezone.utc
    if name[:1] in "+-" and len(name) == 9:
        sign = -1 if name[0] == "-" else 1
        hours, minutes, seconds = (int(part) for part in name[1:].split(":"))
        return dtm.timezone(sign * dtm.timedelta(hours=hours, minutes=minutes, seconds=seconds))
    return zoneinfo.ZoneInfo(name)


def _iso(moment: dtm.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _moment(text: str | None, tz: dtm.tzinfo) -> dtm.datetime | None:
    return None if text is None else dtm.datetime.fromisoformat(text).astimezone(tz)


# -- triggers -----------------------------------------------------------------------------


def encode_trigger(trigger: BaseTrigger, job_name: str | None, job_id: str) -> str:
    """The trigger as JSON: its type and fields.

    Raises:
        SerializationError: The trigger is not one of APScheduler's date, interval or cron
            triggers (the ones PTB builds).
    """
    where = f"{_where(job_name, job_id)}.trigger"
    fields: dict[str, Any]
    if isinstance(trigger, DateTrigger):
        fields = {
            "type": "date",
            "run_date": _iso(trigger.run_date),
            "timezone": _tz_name(trigger.run_date.tzinfo, where),
        }
    elif isinstance(trigger, IntervalTrigger):
        fields = {
            "type": "interval",
            "seconds": trigger.interval.total_seconds(),
            "start_date": _iso(trigger.start_date),
            "end_date": _iso(trigger.end_date),
            "timezone": _tz_name(trigger.timezone, where),
            "jitter": trigger.jitter,
        }
    elif isinstance(trigger, CronTrigger):
        fields = {"type": "cron"}
        fields.update({f.name: str(f) for f in trigger.fields if not f.is_default})
        fields.update(
            start_date=_iso(trigger.start_date),
            end_date=_iso(trigger.end_date),
            timezone=_tz_name(trigger.timezone, where),
            jitter=trigger.jitter,
        )
    else:
        raise SerializationError(
            f"a {type(trigger).__name__} cannot be stored; only the date, interval and cron "
            "triggers (run_once, run_repeating, run_daily, run_monthly, and run_custom with "
            "trigger='date'/'interval'/'cron') can",
            root=where,
        )
    return json.dumps(fields, separators=(",", ":"))


def decode_trigger(text: str) -> BaseTrigger:
    """The trigger stored as ``text`` by :func:`encode_trigger`.

    Raises:
        ValueError: ``text`` is not a stored trigger.
    """
    fields = json.loads(text)
    kind = fields.pop("type")
    tz = _tz(fields.pop("timezone"))
    if kind == "date":
        return DateTrigger(run_date=_moment(fields["run_date"], tz))
    start = _moment(fields.pop("start_date"), tz)
    end = _moment(fields.pop("end_date"), tz)
    jitter = fields.pop("jitter")
    if kind == "interval":
        return IntervalTrigger(
            seconds=fields["seconds"], start_date=start, end_date=end, timezone=tz, jitter=jitter
        )
    if kind == "cron":
        return CronTrigger(**fields, start_date=start, end_date=end, timezone=tz, jitter=jitter)
    raise ValueError(f"unknown trigger type {kind!r}")


# -- data ---------------------------------------------------------------------------------


def encode_data(
    codec: Codec, data: Any, job_name: str | None, job_id: str, max_size: int | None
) -> tuple[str, str]:
    """The job's data encoded by ``codec``: ``(codec name, text)``.

    Raises:
        SerializationError: The data cannot be encoded; the message names the job.
    """
    return encode_value(codec, data, f"{_where(job_name, job_id)}.data", max_size)


def decode_data(codec: Codec, row: JobRow) -> Any:
    """The job's data.

    Raises:
        StorageError: The stored data cannot be decoded; the message names the job.
    """
    record = Record(row.codec, row.data, 0, None, 0.0, None)
    try:
        return decode_record(codec, record, "jobs", row.id)
    except StorageError as exc:
        raise StorageError(f"{_where(row.name, row.id)}: {exc}") from exc
