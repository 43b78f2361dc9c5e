"""The three services in this process on the embedded backends (the in-memory broker and
SQLite), as `fairlane dev` runs them, for tests that drive them through real gRPC."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fairlane.client import Client
from fairlane_server.auth.service import AuthService
from fairlane_server.core.backends import Backends
from fairlane_server.core.db import engine_for, migrate
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.settings import Settings
from fairlane_server.queue.service import QueueService
from fairlane_server.worker.service import WorkerService


@contextlib.asynccontextmanager
async def embedded_services(
    settings: Settings, *, lane_max_length: int
) -> AsyncIterator[tuple[Client, QueueService]]:
    """Starts auth, queue and worker with `settings` (listening on free ports), yields a
    client of them and the queue service, and stops them all on exit."""
    await migrate(settings.database_url)
    engine = engine_for(settings)
    broker = MemoryBroker(lane_max_length=lane_max_length)
    await broker.connect()
    auth = AuthService(settings, engine=engine)
    await auth.start()
    settings = settings.model_copy(update={"auth_target": auth.address})
    queue = QueueService(settings, backends=Backends(settings, engine=engine, broker=broker))
    await queue.start()
    settings = settings.model_copy(update={"queue_target": queue.address})
    worker = WorkerService(settings, backends=Backends(settings, engine=engine, broker=broker))
    await worker.start()
    try:
        async with Client(auth.address, queue.address, worker.address) as client:
            yield client, queue
    finally:
        await worker.stop(5)
        await queue.stop(1)
        await auth.stop(1)
        await broker.close()
        await engine.dispose()
