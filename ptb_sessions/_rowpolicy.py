"""The one row policy: how values become writes and stored records become values.

:class:`RowPolicy` owns the codec, the size limit, the ttl, the data migrations and the clock.
The persistence, the session storages and the command line all decide expiry, migration and
write-back through it (SPEC 4: one rule everywhere). It knows nothing of PTB or SQL.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from ptb_sessions._codec import Codec, JSONCodec
from ptb_sessions._errors import MigrationError
from ptb_sessions._rows import DEFAULT_MAX_VALUE_SIZE, decode_record, encode_value
from ptb_sessions._store import ANY_VERSION, Record, Write

__all__ = [
    "DEFAULT_MAX_VALUE_SIZE",
    "Migration",
    "Opened",
    "RowPolicy",
    "apply_migrations",
    "is_number",
    "normalize_ttl",
    "past_expiry",
    "sorted_migrations",
]

Migration = Callable[[Any], Any]

#: A read refreshes the expiry only once this share of the ttl has passed since the last
#: refresh (SPEC 4 allows deferring a touch by up to a tenth of the ttl).
_TOUCH_SHARE: Final = 0.1


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def normalize_ttl(ttl: float | timedelta | None) -> float | None:
    """Return ``ttl`` in seconds.

    Args:
        ttl (:obj:`float` | :class:`datetime.timedelta` | :obj:`None`): Seconds, a timedelta, or
            :obj:`None` (no expiry). Infinity also means no expiry.

    Returns:
        :obj:`float` | :obj:`None`: The seconds, or :obj:`None` for no expiry.

    Raises:
        TypeError: ``ttl`` is not a number or a timedelta.
        ValueError: ``ttl`` is zero, negative or NaN.
    """
    if ttl is None:
        return None
    if isinstance(ttl, timedelta):
        seconds = ttl.total_seconds()
    elif isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        seconds = float(ttl)
    else:
        raise TypeError(f"ttl must be seconds (int or float) or a datetime.timedelta, not {ttl!r}")
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError(f"ttl must be positive, not {ttl!r}")
    return None if math.isinf(seconds) else seconds


def sorted_migrations(
    migrations: Mapping[float, Migration],
) -> tuple[tuple[float, Migration], ...]:
    """Validate ``migrations`` and return them as ``(version, migration)`` pairs in numeric order
    (``10.1`` after ``10`` and before ``11``).

    Args:
        migrations (Mapping[:obj:`float`, Callable]): Data version -> the function that turns a
            value of the previous version into one of this version.

    Raises:
        ValueError: ``migrations`` is empty, or a version is not a finite :obj:`int` or
            :obj:`float`.
        TypeError: A migration is not callable.
    """
    if not migrations:
        raise ValueError(
            "migrations must not be empty; pass None for no migrations, or e.g. "
            "{1: migrate_to_1} to version the data"
        )
    for version, migration in migrations.items():
        if not is_number(version):
            raise ValueError(
                f"Migration versions must be finite numbers (int or float), not {version!r}"
            )
        if not callable(migration):
            raise TypeError(f"Migration {version!r} must be callable, not {migration!r}")
    return tuple(sorted(migrations.items(), key=lambda item: item[0]))


def _copy(value: Any) -> Any:
    try:
        return copy.deepcopy(value)
    except Exception:  # an uncopyable value is migrated as it is
        return value


def apply_migrations(
    value: Any,
    stored_version: float | None,
    migrations_sorted: tuple[tuple[float, Migration], ...],
    *,
    key: str,
) -> tuple[Any, float]:
    """Run the migrations that ``value`` still needs.

    With no ``stored_version`` (legacy data) every migration runs, else those with a version
    above it, in numeric order. :obj:`None` is not migrated. The migrations get a deep copy of
    ``value``, so a failing migration that changed it in place leaves ``value`` as it was.

    Args:
        value (:obj:`object`): The stored value.
        stored_version (:obj:`float` | :obj:`None`): Its data version, :obj:`None` if it has
            none.
        migrations_sorted: The result of :func:`sorted_migrations`.
        key (:obj:`str`): The session key, for error messages.

    Returns:
        tuple[:obj:`object`, :obj:`float`]: The migrated value and the latest version.

    Raises:
        ptb_sessions.MigrationError: ``stored_version`` is not a number or newer than the latest
            migration, or a migration raised.
    """
    latest = migrations_sorted[-1][0]
    if value is None:
        return None, latest
    if stored_version is not None:
        if not is_number(stored_version):
            raise MigrationError(
                f"{key!r} has the invalid data version {stored_version!r}; versions are numbers"
            )
        if stored_version > latest:
            raise MigrationError(
                f"{key!r} has data version {stored_version!r}, newer than the "
                f"latest migration {latest!r}. Was it written by a newer version of the bot? "
                "Add its migrations instead of downgrading the data."
            )
    pending = [
        (version, migration)
        for version, migration in migrations_sorted
        if stored_version is None or version > stored_version
    ]
    if pending:
        value = _copy(value)
    for version, migration in pending:
        try:
            value = migration(value)
        except Exception as exc:
            raise MigrationError(
                f"Migration to version {version!r} failed for {key!r}: "
                f"{type(exc).__name__}: {exc}. The stored value was left unchanged."
            ) from exc
    return value, latest


def past_expiry(expires_at: float | None, now: float) -> bool:
    """Whether a stored expiry has passed at ``now``: the rule of every expiry check (the
    database's purge deletes the same rows)."""
    return expires_at is not None and now > expires_at


@dataclass(slots=True, frozen=True)
class Opened:
    """A stored value as the policy hands it out.

    Attributes:
        value: The decoded value, migrated to the latest data version.
        migrated: It was stored at an older data version (or none): write it back once.
        touch: Its expiry must be refreshed (a read of a value under a ttl).
    """

    value: Any
    migrated: bool
    touch: bool


class RowPolicy:
    """Codec, size limit, ttl, migrations and clock of one kind of stored value.

    Args:
        codec: How values are encoded; :class:`~ptb_sessions.JSONCodec` by default.
        max_value_size: The largest encoded value in bytes; :obj:`None`: no limit.
        ttl: The idle timeout in seconds (or a timedelta): a value neither read nor written
            for this long expires. :obj:`None`: no expiry.
        migrations: Data version -> migration (see :func:`~ptb_sessions.enhance_storage`).
        clock: Seconds since the epoch.
    """

    __slots__ = ("clock", "codec", "max_value_size", "migrations", "ttl")

    def __init__(
        self,
        codec: Codec | None = None,
        *,
        max_value_size: int | None = DEFAULT_MAX_VALUE_SIZE,
        ttl: float | timedelta | None = None,
        migrations: Mapping[float, Migration] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.codec: Codec = codec if codec is not None else JSONCodec()
        self.max_value_size = max_value_size
        self.ttl = normalize_ttl(ttl)
        self.migrations = None if migrations is None else sorted_migrations(migrations)
        self.clock = clock

    def __repr__(self) -> str:
        versions = None if self.migrations is None else [v for v, _ in self.migrations]
        return f"RowPolicy({self.codec.name!r}, ttl={self.ttl!r}, migrations={versions!r})"

    # -- time ------------------------------------------------------------------------------

    @property
    def latest_version(self) -> float | None:
        """The data version every write stores, :obj:`None` without migrations."""
        return None if self.migrations is None else self.migrations[-1][0]

    def expires_at(self) -> float | None:
        """The expiry of a value written or read now, :obj:`None` without a ttl."""
        return None if self.ttl is None else self.clock() + self.ttl

    def is_expired(self, expires_at: float | None) -> bool:
        """Whether a value with this expiry has expired. A value stored before the ttl was
        turned on (no expiry) has not: its clock starts at its first read. Without a ttl
        nothing expires, whatever expiry was stored."""
        return self.ttl is not None and past_expiry(expires_at, self.clock())

    def touch_due(self, expires_at: float | None) -> bool:
        """Whether a read must refresh this expiry now (or may wait a little longer)."""
        if self.ttl is None:
            return False
        if expires_at is None:
            return True
        return expires_at - self.clock() < self.ttl * (1 - _TOUCH_SHARE)

    # -- reading ---------------------------------------------------------------------------

    def decode(self, record: Record, namespace: str, key: str) -> Any:
        """The value of ``record``, not migrated (bot_data, callback_data, conversations).

        Raises:
            StorageError: The row cannot be decoded.
        """
        return decode_record(self.codec, record, namespace, key)

    def migrate(self, value: Any, data_version: float | None, where: str) -> tuple[Any, bool]:
        """``value`` migrated to the latest data version, and whether it changed version.

        Raises:
            MigrationError: A migration failed, or ``data_version`` is newer than the latest.
        """
        if self.migrations is None:
            return value, False
        value, latest = apply_migrations(value, data_version, self.migrations, key=where)
        return value, data_version != latest

    def open(self, record: Record, namespace: str, key: str) -> Opened | None:
        """Read ``record``: decode, migrate, expire. :obj:`None`: it has expired.

        Raises:
            StorageError: The row cannot be decoded.
            MigrationError: A migration failed.
        """
        if self.is_expired(record.expires_at):
            return None
        value = self.decode(record, namespace, key)
        value, migrated = self.migrate(value, record.data_version, f"{namespace}[{key!r}]")
        return Opened(value, migrated, self.touch_due(record.expires_at))

    # -- writing ---------------------------------------------------------------------------

    def encode(self, value: Any, root: str) -> tuple[str, str]:
        """``(codec name, data)`` of ``value``; ``root`` names it in errors.

        Raises:
            SerializationError: ``value`` cannot be encoded or is too large.
        """
        return encode_value(self.codec, value, root, self.max_value_size)

    def write(
        self,
        namespace: str,
        key: str,
        value: Any,
        *,
        expected_version: int | None = ANY_VERSION,
        root: str | None = None,
    ) -> Write:
        """The write that stores ``value`` at the latest data version, its ttl restarted.

        Raises:
            SerializationError: ``value`` cannot be encoded or is too large. The message starts
                with ``root`` (default: ``namespace['key']``).
        """
        encoded = self.encode(value, f"{namespace}[{key!r}]" if root is None else root)
        return self.write_encoded(namespace, key, encoded, expected_version=expected_version)

    def write_encoded(
        self,
        namespace: str,
        key: str,
        encoded: tuple[str, str],
        *,
        expected_version: int | None = ANY_VERSION,
    ) -> Write:
        """Like :meth:`write`, for a value :meth:`encode` already encoded."""
        codec, data = encoded
        return Write(
            namespace,
            key,
            data,
            codec,
            expected_version=expected_version,
            data_version=self.latest_version,
            expires_at=self.expires_at(),
        )

    def delete(
        self, namespace: str, key: str, *, expected_version: int | None = ANY_VERSION
    ) -> Write:
        """The write that deletes the row of ``key``."""
        return Write(namespace, key, None, self.codec.name, expected_version=expected_version)
