"""Wires the queue service: database, broker, JWKS verifier, intake, hub, gRPC host."""

from __future__ import annotations

import uuid

from google.protobuf.message import DecodeError
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane.common.v1 import lane_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.auth_client import AuthClient
from fairlane_server.core.backends import Backends
from fairlane_server.core.breaker import CircuitBreaker
from fairlane_server.core.db import create_engine
from fairlane_server.core.grpc_host import GrpcHost
from fairlane_server.core.health import DependencyMonitor
from fairlane_server.core.logging import get_logger
from fairlane_server.core.notify import NotifyListener, lane_wanted_channel, results_channel
from fairlane_server.core.settings import Settings
from fairlane_server.core.transport import Transport
from fairlane_server.queue.accept_store import AcceptStore
from fairlane_server.queue.admission import Admission
from fairlane_server.queue.catalog import HandlerCatalog
from fairlane_server.queue.catch_up import CatchUpReader
from fairlane_server.queue.domain import QueueDomain, StreamLimits
from fairlane_server.queue.hub import Hub
from fairlane_server.queue.intake import Intake
from fairlane_server.queue.janitor import LaneJanitor
from fairlane_server.queue.lane_rebuild import put_back
from fairlane_server.queue.lane_store import LaneHousekeepingStore
from fairlane_server.queue.outbox_store import OutboxStore
from fairlane_server.queue.relay import LaneRelay
from fairlane_server.queue.retention import Retention
from fairlane_server.queue.retention_store import RetentionStore
from fairlane_server.queue.servicer import QueueServicer
from fairlane_server.queue.store import RequestStore
from fairlane_server.queue.validation import Limits

log = get_logger(__name__)

SERVICE_NAME = queue_pb2.DESCRIPTOR.services_by_name["QueueService"].full_name


class QueueService:
    name = "queue"

    def __init__(
        self, settings: Settings, *, backends: Backends | None = None, rebuild_lanes: bool = False
    ) -> None:
        """`rebuild_lanes`: the broker starts empty (the embedded one of `fairlane dev`),
        so the log's unfinished requests are put back in their lanes at start
        (services/queue/lane_rebuild.py)."""
        s = settings
        self._settings = settings
        self._rebuild_lanes = rebuild_lanes
        self._backends = backends or Backends(s)
        self.engine, self.broker = self._backends.engine, self._backends.broker
        self._maintenance: AsyncEngine | None = None
        transport = Transport.from_settings(s)
        self.host = GrpcHost(
            s.queue_listen,
            [SERVICE_NAME],
            transport=transport,
            reflection_enabled=s.reflection,
            retry_after_ms=s.retry_after_ms,
        )
        self._auth = AuthClient(s.auth_target, transport=transport)
        self.hub = Hub()
        store = RequestStore(self.engine)
        postgres = self.engine.dialect.name == "postgresql"
        self.relay = LaneRelay(
            OutboxStore(
                self.engine,
                wanted_channel=lane_wanted_channel(s.database_schema) if postgres else None,
            ),
            self.broker,
            hold_seconds=s.relay_hold_seconds,
            stale_after=s.outbox_stale_seconds,
            sweep_seconds=min(5.0, max(0.2, s.outbox_stale_seconds / 2)),
        )
        self.intake = Intake(
            AcceptStore(self.engine),
            self.relay,
            batch_size=s.write_batch_size,
            linger_ms=s.write_linger_ms,
            lane_limit=s.lane_max_length,
            retry_after_ms=s.retry_after_ms,
            breaker=CircuitBreaker(
                "database", threshold=s.breaker_threshold, reset_seconds=s.breaker_reset_seconds
            ),
        )
        # Not the broker: while it is away the queue keeps accepting into the outbox, which
        # is what the outbox is for, and a replica taken out of rotation at the first drop
        # (every replica at once: they share the broker) could not. A relay with work and
        # no publishes for stall_seconds still turns the replica NOT_SERVING.
        self._monitor = DependencyMonitor(
            self.host,
            engine=self.engine,
            stalls={"intake": self.intake.stalled_for, "relay": self.relay.stalled_for},
            stall_seconds=s.stall_seconds,
        )
        self.janitor = LaneJanitor(
            store,
            LaneHousekeepingStore(self.engine),
            self.broker,
            self.hub,
            idle_seconds=s.lane_idle_ttl_seconds,
        )
        self.retention = Retention(
            RetentionStore(self._maintenance_engine()),
            days=s.retention_days,
            interval_seconds=s.maintenance_interval_seconds,
        )
        self._listener = (
            NotifyListener(
                s.database_url,
                {
                    results_channel(s.database_schema): self.hub.wake,
                    lane_wanted_channel(s.database_schema): self.relay.wanted,
                },
                self.hub.wake_all,
            )
            if postgres
            else None
        )
        self._verifier = self._auth.token_verifier(s)
        self.host.authz.use(self._verifier)
        self.catch_up = CatchUpReader(store)
        self.domain = QueueDomain(
            store=store,
            intake=self.intake,
            hub=self.hub,
            catalog=HandlerCatalog(store, max_age_seconds=s.handler_cache_seconds),
            catch_up=self.catch_up,
            broker=self.broker,
            admission=Admission(
                rate=s.user_rate_per_second,
                burst=s.user_burst,
                max_pending=s.max_pending_writes,
                overload_retry_after_ms=s.overload_retry_after_ms,
            ),
            limits=Limits(
                max_payload_bytes=s.max_payload_bytes,
                default_max_attempts=s.default_max_attempts,
                max_deadline_seconds=s.max_deadline_seconds,
            ),
            streams=StreamLimits(
                session_window=s.session_window,
                max_batch_items=s.max_batch_items,
                max_streams_per_user=s.max_streams_per_user,
                results_page=s.results_page_size,
                result_grace_seconds=s.result_grace_seconds,
                session_buffer_bytes=s.session_buffer_bytes,
            ),
            reply_route=s.reply_route,
            retry_after_ms=s.retry_after_ms,
        )
        self._servicer = QueueServicer(settings=s, verifier=self._verifier, domain=self.domain)
        queue_pb2_grpc.add_QueueServiceServicer_to_server(self._servicer, self.host.server)

    def _maintenance_engine(self) -> AsyncEngine:
        """The log maintenance's own connection: it holds an advisory lock for a pass and
        may wait on partition locks, which the request path's pool must never do. On
        SQLite (one file, one process), or with an engine handed in, it shares that."""
        s = self._settings
        if self.engine.dialect.name != "postgresql" or not self._backends.owns_engine:
            return self.engine
        self._maintenance = create_engine(
            s.database_url, schema=s.database_schema, pool_size=1, timeout=300.0
        )
        return self._maintenance

    async def _on_control(self, body: bytes) -> None:
        """A lane deleted by any replica's janitor is declared and announced anew on use."""
        try:
            event = lane_pb2.ControlEvent.FromString(body)
        except DecodeError:
            return
        if event.WhichOneof("kind") == "lane_deleted":
            try:
                self.relay.forget_lane(uuid.UUID(event.lane_deleted))
            except ValueError:
                log.warning("bad_control_event", kind="lane_deleted")

    @property
    def address(self) -> str:
        return self.host.address

    async def start(self) -> None:
        await self._auth.wait_ready(timeout=60)
        await self._verifier.refresh()
        await self._backends.connect()
        await self.broker.consume_results(self._settings.reply_route, self.hub.on_message)
        await self.broker.consume_control(self._on_control)
        if self._listener is not None:
            self._listener.start()
        restored = (
            await put_back(self.engine, reply_route=self._settings.reply_route)
            if self._rebuild_lanes
            else {}
        )
        self.relay.start()
        if restored:
            log.info("lanes_rebuilt", lanes=len(restored), requests=sum(restored.values()))
            self.relay.look(list(restored))
        self.intake.start()
        self.catch_up.start()
        self.janitor.start()
        self.retention.start()
        await self.host.start()
        await self._monitor.check()
        self._monitor.start()

    async def stop(self, grace: float) -> None:
        await self._monitor.stop()
        await self.host.stop(grace)
        await self.catch_up.stop()
        await self.janitor.stop()
        await self.retention.stop()
        await self.intake.stop()
        await self.relay.stop(timeout=min(grace, 5.0))
        if self._listener is not None:
            await self._listener.stop()
        await self._auth.close()
        if self._maintenance is not None:
            await self._maintenance.dispose()
        await self._backends.close()
