"""A publish its caller gives up on (a timeout, a cancelled caller) before RabbitMQ has
answered it leaves the connection working.

aiormq 7.2.4 fails its channel reader when the broker returns a message (mandatory,
unroutable) whose publish was cancelled meanwhile: the reader sets a result on the
cancelled confirmation. The connection's reader then blocks for good on that channel's
full frame queue, and every publish confirm and delivery of the connection (results,
control events) stops until the heartbeat gives up on the connection, and again after
every reconnect. 10,000 new lanes at once did it: confirms came late, publishes timed out,
their messages came back unroutable."""

from __future__ import annotations

import asyncio

import pytest

from fairlane_server.core.amqp import AmqpBroker
from fairlane_server.core.broker import BrokerError
from tests.conftest import broker_url, unique

pytestmark = pytest.mark.integration


async def test_publishes_given_up_on_before_their_return_leave_the_data_path_working(
    vhost: str,
) -> None:
    broker = AmqpBroker(broker_url(vhost), lane_max_length=10, publish_timeout=5.0)
    await broker.connect()
    try:
        got: list[bytes] = []
        arrived = asyncio.Event()

        async def on_result(body: bytes) -> None:
            got.append(body)
            arrived.set()

        route = unique("route")
        await broker.consume_results(route, on_result)
        # Unroutable, mandatory: each comes back as a return. Their callers give up after
        # a few turns of the loop, most of them after the publish went out and before
        # RabbitMQ's answer came back.
        nobody = unique("nobody")
        for _ in range(20):
            publishes = [
                asyncio.create_task(broker.publish_results(nobody, b"x")) for _ in range(100)
            ]
            for turns, task in enumerate(publishes):
                for _ in range(turns % 7):
                    await asyncio.sleep(0)
                task.cancel()
            await asyncio.gather(*publishes, return_exceptions=True)
        # The connection still confirms publishes and delivers events.
        await broker.publish_results(route, b"after")
        async with asyncio.timeout(10):
            await arrived.wait()
        assert got == [b"after"]
        await broker.publish_control(b"c")
    except BrokerError as exc:
        pytest.fail(f"the data connection stopped answering: {exc}")
    finally:
        await broker.close()
