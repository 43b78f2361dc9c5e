"""The broker contract the services program against; AMQP and in-memory implement it.

Lanes are durable per-user FIFO queues with one active consumer at a time and a bounded
length that rejects publishes when full. A publish returns only once the broker has
taken responsibility for the message (publisher confirm).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
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


class ResultsUnroutable(BrokerError):
    """No queue replica is bound to the results route: it died, or it is reconnecting to
    another broker node. Retrying helps only in the second case; the results are in the
    request log either way."""


@dataclass(frozen=True, slots=True)
class LaneStats:
    messages: int  # ready, not delivered
    # The active consumer and the waiting ones; RabbitMQ quorum queues with single active
    # consumer report only the active one.
    consumers: int


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
        """False once the consumer stopped receiving (cancelled by us or by the broker
        because the lane was deleted, or its channel died)."""

    @property
    def last_delivery(self) -> float:
        """time.monotonic() of the last delivery to this consumer, 0.0 if none yet. Under
        single active consumer, a recent delivery means this consumer is the active one."""

    async def cancel(self) -> None:
        """Stop consuming. Unacked deliveries go back to the lane in their original
        positions before any other consumer is served; they can no longer be acked."""


class Broker(Protocol):
    async def connect(self) -> None: ...
    async def close(self) -> None: ...

    @property
    def is_connected(self) -> bool: ...

    @property
    def blocked_reason(self) -> str | None:
        """Why the broker holds this process's publishes (a RabbitMQ memory or disk
        alarm), or None when it does not."""

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Calls `listener` after the broker connection was re-established."""

    async def declare_lane(self, user_id: str) -> None:
        """Creates the lane and binds it (idempotent, cached per process)."""

    async def lane_stats(self, user_id: str) -> LaneStats | None:
        """Ready messages and consumers of the lane; None if it does not exist."""

    async def publish_lane(self, user_id: str, body: bytes, headers: dict[str, str]) -> None:
        """Durable, confirmed publish to a lane; raises LaneFull or BrokerError."""

    async def consume_lane(
        self, user_id: str, handler: DeliveryHandler, *, prefetch: int
    ) -> LaneConsumer:
        """Consumes an existing lane; LaneMissing if it does not exist (never creates it)."""

    async def delete_lane(self, user_id: str) -> bool:
        """Deletes the lane if it holds no ready message; False if it holds some. Safe
        against a concurrent publish only if the caller fences publishes to the lane
        (classic RabbitMQ lanes are checked atomically; quorum lanes cannot be)."""

    async def publish_results(self, route: str, body: bytes) -> None:
        """Returns once the broker holds the event for the route's consumer; raises
        ResultsUnroutable if nobody is bound to the route, BrokerError if unconfirmed."""

    async def consume_results(self, route: str, handler: BytesHandler) -> None: ...
    async def publish_control(self, body: bytes) -> None: ...
    async def consume_control(self, handler: BytesHandler) -> None: ...
    async def publish_dead(self, body: bytes, headers: dict[str, str]) -> None: ...
