"""``SessionContext``: a :class:`~telegram.ext.CallbackContext` with a typed ``session``."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from telegram.ext import CallbackContext, ExtBot

if TYPE_CHECKING:
    from ptb_sessions._sessioncore import Binding

__all__ = ["SessionContext"]

S = TypeVar("S")

current_binding: ContextVar[Binding | None] = ContextVar("ptb_sessions_binding", default=None)
"""The session of the :class:`~ptb_sessions.SessionHandler` running in this task. A context
variable rather than an attribute of the (shared) context object, so a ``block=False``
session handler, which runs in a task of its own, never sees or clobbers another's session."""


class SessionContext(
    CallbackContext[ExtBot[None], dict[Any, Any], dict[Any, Any], dict[Any, Any]], Generic[S]
):
    """A :class:`~telegram.ext.CallbackContext` whose :attr:`session` is typed: the
    ``SessionFlavor`` of grammY. Use it with :class:`~telegram.ext.ContextTypes`::

        class Data(TypedDict):
            pizzas: int

        Context = SessionContext[Data]

        app = Application.builder().token(TOKEN).context_types(
            ContextTypes(context=SessionContext)
        ).build()

        async def hunger(update: Update, context: Context) -> None:
            await update.effective_message.reply_text(f"{context.session['pizzas']} pizzas")

    In a lazy session, type it as ``SessionContext[LazySession[Data]]``; in a multi session, as
    ``SessionContext[Fragments]`` where ``Fragments`` declares one attribute per fragment
    (e.g. a :class:`typing.Protocol`).

    Compared with a plain :class:`~telegram.ext.CallbackContext` (which also works: the session
    is then a plain attribute), reading or assigning :attr:`session` of an update without a
    session key raises at once, a lazy :attr:`session` stays awaitable after an assignment, and
    session handlers with ``block=False`` are safe: the session belongs to the task that runs
    the handler, not to the context object that all handler groups share.
    """

    __slots__ = ()

    @property
    def session(self) -> S:
        """The session of the :class:`~ptb_sessions.SessionHandler` that runs the current
        handler: the value (strict), a :class:`~ptb_sessions.LazySession` (lazy) or an object
        with one attribute per fragment (multi). Assign to replace it; :obj:`None` deletes it.

        Raises:
            ptb_sessions.SessionKeyError: The update has no session key.
            AttributeError: Not inside a :class:`~ptb_sessions.SessionHandler`.
        """
        binding = current_binding.get()
        if binding is None:
            raise AttributeError(
                "context.session is only available in handlers wrapped by a SessionHandler"
            )
        return binding.get()  # type: ignore[no-any-return]

    @session.setter
    def session(self, value: object) -> None:
        binding = current_binding.get()
        if binding is None:
            raise AttributeError(
                "context.session is only available in handlers wrapped by a SessionHandler"
            )
        binding.set(value)
