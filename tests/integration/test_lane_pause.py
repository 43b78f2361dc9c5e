"""A lane pause in the request log (lanes.paused_at, migration 0009), on PostgreSQL and
SQLite: the worker stores and lifts it, ListLanes lists every paused lane (idle or not), the
janitor never deletes a paused lane's queue, and the migration goes up and down."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core.db import _alembic_config, create_engine, migrate
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.models import lanes, users
from fairlane_server.queue.hub import Hub
from fairlane_server.queue.janitor import LaneJanitor
from fairlane_server.queue.lane_store import LaneHousekeepingStore
from fairlane_server.queue.store import RequestStore
from fairlane_server.worker.store import WorkerStore
from tests.conftest import unique
from tests.integration.conftest import database_at

pytestmark = pytest.mark.integration
IDLE = 60.0


async def add_idle_lanes(engine: AsyncEngine, count: int) -> list[uuid.UUID]:
    """Users with a lane row, idle for the janitor and for ListLanes, nothing pending."""
    at = datetime.now(UTC) - timedelta(seconds=IDLE * 2)
    ids = [uuid.uuid4() for _ in range(count)]
    async with engine.begin() as conn:
        await conn.execute(
            users.insert(),
            [
                {"id": u, "username": f"p-{u.hex}", "password_hash": "x", "created_at": at}
                for u in ids
            ],
        )
        await conn.execute(
            lanes.insert(),
            [{"user_id": u, "created_at": at, "last_active_at": at} for u in ids],
        )
    return ids


async def paused_at(engine: AsyncEngine, user_id: uuid.UUID) -> datetime | None:
    async with engine.connect() as conn:
        value: datetime | None = (
            await conn.execute(sa.select(lanes.c.paused_at).where(lanes.c.user_id == user_id))
        ).scalar_one()
    return value


async def listed(engine: AsyncEngine) -> dict[uuid.UUID, datetime | None]:
    """What ListLanes lists: user id -> paused_at."""
    rows = await RequestStore(engine).lanes(after=None, limit=100, idle_seconds=IDLE)
    return {r.user_id: r.paused_at for r in rows}


async def test_a_pause_is_stored_listed_while_idle_and_lifted(engine: AsyncEngine) -> None:
    store = WorkerStore(engine)
    paused, other = await add_idle_lanes(engine, 2)
    assert await listed(engine) == {}  # idle lanes are not listed

    assert not await store.set_lane_paused(uuid.uuid4(), True)  # no such lane
    assert await store.set_lane_paused(paused, True)
    first = await paused_at(engine, paused)
    assert first is not None
    assert await paused_at(engine, other) is None
    # Listed although idle, with the time of the pause: every worker replica learns it.
    assert await listed(engine) == {paused: first}
    assert await store.paused_lanes() == {str(paused)}
    # What a replica reads after an announcement: the lane's state, None for no lane.
    assert (await store.lane_paused(paused), await store.lane_paused(other)) == (True, False)
    assert await store.lane_paused(uuid.uuid4()) is None
    # Pausing again keeps the time of the first pause.
    assert await store.set_lane_paused(paused, True)
    assert await paused_at(engine, paused) == first

    assert await store.set_lane_paused(paused, False)
    assert await paused_at(engine, paused) is None
    assert await listed(engine) == {}
    assert await store.paused_lanes() == set()
    assert await store.lane_paused(paused) is False
    assert not await store.set_lane_paused(uuid.uuid4(), False)


async def test_the_janitor_keeps_a_paused_idle_lane_until_it_is_resumed(
    engine: AsyncEngine,
) -> None:
    broker = MemoryBroker(lane_max_length=5)
    await broker.connect()
    try:
        paused, idle = await add_idle_lanes(engine, 2)
        for lane in (paused, idle):
            await broker.declare_lane(str(lane))
        store = WorkerStore(engine)
        await store.set_lane_paused(paused, True)
        janitor = LaneJanitor(
            RequestStore(engine),
            LaneHousekeepingStore(engine),
            broker,
            Hub(),
            idle_seconds=IDLE,
        )
        assert await janitor.sweep() == [str(idle)]
        assert await janitor.sweep() == []
        assert await broker.lane_stats(str(paused)) is not None
        assert await LaneHousekeepingStore(engine).deleted_at(paused) is None
        assert paused not in await RequestStore(engine).idle_lanes(IDLE)

        await store.set_lane_paused(paused, False)
        assert paused in await RequestStore(engine).idle_lanes(IDLE)
        assert await janitor.sweep() == [str(paused)]
        assert await broker.lane_stats(str(paused)) is None
    finally:
        await broker.close()


async def test_a_pause_between_the_janitor_read_and_its_claim_keeps_the_lane(
    engine: AsyncEngine,
) -> None:
    (lane,) = await add_idle_lanes(engine, 1)
    housekeeping = LaneHousekeepingStore(engine)
    (seen,) = await housekeeping.idle_page(after=None, limit=10, idle_seconds=IDLE)
    await WorkerStore(engine).set_lane_paused(lane, True)
    deletes: list[bool] = []

    async def delete() -> bool:
        deletes.append(True)
        return True

    assert not await housekeeping.delete_if_idle(seen, IDLE, delete)
    assert deletes == []
    assert await housekeeping.deleted_at(lane) is None


# -- migration 0009 -----------------------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
async def at_0008(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """(url, schema) of a database migrated to 0008, of each kind."""
    async with database_at(request.param, tmp_path, "0008") as at:
        yield at


async def _columns_and_revision(engine: AsyncEngine) -> tuple[set[str], str]:
    async with engine.connect() as conn:
        columns = await conn.run_sync(
            lambda sync: {c["name"] for c in sa.inspect(sync).get_columns("lanes")}
        )
        revision = (
            await conn.exec_driver_sql("SELECT version_num FROM alembic_version")
        ).scalar_one()
    return columns, str(revision)


async def test_migration_0009_adds_and_drops_paused_at_keeping_the_lanes(
    at_0008: tuple[str, str],
) -> None:
    url, schema = at_0008
    engine = create_engine(url, schema=schema, pool_size=1)
    try:
        at = datetime.now(UTC)
        user = uuid.uuid4()
        async with engine.begin() as conn:
            await conn.execute(
                users.insert().values(
                    id=user, username=unique("m"), password_hash="x", created_at=at
                )
            )
            # The columns of 0008 only: the statement names no paused_at.
            await conn.execute(
                lanes.insert().values(
                    user_id=user, created_at=at, last_active_at=at, last_seq=3, accepted=4
                )
            )
        columns, revision = await _columns_and_revision(engine)
        assert ("paused_at" in columns, revision) == (False, "0008")

        await migrate(url, schema=schema, revision="0009")
        columns, revision = await _columns_and_revision(engine)
        assert ("paused_at" in columns, revision) == (True, "0009")
        assert await paused_at(engine, user) is None  # existing lanes start unpaused
        assert await WorkerStore(engine).set_lane_paused(user, True)
        assert await paused_at(engine, user) is not None

        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.downgrade(_alembic_config(sync), "0008"))
        columns, revision = await _columns_and_revision(engine)
        assert ("paused_at" in columns, revision) == (False, "0008")
        async with engine.connect() as conn:
            kept = (await conn.execute(sa.text("SELECT last_seq, accepted FROM lanes"))).all()
        assert [tuple(r) for r in kept] == [(3, 4)]

        await migrate(url, schema=schema)
        assert await paused_at(engine, user) is None
    finally:
        await engine.dispose()
