"""A revoked login is refused by the queue service within the revocation bound, whether it
was revoked by Revoke or by the late reuse of a spent refresh token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.settings import Settings
from tests.conftest import DATABASE_URL, broker_url, unique
from tests.e2e.suite import Suite, wait_until
from tests.e2e.users import PASSWORD, bearer

pytestmark = pytest.mark.e2e

REUSE_INTERVAL = 1.0
# The documented bound: the services' refetch interval (default), plus room for one fetch
# on a loaded machine.
BOUND = Settings().revocation_refresh_seconds
SLACK = 5.0


@pytest.fixture
async def suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.extra_env["FAIRLANE_REFRESH_REUSE_INTERVAL_SECONDS"] = str(REUSE_INTERVAL)
    try:
        s.start("auth")
        await s.wait_serving("auth")
        s.start("queue")
        await s.wait_serving("queue")
        yield s
    finally:
        codes = s.stop_all()
    assert codes == {"queue": 0, "auth": 0}, {n: s.log(n) for n in codes}


async def _accepted(queue: queue_pb2_grpc.QueueServiceStub, token: str) -> grpc.StatusCode:
    try:
        await queue.ListRequests(
            queue_pb2.ListRequestsRequest(page_size=1), metadata=bearer(token), timeout=10
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            assert exc.details() == "access token revoked: log in again"
        return exc.code()
    return grpc.StatusCode.OK


async def test_revoked_logins_are_refused_by_the_queue_within_the_bound(suite: Suite) -> None:
    async with (
        grpc.aio.insecure_channel(suite.target("auth")) as auth_channel,
        grpc.aio.insecure_channel(suite.target("queue")) as queue_channel,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(auth_channel)
        queue = queue_pb2_grpc.QueueServiceStub(queue_channel)
        name = unique("revoked")
        await auth.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
        login = auth_pb2.LoginRequest(username=name, password=PASSWORD)
        revoked, replayed, kept = [await auth.Login(login) for _ in range(3)]
        for pair in (revoked, replayed, kept):
            assert await _accepted(queue, pair.access_token) == grpc.StatusCode.OK

        # Revoke: the login's access token stops working on the queue.
        await auth.Revoke(auth_pb2.RevokeRequest(refresh_token=revoked.refresh_token))

        async def refused(token: str) -> bool:
            return bool(await _accepted(queue, token) == grpc.StatusCode.UNAUTHENTICATED)

        await wait_until(lambda: refused(revoked.access_token), timeout=BOUND + SLACK)

        # A spent refresh token replayed after the reuse interval revokes its family: the
        # access token the first refresh bought is refused too.
        request = auth_pb2.RefreshRequest(refresh_token=replayed.refresh_token)
        rotated = await auth.Refresh(request)
        await asyncio.sleep(REUSE_INTERVAL + 0.2)  # the interval is a duration
        with pytest.raises(grpc.aio.AioRpcError) as replay:
            await auth.Refresh(request)
        assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await wait_until(lambda: refused(rotated.access_token), timeout=BOUND + SLACK)

        assert await _accepted(queue, kept.access_token) == grpc.StatusCode.OK
