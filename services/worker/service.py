"""Wires a worker replica: handlers, database, broker, writer, runner, discovery,
rebalancing, gRPC."""

from __future__ import annotations

from fairlane.worker.v1 import worker_pb2, worker_pb2_grpc
from fairlane_server.core.auth_client import AuthClient
from fairlane_server.core.backends import Backends
from fairlane_server.core.grpc_host import GrpcHost
from fairlane_server.core.health import DependencyMonitor
from fairlane_server.core.notify import results_channel
from fairlane_server.core.settings import Settings
from fairlane_server.core.transport import Transport
from fairlane_server.worker import registry
from fairlane_server.worker.discovery import LaneDiscovery
from fairlane_server.worker.presence import PresenceStore
from fairlane_server.worker.rebalance import Rebalancer
from fairlane_server.worker.runner import Runner
from fairlane_server.worker.servicer import WorkerServicer
from fairlane_server.worker.store import WorkerStore
from fairlane_server.worker.writer import ResultWriter

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


class WorkerService:
    name = "worker"

    def __init__(self, settings: Settings, *, backends: Backends | None = None) -> None:
        self._settings = settings
        self._backends = backends or Backends(settings)
        self.engine, self.broker = self._backends.engine, self._backends.broker
        self.handlers = registry.load(
            settings.handlers, default_attempts=settings.default_max_attempts
        )
        self.store = WorkerStore(
            self.engine, notify_channel=results_channel(settings.database_schema)
        )
        self.writer = ResultWriter(
            self.store,
            self.broker,
            batch_size=settings.result_batch_size,
            linger_ms=settings.result_linger_ms,
        )
        self.runner = Runner(
            broker=self.broker,
            store=self.store,
            writer=self.writer,
            handlers=self.handlers,
            concurrency=settings.concurrency,
            prefetch=settings.lane_prefetch,
            retry_base=settings.retry_base_seconds,
            retry_max=settings.retry_max_seconds,
            max_output_bytes=settings.max_output_bytes,
            worker_id=settings.instance_id,
            hooks=registry.load_hooks(settings.hooks),
        )
        transport = Transport.from_settings(settings)
        self._auth = AuthClient(settings.auth_target, transport=transport)
        self.discovery = LaneDiscovery(
            self.runner,
            self.broker,
            self._auth,
            queue_target=settings.queue_target,
            service_secret=settings.service_secret,
            interval=settings.lane_discovery_seconds,
            transport=transport,
        )
        self.rebalancer = (
            Rebalancer(
                self.runner,
                PresenceStore(self.engine),
                worker_id=settings.instance_id,
                interval=settings.rebalance_interval_seconds,
            )
            if settings.rebalance_interval_seconds > 0
            else None
        )
        self.host = GrpcHost(
            settings.worker_listen,
            [SERVICE_NAME],
            verifier=self._auth.token_verifier(settings),
            transport=transport,
            reflection_enabled=settings.reflection,
            retry_after_ms=settings.retry_after_ms,
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerServicer(self.runner, grace_seconds=settings.grace_seconds), self.host.server
        )
        self._monitor = DependencyMonitor(
            self.host,
            engine=self.engine,
            broker=self.broker,
            stalls={"results": self.writer.stalled_for},
            stall_seconds=settings.stall_seconds,
        )

    @property
    def address(self) -> str:
        return self.host.address

    async def start(self) -> None:
        await self.runner.start()
        await self.store.register_handlers(list(self.handlers.values()))
        await self._backends.connect()
        self.writer.start()
        await self.host.start()
        await self.discovery.start()
        if self.rebalancer is not None:
            self.rebalancer.start()
        await self._monitor.check()
        self._monitor.start()

    async def stop(self, grace: float) -> None:
        """Drain: finish running handlers within the grace period, hand lanes back."""
        await self._monitor.stop()
        await self.host.health.enter_graceful_shutdown()
        if self.rebalancer is not None:
            await self.rebalancer.stop()  # the others take over its share at once
        await self.discovery.stop()
        await self.runner.drain(grace)
        await self.writer.stop()
        await self.runner.shutdown()
        await self.host.stop(1.0)
        await self._auth.close()
        await self._backends.close()
