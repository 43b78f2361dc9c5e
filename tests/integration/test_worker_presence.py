"""The workers table on PostgreSQL and SQLite: heartbeats, who is alive, leaving."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core.db import create_engine, migrate
from fairlane_server.core.models import workers
from fairlane_server.worker.presence import Peer, PresenceStore
from fairlane_server.worker.rebalance import fair_share
from tests.conftest import DATABASE_URL

pytestmark = pytest.mark.integration


@pytest.fixture(params=["postgresql", "sqlite"])
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str
) -> AsyncIterator[AsyncEngine]:
    if request.param == "postgresql":
        e = create_engine(DATABASE_URL, schema=pg_schema, pool_size=2)
    else:
        url = f"sqlite+aiosqlite:///{tmp_path}/presence.db"
        await migrate(url)
        e = create_engine(url)
    try:
        yield e
    finally:
        await e.dispose()


async def test_heartbeats_tell_who_is_alive_and_how_busy(engine: AsyncEngine) -> None:
    store = PresenceStore(engine)
    started = datetime.now(UTC)
    assert await store.beat("w1", 30, started_at=started, alive_for=5) == [Peer("w1", 30)]
    assert await store.beat("w2", 0, started_at=started, alive_for=5) == [
        Peer("w1", 30),
        Peer("w2", 0),
    ]
    # A beat updates the count; a replica silent for longer than alive_for is not counted.
    async with engine.begin() as conn:
        await conn.execute(
            workers.update()
            .where(workers.c.worker_id == "w2")
            .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=10))
        )
    assert await store.beat("w1", 12, started_at=started, alive_for=5) == [Peer("w1", 12)]
    await store.beat("w3", 9, started_at=started, alive_for=5)
    await store.leave("w1")
    assert await store.beat("w3", 9, started_at=started, alive_for=5) == [Peer("w3", 9)]


def test_fair_share_rounds_up() -> None:
    assert fair_share(30, 3) == 10
    assert fair_share(31, 3) == 11
    assert fair_share(2, 3) == 1
    assert fair_share(0, 3) == 0
    assert fair_share(5, 0) == 5
