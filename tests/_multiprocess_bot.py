"""One bot process of ``tests/test_multiprocess.py``: a real offline PTB ``Application`` whose
``SessionHandler`` increments one chat's session ``n`` for every update.

Usage: python _multiprocess_bot.py URL LOCK UPDATES CHAT_ID READY_FILE GO_FILE

It initializes the application, creates READY_FILE, waits until GO_FILE exists (so that both
processes start at the same moment), feeds UPDATES message updates of CHAT_ID through the update
queue (``concurrent_updates(8)``), and prints one JSON line: how many updates were handled, how
many ``ConflictError``s the error handler saw, the other errors (type and message), and which
other processes had already finished when it started feeding (each creates ``done-READY_FILE``
next to READY_FILE when it has finished): no clock is compared.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any, Literal, cast

sys.path.insert(0, str(Path(__file__).parent))

from _bot import builder, message_update
from telegram import Update
from telegram.ext import MessageHandler, TypeHandler, filters

from ptb_sessions import ConflictError, SessionHandler, SQLAlchemyPersistence

CONCURRENCY = 8


def barrier(ready: Path, go: Path) -> None:
    """Say this process is ready, then wait until the test says go (blocking: the application
    is initialized but not started, nothing else runs)."""
    ready.touch()
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{go} did not appear")
        time.sleep(0.001)


async def main(
    url: str,
    lock: Literal["process", "database"],
    updates: int,
    chat_id: int,
    ready: Path,
    go: Path,
) -> None:
    conflicts = 0
    other_errors: list[str] = []
    handled = 0
    done = asyncio.Event()

    async def increment(update: Update, context: Any) -> None:
        n = context.session["n"]
        # between the read (before the handler) and the write (after it): let the other
        # process (and the other updates of this one) run
        await asyncio.sleep(random.uniform(0, 0.002))
        context.session["n"] = n + 1

    async def count(update: object, context: Any) -> None:
        nonlocal handled
        handled += 1
        if handled == updates:
            done.set()

    async def on_error(update: object, context: Any) -> None:
        nonlocal conflicts
        if isinstance(context.error, ConflictError):
            conflicts += 1
        else:
            other_errors.append(f"{type(context.error).__name__}: {context.error}")

    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url)
    app = builder().concurrent_updates(CONCURRENCY).build()
    app.add_handler(
        SessionHandler(
            [MessageHandler(filters.TEXT, increment)],
            storage=persistence,
            initial=lambda: {"n": 0},
            lock=lock,
        )
    )
    app.add_handler(TypeHandler(Update, count), group=1)  # runs after the session was saved
    app.add_error_handler(on_error)
    batch = [message_update(chat_id, bot=app.bot) for _ in range(updates)]
    try:
        async with app:
            barrier(ready, go)
            await app.start()
            done_before = sorted(p.name for p in ready.parent.glob("done-*"))
            for update in batch:
                app.update_queue.put_nowait(update)
            await asyncio.wait_for(done.wait(), 120)
            (ready.parent / f"done-{ready.name}").touch()
            await app.stop()
    finally:
        await persistence.flush()
    result = {
        "handled": handled,
        "conflicts": conflicts,
        "other_errors": other_errors,
        "done_before_start": done_before,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    url_, lock_, updates_, chat_, ready_, go_ = sys.argv[1:]
    lock = cast(Literal["process", "database"], lock_)
    asyncio.run(main(url_, lock, int(updates_), int(chat_), Path(ready_), Path(go_)))
