"""ptb-sessions: durable, scalable per-chat state for python-telegram-bot.

:class:`SQLAlchemyPersistence` stores PTB's user_data, chat_data, bot_data, callback_data and
conversation states one row per key in any database SQLAlchemy speaks, and
:class:`SessionHandler` brings grammY's sessions to PTB as ``context.session``.
"""

from ptb_sessions._errors import (
    ConflictError,
    MigrationError,
    PTBSessionsError,
    SchemaError,
    SerializationError,
    SessionKeyError,
    StorageError,
)

__all__ = [
    "ConflictError",
    "MigrationError",
    "PTBSessionsError",
    "SchemaError",
    "SerializationError",
    "SessionKeyError",
    "StorageError",
]

__version__ = "0.1.0"
