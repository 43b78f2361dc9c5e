"""The broker contract the services program against; AMQP and in-memory implement it.

Lanes are durable per-user FIFO queues with one active consumer at a time and a bounded
length that rejects publishes when full. A publish returns only once the broker has
taken responsibility for the message (publisher confirm).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

REQUESTS_EXCHANGE = "fairlane.requests"
RESULTS_EXCHANGE = "fairlane.results"
CONTROL_EXCHANGE = "fairlane.control"
DEAD_EXCHANGE = "fairlane.dead"
DEAD_QUEUE = "fairlane.dead"


def lane_queue(user_id: str) -> str:
    return f"fairlane.lane.{user_id}"


class BrokerError(Exception):
    """The broker could not be reached or did not confirm; the caller may retry later."""


class LaneMissing(BrokerError):
    """The lane queue does not exist (deleted while idle); declare it and publish again."""


class LaneFull(BrokerError):
    """The lane refused the message because it holds lane_max_length messages."""


class Delivery(Protocol):
    body: bytes
    headers: dict[str, str]
    redelivered: bool

    @property
    def stale(self) -> bool:
        """True once it can no longer be acked (its channel died; it will be redelivered)."""

    async def ack(self) -> None: ...
    async def reject(self, *, requeue: bool) -> None: ...


DeliveryHandler = Callable[[Delivery], Awaitable[None]]
BytesHandler = Callable[[bytes], Awaitable[None]]


class LaneConsumer(Protocol):
    @property
    def alive(self) -> bool:
        """False once the consumer stopped receiving (cancelled, or its channel died)."""

    async def cancel(self) -> None:
        """Stop consuming. Unacked deliveries go back to the lane in their original
        positions before any other consumer is served; they can no longer be acked."""


class Broker(Protocol):
    async def connect(self) -> None: ...
    async def close(self) -> None: ...

    @property
    def is_connected(self) -> bool: ...

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Calls `listener` after the broker connection was re-established."""

    async def declare_lane(self, user_id: str) -> None: ...

    async def publish_lane(self, user_id: str, body: bytes, headers: dict[str, str]) -> None:
        """Durable, confirmed publish to a lane; raises LaneFull or BrokerError."""

    async def consume_lane(
        self, user_id: str, handler: DeliveryHandler, *, prefetch: int
    ) -> LaneConsumer: ...

    async def delete_lane(self, user_id: str) -> bool:
        """Deletes the lane if it holds no ready message (RabbitMQ's if-empty)."""

    async def publish_results(self, route: str, body: bytes) -> None: ...
    async def consume_results(self, route: str, handler: BytesHandler) -> None: ...
    async def publish_control(self, body: bytes) -> None: ...
    async def consume_control(self, handler: BytesHandler) -> None: ...
    async def publish_dead(self, body: bytes, headers: dict[str, str]) -> None: ...
