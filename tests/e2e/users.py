"""Raw-stub helpers for end-to-end tests (the Python client is tested separately)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence

import grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from tests.e2e.suite import SERVICE_SECRET

PASSWORD = "correct horse battery"


async def new_user(auth_target: str) -> tuple[str, str]:
    """Registers and logs in a fresh user; returns (user_id, access_token)."""
    async with grpc.aio.insecure_channel(auth_target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        name = f"user-{uuid.uuid4().hex[:10]}"
        reg = await stub.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
        login = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
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
