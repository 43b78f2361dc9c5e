"""The request log's engine and the broker of one service process."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core.amqp import broker_for
from fairlane_server.core.broker import Broker
from fairlane_server.core.db import engine_for
from fairlane_server.core.settings import Settings


class Backends:
    """A service's database engine and broker: shared ones handed in (`fairlane dev` runs
    every service on one of each, and closes them itself), or its own, made from the
    settings, connected and closed with the service."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: AsyncEngine | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.engine = engine or engine_for(settings)
        self.broker: Broker = broker or broker_for(settings)
        self.owns_engine = engine is None
        self.owns_broker = broker is None

    async def connect(self) -> None:
        """Connects its own broker (a shared one is connected by whoever made it)."""
        if self.owns_broker:
            await self.broker.connect()

    async def close(self) -> None:
        """Closes what it made; shared backends stay open for the other services."""
        if self.owns_broker:
            await self.broker.close()
        if self.owns_engine:
            await self.engine.dispose()
