"""The process-wide table of per-key locks that serializes load -> save of one session key.

Every :class:`~ptb_sessions.SessionHandler` of the process shares one table, keyed by
``(storage scope, full session key)``. An entry exists only while some update holds or waits
for it (it is reference counted and removed when the last one leaves), so memory stays flat over
millions of distinct keys.
"""

from __future__ import annotations

import asyncio

__all__ = ["LockKey", "acquire", "locked_keys", "release"]

LockKey = tuple[int, str, str]
"""``(*storage scope, full key)``: what one lock of the table protects."""


class _Entry:
    """One lock of the table: the lock, how many updates hold or wait for it, and its holder."""

    __slots__ = ("lock", "owner", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
        self.owner: asyncio.Task[object] | None = None


_LOCKS: dict[LockKey, _Entry] = {}


def locked_keys() -> int:
    """The number of keys in the table: held or waited for right now. ``0`` when idle."""
    return len(_LOCKS)


async def acquire(key: LockKey) -> _Entry:
    """Wait until ``key`` is free and take it.

    Returns:
        The entry to pass to :func:`release`.

    Raises:
        RuntimeError: The current task already holds ``key`` (nested session handlers on the
            same storage and key would wait for themselves forever).
    """
    entry = _LOCKS.get(key)
    if entry is None:
        entry = _LOCKS[key] = _Entry()
    else:
        task = asyncio.current_task()
        if task is not None and entry.owner is task:
            raise RuntimeError(
                f"Session key {key[-1]!r} is already locked by this task: nested SessionHandlers "
                "must not use the same storage and key."
            )
    entry.users += 1
    try:
        await entry.lock.acquire()
    except BaseException:
        entry.users -= 1
        if entry.users == 0:
            del _LOCKS[key]
        raise
    entry.owner = asyncio.current_task()
    return entry


def release(key: LockKey, entry: _Entry) -> None:
    """Give ``key`` back; the entry leaves the table when nobody else holds or waits for it."""
    entry.owner = None
    entry.lock.release()
    entry.users -= 1
    if entry.users == 0:
        del _LOCKS[key]
