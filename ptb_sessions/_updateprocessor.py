"""An update processor that runs updates of different chats concurrently and updates of the
same chat one at a time, in arrival order."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from telegram import Update
from telegram.ext import BaseUpdateProcessor

__all__ = ["SequentialUpdateProcessor"]

_LOGGER = logging.getLogger(__name__)

# The limit handed to PTB's own semaphore: large enough never to be reached, so that updates
# waiting for their key never hold a slot (see SequentialUpdateProcessor.__init__).
_UNLIMITED = sys.maxsize


def _chat_or_user(update: object) -> Hashable | None:
    """The default key: ``effective_chat.id`` of an :class:`telegram.Update`, else
    ``effective_user.id``, else :obj:`None` (no ordering, e.g. a poll update)."""
    if not isinstance(update, Update):
        return None
    if (chat := update.effective_chat) is not None:
        return chat.id
    if (user := update.effective_user) is not None:
        return user.id
    return None


def _close(coroutine: Awaitable[Any]) -> None:
    """Closes a coroutine that will never be awaited, avoiding the "never awaited" warning."""
    if inspect.iscoroutine(coroutine):
        coroutine.close()


class SequentialUpdateProcessor(BaseUpdateProcessor):
    """A :class:`telegram.ext.BaseUpdateProcessor` that keeps the updates of one chat in order
    while different chats run concurrently. Pass it to
    :meth:`telegram.ext.ApplicationBuilder.concurrent_updates`:

    .. code:: python

        app = ApplicationBuilder().token(TOKEN).concurrent_updates(
            SequentialUpdateProcessor(256)
        ).build()

    Updates with the same :paramref:`key` are processed one at a time, in the order in which
    :class:`~telegram.ext.Application` took them from its
    :attr:`~telegram.ext.Application.update_queue`; updates with different keys (or with the key
    :obj:`None`) run concurrently, at most :paramref:`max_concurrent_updates` at once. Read-modify-
    write of ``context.chat_data`` across an ``await`` therefore never loses a write, as long as
    all writers of a chat share its key.

    An update waiting for its key does not take one of the
    :paramref:`max_concurrent_updates` slots, so one slow chat never holds back the others (no
    head-of-line blocking). A key leaves no state behind once its last update is done, whether
    it finished, raised or was cancelled.

    Caution:
        Only updates that go through the :attr:`~telegram.ext.Application.update_queue` (polling,
        :meth:`~telegram.ext.Updater.start_webhook`, or your own ``update_queue.put``) pass
        through the processor. Calling :meth:`telegram.ext.Application.process_update` directly,
        as some webhook glue code does, bypasses it; jobs of the
        :class:`~telegram.ext.JobQueue` and ``block=False`` handlers are not ordered either.

    Args:
        max_concurrent_updates (:obj:`int`, optional): The maximum number of updates processed
            at once. Defaults to ``256``.
        key (Callable[[:obj:`object`], :class:`~collections.abc.Hashable` | :obj:`None`], \
optional): Maps an update to its ordering key; updates with equal keys are processed
            sequentially. :obj:`None` means no ordering constraint. Called once per update, in
            arrival order; it must not block. Defaults to the ``effective_chat.id`` of a
            :class:`telegram.Update`, else its ``effective_user.id``, else :obj:`None`.

    Raises:
        :exc:`ValueError`: If :paramref:`max_concurrent_updates` is not a positive integer.
    """

    __slots__ = ("_accepted", "_key", "_keys", "_limit", "_running", "_slots")

    def __init__(
        self,
        max_concurrent_updates: int = 256,
        key: Callable[[object], Hashable | None] = _chat_or_user,
    ) -> None:
        if max_concurrent_updates < 1:
            raise ValueError("`max_concurrent_updates` must be a positive integer!")
        # PTB's process_update() is @final and holds PTB's semaphore around do_process_update(),
        # also while an update waits for its key. Make that semaphore unlimited and enforce the
        # real limit with self._slots, taken only once the key is ours. self._limit is unlimited
        # during super().__init__() in case it sizes its semaphore from the property.
        self._limit = _UNLIMITED
        super().__init__(_UNLIMITED)
        self._limit = max_concurrent_updates
        self._key = key
        self._slots = asyncio.Semaphore(max_concurrent_updates)
        # key -> the updates waiting for it, in arrival order. A key is present while one of its
        # updates holds it; the holder itself is not in the deque.
        self._keys: dict[Hashable, deque[asyncio.Future[None]]] = {}
        self._accepted = 0  # updates inside do_process_update()
        self._running = 0  # of these, those holding a slot

    @property
    def max_concurrent_updates(self) -> int:
        """:obj:`int`: The maximum number of updates processed at once, as passed to the
        constructor."""
        return self._limit

    @property
    def current_concurrent_updates(self) -> int:
        """:obj:`int`: The number of updates being processed right now, i.e. holding one of the
        :attr:`max_concurrent_updates` slots. A snapshot; it may change right after reading."""
        return self._running

    @property
    def pending_updates(self) -> int:
        """:obj:`int`: The number of updates received but not yet processing: waiting for an
        earlier update with the same key, or for a free slot. A snapshot."""
        return self._accepted - self._running

    @property
    def active_keys(self) -> int:
        """:obj:`int`: The number of keys with an update in progress or waiting. ``0`` whenever
        the processor is idle. A snapshot."""
        return len(self._keys)

    async def initialize(self) -> None:
        """Called by :meth:`telegram.ext.Application.initialize`. Binds the slot semaphore
        afresh if the processor is idle, so one instance can serve applications on successive
        event loops (e.g. one per test)."""
        if self._accepted == 0:
            self._slots = asyncio.Semaphore(self._limit)

    async def shutdown(self) -> None:
        """Called by :meth:`telegram.ext.Application.shutdown`. Holds no resources; logs a
        warning if updates are still in progress, since those will not be waited for."""
        if self._accepted:
            _LOGGER.warning(
                "SequentialUpdateProcessor shut down with %d update(s) still in progress",
                self._accepted,
            )

    async def do_process_update(self, update: object, coroutine: Awaitable[Any]) -> None:
        """Awaits :paramref:`coroutine` once every earlier update with the same key is done and
        a slot is free. Called by :meth:`~telegram.ext.BaseUpdateProcessor.process_update`, once
        per update, in arrival order; the update's place in its key's queue is fixed before the
        first ``await``.

        If the key function raises, the update is not processed and the exception propagates
        (the :class:`~telegram.ext.Application` passes it to its error handlers). If the call is
        cancelled before :paramref:`coroutine` started, the coroutine is closed unawaited.

        Args:
            update (:obj:`object`): The update to process.
            coroutine (:term:`Awaitable`): Processes the update; awaited exactly once.
        """
        try:
            key = self._key(update)
        except BaseException:
            _close(coroutine)
            raise
        self._accepted += 1
        try:
            if key is None:
                await self._run(coroutine)
                return
            try:
                await self._acquire(key)
            except BaseException:  # cancelled while waiting for the key
                _close(coroutine)
                raise
            try:
                await self._run(coroutine)
            finally:
                self._release(key)
        finally:
            self._accepted -= 1

    async def _run(self, coroutine: Awaitable[Any]) -> None:
        try:
            await self._slots.acquire()
        except BaseException:  # cancelled while waiting for a slot
            _close(coroutine)
            raise
        self._running += 1
        try:
            await coroutine
        finally:
            self._running -= 1
            self._slots.release()

    async def _acquire(self, key: Hashable) -> None:
        """Returns once ``key`` is held by the caller. The queue position is taken before the
        first ``await``, so keys are handed over in the order of the calls."""
        waiters = self._keys.get(key)
        if waiters is None:
            self._keys[key] = deque()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Cancelled right after the key was handed to us: pass it on.
                self._release(key)
            else:
                # Still queued (a release may have dropped it already, or even the key).
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
            raise

    def _release(self, key: Hashable) -> None:
        """Hands ``key`` to its next waiter, or forgets the key if nobody waits."""
        waiters = self._keys[key]
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        del self._keys[key]
