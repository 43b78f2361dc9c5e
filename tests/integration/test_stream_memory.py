"""Streams whose client does not read, on the three services in one process (in-memory
broker, SQLite request log, real gRPC): a Session holds at most its byte budget of result
outputs and a watcher a bounded part of the fan-out, and once the client reads, both give
every result, in order, with its output (the Session reading back from the log those it
held without)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from fairlane.client import Client, NotFound
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.settings import Settings
from fairlane_server.queue.service import QueueService
from fairlane_server.queue.session import SessionStream
from fairlane_server.queue.store import RESULT_READ_BYTES, RequestStore
from fairlane_server.queue.watch import MAX_WAITING_BYTES, MAX_WAITING_EVENTS
from tests.integration.embedded import embedded_services
from tests.polling import until

pytestmark = pytest.mark.integration

BUDGET = 256 * 1024
N = 96
SIZE = 128 * 1024  # 12 MiB of outputs in all


@dataclass
class Stack:
    client: Client
    queue: QueueService


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{tmp_path}/fairlane.db",
        auth_listen="127.0.0.1:0",
        queue_listen="127.0.0.1:0",
        worker_listen="127.0.0.1:0",
        service_secret="embedded-secret",
        session_buffer_bytes=BUDGET,
    )
    async with embedded_services(settings, lane_max_length=1000) as (client, queue):
        yield Stack(client, queue)


def payload(i: int) -> bytes:
    return i.to_bytes(4, "big") * (SIZE // 4)


async def last_lane_seq(client: Client) -> int:
    try:
        return (await client.lane()).last_lane_seq
    except NotFound:  # before the first request has reached the log
        return 0


def flat(response: queue_pb2.SessionResponse) -> list[queue_pb2.SessionResponse]:
    if response.WhichOneof("kind") == "batch":
        return list(response.batch.responses)
    return [response]


async def test_streams_that_do_not_read_hold_bounded_outputs_then_give_every_result(
    stack: Stack,
) -> None:
    client = stack.client
    await client.register("slow-reader", "correct horse battery")
    await client.login("slow-reader", "correct horse battery")
    user_id = (await client.whoami()).user_id
    metadata = (("authorization", f"Bearer {await client.access_token()}"),)
    channel = grpc.aio.insecure_channel(stack.queue.address)
    stub = queue_pb2_grpc.QueueServiceStub(channel)
    done_sending = asyncio.Event()

    async def enqueues() -> AsyncIterator[queue_pb2.SessionRequest]:
        for i in range(N):
            yield queue_pb2.SessionRequest(
                enqueue=queue_pb2.EnqueueRequest(
                    handler="echo", payload=payload(i), client_ref=str(i)
                )
            )
        await done_sending.wait()  # then half-closes

    try:
        watch = stub.WatchResults(queue_pb2.WatchResultsRequest(), metadata=metadata)
        session = stub.Session(enqueues(), metadata=metadata)
        await until(lambda: len(stack.queue.hub._subscribers.get(user_id, ())) == 2)
        owners = [sink.__self__ for sink in stack.queue.hub._subscribers[user_id]]  # type: ignore[attr-defined]
        (stream,) = [o for o in owners if isinstance(o, SessionStream)]
        (inbox,) = [o for o in owners if not isinstance(o, SessionStream)]

        # Every request accepted, finished and its result come to both streams, whose
        # clients read nothing.
        for _ in range(1200):
            if await last_lane_seq(client) == N:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the requests did not finish within 60 s")
        await until(lambda: len(stream._mine) == 0 and stream._answerer is None)
        # Past its budget the Session holds results without their outputs.
        assert any(getattr(item, "missing", 0) for item in stream._out.waiting())
        assert stream.buffered_bytes <= BUDGET
        events, size = inbox.held()
        assert events <= MAX_WAITING_EVENTS
        assert size <= MAX_WAITING_BYTES

        responses: list[queue_pb2.SessionResponse] = []
        async with asyncio.timeout(30):
            while sum(r.WhichOneof("kind") == "result" for r in responses) < N:
                responses.extend(flat(await session.read()))
            done_sending.set()
            assert await session.read() is grpc.aio.EOF
            watched = [(await watch.read()).result for _ in range(N)]
        assert await session.code() == grpc.StatusCode.OK

        accepted = [r.accepted for r in responses if r.WhichOneof("kind") == "accepted"]
        assert [a.client_ref for a in accepted] == [str(i) for i in range(N)]
        results = [r.result for r in responses if r.WhichOneof("kind") == "result"]
        by_ref: dict[str, int] = {a.request_id: int(a.client_ref) for a in accepted}
        assert [r.lane_seq for r in results] == list(range(1, N + 1))
        assert [by_ref[r.request_id] for r in results] == list(range(N))
        assert all(r.output == payload(by_ref[r.request_id]) for r in results)
        assert [(r.request_id, r.lane_seq, r.output) for r in watched] == [
            (r.request_id, r.lane_seq, r.output) for r in results
        ]
        assert stream.buffered_bytes == 0
    finally:
        await channel.close()


async def test_a_watcher_from_zero_reads_large_results_from_the_log_in_bounded_pages(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WatchResults(after_lane_seq=0) over echo results of 1 MiB, 20 MiB in all: every
    result comes, in order, and no read of the log returns more than its bound of outputs
    (a page of 1000 such results was 1 GB loaded at once)."""
    reads: list[int] = []
    real = RequestStore.results_after

    async def counted(self: RequestStore, *args: Any, **kwargs: Any) -> Any:
        page: Any = await real(self, *args, **kwargs)  # a list before the bound
        rows = page.rows if hasattr(page, "rows") else page
        reads.append(sum(len(r.output or b"") for r in rows))
        return page

    monkeypatch.setattr(RequestStore, "results_after", counted)
    client = stack.client
    await client.register("big-watcher", "correct horse battery")
    await client.login("big-watcher", "correct horse battery")
    metadata = (("authorization", f"Bearer {await client.access_token()}"),)
    n, size = 20, 1024 * 1024
    channel = grpc.aio.insecure_channel(stack.queue.address)
    stub = queue_pb2_grpc.QueueServiceStub(channel)
    try:
        ids = []
        for i in range(n):
            answer = await stub.Enqueue(
                queue_pb2.EnqueueRequest(handler="echo", payload=bytes([i]) * size),
                metadata=metadata,
            )
            ids.append(answer.request_id)
        for _ in range(1200):
            if await last_lane_seq(client) == n:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the requests did not finish within 60 s")
        watch = stub.WatchResults(
            queue_pb2.WatchResultsRequest(after_lane_seq=0), metadata=metadata
        )
        async with asyncio.timeout(30):
            watched = [(await watch.read()).result for _ in range(n)]
        watch.cancel()
    finally:
        await channel.close()
    assert [r.lane_seq for r in watched] == list(range(1, n + 1))
    assert [r.request_id for r in watched] == ids  # one at a time: finished in order
    assert all(r.output == bytes([i]) * size for i, r in enumerate(watched))
    assert max(reads) <= RESULT_READ_BYTES
    assert len(reads) >= n * size // RESULT_READ_BYTES
