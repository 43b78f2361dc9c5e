"""Raw-stub helpers for end-to-end tests (the Python client is tested separately)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.client.errors import retry_delay_ms
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from tests.e2e.suite import SERVICE_SECRET

PASSWORD = "correct horse battery"
T = TypeVar("T")


async def _as_told(call: Callable[[], Awaitable[T]], attempts: int = 5) -> T:
    """Makes an auth call as every client does: a refusal that carries RetryInfo is tried
    again after the delay the server asked for. Logins in flight count against their
    address until they succeed (services/auth/throttle.py), so a test that logs in more
    users at once than the address's free failures (20) meets a short block."""
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            delay = retry_delay_ms(exc)
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or delay is None:
                raise
            if attempt == attempts:
                raise
            await asyncio.sleep(delay / 1000)
    raise AssertionError("unreachable")


async def new_user(auth_target: str) -> tuple[str, str]:
    """Registers and logs in a fresh user; returns (user_id, access_token)."""
    async with grpc.aio.insecure_channel(auth_target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        name = f"user-{uuid.uuid4().hex[:10]}"
        reg = await _as_told(
            lambda: stub.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
        )
        login = await _as_told(
            lambda: stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
        )
        return reg.user_id, login.access_token


async def admin_token(auth_target: str, secret: str = SERVICE_SECRET) -> str:
    """An operator's token (role admin), issued for the service secret."""
    async with grpc.aio.insecure_channel(auth_target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        reply = await stub.IssueServiceToken(
            auth_pb2.IssueServiceTokenRequest(
                service="e2e-operator", secret=secret, role=auth_pb2.SERVICE_TOKEN_ROLE_ADMIN
            )
        )
        token: str = reply.access_token
        return token


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def run_session(
    queue_target: str, token: str, enqueues: Sequence[queue_pb2.EnqueueRequest]
) -> list[queue_pb2.SessionResponse]:
    """Sends every enqueue on one Session, half-closes, returns everything received."""

    async def requests() -> AsyncIterator[queue_pb2.SessionRequest]:
        for e in enqueues:
            yield queue_pb2.SessionRequest(enqueue=e)

    async with grpc.aio.insecure_channel(queue_target) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        return [r async for r in stub.Session(requests(), metadata=bearer(token), timeout=120)]
