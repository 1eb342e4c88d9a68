"""Storage adapters for sessions: the :class:`StorageAdapter` protocol, :class:`MemoryStorage`
and :func:`enhance_storage` (timeouts and data migrations for any adapter)."""

from ptb_sessions._rowpolicy import apply_migrations, normalize_ttl, sorted_migrations
from ptb_sessions.storage._base import (
    MAX_READ_VERSIONS,
    ReadVersions,
    StorageAdapter,
    conflict_error,
)
from ptb_sessions.storage._enhance import (
    RECORD_MARKER,
    enhance_storage,
    is_record,
    make_record,
    parse_record,
)
from ptb_sessions.storage._memory import MemoryStorage

__all__ = [
    "MAX_READ_VERSIONS",
    "RECORD_MARKER",
    "MemoryStorage",
    "ReadVersions",
    "StorageAdapter",
    "apply_migrations",
    "conflict_error",
    "enhance_storage",
    "is_record",
    "make_record",
    "normalize_ttl",
    "parse_record",
    "sorted_migrations",
]
