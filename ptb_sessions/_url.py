"""Database URLs: plain sync URLs mapped to their asyncio drivers, passwords masked."""

from sqlalchemy.engine import URL, make_url

__all__ = ["DEFAULT_URL", "mask_url", "to_async_url"]

DEFAULT_URL = "sqlite+aiosqlite:///ptb_sessions.sqlite3"

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


def to_async_url(url: str | URL) -> URL:
    """Return ``url`` with its sync driver replaced by the asyncio one (``sqlite://`` ->
    ``sqlite+aiosqlite://``, ``postgresql://`` -> ``postgresql+asyncpg://``, ``mysql://`` ->
    ``mysql+asyncmy://``). URLs that already name an asyncio driver are returned unchanged.

    Raises:
        ValueError: The URL cannot be parsed. The message does not contain the password.
    """
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except Exception as exc:  # sqlalchemy.exc.ArgumentError, ValueError
        raise ValueError(f"Invalid database URL {mask_url(str(url))!r}: {exc}") from None
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver is not None:
        parsed = parsed.set(drivername=driver)
    return parsed


def mask_url(url: str | URL) -> str:
    """Return ``url`` as a string with its password replaced by ``***``."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        # Unparseable: mask anything between "://user:" and "@" by hand.
        head, sep, rest = url.partition("://")
        if sep and "@" in rest:
            creds, _, host = rest.rpartition("@")
            user = creds.split(":", 1)[0]
            return f"{head}://{user}:***@{host}"
        return url
