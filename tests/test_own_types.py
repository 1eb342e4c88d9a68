"""Your own types, end to end: a real Application with an SQLAlchemyPersistence, stopped and
built again on the same database, on every backend.

The four things users hit (a custom ContextTypes class, a dataclass in arbitrary callback data,
an IntEnum of conversation states, a Message kept in chat_data), faithful equivalents of PTB's
contexttypesbot, arbitrarycallbackdatabot and persistentconversationbot examples, stored names
that must never run anything, and generated values with registered classes in every backend.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine
from enum import IntEnum
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import pytest
from _bot import BOT_USER, OfflineRequest, builder
from _ptb_examples import load_example
from _values import OWN_TYPES, own_values, same
from hypothesis import HealthCheck, given, settings
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.ext import (
    Application,
    CallbackContext,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    ExtBot,
    MessageHandler,
    filters,
)

from ptb_sessions import (
    Codec,
    JSONCodec,
    PickleCodec,
    SerializationError,
    SQLAlchemyPersistence,
    StorageError,
)
from ptb_sessions._schema import StoredRow

TABLE = StoredRow.__table__
_ids = itertools.count(1)

# -- real updates, as the Bot API sends them ----------------------------------------------------


def _user(user_id: int) -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": f"user{user_id}"}


def _chat(chat_id: int) -> dict[str, Any]:
    return {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"}


def text_update(app: Application, chat_id: int, text: str, user_id: int | None = None) -> Update:  # type: ignore[type-arg]
    """A message update in ``chat_id`` (a command if ``text`` starts with ``/``)."""
    message: dict[str, Any] = {
        "message_id": next(_ids),
        "date": int(time.time()),
        "chat": _chat(chat_id),
        "from": _user(user_id or abs(chat_id)),
        "text": text,
    }
    if text.startswith("/"):
        length = len(text.split()[0])
        message["entities"] = [{"type": "bot_command", "offset": 0, "length": length}]
    return cast(Update, Update.de_json({"update_id": next(_ids), "message": message}, app.bot))


def click_update(
    app: Application,  # type: ignore[type-arg]
    request: OfflineRequest,
    chat_id: int,
    button: tuple[int, int] = (0, 0),
    user_id: int | None = None,
) -> Update:
    """A click on ``button`` (row, column) of the keyboard the bot sent or edited last into
    ``chat_id``, with the callback data the bot sent."""
    _, params = next(
        (m, p)
        for m, p in reversed(request.calls)
        if m in ("sendMessage", "editMessageText") and int(p["chat_id"]) == chat_id
    )
    markup = params["reply_markup"]
    row, column = button
    message = {
        "message_id": sent_message_id(request, chat_id),
        "date": int(time.time()),
        "chat": _chat(chat_id),
        "from": BOT_USER,
        "text": params["text"],
        "reply_markup": markup,
    }
    query = {
        "id": str(next(_ids)),
        "from": _user(user_id or abs(chat_id)),
        "chat_instance": "instance",
        "data": markup["inline_keyboard"][row][column]["callback_data"],
        "message": message,
    }
    return cast(
        Update, Update.de_json({"update_id": next(_ids), "callback_query": query}, app.bot)
    )


def sent_message_id(request: OfflineRequest, chat_id: int) -> int:
    """The id of the last message the bot sent into ``chat_id`` (as the offline API numbers
    them: one after the other, from 1)."""
    sent = [p for m, p in request.calls if m == "sendMessage"]
    last = max(index for index, p in enumerate(sent) if int(p["chat_id"]) == chat_id)
    return last + 1


async def feed(app: Application, *updates: Update) -> None:  # type: ignore[type-arg]
    """Process ``updates`` as ``run_polling`` would: callback data resolved first."""
    for item in updates:
        if isinstance(app.bot, ExtBot):
            app.bot.insert_callback_data(item)
        await app.process_update(item)


def errors_of(app: Application) -> list[BaseException]:  # type: ignore[type-arg]
    errors: list[BaseException] = []

    async def on_error(update: object, context: CallbackContext[Any, Any, Any, Any]) -> None:
        assert context.error is not None
        errors.append(context.error)

    app.add_error_handler(on_error)
    return errors


async def until(condition: Callable[[], bool], deadline: float = 30) -> None:
    """Wait until ``condition()`` holds, failing after a generous ``deadline`` (seconds)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.01)


async def stored_rows(url: str, namespace: str) -> dict[str, str | None]:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            query = select(TABLE.c.key, TABLE.c.data).where(TABLE.c.namespace == namespace)
            return {key: data for key, data in await conn.execute(query)}
    finally:
        await engine.dispose()


async def overwrite_row(url: str, namespace: str, key: str, data: str) -> None:
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                update(TABLE)
                .where(TABLE.c.namespace == namespace, TABLE.c.key == key)
                .values(data=data)
            )
    finally:
        await engine.dispose()


# -- 1. a custom ContextTypes class, with no extra argument --------------------------------------


class ChatData(dict[str, Any]):
    """chat_data with a method."""

    def clicks(self) -> int:
        return int(self.get("clicks", 0))


class UserData(dict[str, Any]):
    """user_data with an attribute outside its items."""

    def __init__(self) -> None:
        super().__init__()
        self.visits = 0


class BotData(dict[str, Any]):
    def users(self) -> set[int]:
        return cast(set[int], self.setdefault("users", set()))


OWN_CONTEXT = ContextTypes(chat_data=ChatData, user_data=UserData, bot_data=BotData)


def context_types_app(url: str) -> Application:  # type: ignore[type-arg]
    app = builder().context_types(OWN_CONTEXT).persistence(SQLAlchemyPersistence(url)).build()

    async def count(update: Update, context: Any) -> None:
        context.chat_data["clicks"] = context.chat_data.clicks() + 1
        context.user_data.visits += 1
        context.bot_data.users().add(update.effective_user.id)  # type: ignore[union-attr]

    app.add_handler(MessageHandler(filters.ALL, count))
    return app


async def test_context_types_classes_are_stored_with_no_extra_argument(db_url: str) -> None:
    app = context_types_app(db_url)
    errors = errors_of(app)
    async with app:
        await feed(app, *(text_update(app, chat, "hi") for chat in (5, 5, 6)))
    assert errors == []

    app2 = context_types_app(db_url)
    async with app2:
        assert type(app2.chat_data[5]) is ChatData and app2.chat_data[5].clicks() == 2
        assert type(app2.user_data[5]) is UserData and app2.user_data[5].visits == 2
        assert type(app2.bot_data) is BotData and app2.bot_data.users() == {5, 6}
        await feed(app2, text_update(app2, 6, "again"))
    app3 = context_types_app(db_url)
    async with app3:
        assert {chat: data.clicks() for chat, data in app3.chat_data.items()} == {5: 2, 6: 2}
        assert {user: data.visits for user, data in app3.user_data.items()} == {5: 2, 6: 2}
        assert app3.bot_data == {"users": {5, 6}}


# -- 2. a dataclass in arbitrary callback data ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Choice:
    item: int
    label: str = "x"


def callback_app(url: str, request: OfflineRequest, picked: list[Any]) -> Application:  # type: ignore[type-arg]
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        url, codec=JSONCodec(types=[Choice])
    )
    app = builder(request).persistence(persistence).arbitrary_callback_data(True).build()

    async def start(update: Update, context: Any) -> None:
        buttons = [InlineKeyboardButton(str(n), callback_data=Choice(item=n)) for n in (3, 4)]
        await update.effective_message.reply_text(
            "pick", reply_markup=InlineKeyboardMarkup([buttons])
        )  # type: ignore[union-attr]

    async def pick(update: Update, context: Any) -> None:
        picked.append(update.callback_query.data)  # type: ignore[union-attr]

    app.add_handler(CommandHandler("start", start))
    app.add_handler(CallbackQueryHandler(pick))
    return app


async def test_a_dataclass_in_callback_data_survives_a_restart(db_url: str) -> None:
    request = OfflineRequest()
    picked: list[Any] = []
    app = callback_app(db_url, request, picked)
    errors = errors_of(app)
    async with app:
        await feed(app, text_update(app, 7, "/start"))
    assert errors == []

    app2 = callback_app(db_url, request, picked)
    async with app2:
        await feed(app2, click_update(app2, request, 7, (0, 1)))
    assert picked == [Choice(item=4)]
    assert type(picked[0]) is Choice


# -- 3. an IntEnum of conversation states ---------------------------------------------------------


class Step(IntEnum):
    NAME = 1
    AGE = 2


def conversation_app(url: str, codec: Codec, answers: list[str]) -> Application:  # type: ignore[type-arg]
    app = builder().persistence(SQLAlchemyPersistence(url, codec=codec)).build()

    async def start(update: Update, context: Any) -> Step:
        return Step.NAME

    async def name(update: Update, context: Any) -> Step:
        answers.append(f"name {update.effective_message.text}")  # type: ignore[union-attr]
        return Step.AGE

    async def age(update: Update, context: Any) -> int:
        answers.append(f"age {update.effective_message.text}")  # type: ignore[union-attr]
        return ConversationHandler.END

    text = filters.TEXT & ~filters.COMMAND
    app.add_handler(
        ConversationHandler(
            entry_points=[CommandHandler("start", start)],
            states={
                Step.NAME: [MessageHandler(text, name)],
                Step.AGE: [MessageHandler(text, age)],
            },
            fallbacks=[],
            name="signup",
            persistent=True,
        )
    )
    return app


async def stored_states(url: str, codec: Codec) -> dict[Any, object]:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url, codec=codec)
    try:
        return dict(await persistence.get_conversations("signup"))
    finally:
        await persistence.flush()


@pytest.mark.parametrize("registered", [True, False], ids=["registered", "unregistered"])
async def test_an_intenum_conversation_resumes_after_restarts(
    db_url: str, registered: bool
) -> None:
    def codec() -> JSONCodec:
        return JSONCodec(types=[Step]) if registered else JSONCodec()

    answers: list[str] = []
    app = conversation_app(db_url, codec(), answers)
    errors = errors_of(app)
    async with app:
        await feed(app, text_update(app, 5, "/start"))
    states = await stored_states(db_url, codec())
    assert states == {(5, 5): Step.NAME}
    assert type(states[(5, 5)]) is (Step if registered else int)

    app2 = conversation_app(db_url, codec(), answers)
    async with app2:
        await feed(app2, text_update(app2, 5, "Ada"))
    app3 = conversation_app(db_url, codec(), answers)
    async with app3:
        await feed(app3, text_update(app3, 5, "36"))
    assert answers == ["name Ada", "age 36"]
    assert errors == []
    assert await stored_states(db_url, codec()) == {}


# -- 4. a telegram.Message kept in chat_data ------------------------------------------------------


def message_app(url: str, request: OfflineRequest, codec: Codec) -> Application:  # type: ignore[type-arg]
    app = builder(request).persistence(SQLAlchemyPersistence(url, codec=codec)).build()

    async def keep(update: Update, context: Any) -> None:
        context.chat_data["last"] = update.effective_message
        context.chat_data["from"] = update.effective_user

    async def answer(update: Update, context: Any) -> None:
        last: Message = context.chat_data["last"]
        await last.reply_text(f"you said {last.text}, {context.chat_data['from'].first_name}")

    app.add_handler(CommandHandler("answer", answer))
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, keep))
    return app


@pytest.mark.parametrize("codec", [JSONCodec, PickleCodec])
async def test_a_message_in_chat_data_replies_after_a_restart(
    db_url: str, codec: Callable[[], Codec]
) -> None:
    request = OfflineRequest()
    app = message_app(db_url, request, codec())
    async with app:
        await feed(app, text_update(app, 9, "remember me"))
        kept = app.chat_data[9]["last"]

    app2 = message_app(db_url, request, codec())
    errors = errors_of(app2)
    async with app2:
        restored = app2.chat_data[9]["last"]
        assert type(restored) is Message and restored == kept
        assert restored.to_dict() == kept.to_dict()
        assert restored.get_bot() is app2.bot
        await feed(app2, text_update(app2, 9, "/answer"))
    assert errors == []
    assert request.texts(9) == ["you said remember me, user9"]


# -- the errors say the fix -----------------------------------------------------------------------


class Cart:
    def __init__(self) -> None:
        self.items = [1]


async def test_an_unregistered_class_names_its_path_and_the_fix(db_url: str) -> None:
    app = builder().persistence(SQLAlchemyPersistence(db_url)).build()
    errors = errors_of(app)

    async def store(update: Update, context: Any) -> None:
        context.chat_data["n"] = 1
        if update.effective_chat.id == 5:  # type: ignore[union-attr]
            context.chat_data["cart"] = Cart()

    app.add_handler(MessageHandler(filters.ALL, store))
    async with app:
        await feed(app, text_update(app, 5, "hi"), text_update(app, 6, "hi"))
        await app.update_persistence()
        await until(lambda: bool(errors))  # PTB hands the error to a task
    assert [type(error) for error in errors] == [SerializationError]
    assert str(errors[0]) == (
        "chat_data[5]['cart']: Cart is not serializable; register it: JSONCodec(types=[Cart])"
    )
    assert await stored_rows(db_url, "chat_data") == {"6": '{"n":1}'}


async def test_a_class_no_longer_registered_fails_for_its_key_only(db_url: str) -> None:
    async def write(persistence: SQLAlchemyPersistence[Any, Any, Any]) -> None:
        await persistence.get_chat_data()
        await persistence.update_chat_data(1, {"choice": Choice(1)})
        await persistence.update_chat_data(2, {"n": 2})
        await persistence.flush()

    await write(SQLAlchemyPersistence(db_url, codec=JSONCodec(types={"shop.Choice": Choice})))
    before = await stored_rows(db_url, "chat_data")

    app = builder().persistence(SQLAlchemyPersistence(db_url)).build()

    async def touch(update: Update, context: Any) -> None:
        context.chat_data["touched"] = True

    app.add_handler(MessageHandler(filters.ALL, touch))
    errors = errors_of(app)
    async with app:
        assert dict(app.chat_data) == {2: {"n": 2}}
        await feed(app, text_update(app, 2, "hi"))
        with pytest.raises(StorageError) as info:
            await app.persistence.update_chat_data(1, {})  # type: ignore[union-attr]
    message = str(info.value)
    assert "chat_data[1]" in message
    assert errors == []
    rows = await stored_rows(db_url, "chat_data")
    assert rows["1"] == before["1"], "the row of the unregistered class is never overwritten"
    assert rows["2"] == '{"n":2,"touched":true}'


async def test_a_removed_class_names_the_key_and_the_type(db_url: str) -> None:
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        db_url, codec=JSONCodec(types={"shop.Choice": Choice})
    )
    await persistence.get_chat_data()
    await persistence.update_chat_data(1, {"choice": Choice(1)})
    await persistence.flush()

    lazy: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(db_url, lazy=True)
    try:
        await lazy.get_chat_data()
        with pytest.raises(StorageError) as info:
            await lazy.refresh_chat_data(1, {})
    finally:
        await lazy.flush()
    assert "chat_data['1']" in str(info.value)
    assert "the stored type 'shop.Choice' is not registered" in str(info.value)


# -- nothing runs that was not registered ---------------------------------------------------------


class Trap:
    """Exists, but is not registered: any way of bringing it to life is recorded."""

    calls: list[str] = []

    def __new__(cls, *args: Any, **kwargs: Any) -> Trap:
        Trap.calls.append("new")
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Trap.calls.append("init")


def hostile_rows(marker: Path) -> dict[str, str]:
    """Rows that would create ``marker`` (or construct :class:`Trap`) if any name in them were
    looked up."""
    return {
        "1": json.dumps({"$t": "os.system", "v": f"touch {marker}"}),
        "2": json.dumps({"x": {"$t": "subprocess.Popen", "v": {"args": ["touch", str(marker)]}}}),
        "3": '{"$t":"test_own_types.Trap","v":{}}',
        "4": '{"$t":"defaultdict","v":{"factory":"test_own_types.Trap","items":{}}}',
        "5": json.dumps({"$t": "builtins.eval", "v": f"open({str(marker)!r}, 'w')"}),
        "6": '{"$t":"pathlib.Path.touch","v":[]}',
    }


async def test_rows_naming_unregistered_classes_run_nothing(db_url: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = hostile_rows(marker)
    writer: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(db_url)
    await writer.get_chat_data()
    for key in (*hostile, "7"):
        await writer.update_chat_data(int(key), {"n": int(key)})
    await writer.flush()
    for key, data in hostile.items():
        await overwrite_row(db_url, "chat_data", key, data)
    Trap.calls.clear()

    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(db_url, lazy=True)
    try:
        await persistence.get_chat_data()
        for key in hostile:
            with pytest.raises(StorageError) as info:
                await persistence.refresh_chat_data(int(key), {})
            assert f"chat_data['{key}']" in str(info.value)
            assert "is not registered" in str(info.value)
        loaded: dict[str, Any] = {}
        await persistence.refresh_chat_data(7, loaded)
        assert loaded == {"n": 7}, "the other chats load"
    finally:
        await persistence.flush()
    assert Trap.calls == []
    assert not marker.exists()
    rows = await stored_rows(db_url, "chat_data")
    assert {key: rows[key] for key in hostile} == hostile, "the rows are left as they were"


# -- PTB's own examples, with an SQLAlchemyPersistence added to their builder ---------------------


def example(
    name: str, url: str, request: OfflineRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[ModuleType, Application]:  # type: ignore[type-arg]
    """PTB's ``examples/<name>.py`` as it is, with an SQLAlchemyPersistence added to its
    builder (see tests/_ptb_examples.py)."""
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(url)
    return load_example(
        name, lambda: builder(request).persistence(persistence), persistence, monkeypatch
    )


def edited_texts(request: OfflineRequest) -> list[str]:
    return [str(p["text"]) for m, p in request.calls if m == "editMessageText"]


async def test_contexttypesbot_click_counts_survive_a_restart(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = OfflineRequest()
    bot, app = example("contexttypesbot", db_url, request, monkeypatch)
    errors = errors_of(app)
    async with app:
        await feed(app, text_update(app, 5, "/start"))
        button = sent_message_id(request, 5)
        await feed(app, click_update(app, request, 5))
        await feed(app, click_update(app, request, 5, user_id=8))
    assert errors == []

    bot, app2 = example("contexttypesbot", db_url, request, monkeypatch)
    async with app2:
        chat = app2.chat_data[5]
        assert type(chat) is bot.ChatData  # a plain class holding a defaultdict(int)
        assert type(chat.clicks_per_message) is defaultdict
        assert chat.clicks_per_message == {button: 2}
        await feed(app2, click_update(app2, request, 5), text_update(app2, 5, "/print_users"))
    assert [text.count(f"<i>{n}</i>") for n, text in enumerate(edited_texts(request), 1)] == [
        1,
        1,
        1,
    ]
    assert sorted(request.texts(5)[-1].rsplit(": ", 1)[1].split(", ")) == ["5", "8"]

    _, app3 = example("contexttypesbot", db_url, request, monkeypatch)
    async with app3:
        assert app3.chat_data[5].clicks_per_message == {button: 3}
        assert app3.bot_data == {"user_ids": {5, 8}}  # a set


async def test_arbitrarycallbackdatabot_buttons_work_after_restarts(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = OfflineRequest()
    _, app = example("arbitrarycallbackdatabot", db_url, request, monkeypatch)
    async with app:
        await feed(app, text_update(app, 5, "/start"))
        await feed(app, click_update(app, request, 5, (2, 0)))
    for button in ((0, 0), (4, 0)):
        _, restarted = example("arbitrarycallbackdatabot", db_url, request, monkeypatch)
        async with restarted:
            await feed(restarted, click_update(restarted, request, 5, button))
    chosen = edited_texts(request)
    assert len(chosen) == 3
    for text, numbers in zip(chosen, ([3], [3, 1], [3, 1, 5])):
        assert str(numbers) in text, (text, numbers)


async def test_persistentconversationbot_resumes_after_every_restart(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = OfflineRequest()
    for text in ("/start", "Age", "36", "Something else...", "Pets", "a cat", "Done"):
        _, app = example("persistentconversationbot", db_url, request, monkeypatch)
        async with app:  # a restart before every message
            await feed(app, text_update(app, 5, text))
    replies = request.texts(5)
    assert len(replies) == 7  # every message was answered: the conversation went on
    assert "age - 36\npets - a cat" in replies[-1]
    _, app = example("persistentconversationbot", db_url, request, monkeypatch)
    async with app:
        assert app.user_data[5] == {"age": "36", "pets": "a cat"}
        await feed(app, text_update(app, 5, "/start"))
    assert "age, pets" in request.texts(5)[-1]


# -- generated values with registered classes, on every backend -----------------------------------

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_generated_own_types_round_trip_through_the_database(db_url: str) -> None:
    loop = asyncio.new_event_loop()
    persistence: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
        db_url, codec=JSONCodec(types=OWN_TYPES)
    )
    storage = persistence.storage("own")
    written: dict[str, Any] = {}

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        return loop.run_until_complete(coro)

    @SETTINGS
    @given(value=own_values)
    def check(value: Any) -> None:
        key = str(len(written))
        run(storage.write(key, value))
        written[key] = value
        assert same(run(storage.read(key)), value)

    try:
        check()
        reader: SQLAlchemyPersistence[Any, Any, Any] = SQLAlchemyPersistence(
            db_url, codec=JSONCodec(types=OWN_TYPES)
        )

        async def everything() -> dict[str, Any]:
            return {key: value async for key, value in reader.storage("own").items()}

        stored = run(everything())
        run(reader.flush())
        assert stored.keys() == written.keys()
        for key, value in written.items():
            assert same(stored[key], value), key
    finally:
        run(persistence.flush())
        loop.close()
