"""A request log that refuses every write for a while, not for any value (here a lock not
had within lock_timeout; read-only mode is another): the stages wait or answer
"unavailable", they never take it for the data's fault. An outside review put PostgreSQL
in read-only mode for 10 s: finished results were written as FAILED, then lost, and
enqueues were refused with INVALID_ARGUMENT and no retry."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.models import requests
from fairlane_server.queue.accept_store import AcceptStore
from fairlane_server.queue.intake import Intake, Rejection, Submission
from fairlane_server.queue.outbox_store import OutboxStore
from fairlane_server.queue.relay import LaneRelay
from fairlane_server.worker.store import Attempt, Outcome, WorkerStore
from fairlane_server.worker.writer import ResultWriter
from tests import polling
from tests.integration.test_store_contract import _user, new_request, store_requests

pytestmark = pytest.mark.integration


class Locked:
    """The engine's sessions wait at most 100 ms for a lock (lock_timeout, as a DBA sets
    it), and another session holds the log's tables until `release()`: PostgreSQL itself
    refuses each write with SQLSTATE 55P03, as it does while a migration or a maintenance
    job holds them."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._holder: Any = None
        self._release = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # At every checkout: a connection given back to the pool is reset.
        event.listen(engine.sync_engine.pool, "checkout", self._checkout)

    @staticmethod
    def _checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("SET lock_timeout = '100ms'")
        cursor.close()
        # The driver ran it in a transaction of its own: kept only once committed.
        dbapi_connection.commit()

    async def hold(self, *tables: str) -> None:
        held = asyncio.Event()

        async def holder() -> None:
            async with self._engine.connect() as conn, conn.begin():
                await conn.execute(sa.text(f"LOCK TABLE {', '.join(tables)} IN EXCLUSIVE MODE"))
                held.set()
                await self._release.wait()

        self._task = asyncio.create_task(holder())
        await held.wait()

    async def release(self) -> None:
        self._release.set()
        if self._task is not None:
            await self._task


# Lock waits and lock_timeout are PostgreSQL's: SQLite has one writer and no such setting.
on_postgresql = pytest.mark.parametrize("engine", ["postgresql"], indirect=True)


@on_postgresql
async def test_the_result_writer_waits_for_a_locked_log_and_loses_nothing(
    engine: AsyncEngine,
) -> None:
    user = await _user(engine)
    batch = [new_request(user) for _ in range(4)]
    await store_requests(engine, batch)
    locked = Locked(engine)
    await locked.hold("requests")
    broker = MemoryBroker(lane_max_length=100)
    await broker.connect()
    writer = ResultWriter(WorkerStore(engine), broker, batch_size=100, linger_ms=0)
    at = datetime.now(UTC)
    with capture_logs() as logs:
        writer.start()
        futures = [
            writer.finish(
                Outcome(r.id, user, "SUCCEEDED", output=b"ok", attempts=[Attempt(1, at)]),
                route="queue.test",
                client_ref="",
                handler="echo",
            )
            for r in batch
        ]
        try:
            # Refused, retried, and not answered while the log refuses every write.
            await polling.until(
                lambda: sum(e["event"] == "result_write_failed" for e in logs) >= 2, timeout=30
            )
            assert not any(f.done() for f in futures)
            await locked.release()
            await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
        finally:
            await locked.release()
            await writer.stop(timeout=0)
            await broker.close()
    assert not [e for e in logs if e["event"] in {"outcome_refused", "outcome_lost"}]
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.select(requests.c.status, requests.c.lane_seq)
                .where(requests.c.id.in_([r.id for r in batch]))
                .order_by(requests.c.lane_seq)
            )
        ).all()
    assert [(r.status, r.lane_seq) for r in rows] == [("SUCCEEDED", n) for n in (1, 2, 3, 4)]


@on_postgresql
async def test_intake_answers_unavailable_with_a_retry_while_the_log_is_locked(
    engine: AsyncEngine,
) -> None:
    user = await _user(engine)
    locked = Locked(engine)
    await locked.hold("lanes", "requests", "outbox")
    broker = MemoryBroker(lane_max_length=100)
    await broker.connect()
    relay = LaneRelay(OutboxStore(engine), broker)
    intake = Intake(
        AcceptStore(engine),
        relay,
        batch_size=10,
        linger_ms=0,
        lane_limit=100,
        transient_patience=0.2,
    )
    batch = [new_request(user) for _ in range(3)]
    futures = [intake.submit(Submission(request=r, reply_route="queue.test")) for r in batch]
    intake.start()
    try:
        answers = await asyncio.gather(*futures, return_exceptions=True)
    finally:
        await intake.stop()
        await broker.close()
        await locked.release()
    assert all(isinstance(a, Rejection) for a in answers), answers
    rejections = [a for a in answers if isinstance(a, Rejection)]
    assert {r.reason for r in rejections} == {"database_unavailable"}
    assert all(r.retry_after_ms > 0 for r in rejections)
    async with engine.connect() as conn:
        stored = await conn.scalar(
            sa.select(sa.func.count()).where(requests.c.id.in_([r.id for r in batch]))
        )
    assert stored == 0
