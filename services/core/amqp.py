"""Broker on RabbitMQ through aio-pika (robust connection, publisher confirms)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from services.core import metrics
from services.core.broker import (
    CONTROL_EXCHANGE,
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    REQUESTS_EXCHANGE,
    RESULTS_EXCHANGE,
    BrokerError,
    BytesHandler,
    DeliveryHandler,
    LaneFull,
    LaneMissing,
    lane_queue,
)

QUORUM_RETRY_DELAY = 0.05  # seconds before a nacked quorum publish is tried on a new channel
_PUBLISH_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: the channel died
    ConnectionError,
    asyncio.TimeoutError,
)


class AmqpDelivery:
    __slots__ = ("_message", "body", "headers", "redelivered")

    def __init__(self, message: AbstractIncomingMessage) -> None:
        self._message = message
        self.body = message.body
        self.headers = {k: str(v) for k, v in (message.headers or {}).items()}
        self.redelivered = bool(message.redelivered)

    @property
    def stale(self) -> bool:
        """The channel it came on is gone: the broker has requeued it for redelivery."""
        try:
            return bool(self._message.channel.is_closed)
        except aiormq.exceptions.ChannelInvalidStateError:
            return True

    async def ack(self) -> None:
        await self._message.ack()

    async def reject(self, *, requeue: bool) -> None:
        await self._message.reject(requeue=requeue)


class AmqpLaneConsumer:
    """A lane consumer on its own channel.

    Closing the channel is what hands a lane back safely: RabbitMQ requeues the channel's
    unacked messages in their original positions before it activates the next single
    active consumer. A basic.cancel alone would let the next consumer start on later
    messages while ours are still unacked, breaking the lane's order.
    """

    def __init__(self, channel: AbstractChannel) -> None:
        self._channel = channel

    @property
    def alive(self) -> bool:
        return not self._channel.is_closed

    async def cancel(self) -> None:
        # If the connection is gone, the broker already released the lane.
        with contextlib.suppress(*_PUBLISH_ERRORS):
            await self._channel.close()


class AmqpBroker:
    def __init__(
        self,
        url: str,
        *,
        lane_max_length: int,
        queue_type: str = "classic",
        publish_timeout: float = 10.0,
    ) -> None:
        self._url = url
        self._lane_args: dict[str, Any] = {
            "x-single-active-consumer": True,
            "x-max-length": lane_max_length,
            "x-overflow": "reject-publish",
            "x-queue-type": queue_type,
        }
        self._timeout = publish_timeout
        self._conn: AbstractRobustConnection | None = None
        self._pub: AbstractChannel | None = None
        self._consume: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._declared: set[str] = set()
        self._reconnect_listeners: list[Callable[[], None]] = []

    @property
    def is_connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed and self._conn.connected.is_set()

    async def connect(self) -> None:
        try:
            self._conn = await aio_pika.connect_robust(self._url, timeout=self._timeout)
            self._conn.reconnect_callbacks.add(self._reconnected)
            self._pub = await self._conn.channel(publisher_confirms=True)
            self._consume = await self._conn.channel(publisher_confirms=False)
            for name, kind in (
                (REQUESTS_EXCHANGE, aio_pika.ExchangeType.DIRECT),
                (RESULTS_EXCHANGE, aio_pika.ExchangeType.DIRECT),
                (CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT),
                (DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT),
            ):
                self._exchanges[name] = await self._pub.declare_exchange(name, kind, durable=True)
            dead = await self._pub.declare_queue(DEAD_QUEUE, durable=True)
            await dead.bind(self._exchanges[DEAD_EXCHANGE])
        except _PUBLISH_ERRORS as exc:
            await self.close()
            raise BrokerError(f"cannot connect to RabbitMQ: {exc}") from exc

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        self._reconnect_listeners.append(listener)

    def _reconnected(self, *_: Any) -> None:
        self._declared.clear()
        for listener in self._reconnect_listeners:
            listener()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
        self._conn = None

    def _channel(self, consume: bool = False) -> AbstractChannel:
        channel = self._consume if consume else self._pub
        if channel is None:
            raise BrokerError("broker not connected")
        return channel

    async def declare_lane(self, user_id: str) -> None:
        name = lane_queue(user_id)
        if name in self._declared:
            return
        try:
            queue = await self._channel().declare_queue(
                name, durable=True, arguments=self._lane_args
            )
            await queue.bind(self._exchanges[REQUESTS_EXCHANGE], routing_key=user_id)
        except _PUBLISH_ERRORS as exc:
            raise BrokerError(f"cannot declare lane {name}: {exc}") from exc
        self._declared.add(name)

    async def _publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        persistent: bool,
        mandatory: bool,
    ) -> Any:
        message = aio_pika.Message(
            body,
            headers=headers or None,  # type: ignore[arg-type]
            delivery_mode=(
                aio_pika.DeliveryMode.PERSISTENT
                if persistent
                else aio_pika.DeliveryMode.NOT_PERSISTENT
            ),
        )
        started = time.perf_counter()
        try:
            result = await self._exchanges[exchange].publish(
                message, routing_key, mandatory=mandatory, timeout=self._timeout
            )
        except KeyError as exc:
            raise BrokerError("broker not connected") from exc
        finally:
            metrics.PUBLISH_SECONDS.labels(exchange).observe(time.perf_counter() - started)
        return result

    async def publish_lane(self, user_id: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            result = await self._publish(
                REQUESTS_EXCHANGE, user_id, body, headers, persistent=True, mandatory=True
            )
        except aio_pika.exceptions.DeliveryError as exc:
            if self._lane_args["x-queue-type"] != "quorum":
                raise LaneFull(f"lane {user_id} is full") from exc
            # On a quorum lane a nack can also mean a leader change, and RabbitMQ 3.10 keeps
            # nacking a channel opened before the new leader was known (DESIGN.md): try once
            # more on a fresh channel before calling the lane full.
            result = await self._publish_on_fresh_channel(user_id, body, headers)
        except _PUBLISH_ERRORS as exc:
            raise BrokerError(f"publish to lane failed: {exc}") from exc
        if not isinstance(result, aiormq.spec.Basic.Ack):
            # Returned unroutable: the lane queue is gone (deleted while idle). The caller
            # declares it again and retries; nothing was enqueued.
            self._declared.discard(lane_queue(user_id))
            raise LaneMissing(f"lane {user_id} does not exist")

    async def _publish_on_fresh_channel(
        self, user_id: str, body: bytes, headers: dict[str, str]
    ) -> Any:
        if self._conn is None:
            raise BrokerError("broker not connected")
        await asyncio.sleep(QUORUM_RETRY_DELAY)
        channel = await self._conn.channel(publisher_confirms=True)
        try:
            exchange = await channel.get_exchange(REQUESTS_EXCHANGE, ensure=False)
            message = aio_pika.Message(
                body,
                headers=headers or None,  # type: ignore[arg-type]
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            return await exchange.publish(message, user_id, mandatory=True, timeout=self._timeout)
        except aio_pika.exceptions.DeliveryError as exc:
            raise LaneFull(f"lane {user_id} is full") from exc
        finally:
            await channel.close()

    async def consume_lane(
        self, user_id: str, handler: DeliveryHandler, *, prefetch: int
    ) -> AmqpLaneConsumer:
        if self._conn is None:
            raise BrokerError("broker not connected")
        try:
            channel = await self._conn.channel(publisher_confirms=False)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.declare_queue(
                lane_queue(user_id), durable=True, arguments=self._lane_args
            )
            await queue.bind(self._exchanges[REQUESTS_EXCHANGE], routing_key=user_id)

            async def on_message(message: AbstractIncomingMessage) -> None:
                await handler(AmqpDelivery(message))

            await queue.consume(on_message)
        except _PUBLISH_ERRORS as exc:
            raise BrokerError(f"cannot consume lane {user_id}: {exc}") from exc
        return AmqpLaneConsumer(channel)

    async def delete_lane(self, user_id: str) -> bool:
        """Deletes the lane only if it holds no message; False if it was not empty."""
        if self._conn is None:
            raise BrokerError("broker not connected")
        name = lane_queue(user_id)
        # A refused delete closes its channel, so use a throwaway one.
        channel = await self._conn.channel(publisher_confirms=False)
        try:
            await channel.queue_delete(name, if_empty=True)
        except aiormq.exceptions.ChannelPreconditionFailed:
            return False
        except _PUBLISH_ERRORS as exc:
            raise BrokerError(f"cannot delete lane {name}: {exc}") from exc
        finally:
            if not channel.is_closed:
                await channel.close()
        self._declared.discard(name)
        return True

    async def publish_results(self, route: str, body: bytes) -> None:
        try:
            await self._publish(RESULTS_EXCHANGE, route, body, persistent=False, mandatory=False)
        except _PUBLISH_ERRORS as exc:
            raise BrokerError(f"publish of results failed: {exc}") from exc

    async def _consume_bytes(self, exchange: str, route: str, handler: BytesHandler) -> None:
        channel = self._channel(consume=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(self._exchanges[exchange], routing_key=route)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await handler(message.body)

        await queue.consume(on_message, no_ack=True)

    async def consume_results(self, route: str, handler: BytesHandler) -> None:
        await self._consume_bytes(RESULTS_EXCHANGE, route, handler)

    async def publish_control(self, body: bytes) -> None:
        try:
            await self._publish(CONTROL_EXCHANGE, "", body, persistent=False, mandatory=False)
        except _PUBLISH_ERRORS as exc:
            raise BrokerError(f"publish of control event failed: {exc}") from exc

    async def consume_control(self, handler: BytesHandler) -> None:
        await self._consume_bytes(CONTROL_EXCHANGE, "", handler)

    async def publish_dead(self, body: bytes, headers: dict[str, str]) -> None:
        try:
            await self._publish(DEAD_EXCHANGE, "", body, headers, persistent=True, mandatory=False)
        except _PUBLISH_ERRORS as exc:
            raise BrokerError(f"publish to {DEAD_EXCHANGE} failed: {exc}") from exc
