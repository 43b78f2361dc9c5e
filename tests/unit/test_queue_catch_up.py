"""A replica's Sessions reading overdue results from the log share a few connections, so
that thousands of them waiting at once cannot hold the pool the intake and relay need."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from unittest.mock import MagicMock

from fairlane_server.queue.domain import CATCH_UP_READS, QueueDomain


class _Store:
    """finished() that waits until released, counting the reads in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0
        self.release = asyncio.Event()

    async def finished(self, user: uuid.UUID, ids: list[uuid.UUID]) -> list[Any]:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return []


def domain_on(store: Any) -> QueueDomain:
    """A QueueDomain whose store is `store`; nothing else of it is used here."""
    other = MagicMock()
    return QueueDomain(
        store=store,
        intake=other,
        hub=other,
        catalog=other,
        broker=other,
        admission=other,
        limits=other,
        streams=other,
        reply_route="route",
    )


async def test_at_most_a_few_sessions_read_the_log_at_once() -> None:
    store = _Store()
    domain = domain_on(store)
    reads = [asyncio.create_task(domain.finished(uuid.uuid4(), [uuid.uuid4()])) for _ in range(50)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert store.in_flight == CATCH_UP_READS
    store.release.set()
    assert await asyncio.gather(*reads) == [[]] * 50
    assert store.most == CATCH_UP_READS
