"""Readiness on a PostgreSQL that answers but refuses every write (read-only, as after a
failover to a standby): NOT_SERVING, naming the database, and SERVING again once it takes
writes (an outside review: SERVING through 45 s of read-only while every request was
refused)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core.db import create_engine
from fairlane_server.core.health import DependencyMonitor
from tests.conftest import DATABASE_URL
from tests.unit.test_health_monitor import Host

pytestmark = pytest.mark.integration


class ReadOnlySessions:
    """While `on`, every connection the engine hands out is read-only for its session
    (default_transaction_read_only), so PostgreSQL refuses each write with SQLSTATE 25006."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.on = False
        event.listen(engine.sync_engine.pool, "checkout", self._checkout)

    def _checkout(self, dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET default_transaction_read_only = {'on' if self.on else 'off'}")
        cursor.close()
        dbapi_connection.commit()  # run in a transaction of the driver's: kept once committed


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    e = create_engine(DATABASE_URL, pool_size=1)
    try:
        yield e
    finally:
        await e.dispose()


async def test_a_read_only_database_is_not_ready(engine: AsyncEngine) -> None:
    host = Host()
    read_only = ReadOnlySessions(engine)
    monitor = DependencyMonitor(host, engine=engine)  # type: ignore[arg-type]
    assert await monitor.check()
    read_only.on = True
    assert not await monitor.check()
    assert monitor.failed == ("database",)
    read_only.on = False
    assert await monitor.check()
    assert host.serving == [True, False, True]
