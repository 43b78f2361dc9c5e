"""A revoked login is refused by the queue service within the revocation bound, whether it
was revoked by Revoke or by the late reuse of a spent refresh token; and streams opened
before the revocation end with UNAUTHENTICATED instead of going on with the login they
were opened with; an open stream outlives its access token's expiry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.client import Client
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.settings import Settings
from tests.conftest import DATABASE_URL, broker_url, unique
from tests.e2e.suite import Suite, auth_and_queue, serving, wait_until
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
    async with auth_and_queue(s):
        yield s


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


# The stream checks (services/core/tokens.py).
REVOKED_ON_STREAM = "login revoked; log in again and open a new stream"
TOKEN_TTL = 4  # seconds, for the suite whose tokens expire while a stream is open


@pytest.fixture
async def full_suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    """Auth, queue and a worker (the worker registers the handlers an enqueue names)."""
    async with serving(Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)) as s:
        yield s


@pytest.fixture
async def short_ttl_suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.extra_env["FAIRLANE_ACCESS_TOKEN_TTL_SECONDS"] = str(TOKEN_TTL)
    async with serving(s):
        yield s


class OpenSession:
    """A raw Session stream whose requests are written one by one, when the test says."""

    def __init__(self, queue: queue_pb2_grpc.QueueServiceStub, token: str) -> None:
        self.call = queue.Session(metadata=bearer(token), timeout=60)

    async def enqueue(self, client_ref: str, handler: str = "echo") -> None:
        request = queue_pb2.EnqueueRequest(handler=handler, client_ref=client_ref)
        # A stream the server has ended already refuses the write; its status is read.
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await self.call.write(queue_pb2.SessionRequest(enqueue=request))

    async def read(self) -> queue_pb2.SessionResponse:
        response = await self.call.read()
        assert response is not grpc.aio.EOF
        return response  # type: ignore[no-any-return]

    async def until_ended(self) -> tuple[list[queue_pb2.SessionResponse], grpc.aio.AioRpcError]:
        """Every response left, then the error that ended the stream."""
        responses = []
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                responses.append(response)
        except grpc.aio.AioRpcError as ended:
            return responses, ended
        raise AssertionError(f"the stream ended with OK after {responses}")


async def _two_logins(
    auth: auth_pb2_grpc.AuthServiceStub,
) -> tuple[auth_pb2.LoginResponse, auth_pb2.LoginResponse]:
    name = unique("open")
    await auth.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
    login = auth_pb2.LoginRequest(username=name, password=PASSWORD)
    return await auth.Login(login), await auth.Login(login)


async def _client_refs(queue: queue_pb2_grpc.QueueServiceStub, token: str) -> list[str]:
    page = await queue.ListRequests(
        queue_pb2.ListRequestsRequest(page_size=100), metadata=bearer(token), timeout=10
    )
    return sorted(r.client_ref for r in page.requests)


async def test_an_open_session_ends_unauthenticated_once_its_login_is_revoked(
    full_suite: Suite,
) -> None:
    suite = full_suite
    async with (
        grpc.aio.insecure_channel(suite.target("auth")) as auth_channel,
        grpc.aio.insecure_channel(suite.target("queue")) as queue_channel,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(auth_channel)
        queue = queue_pb2_grpc.QueueServiceStub(queue_channel)
        revoked, kept = await _two_logins(auth)
        session = OpenSession(queue, revoked.access_token)
        await session.enqueue("before")
        assert (await session.read()).accepted.client_ref == "before"

        await auth.Revoke(auth_pb2.RevokeRequest(refresh_token=revoked.refresh_token))
        # The open stream learns of it when the queue does (the fetch that lists the
        # family ends it), so within the bound, whether or not the client writes.
        async with asyncio.timeout(BOUND + SLACK):
            responses, ended = await session.until_ended()
        assert ended.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ended.details() == REVOKED_ON_STREAM
        assert all(r.WhichOneof("kind") == "result" for r in responses)  # before's, if it came
        assert await _accepted(queue, revoked.access_token) == grpc.StatusCode.UNAUTHENTICATED
        await session.enqueue("after")  # the ended stream takes nothing more
        # Only what was sent before the revocation was stored; the user's other login
        # still works.
        assert await _client_refs(queue, kept.access_token) == ["before"]


async def test_an_open_watch_ends_once_its_login_is_revoked(full_suite: Suite) -> None:
    suite = full_suite
    async with (
        grpc.aio.insecure_channel(suite.target("auth")) as auth_channel,
        grpc.aio.insecure_channel(suite.target("queue")) as queue_channel,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(auth_channel)
        queue = queue_pb2_grpc.QueueServiceStub(queue_channel)
        revoked, kept = await _two_logins(auth)
        watch = queue.WatchResults(
            queue_pb2.WatchResultsRequest(after_lane_seq=0),
            metadata=bearer(revoked.access_token),
        )
        await watch.initial_metadata()  # open (and idle: the user has no results)
        await auth.Revoke(auth_pb2.RevokeRequest(refresh_token=revoked.refresh_token))
        # Idle, so only the revocation can end it: within the bound (and one fetch).
        async with asyncio.timeout(BOUND + SLACK):
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await watch.read()
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ended.value.details() == REVOKED_ON_STREAM
        assert await _accepted(queue, kept.access_token) == grpc.StatusCode.OK


async def test_an_open_session_outlives_its_access_token(short_ttl_suite: Suite) -> None:
    """An open stream answers to its login (revocation, above), not to its access token's
    expiry: a long-lived Python client session keeps submitting past it."""
    suite = short_ttl_suite
    name = unique("long")
    async with Client(suite.target("auth"), suite.target("queue")) as client:
        await client.register(name, PASSWORD)
        tokens = await client.login(name, PASSWORD)
        async with client.session() as session:
            before = await (await session.submit("echo", b"before"))
            # The wall clock past the token's expiry (its `exp` is known): not a race.
            while time.time() < tokens.expires_at + 1:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            after = await (await session.submit("echo", b"after"))
    assert (before.output, after.output) == (b"before", b"after")
    assert after.lane_seq == before.lane_seq + 1
