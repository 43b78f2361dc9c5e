"""The dead-letter queue on a real RabbitMQ: a quorum queue on quorum lanes (a classic one
lives on one node, and while that node was down its declare failed on every node, so no
process could start), and a declare RabbitMQ refuses (one that exists with another type)
never keeps the housekeeping connection down: dead letters still reach the queue there is."""

from __future__ import annotations

import subprocess

import aio_pika
import pytest
from structlog.testing import capture_logs

from fairlane_server.core.amqp import AmqpBroker
from fairlane_server.core.broker import DEAD_QUEUE
from tests.conftest import broker_url
from tests.e2e.suite import wait_until

pytestmark = pytest.mark.integration


def queue_types(vhost: str) -> dict[str, str]:
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "--no-table-headers", "name", "type"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return dict(line.split("\t") for line in listing.splitlines() if "\t" in line)


async def dead_letters(vhost: str) -> int:
    connection = await aio_pika.connect(broker_url(vhost))
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


async def test_on_quorum_lanes_the_dead_queue_is_a_quorum_queue(vhost: str) -> None:
    broker = AmqpBroker(broker_url(vhost), lane_max_length=10, queue_type="quorum")
    await broker.connect()
    try:
        assert queue_types(vhost)[DEAD_QUEUE] == "quorum"
        await broker.publish_dead(b"gone", {"reason": "test"})
        await wait_until(lambda: _count_is(vhost, 1), 30)
    finally:
        await broker.close()


async def test_a_dead_queue_of_another_type_is_kept_and_housekeeping_comes_up(
    vhost: str,
) -> None:
    # Made by a release that declared it classic, before the lanes became quorum queues.
    classic = AmqpBroker(broker_url(vhost), lane_max_length=10, queue_type="classic")
    await classic.connect()
    await classic.close()
    assert queue_types(vhost)[DEAD_QUEUE] == "classic"
    broker = AmqpBroker(broker_url(vhost), lane_max_length=10, queue_type="quorum")
    with capture_logs() as logs:
        await broker.connect()
    try:
        assert [e["event"] for e in logs if e["event"] == "dead_queue_not_declared"] == [
            "dead_queue_not_declared"
        ]
        # Housekeeping is up: a lane declares on it, and dead letters reach the old queue.
        await broker.declare_lane("00000000-0000-0000-0000-000000000001")
        await broker.publish_dead(b"gone", {"reason": "test"})
        await wait_until(lambda: _count_is(vhost, 1), 30)
        assert queue_types(vhost)[DEAD_QUEUE] == "classic"
    finally:
        await broker.close()


async def _count_is(vhost: str, n: int) -> bool:
    return await dead_letters(vhost) == n
