"""An intake statement whose answer is lost on the way back, on a real PostgreSQL.

On PostgreSQL the intake's batch is one statement that is its own transaction. When the
connection fails after the server ran it, the rows are committed but the queue never
learns their lane positions: the intake must find them in the log and answer them as
accepted (never "rejected" for a stored request), and the relay must publish them from
the outbox without waiting for its sweep. When the answer that is lost is the one to the
statement's preparation, nothing ran: the requests are refused as not stored.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane.common.v1 import lane_pb2
from fairlane_server.core.db import create_engine
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.models import lanes, outbox, requests, users
from fairlane_server.queue.accept_store import AcceptStore, NewRequest
from fairlane_server.queue.intake import Admitted, Intake, Rejection, Submission
from fairlane_server.queue.outbox_store import OutboxStore
from fairlane_server.queue.relay import LaneRelay
from tests.conftest import DATABASE_URL, unique
from tests.integration.test_store_contract import new_request
from tests.proxy import TcpProxy

PATIENCE = 30.0  # far longer than the one-second statement timeout and the settle


@dataclass
class Rig:
    proxy: TcpProxy
    through_proxy: AsyncEngine  # the intake's, through the proxy
    direct: AsyncEngine  # the relay's and the test's
    broker: MemoryBroker
    relay: LaneRelay
    intake: Intake

    async def user(self) -> uuid.UUID:
        uid = uuid.uuid4()
        async with self.direct.begin() as conn:
            await conn.execute(
                users.insert().values(
                    id=uid, username=unique("u"), password_hash="x", created_at=datetime.now(UTC)
                )
            )
        return uid

    async def count(self, query: sa.Select[Any]) -> int:
        async with self.direct.connect() as conn:
            return int((await conn.execute(query)).scalar_one())


@pytest.fixture
async def rig(pg_schema: str) -> AsyncIterator[Rig]:
    pg = make_url(DATABASE_URL)
    proxy = TcpProxy(pg.host or "127.0.0.1", pg.port or 5432)
    await proxy.start()
    proxied = pg.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    # One-second statements: a lost answer turns into a timeout soon. One connection, so
    # that the one the test prepares is the intake's.
    through_proxy = create_engine(proxied, schema=pg_schema, pool_size=1, timeout=1.0)
    direct = create_engine(DATABASE_URL, schema=pg_schema, pool_size=2)
    broker = MemoryBroker(lane_max_length=1000)
    await broker.connect()
    # No sweep: only the intake's word can send the relay to the outbox.
    relay = LaneRelay(OutboxStore(direct), broker, sweep_seconds=3600, stale_after=3600)
    intake = Intake(AcceptStore(through_proxy), relay, batch_size=10, linger_ms=0, lane_limit=1000)
    rig = Rig(proxy, through_proxy, direct, broker, relay, intake)
    try:
        yield rig
    finally:
        await intake.stop()
        await relay.stop()
        await broker.close()
        await through_proxy.dispose()
        await direct.dispose()
        await proxy.close()


async def _run(rig: Rig, batch: list[NewRequest]) -> list[object]:
    futures = [rig.intake.submit(Submission(request=r, reply_route="queue.test")) for r in batch]
    rig.relay.start()
    rig.intake.start()
    done, _ = await asyncio.wait(futures, timeout=PATIENCE)
    assert len(done) == len(batch), "the intake never answered"
    return [f.result() if f.exception() is None else f.exception() for f in futures]


async def test_a_lost_answer_is_settled_from_the_log_and_its_requests_published(rig: Rig) -> None:
    # Prepared on the intake's connection while answers come back: the next accept is
    # sent whole (bind and execute) and runs although its answer is lost.
    await AcceptStore(rig.through_proxy).accept(
        [Submission(request=new_request(await rig.user()), reply_route="queue.test")],
        lane_limit=1000,
    )
    user = await rig.user()
    batch = [new_request(user) for _ in range(3)]
    rig.proxy.hold_replies()
    stored = sa.select(sa.func.count()).where(requests.c.id.in_([r.id for r in batch]))

    async def cut_once_stored() -> None:
        while await rig.count(stored) < len(batch):  # noqa: ASYNC110 (the log, not an event)
            await asyncio.sleep(0.05)
        positions = sa.select(outbox.c.lane_pos).where(outbox.c.user_id == user)
        async with rig.direct.connect() as conn:
            assert sorted((await conn.execute(positions)).scalars()) == [1, 2, 3]
        rig.proxy.cut()  # the connection breaks; new ones are answered again

    cutter = asyncio.create_task(cut_once_stored())
    answers = await _run(rig, batch)
    await asyncio.wait_for(cutter, PATIENCE)
    assert all(isinstance(a, Admitted) and not a.duplicate for a in answers), answers
    assert [a.request_id for a in answers if isinstance(a, Admitted)] == [r.id for r in batch]

    # The relay publishes the three from the outbox, in lane order, marked recovered (the
    # worker checks the log before running such an item), and clears the outbox.
    in_outbox = sa.select(sa.func.count()).where(outbox.c.user_id == user)
    async with asyncio.timeout(PATIENCE):
        while not rig.broker.lane_depth(str(user)) or await rig.count(in_outbox):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    items = await _drain(rig.broker, user, len(batch))
    assert [(i.request_id, i.recovered) for i in items] == [(str(r.id), True) for r in batch]
    accepted = sa.select(lanes.c.accepted).where(lanes.c.user_id == user)
    assert await rig.count(accepted) == len(batch)  # stored once: nothing wrote them again


async def _drain(broker: MemoryBroker, user: uuid.UUID, count: int) -> list[lane_pb2.LaneItem]:
    """The lane's items in delivery order, once `count` have come."""
    items: list[lane_pb2.LaneItem] = []
    enough = asyncio.Event()

    async def take(delivery: Any) -> None:
        items.extend(lane_pb2.LaneBatch.FromString(delivery.body).items)
        await delivery.ack()
        if len(items) >= count:
            enough.set()

    consumer = await broker.consume_lane(str(user), take, prefetch=10)
    try:
        await asyncio.wait_for(enough.wait(), PATIENCE)
    finally:
        await consumer.cancel()
    return items


async def test_a_lost_answer_before_the_statement_ran_refuses_as_not_stored(rig: Rig) -> None:
    async with rig.through_proxy.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))  # the connection, not the statement, ready
    user = await rig.user()
    batch = [new_request(user) for _ in range(2)]
    rig.proxy.hold_replies()  # asyncpg prepares the statement first: it waits for that answer

    async def cut_soon() -> None:
        await asyncio.sleep(2.0)  # past the one-second statement timeout
        rig.proxy.cut()

    cutter = asyncio.create_task(cut_soon())
    answers = await _run(rig, batch)
    await cutter
    assert all(isinstance(a, Rejection) for a in answers), answers
    assert {a.reason for a in answers if isinstance(a, Rejection)} == {"database_unavailable"}
    stored = sa.select(sa.func.count()).where(requests.c.id.in_([r.id for r in batch]))
    assert await rig.count(stored) == 0
    assert rig.broker.lane_depth(str(user)) == 0
