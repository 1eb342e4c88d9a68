"""The database schema: the single source of truth for the alembic migrations in ``migrations/``.

One table holds every stored value, one row per ``(namespace, key)``. Namespaces are
``user_data``, ``chat_data``, ``bot_data``, ``callback_data``, ``conversation:<name>`` and the
session namespaces (``session`` or a fragment's name).
"""

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Double,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

__all__ = [
    "JOBS_TABLE_NAME",
    "MAX_JOB_ID_LENGTH",
    "MAX_KEY_LENGTH",
    "MAX_NAMESPACE_LENGTH",
    "TABLE_NAME",
    "Base",
    "StoredJob",
    "StoredRow",
    "metadata",
]

TABLE_NAME = "ptb_sessions_data"
JOBS_TABLE_NAME = "ptb_sessions_jobs"
MAX_JOB_ID_LENGTH = 191
MAX_NAMESPACE_LENGTH = 128
MAX_KEY_LENGTH = 512

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ExactString(TypeDecorator[str]):
    """A string compared byte for byte on every backend.

    MySQL and MariaDB compare ``VARCHAR`` case- and trailing-space-insensitively under their
    default collations, so ``"a"`` and ``"A "`` would be one key. There the column is
    ``VARBINARY`` holding UTF-8; elsewhere it is a plain ``VARCHAR``.
    """

    impl = String
    cache_ok = True

    def __init__(self, length: int) -> None:
        super().__init__(length)
        self.length = length

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.VARBINARY(self.length * 4))
        return dialect.type_descriptor(String(self.length))

    def process_bind_param(self, value: str | None, dialect: Dialect) -> Any:
        if value is not None and dialect.name in ("mysql", "mariadb"):
            return value.encode("utf-8")
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> str | None:
        if isinstance(value, bytes | bytearray):
            return bytes(value).decode("utf-8")
        return value  # type: ignore[no-any-return]


class LongText(TypeDecorator[str]):
    """``TEXT`` that holds more than 64 KiB on MySQL and MariaDB (``LONGTEXT`` there)."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(
                mysql.LONGTEXT(charset="utf8mb4", collation="utf8mb4_bin")
            )
        return dialect.type_descriptor(Text())


class Base(DeclarativeBase):
    metadata = metadata


class StoredRow(Base):
    """One stored value.

    ``version`` grows by one at every write, so a write based on a stale read is detected
    (:class:`~ptb_sessions.ConflictError`). ``data_version`` is the version of the data
    migrations (see :func:`~ptb_sessions.enhance_storage`). ``touched_at`` is when the row was
    last written (or, for ``chat_data`` and ``user_data`` with a ``ttl``, loaded) and
    ``expires_at`` when it expires; both are seconds since the epoch of the configured clock.
    """

    __tablename__ = TABLE_NAME

    namespace: Mapped[str] = mapped_column(ExactString(MAX_NAMESPACE_LENGTH), primary_key=True)
    key: Mapped[str] = mapped_column(ExactString(MAX_KEY_LENGTH), primary_key=True)
    codec: Mapped[str] = mapped_column(String(16))
    data: Mapped[str | None] = mapped_column(LongText())
    version: Mapped[int] = mapped_column(Integer)
    data_version: Mapped[float | None] = mapped_column(Double())
    touched_at: Mapped[float] = mapped_column(Double())
    expires_at: Mapped[float | None] = mapped_column(Double())

    __table_args__ = (Index("ix_ptb_sessions_data_expires_at", "expires_at"),)


class StoredJob(Base):
    """One job of the application's :class:`~telegram.ext.JobQueue` (``store_jobs=True``).

    ``id`` is the APScheduler job id. ``callback`` is the job callback's import reference
    (``module:qualname``), ``data`` the job's data encoded by the persistence's codec
    (``codec``), ``trigger`` and ``options`` are JSON (the trigger's type and fields; the
    APScheduler options ``misfire_grace_time``, ``coalesce``, ``max_instances`` and
    ``executor``). ``next_run_at`` is the next run time in seconds since the epoch
    (:obj:`None` while the job is paused); a process runs a due job only after moving it
    forward with a conditional ``UPDATE``, so each run happens in exactly one process.
    """

    __tablename__ = JOBS_TABLE_NAME

    id: Mapped[str] = mapped_column(ExactString(MAX_JOB_ID_LENGTH), primary_key=True)
    name: Mapped[str | None] = mapped_column(LongText())
    callback: Mapped[str] = mapped_column(LongText())
    codec: Mapped[str] = mapped_column(String(16))
    data: Mapped[str | None] = mapped_column(LongText())
    chat_id: Mapped[int | None] = mapped_column(BigInteger())
    user_id: Mapped[int | None] = mapped_column(BigInteger())
    trigger: Mapped[str] = mapped_column(LongText())
    options: Mapped[str] = mapped_column(LongText())
    enabled: Mapped[bool] = mapped_column(Boolean())
    next_run_at: Mapped[float | None] = mapped_column(Double())
    updated_at: Mapped[float] = mapped_column(Double())

    __table_args__ = (Index("ix_ptb_sessions_jobs_next_run_at", "next_run_at"),)
