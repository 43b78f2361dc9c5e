"""The request log behaves the same on PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.db import create_engine, drop_schema, migrate
from services.core.models import users
from services.queue.store import NewRequest, RequestStore
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


async def test_batch_insert_finish_and_replay(engine: AsyncEngine) -> None:
    store, worker = RequestStore(engine), WorkerStore(engine)
    a, b = await _user(engine), await _user(engine)
    batch = [_request(a), _request(b), _request(a), _request(a, key="k1")]
    await store.insert(batch)
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
    await store.insert([_request(user, key="same")])
    with pytest.raises(IntegrityError):
        await store.insert([_request(user, key="same")])


async def test_delete_undoes_an_insert(engine: AsyncEngine) -> None:
    store = RequestStore(engine)
    user = await _user(engine)
    r = _request(user)
    await store.insert([r])
    await store.delete([r.id])
    assert await store.get(user, r.id) is None


async def test_cancel_only_while_queued(engine: AsyncEngine) -> None:
    store, worker = RequestStore(engine), WorkerStore(engine)
    user = await _user(engine)
    queued, done = _request(user), _request(user)
    await store.insert([queued, done])
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
    await store.insert([a, b])
    first = Outcome(a.id, user, "SUCCEEDED", output=b"first")
    again = Outcome(a.id, user, "SUCCEEDED", output=b"again")
    later = Outcome(b.id, user, "SUCCEEDED", output=b"b")
    written = await worker.finish([first, again, later])
    assert written == [first, later]
    assert [o.lane_seq for o in written] == [1, 2]
    assert await worker.finish([Outcome(a.id, user, "FAILED")]) == []
    replay = await store.results_after(user, 0)
    assert [(r.id, r.lane_seq, r.output) for r in replay] == [(a.id, 1, b"first"), (b.id, 2, b"b")]
