"""Values in rows: the codec's output as the text of the ``data`` column, and back.

The ``data`` column holds text. What the codec returns goes there as follows:

* ``str``: as it is, unless it starts with ``base64:`` or ``text:`` (then ``text:`` is put in
  front), so JSON stays readable in SQL;
* ``bytes``: ``base64:`` followed by the bytes in base64.

Rows written before this layout, by a codec other than ``"json"``, hold bare base64; they are
still read. Shared by the persistence, the session storages and the job store.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Final

from ptb_sessions._codec import Codec
from ptb_sessions._errors import SerializationError, StorageError
from ptb_sessions._store import Record

__all__ = ["DEFAULT_MAX_VALUE_SIZE", "decode_record", "encode_value"]

#: The default limit of one encoded value: 1 MiB.
DEFAULT_MAX_VALUE_SIZE = 1 << 20

_BYTES: Final = "base64:"
_TEXT: Final = "text:"
_PREFIXES: Final = (_BYTES, _TEXT)


def _as_text(encoded: str | bytes) -> str:
    if not isinstance(encoded, str):  # one check for the common case: a str codec
        return _BYTES + base64.b64encode(encoded).decode("ascii")
    if encoded.startswith(_PREFIXES):
        return _TEXT + encoded
    return encoded


def _size(text: str, root: str) -> int:
    if text.isascii():
        return len(text)
    # The database stores UTF-8: a lone surrogate cannot be stored at all (the driver would
    # fail with a bare UnicodeEncodeError), and the limit counts bytes.
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"the value contains text that is not valid Unicode (the lone surrogate "
            f"{exc.object[exc.start : exc.end]!r}), which cannot be stored",
            root=root,
        ) from None


def encode_value(codec: Codec, value: Any, root: str, max_size: int | None) -> tuple[str, str]:
    """Encode ``value`` for a row: ``(codec name, text of the data column)``.

    Raises:
        SerializationError: The value cannot be encoded, or is larger than ``max_size``.
    """
    try:
        encoded = codec.encode(value)
    except SerializationError as exc:
        raise exc.located(root) from None
    text = _as_text(encoded)
    size = _size(text, root)
    if max_size is not None and size > max_size:
        raise SerializationError(
            f"the encoded value is {size:,} bytes, more than the limit of "
            f"{max_size:,} (max_value_size)",
            root=root,
        )
    return codec.name, text


def _decode_legacy(codec: Codec, data: str) -> Any:
    """A row of the earlier layout: bare base64 for every codec but ``"json"``."""
    try:
        return codec.decode(data)
    except Exception:
        try:
            raw = base64.b64decode(data.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError("the data is neither the codec's text nor base64") from None
        return codec.decode(raw)


def _decode_text(codec: Codec, data: str) -> Any:
    if not data.startswith(_PREFIXES):  # the common case: the codec's text as it is
        return codec.decode(data) if codec.name == "json" else _decode_legacy(codec, data)
    if data.startswith(_BYTES):
        return codec.decode(base64.b64decode(data[len(_BYTES) :].encode("ascii"), validate=True))
    return codec.decode(data[len(_TEXT) :])


def decode_record(codec: Codec, record: Record, namespace: str, key: str) -> Any:
    """Decode a row's value.

    Raises:
        StorageError: The row holds no value, was written by another codec, or cannot be
            decoded. The message names ``namespace`` and ``key``.
    """
    if record.data is None:
        raise StorageError(f"The stored row of {namespace}[{key!r}] holds no value (NULL)")
    if record.codec != codec.name:
        raise StorageError(
            f"The stored row of {namespace}[{key!r}] was written with the codec "
            f"{record.codec!r}, but this persistence uses {codec.name!r}; it is not decoded"
        )
    try:
        return _decode_text(codec, record.data)
    except Exception as exc:
        raise StorageError(
            f"The stored row of {namespace}[{key!r}] cannot be decoded: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
