"""LISTEN/NOTIFY between services: a result written by a worker wakes the queue replicas'
listeners in the same transaction, for exactly the users that have new results; a queue
replica that cannot take a lane's publish lock names that lane to the one holding it."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from uuid_utils.compat import uuid7

from fairlane_server.core.db import create_engine
from fairlane_server.core.models import users
from fairlane_server.core.notify import NotifyListener, lane_wanted_channel, results_channel
from fairlane_server.queue.accept_store import AcceptStore, NewRequest
from fairlane_server.queue.outbox_store import OutboxStore
from fairlane_server.worker.store import Outcome, WorkerStore
from tests.conftest import DATABASE_URL, unique

pytestmark = pytest.mark.integration


@dataclass
class _Pending:
    request: NewRequest
    reply_route: str = "r"
    traceparent: str = ""


async def test_finishing_notifies_the_users_with_new_results(pg_schema: str) -> None:
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=2)
    channel = results_channel(pg_schema)
    heard: list[str] = []
    connected = asyncio.Event()
    got = asyncio.Event()

    def on_users(names: list[str]) -> None:
        heard.extend(names)
        got.set()

    listener = NotifyListener(DATABASE_URL, {channel: on_users}, connected.set)
    listener.start()
    try:
        await asyncio.wait_for(connected.wait(), 10)
        a, b = uuid.uuid4(), uuid.uuid4()
        async with engine.begin() as conn:
            for uid in (a, b):
                await conn.execute(
                    users.insert().values(
                        id=uid,
                        username=unique("u"),
                        password_hash="x",
                        created_at=datetime.now(UTC),
                    )
                )
        requests = [
            NewRequest(uuid7(), u, "echo", b"", None, "", 3, None, "", datetime.now(UTC))
            for u in (a, a, b)
        ]
        await AcceptStore(engine).accept([_Pending(r) for r in requests], lane_limit=10)
        worker = WorkerStore(engine, notify_channel=channel)
        await worker.finish([Outcome(r.id, r.user_id, "SUCCEEDED") for r in requests[:2]])
        await asyncio.wait_for(got.wait(), 10)
        assert heard == [str(a)]  # b has no result yet
        got.clear()
        await worker.finish([Outcome(requests[2].id, b, "SUCCEEDED")])
        await asyncio.wait_for(got.wait(), 10)
        assert heard == [str(a), str(b)]
    finally:
        await listener.stop()
        await engine.dispose()


async def test_a_lock_held_elsewhere_names_the_lane_to_its_holder(pg_schema: str) -> None:
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=2)
    channel = lane_wanted_channel(pg_schema)
    heard: list[str] = []
    connected = asyncio.Event()
    got = asyncio.Event()

    def on_lanes(names: list[str]) -> None:
        heard.extend(names)
        got.set()

    listener = NotifyListener(DATABASE_URL, {channel: on_lanes}, connected.set)
    listener.start()
    holder = OutboxStore(engine, wanted_channel=channel)
    other = OutboxStore(engine, wanted_channel=channel)
    try:
        await asyncio.wait_for(connected.wait(), 10)
        held, free = uuid.uuid4(), uuid.uuid4()
        assert await holder.lock([held]) == {held}
        # Taking a lock that was free names nothing; failing to take one names that lane.
        assert await other.lock([held, free]) == {free}
        await asyncio.wait_for(got.wait(), 10)
        assert heard == [str(held)]
        await holder.release([], [held])
        assert await other.lock([held]) == {held}
    finally:
        await listener.stop()
        await holder.close()
        await other.close()
        await engine.dispose()
