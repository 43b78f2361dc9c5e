"""A burst of calls larger than grpc's default pending-call limits is served, not refused.

grpc refuses a random share of new calls once more than `grpc.server.max_pending_requests`
(default 1,000) wait for the event loop to pick them up, and the client sees CANCELLED for
a call that never ran: 3,000 bench lanes starting at once lost about a quarter of them."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fairlane_server.core.grpc_host import SERVER_OPTIONS

BURST = 3000


async def test_three_thousand_calls_at_once_are_all_answered() -> None:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # Several connections, as many clients would open; the server shares this event
    # loop, so every call is pending until the client has sent them all.
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(10)]
    try:
        stubs = [health_pb2_grpc.HealthStub(c) for c in channels]

        async def one(i: int) -> str:
            try:
                await stubs[i % len(stubs)].Check(health_pb2.HealthCheckRequest(), timeout=60)
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return "OK"

        codes = Counter(await asyncio.gather(*(one(i) for i in range(BURST))))
        assert codes == {"OK": BURST}
    finally:
        await asyncio.gather(*(c.close() for c in channels))
        await server.stop(None)
