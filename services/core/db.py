"""Database engine and migrations: asyncpg for PostgreSQL, aiosqlite for the embedded default."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class MigrationRefused(RuntimeError):
    """A migration found data it cannot change safely and changed nothing; the message
    says what an operator must fix before migrating again."""


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


WRITE_LOCK_OPTION = "fairlane_write_lock"


@contextlib.asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that reads rows and then writes depending on them. PostgreSQL takes
    row locks (SELECT ... FOR UPDATE) for that; SQLite gets its write lock at BEGIN."""
    async with engine.connect() as plain:
        conn = await plain.execution_options(**{WRITE_LOCK_OPTION: True})
        async with conn.begin():
            yield conn


@contextlib.asynccontextmanager
async def one_statement(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A connection for work that is one statement, which on PostgreSQL is its own
    transaction (autocommit): one round trip where SQLAlchemy's implicit transaction
    costs three (BEGIN, the statement, COMMIT or ROLLBACK), each waiting for a turn of a
    busy event loop. SQLite gets a plain connection: its BEGIN is ours (create_engine)."""
    async with engine.connect() as plain:
        if engine.dialect.name == "postgresql":
            yield await plain.execution_options(isolation_level="AUTOCOMMIT")
        else:
            yield plain


def create_engine(
    url: str, *, schema: str = "", pool_size: int = 10, timeout: float = 10.0
) -> AsyncEngine:
    """An engine whose connections all use `schema` (PostgreSQL) so tests can be isolated."""
    if is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers run beside the one writer; foreign keys are off by default.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()
            # SQLAlchemy emits BEGIN itself (below) instead of the driver's late, deferred
            # one, so a transaction can take the write lock before it reads.
            dbapi_conn.isolation_level = None

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Connection) -> None:
            # SQLite has no SELECT ... FOR UPDATE: a read-then-write transaction (the
            # worker's outcomes against a client's cancel) must hold the write lock from
            # its start, or the other side commits between its read and its write.
            immediate = conn.get_execution_options().get(WRITE_LOCK_OPTION)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    # Every statement and every connection attempt is bounded, so a dead database turns
    # into errors the services can answer with, not calls that hang.
    connect_args: dict[str, Any] = {"command_timeout": timeout, "timeout": timeout}
    if schema:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"invalid schema name {schema!r}")
        connect_args["server_settings"] = {"search_path": schema}
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        pool_recycle=1800,
        pool_timeout=timeout,
        connect_args=connect_args,
    )


def _alembic_config(connection: Connection) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def migrate(url: str, *, schema: str = "", revision: str = "head") -> None:
    """Bring the database to `revision` (Alembic), creating the schema first if needed."""
    # Imported here: only `migrate` and `dev` need Alembic, and importing it costs every
    # service process about a quarter of a second at start.
    from alembic import command

    engine = create_engine(url, schema=schema, pool_size=1)
    try:
        if schema and not is_sqlite(url):
            async with engine.begin() as conn:
                await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.upgrade(_alembic_config(sync), revision))
    finally:
        await engine.dispose()


async def drop_schema(url: str, schema: str) -> None:
    engine = create_engine(url, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await engine.dispose()


def run_migrate(url: str, schema: str = "") -> None:
    asyncio.run(migrate(url, schema=schema))


def upsert(dialect: str, table: sa.Table) -> Any:
    """The dialect's INSERT with ON CONFLICT support (PostgreSQL and SQLite share the API)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def engine_for(settings: Any) -> AsyncEngine:
    """The engine a service gets from its settings (fairlane_server.core.settings.Settings)."""
    return create_engine(
        settings.database_url,
        schema=settings.database_schema,
        pool_size=settings.database_pool_size,
        timeout=settings.database_timeout_seconds,
    )
