"""Probes that do not cascade: through a PostgreSQL outage, readiness ("" and the service's
name) goes NOT_SERVING and comes back, while liveness stays SERVING all along."""

from __future__ import annotations

from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import DATABASE_URL
from tests.e2e.suite import Suite, wait_until
from tests.e2e.test_fault_drills import base, start, via  # noqa: F401 - base is a fixture
from tests.proxy import TcpProxy

pytestmark = pytest.mark.e2e
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = {"queue": "fairlane.queue.v1.QueueService", "worker": "fairlane.worker.v1.WorkerService"}


async def status(target: str, service: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(reply.status)


async def test_readiness_follows_the_database_and_liveness_does_not(base: Suite) -> None:  # noqa: F811
    pg = urlsplit(DATABASE_URL)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432)
    await proxy.start()
    try:
        through_proxy = via(DATABASE_URL, proxy)
        targets = {
            name: await start(base, name, name, FAIRLANE_DATABASE_URL=through_proxy)
            for name in ("queue", "worker")
        }
        for name, target in targets.items():
            for service in ("", SERVICE[name], "liveness"):
                assert await status(target, service) == SERVING, (name, service)

        proxy.block()
        proxy.cut()
        for name, target in targets.items():

            async def not_ready(target: str = target, name: str = name) -> bool:
                return (
                    await status(target, "") == NOT_SERVING
                    and await status(target, SERVICE[name]) == NOT_SERVING
                )

            await wait_until(not_ready, 30)
            assert await status(target, "liveness") == SERVING, name

        proxy.unblock()
        for name, target in targets.items():

            async def ready(target: str = target, name: str = name) -> bool:
                return (
                    await status(target, "") == SERVING
                    and await status(target, SERVICE[name]) == SERVING
                )

            await wait_until(ready, 30)
            assert await status(target, "liveness") == SERVING, name
    finally:
        await proxy.close()
