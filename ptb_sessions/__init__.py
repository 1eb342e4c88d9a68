"""ptb-sessions: durable, scalable per-chat state for python-telegram-bot.

:class:`SQLAlchemyPersistence` stores PTB's user_data, chat_data, bot_data, callback_data and
conversation states one row per key in any database SQLAlchemy speaks, and
:class:`SessionHandler` brings grammY's sessions to PTB as ``context.session``.
"""

from ptb_sessions._chatmigration import ChatMigrationHandler
from ptb_sessions._codec import Codec, JSONCodec, PickleCodec
from ptb_sessions._errors import (
    ConflictError,
    MigrationError,
    PTBSessionsError,
    SchemaError,
    SerializationError,
    SessionKeyError,
    StorageError,
)
from ptb_sessions._keys import by_chat, by_chat_and_thread, by_user, by_user_and_chat
from ptb_sessions._sessionhandler import Fragment, LazySession, SessionContext, SessionHandler
from ptb_sessions._sqlalchemypersistence import SQLAlchemyPersistence
from ptb_sessions._updateprocessor import SequentialUpdateProcessor
from ptb_sessions.storage import MemoryStorage, StorageAdapter, enhance_storage
from ptb_sessions.storage._sqlalchemy import SQLAlchemyStorage

__all__ = [
    "ChatMigrationHandler",
    "Codec",
    "ConflictError",
    "Fragment",
    "JSONCodec",
    "LazySession",
    "MemoryStorage",
    "MigrationError",
    "PTBSessionsError",
    "PickleCodec",
    "SQLAlchemyPersistence",
    "SQLAlchemyStorage",
    "SchemaError",
    "SequentialUpdateProcessor",
    "SerializationError",
    "SessionContext",
    "SessionHandler",
    "SessionKeyError",
    "StorageAdapter",
    "StorageError",
    "by_chat",
    "by_chat_and_thread",
    "by_user",
    "by_user_and_chat",
    "enhance_storage",
]

__version__ = "0.1.0"
