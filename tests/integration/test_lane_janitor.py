"""The idle-lane janitor on every broker (RabbitMQ classic and quorum lanes, in-memory)
with the real request log: it pages through every idle lane, records what it deleted,
never deletes a lane with work in it, and is fenced against a concurrent enqueue."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from uuid_utils.compat import uuid7

from fairlane_server.core import status
from fairlane_server.core.broker import Broker, BrokerError, LaneMissing
from fairlane_server.core.db import create_engine
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.models import lanes, requests, users
from fairlane_server.queue.hub import Hub
from fairlane_server.queue.janitor import LaneJanitor
from fairlane_server.queue.lane_store import LaneHousekeepingStore
from fairlane_server.queue.store import RequestStore
from tests.conftest import DATABASE_URL
from tests.e2e.suite import wait_until

pytestmark = pytest.mark.integration
IDLE = 60.0
PAGE = 3


@pytest.fixture
async def engine(pg_schema: str) -> AsyncIterator[AsyncEngine]:
    e = create_engine(DATABASE_URL, schema=pg_schema, pool_size=4)
    try:
        yield e
    finally:
        await e.dispose()


async def add_lanes(
    engine: AsyncEngine, broker: Broker, count: int, *, idle: bool = True
) -> list[str]:
    """Users with a lane row and a declared lane queue, idle (or not) for the janitor."""
    at = datetime.now(UTC) - timedelta(seconds=IDLE * 2 if idle else 0)
    ids = [uuid.uuid4() for _ in range(count)]
    async with engine.begin() as conn:
        await conn.execute(
            users.insert(),
            [
                {"id": u, "username": f"j-{u.hex}", "password_hash": "x", "created_at": at}
                for u in ids
            ],
        )
        await conn.execute(
            lanes.insert(),
            [{"user_id": u, "created_at": at, "last_active_at": at, "last_seq": 0} for u in ids],
        )
    for u in ids:
        await broker.declare_lane(str(u))
    return [str(u) for u in ids]


async def add_queued_request(engine: AsyncEngine, user_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            requests.insert().values(
                id=uuid7(),
                user_id=uuid.UUID(user_id),
                handler="noop",
                payload=b"",
                status=status.QUEUED,
                max_attempts=1,
                enqueued_at=datetime.now(UTC),
            )
        )


def janitor(engine: AsyncEngine, broker: Broker, hub: Hub) -> LaneJanitor:
    return LaneJanitor(
        RequestStore(engine),
        LaneHousekeepingStore(engine),
        broker,
        hub,
        idle_seconds=IDLE,
        page_size=PAGE,
    )


async def test_sweeps_every_page_and_never_deletes_a_lane_twice(
    engine: AsyncEngine,
    broker: Broker,
) -> None:
    idle = await add_lanes(engine, broker, 3 * PAGE + 2)  # more than three pages
    (active,) = await add_lanes(engine, broker, 1, idle=False)
    pending, subscribed, holding = idle[:3]
    await add_queued_request(engine, pending)  # work in the log
    await broker.publish_lane(holding, b"work", {})  # work on the broker only
    hub = Hub()
    hub.subscribe(subscribed)  # an open session on this replica
    sweeper = janitor(engine, broker, hub)

    deleted = await sweeper.sweep()

    expected = set(idle) - {pending, subscribed, holding}
    assert set(deleted) == expected
    assert len(deleted) == len(expected)
    for lane in expected:
        assert await broker.lane_stats(lane) is None
        assert await LaneHousekeepingStore(engine).deleted_at(uuid.UUID(lane)) is not None
    for lane in (pending, subscribed, holding, active):
        assert await broker.lane_stats(lane) is not None
    # The open session's lane was marked active for the other replicas' janitors too.
    async with engine.connect() as conn:
        touched = (
            await conn.execute(
                sa.select(lanes.c.last_active_at).where(lanes.c.user_id == uuid.UUID(subscribed))
            )
        ).scalar_one()
    assert datetime.now(UTC) - touched < timedelta(seconds=IDLE)
    # Recorded: the next sweep deletes nothing again.
    assert await sweeper.sweep() == []


async def test_a_lane_active_again_after_its_deletion_is_deleted_again_once_idle(
    engine: AsyncEngine,
    broker: Broker,
) -> None:
    (lane,) = await add_lanes(engine, broker, 1)
    sweeper = janitor(engine, broker, Hub())
    assert await sweeper.sweep() == [lane]
    deleted_at = await LaneHousekeepingStore(engine).deleted_at(uuid.UUID(lane))
    assert deleted_at is not None
    # A request re-created the lane (intake declares it and touches the row), then the
    # lane went idle again: its last activity is after the deletion, but long ago.
    await broker.declare_lane(lane)
    async with engine.begin() as conn:
        await conn.execute(
            lanes.update()
            .where(lanes.c.user_id == uuid.UUID(lane))
            .values(last_active_at=deleted_at + timedelta(microseconds=1))
        )
    assert await sweeper.sweep() == []  # active again just now: not idle
    async with engine.begin() as conn:
        await conn.execute(
            lanes.update()
            .where(lanes.c.user_id == uuid.UUID(lane))
            .values(
                queue_deleted_at=datetime.now(UTC) - timedelta(seconds=IDLE * 3),
                last_active_at=datetime.now(UTC) - timedelta(seconds=IDLE * 2),
            )
        )
    assert await sweeper.sweep() == [lane]
    assert await broker.lane_stats(lane) is None


async def test_an_enqueue_that_touches_the_lane_first_keeps_it(
    engine: AsyncEngine,
    broker: Broker,
) -> None:
    """Intake's transaction holds the lane's row (it touched it) while the janitor tries
    to claim it: the claim waits, sees the row changed, and deletes nothing."""
    (lane,) = await add_lanes(engine, broker, 1)
    store = LaneHousekeepingStore(engine)
    (candidate,) = await store.idle_page(after=None, limit=10, idle_seconds=IDLE)
    deletes: list[str] = []

    async def delete() -> bool:
        deletes.append(lane)
        return await broker.delete_lane(lane)

    async with engine.begin() as intake:
        pid = await backend_pid(intake)
        await intake.execute(
            lanes.update()
            .where(lanes.c.user_id == uuid.UUID(lane))
            .values(last_active_at=datetime.now(UTC))
        )
        claim = asyncio.create_task(store.delete_if_idle(candidate, IDLE, delete))
        await wait_until(lambda: someone_waits_for(engine, pid))  # the claim, on the row
        assert not claim.done()
        await add_queued_request_in(intake, lane)
    assert await claim is False
    assert deletes == []
    await broker.publish_lane(lane, b"accepted work", {})
    stats = await broker.lane_stats(lane)
    assert stats is not None
    assert stats.messages == 1


async def test_an_enqueue_after_the_claim_waits_and_finds_the_lane_gone(
    engine: AsyncEngine,
    broker: Broker,
) -> None:
    """The janitor claimed the row first: intake's transaction waits until the deletion is
    committed, so its publish comes after it and is refused (LaneMissing), never lost."""
    (lane,) = await add_lanes(engine, broker, 1)
    store = LaneHousekeepingStore(engine)
    (candidate,) = await store.idle_page(after=None, limit=10, idle_seconds=IDLE)
    deleting, release = asyncio.Event(), asyncio.Event()

    async def delete() -> bool:
        deleting.set()
        await release.wait()
        return await broker.delete_lane(lane)

    claim = asyncio.create_task(store.delete_if_idle(candidate, IDLE, delete))
    await deleting.wait()

    pids: list[int] = []

    async def enqueue() -> None:
        async with engine.begin() as intake:
            pids.append(await backend_pid(intake))
            await intake.execute(
                lanes.update()
                .where(lanes.c.user_id == uuid.UUID(lane))
                .values(last_active_at=datetime.now(UTC))
            )
            await add_queued_request_in(intake, lane)
        await broker.publish_lane(lane, b"accepted work", {})

    publish = asyncio.create_task(enqueue())
    await wait_until(lambda: waits_for_a_lock(engine, pids))  # intake, on the claimed row
    assert not publish.done()
    release.set()
    assert await claim is True
    with pytest.raises(LaneMissing):
        await publish
    # Intake declares it again and publishes: the work is there.
    await broker.declare_lane(lane)
    await broker.publish_lane(lane, b"accepted work", {})
    stats = await broker.lane_stats(lane)
    assert stats is not None
    assert stats.messages == 1


async def add_queued_request_in(conn: AsyncConnection, user_id: str) -> None:
    await conn.execute(
        requests.insert().values(
            id=uuid7(),
            user_id=uuid.UUID(user_id),
            handler="noop",
            payload=b"",
            status=status.QUEUED,
            max_attempts=1,
            enqueued_at=datetime.now(UTC),
        )
    )


async def backend_pid(conn: AsyncConnection) -> int:
    return int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())


async def someone_waits_for(engine: AsyncEngine, pid: int) -> bool:
    async with engine.connect() as conn:
        waiting = await conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
            ),
            {"pid": pid},
        )
        return bool(waiting.scalar_one())


async def waits_for_a_lock(engine: AsyncEngine, pids: list[int]) -> bool:
    if not pids:
        return False
    async with engine.connect() as conn:
        waiting = await conn.execute(
            sa.text("SELECT cardinality(pg_blocking_pids(:pid)) > 0"), {"pid": pids[0]}
        )
        return bool(waiting.scalar_one())


class UnansweredDeletes(MemoryBroker):
    """A broker whose first `lost` lane deletions are carried out but never answered, as
    when the connection drops or the call times out after the broker got it."""

    def __init__(self, lost: int) -> None:
        super().__init__(lane_max_length=10)
        self.lost = lost

    async def delete_lane(self, user_id: str) -> bool:
        deleted = await super().delete_lane(user_id)
        if self.lost > 0:
            self.lost -= 1
            raise BrokerError("connection lost before the answer")
        return deleted


@pytest.mark.parametrize("lost", [2, 99])
async def test_an_unanswered_delete_is_asked_again_before_the_claim_ends(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, lost: int
) -> None:
    monkeypatch.setattr("fairlane_server.queue.janitor.SETTLE_PAUSES", (0.01, 0.01, 0.01))
    broker = UnansweredDeletes(lost)
    await broker.connect()
    (lane,) = await add_lanes(engine, broker, 1)
    deleted = await janitor(engine, broker, Hub()).sweep()
    recorded = await LaneHousekeepingStore(engine).deleted_at(uuid.UUID(lane))
    if lost <= 3:
        # Asked again until the broker answered: a definite deletion, recorded.
        assert deleted == [lane]
        assert recorded is not None
    else:
        # Never answered: the claim is given up (and logged), nothing recorded.
        assert deleted == []
        assert recorded is None
    await broker.close()
