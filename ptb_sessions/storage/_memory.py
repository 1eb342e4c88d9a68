"""An in-process storage adapter that keeps versions."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

from ptb_sessions._codec import Codec
from ptb_sessions._errors import SerializationError
from ptb_sessions._rowpolicy import RowPolicy
from ptb_sessions.storage._base import ReadVersions, conflict_error

__all__ = ["MemoryStorage"]


class _Entry:
    """One stored value: encoded, with its version and expiry."""

    __slots__ = ("data", "expires_at", "version")

    def __init__(self, data: str | bytes, version: int, expires_at: float | None) -> None:
        self.data = data
        self.version = version
        self.expires_at = expires_at


class MemoryStorage:
    """A :class:`~ptb_sessions.StorageAdapter` that keeps the data in this process (lost on
    restart), for tests and development.

    Values are stored encoded (by default with :class:`~ptb_sessions.JSONCodec`), so a read
    always returns a fresh copy, never the object that was written, and a value the SQL storage
    would reject is rejected here too, at write time.

    The storage keeps versions: a write or delete based on a stale read raises
    :class:`~ptb_sessions.ConflictError` (see :class:`~ptb_sessions.StorageAdapter`).

    Args:
        ttl (:obj:`float` | :class:`datetime.timedelta`, optional): An idle timeout: a value
            neither read nor written for this many seconds expires; it then reads as
            :obj:`None` and is deleted. It expires when ``clock()`` is after its last use plus
            ``ttl``. Defaults to :obj:`None`: no expiry.
        clock (Callable[[], :obj:`float`], optional): The time in seconds. Defaults to
            :func:`time.time`.
        codec (:class:`~ptb_sessions.Codec`, optional): How values are copied. Defaults to
            :class:`~ptb_sessions.JSONCodec`; :class:`~ptb_sessions.PickleCodec` stores
            arbitrary objects.

    Raises:
        ValueError: ``ttl`` is zero, negative or NaN.
        TypeError: ``ttl`` is neither a number nor a timedelta.
    """

    __slots__ = ("_data", "_policy", "_read_versions", "_versions")

    def __init__(
        self,
        ttl: float | timedelta | None = None,
        *,
        clock: Callable[[], float] = time.time,
        codec: Codec | None = None,
    ) -> None:
        self._policy = RowPolicy(codec, max_value_size=None, ttl=ttl, clock=clock)
        self._data: dict[str, _Entry] = {}
        self._versions = itertools.count(1)
        self._read_versions: ReadVersions[int] = ReadVersions()

    @property
    def ttl(self) -> float | None:
        """:obj:`float` | :obj:`None`: The time to live in seconds, or :obj:`None`."""
        return self._policy.ttl

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ttl={self.ttl!r}, keys={len(self._data)})"

    def __bool__(self) -> bool:
        """Always :obj:`True`, even when empty, so ``storage or MemoryStorage()`` keeps it."""
        return True

    def __len__(self) -> int:
        """The number of stored values that have not expired (expired ones are deleted)."""
        for key in list(self._data):
            self._live(key)
        return len(self._data)

    def _live(self, key: str) -> _Entry | None:
        """The entry of ``key`` if it is stored and not expired; an expired one is deleted."""
        entry = self._data.get(key)
        if entry is None:
            return None
        if self._policy.is_expired(entry.expires_at):
            del self._data[key]
            return None
        return entry

    def _check_version(self, key: str) -> None:
        remembered, version = self._read_versions.pop(key)
        if not remembered:
            return
        # An entry that expired since it was read still has the version that was read.
        entry = self._data.get(key)
        if (None if entry is None else entry.version) != version:
            raise conflict_error(key)

    async def read(self, key: str) -> Any | None:
        """Return a copy of the value stored for ``key``, or :obj:`None` if there is none or it
        expired (it is then deleted). Remembers the version read, and refreshes the expiry."""
        entry = self._live(key)
        if entry is None:
            self._read_versions.remember(key, None)
            return None
        value = self._policy.codec.decode(entry.data)
        if self._policy.touch_due(entry.expires_at):
            entry.expires_at = self._policy.expires_at()
        self._read_versions.remember(key, entry.version)
        return value

    async def write(self, key: str, value: Any) -> None:
        """Store a copy of ``value`` for ``key``.

        Raises:
            ptb_sessions.SerializationError: The codec cannot encode ``value``; the message
                names where it sits, e.g. ``session['42']['cart'][2]``. Nothing is stored.
            ptb_sessions.ConflictError: ``key`` was changed since this process read it.
        """
        try:
            data = self._policy.codec.encode(value)
        except SerializationError as exc:
            raise exc.located(f"session[{key!r}]") from exc
        self._check_version(key)
        self._data[key] = _Entry(data, next(self._versions), self._policy.expires_at())

    async def delete(self, key: str) -> None:
        """Remove the value stored for ``key``, if any.

        Raises:
            ptb_sessions.ConflictError: ``key`` was changed since this process read it.
        """
        self._check_version(key)
        self._data.pop(key, None)

    async def has(self, key: str) -> bool:
        """Whether a value that has not expired is stored for ``key``."""
        return self._live(key) is not None

    async def keys(self) -> AsyncIterator[str]:
        """The keys of the stored values that have not expired (expired ones are deleted)."""
        for key in list(self._data):
            if self._live(key) is not None:
                yield key

    async def items(self) -> AsyncIterator[tuple[str, Any]]:
        """``(key, copy of the value)`` for the stored values that have not expired (expired
        ones are deleted)."""
        for key in list(self._data):
            entry = self._live(key)
            if entry is not None:
                yield key, self._policy.codec.decode(entry.data)
