"""Resending an enqueue whose answer was lost never runs it twice (fairlane.client keys it).

The queue is reached through a TCP proxy that lets the request arrive, drops the answer and
then cuts the connection: the server has stored the request, the client sees UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from fairlane.client import Client, Request, Status
from tests.e2e.suite import Suite, wait_until
from tests.proxy import TcpProxy

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"


@pytest.fixture
async def queue_proxy(suite: Suite) -> AsyncIterator[TcpProxy]:
    host, port = suite.target("queue").rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


async def _all_requests(client: Client) -> list[Request]:
    found: list[Request] = []
    async for page in client.requests(page_size=100):
        found.extend(page)
    return found


async def _stored(client: Client, client_ref: str) -> Request:
    """Waits until the server has stored a request with this client_ref."""
    found: list[Request] = []

    async def stored() -> bool:
        found[:] = [r for r in await _all_requests(client) if r.client_ref == client_ref]
        return bool(found)

    await wait_until(stored)
    return found[0]


async def _finished(client: Client, request_id: str) -> Request:
    final: list[Request] = []

    async def done() -> bool:
        final[:] = [await client.get(request_id)]
        return final[0].status.final

    await wait_until(done)
    return final[0]


async def test_a_request_whose_answer_was_lost_is_resent_and_runs_once(
    suite: Suite, queue_proxy: TcpProxy
) -> None:
    proxied = f"127.0.0.1:{queue_proxy.port}"
    async with (
        Client(suite.target("auth"), suite.target("queue")) as direct,
        Client(suite.target("auth"), proxied) as client,
    ):
        name = f"retry-{uuid.uuid4().hex[:10]}"
        await direct.register(name, PASSWORD)
        client.set_tokens(await direct.login(name, PASSWORD))
        warm = await client.enqueue("echo", b"warm", client_ref="warm")  # connection is up
        assert warm.idempotency_key  # generated: the caller gave none

        # Unary: the client's own retry resends the same key and gets the stored request.
        queue_proxy.hold_replies()
        sending = asyncio.create_task(client.enqueue("echo", b"unary", client_ref="unary"))
        stored = await _stored(direct, "unary")
        assert not sending.done()  # its answer is lost, not late
        assert queue_proxy.cut() >= 1
        enqueued = await asyncio.wait_for(sending, 30)
        assert (enqueued.request_id, enqueued.duplicate) == (stored.request_id, True)
        assert stored.idempotency_key == enqueued.idempotency_key

        # Session: the stream breaks before any answer (was it stored? the client cannot
        # know), so the session sends it again on a new stream with the same key (after
        # a backoff, and again if that stream meets the dying connection too), and gets
        # the stored request back instead of a second one.
        async with client.session() as session:
            queue_proxy.hold_replies()
            lost = await session.submit("echo", b"session", client_ref="session")
            stored_session = await _stored(direct, "session")
            assert queue_proxy.cut() >= 1
            result = await asyncio.wait_for(lost, 30)
        assert lost.duplicate
        assert lost.request_id == stored_session.request_id
        assert result.status is Status.SUCCEEDED
        assert result.output == b"session"

        # Each ran once: one row per client_ref, three lane_seqs in all.
        requests = await _all_requests(direct)
        assert sorted(r.client_ref for r in requests) == ["session", "unary", "warm"]
        unary = await _finished(direct, enqueued.request_id)
        assert (unary.status, unary.attempts, unary.output) == (Status.SUCCEEDED, 1, b"unary")
        assert (await direct.lane()).last_lane_seq == 3
