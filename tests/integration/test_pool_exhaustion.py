"""A database pool with no connection to give makes calls UNAVAILABLE with RetryInfo (never
UNKNOWN, never a message naming the pool), on the real auth service and PostgreSQL."""

from __future__ import annotations

import contextlib

import grpc
import pytest

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.client.errors import retry_delay_ms
from fairlane_server.auth.service import AuthService
from fairlane_server.core.settings import Settings
from tests.conftest import DATABASE_URL

pytestmark = pytest.mark.integration


async def test_exhausted_pool_is_unavailable_with_retry_info(pg_schema: str) -> None:
    settings = Settings(
        database_url=DATABASE_URL,
        database_schema=pg_schema,
        auth_listen="127.0.0.1:0",
        service_secret="pool-test-secret-0123456789",
        # One connection (and one overflow), given up on after a second.
        database_pool_size=1,
        database_timeout_seconds=1.0,
        retry_after_ms=750,
    )
    service = AuthService(settings)
    await service.start()
    try:
        async with contextlib.AsyncExitStack() as held:
            # Take every connection the service's pool can have.
            for _ in range(2):
                await held.enter_async_context(service.engine.connect())
            async with grpc.aio.insecure_channel(service.address) as channel:
                stub = auth_pb2_grpc.AuthServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.Register(
                        auth_pb2.RegisterRequest(
                            username="pool-user", password="a long unusual passphrase 42"
                        ),
                        timeout=30,
                    )
        # The connections are back: the same call now works.
        async with grpc.aio.insecure_channel(service.address) as channel:
            reply = await auth_pb2_grpc.AuthServiceStub(channel).Register(
                auth_pb2.RegisterRequest(
                    username="pool-user", password="a long unusual passphrase 42"
                ),
                timeout=30,
            )
    finally:
        await service.stop(1)
    error = failed.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert error.details() == "the database is busy, try again"
    assert retry_delay_ms(error) == 750
    assert reply.user_id
