"""The request log behaves the same on PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.db import create_engine, drop_schema, migrate
from services.core.models import users
from services.queue.outbox_store import OutboxStore
from services.queue.store import NewRequest, OutboxItem, RequestStore
from services.worker.store import Attempt, Outcome, WorkerStore
from tests.conftest import DATABASE_URL, unique

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgresql", "sqlite"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "postgresql":
        url, schema = DATABASE_URL, unique()
    else:
        url, schema = f"sqlite+aiosqlite:///{tmp_path}/log.db", ""
    await migrate(url, schema=schema)
    e = create_engine(url, schema=schema, pool_size=2)
    try:
        yield e
    finally:
        await e.dispose()
        if schema:
            await drop_schema(url, schema)


async def _user(engine: AsyncEngine) -> uuid.UUID:
    uid = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=uid, username=unique("u"), password_hash="x", created_at=datetime.now(UTC)
            )
        )
    return uid


def _request(user: uuid.UUID, key: str | None = None) -> NewRequest:
    return NewRequest(
        id=uuid.uuid4(),
        user_id=user,
        handler="echo",
        payload=b"p",
        idempotency_key=key,
        client_ref="",
        max_attempts=3,
        deadline=None,
        trace_id="",
        enqueued_at=datetime.now(UTC),
    )


@dataclass
class _Pending:
    request: NewRequest
    reply_route: str = "queue.test"
    traceparent: str = ""


async def _accept(
    store: RequestStore, batch: list[NewRequest], lane_limit: int = 1000
) -> tuple[list[OutboxItem], list[NewRequest]]:
    kept, refused = await store.accept([_Pending(r) for r in batch], lane_limit=lane_limit)
    return kept, [p.request for p in refused]


async def test_batch_insert_finish_and_replay(engine: AsyncEngine) -> None:
    store, worker = RequestStore(engine), WorkerStore(engine)
    a, b = await _user(engine), await _user(engine)
    batch = [_request(a), _request(b), _request(a), _request(a, key="k1")]
    await _accept(store, batch)
    assert await store.find_idempotent([(a, "k1"), (b, "k1")]) == {(a, "k1"): batch[3].id}

    now = datetime.now(UTC)
    outcomes = [
        Outcome(r.id, r.user_id, "SUCCEEDED", output=b"o", attempts=[Attempt(1, now)])
        for r in batch
    ]
    await worker.finish(outcomes[:2])
    await worker.finish(outcomes[2:])
    # lane_seq counts per lane, in the order outcomes were written
    assert [o.lane_seq for o in outcomes] == [1, 1, 2, 3]
    states = await worker.states([r.id for r in batch])
    assert {s.status for s in states.values()} == {"SUCCEEDED"}

    replay = await store.results_after(a, 1)
    assert [(r.id, r.lane_seq) for r in replay] == [(batch[2].id, 2), (batch[3].id, 3)]
    assert [r.lane_seq for r in await store.results_after(a, 0, upto=3)] == [1, 2]


async def test_duplicate_idempotency_key_is_refused_by_the_log(engine: AsyncEngine) -> None:
    store = RequestStore(engine)
    user = await _user(engine)
    await _accept(store, [_request(user, key="same")])
    with pytest.raises(IntegrityError):
        await _accept(store, [_request(user, key="same")])


async def test_accept_numbers_lanes_and_fills_the_outbox(engine: AsyncEngine) -> None:
    store, outbox = RequestStore(engine), OutboxStore(engine)
    a, b = await _user(engine), await _user(engine)
    first = [_request(a), _request(b), _request(a)]
    kept, refused = await _accept(store, first)
    assert refused == []
    # Each lane's requests keep their batch order and get the lane's next positions.
    assert [(i.request_id, i.lane_pos) for i in kept if i.user_id == a] == [
        (first[0].id, 1),
        (first[2].id, 2),
    ]
    assert [(i.request_id, i.lane_pos) for i in kept if i.user_id == b] == [(first[1].id, 1)]
    kept, _ = await _accept(store, [_request(a)])
    assert [i.lane_pos for i in kept] == [3]
    lanes = await outbox.pending([a, b])
    assert [r.lane_pos for r in lanes[a].rows] == [1, 2, 3]
    assert lanes[a].next_pos == 1
    loaded = await outbox.load([r.request_id for r in lanes[b].rows])
    assert [(i.request_id, i.handler, i.payload, i.recovered) for i in loaded] == [
        (first[1].id, "echo", b"p", True)
    ]
    await outbox.release([r.request_id for r in lanes[a].rows[:2]], [])
    lanes = await outbox.pending([a])
    assert lanes[a].next_pos == 3
    await outbox.close()


async def test_the_lane_bound_is_counted_from_the_log(engine: AsyncEngine) -> None:
    store, worker = RequestStore(engine), WorkerStore(engine)
    user = await _user(engine)
    batch = [_request(user) for _ in range(4)]
    kept, refused = await _accept(store, batch, lane_limit=3)
    assert [i.request_id for i in kept] == [r.id for r in batch[:3]]
    assert refused == [batch[3]]
    assert await store.get(user, batch[3].id) is None  # nothing stored for it
    await worker.finish([Outcome(batch[0].id, user, "SUCCEEDED")])
    kept, refused = await _accept(store, [_request(user), _request(user)], lane_limit=3)
    assert (len(kept), len(refused)) == (1, 1)
    assert kept[0].lane_pos == 4


async def test_cancel_only_while_queued(engine: AsyncEngine) -> None:
    store, worker = RequestStore(engine), WorkerStore(engine)
    user = await _user(engine)
    queued, done = _request(user), _request(user)
    await _accept(store, [queued, done])
    await worker.finish([Outcome(done.id, user, "SUCCEEDED")])
    assert await store.cancel_queued(user, queued.id) == "CANCELLED"
    assert await store.cancel_queued(user, done.id) == "SUCCEEDED"
    assert await store.cancel_queued(user, uuid.uuid4()) is None


async def test_an_outcome_written_twice_keeps_the_first_and_no_seq_is_lost(
    engine: AsyncEngine,
) -> None:
    # A redelivery can run a request again before its first outcome was written; both
    # outcomes may then reach the writer, even in one batch.
    store, worker = RequestStore(engine), WorkerStore(engine)
    user = await _user(engine)
    a, b = _request(user), _request(user)
    await _accept(store, [a, b])
    first = Outcome(a.id, user, "SUCCEEDED", output=b"first")
    again = Outcome(a.id, user, "SUCCEEDED", output=b"again")
    later = Outcome(b.id, user, "SUCCEEDED", output=b"b")
    written = await worker.finish([first, again, later])
    assert written == [first, later]
    assert [o.lane_seq for o in written] == [1, 2]
    assert await worker.finish([Outcome(a.id, user, "FAILED")]) == []
    replay = await store.results_after(user, 0)
    assert [(r.id, r.lane_seq, r.output) for r in replay] == [(a.id, 1, b"first"), (b.id, 2, b"b")]
