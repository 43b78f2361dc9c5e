"""A revocation list too large for one gRPC message still reaches the services.

GetRevokedFamilies used to answer with every unexpired revoked family at once. One account
logging in and revoking in a loop could push that past the 8 MiB message limit, after
which every fetch was refused (RESOURCE_EXHAUSTED), each service kept its last list for
good, and a login revoked after that stayed accepted. The list is read in pages and then
incrementally now (services/core/revocation.py): with more revoked families than the old
single answer could carry, a revoked login is still refused within the documented bound.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime

import grpc
import pytest
import sqlalchemy as sa

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.db import create_engine
from fairlane_server.core.grpc_host import MAX_MESSAGE_BYTES
from fairlane_server.core.models import users
from fairlane_server.core.settings import Settings
from tests.conftest import unique
from tests.e2e.suite import Suite, wait_until
from tests.e2e.users import PASSWORD, bearer

pytestmark = pytest.mark.e2e

# 36 characters and 2 bytes of framing each: 230,000 ids are 8.3 MiB in the old answer.
FAMILIES = 230_000
# The documented bound (docs/security.md, "Revocation"): the services' refetch interval,
# plus one fetch, with room for a loaded machine (as tests/e2e/test_auth_revocation.py).
BOUND = Settings().revocation_refresh_seconds
SLACK = 5.0


async def _revoke_many(suite: Suite, n: int) -> list[str]:
    """`n` revoked families of one user, straight into the database; their ids."""
    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        user = uuid.uuid4()
        async with engine.begin() as conn:
            await conn.execute(
                users.insert().values(
                    id=user,
                    username=unique("loop"),
                    password_hash="x",
                    created_at=datetime.now(UTC),
                )
            )
            listed = await conn.execute(
                sa.text(
                    "INSERT INTO revoked_families (family_id, user_id, revoked_at, reason) "
                    "SELECT gen_random_uuid(), :user, now(), 'revoke' "
                    "FROM generate_series(1, :n) RETURNING family_id::text"
                ),
                {"user": user, "n": n},
            )
            return list(listed.scalars())
    finally:
        await engine.dispose()


async def _status(queue: queue_pb2_grpc.QueueServiceStub, token: str) -> grpc.StatusCode:
    try:
        await queue.ListRequests(
            queue_pb2.ListRequestsRequest(page_size=1), metadata=bearer(token), timeout=10
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_revocation_reaches_the_queue_past_the_old_message_limit(suite: Suite) -> None:
    ids = await _revoke_many(suite, FAMILIES)
    # The premise: the whole list in one answer is more than a server may send.
    assert auth_pb2.GetRevokedFamiliesResponse(family_ids=ids).ByteSize() > MAX_MESSAGE_BYTES

    async with (
        grpc.aio.insecure_channel(suite.target("auth")) as auth_channel,
        grpc.aio.insecure_channel(suite.target("queue")) as queue_channel,
    ):
        auth = auth_pb2_grpc.AuthServiceStub(auth_channel)
        queue = queue_pb2_grpc.QueueServiceStub(queue_channel)
        # A client of the release before paging asks with an empty request: a first page,
        # far below the limit.
        first = await auth.GetRevokedFamilies(auth_pb2.GetRevokedFamiliesRequest())
        assert first.more_pages
        assert first.ByteSize() < MAX_MESSAGE_BYTES / 8

        name = unique("victim")
        await auth.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
        login = await auth.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
        # Accepted: and the queue has read the whole list by now (its first call waits).
        assert await _status(queue, login.access_token) == grpc.StatusCode.OK

        await auth.Revoke(auth_pb2.RevokeRequest(refresh_token=login.refresh_token))
        revoked_at = time.monotonic()

        async def refused() -> bool:
            return bool(await _status(queue, login.access_token) == grpc.StatusCode.UNAUTHENTICATED)

        await wait_until(refused, timeout=BOUND + SLACK)
        print(f"refused {time.monotonic() - revoked_at:.2f} s after Revoke")
    assert "revocation_list_fetch_failed" not in suite.log("queue")
