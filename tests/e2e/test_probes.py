"""Probes that do not cascade: through a PostgreSQL outage, readiness ("" and the service's
name) goes NOT_SERVING and comes back, while liveness stays SERVING all along: on the
queue, the worker and auth."""

from __future__ import annotations

import json
import time
import uuid
from urllib.parse import urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import DATABASE_URL
from tests.e2e.suite import Suite, wait_until
from tests.e2e.test_fault_drills import base, start, via  # noqa: F401 - base is a fixture
from tests.e2e.users import PASSWORD
from tests.ports import free_port
from tests.proxy import TcpProxy

pytestmark = pytest.mark.e2e
SERVING: int = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE = {"queue": "fairlane.queue.v1.QueueService", "worker": "fairlane.worker.v1.WorkerService"}
AUTH = "fairlane.auth.v1.AuthService"
# The auth replica checks its database every 2 s with a 2 s timeout: NOT_SERVING within
# about 4 s of the cut, SERVING within about 2 s of the return. The bounds leave room.
AUTH_DOWN_BOUND = 10.0
AUTH_UP_BOUND = 10.0


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


async def test_auth_readiness_follows_its_database_and_liveness_does_not(base: Suite) -> None:  # noqa: F811
    """Auth needs PostgreSQL for every Register, Login, Refresh and service token: while its
    database is cut it must leave the load balancers' rotation (NOT_SERVING on "" and its
    name), and come back after; liveness answers SERVING throughout (no restarts)."""
    pg = urlsplit(DATABASE_URL)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432)
    await proxy.start()
    base.ports["auth-cut"] = free_port()
    target = base.target("auth-cut")
    try:
        base.start(
            "auth-cut",
            "auth",
            FAIRLANE_AUTH_LISTEN=target,
            FAIRLANE_DATABASE_URL=via(DATABASE_URL, proxy),
        )
        await base.wait_serving("auth-cut")
        for service in ("", AUTH, "liveness"):
            assert await status(target, service) == SERVING, service
        name = f"probe-{uuid.uuid4().hex[:10]}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = auth_pb2_grpc.AuthServiceStub(channel)
            await stub.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))

            proxy.block()
            proxy.cut()
            cut_at = time.monotonic()

            async def not_ready() -> bool:
                assert await status(target, "liveness") == SERVING
                return (
                    await status(target, "") == NOT_SERVING
                    and await status(target, AUTH) == NOT_SERVING
                )

            await wait_until(not_ready, AUTH_DOWN_BOUND)
            down_after = time.monotonic() - cut_at
            # What readiness stands for: logins fail while the database is away.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Login(
                    auth_pb2.LoginRequest(username=name, password=PASSWORD), timeout=15
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            # Still out of rotation after the failed login (no flapping), still alive.
            for service in ("", AUTH):
                assert await status(target, service) == NOT_SERVING, service
            assert await status(target, "liveness") == SERVING

            proxy.unblock()
            back_at = time.monotonic()

            async def ready() -> bool:
                assert await status(target, "liveness") == SERVING
                return await status(target, "") == SERVING and await status(target, AUTH) == SERVING

            await wait_until(ready, AUTH_UP_BOUND)
            up_after = time.monotonic() - back_at

            async def logs_in() -> bool:
                try:
                    await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    return False
                return True

            await wait_until(logs_in, 30)
        # The log says which dependency failed.
        log = (base.log_dir / "auth-cut.log").read_text(errors="replace")
        events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        changes = [e for e in events if e.get("event") == "health_changed"]
        assert [c["serving"] for c in changes] == [True, False, True], changes
        assert changes[1]["failed"] == ["database"], changes
        print(f"auth NOT_SERVING {down_after:.1f} s after the cut, SERVING {up_after:.1f} s after")
    finally:
        await proxy.close()
