"""The exceptions of ptb-sessions. Every one says what went wrong and, where possible, the fix."""

__all__ = [
    "ConflictError",
    "MigrationError",
    "PTBSessionsError",
    "SchemaError",
    "SerializationError",
    "SessionKeyError",
    "StorageError",
]


class PTBSessionsError(Exception):
    """Base class of every error raised by ptb-sessions."""

    __slots__ = ()


class SessionKeyError(PTBSessionsError):
    """``context.session`` was used on an update for which the session key function returned
    :obj:`None` (e.g. an inline query with :func:`~ptb_sessions.by_chat`)."""

    __slots__ = ()


class SerializationError(PTBSessionsError, TypeError):
    """A value cannot be encoded by the codec. The message names where the value sits, e.g.
    ``chat_data[-1001234]['cart'][2]: Lock is not serializable``.

    Args:
        reason: Why the value cannot be encoded, e.g. ``Lock is not serializable``.
        path: Where the value sits below the root, e.g. ``['cart'][2]``.
        root: What the root is, e.g. ``chat_data[-1001234]``.

    Attributes:
        reason (:obj:`str`): Why the value cannot be encoded.
        path (:obj:`str`): Where the value sits below the root.
        root (:obj:`str`): What the root is.
    """

    def __init__(self, reason: str, *, path: str = "", root: str = "value") -> None:
        self.reason = reason
        self.path = path
        self.root = root
        super().__init__(f"{root}{path}: {reason}")

    def located(self, root: str) -> "SerializationError":
        """Return a copy of this error whose path starts at ``root`` (e.g. ``chat_data[42]``)."""
        return SerializationError(self.reason, path=self.path, root=root)


class StorageError(PTBSessionsError):
    """The database could not be read or written, or a stored row cannot be decoded. The
    message names the namespace and key concerned. Stored data is never replaced because of it."""

    __slots__ = ()


class SchemaError(StorageError):
    """The database schema is not at the revision this version of ptb-sessions needs. The
    message names both revisions and the command that upgrades the database."""

    __slots__ = ()


class MigrationError(PTBSessionsError):
    """A versioned data migration failed, or a stored value has a newer version than the latest
    known migration. The stored value is left as it was."""

    __slots__ = ()


class ConflictError(StorageError):
    """A write was based on a stale version of a row: another process (or task) wrote it since it
    was read. Nothing was overwritten; the write was dropped and the key will be read again."""

    __slots__ = ()
