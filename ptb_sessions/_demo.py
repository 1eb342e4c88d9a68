"""``ptb-sessions demo``: grammY's pizza-counter bot on a :class:`~ptb_sessions.SessionHandler`,
run offline on simulated updates (or for real with a token).

The offline run is a real PTB :class:`~telegram.ext.Application` whose Bot API calls are
answered in-process by :class:`OfflineRequest`, so it needs no token and no network. The
simulated updates depend only on the number of chats and updates, so two identical runs add
the same counts: the second run's total is twice the first's.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypedDict

from sqlalchemy.engine import URL
from telegram import Bot, Update
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)
from telegram.request import BaseRequest, RequestData

from ptb_sessions._cli_common import DEFAULT_TIMEOUT, Deadline, progress_bar
from ptb_sessions._codec import JSONCodec
from ptb_sessions._sessioncontext import SessionContext
from ptb_sessions._sessionhandler import SessionHandler
from ptb_sessions._sqlalchemypersistence import SQLAlchemyPersistence
from ptb_sessions._store import Database

__all__ = [
    "DEMO_NAMESPACE",
    "DemoResult",
    "OfflineRequest",
    "bot_username",
    "count_pizzas",
    "pizza_handler",
    "run_offline",
    "run_polling",
    "simulated_updates",
]

#: The namespace of the pizza counters (the default of ``SessionHandler`` on a persistence).
DEMO_NAMESPACE: Final = "session"
PIZZA: Final = "\N{SLICE OF PIZZA}"
_TOKEN: Final = "123456:ptb-sessions-offline-demo"
_BOT_USER: Final = {"id": 123456, "is_bot": True, "first_name": "Pizza", "username": "pizza_bot"}
_TEXTS: Final = (
    PIZZA,
    f"{PIZZA} please",
    "hello",
    f"I could eat a {PIZZA}",
    "/hunger",
    "no pizza today",
    f"{PIZZA}{PIZZA} party",
    "what's for dinner?",
)


class PizzaSession(TypedDict):
    """The session of one chat."""

    pizza_count: int


PizzaContext = SessionContext[PizzaSession]


async def _count(update: Update, context: PizzaContext) -> None:
    context.session["pizza_count"] += 1


async def _hunger(update: Update, context: PizzaContext) -> None:
    if update.effective_message is not None:
        count = context.session["pizza_count"]
        await update.effective_message.reply_text(f"Your hunger level is {count}!")


def pizza_handler(persistence: SQLAlchemyPersistence[Any, Any, Any]) -> SessionHandler[Any]:
    """The bot of grammY's session docs: every message with a 🍕 counts one pizza for its
    chat, ``/hunger`` answers the count. The counters live in ``persistence``'s database."""
    return SessionHandler(
        [
            CommandHandler("hunger", _hunger),
            MessageHandler(filters.TEXT & filters.Regex(PIZZA), _count),
        ],
        initial=lambda: {"pizza_count": 0},
        storage=persistence,
    )


class OfflineRequest(BaseRequest):
    """A :class:`~telegram.request.BaseRequest` that answers every Bot API call in-process:
    ``getMe`` returns a made-up bot, ``sendMessage`` the message it would have sent."""

    __slots__ = ("_message_id", "sent")

    def __init__(self) -> None:
        self.sent = 0
        self._message_id = 0

    @property
    def read_timeout(self) -> float | None:
        return None

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def do_request(
        self,
        url: str,
        method: str,
        request_data: RequestData | None = None,
        read_timeout: Any = None,
        write_timeout: Any = None,
        connect_timeout: Any = None,
        pool_timeout: Any = None,
    ) -> tuple[int, bytes]:
        api_method = url.rsplit("/", 1)[-1]
        params = request_data.parameters if request_data is not None else {}
        result: Any = True
        if api_method == "getMe":
            result = _BOT_USER
        elif api_method == "sendMessage":
            self.sent += 1
            self._message_id += 1
            chat_id = int(str(params.get("chat_id", 0)))
            result = {
                "message_id": self._message_id,
                "date": int(time.time()),
                "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
                "from": _BOT_USER,
                "text": params.get("text", ""),
            }
        elif api_method == "getUpdates":
            result = []
        return 200, json.dumps({"ok": True, "result": result}).encode()


def chat_ids(chats: int) -> list[int]:
    """The simulated chats: every third a group, the others private chats."""
    return [-1001000000000 - index if index % 3 == 2 else 1000 + index for index in range(chats)]


def simulated_updates(chats: int, updates: int) -> Iterator[dict[str, Any]]:
    """``updates`` message updates spread over ``chats`` chats, as Bot API JSON. The same
    arguments always give the same texts in the same chats."""
    rng = random.Random(f"ptb-sessions demo {chats} {updates}")
    ids = chat_ids(chats)
    now = int(time.time())
    for number in range(1, updates + 1):
        chat_id = ids[rng.randrange(chats)]
        user_id = chat_id if chat_id > 0 else 1000 + rng.randrange(max(chats, 1))
        text = rng.choice(_TEXTS)
        message: dict[str, Any] = {
            "message_id": number,
            "date": now,
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
            "from": {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"},
            "text": text,
        }
        if text.startswith("/"):
            message["entities"] = [{"type": "bot_command", "offset": 0, "length": len(text)}]
        yield {"update_id": number, "message": message}


async def count_pizzas(url: URL, timeout: float = DEFAULT_TIMEOUT) -> dict[str, int]:
    """The pizza count of every chat stored in the database at ``url``."""
    database = Database(url, timeout=timeout)
    codec = JSONCodec()
    counts: dict[str, int] = {}
    try:
        async for key, record in database.scan(DEMO_NAMESPACE):
            if record.codec != codec.name or record.data is None:
                continue
            value = codec.decode(record.data)
            if isinstance(value, dict) and isinstance(value.get("pizza_count"), int):
                counts[key] = value["pizza_count"]
    finally:
        await database.dispose()
    return counts


@dataclass
class DemoResult:
    """What an offline demo run did."""

    updates: int
    seconds: float
    replies: int
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)


def _application(
    persistence: SQLAlchemyPersistence[Any, Any, Any],
    builder: ApplicationBuilder[Any, Any, Any, Any, Any, Any],
) -> Application[Any, Any, Any, Any, Any, Any]:
    application = (
        builder.persistence(persistence)
        .context_types(ContextTypes(context=SessionContext))
        .build()
    )
    application.add_handler(pizza_handler(persistence))
    return application


async def run_offline(url: URL, *, chats: int, updates: int, deadline: Deadline) -> DemoResult:
    """Run the pizza bot offline on :func:`simulated_updates`, storing the counters at
    ``url`` (the schema is created if needed); ``deadline`` bounds each database call."""
    before = await deadline(count_pizzas(url, deadline.seconds), "Reading the counters")
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        url, timeout=deadline.seconds
    )
    request = OfflineRequest()
    builder = ApplicationBuilder().token(_TOKEN).request(request).get_updates_request(request)
    application = _application(persistence, builder.updater(None))
    with progress_bar() as bar:
        task = bar.add_task("Feeding updates", total=updates)
        await deadline(application.initialize(), "Loading the stored data")
        try:
            started = time.perf_counter()
            for data in simulated_updates(chats, updates):
                update = Update.de_json(data, application.bot)
                await deadline(application.process_update(update), "Processing an update")
                bar.advance(task)
            seconds = time.perf_counter() - started
        finally:
            # shutdown() flushes the persistence
            await deadline(application.shutdown(), "Writing the counters")
    after = await deadline(count_pizzas(url, deadline.seconds), "Reading the counters")
    return DemoResult(updates, seconds, request.sent, before, after)


def run_polling(token: str, url: URL) -> None:
    """Run the pizza bot for real, with long polling, until interrupted (Ctrl+C)."""
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url)
    application = _application(persistence, ApplicationBuilder().token(token))
    application.run_polling(allowed_updates=Update.ALL_TYPES)


async def bot_username(token: str) -> str:
    """The username of the bot of ``token``: checks the token before polling starts.

    Raises:
        telegram.error.InvalidToken: Telegram rejected the token.
        telegram.error.NetworkError: Telegram cannot be reached.
    """
    async with Bot(token) as bot:
        return bot.username


def file_size(path: Path) -> int:
    """The size of an SQLite database file and its write-ahead log."""
    return sum(
        candidate.stat().st_size for candidate in (path, Path(f"{path}-wal")) if candidate.exists()
    )
