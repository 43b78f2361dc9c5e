"""Lanes put back from the log after the broker lost them (services/queue/lane_rebuild.py),
on PostgreSQL and SQLite: every request the lanes have not reached gets an outbox row at
its lane position, rows still in the outbox stay as they are, finished lanes are left."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import AsyncEngine
from uuid_utils.compat import uuid7

from fairlane_server.core import status
from fairlane_server.core.db import _alembic_config, create_engine, migrate
from fairlane_server.core.models import lanes, outbox, requests, users
from fairlane_server.queue.lane_rebuild import OpenRequest, place, put_back
from tests.integration.conftest import database_at

pytestmark = pytest.mark.integration
ROUTE = "results.rebuilt"
T0 = datetime(2026, 12, 1, tzinfo=UTC)


async def _lane(engine: AsyncEngine, *, accepted: int, last_seq: int) -> uuid.UUID:
    user = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=user, username=f"r-{user.hex}", password_hash="x", created_at=T0
            )
        )
        await conn.execute(
            lanes.insert().values(
                user_id=user,
                created_at=T0,
                last_active_at=T0,
                accepted=accepted,
                last_seq=last_seq,
            )
        )
    return user


async def _request(
    engine: AsyncEngine,
    user: uuid.UUID,
    state: str,
    *,
    lane_pos: int | None,
    lane_seq: int | None = None,
    at: datetime = T0,
    in_outbox: bool = False,
) -> uuid.UUID:
    request_id = uuid7()
    async with engine.begin() as conn:
        await conn.execute(
            requests.insert().values(
                id=request_id,
                user_id=user,
                handler="echo",
                payload=b"",
                status=state,
                max_attempts=3,
                lane_seq=lane_seq,
                lane_pos=lane_pos,
                enqueued_at=at,
            )
        )
        if in_outbox:
            await conn.execute(
                outbox.insert().values(
                    request_id=request_id,
                    user_id=user,
                    lane_pos=lane_pos,
                    reply_route="results.old",
                    created_at=at,
                )
            )
    return request_id


async def _outbox(engine: AsyncEngine) -> dict[uuid.UUID, tuple[uuid.UUID, int, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(
                outbox.c.request_id, outbox.c.user_id, outbox.c.lane_pos, outbox.c.reply_route
            )
        )
        return {r.request_id: (r.user_id, r.lane_pos, r.reply_route) for r in rows}


async def test_unreached_requests_go_back_at_their_positions(engine: AsyncEngine) -> None:
    # Positions 1-2 finished; 3 RUNNING when the broker went; 4 still in the outbox; 5
    # cancelled while queued (its lane has not reached it); 6 and 7 queued.
    user = await _lane(engine, accepted=7, last_seq=2)
    for pos in (1, 2):
        await _request(engine, user, status.SUCCEEDED, lane_pos=pos, lane_seq=pos)
    running = await _request(engine, user, status.RUNNING, lane_pos=3)
    left = await _request(engine, user, status.QUEUED, lane_pos=4, in_outbox=True)
    cancelled = await _request(engine, user, status.CANCELLED, lane_pos=5)
    queued = [await _request(engine, user, status.QUEUED, lane_pos=p) for p in (6, 7)]
    # A lane with nothing unfinished is left alone.
    done = await _lane(engine, accepted=1, last_seq=1)
    await _request(engine, done, status.SUCCEEDED, lane_pos=1, lane_seq=1)

    assert await put_back(engine, reply_route=ROUTE) == {user: 4}
    assert await _outbox(engine) == {
        running: (user, 3, ROUTE),
        left: (user, 4, "results.old"),
        cancelled: (user, 5, ROUTE),
        queued[0]: (user, 6, ROUTE),
        queued[1]: (user, 7, ROUTE),
    }
    # A second start puts back nothing more: every one of them has its row.
    assert await put_back(engine, reply_route=ROUTE) == {}


async def test_requests_from_before_lane_positions_take_the_free_ones_by_time(
    engine: AsyncEngine,
) -> None:
    # Accepted before migration 0010: no lane_pos. Positions 2-5 are unreached; 3 is known.
    user = await _lane(engine, accepted=5, last_seq=1)
    await _request(engine, user, status.SUCCEEDED, lane_pos=None, lane_seq=1)
    late = await _request(engine, user, status.QUEUED, lane_pos=None, at=T0 + timedelta(2))
    known = await _request(engine, user, status.QUEUED, lane_pos=3)
    early = await _request(engine, user, status.QUEUED, lane_pos=None, at=T0 + timedelta(1))
    middle = await _request(engine, user, status.RUNNING, lane_pos=None, at=T0 + timedelta(1.5))

    assert await put_back(engine, reply_route=ROUTE) == {user: 4}
    assert {r: pos for r, (_, pos, _) in (await _outbox(engine)).items()} == {
        early: 2,
        known: 3,
        middle: 4,
        late: 5,
    }


def test_place_leaves_what_finds_no_free_position() -> None:
    a, b, c = (OpenRequest(uuid.uuid4(), None, T0 + timedelta(seconds=s)) for s in (3, 1, 2))
    placed, left = place(4, 6, {5}, [a, b, c])
    assert placed == [(b, 4), (c, 6)]
    assert left == [a]


# -- migration 0010 -----------------------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
async def at_0009(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """(url, schema) of a database migrated to 0009, of each kind."""
    async with database_at(request.param, tmp_path, "0009") as at:
        yield at


async def _columns(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return await conn.run_sync(
            lambda sync: {c["name"] for c in sa.inspect(sync).get_columns("requests")}
        )


async def test_migration_0010_adds_and_drops_lane_pos_keeping_the_requests(
    at_0009: tuple[str, str],
) -> None:
    url, schema = at_0009
    engine = create_engine(url, schema=schema, pool_size=1)
    try:
        user = await _lane(engine, accepted=1, last_seq=0)
        request_id = uuid7()
        async with engine.begin() as conn:
            # The columns of 0009 only.
            await conn.execute(
                sa.text(
                    "INSERT INTO requests (id, user_id, handler, payload, client_ref, status,"
                    " attempts, max_attempts, enqueued_at, trace_id, cancel_requested)"
                    " VALUES (:id, :u, 'echo', :p, '', 'QUEUED', 0, 3, :at, '', false)"
                ),
                {"id": _db_id(engine, request_id), "u": _db_id(engine, user), "p": b"", "at": T0},
            )
        assert "lane_pos" not in await _columns(engine)

        await migrate(url, schema=schema, revision="0010")
        assert "lane_pos" in await _columns(engine)
        # A request from before has no position: it goes back by its time.
        assert await put_back(engine, reply_route=ROUTE) == {user: 1}
        assert (await _outbox(engine))[request_id][1] == 1

        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.downgrade(_alembic_config(sync), "0009"))
        assert "lane_pos" not in await _columns(engine)
        async with engine.connect() as conn:
            kept = (await conn.execute(sa.text("SELECT status FROM requests"))).scalars().all()
        assert kept == ["QUEUED"]
        await migrate(url, schema=schema)
    finally:
        await engine.dispose()


def _db_id(engine: AsyncEngine, value: uuid.UUID) -> object:
    # A raw statement binds what the driver takes: asyncpg a UUID, SQLite SQLAlchemy's hex.
    return value if engine.dialect.name == "postgresql" else value.hex
