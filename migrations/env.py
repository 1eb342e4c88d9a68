"""alembic environment: async, reuses a connection handed in by ptb-sessions, else builds an
``AsyncEngine`` with ``NullPool`` from ``-x url=...``, ``PTB_SESSIONS_URL`` or ``alembic.ini``."""

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from ptb_sessions._schema import TABLE_NAME, metadata
from ptb_sessions._url import to_async_url

config = context.config
VERSION_TABLE = "ptb_sessions_alembic_version"


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get(
        "PTB_SESSIONS_URL"
    )
    return url or config.get_main_option("sqlalchemy.url") or "sqlite:///ptb_sessions.sqlite3"


def _include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # The database may hold other tables of the bot: only ours are compared.
    if type_ == "table":
        return name in (TABLE_NAME,)
    return True


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_object=_include_object,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=str(to_async_url(_url())),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_async_engine(to_async_url(_url()), poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_configure)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
