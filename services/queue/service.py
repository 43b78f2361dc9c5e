"""Wires the queue service: database, broker, JWKS verifier, intake, hub, gRPC host."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from services.core.amqp import AmqpBroker
from services.core.auth_client import AuthClient
from services.core.breaker import CircuitBreaker
from services.core.broker import Broker
from services.core.db import engine_for
from services.core.grpc_host import GrpcHost
from services.core.health import DependencyMonitor
from services.core.settings import Settings
from services.queue.admission import Admission
from services.queue.catalog import HandlerCatalog
from services.queue.hub import Hub
from services.queue.intake import Intake
from services.queue.janitor import LaneJanitor
from services.queue.lane_store import LaneHousekeepingStore
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
        s = settings
        self._settings = settings
        self._own_engine = engine is None
        self._own_broker = broker is None
        self.engine = engine or engine_for(s)
        self.broker: Broker = broker or AmqpBroker(
            s.broker_url,
            lane_max_length=s.lane_max_length,
            queue_type=s.lane_queue_type,
        )
        self.host = GrpcHost(s.queue_listen, [SERVICE_NAME])
        self._auth = AuthClient(s.auth_target)
        self._monitor = DependencyMonitor(self.host, engine=self.engine, broker=self.broker)
        self.hub = Hub()
        store = RequestStore(self.engine)
        self.intake = Intake(
            store,
            self.broker,
            batch_size=s.write_batch_size,
            linger_ms=s.write_linger_ms,
            retry_after_ms=s.retry_after_ms,
            breaker=CircuitBreaker(
                "database", threshold=s.breaker_threshold, reset_seconds=s.breaker_reset_seconds
            ),
        )
        self.janitor = LaneJanitor(
            store,
            LaneHousekeepingStore(self.engine),
            self.broker,
            self.hub,
            idle_seconds=s.lane_idle_ttl_seconds,
        )
        self._verifier = self._auth.token_verifier(s)
        self.host.authz.use(self._verifier)
        self._servicer = QueueServicer(
            settings=s,
            verifier=self._verifier,
            store=store,
            intake=self.intake,
            hub=self.hub,
            catalog=HandlerCatalog(store, max_age_seconds=s.handler_cache_seconds),
            broker=self.broker,
            admission=Admission(
                rate=s.user_rate_per_second, burst=s.user_burst, max_pending=s.max_pending_writes
            ),
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
        self.janitor.start()
        await self.host.start()
        await self._monitor.check()
        self._monitor.start()

    async def stop(self, grace: float) -> None:
        await self._monitor.stop()
        await self.host.stop(grace)
        await self.janitor.stop()
        await self.intake.stop()
        if self._own_broker:
            await self.broker.close()
        await self._auth.close()
        if self._own_engine:
            await self.engine.dispose()
