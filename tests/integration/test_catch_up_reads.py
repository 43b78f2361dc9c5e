"""Sessions reading overdue results from the real request log share at most a few pooled
connections, so the intake and the relay always find one, and many asks go in few reads."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from sqlalchemy import event

from fairlane_server.core.db import create_engine
from fairlane_server.queue.catch_up import READERS, CatchUpReader
from fairlane_server.queue.store import RequestStore
from tests.conftest import DATABASE_URL
from tests.unit.test_queue_catch_up import domain_on


async def test_overdue_result_reads_never_hold_more_than_a_few_connections(
    pg_schema: str,
) -> None:
    # A pool of 4 (2 + 2 overflow): 40 Sessions reading at once would take all of it.
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=2)
    out = [0]
    most = [0]
    statements = [0]

    @event.listens_for(engine.sync_engine, "checkout")
    def _out(*_: Any) -> None:
        out[0] += 1
        most[0] = max(most[0], out[0])

    @event.listens_for(engine.sync_engine, "checkin")
    def _in(*_: Any) -> None:
        out[0] -= 1

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _statement(*_: Any) -> None:
        statements[0] += 1

    store = RequestStore(engine)
    reader = CatchUpReader(store)
    reader.start()
    domain = domain_on(store, reader)
    try:
        found = await asyncio.gather(
            *(domain.finished(uuid.uuid4(), [uuid.uuid4(), uuid.uuid4()]) for _ in range(40))
        )
    finally:
        await reader.stop()
        await engine.dispose()
    assert found == [[]] * 40
    assert 1 <= most[0] <= READERS
    # All 40 asks were waiting before the first read began: one read took them all.
    assert statements[0] == 1
