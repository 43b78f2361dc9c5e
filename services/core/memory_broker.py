"""In-process broker for `fairlane dev` and tests: the lane contract of RabbitMQ without
a server. Per-lane FIFO, one active consumer per lane (the others wait, as with
x-single-active-consumer), bounded lanes that refuse publishes when full, acks and
requeues in original position; results and control are plain in-process fan-out.

Hand-written because no maintained library offers these semantics in memory; it is
held to the same contract tests as the AMQP broker (tests/integration/test_broker_contract.py).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from fairlane_server.core.broker import (
    BrokerError,
    BytesHandler,
    DeliveryHandler,
    LaneFull,
    LaneMissing,
    LaneStats,
    ResultsUnroutable,
)
from fairlane_server.core.tasks import cancel_and_wait


@dataclass(order=True, slots=True)
class _Message:
    seq: int
    body: bytes = field(compare=False)
    headers: dict[str, str] = field(compare=False)
    redelivered: bool = field(default=False, compare=False)


class MemoryDelivery:
    __slots__ = ("_consumer", "_done", "_message", "body", "headers", "redelivered")

    def __init__(self, consumer: _Consumer, message: _Message) -> None:
        self._consumer = consumer
        self._message = message
        self._done = False
        self.body = message.body
        self.headers = message.headers
        self.redelivered = message.redelivered

    @property
    def stale(self) -> bool:
        return not self._consumer.active

    async def ack(self) -> None:
        if not self._done:
            self._done = True
            self._consumer.settle(self._message, requeue=False)

    async def reject(self, *, requeue: bool) -> None:
        if not self._done:
            self._done = True
            self._consumer.settle(self._message, requeue=requeue)


class _Consumer:
    def __init__(self, lane: _LaneQueue, handler: DeliveryHandler, prefetch: int) -> None:
        self.lane = lane
        self.handler = handler
        self.prefetch = prefetch
        self.unacked: dict[int, _Message] = {}
        self.active = True
        self.last_delivery = 0.0

    def settle(self, message: _Message, *, requeue: bool) -> None:
        if self.unacked.pop(message.seq, None) is None:
            return
        if requeue:
            message.redelivered = True
            self.lane.requeue(message)
        self.lane.wake()

    async def cancel(self) -> None:
        """Like closing the consumer's channel: unacked messages go back to the lane."""
        self.active = False
        self.lane.remove(self)
        for message in sorted(self.unacked.values()):
            message.redelivered = True
            self.lane.requeue(message)
        self.unacked.clear()
        self.lane.wake()


class _LaneQueue:
    def __init__(self, name: str, max_length: int) -> None:
        self.name = name
        self.max_length = max_length
        self.ready: list[_Message] = []
        self.consumers: list[_Consumer] = []
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._dispatch(), name=f"memory-lane-{name}")

    def wake(self) -> None:
        self._wakeup.set()

    def requeue(self, message: _Message) -> None:
        bisect.insort(self.ready, message)

    def remove(self, consumer: _Consumer) -> None:
        with contextlib.suppress(ValueError):
            self.consumers.remove(consumer)

    async def _dispatch(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            # Single active consumer: only the first registered one receives messages.
            while self.ready and self.consumers:
                active = self.consumers[0]
                if len(active.unacked) >= active.prefetch:
                    break
                message = self.ready.pop(0)
                active.unacked[message.seq] = message
                active.last_delivery = time.monotonic()
                await active.handler(MemoryDelivery(active, message))

    async def close(self) -> None:
        # Like a deleted queue: its consumers are cancelled, whatever they hold is gone.
        for consumer in self.consumers:
            consumer.active = False
        self.consumers.clear()
        await cancel_and_wait(self._task)


class MemoryLaneConsumer:
    def __init__(self, consumer: _Consumer) -> None:
        self._consumer = consumer

    @property
    def alive(self) -> bool:
        return self._consumer.active

    @property
    def last_delivery(self) -> float:
        return self._consumer.last_delivery

    async def cancel(self) -> None:
        await self._consumer.cancel()


class MemoryBroker:
    def __init__(self, *, lane_max_length: int) -> None:
        self._max_length = lane_max_length
        self._lanes: dict[str, _LaneQueue] = {}
        self._results: dict[str, list[BytesHandler]] = defaultdict(list)
        self._control: list[BytesHandler] = []
        self.dead: list[tuple[bytes, dict[str, str]]] = []
        self._seq = itertools.count()
        self._connected = False

    @property
    def is_connected(self) -> bool:
        return self._connected

    @property
    def blocked_reason(self) -> str | None:
        return None  # in process memory: nothing to block it

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        self._connected = False
        for lane in self._lanes.values():
            await lane.close()
        self._lanes.clear()

    def _check(self) -> None:
        if not self._connected:
            raise BrokerError("broker not connected")

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """An in-process broker never disconnects."""

    async def declare_lane(self, user_id: str) -> None:
        self._check()
        if user_id not in self._lanes:
            self._lanes[user_id] = _LaneQueue(user_id, self._max_length)

    async def lane_stats(self, user_id: str) -> LaneStats | None:
        self._check()
        lane = self._lanes.get(user_id)
        if lane is None:
            return None
        return LaneStats(messages=len(lane.ready), consumers=len(lane.consumers))

    async def delete_lane(self, user_id: str) -> bool:
        """Deletes the lane if it holds no ready message (like if-empty)."""
        self._check()
        lane = self._lanes.get(user_id)
        if lane is None:
            return True
        if lane.ready:
            return False
        await lane.close()
        del self._lanes[user_id]
        return True

    async def publish_lane(self, user_id: str, body: bytes, headers: dict[str, str]) -> None:
        self._check()
        lane = self._lanes.get(user_id)
        if lane is None:
            raise LaneMissing(f"lane {user_id} does not exist")
        # Like RabbitMQ's x-max-length, only ready messages count.
        if len(lane.ready) >= lane.max_length:
            raise LaneFull(f"lane {user_id} is full")
        lane.ready.append(_Message(next(self._seq), body, dict(headers)))
        lane.wake()

    async def consume_lane(
        self, user_id: str, handler: DeliveryHandler, *, prefetch: int
    ) -> MemoryLaneConsumer:
        self._check()
        lane = self._lanes.get(user_id)
        if lane is None:
            raise LaneMissing(f"lane {user_id} does not exist")
        consumer = _Consumer(lane, handler, max(prefetch, 1))
        lane.consumers.append(consumer)
        lane.wake()
        return MemoryLaneConsumer(consumer)

    def lane_depth(self, user_id: str) -> int:
        lane = self._lanes.get(user_id)
        return len(lane.ready) if lane else 0

    async def publish_results(self, route: str, body: bytes) -> None:
        self._check()
        handlers = list(self._results.get(route, ()))
        if not handlers:
            raise ResultsUnroutable(f"no queue replica is bound to results route {route}")
        for handler in handlers:
            await handler(body)

    async def consume_results(self, route: str, handler: BytesHandler) -> None:
        self._check()
        self._results[route].append(handler)

    async def publish_control(self, body: bytes) -> None:
        self._check()
        for handler in list(self._control):
            await handler(body)

    async def consume_control(self, handler: BytesHandler) -> None:
        self._check()
        self._control.append(handler)

    async def publish_dead(self, body: bytes, headers: dict[str, str]) -> None:
        self._check()
        self.dead.append((body, dict(headers)))
