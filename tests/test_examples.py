"""The bots in ``examples/``, driven offline with real updates through their
``build_application(builder, storage)``."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from _bot import OfflineRequest, builder, message_update, process
from telegram import Update
from test_sessionhandler import STORAGE_BACKENDS, FakeClock, Maker, Spy

from ptb_sessions import _sessionlock

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = sorted(path.stem for path in EXAMPLES.glob("*.py"))


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["memory"])  # the backends of test_sessionhandler.STORAGE_BACKENDS
async def session_storage(request: pytest.FixtureRequest) -> Any:
    async with STORAGE_BACKENDS[request.param](request) as make:
        yield make


class Chat:
    """An example bot on a real, offline Application."""

    def __init__(self, name: str, storage: Any, **kwargs: Any) -> None:
        self.request = OfflineRequest()
        self.app = load(name).build_application(builder(self.request), storage, **kwargs)

    async def send(self, *updates: Update) -> None:
        async with self.app:
            await process(self.app, *updates)

    def texts(self, chat_id: int) -> list[str]:
        return self.request.texts(chat_id)


def test_every_example_is_tested() -> None:
    assert NAMES == [
        "keysbot",
        "lazybot",
        "multibot",
        "petsbot",
        "pizzabot",
        "reminderbot",
        "timeoutbot",
    ]


async def test_pizzabot(session_storage: Maker) -> None:
    storage = session_storage("session")
    bot = Chat("pizzabot", storage)
    await bot.send(
        message_update(1, "🍕🍕"),
        message_update(-5, "a 🍕 please"),
        message_update(1, "salad"),
        message_update(1, "/hunger"),
        message_update(-5, "/hunger"),
    )
    assert bot.texts(1) == ["Your hunger level is 2!"]
    assert bot.texts(-5) == ["Your hunger level is 1!"]

    restarted = Chat("pizzabot", storage)
    await restarted.send(message_update(1, "🍕"), message_update(1, "/hunger"))
    assert restarted.texts(1) == ["Your hunger level is 3!"]


async def test_keysbot(session_storage: Maker) -> None:
    bot = Chat("keysbot", session_storage("session"))
    await bot.send(
        message_update(-10, "hi", user_id=1),
        message_update(-10, "again", user_id=1),
        message_update(-10, "me too", user_id=2),
        message_update(1, "private"),
        message_update(-10, "/me", user_id=1),
        message_update(-10, "/here", user_id=1),
        message_update(-10, "/here", user_id=2),
        message_update(1, "/here"),
    )
    assert bot.texts(-10) == [
        "You wrote 3 messages in all chats.",
        "You wrote 2 messages in this chat.",
        "You wrote 1 messages in this chat.",
    ]
    assert bot.texts(1) == ["You wrote 1 messages in this chat."]


async def test_multibot(session_storage: Maker) -> None:
    storage = session_storage("session")
    bot = Chat("multibot", storage)
    await bot.send(
        message_update(-10, "one", user_id=1),
        message_update(-10, "two", user_id=1),
        message_update(-10, "three", user_id=2),
        message_update(-10, "/lang de", user_id=1),
        message_update(-10, "/stats", user_id=1),
        message_update(-10, "/stats", user_id=2),
        message_update(-10, "/forget", user_id=1),
        message_update(-10, "/stats", user_id=1),
    )
    assert bot.texts(-10) == [
        "Language: de",
        "Nachrichten in diesem Chat: 3",
        "Messages in this chat: 3",
        "Forgot your settings.",
        "Messages in this chat: 3",
    ]
    assert await storage.read("chat:-10") == {"messages": 3}
    assert await storage.read("user:1") is None


async def test_lazybot_reads_only_for_its_commands(session_storage: Maker) -> None:
    spy = Spy(session_storage("session"))
    bot = Chat("lazybot", spy)
    await bot.send(*(message_update(-7, f"chatter {i}") for i in range(5)))
    assert spy.counts == (0, 0, 0)
    await bot.send(
        message_update(-7, "/note buy milk"),
        message_update(-7, "/note call mum"),
        message_update(-7, "/notes"),
        message_update(-7, "/clear"),
        message_update(-7, "/notes"),
    )
    assert bot.texts(-7) == [
        "Noted (1 notes).",
        "Noted (2 notes).",
        "• buy milk\n• call mum",
        "Cleared.",
        "No notes.",
    ]
    assert spy.counts == (4, 2, 1)  # /clear deletes without reading


async def test_timeoutbot(session_storage: Maker) -> None:
    clock = FakeClock()
    start = clock.now
    bot = Chat("timeoutbot", session_storage("session"), clock=clock)
    async with bot.app:
        for minute, text in [
            (0, "/add milk"),
            (10, "/add eggs"),
            (39, "/list"),  # used at minute 10: kept until minute 40; looking refreshes it
            (68, "/list"),  # used at minute 39: kept until minute 69
            (99, "/list"),  # idle for 31 minutes: expired
            (99, "/add bread"),
            (100, "/list"),
        ]:
            clock.now = start + minute * 60
            await process(bot.app, message_update(3, text))
    assert bot.texts(3) == [
        "1 items on the list.",
        "2 items on the list.",
        "milk, eggs",
        "milk, eggs",
        "The list is empty.",
        "1 items on the list.",
        "bread",
    ]


async def test_petsbot_migrates_old_sessions(session_storage: Maker) -> None:
    storage = session_storage("session")
    await storage.write("1", {"petNames": ["Rex", "Bella"]})  # stored by the old bot
    bot = Chat("petsbot", storage)
    await bot.send(
        message_update(1, "/pets"),
        message_update(1, "/birthday Rex 2020-05-01"),
        message_update(1, "/add Tom"),
        message_update(1, "/pets"),
        message_update(2, "/pets"),
    )
    assert bot.texts(1) == [
        "Rex (born unknown)\nBella (born unknown)",
        "Rex was born on 2020-05-01.",
        "You have 3 pets.",
        "Rex (born 2020-05-01)\nBella (born unknown)\nTom (born unknown)",
    ]
    assert bot.texts(2) == ["No pets yet."]


@pytest.mark.parametrize("name", NAMES)
def test_main_needs_a_token(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELEGRAM_BOT_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="TELEGRAM_BOT_TOKEN"):
        load(name).main()


@pytest.mark.parametrize("name", ["pizzabot"])
def test_runs_as_a_script(name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TELEGRAM_BOT_TOKEN"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "TELEGRAM_BOT_TOKEN" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created without a token


def teardown_module() -> None:
    assert _sessionlock.locked_keys() == 0


async def test_reminderbot_timer_survives_a_restart(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import update
    from sqlalchemy.ext.asyncio import create_async_engine

    from ptb_sessions._schema import StoredJob

    reminderbot = load("reminderbot")
    # The bot's module is imported before its jobs are restored, as when it runs as a script.
    monkeypatch.setitem(sys.modules, reminderbot.__name__, reminderbot)
    request = OfflineRequest()
    app = reminderbot.build_application(builder(request), db_url)
    async with app:
        await app.start()
        await process(app, message_update(5, "/set 30"), message_update(6, "/set 40"))
        await process(app, message_update(6, "/unset"))
        await app.stop()
    assert request.texts(5) == ["Timer successfully set!"]
    assert request.texts(6) == ["Timer successfully set!", "Timer successfully cancelled!"]

    # While the bot is down, the 30 seconds pass.
    engine = create_async_engine(db_url)
    async with engine.begin() as connection:
        await connection.execute(update(StoredJob).values(next_run_at=0.0))
    await engine.dispose()

    request = OfflineRequest()
    restarted = reminderbot.build_application(builder(request), db_url)
    async with restarted:
        await restarted.start()
        for _ in range(600):
            if request.texts(5):
                break
            await asyncio.sleep(0.05)
        await restarted.stop()
    assert request.texts(5) == ["Beep! 30.0 seconds are over!"]
    assert request.texts(6) == []
