"""Wires the queue service: database, broker, JWKS verifier, intake, hub, gRPC host."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from services.core.amqp import AmqpBroker
from services.core.auth_client import AuthClient
from services.core.broker import Broker
from services.core.db import create_engine
from services.core.grpc_host import GrpcHost
from services.core.health import DependencyMonitor
from services.core.settings import Settings
from services.core.tokens import TokenVerifier
from services.queue.catalog import HandlerCatalog
from services.queue.hub import Hub
from services.queue.intake import Intake
from services.queue.servicer import QueueServicer
from services.queue.store import RequestStore

SERVICE_NAME = queue_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name


class QueueService:
    name = "queue"

    def __init__(
        self,
        settings: Settings,
        *,
        engine: AsyncEngine | None = None,
        broker: Broker | None = None,
    ) -> None:
        self._settings = settings
        self._own_engine = engine is None
        self._own_broker = broker is None
        self.engine = engine or create_engine(
            settings.database_url,
            schema=settings.database_schema,
            pool_size=settings.database_pool_size,
        )
        self.broker: Broker = broker or AmqpBroker(
            settings.broker_url, lane_max_length=settings.lane_max_length
        )
        self.host = GrpcHost(settings.queue_listen, [SERVICE_NAME])
        self._auth = AuthClient(settings.auth_target)
        self._monitor = DependencyMonitor(self.host, engine=self.engine, broker=self.broker)
        self.hub = Hub()
        store = RequestStore(self.engine)
        self.intake = Intake(
            store,
            self.broker,
            batch_size=settings.write_batch_size,
            linger_ms=settings.write_linger_ms,
            retry_after_ms=settings.retry_after_ms,
        )
        self._verifier = TokenVerifier(
            self._auth.jwks,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            refresh_seconds=settings.jwks_refresh_seconds,
        )
        self._servicer = QueueServicer(
            settings=settings,
            verifier=self._verifier,
            store=store,
            intake=self.intake,
            hub=self.hub,
            catalog=HandlerCatalog(store, max_age_seconds=settings.handler_cache_seconds),
            broker=self.broker,
        )
        queue_pb2_grpc.add_QueueServiceServicer_to_server(self._servicer, self.host.server)

    @property
    def address(self) -> str:
        return self.host.address

    async def start(self) -> None:
        await self._auth.wait_ready(timeout=60)
        await self._verifier.refresh()
        if self._own_broker:
            await self.broker.connect()
        await self.broker.consume_results(self._settings.reply_route, self.hub.on_message)
        self.intake.start()
        await self.host.start()
        await self._monitor.check()
        self._monitor.start()

    async def stop(self, grace: float) -> None:
        await self._monitor.stop()
        await self.host.stop(grace)
        await self.intake.stop()
        if self._own_broker:
            await self.broker.close()
        await self._auth.close()
        if self._own_engine:
            await self.engine.dispose()
