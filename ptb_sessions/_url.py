"""Database URLs: plain sync URLs mapped to their asyncio drivers, passwords masked."""

import re
from pathlib import Path
from urllib.parse import quote, unquote

from sqlalchemy.engine import URL, make_url

__all__ = [
    "DEFAULT_URL",
    "mask_secrets",
    "mask_url",
    "parse_url",
    "sqlite_path",
    "to_async_url",
    "url_secrets",
]

DEFAULT_URL = "sqlite+aiosqlite:///ptb_sessions.sqlite3"
#: The query parameters that carry a password (``?password=...``).
PASSWORD_PARAMETERS = frozenset({"password", "passwd"})
_MASK = "***"
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd)=)[^&#]*", re.IGNORECASE)

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+psycopg2": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+asyncpg",
    "mysql": "mysql+asyncmy",
    "mysql+pymysql": "mysql+asyncmy",
    "mysql+mysqldb": "mysql+asyncmy",
    "mariadb": "mariadb+asyncmy",
    "mariadb+pymysql": "mariadb+asyncmy",
    "mariadb+mysqldb": "mariadb+asyncmy",
}


def _split_credentials(url: str) -> tuple[str, str, str] | None:
    """``(scheme://, user:password, @host...)`` of ``url``, the credentials ending at the
    *last* ``@`` before the path, so a password may contain ``@``; :obj:`None` if there are
    no credentials."""
    head, sep, rest = url.partition("://")
    if not sep:
        return None
    authority_end = len(rest)
    for stop in ("?", "#"):
        if stop in rest:
            authority_end = min(authority_end, rest.index(stop))
    at = rest.rfind("@", 0, authority_end)
    if at < 0:
        return None
    return f"{head}://", rest[:at], rest[at:]


def parse_url(url: str) -> URL:
    """``url`` parsed by SQLAlchemy, except that a password may contain an unescaped ``@``
    (``user:p@ss@host``): the host starts after the last ``@``, as browsers and :mod:`urllib`
    read it.

    Raises:
        sqlalchemy.exc.ArgumentError: ``url`` is not a URL.
        ValueError: ``url`` has a bad port.
    """
    parts = _split_credentials(url)
    if parts is not None and "@" in parts[1]:
        scheme, credentials, host = parts
        user, colon, password = credentials.partition(":")
        escaped = quote(unquote(user), safe="") + colon + quote(unquote(password), safe="")
        url = scheme + escaped + host
    return make_url(url)


def to_async_url(url: str | URL) -> URL:
    """Return ``url`` with its sync driver replaced by the asyncio one (``sqlite://`` ->
    ``sqlite+aiosqlite://``, ``postgresql://`` -> ``postgresql+asyncpg://``, ``mysql://`` ->
    ``mysql+asyncmy://``). URLs that already name an asyncio driver are returned unchanged.

    Raises:
        ValueError: The URL cannot be parsed. The message does not contain the password.
    """
    try:
        parsed = parse_url(url) if isinstance(url, str) else url
    except Exception as exc:  # sqlalchemy.exc.ArgumentError, ValueError
        reason = mask_secrets(str(exc), url)
        raise ValueError(f"Invalid database URL {mask_url(str(url))!r}: {reason}") from None
    if parsed.get_backend_name() == "sqlite" and parsed.host:
        raise ValueError(
            f"Invalid database URL {mask_url(parsed)!r}: an SQLite URL names its file after "
            f"three slashes (sqlite:///{_file_of(parsed)} for a file in the current "
            "directory, sqlite:////abs/path.db for an absolute path)"
        )
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver is not None:
        parsed = parsed.set(drivername=driver)
    return parsed


def _file_of(url: URL) -> str:
    """What ``sqlite://host/path`` meant as its file: ``host/path``."""
    return "/".join(part for part in (url.host, url.database) if part)


def url_secrets(url: str | URL) -> list[str]:
    """The passwords in ``url``: the one after ``user:`` and those of ``?password=``."""
    try:
        parsed = parse_url(url) if isinstance(url, str) else url
    except Exception:
        text = str(url)
        parts = _split_credentials(text)
        password = parts[1].partition(":")[2] if parts is not None else ""
        query = [m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(text)]
        return [secret for secret in (password, *query) if secret]
    found = [str(parsed.password)] if parsed.password else []
    for name, value in parsed.query.items():
        if name.lower() in PASSWORD_PARAMETERS:
            values = (value,) if isinstance(value, str) else value
            found.extend(v for v in values if v)
    return found


def mask_secrets(text: str, url: str | URL) -> str:
    """``text`` with every password of ``url`` (and its URL-escaped form) replaced by
    ``***``."""
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            text = text.replace(form, _MASK)
    return text


def mask_url(url: str | URL) -> str:
    """Return ``url`` as a string with its passwords replaced by ``***``: the one after
    ``user:`` (even if it contains ``@``) and those of ``?password=``."""
    if isinstance(url, URL):
        return _QUERY_PASSWORD.sub(rf"\g<1>{_MASK}", url.render_as_string(hide_password=True))
    try:
        return mask_url(parse_url(url))
    except Exception:
        # Unparseable: mask the credentials and the query passwords by hand.
        parts = _split_credentials(url)
        if parts is not None:
            scheme, credentials, host = parts
            user, colon, _ = credentials.partition(":")
            url = f"{scheme}{user}{colon}{_MASK if colon else ''}{host}"
        return _QUERY_PASSWORD.sub(rf"\g<1>{_MASK}", url)


def sqlite_path(url: URL) -> Path | None:
    """The file of an SQLite URL, or :obj:`None` (not SQLite, or an in-memory database)."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)
