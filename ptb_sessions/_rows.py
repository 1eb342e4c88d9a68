"""Values in rows: encoding with the codec (bytes as base64, a size limit) and decoding with
errors that name the namespace and key. Shared by the persistence and the session storage."""

from __future__ import annotations

import base64
from typing import Any

from ptb_sessions._codec import Codec
from ptb_sessions._errors import SerializationError, StorageError
from ptb_sessions._store import Record

__all__ = ["DEFAULT_MAX_VALUE_SIZE", "decode_record", "encode_value"]

#: The default limit of one encoded value: 1 MiB.
DEFAULT_MAX_VALUE_SIZE = 1 << 20


def encode_value(codec: Codec, value: Any, root: str, max_size: int | None) -> tuple[str, str]:
    """Encode ``value`` for a row: ``(codec name, text)``; bytes are stored as base64.

    Raises:
        SerializationError: The value cannot be encoded, or is larger than ``max_size``.
    """
    try:
        encoded = codec.encode(value)
    except SerializationError as exc:
        raise exc.located(root) from None
    if isinstance(encoded, bytes):
        encoded = base64.b64encode(encoded).decode("ascii")
    size = len(encoded)
    if not encoded.isascii():
        # The database stores UTF-8: a lone surrogate cannot be stored at all (the driver
        # would fail with a bare UnicodeEncodeError), and the limit counts bytes.
        try:
            size = len(encoded.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise SerializationError(
                f"the value contains text that is not valid Unicode (the lone surrogate "
                f"{exc.object[exc.start : exc.end]!r}), which cannot be stored",
                root=root,
            ) from None
    if max_size is not None and size > max_size:
        raise SerializationError(
            f"the encoded value is {size:,} bytes, more than the limit of "
            f"{max_size:,} (max_value_size)",
            root=root,
        )
    return codec.name, encoded


def decode_record(codec: Codec, record: Record, namespace: str, key: str) -> Any:
    """Decode a row's value.

    Raises:
        StorageError: The row holds no value, was written by another codec, or cannot be
            decoded. The message names ``namespace`` and ``key``.
    """
    where = f"{namespace}[{key!r}]"
    if record.data is None:
        raise StorageError(f"The stored row of {where} holds no value (NULL)")
    if record.codec != codec.name:
        raise StorageError(
            f"The stored row of {where} was written with the codec {record.codec!r}, but this "
            f"persistence uses {codec.name!r}; it is not decoded"
        )
    data: str | bytes = record.data
    try:
        if codec.name != "json":
            data = base64.b64decode(record.data.encode("ascii"), validate=True)
        return codec.decode(data)
    except Exception as exc:
        raise StorageError(
            f"The stored row of {where} cannot be decoded: {type(exc).__name__}: {exc}"
        ) from exc
