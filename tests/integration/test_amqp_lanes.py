"""RabbitMQ lanes declared before the settings changed (another queue type or quorum
size) keep working: declared, published to, consumed and deleted as they are, on the
housekeeping connection alone."""

from __future__ import annotations

import aio_pika
import pytest

from fairlane_server.core.amqp import AmqpBroker
from tests.conftest import broker_url, unique
from tests.integration.test_broker_contract import Recorder

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("existing", "configured"),
    [
        ({"x-queue-type": "quorum"}, "quorum"),  # no group size then, 3 now
        ({"x-queue-type": "classic"}, "quorum"),
        ({"x-queue-type": "quorum"}, "classic"),
    ],
)
async def test_a_lane_declared_with_other_arguments_is_used_as_it_is(
    vhost: str, existing: dict[str, str], configured: str
) -> None:
    lane = unique("lane")
    async with await aio_pika.connect(broker_url(vhost)) as raw:
        channel = await raw.channel()
        await channel.declare_queue(
            f"fairlane.lane.{lane}",
            durable=True,
            arguments={"x-single-active-consumer": True, **existing},
        )
    broker = AmqpBroker(broker_url(vhost), lane_max_length=10, queue_type=configured, quorum_size=3)
    await broker.connect()
    reconnects: list[int] = []
    broker.on_reconnect(lambda: reconnects.append(1))
    try:
        await broker.declare_lane(lane)  # the exchanges exist once the broker connected
        await broker.publish_lane(lane, b"m", {})
        rec = Recorder()
        consumer = await broker.consume_lane(lane, rec, prefetch=1)
        assert await rec.wait_for(1) == [b"m"]
        await rec.deliveries[0].ack()
        await consumer.cancel()
        stats = await broker.lane_stats(lane)
        assert stats is not None
        assert await broker.delete_lane(lane) is True
        assert await broker.lane_stats(lane) is None
        assert reconnects == []  # nothing refused at connection level
    finally:
        await broker.close()
