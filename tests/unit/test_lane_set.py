"""The worker's lane set: lanes are consumed side by side, one lane's consumes and
hand-backs one at a time, and a lane whose consume ends after a drain began is handed back
rather than kept."""

from __future__ import annotations

import asyncio
from typing import Any

from fairlane_server.core.broker import Delivery
from fairlane_server.worker.lanes import ConsumedLane, LaneSet


class Consumer:
    def __init__(self) -> None:
        self.cancelled = False

    @property
    def alive(self) -> bool:
        return not self.cancelled

    @property
    def last_delivery(self) -> float:
        return 0.0

    async def cancel(self) -> None:
        self.cancelled = True


class GatedBroker:
    """consume_lane waits until the test opens that lane's gate."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.entered: dict[str, asyncio.Event] = {}
        self.consumes: list[str] = []
        self.consumers: list[Consumer] = []

    def gate(self, user_id: str) -> asyncio.Event:
        return self.gates.setdefault(user_id, asyncio.Event())

    def entry(self, user_id: str) -> asyncio.Event:
        return self.entered.setdefault(user_id, asyncio.Event())

    async def consume_lane(self, user_id: str, handler: Any, *, prefetch: int) -> Consumer:
        self.consumes.append(user_id)
        self.entry(user_id).set()
        await self.gate(user_id).wait()
        consumer = Consumer()
        self.consumers.append(consumer)
        return consumer


async def _nothing(lane: ConsumedLane, delivery: Delivery) -> None:
    return None


def lane_set(broker: GatedBroker) -> LaneSet:
    return LaneSet(broker, prefetch=4, process=_nothing)  # type: ignore[arg-type]


async def test_lanes_are_consumed_side_by_side() -> None:
    broker = GatedBroker()
    lanes = lane_set(broker)
    adds = [asyncio.create_task(lanes.add(u)) for u in ("a", "b", "c")]
    # Every consume is under way before any of them is answered.
    for user in ("a", "b", "c"):
        await asyncio.wait_for(broker.entry(user).wait(), 5)
    for user in ("c", "a", "b"):
        broker.gate(user).set()
    await asyncio.gather(*adds)
    assert sorted(lanes.lanes) == ["a", "b", "c"]
    assert len(lanes._locks) == 0  # no lock is kept once nobody holds or waits for it
    for user in list(lanes.lanes):
        await lanes.remove(user)


async def test_one_lane_is_consumed_once_by_concurrent_adds() -> None:
    broker = GatedBroker()
    lanes = lane_set(broker)
    first = asyncio.create_task(lanes.add("a"))
    await asyncio.wait_for(broker.entry("a").wait(), 5)
    second = asyncio.create_task(lanes.add("a"))
    await asyncio.sleep(0)  # the second add reaches the lane's lock and waits there
    assert len(lanes._locks) == 1
    broker.gate("a").set()
    await asyncio.gather(first, second)
    assert broker.consumes == ["a"]
    assert list(lanes.lanes) == ["a"]
    assert len(lanes._locks) == 0
    await lanes.remove("a")
    assert broker.consumers[0].cancelled


async def test_a_consume_that_ends_after_a_drain_began_is_handed_back() -> None:
    broker = GatedBroker()
    lanes = lane_set(broker)
    add = asyncio.create_task(lanes.add("a"))
    await asyncio.wait_for(broker.entry("a").wait(), 5)
    lanes.accepting = False  # what Runner.drain does before it lists the lanes to hand back
    broker.gate("a").set()
    await add
    assert lanes.lanes == {}
    (consumer,) = broker.consumers
    assert consumer.cancelled
