"""The process-wide table of per-key locks that serializes load -> save of one session key.

Every :class:`~ptb_sessions.SessionHandler` of the process shares one table, keyed by
``(storage scope, full session key)``. An entry exists only while some update holds or waits
for it (the last one to release it removes it), so memory stays flat over millions of distinct
keys. Taking a free key is a dictionary insert: no :class:`asyncio.Lock`, no task switch.
"""

from __future__ import annotations

import asyncio
from collections import deque

__all__ = ["LockKey", "acquire", "locked_keys", "release", "try_acquire"]

LockKey = tuple[int, str, str]
"""``(*storage scope, full key)``: what one lock of the table protects."""


class _Entry:
    """One lock of the table, held by one update: its holder and the updates waiting for it,
    in order (a future each, resolved when the lock is handed over)."""

    __slots__ = ("owner", "waiters")

    def __init__(self, owner: asyncio.Task[object] | None) -> None:
        self.owner = owner
        self.waiters: deque[asyncio.Future[None]] | None = None


_LOCKS: dict[LockKey, _Entry] = {}


def locked_keys() -> int:
    """The number of keys in the table: held or waited for right now. ``0`` when idle."""
    return len(_LOCKS)


def try_acquire(key: LockKey) -> _Entry | None:
    """Take ``key`` if it is free (no waiting, no task switch); :obj:`None` if it is not.

    Returns:
        The entry to pass to :func:`release`, or :obj:`None`.
    """
    if key in _LOCKS:
        return None
    entry = _LOCKS[key] = _Entry(asyncio.current_task())
    return entry


async def acquire(key: LockKey) -> _Entry:
    """Wait until ``key`` is free and take it. Waiters get the key in the order they came.

    Returns:
        The entry to pass to :func:`release`.

    Raises:
        RuntimeError: The current task already holds ``key`` (nested session handlers on the
            same storage and key would wait for themselves forever).
    """
    task = asyncio.current_task()
    entry = _LOCKS.get(key)
    if entry is None:
        entry = _LOCKS[key] = _Entry(task)
        return entry
    if task is not None and entry.owner is task:
        raise RuntimeError(
            f"Session key {key[-1]!r} is already locked by this task: nested SessionHandlers "
            "must not use the same storage and key."
        )
    waiters = entry.waiters
    if waiters is None:
        waiters = entry.waiters = deque()
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except BaseException:
        if waiter.done() and not waiter.cancelled():
            release(key, entry)  # handed over, then cancelled: hand it on
        elif waiter in waiters:  # a release() may have dropped it already
            waiters.remove(waiter)
        raise
    entry.owner = task
    return entry


def release(key: LockKey, entry: _Entry) -> None:
    """Give ``key`` back: to the first waiter, or, with none, out of the table."""
    entry.owner = None
    waiters = entry.waiters
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)  # the waiter's acquire() sets the owner
            return
    del _LOCKS[key]
