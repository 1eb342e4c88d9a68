"""SessionHandler: strict, lazy and multi sessions in a real PTB Application, offline.

Every test gets its storages from the ``session_storage`` fixture, parametrized over the storage
backends in :data:`STORAGE_BACKENDS` (add SQL ones there: each is an async context manager
factory that yields a ``namespace -> storage`` function).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from _bot import OfflineRequest, builder, inline_query_update, message_update, process
from telegram import Update
from telegram.ext import (
    Application,
    ApplicationHandlerStop,
    BaseHandler,
    CallbackContext,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    InlineQueryHandler,
    MessageHandler,
    TypeHandler,
    filters,
)

from ptb_sessions import _sessionlock
from ptb_sessions._errors import SerializationError, SessionKeyError, StorageError
from ptb_sessions._keys import by_chat, by_user, by_user_and_chat
from ptb_sessions._sessionhandler import Fragment, LazySession, SessionContext, SessionHandler
from ptb_sessions.storage._memory import MemoryStorage

# --- storages ------------------------------------------------------------------------------------

Maker = Callable[[str], Any]
"""``namespace -> storage``: the same namespace gives the same storage."""


@contextlib.asynccontextmanager
async def memory_backend(request: pytest.FixtureRequest) -> AsyncIterator[Maker]:
    storages: dict[str, MemoryStorage] = {}

    def make(namespace: str = "session") -> MemoryStorage:
        return storages.setdefault(namespace, MemoryStorage())

    yield make


def sql_backend(backend: str) -> Callable[[pytest.FixtureRequest], Any]:
    """Sessions in ``SQLAlchemyPersistence(...).storage(namespace)`` on ``backend``'s database
    (a fresh SQLite file, or the empty test database of the server)."""

    @contextlib.asynccontextmanager
    async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[Maker]:
        from conftest import async_server_url

        from ptb_sessions._sqlalchemypersistence import SQLAlchemyPersistence

        if backend == "sqlite":
            url = f"sqlite+aiosqlite:///{request.getfixturevalue('tmp_path') / 's.sqlite3'}"
        else:
            url = await async_server_url(backend)
        persistence: Any = SQLAlchemyPersistence(url)
        storages: dict[str, Any] = {}

        def make(namespace: str = "session") -> Any:
            return storages.setdefault(namespace, persistence.storage(namespace))

        try:
            yield make
        finally:
            await persistence.flush()

    return make_backend


STORAGE_BACKENDS: dict[str, Callable[[pytest.FixtureRequest], Any]] = {
    "memory": memory_backend,
    "sqlite": sql_backend("sqlite"),
    "postgresql": sql_backend("postgresql"),
    "mariadb": sql_backend("mariadb"),
}


@pytest.fixture(params=list(STORAGE_BACKENDS))
async def session_storage(request: pytest.FixtureRequest) -> AsyncIterator[Maker]:
    """``namespace -> storage`` of the backend under test."""
    async with STORAGE_BACKENDS[request.param](request) as make:
        yield make


class Spy:
    """A storage adapter that counts the calls to the storage it wraps."""

    def __init__(self, inner: Any, *, fail_read: Exception | None = None) -> None:
        self.inner = inner
        self.fail_read = fail_read
        self.reads: list[str] = []
        self.writes: list[tuple[str, Any]] = []
        self.deletes: list[str] = []
        self.read_yields = 0  # how often read() yields to the event loop before reading
        if hasattr(inner, "codec"):
            self.codec = inner.codec

    async def read(self, key: str) -> Any:
        self.reads.append(key)
        for _ in range(self.read_yields):
            await asyncio.sleep(0)
        if self.fail_read is not None:
            raise self.fail_read
        return await self.inner.read(key)

    async def write(self, key: str, value: Any) -> None:
        self.writes.append((key, value))
        await self.inner.write(key, value)

    async def delete(self, key: str) -> None:
        self.deletes.append(key)
        await self.inner.delete(key)

    @property
    def counts(self) -> tuple[int, int, int]:
        return len(self.reads), len(self.writes), len(self.deletes)


class LockingSpy(Spy):
    """A spy with a ``lock(key)`` (for ``lock="database"``) that records enter/exit."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.events: list[str] = []

    async def read(self, key: str) -> Any:
        self.events.append(f"read {key}")
        return await super().read(key)

    async def write(self, key: str, value: Any) -> None:
        self.events.append(f"write {key}")
        await super().write(key, value)

    @contextlib.asynccontextmanager
    async def lock(self, key: str) -> AsyncIterator[None]:
        self.events.append(f"lock {key}")
        try:
            yield
        finally:
            self.events.append(f"unlock {key}")


# --- application helpers -------------------------------------------------------------------------


class Bot:
    """A real Application with the given handlers, its replies and the errors it handled."""

    def __init__(
        self, *handlers: BaseHandler[Any, Any, Any], typed: bool = False, concurrent: int = 1
    ) -> None:
        self.request = OfflineRequest()
        b = builder(self.request).concurrent_updates(concurrent)
        if typed:
            b = b.context_types(ContextTypes(context=SessionContext))
        self.app: Application[Any, Any, Any, Any, Any, Any] = b.build()
        for handler in handlers:
            self.app.add_handler(handler)
        self.errors: list[BaseException] = []

        async def on_error(update: object, context: CallbackContext[Any, Any, Any, Any]) -> None:
            assert context.error is not None
            self.errors.append(context.error)

        self.app.add_error_handler(on_error)

    async def send(self, *updates: Update) -> None:
        async with self.app:
            await process(self.app, *updates)

    def texts(self, chat_id: int | None = None) -> list[str]:
        return self.request.texts(chat_id)


class Mode:
    """How a test reaches its session: strict, lazy, multi (fragment ``f``) or multi-lazy."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name

    def handler(
        self, handlers: Sequence[BaseHandler[Any, Any, Any]], storage: Any, **kwargs: Any
    ) -> SessionHandler[Any]:
        if self.name.startswith("multi"):
            fragment = Fragment(storage=storage, lazy=self.name == "multi-lazy", **kwargs)
            return SessionHandler(handlers, fragments={"f": fragment})
        return SessionHandler(handlers, storage=storage, lazy=self.name == "lazy", **kwargs)

    async def get(self, context: Any) -> Any:
        if self.name == "strict":
            return context.session
        if self.name == "lazy":
            return await context.session
        if self.name == "multi":
            return context.session.f
        return await context.session.f

    def set(self, context: Any, value: Any) -> None:
        if self.name.startswith("multi"):
            context.session.f = value
        else:
            context.session = value


MODES = [Mode("strict"), Mode("lazy"), Mode("multi"), Mode("multi-lazy")]


@pytest.fixture(params=MODES, ids=repr)
def mode(request: pytest.FixtureRequest) -> Mode:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(params=[False, True], ids=["CallbackContext", "SessionContext"])
def typed(request: pytest.FixtureRequest) -> bool:
    return request.param  # type: ignore[no-any-return]


Callback = Callable[[Update, Any], Awaitable[Any]]


def on_text(callback: Callback) -> MessageHandler[Any, Any]:
    return MessageHandler(filters.TEXT, callback)


@pytest.fixture(autouse=True)
def _no_leaked_locks() -> Any:
    yield
    assert _sessionlock.locked_keys() == 0


# --- 1. the pizza bot ----------------------------------------------------------------------------


def pizza_handler(storage: Any, typed: bool) -> SessionHandler[Any]:
    async def pizza(update: Update, context: Any) -> None:
        context.session["pizzas"] += update.effective_message.text.count("🍕")  # type: ignore[union-attr]

    async def hunger(update: Update, context: Any) -> None:
        await update.effective_message.reply_text(  # type: ignore[union-attr]
            f"Your hunger level is {context.session['pizzas']}!"
        )

    return SessionHandler(
        [CommandHandler("hunger", hunger), MessageHandler(filters.Regex("🍕"), pizza)],
        initial=lambda: {"pizzas": 0},
        storage=storage,
    )


async def test_pizza_bot_counts_per_chat_and_survives_a_new_application(
    session_storage: Maker, typed: bool
) -> None:
    bot = Bot(pizza_handler(session_storage("session"), typed), typed=typed)
    await bot.send(
        message_update(1, "🍕"),
        message_update(-2, "🍕🍕 and 🍕"),
        message_update(1, "no pizza"),
        message_update(1, "/hunger"),
        message_update(-2, "/hunger"),
        message_update(3, "/hunger"),
    )
    assert bot.texts(1) == ["Your hunger level is 1!"]
    assert bot.texts(-2) == ["Your hunger level is 3!"]
    assert bot.texts(3) == ["Your hunger level is 0!"]
    assert bot.errors == []

    again = Bot(pizza_handler(session_storage("session"), typed), typed=typed)
    await again.send(
        message_update(-2, "🍕"), message_update(-2, "/hunger"), message_update(1, "/hunger")
    )
    assert again.texts(-2) == ["Your hunger level is 4!"]
    assert again.texts(1) == ["Your hunger level is 1!"]


# --- 2. initial ----------------------------------------------------------------------------------


async def test_initial_gives_a_fresh_object_per_new_key(
    session_storage: Maker, mode: Mode, typed: bool
) -> None:
    made: list[Any] = []

    def initial() -> dict[str, list[int]]:
        made.append({"chats": []})
        return made[-1]

    seen: list[Any] = []

    async def remember(update: Update, context: Any) -> None:
        value = await mode.get(context)
        seen.append(value)
        value["chats"].append(update.effective_chat.id)  # type: ignore[union-attr]

    storage = session_storage("session")
    bot = Bot(mode.handler([on_text(remember)], storage, initial=initial), typed=typed)
    await bot.send(message_update(1), message_update(2), message_update(1))
    assert bot.errors == []
    assert len(made) == 2  # chats 1 and 2; the third update read chat 1's stored value
    assert seen[0] is made[0] and seen[1] is made[1] and seen[0] is not seen[1]
    assert await storage.read("1") == {"chats": [1, 1]}
    assert await storage.read("2") == {"chats": [2]}


async def test_without_initial_a_new_key_reads_none(
    session_storage: Maker, mode: Mode, typed: bool
) -> None:
    seen: list[Any] = []

    async def remember(update: Update, context: Any) -> None:
        seen.append(await mode.get(context))

    spy = Spy(session_storage("session"))
    bot = Bot(mode.handler([on_text(remember)], spy), typed=typed)
    await bot.send(message_update(1))
    assert bot.errors == []
    assert seen == [None]
    assert spy.counts == (1, 0, 0)  # nothing stored, nothing deleted


# --- 3. writes only when the encoding changed ----------------------------------------------------


async def test_writes_only_changes_and_none_deletes(
    session_storage: Maker, mode: Mode, typed: bool
) -> None:
    actions: list[str] = []

    async def act(update: Update, context: Any) -> None:
        action = actions.pop(0)
        if action == "touch":
            value = await mode.get(context)
            assert value is None or "n" in value
        elif action == "increment":
            (await mode.get(context))["n"] += 1
        elif action == "same":
            mode.set(context, dict(await mode.get(context)))
        elif action == "none":
            mode.set(context, None)

    spy = Spy(session_storage("session"))
    bot = Bot(mode.handler([on_text(act)], spy, initial=lambda: {"n": 0}), typed=typed)

    steps = [
        ("touch", (1, 0, 0)),  # fresh initial value, untouched: not written
        ("increment", (2, 1, 0)),
        ("touch", (3, 1, 0)),  # loaded value re-encodes equal: not written
        ("same", (4, 1, 0)),  # an equal value assigned: not written
        ("increment", (5, 2, 0)),
        ("none", (6, 2, 1)),  # deleted
        ("none", (7, 2, 1)),  # nothing stored: nothing to delete
    ]
    if mode.name.endswith("lazy"):  # assigning None does not read: it deletes unconditionally
        steps[-2:] = [("none", (5, 2, 1)), ("none", (5, 2, 2))]
    async with bot.app:
        for action, counts in steps:
            actions.append(action)
            await process(bot.app, message_update(7))
            assert spy.counts == counts, action
    assert bot.errors == []
    assert await spy.inner.read("7") is None
    assert spy.writes == [("7", {"n": 1}), ("7", {"n": 2})]


async def test_untouched_handler_reads_in_strict_mode_only(
    session_storage: Maker, mode: Mode
) -> None:
    async def nothing(update: Update, context: Any) -> None:
        pass

    spy = Spy(session_storage("session"))
    bot = Bot(mode.handler([on_text(nothing)], spy, initial=lambda: {"n": 0}))
    await bot.send(message_update(1), message_update(1))
    lazy = mode.name.endswith("lazy")
    assert spy.counts == ((0 if lazy else 2), 0, 0)


async def test_unencodable_value_raises_naming_the_key_and_writes_nothing(
    session_storage: Maker, mode: Mode
) -> None:
    async def bad(update: Update, context: Any) -> None:
        (await mode.get(context))["lock"] = asyncio.Lock()

    spy = Spy(session_storage("session"))
    bot = Bot(mode.handler([on_text(bad)], spy, initial=lambda: {"n": 0}))
    await bot.send(message_update(5))
    assert len(bot.errors) == 1
    error = bot.errors[0]
    assert isinstance(error, SerializationError)
    assert "'5'" in str(error) and "['lock']" in str(error) and "Lock" in str(error)
    assert spy.writes == []


# --- 4. errors and ApplicationHandlerStop --------------------------------------------------------


async def test_handler_error_writes_nothing_and_reaches_the_error_handler(
    session_storage: Maker, mode: Mode, typed: bool
) -> None:
    async def fail(update: Update, context: Any) -> None:
        value = await mode.get(context)
        value["n"] += 1
        if update.effective_message.text == "fail":  # type: ignore[union-attr]
            raise RuntimeError("boom")

    spy = Spy(session_storage("session"))
    bot = Bot(mode.handler([on_text(fail)], spy, initial=lambda: {"n": 0}), typed=typed)
    await bot.send(message_update(1, "ok"), message_update(1, "fail"), message_update(1, "fail"))
    assert [str(e) for e in bot.errors] == ["boom", "boom"]
    assert len(spy.writes) == 1
    assert await spy.inner.read("1") == {"n": 1}


async def test_application_handler_stop_saves_and_stops(
    session_storage: Maker, mode: Mode, typed: bool
) -> None:
    later: list[int] = []

    async def stop(update: Update, context: Any) -> None:
        (await mode.get(context))["n"] += 1
        raise ApplicationHandlerStop

    async def after(update: Update, context: Any) -> None:
        later.append(1)

    spy = Spy(session_storage("session"))
    bot = Bot(mode.handler([on_text(stop)], spy, initial=lambda: {"n": 0}), typed=typed)
    bot.app.add_handler(on_text(after), group=1)
    await bot.send(message_update(1), message_update(1))
    assert bot.errors == []
    assert later == []
    assert await spy.inner.read("1") == {"n": 2}


async def test_storage_write_error_reaches_the_error_handler(session_storage: Maker) -> None:
    class FailingWrite(Spy):
        async def write(self, key: str, value: Any) -> None:
            raise StorageError("database is down")

    async def change(update: Update, context: Any) -> None:
        context.session["n"] = 1

    bot = Bot(
        SessionHandler([on_text(change)], storage=FailingWrite(session_storage("s")), initial=dict)
    )
    await bot.send(message_update(1))
    assert [str(e) for e in bot.errors] == ["database is down"]


# --- 5. no session key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "use",
    [
        "item",
        "attr",
        "iter",
        "len",
        "bool",
        "contains",
        "await",
        "setitem",
        "str",
    ],
)
async def test_no_key_any_use_raises_naming_update_type_and_key_function(
    session_storage: Maker, use: str
) -> None:
    raised: list[BaseException] = []

    async def touch(update: Update, context: Any) -> None:
        session = context.session
        try:
            if use == "item":
                session["x"]
            elif use == "attr":
                session.get("x")
            elif use == "iter":
                list(session)
            elif use == "len":
                len(session)
            elif use == "bool":
                bool(session)
            elif use == "contains":
                "x" in session  # noqa: B015
            elif use == "await":
                await session
            elif use == "setitem":
                session["x"] = 1
            elif use == "str":
                str(session)
        except SessionKeyError as exc:
            raised.append(exc)

    spy = Spy(session_storage("session"))
    bot = Bot(SessionHandler([InlineQueryHandler(touch)], storage=spy, initial=dict))
    await bot.send(inline_query_update(5))
    assert bot.errors == []
    assert len(raised) == 1
    message = str(raised[0])
    assert "inline_query" in message and "by_chat" in message
    assert "does not belong to a chat" in message
    assert spy.counts == (0, 0, 0)


async def test_no_key_untouched_runs_the_handler(
    session_storage: Maker, mode: Mode, typed: bool
) -> None:
    ran: list[int] = []

    async def untouched(update: Update, context: Any) -> None:
        ran.append(update.inline_query.from_user.id)  # type: ignore[union-attr]

    spy = Spy(session_storage("session"))
    bot = Bot(mode.handler([InlineQueryHandler(untouched)], spy, initial=dict), typed=typed)
    await bot.send(inline_query_update(5))
    assert ran == [5]
    assert bot.errors == []
    assert spy.counts == (0, 0, 0)


async def test_no_key_access_raises_in_every_mode(
    session_storage: Maker, mode: Mode, typed: bool
) -> None:
    raised: list[BaseException] = []

    async def touch(update: Update, context: Any) -> None:
        try:
            value = await mode.get(context)
            value["x"]
        except SessionKeyError as exc:
            raised.append(exc)

    bot = Bot(
        mode.handler([InlineQueryHandler(touch)], session_storage("s"), initial=dict), typed=typed
    )
    await bot.send(inline_query_update(5))
    assert bot.errors == []
    assert len(raised) == 1
    assert "inline_query" in str(raised[0]) and "by_chat" in str(raised[0])
    if mode.name.endswith("lazy"):
        assert "lazy" in str(raised[0])
    if mode.name.startswith("multi"):
        assert "fragment 'f'" in str(raised[0])


async def test_no_key_assignment_raises(session_storage: Maker, mode: Mode, typed: bool) -> None:
    raised: list[BaseException] = []

    async def assign(update: Update, context: Any) -> None:
        try:
            mode.set(context, {"x": 1})
        except SessionKeyError as exc:
            raised.append(exc)

    spy = Spy(session_storage("session"))
    bot = Bot(mode.handler([InlineQueryHandler(assign)], spy), typed=typed)
    await bot.send(inline_query_update(5))
    if typed or mode.name.startswith("multi"):
        assert len(raised) == 1  # raised at the assignment itself
        assert bot.errors == []
    else:
        # a plain CallbackContext cannot intercept the assignment: it raises when the handler
        # returns, and the error handler gets it
        assert raised == []
        assert len(bot.errors) == 1 and isinstance(bot.errors[0], SessionKeyError)
        assert "Cannot assign" in str(bot.errors[0])
    assert spy.counts == (0, 0, 0)


async def test_no_key_typed_context_raises_on_reading_the_attribute(
    session_storage: Maker,
) -> None:
    raised: list[BaseException] = []

    async def read(update: Update, context: SessionContext[Any]) -> None:
        try:
            context.session  # noqa: B018
        except SessionKeyError as exc:
            raised.append(exc)

    bot = Bot(SessionHandler([InlineQueryHandler(read)], storage=session_storage("s")), typed=True)
    await bot.send(inline_query_update(5))
    assert len(raised) == 1


async def test_no_key_message_names_a_custom_key_function(session_storage: Maker) -> None:
    def premium_users(update: Update) -> str | None:
        return None

    raised: list[BaseException] = []

    async def touch(update: Update, context: Any) -> None:
        try:
            context.session["x"]
        except SessionKeyError as exc:
            raised.append(exc)

    bot = Bot(SessionHandler([on_text(touch)], key=premium_users, storage=session_storage("s")))
    await bot.send(message_update(1))
    assert "custom session key function" in str(raised[0])
    assert "premium_users" in str(raised[0]) and "message" in str(raised[0])


@pytest.mark.parametrize(
    ("key", "reason"),
    [(by_user, "has no user"), (by_user_and_chat, "does not have both a user and a chat")],
)
async def test_no_key_message_explains_builtin_key_functions(
    session_storage: Maker, key: Any, reason: str
) -> None:
    raised: list[BaseException] = []

    async def touch(update: Update, context: Any) -> None:
        try:
            context.session["x"]
        except SessionKeyError as exc:
            raised.append(exc)

    handler = SessionHandler([TypeHandler(Update, touch)], key=key, storage=session_storage("s"))
    bot = Bot(handler)
    update = inline_query_update(5) if key is by_user_and_chat else Update(update_id=99)
    await bot.send(update)
    assert reason in str(raised[0]) and key.__name__ in str(raised[0])


# --- 6. lazy sessions ----------------------------------------------------------------------------


async def test_lazy_never_touched_reads_and_writes_nothing(
    session_storage: Maker, typed: bool
) -> None:
    async def nothing(update: Update, context: Any) -> None:
        assert isinstance(context.session, LazySession)

    spy = Spy(session_storage("session"))
    await spy.inner.write("1", {"n": 1})
    bot = Bot(
        SessionHandler([on_text(nothing)], storage=spy, lazy=True, initial=dict), typed=typed
    )
    await bot.send(message_update(1), message_update(2))
    assert bot.errors == []
    assert spy.counts == (0, 0, 0)


async def test_lazy_never_touched_calls_no_key_function(session_storage: Maker) -> None:
    keyed: list[object] = []

    def chat(update: Update) -> str | None:
        keyed.append(update)
        return by_chat(update)

    async def maybe(update: Update, context: Any) -> None:
        if update.effective_message.text == "use":  # type: ignore[union-attr]
            (await context.session)["n"] = 1

    storage = session_storage("session")
    bot = Bot(SessionHandler([on_text(maybe)], storage=storage, key=chat, lazy=True, initial=dict))
    await bot.send(message_update(1), message_update(2))
    assert keyed == []  # an untouched lazy session is one object, no key, no lock, no I/O
    await bot.send(message_update(3, "use"))
    assert len(keyed) == 1
    assert bot.errors == []
    assert await storage.read("3") == {"n": 1}


async def test_lazy_awaited_twice_reads_once(session_storage: Maker, typed: bool) -> None:
    same: list[bool] = []

    async def twice(update: Update, context: Any) -> None:
        first = await context.session
        first["n"] += 1
        second = await context.session
        same.append(first is second)

    spy = Spy(session_storage("session"))
    bot = Bot(
        SessionHandler([on_text(twice)], storage=spy, lazy=True, initial=lambda: {"n": 0}),
        typed=typed,
    )
    await bot.send(message_update(1), message_update(1))
    assert same == [True, True]
    assert spy.counts == (2, 2, 0)
    assert await spy.inner.read("1") == {"n": 2}


async def test_lazy_assigned_before_reading_does_not_read(
    session_storage: Maker, typed: bool
) -> None:
    seen: list[Any] = []

    async def assign(update: Update, context: Any) -> None:
        context.session = {"reset": True}
        if typed:  # a SessionContext keeps the LazySession: awaiting gives the new value
            seen.append(await context.session)

    spy = Spy(session_storage("session"))
    await spy.inner.write("1", {"n": 5})
    bot = Bot(SessionHandler([on_text(assign)], storage=spy, lazy=True), typed=typed)
    await bot.send(message_update(1))
    assert bot.errors == []
    assert spy.counts == (0, 1, 0)
    assert await spy.inner.read("1") == {"reset": True}
    assert seen == ([{"reset": True}] if typed else [])


async def test_lazy_assigned_awaitable_is_awaited_before_writing(
    session_storage: Maker, typed: bool
) -> None:
    order: list[str] = []

    async def compute() -> dict[str, int]:
        order.append("computed")
        return {"n": 42}

    async def assign(update: Update, context: Any) -> None:
        context.session = compute()
        order.append("returned")

    spy = Spy(session_storage("session"))
    bot = Bot(SessionHandler([on_text(assign)], storage=spy, lazy=True), typed=typed)
    await bot.send(message_update(1))
    assert bot.errors == []
    assert order == ["returned", "computed"]
    assert spy.writes == [("1", {"n": 42})]
    assert spy.reads == []


async def test_lazy_assigned_awaitable_based_on_the_session(session_storage: Maker) -> None:
    async def reset(update: Update, context: SessionContext[LazySession[dict[str, int]]]) -> None:
        async def zero(session: Awaitable[dict[str, int]]) -> dict[str, int]:
            value = await session
            value["n"] = 0
            return value

        context.session = zero(context.session)
        assert (await context.session) == {"n": 0, "keep": 1}

    spy = Spy(session_storage("session"))
    await spy.inner.write("1", {"n": 5, "keep": 1})
    bot = Bot(SessionHandler([on_text(reset)], storage=spy, lazy=True), typed=True)
    await bot.send(message_update(1))
    assert bot.errors == []
    assert spy.counts == (1, 1, 0)
    assert await spy.inner.read("1") == {"n": 0, "keep": 1}


async def test_lazy_read_in_flight_is_awaited_at_save(session_storage: Maker) -> None:
    tasks: list[asyncio.Task[Any]] = []

    async def start(update: Update, context: Any) -> None:
        tasks.append(asyncio.ensure_future(context.session))
        await asyncio.sleep(0)  # the task starts reading; the handler returns before it ends

    spy = Spy(session_storage("session"))
    spy.read_yields = 5
    await spy.inner.write("1", {"n": 1})
    bot = Bot(SessionHandler([on_text(start)], storage=spy, lazy=True))
    await bot.send(message_update(1))
    assert bot.errors == []
    assert tasks[0].done() and tasks[0].result() == {"n": 1}
    assert spy.counts == (1, 0, 0)


async def test_lazy_read_error_propagates_and_later_awaits_retry(session_storage: Maker) -> None:
    results: list[Any] = []

    async def retry(update: Update, context: Any) -> None:
        try:
            await context.session
        except StorageError:
            results.append("failed")
        spy.fail_read = None
        results.append(await context.session)

    spy = Spy(session_storage("session"), fail_read=StorageError("down"))
    bot = Bot(SessionHandler([on_text(retry)], storage=spy, lazy=True, initial=lambda: {"n": 0}))
    await bot.send(message_update(1))
    assert results == ["failed", {"n": 0}]
    assert spy.counts == (2, 0, 0)


# --- 7. multi sessions ---------------------------------------------------------------------------


async def test_multi_fragments_have_own_storages_keys_and_initials(
    session_storage: Maker, typed: bool
) -> None:
    async def count(update: Update, context: Any) -> None:
        context.session.chat["messages"] += 1
        context.session.user["messages"] += 1
        settings = await context.session.settings
        settings.setdefault("seen", True)

    chat, user, settings = (Spy(session_storage(n)) for n in ("chat", "user", "settings"))
    handler = SessionHandler(
        [on_text(count)],
        fragments={
            "chat": Fragment(storage=chat, initial=lambda: {"messages": 0}),
            "user": Fragment(storage=user, key=by_user, initial=lambda: {"messages": 0}),
            "settings": Fragment(storage=settings, key=by_user, lazy=True, initial=dict),
        },
    )
    bot = Bot(handler, typed=typed)
    await bot.send(
        message_update(-10, user_id=1), message_update(-10, user_id=2), message_update(1)
    )
    assert bot.errors == []
    assert await chat.inner.read("-10") == {"messages": 2}
    assert await chat.inner.read("1") == {"messages": 1}
    assert await user.inner.read("1") == {"messages": 2}
    assert await user.inner.read("2") == {"messages": 1}
    assert await settings.inner.read("1") == {"seen": True}
    assert await chat.inner.read("2") is None


async def test_multi_keyless_fragment_fails_only_when_used(
    session_storage: Maker, typed: bool
) -> None:
    results: list[Any] = []

    async def use(update: Update, context: Any) -> None:
        context.session.user["queries"] += 1
        try:
            context.session.chat["x"]
        except SessionKeyError as exc:
            results.append(exc)

    chat, user = Spy(session_storage("chat")), Spy(session_storage("user"))
    handler = SessionHandler(
        [InlineQueryHandler(use)],
        fragments={
            "chat": Fragment(storage=chat, initial=dict),
            "user": Fragment(storage=user, key=by_user, initial=lambda: {"queries": 0}),
        },
    )
    bot = Bot(handler, typed=typed)
    await bot.send(inline_query_update(5))
    assert bot.errors == []
    assert len(results) == 1 and "fragment 'chat'" in str(results[0])
    assert "inline_query" in str(results[0])
    assert await user.inner.read("5") == {"queries": 1}
    assert chat.counts == (0, 0, 0)


async def test_multi_none_deletes_only_that_fragment(session_storage: Maker, typed: bool) -> None:
    async def drop(update: Update, context: Any) -> None:
        context.session.a = None

    a, b = Spy(session_storage("a")), Spy(session_storage("b"))
    await a.inner.write("1", {"a": 1})
    await b.inner.write("1", {"b": 1})
    handler = SessionHandler(
        [on_text(drop)], fragments={"a": Fragment(storage=a), "b": Fragment(storage=b)}
    )
    bot = Bot(handler, typed=typed)
    await bot.send(message_update(1))
    assert bot.errors == []
    assert await a.inner.read("1") is None
    assert await b.inner.read("1") == {"b": 1}
    assert (a.counts, b.counts) == ((1, 0, 1), (1, 0, 0))


async def test_multi_session_none_deletes_every_keyed_fragment(
    session_storage: Maker, typed: bool
) -> None:
    async def drop(update: Update, context: Any) -> None:
        context.session = None

    a, b, c = (Spy(session_storage(n)) for n in "abc")
    await a.inner.write("1", 1)
    await b.inner.write("1", 2)
    handler = SessionHandler(
        [TypeHandler(Update, drop)],
        fragments={
            "a": Fragment(storage=a, key=by_user),
            "b": Fragment(storage=b, key=by_user, lazy=True),
            "c": Fragment(storage=c),  # no chat in an inline query: skipped, not an error
        },
    )
    bot = Bot(handler, typed=typed)
    await bot.send(inline_query_update(1))
    assert bot.errors == []
    assert await a.inner.read("1") is None and await b.inner.read("1") is None
    assert c.counts == (0, 0, 0)


async def test_multi_unknown_fragment_and_replacement_are_errors(
    session_storage: Maker, typed: bool
) -> None:
    raised: list[BaseException] = []

    async def wrong(update: Update, context: Any) -> None:
        try:
            context.session.nope = 1
        except AttributeError as exc:
            raised.append(exc)
        if typed:
            try:
                context.session = {"a": 1}
            except TypeError as exc:
                raised.append(exc)
        else:
            context.session = {"a": 1}  # detected when the handler returns

    bot = Bot(
        SessionHandler([on_text(wrong)], fragments={"a": Fragment(storage=session_storage("a"))}),
        typed=typed,
    )
    await bot.send(message_update(1))
    assert "no fragment 'nope'" in str(raised[0])
    errors = raised[1:] if typed else bot.errors
    assert len(errors) == 1 and isinstance(errors[0], TypeError)


async def test_multi_fragments_may_share_a_storage_with_prefixes(session_storage: Maker) -> None:
    async def both(update: Update, context: Any) -> None:
        context.session.a = "A"
        context.session.b = "B"

    storage = session_storage("shared")
    handler = SessionHandler(
        [on_text(both)],
        storage=storage,
        fragments={"a": Fragment(prefix="a:"), "b": Fragment(prefix="b:")},
    )
    await Bot(handler).send(message_update(1))
    assert (await storage.read("a:1"), await storage.read("b:1")) == ("A", "B")


# --- 8. concurrency ------------------------------------------------------------------------------


async def run_concurrently(bot: Bot, updates: Sequence[object], handled: list[object]) -> None:
    """Start ``bot``'s application with its update queue, feed ``updates``, wait for them."""
    done = asyncio.Event()
    total = len(updates)

    async def watch(update: object, context: Any) -> None:
        handled.append(update)
        if len(handled) == total:
            done.set()

    bot.app.add_handler(TypeHandler(object, watch), group=100)
    async with bot.app:
        await bot.app.start()
        for update in updates:
            if isinstance(update, Update):
                update.set_bot(bot.app.bot)
            await bot.app.update_queue.put(update)
        await done.wait()
        await bot.app.stop()


@pytest.mark.parametrize("lazy", [False, True], ids=["strict", "lazy"])
async def test_concurrent_updates_never_lose_an_increment(
    session_storage: Maker, lazy: bool
) -> None:
    async def increment(update: Update, context: Any) -> None:
        session = (await context.session) if lazy else context.session
        count = session["n"]
        await asyncio.sleep(0)  # let other updates of the same chat run between read and write
        session["n"] = count + 1

    storage = session_storage("session")
    handler = SessionHandler(
        [on_text(increment)], storage=storage, lazy=lazy, initial=lambda: {"n": 0}
    )
    bot = Bot(handler, concurrent=64)
    handled: list[object] = []
    updates = [message_update(-100 - i % 20) for i in range(2000)]
    await run_concurrently(bot, updates, handled)
    assert bot.errors == []
    assert len(handled) == 2000
    for chat in range(20):
        assert await storage.read(str(-100 - chat)) == {"n": 100}
    assert _sessionlock.locked_keys() == 0


class Keyed:
    """A custom update with a session key."""

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key


async def test_lock_table_hands_keys_over_in_order_and_survives_cancelled_waiters() -> None:
    key = (0, "test", "k")
    first = _sessionlock.try_acquire(key)
    assert first is not None
    assert _sessionlock.try_acquire(key) is None  # held: no waiting here
    order: list[str] = []

    async def wait(name: str) -> None:
        entry = await _sessionlock.acquire(key)
        order.append(name)
        await asyncio.sleep(0)
        _sessionlock.release(key, entry)

    a = asyncio.ensure_future(wait("a"))
    cancelled = asyncio.ensure_future(wait("cancelled"))
    b = asyncio.ensure_future(wait("b"))
    await asyncio.sleep(0)
    cancelled.cancel()  # cancelled while waiting: leaves the queue
    await asyncio.sleep(0)
    _sessionlock.release(key, first)
    await asyncio.gather(a, b, return_exceptions=True)
    assert order == ["a", "b"]
    assert cancelled.cancelled()
    assert _sessionlock.locked_keys() == 0

    # handed over, but cancelled before it ran: the key goes on to the next waiter
    first = _sessionlock.try_acquire(key)
    assert first is not None
    late = asyncio.ensure_future(wait("late"))
    c = asyncio.ensure_future(wait("c"))
    await asyncio.sleep(0)
    _sessionlock.release(key, first)  # to "late" ...
    late.cancel()  # ... which is cancelled before it resumes
    await asyncio.gather(late, c, return_exceptions=True)
    assert order == ["a", "b", "c"]
    assert _sessionlock.locked_keys() == 0


async def test_lazy_session_used_after_its_handler_takes_no_lock(session_storage: Maker) -> None:
    kept: list[Any] = []

    async def keep(update: Update, context: Any) -> None:
        kept.append(context.session)

    storage = session_storage("session")
    await storage.write("1", {"n": 1})
    handler = SessionHandler([on_text(keep)], storage=storage, lazy=True, lock="process")
    await Bot(handler).send(message_update(1))
    assert await asyncio.wait_for(kept[0], 5) == {"n": 1}  # read late, without the lock
    assert _sessionlock.locked_keys() == 0


class NoneStorage:
    """A storage with nothing in it, and no I/O: the lock table alone is under test."""

    async def read(self, key: str) -> Any:
        return None

    async def write(self, key: str, value: Any) -> None:
        raise AssertionError("nothing is written")

    async def delete(self, key: str) -> None:
        raise AssertionError("nothing is deleted")


async def test_lock_table_stays_empty_over_100000_distinct_keys() -> None:
    peak: list[int] = [0]

    async def touch(update: Keyed, context: Any) -> None:
        assert await context.session is None  # the lock is taken on first use
        peak[0] = max(peak[0], _sessionlock.locked_keys())
        await asyncio.sleep(0)

    def key(update: Any) -> str:
        return update.key  # type: ignore[no-any-return]

    spy = Spy(NoneStorage())
    handler = SessionHandler([TypeHandler(Keyed, touch)], storage=spy, key=key, lazy=True)
    bot = Bot(handler, concurrent=64)
    handled: list[object] = []
    await run_concurrently(bot, [Keyed(f"k{i}") for i in range(100_000)], handled)
    assert len(handled) == 100_000
    assert 1 < peak[0] <= 64
    assert spy.counts == (100_000, 0, 0)
    assert _sessionlock.locked_keys() == 0


async def test_lazy_never_touched_takes_no_lock(session_storage: Maker) -> None:
    """An untouched lazy session neither takes the per-key lock nor waits for it."""
    storage = session_storage("session")
    held = asyncio.Event()
    release = asyncio.Event()
    order: list[str] = []

    async def slow(update: Update, context: Any) -> None:
        session = await context.session
        held.set()
        await release.wait()
        session["n"] = 1
        order.append("slow saved")

    async def untouched(update: Update, context: Any) -> None:
        await held.wait()
        assert _sessionlock.locked_keys() == 1  # the slow update holds chat 1
        order.append("untouched")
        release.set()

    handler = SessionHandler(
        [
            MessageHandler(filters.Regex("slow"), slow),
            MessageHandler(filters.Regex("untouched"), untouched),
        ],
        storage=storage,
        lazy=True,
        initial=lambda: {"n": 0},
    )
    bot = Bot(handler, concurrent=8)
    handled: list[object] = []
    await asyncio.wait_for(
        run_concurrently(
            bot, [message_update(1, "slow"), message_update(1, "untouched")], handled
        ),
        10,
    )
    assert bot.errors == []
    assert order == ["untouched", "slow saved"]
    assert await storage.read("1") == {"n": 1}


@pytest.mark.parametrize("how", ["await", "assign"])
async def test_lazy_takes_the_lock_on_first_use_until_saved(
    session_storage: Maker, how: str
) -> None:
    """Awaiting a lazy session takes the key's lock until the save; an assignment (which
    cannot wait) takes it before the write. Both wait for an update that holds it."""
    storage = session_storage("session")
    held = asyncio.Event()
    release = asyncio.Event()
    events: list[str] = []

    async def first(update: Update, context: Any) -> None:
        session = await context.session
        held.set()
        await release.wait()
        session["n"] += 1
        events.append("first done")

    async def second(update: Update, context: Any) -> None:
        await held.wait()
        if how == "await":
            task = asyncio.ensure_future(context.session)
            await asyncio.sleep(0.01)
            assert not task.done()  # waits for the first update's lock
            events.append("second waiting")
            release.set()
            session = await task
            events.append(f"second read {session['n']}")
            session["n"] += 10
        else:
            context.session = {"n": 100}
            events.append("second assigned")
            release.set()

    handler = SessionHandler(
        [
            MessageHandler(filters.Regex("first"), first),
            MessageHandler(filters.Regex("second"), second),
        ],
        storage=storage,
        lazy=True,
        initial=lambda: {"n": 0},
    )
    bot = Bot(handler, concurrent=8)
    handled: list[object] = []
    updates = [message_update(1, "first"), message_update(1, "second")]
    await asyncio.wait_for(run_concurrently(bot, updates, handled), 10)
    assert bot.errors == []
    if how == "await":
        assert events == ["second waiting", "first done", "second read 1"]
        assert await storage.read("1") == {"n": 11}
    else:
        # the blind write waited for the first update's save, then replaced its value
        assert events == ["second assigned", "first done"]
        assert await storage.read("1") == {"n": 100}
    assert _sessionlock.locked_keys() == 0


# --- 9/10. ttl and migrations --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_ttl_is_idle_time_a_read_refreshes_the_expiry(
    session_storage: Maker, mode: Mode
) -> None:
    clock = FakeClock()
    seen: list[int] = []

    async def count(update: Update, context: Any) -> None:
        value = await mode.get(context)
        seen.append(value["n"])
        if update.effective_message.text == "+":  # type: ignore[union-attr]
            value["n"] += 1

    if mode.name.startswith("multi"):
        fragment = Fragment(
            storage=session_storage("session"),
            initial=lambda: {"n": 0},
            ttl=10,
            clock=clock,
            lazy=mode.name == "multi-lazy",
        )
        handler = SessionHandler([on_text(count)], fragments={"f": fragment})
    else:
        handler = SessionHandler(
            [on_text(count)],
            storage=session_storage("session"),
            initial=lambda: {"n": 0},
            ttl=10,
            clock=clock,
            lazy=mode.name == "lazy",
        )
    bot = Bot(handler)
    async with bot.app:
        for at, text in [
            (0, "+"),
            (5, "+"),
            (14, "?"),
            (16, "?"),
            (16, "+"),
            (25, "?"),
            (27, "?"),
            (36, "?"),
            (47, "?"),
        ]:
            clock.now = 1_000.0 + at
            await process(bot.app, message_update(1, text))
    assert bot.errors == []
    # Idle time (SPEC 4, issue 9 point 14): written at 0, 5 and 16; each read (14, 16, 25, 27,
    # 36) refreshes the expiry, so the value is found; idle from 36 to 47, it expired.
    assert seen == [0, 1, 2, 2, 2, 3, 3, 3, 0]


async def test_migrations_run_via_handler_args(session_storage: Maker, mode: Mode) -> None:
    def add_birthdays(old: dict[str, Any]) -> dict[str, Any]:
        return {"pets": [{"name": name} for name in old["petNames"]]}

    def add_favourite(old: dict[str, Any]) -> dict[str, Any]:
        return {"pets": [{**pet, "favourite": False} for pet in old["pets"]]}

    seen: list[Any] = []

    async def pets(update: Update, context: Any) -> None:
        value = await mode.get(context)
        seen.append(value)
        value["pets"].append({"name": "Tom", "favourite": True})

    storage = session_storage("session")
    await storage.write("1", {"petNames": ["Rex"]})  # stored before migrations existed
    migrations = {1: add_birthdays, 1.5: add_favourite}
    bot = Bot(mode.handler([on_text(pets)], storage, migrations=migrations))
    await bot.send(message_update(1))
    assert bot.errors == []
    assert seen == [
        {"pets": [{"name": "Rex", "favourite": False}, {"name": "Tom", "favourite": True}]}
    ]

    def never(old: Any) -> Any:
        raise AssertionError("the stored value is at version 1.5 already")

    later: list[Any] = []

    async def read(update: Update, context: Any) -> None:
        later.append(await mode.get(context))

    again = Bot(mode.handler([on_text(read)], storage, migrations={1: never, 1.5: never}))
    await again.send(message_update(1))
    assert again.errors == []
    assert later == [
        {"pets": [{"name": "Rex", "favourite": False}, {"name": "Tom", "favourite": True}]}
    ]


# --- 11. failing reads ---------------------------------------------------------------------------


async def test_read_error_reaches_the_error_handler_and_initial_never_replaces_data(
    session_storage: Maker, mode: Mode, typed: bool
) -> None:
    ran: list[int] = []

    async def use(update: Update, context: Any) -> None:
        ran.append(1)
        value = await mode.get(context)
        value["n"] = 0

    spy = Spy(session_storage("session"), fail_read=StorageError("cannot decode session '1'"))
    await spy.inner.write("1", {"n": 7})
    bot = Bot(mode.handler([on_text(use)], spy, initial=lambda: {"n": 0}), typed=typed)
    await bot.send(message_update(1))
    assert [str(e) for e in bot.errors] == ["cannot decode session '1'"]
    assert spy.writes == [] and spy.deletes == []
    assert await spy.inner.read("1") == {"n": 7}
    # strict sessions fail before the handler; lazy ones when awaited
    assert ran == ([1] if mode.name.endswith("lazy") else [])


# --- context handling ----------------------------------------------------------------------------


async def test_previous_session_is_restored_after_the_handler(session_storage: Maker) -> None:
    seen: list[Any] = []

    async def before(update: Update, context: Any) -> None:
        context.session = "outer"

    async def inner(update: Update, context: Any) -> None:
        seen.append(context.session)

    async def after(update: Update, context: Any) -> None:
        seen.append(context.session)

    bot = Bot(
        SessionHandler([on_text(inner)], storage=session_storage("s"), initial=lambda: {"in": 1})
    )
    bot.app.add_handler(TypeHandler(Update, after), group=1)
    bot.app.add_handler(TypeHandler(Update, before), group=-1)
    await bot.send(message_update(1))
    assert bot.errors == []
    assert seen == [{"in": 1}, "outer"]


async def test_previous_session_is_restored_with_session_context(session_storage: Maker) -> None:
    seen: list[Any] = []

    async def first(update: Update, context: SessionContext[Any]) -> None:
        seen.append(context.session)

    async def outside(update: Update, context: SessionContext[Any]) -> None:
        try:
            context.session  # noqa: B018
        except AttributeError as exc:
            seen.append(str(exc))

    bot = Bot(
        SessionHandler([on_text(first)], storage=session_storage("a"), initial=lambda: "A"),
        typed=True,
    )
    bot.app.add_handler(
        SessionHandler([on_text(first)], storage=session_storage("b"), initial=lambda: "B"),
        group=1,
    )
    bot.app.add_handler(TypeHandler(Update, outside), group=2)
    await bot.send(message_update(1))
    assert seen == [
        "A",
        "B",
        "context.session is only available in handlers wrapped by a SessionHandler",
    ]


async def test_nested_session_handlers_restore_the_outer_session(
    session_storage: Maker, typed: bool
) -> None:
    seen: list[Any] = []

    async def inner(update: Update, context: Any) -> None:
        seen.append(context.session)

    async def outer(update: Update, context: Any) -> None:
        seen.append(context.session)

    nested = SessionHandler([on_text(inner)], storage=session_storage("in"), initial=lambda: "in")
    outer_handler = SessionHandler([nested], storage=session_storage("out"), initial=lambda: "out")
    bot = Bot(outer_handler, typed=typed)
    bot.app.add_handler(SessionHandler([on_text(outer)], storage=session_storage("out")), group=1)
    await bot.send(message_update(1))
    assert bot.errors == []
    assert seen == ["in", None]


async def test_first_matching_handler_runs_and_inner_block_is_ignored(
    session_storage: Maker,
) -> None:
    ran: list[str] = []

    async def command(update: Update, context: Any) -> None:
        ran.append("command")
        context.session["n"] = 1

    async def text(update: Update, context: Any) -> None:
        ran.append("text")

    storage = session_storage("s")
    handler = SessionHandler(
        [CommandHandler("go", command, block=False), on_text(text)], storage=storage, initial=dict
    )
    assert handler.check_update(message_update(1, "nothing to see", user_id=1)) is not None
    assert handler.check_update(inline_query_update(1)) is None
    bot = Bot(handler)
    await bot.send(message_update(1, "/go"), message_update(1, "hello"))
    assert ran == ["command", "text"]
    assert await storage.read("1") == {"n": 1}  # saved after the "non-blocking" handler ran


async def test_inside_conversation_states(session_storage: Maker) -> None:
    async def start(update: Update, context: Any) -> int:
        context.session["steps"] = ["start"]
        return 1

    async def step(update: Update, context: Any) -> int:
        context.session["steps"].append(update.effective_message.text)  # type: ignore[union-attr]
        return ConversationHandler.END

    storage = session_storage("s")
    conversation = ConversationHandler(
        entry_points=[
            SessionHandler([CommandHandler("start", start)], storage=storage, initial=dict)
        ],
        states={1: [SessionHandler([on_text(step)], storage=storage)]},
        fallbacks=[],
    )
    bot = Bot(conversation)
    await bot.send(
        message_update(1, "/start"), message_update(1, "pizza"), message_update(1, "more")
    )
    assert bot.errors == []
    assert await storage.read("1") == {"steps": ["start", "pizza"]}


# --- lock="database" -----------------------------------------------------------------------------


async def test_database_lock_is_held_from_load_to_save(session_storage: Maker) -> None:
    async def change(update: Update, context: Any) -> None:
        context.session["n"] += 1

    spy = LockingSpy(session_storage("s"))
    bot = Bot(
        SessionHandler([on_text(change)], storage=spy, initial=lambda: {"n": 0}, lock="database")
    )
    await bot.send(message_update(1))
    assert spy.events == ["lock 1", "read 1", "write 1", "unlock 1"]


async def test_database_lock_lazy_is_taken_only_when_used(session_storage: Maker) -> None:
    async def maybe(update: Update, context: Any) -> None:
        if update.effective_message.text == "use":  # type: ignore[union-attr]
            (await context.session)["n"] += 1

    spy = LockingSpy(session_storage("s"))
    handler = SessionHandler(
        [on_text(maybe)], storage=spy, initial=lambda: {"n": 0}, lazy=True, lock="database"
    )
    await Bot(handler).send(message_update(1, "skip"), message_update(1, "use"))
    assert spy.events == ["lock 1", "read 1", "write 1", "unlock 1"]


async def test_database_lock_needs_a_storage_with_lock() -> None:
    with pytest.raises(ValueError, match="lock='database'"):
        SessionHandler([on_text(lambda u, c: None)], storage=MemoryStorage(), lock="database")  # type: ignore[arg-type,return-value]


# --- construction --------------------------------------------------------------------------------


async def _noop(update: Update, context: Any) -> None:
    pass


def test_persistent_conversation_handler_is_rejected() -> None:
    conversation = ConversationHandler(
        entry_points=[CommandHandler("start", _noop)],
        states={},
        fallbacks=[],
        name="talk",
        persistent=True,
    )
    with pytest.raises(ValueError, match="inside the conversation's states"):
        SessionHandler([conversation], storage=MemoryStorage())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial": dict},
        {"key": by_user},
        {"prefix": "x"},
        {"lazy": True},
        {"ttl": 5},
        {"migrations": {1: dict}},
    ],
)
def test_fragments_with_handler_level_session_args_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SessionHandler([on_text(_noop)], fragments={"a": Fragment()}, **kwargs)


def test_fragments_sharing_storage_and_prefix_are_rejected() -> None:
    storage = MemoryStorage()
    with pytest.raises(ValueError, match="different prefixes"):
        SessionHandler(
            [on_text(_noop)],
            storage=storage,
            fragments={"a": Fragment(), "b": Fragment(key=by_user)},
        )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="lock must be"):
        SessionHandler([on_text(_noop)], storage=MemoryStorage(), lock="table")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a StorageAdapter"):
        SessionHandler([on_text(_noop)], storage=object())
    with pytest.raises(TypeError, match="BaseHandlers"):
        SessionHandler([_noop])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="identifiers"):
        SessionHandler([on_text(_noop)], fragments={"_x": Fragment()})


def test_missing_storage_warns_once_per_handler(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ptb_sessions"):
        single = SessionHandler([on_text(_noop)])
        multi = SessionHandler([on_text(_noop)], fragments={"a": Fragment(), "b": Fragment()})
    warnings = [r.getMessage() for r in caplog.records if "lost on restart" in r.getMessage()]
    assert len(warnings) == 2
    assert "'a', 'b'" in warnings[1]
    assert isinstance(single.storage, MemoryStorage)
    assert multi.storage is None


def test_persistence_is_used_by_namespace() -> None:
    made: list[str] = []

    class FakePersistence:
        def storage(self, namespace: str) -> MemoryStorage:
            made.append(namespace)
            return MemoryStorage()

    persistence = FakePersistence()
    SessionHandler([on_text(_noop)], storage=persistence)
    SessionHandler(
        [on_text(_noop)],
        storage=persistence,
        fragments={"chat": Fragment(), "user": Fragment(key=by_user)},
    )
    assert made == ["session", "chat", "user"]


async def test_non_blocking_session_handler_keeps_its_own_session(session_storage: Maker) -> None:
    release = asyncio.Event()
    seen: list[Any] = []

    async def slow(update: Update, context: SessionContext[dict[str, str]]) -> None:
        await release.wait()  # group 1 runs meanwhile, on the same context object
        seen.append(("slow", context.session["name"]))
        context.session["done"] = "yes"

    async def fast(update: Update, context: SessionContext[dict[str, str]]) -> None:
        seen.append(("fast", context.session["name"]))
        release.set()

    a, b = session_storage("a"), session_storage("b")
    bot = Bot(
        SessionHandler([on_text(slow)], storage=a, initial=lambda: {"name": "A"}, block=False),
        typed=True,
    )
    bot.app.add_handler(
        SessionHandler([on_text(fast)], storage=b, initial=lambda: {"name": "B"}), group=1
    )
    async with bot.app:
        await process(bot.app, message_update(1))
        assert release.is_set()  # group 1 ran while group 0's handler was waiting
        for _ in range(500):  # the non-blocking handler and its save, with real I/O
            if len(seen) == 2 and (await a.read("1") or {}).get("done"):
                break
            await asyncio.sleep(0.01)
    assert bot.errors == []
    assert seen == [("fast", "B"), ("slow", "A")]
    assert await a.read("1") == {"name": "A", "done": "yes"}
    assert await b.read("1") is None


async def test_nested_handlers_on_the_same_storage_and_key_fail_instead_of_hanging(
    session_storage: Maker,
) -> None:
    storage = session_storage("s")
    inner = SessionHandler([on_text(_noop)], storage=storage)
    bot = Bot(SessionHandler([inner], storage=storage))
    await asyncio.wait_for(bot.send(message_update(1)), 5)
    assert len(bot.errors) == 1 and isinstance(bot.errors[0], RuntimeError)
    assert "nested SessionHandlers" in str(bot.errors[0])


async def test_builtin_keys_give_custom_updates_no_key_and_other_keys_become_strings(
    session_storage: Maker,
) -> None:
    raised: list[BaseException] = []

    async def custom(update: object, context: Any) -> None:
        try:
            context.session["x"]
        except SessionKeyError as exc:
            raised.append(exc)

    async def numbered(update: object, context: Any) -> None:
        context.session["n"] = 1

    storage = session_storage("s")
    bot = Bot(SessionHandler([TypeHandler(Keyed, custom)], storage=storage))
    bot.app.add_handler(
        SessionHandler(
            [TypeHandler(Keyed, numbered)],
            storage=storage,
            key=lambda u: 7,
            prefix="n:",
            initial=dict,
        ),  # type: ignore[arg-type,return-value]
        group=1,
    )
    async with bot.app:
        await bot.app.process_update(Keyed("x"))
    assert bot.errors == []
    assert "Keyed update" in str(raised[0]) and "by_chat" in str(raised[0])
    assert await storage.read("n:7") == {"n": 1}
