"""The lane contract, held against both brokers: RabbitMQ (real, own vhost) and in-memory."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from fairlane_server.core.broker import (
    Broker,
    BrokerError,
    Delivery,
    LaneFull,
    LaneMissing,
    LaneStats,
    ResultsUnroutable,
)
from tests.conftest import unique
from tests.e2e.suite import wait_until
from tests.integration.conftest import MAX_LENGTH

pytestmark = pytest.mark.integration


class Recorder:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.arrived = asyncio.Condition()

    async def __call__(self, delivery: Delivery) -> None:
        async with self.arrived:
            self.deliveries.append(delivery)
            self.arrived.notify_all()

    async def wait_for(self, count: int, timeout: float = 10) -> list[bytes]:
        async with asyncio.timeout(timeout), self.arrived:
            await self.arrived.wait_for(lambda: len(self.deliveries) >= count)
        return [d.body for d in self.deliveries]


async def test_lane_is_fifo_and_acks_release_the_next(broker: Broker) -> None:
    lane = unique("lane")
    await broker.declare_lane(lane)
    for i in range(4):
        await broker.publish_lane(lane, f"m{i}".encode(), {"k": str(i)})
    rec = Recorder()
    consumer = await broker.consume_lane(lane, rec, prefetch=2)
    # prefetch bounds what is handed out before an ack
    assert await rec.wait_for(2) == [b"m0", b"m1"]
    await asyncio.sleep(0.2)
    assert len(rec.deliveries) == 2
    assert rec.deliveries[0].headers == {"k": "0"}
    await rec.deliveries[0].ack()
    await rec.deliveries[1].ack()
    assert await rec.wait_for(4) == [b"m0", b"m1", b"m2", b"m3"]
    for d in rec.deliveries[2:]:
        await d.ack()
    await consumer.cancel()


async def test_full_lane_refuses_publish(broker: Broker, request: pytest.FixtureRequest) -> None:
    lane = unique("lane")
    await broker.declare_lane(lane)
    accepted = 0
    for i in range(MAX_LENGTH + 2):
        try:
            await broker.publish_lane(lane, f"m{i}".encode(), {})
        except LaneFull:
            break
        accepted += 1
    else:
        pytest.fail("the lane never refused a publish")
    # Quorum queues enforce x-max-length approximately: one message over.
    quorum = request.node.callspec.params["broker"] == "amqp-quorum"
    assert accepted in ((MAX_LENGTH, MAX_LENGTH + 1) if quorum else (MAX_LENGTH,))


async def test_publish_to_missing_lane_fails_without_enqueueing(broker: Broker) -> None:
    with pytest.raises(BrokerError):
        await broker.publish_lane(unique("never-declared"), b"x", {})


async def test_single_active_consumer_and_requeue_in_order(broker: Broker) -> None:
    lane = unique("lane")
    await broker.declare_lane(lane)
    first, second = Recorder(), Recorder()
    c1 = await broker.consume_lane(lane, first, prefetch=3)
    c2 = await broker.consume_lane(lane, second, prefetch=3)
    for i in range(3):
        await broker.publish_lane(lane, f"m{i}".encode(), {})
    assert await first.wait_for(3) == [b"m0", b"m1", b"m2"]
    await asyncio.sleep(0.2)
    assert second.deliveries == []  # the standby consumer gets nothing while c1 is active
    await first.deliveries[0].ack()
    await broker.publish_lane(lane, b"m3", {})
    # A released consumer hands its unacked messages back before c2 gets anything.
    await c1.cancel()
    assert await second.wait_for(3) == [b"m1", b"m2", b"m3"]
    assert [d.redelivered for d in second.deliveries[:2]] == [True, True]
    for d in second.deliveries:
        await d.ack()
    await c2.cancel()


async def test_results_and_control_fan_out(broker: Broker) -> None:
    got_results: list[bytes] = []
    got_control: list[bytes] = []
    results_in, control_in = asyncio.Event(), asyncio.Event()

    async def on_result(body: bytes) -> None:
        got_results.append(body)
        if len(got_results) == 2:
            results_in.set()

    async def on_control(body: bytes) -> None:
        got_control.append(body)
        control_in.set()

    route = unique("route")
    await broker.consume_results(route, on_result)
    await broker.consume_control(on_control)
    await broker.publish_results(route, b"r1")
    await broker.publish_results(route, b"r2")
    await broker.publish_control(b"c1")
    async with asyncio.timeout(10):
        await control_in.wait()
        await results_in.wait()
    assert got_results == [b"r1", b"r2"]
    assert got_control == [b"c1"]


async def test_results_nobody_is_bound_to_raise(broker: Broker) -> None:
    """An event for a route no queue replica consumes is not dropped silently."""
    with pytest.raises(ResultsUnroutable):
        await broker.publish_results(unique("nobody"), b"lost?")
    # The data path is unharmed: a bound route still gets its events.
    got = asyncio.Event()

    async def on_result(body: bytes) -> None:
        got.set()

    route = unique("route")
    await broker.consume_results(route, on_result)
    await broker.publish_results(route, b"r")
    async with asyncio.timeout(10):
        await got.wait()


async def test_consuming_a_missing_lane_never_creates_it(broker: Broker) -> None:
    lane = unique("lane")
    with pytest.raises(LaneMissing):
        await broker.consume_lane(lane, Recorder(), prefetch=1)
    assert await broker.lane_stats(lane) is None


async def test_lane_stats_count_ready_messages_and_consumers(
    broker: Broker, request: pytest.FixtureRequest
) -> None:
    lane = unique("lane")
    await broker.declare_lane(lane)
    assert await broker.lane_stats(lane) == LaneStats(messages=0, consumers=0)
    await broker.publish_lane(lane, b"m0", {})
    await broker.publish_lane(lane, b"m1", {})
    assert await broker.lane_stats(lane) == LaneStats(messages=2, consumers=0)
    rec = Recorder()
    consumer = await broker.consume_lane(lane, rec, prefetch=1)
    standby = await broker.consume_lane(lane, Recorder(), prefetch=1)
    await rec.wait_for(1)
    assert consumer.last_delivery > 0
    assert standby.last_delivery == 0  # single active consumer: the standby got nothing
    # Quorum queues with single active consumer count only the active consumer.
    quorum = request.node.callspec.params["broker"] == "amqp-quorum"
    assert await broker.lane_stats(lane) == LaneStats(messages=1, consumers=1 if quorum else 2)
    await consumer.cancel()
    await standby.cancel()


async def test_delete_lane_only_when_empty(broker: Broker) -> None:
    lane = unique("lane")
    await broker.declare_lane(lane)
    await broker.publish_lane(lane, b"keep me", {})
    assert await broker.delete_lane(lane) is False
    assert await broker.lane_stats(lane) == LaneStats(messages=1, consumers=0)
    rec = Recorder()
    consumer = await broker.consume_lane(lane, rec, prefetch=1)
    assert await rec.wait_for(1) == [b"keep me"]
    await rec.deliveries[0].ack()
    # Consumed and acked: empty, deletable although a consumer is attached.
    await _until(lambda: broker.lane_stats(lane), LaneStats(messages=0, consumers=1))
    assert await broker.delete_lane(lane) is True
    assert await broker.lane_stats(lane) is None
    await _until_false(lambda: consumer.alive)  # the broker cancelled it
    with pytest.raises(LaneMissing):
        await broker.publish_lane(lane, b"after", {})
    assert await broker.delete_lane(lane) is True  # deleting a deleted lane is harmless
    # Declared again, it works as new.
    await broker.declare_lane(lane)
    await broker.publish_lane(lane, b"again", {})
    assert await broker.lane_stats(lane) == LaneStats(messages=1, consumers=0)
    await consumer.cancel()


async def test_housekeeping_never_drops_the_data_path(broker: Broker) -> None:
    """Deleting lanes (on quorum lanes too) goes on while a lane is being consumed, and
    the data connection never reconnects meanwhile."""
    reconnects: list[int] = []
    broker.on_reconnect(lambda: reconnects.append(1))
    busy, idle = unique("busy"), unique("idle")
    for lane in (busy, idle):
        await broker.declare_lane(lane)
    rec = Recorder()
    consumer = await broker.consume_lane(busy, rec, prefetch=10)
    for i in range(3):
        await broker.delete_lane(idle)
        await broker.declare_lane(idle)
        await broker.publish_lane(busy, f"m{i}".encode(), {})
    assert await rec.wait_for(3) == [b"m0", b"m1", b"m2"]
    assert consumer.alive
    assert broker.is_connected
    assert reconnects == []
    await consumer.cancel()


async def _until(read: Callable[[], Awaitable[object]], expected: object) -> None:
    async def check() -> bool:
        return await read() == expected

    await wait_until(check, timeout=10)


async def _until_false(read: Callable[[], bool]) -> None:
    async def check() -> bool:
        return not read()

    await wait_until(check, timeout=10)
