"""The intake's fair batches on the real request log: while one user's large requests wait,
another user's enqueue goes into the next batch, and every lane still numbers its requests
in the order they were submitted (the lane positions the relay publishes in)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from uuid_utils.compat import uuid7

from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.models import lanes, outbox, users
from fairlane_server.queue.accept_store import AcceptStore, NewRequest, OutboxItem
from fairlane_server.queue.intake import BATCH_BYTES, ROW_BYTES, Admitted, Intake, Submission
from fairlane_server.queue.outbox_store import OutboxStore
from fairlane_server.queue.relay import LaneRelay
from tests.conftest import unique

pytestmark = pytest.mark.integration

LARGE = b"x" * 100_000


class HeldStore:
    """The real store, whose accepts wait for `gate` and are recorded as they come."""

    def __init__(self, store: AcceptStore) -> None:
        self._store = store
        self.dialect = store.dialect
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.called = asyncio.Event()

    async def accept(
        self, batch: Sequence[Any], *, lane_limit: int
    ) -> tuple[list[OutboxItem], list[Any]]:
        self.batches.append(list(batch))
        self.called.set()
        await self.gate.wait()
        return await self._store.accept(batch, lane_limit=lane_limit)

    async def find_idempotent(self, keys: Sequence[Any]) -> Any:
        return await self._store.find_idempotent(keys)

    async def stored(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        return await self._store.stored(ids)


async def _user(engine: AsyncEngine) -> uuid.UUID:
    uid = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=uid, username=unique("u"), password_hash="x", created_at=datetime.now(UTC)
            )
        )
    return uid


def _sub(user: uuid.UUID, payload: bytes, key: str | None = None) -> Submission:
    return Submission(
        request=NewRequest(
            id=uuid7(),
            user_id=user,
            handler="echo",
            payload=payload,
            idempotency_key=key,
            client_ref="",
            max_attempts=3,
            deadline=None,
            trace_id="",
            enqueued_at=datetime.now(UTC),
        ),
        reply_route="queue.test",
    )


async def test_a_small_enqueue_overtakes_a_large_backlog_and_lanes_keep_their_order(
    engine: AsyncEngine,
) -> None:
    a, b = await _user(engine), await _user(engine)
    store = HeldStore(AcceptStore(engine))
    broker = MemoryBroker(lane_max_length=1000)
    await broker.connect()
    relay = LaneRelay(OutboxStore(engine), broker)  # not started: the outbox rows stay
    intake = Intake(store, relay, batch_size=50, linger_ms=2, lane_limit=1000)  # type: ignore[arg-type]
    intake.start()
    try:
        first = _sub(a, LARGE)
        futures = [intake.submit(first)]
        await asyncio.wait_for(store.called.wait(), 10)
        # While A's first batch is being written: 12 MB more of A (some with keys), then B.
        flood = [_sub(a, LARGE, key=f"k{i}" if i % 10 == 0 else None) for i in range(120)]
        futures += [intake.submit(s) for s in flood]
        small = _sub(b, b"ping")
        futures.append(intake.submit(small))
        store.gate.set()
        async with asyncio.timeout(60):
            answers = await asyncio.gather(*futures)
    finally:
        await intake.stop()
        await broker.close()
    assert all(isinstance(x, Admitted) and not x.duplicate for x in answers)
    # B went in the first batch formed after it arrived; batches stayed under the cap.
    batch_of_b = next(i for i, batch in enumerate(store.batches) if small in batch)
    assert batch_of_b == 1
    for batch in store.batches:
        assert sum(len(p.request.payload) + ROW_BYTES for p in batch) <= BATCH_BYTES
    # Each lane numbers its requests in the order they were submitted.
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(outbox.c.user_id, outbox.c.request_id).order_by(
                    outbox.c.user_id, outbox.c.lane_pos
                )
            )
        ).all()
        counts = await conn.execute(sa.select(lanes.c.user_id, lanes.c.accepted))
        accepted = dict(counts.all())
    assert [r.request_id for r in rows if r.user_id == a] == [s.request.id for s in [first, *flood]]
    assert [r.request_id for r in rows if r.user_id == b] == [small.request.id]
    assert accepted == {a: 121, b: 1}
