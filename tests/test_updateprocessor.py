"""SequentialUpdateProcessor: order within a key, concurrency across keys, no head-of-line
blocking, the concurrency limit, and no state left behind by idle keys.

Updates go through ``app.update_queue`` of a started real ``Application`` (``app.process_update``
would bypass the processor); ``update_queue.join()`` returns once every update is fully handled.
Timeouts only guard against hangs; no assertion depends on wall-clock time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Hashable, Iterable
from typing import Any

import pytest
from _bot import builder, inline_query_update, message_update
from telegram import Update
from telegram.ext import Application, BaseUpdateProcessor, SimpleUpdateProcessor, TypeHandler

from ptb_sessions._updateprocessor import SequentialUpdateProcessor, _chat_or_user

GUARD = 60  # seconds; only against hangs


def make_app(processor: BaseUpdateProcessor) -> Application:  # type: ignore[type-arg]
    return builder().concurrent_updates(processor).build()


@contextlib.asynccontextmanager
async def started(app: Application) -> AsyncIterator[Application]:  # type: ignore[type-arg]
    async with app:
        await app.start()
        try:
            yield app
        finally:
            # bounded, so that a broken processor fails the test instead of hanging it
            await asyncio.wait_for(app.stop(), GUARD)


async def feed(app: Application, updates: Iterable[object]) -> None:  # type: ignore[type-arg]
    """Put ``updates`` into the update queue in order and wait until all are handled."""
    for update in updates:
        await app.update_queue.put(update)
    await asyncio.wait_for(app.update_queue.join(), GUARD)


def seq(update: Update) -> int:
    assert update.message is not None
    return int(update.message.text or "")


class Counter:
    """A read-modify-write handler on ``chat_data['n']`` that yields in between, and records
    which sequence numbers each chat saw."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.seen: dict[int, list[int]] = defaultdict(list)

    async def __call__(self, update: Update, context: Any) -> None:
        assert update.effective_chat is not None
        n = context.chat_data.get("n", 0)
        for _ in range(self.rng.randrange(4)):
            await asyncio.sleep(0)
        context.chat_data["n"] = n + 1
        self.seen[update.effective_chat.id].append(seq(update))


def chat_updates(chats: int, per_chat: int) -> list[Update]:
    """``chats * per_chat`` messages, chats interleaved; the text is the arrival index."""
    return [message_update(1000 + i % chats, str(i)) for i in range(chats * per_chat)]


async def test_counters_exact_and_in_arrival_order() -> None:
    processor = SequentialUpdateProcessor(64)
    app = make_app(processor)
    counter = Counter()
    app.add_handler(TypeHandler(Update, counter))
    updates = chat_updates(50, 100)
    async with started(app):
        await feed(app, updates)

    assert len(app.chat_data) == 50
    assert all(data["n"] == 100 for data in app.chat_data.values())
    for chat_id, seen in counter.seen.items():
        assert seen == [i for i in range(5000) if 1000 + i % 50 == chat_id]
    assert processor.active_keys == 0
    assert processor.pending_updates == 0


async def test_simple_processor_loses_increments() -> None:
    """The same handler under PTB's SimpleUpdateProcessor: the counting test can fail."""
    app = make_app(SimpleUpdateProcessor(64))
    app.add_handler(TypeHandler(Update, Counter()))
    async with started(app):
        await feed(app, chat_updates(5, 20))

    assert sum(data["n"] for data in app.chat_data.values()) < 100


async def test_no_head_of_line_blocking() -> None:
    processor = SequentialUpdateProcessor(2)
    app = make_app(processor)
    release_a = asyncio.Event()
    b_done = asyncio.Event()
    a_started: list[int] = []
    a_finished: list[int] = []

    async def handler(update: Update, context: Any) -> None:
        assert update.effective_chat is not None
        if update.effective_chat.id == 1:
            a_started.append(seq(update))
            await release_a.wait()
            a_finished.append(seq(update))
        else:
            b_done.set()

    app.add_handler(TypeHandler(Update, handler))
    async with started(app):
        for i in range(5):
            await app.update_queue.put(message_update(1, str(i)))
        await app.update_queue.put(message_update(2, "5"))
        await asyncio.wait_for(b_done.wait(), GUARD)

        # B finished while A is still blocked, and only one A update ever started.
        assert not release_a.is_set()
        assert a_started == [0]
        assert a_finished == []
        assert processor.current_concurrent_updates == 1
        assert processor.pending_updates == 4
        assert processor.active_keys == 1

        release_a.set()
        await asyncio.wait_for(app.update_queue.join(), GUARD)

    assert a_started == a_finished == [0, 1, 2, 3, 4]
    assert processor.active_keys == 0


@pytest.mark.parametrize("limit", [1, 3, 8])
async def test_concurrency_limit_holds(limit: int) -> None:
    processor = SequentialUpdateProcessor(limit)
    app = make_app(processor)
    running = 0
    max_running = 0
    full = asyncio.Event()

    async def handler(update: object, context: Any) -> None:
        nonlocal running, max_running
        running += 1
        max_running = max(max_running, running)
        assert processor.current_concurrent_updates == running
        if running >= limit:
            full.set()
        # Hold the slot until the limit was reached once, so that exceeding it would show.
        await full.wait()
        for _ in range(3):
            await asyncio.sleep(0)
        running -= 1

    app.add_handler(TypeHandler(object, handler))
    # distinct chats, repeated chats, and keyless objects
    updates: list[object] = [message_update(i, str(i)) for i in range(1, 41)]
    updates += [message_update(7, str(i)) for i in range(41, 51)]
    updates += [f"keyless {i}" for i in range(20)]
    async with started(app):
        await feed(app, updates)

    assert max_running == limit
    assert processor.max_concurrent_updates == limit
    assert app.concurrent_updates == limit
    assert processor.pending_updates == 0


async def test_idle_keys_leave_no_state() -> None:
    processor = SequentialUpdateProcessor(64)
    app = make_app(processor)
    handled = 0

    async def handler(update: Update, context: Any) -> None:
        nonlocal handled
        await asyncio.sleep(0)
        handled += 1

    app.add_handler(TypeHandler(Update, handler))
    async with started(app):
        await feed(app, [message_update(i, str(i)) for i in range(1, 10_001)])
        assert processor._keys == {}
        # repeated keys, so that keys are also queued on and handed over
        await feed(app, [message_update(1 + i % 500, str(i)) for i in range(2000)])

    assert handled == 12_000
    assert processor._keys == {}
    assert processor.active_keys == 0
    assert processor.pending_updates == 0
    assert processor.current_concurrent_updates == 0


async def test_raising_handler_keeps_order_and_leaves_no_state() -> None:
    processor = SequentialUpdateProcessor(4)
    app = make_app(processor)
    seen: dict[int, list[int]] = defaultdict(list)
    errors: list[BaseException] = []

    async def handler(update: Update, context: Any) -> None:
        assert update.effective_chat is not None
        seen[update.effective_chat.id].append(seq(update))
        await asyncio.sleep(0)
        if seq(update) % 3 == 0:
            raise RuntimeError(f"boom {seq(update)}")

    async def on_error(update: object, context: Any) -> None:
        errors.append(context.error)

    app.add_handler(TypeHandler(Update, handler))
    app.add_error_handler(on_error)
    async with started(app):
        await feed(app, chat_updates(5, 12))

    assert len(errors) == 20
    for chat_id, got in seen.items():
        assert got == [i for i in range(60) if 1000 + i % 5 == chat_id]
    assert processor._keys == {}
    assert processor.pending_updates == 0


async def test_updates_without_key_still_run() -> None:
    def by_chat_only(update: object) -> Hashable | None:
        if isinstance(update, Update) and update.effective_chat is not None:
            return update.effective_chat.id
        return None

    processor = SequentialUpdateProcessor(8, key=by_chat_only)
    app = make_app(processor)
    got: list[object] = []

    async def handler(update: object, context: Any) -> None:
        await asyncio.sleep(0)
        got.append(update)

    app.add_handler(TypeHandler(object, handler))
    updates: list[object] = [inline_query_update(i) for i in range(1, 21)]
    updates += ["a plain object", 42]
    async with started(app):
        await feed(app, updates)

    assert len(got) == 22
    assert set(map(id, got)) == set(map(id, updates))
    assert processor._keys == {}


def test_default_key() -> None:
    assert _chat_or_user(message_update(-100123, user_id=5)) == -100123
    assert _chat_or_user(inline_query_update(77)) == 77
    assert _chat_or_user(Update(1)) is None
    assert _chat_or_user("not an update") is None


async def test_same_user_inline_queries_are_sequential() -> None:
    """With the default key an inline query (no chat) is keyed by its user."""
    processor = SequentialUpdateProcessor(16)
    app = make_app(processor)
    running: dict[int, int] = defaultdict(int)
    overlap = 0
    order: dict[int, list[str]] = defaultdict(list)

    async def handler(update: Update, context: Any) -> None:
        nonlocal overlap
        assert update.inline_query is not None
        user = update.inline_query.from_user.id
        running[user] += 1
        overlap = max(overlap, running[user])
        for _ in range(3):
            await asyncio.sleep(0)
        order[user].append(update.inline_query.query)
        running[user] -= 1

    app.add_handler(TypeHandler(Update, handler))
    updates = [inline_query_update(1 + i % 4, str(i)) for i in range(40)]
    async with started(app):
        await feed(app, updates)

    assert overlap == 1
    for user, queries in order.items():
        assert queries == [str(i) for i in range(40) if 1 + i % 4 == user]


def test_invalid_limit() -> None:
    with pytest.raises(ValueError, match="positive"):
        SequentialUpdateProcessor(0)


async def test_initialize_shutdown_and_context_manager() -> None:
    processor = SequentialUpdateProcessor(3)
    async with processor as entered:
        assert entered is processor
        done: list[int] = []

        async def job(i: int) -> None:
            done.append(i)

        await processor.process_update(message_update(1), job(1))
        assert done == [1]
    assert processor.max_concurrent_updates == 3
    assert processor.current_concurrent_updates == 0


async def test_key_function_error_propagates_without_leak() -> None:
    def bad_key(update: object) -> Hashable | None:
        raise LookupError("no key")

    processor = SequentialUpdateProcessor(2, key=bad_key)
    ran: list[int] = []

    async def job() -> None:
        ran.append(1)

    with pytest.raises(LookupError):
        await processor.process_update("u", job())
    assert ran == []
    assert processor.pending_updates == 0
    assert processor.active_keys == 0


async def test_cancellation_hands_key_on() -> None:
    """Cancelled waiters leave the queue; a waiter cancelled right after the key was handed to it
    passes the key on; the holder being cancelled releases it. Order is kept throughout."""
    processor = SequentialUpdateProcessor(8, key=lambda u: "k")
    gate = asyncio.Event()
    order: list[int] = []

    async def work(i: int) -> None:
        if i == 0:
            await gate.wait()
        order.append(i)

    def start(i: int) -> asyncio.Task[None]:
        return asyncio.create_task(processor.process_update(i, work(i)))

    tasks = [start(i) for i in range(6)]
    await asyncio.sleep(0)
    waiters = processor._keys["k"]
    assert len(waiters) == 5

    # 1. a queued waiter is cancelled: it leaves the queue
    tasks[2].cancel()
    await asyncio.sleep(0)
    assert len(waiters) == 4
    handed = waiters[0]

    # 2. the key is handed to task 1, which is cancelled before it resumes: it passes it on
    gate.set()
    while not handed.done():  # noqa: ASYNC110 - stepping the loop on purpose
        await asyncio.sleep(0)
    assert not tasks[1].done()
    tasks[1].cancel()

    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), GUARD)
    assert order == [0, 3, 4, 5]
    assert tasks[1].cancelled() and tasks[2].cancelled()
    assert processor._keys == {}

    # 3. the holder itself is cancelled: the next one runs
    gate.clear()
    order.clear()
    tasks = [start(i) for i in range(3)]
    await asyncio.sleep(0)
    assert len(processor._keys["k"]) == 2
    tasks[0].cancel()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), GUARD)
    assert order == [1, 2]
    assert processor._keys == {}
    assert processor.pending_updates == 0
