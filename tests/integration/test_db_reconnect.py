"""Pooled connections the database dropped while they sat idle (a restart, a proxy's idle
timeout), on the real PostgreSQL. The pool does not ping a connection before each use (that
was three round trips per checkout on asyncpg); the first statement on a dead connection
fails as a transient error, which every caller retries or answers with UNAVAILABLE, and the
whole pool is replaced with it, so the next statement works."""

from __future__ import annotations

import contextlib

import pytest
import sqlalchemy as sa

from fairlane_server.core import dberrors
from fairlane_server.core.db import create_engine
from tests.conftest import DATABASE_URL

pytestmark = pytest.mark.integration


async def test_a_pool_dropped_by_the_database_fails_one_statement_then_reconnects(
    pg_schema: str,
) -> None:
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=3)
    killer = create_engine(DATABASE_URL, pool_size=1)
    try:
        # Three connections in the pool, each with its backend's pid.
        async with contextlib.AsyncExitStack() as held:
            conns = [await held.enter_async_context(engine.connect()) for _ in range(3)]
            pids = [
                (await c.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one() for c in conns
            ]
            for c in conns:
                await c.rollback()
        assert len(set(pids)) == 3

        # The database drops all of them while they are idle in the pool.
        async with killer.connect() as k:
            ended = (
                await k.execute(
                    sa.text(
                        "SELECT count(*) FROM unnest(CAST(:p AS int[])) AS p"
                        " WHERE pg_terminate_backend(p)"
                    ),
                    {"p": pids},
                )
            ).scalar_one()
        assert ended == 3

        with pytest.raises(sa.exc.DBAPIError) as failed:
            async with engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        assert dberrors.is_transient(failed.value)

        # The pool was replaced as a whole: every connection after that one is new and works.
        async with contextlib.AsyncExitStack() as held:
            conns = [await held.enter_async_context(engine.connect()) for _ in range(3)]
            for c in conns:
                pid = (await c.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
                assert pid not in pids
    finally:
        await engine.dispose()
        await killer.dispose()
