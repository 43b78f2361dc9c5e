"""Retention of the request log: day partitions on PostgreSQL (made by the migration and
rolled by the maintenance pass), row deletes on SQLite, and the upgrade of a log that
existed before partitioning. Time is moved by handing the pass a later `now`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from uuid_utils.compat import uuid7

from fairlane_server.core.db import create_engine, drop_schema, migrate
from fairlane_server.core.models import idempotency_keys, request_events, requests, users
from fairlane_server.queue.accept_store import AcceptStore, NewRequest
from fairlane_server.queue.intake import Intake, Submission
from fairlane_server.queue.retention import AHEAD_DAYS, Retention
from fairlane_server.queue.retention_store import (
    RetentionStore,
    day_bound,
    day_of,
    id_day,
    partition_name,
)
from fairlane_server.queue.store import RequestStore
from fairlane_server.worker.store import Attempt, Outcome, WorkerStore
from tests.conftest import DATABASE_URL, unique

pytestmark = pytest.mark.integration

DAY = timedelta(days=1)


def v7_at(at: datetime) -> uuid.UUID:
    """A UUIDv7 made at `at` (the queue makes them at the current time)."""
    ms = int(at.timestamp() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | (0x7 << 76) | (rand & ((1 << 76) - 1))
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


def start_of_day(day: int) -> datetime:
    return datetime.fromtimestamp(day * 86_400, UTC)


class _Pending:
    def __init__(self, request: NewRequest) -> None:
        self.request = request
        self.reply_route = "queue.test"
        self.traceparent = ""


async def _user(engine: AsyncEngine) -> uuid.UUID:
    uid = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=uid, username=unique("u"), password_hash="x", created_at=datetime.now(UTC)
            )
        )
    return uid


def _request(user: uuid.UUID, at: datetime, key: str | None = None) -> NewRequest:
    return NewRequest(
        id=v7_at(at),
        user_id=user,
        handler="echo",
        payload=b"p",
        idempotency_key=key,
        client_ref="",
        max_attempts=3,
        deadline=None,
        trace_id="",
        enqueued_at=at,
    )


async def _accept(store: AcceptStore, *batch: NewRequest) -> None:
    kept, refused = await store.accept([_Pending(r) for r in batch], lane_limit=1000)
    assert not refused
    assert len(kept) == len(batch)


async def _finish(worker: WorkerStore, r: NewRequest, at: datetime | None = None) -> None:
    at = at or datetime.now(UTC)
    written = await worker.finish(
        [Outcome(r.id, r.user_id, "SUCCEEDED", attempts=[Attempt(1, at)], finished_at=at)]
    )
    assert len(written) == 1


async def _present(
    engine: AsyncEngine, table: sa.Table, column: Any, ids: list[uuid.UUID]
) -> set[Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(column).where(column.in_(ids)))
        return set(rows.scalars())


async def _partitions(engine: AsyncEngine, table: str) -> list[str]:
    async with engine.connect() as conn:
        return [p.name for p in await RetentionStore(engine).partitions(conn, table)]


@pytest.fixture
async def pg(pg_schema: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=4)
    try:
        yield engine
    finally:
        await engine.dispose()


def test_day_bounds_hold_the_uuid7_of_their_day() -> None:
    now = datetime.now(UTC)
    made = uuid7()
    day = day_of(now)
    assert id_day(uuid.UUID(int=made.int)) in (day, day + 1)  # made just after `now`
    assert day_bound(id_day(made)) <= uuid.UUID(int=made.int) < day_bound(id_day(made) + 1)
    assert partition_name("requests", 0) == "requests_p19700101"
    assert partition_name("requests", 3_000_000) == "requests_pd3000000"


async def test_the_migration_makes_partitions_ahead(pg: AsyncEngine) -> None:
    today = day_of(datetime.now(UTC))
    for table in ("requests", "request_events"):
        names = await _partitions(pg, table)
        # The first one covers everything before tomorrow; then a week ahead, a day each.
        assert names == [f"{table}_initial"] + [
            partition_name(table, d) for d in range(today + 1, today + AHEAD_DAYS + 1)
        ]


async def test_retention_drops_finished_days_and_keeps_live_ones(pg: AsyncEngine) -> None:
    store, worker = AcceptStore(pg), WorkerStore(pg)
    retention = Retention(RetentionStore(pg), days=30)
    user = await _user(pg)
    now = datetime.now(UTC)
    today = day_of(now)
    # One request in each of four partitions: today's (the initial one) and three ahead.
    done_today = _request(user, now, key="k-today")
    done = _request(user, start_of_day(today + 2) + timedelta(hours=1), key="k-done")
    unfinished = _request(user, start_of_day(today + 3) + timedelta(hours=1), key="k-open")
    late = _request(user, start_of_day(today + 4) + timedelta(hours=1))
    await _accept(store, done_today, done, unfinished, late)
    await _finish(worker, done_today)
    await _finish(worker, done)
    # Finished 29 days after it was accepted: it has a result younger than the others.
    await _finish(worker, late, at=start_of_day(today + 33))

    later = start_of_day(today + 40)
    report = await retention.run_once(now=later)  # cutoff: today + 10 days
    assert not report.skipped
    assert dict(report.kept) == {
        partition_name("requests", today + 3): "1 unfinished request(s)",
        partition_name("requests", today + 4): "requests finished within the retention period",
    }
    assert REGISTRY.get_sample_value("fairlane_log_partitions_past_retention") == 2
    assert "requests_initial" in report.dropped
    assert "request_events_initial" in report.dropped
    assert partition_name("requests", today + 2) in report.dropped
    # The coming days of the moved clock were made, both tables.
    assert partition_name("requests", today + 40) in report.created
    assert partition_name("request_events", today + 47) in report.created

    ids = [done_today.id, done.id, unfinished.id, late.id]
    assert await _present(pg, requests, requests.c.id, ids) == {unfinished.id, late.id}
    assert await _present(pg, request_events, request_events.c.request_id, ids) == {
        unfinished.id,
        late.id,
    }
    assert await _present(pg, idempotency_keys, idempotency_keys.c.request_id, ids) == {
        unfinished.id
    }
    assert report.keys_deleted == 2
    found = await store.find_idempotent([(user, "k-today"), (user, "k-done"), (user, "k-open")])
    assert found == {(user, "k-open"): unfinished.id}

    # Its result in, the unfinished request's day goes at the next pass; the late one
    # stays until its own result is past retention.
    await _finish(worker, unfinished)
    report = await retention.run_once(now=later)
    assert partition_name("requests", today + 3) in report.dropped
    assert partition_name("request_events", today + 3) in report.dropped
    assert partition_name("requests", today + 4) not in report.dropped
    report = await retention.run_once(now=start_of_day(today + 64))
    assert partition_name("requests", today + 4) in report.dropped
    assert await _present(pg, requests, requests.c.id, ids) == set()

    # The log goes on in the days the passes made.
    fresh = _request(user, start_of_day(today + 64) + timedelta(hours=2), key="k-open")
    await _accept(store, fresh)
    assert await store.find_idempotent([(user, "k-open")]) == {(user, "k-open"): fresh.id}


async def test_retention_zero_keeps_everything(pg: AsyncEngine) -> None:
    store, worker = AcceptStore(pg), WorkerStore(pg)
    user = await _user(pg)
    r = _request(user, datetime.now(UTC))
    await _accept(store, r)
    await _finish(worker, r)
    today = day_of(datetime.now(UTC))
    report = await Retention(RetentionStore(pg), days=0).run_once(now=start_of_day(today + 400))
    assert report.dropped == []
    assert report.kept == []
    assert partition_name("requests", today + 400) in report.created
    assert await _present(pg, requests, requests.c.id, [r.id]) == {r.id}


async def test_one_replica_at_a_time_runs_a_pass(pg: AsyncEngine) -> None:
    holder = RetentionStore(pg)
    conn = await holder.connect()
    try:
        assert await holder.try_lock(conn)
        report = await Retention(RetentionStore(pg), days=30).run_once()
        assert report.skipped
        await holder.unlock(conn)
    finally:
        await conn.close()
    assert not (await Retention(RetentionStore(pg), days=30).run_once()).skipped


async def test_an_idempotency_key_is_taken_once_across_replicas(pg_schema: str) -> None:
    """Two replicas (two engines) accept the same key at once: one stores it, the other's
    batch fails on the key (the intake then answers it as a duplicate of the first)."""
    engines = [create_engine(DATABASE_URL, schema=pg_schema, pool_size=2) for _ in range(2)]
    try:
        user = await _user(engines[0])
        stores = [AcceptStore(e) for e in engines]
        for i in range(10):
            key = f"race-{i}"
            batches = [_request(user, datetime.now(UTC), key=key) for _ in stores]
            outcomes = await asyncio.gather(
                *(_accept(s, b) for s, b in zip(stores, batches, strict=True)),
                return_exceptions=True,
            )
            failed = [o for o in outcomes if o is not None]
            assert len(failed) == 1
            assert isinstance(failed[0], IntegrityError)
            winner = batches[outcomes.index(None)]
            assert await stores[0].find_idempotent([(user, key)]) == {(user, key): winner.id}
            loser = batches[1 - outcomes.index(None)]
            assert (
                await RequestStore(engines[0]).get(user, loser.id) is None
            )  # nothing of it was stored
    finally:
        for e in engines:
            await e.dispose()


async def test_sqlite_deletes_finished_requests_past_retention(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/log.db"
    await migrate(url)
    engine = create_engine(url)
    try:
        store, worker = AcceptStore(engine), WorkerStore(engine)
        user = await _user(engine)
        now = datetime.now(UTC)
        old = _request(user, now - 50 * DAY, key="old")
        recent = _request(user, now - 50 * DAY, key="recent")
        unfinished = _request(user, now - 50 * DAY, key="open")
        await _accept(store, old, recent, unfinished)
        await _finish(worker, old, at=now - 40 * DAY)
        await _finish(worker, recent, at=now - 20 * DAY)
        removed = REGISTRY.get_sample_value("fairlane_log_removed_total") or 0.0
        report = await Retention(RetentionStore(engine), days=30).run_once()
        assert (report.rows_deleted, report.keys_deleted) == (1, 1)
        assert REGISTRY.get_sample_value("fairlane_log_removed_total") == removed + 1
        ids = [old.id, recent.id, unfinished.id]
        assert await _present(engine, requests, requests.c.id, ids) == {recent.id, unfinished.id}
        assert await _present(engine, request_events, request_events.c.request_id, ids) == {
            recent.id,
            unfinished.id,
        }
        assert await store.find_idempotent([(user, "old"), (user, "open")]) == {
            (user, "open"): unfinished.id
        }
        report = await Retention(RetentionStore(engine), days=0).run_once(now=now + 400 * DAY)
        assert report.rows_deleted == 0
    finally:
        await engine.dispose()


# ------------------------------------------------------------------------------------------
# Upgrading a log written before partitioning (revision 0004) keeps every row.
# ------------------------------------------------------------------------------------------

# Not UUIDv7: one below any day (stays in the initial partition) and one random-looking id
# whose "time" lies in the year 10332 (gets a day partition of its own).
LOW_ID = uuid.UUID("00000000-0000-4000-8000-000000000002")
FAR_ID = uuid.UUID("f0000000-0000-4000-8000-000000000001")


async def _legacy_rows(engine: AsyncEngine, user: uuid.UUID) -> list[uuid.UUID]:
    now = datetime.now(UTC)
    ids = [v7_at(now - 3 * DAY), v7_at(now), LOW_ID, FAR_ID]
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO requests (id, user_id, handler, payload, idempotency_key, status, "
                "max_attempts, lane_seq, enqueued_at, finished_at) "
                "SELECT i, :u, 'echo', 'p', 'key-' || n, 'SUCCEEDED', 3, n, :at, :at "
                "FROM unnest(CAST(:ids AS uuid[])) WITH ORDINALITY AS t(i, n)"
            ),
            {"u": user, "at": now, "ids": ids},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO request_events (request_id, at, status) "
                "SELECT i, :at, s FROM unnest(CAST(:ids AS uuid[])) AS i, "
                "unnest(ARRAY['QUEUED', 'SUCCEEDED']) AS s"
            ),
            {"at": now, "ids": ids},
        )
    return ids


async def test_upgrade_partitions_an_existing_log_and_keeps_its_rows() -> None:
    schema = unique()
    await migrate(DATABASE_URL, schema=schema, revision="0004")
    engine = create_engine(DATABASE_URL, schema=schema, pool_size=2)
    try:
        user = await _user(engine)
        ids = await _legacy_rows(engine, user)
        await migrate(DATABASE_URL, schema=schema)

        async with engine.connect() as conn:
            kinds = await conn.execute(
                sa.text(
                    "SELECT c.relname FROM pg_partitioned_table p "
                    "JOIN pg_class c ON c.oid = p.partrelid "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = :s"
                ),
                {"s": schema},
            )
            assert set(kinds.scalars()) == {"requests", "request_events"}
            owner = await conn.execute(
                sa.text("SELECT pg_get_serial_sequence('request_events', 'id')")
            )
            assert owner.scalar_one() is not None
        assert await _present(engine, requests, requests.c.id, ids) == set(ids)
        async with engine.connect() as conn:
            events = await conn.execute(sa.select(sa.func.count()).select_from(request_events))
            assert events.scalar_one() == 2 * len(ids)
        far = partition_name("requests", id_day(FAR_ID))
        assert far in await _partitions(engine, "requests")
        assert partition_name("request_events", id_day(FAR_ID)) in await _partitions(
            engine, "request_events"
        )

        # Keys written before the upgrade still deduplicate.
        store, worker = AcceptStore(engine), WorkerStore(engine)
        keys = [(user, f"key-{n}") for n in range(1, len(ids) + 1)]
        assert await store.find_idempotent(keys) == dict(zip(keys, ids, strict=True))
        with pytest.raises(IntegrityError):
            await _accept(store, _request(user, datetime.now(UTC), key="key-1"))
        # New requests go in, with their history, and finish.
        fresh = _request(user, datetime.now(UTC), key="new")
        await _accept(store, fresh)
        await _finish(worker, fresh)

        # The old rows go with the initial partition once it is past retention.
        today = day_of(datetime.now(UTC))
        report = await Retention(RetentionStore(engine), days=30).run_once(
            now=start_of_day(today + 40)
        )
        assert "requests_initial" in report.dropped
        assert await _present(engine, requests, requests.c.id, [*ids, fresh.id]) == {FAR_ID}
        assert await store.find_idempotent(keys) == {keys[3]: FAR_ID}
    finally:
        await engine.dispose()
        await drop_schema(DATABASE_URL, schema)


async def test_downgrade_flattens_the_log_and_keeps_its_rows() -> None:
    schema = unique()
    await migrate(DATABASE_URL, schema=schema)
    engine = create_engine(DATABASE_URL, schema=schema, pool_size=2)
    try:
        user = await _user(engine)
        r = _request(user, datetime.now(UTC), key="k")
        await _accept(AcceptStore(engine), r)
        await _downgrade(schema, "0004")
        async with engine.connect() as conn:
            row = await conn.execute(
                sa.text("SELECT idempotency_key FROM requests WHERE id = :i"), {"i": r.id}
            )
            assert row.scalar_one() == "k"
            parted = await conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_partitioned_table p JOIN pg_class c "
                    "ON c.oid = p.partrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = :s"
                ),
                {"s": schema},
            )
            assert parted.scalar_one() == 0
        await migrate(DATABASE_URL, schema=schema)  # and up again
        assert await _present(engine, requests, requests.c.id, [r.id]) == {r.id}
    finally:
        await engine.dispose()
        await drop_schema(DATABASE_URL, schema)


async def _downgrade(schema: str, revision: str) -> None:
    from alembic import command

    from fairlane_server.core.db import _alembic_config

    engine = create_engine(DATABASE_URL, schema=schema, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.downgrade(_alembic_config(sync), revision))
    finally:
        await engine.dispose()


def test_fairlane_maintain_runs_one_pass(pg_schema: str) -> None:
    env = {
        **os.environ,
        "FAIRLANE_DATABASE_URL": DATABASE_URL,
        "FAIRLANE_DATABASE_SCHEMA": pg_schema,
    }
    done = subprocess.run(
        [sys.executable, "-m", "fairlane.cli.main", "maintain", "--retention-days", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # A fresh log: the week ahead exists, nothing is old enough to go.
    assert "partitions created: none" in done.stdout
    assert "partitions dropped: none" in done.stdout


class _Relay:
    """Takes what the intake hands over; publishing is not under test here."""

    backlog = 0

    def __init__(self) -> None:
        self.handed: list[Any] = []

    def expect(self, ids: list[Any]) -> None:
        pass

    def settled(self, ids: list[Any]) -> None:
        pass

    def hand(self, items: list[Any]) -> None:
        self.handed.extend(items)

    def look(self, user_ids: list[Any]) -> None:
        pass


async def test_two_intakes_agree_on_a_key_sent_to_both(pg_schema: str) -> None:
    """Two queue replicas (two intakes, two engines) get the same idempotency key at once,
    each in a batch with other requests. The key's table refuses the second, that batch is
    split, its key is answered as a duplicate of the first request, and the rest of it is
    stored."""
    engines = [create_engine(DATABASE_URL, schema=pg_schema, pool_size=2) for _ in range(2)]
    intakes = [
        Intake(
            AcceptStore(e),
            _Relay(),  # type: ignore[arg-type]
            batch_size=100,
            linger_ms=20,
            lane_limit=1000,
        )
        for e in engines
    ]
    try:
        user = await _user(engines[0])
        for intake in intakes:
            intake.start()
        for round_ in range(5):
            key = f"both-{round_}"
            batches = [
                [
                    Submission(request=_request(user, datetime.now(UTC), key=k), reply_route="r")
                    for k in (None, key, f"own-{round_}-{n}", None)
                ]
                for n in range(2)
            ]
            answers = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        asyncio.shield(intake.submit(s))
                        for intake, batch in zip(intakes, batches, strict=True)
                        for s in batch
                    )
                ),
                30,
            )
            keyed = [answers[1], answers[5]]
            assert keyed[0].request_id == keyed[1].request_id
            assert sorted(a.duplicate for a in keyed) == [False, True]
            others = [a for i, a in enumerate(answers) if i not in (1, 5)]
            assert not any(a.duplicate for a in others)
            stored = await AcceptStore(engines[0]).stored(
                [s.request.id for b in batches for s in b]
            )
            assert stored == {a.request_id for a in answers}
            assert len(stored) == 7
    finally:
        for intake in intakes:
            await intake.stop()
        for e in engines:
            await e.dispose()
