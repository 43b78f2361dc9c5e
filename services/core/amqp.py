"""Broker on RabbitMQ through aio-pika: a cluster of nodes, publisher confirms, and two
connections per process.

- The data connection carries what the service lives on: lane publishes and consumers,
  result and control events. It never sends an operation the broker may refuse at
  connection level (a non-passive declare or a delete), so such a refusal can never drop
  the data path.
- The housekeeping connection declares and deletes lanes and reads their counters. If the
  broker closes it (RabbitMQ answers some refused operations with Connection.Close), only
  housekeeping waits for its reconnect.
- A worker's lane consumers, one channel each, are on lane connections of their own, as
  many as its lanes need (amqp_lanes.LaneChannels).

Both connect to any node of FAIRLANE_BROKER_URL and move to another node on loss (see
amqp_connection.NodeConnection).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)

from fairlane_server.core import metrics
from fairlane_server.core.amqp_connection import BrokerUnreachable, NodeConnection, broker_nodes
from fairlane_server.core.amqp_lanes import LANES_PER_CONNECTION, LaneChannels
from fairlane_server.core.broker import (
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
    LaneStats,
    ResultsUnroutable,
    lane_queue,
)
from fairlane_server.core.describe import describe_error
from fairlane_server.core.logging import get_logger
from fairlane_server.core.settings import Settings

log = get_logger(__name__)

QUORUM_RETRY_DELAY = 0.05  # seconds before a nacked quorum publish is tried on a new channel
_PUBLISH_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: the channel died
    ConnectionError,
    asyncio.TimeoutError,
)


def _broker_failure(exc: BaseException) -> bool:
    """Whether an exception from aio-pika/aiormq means the broker, a connection or a
    channel failed (to be answered with BrokerError), rather than a bug. Besides the typed
    errors, aiormq fails every call in flight on a connection that closed without a reason
    with a bare `Exception` (FutureStore.reject_all): a reset right after the handshake
    does that, and let through it ended the worker's lane discovery for good."""
    return isinstance(exc, (*_PUBLISH_ERRORS, BrokerUnreachable)) or type(exc) is Exception


# A lane channel's close waits for the broker's CloseOk; on a connection that stopped
# answering it would wait until the heartbeat gives up on it, holding up the caller.
CLOSE_TIMEOUT = 10.0
# Housekeeping channels declaring lanes side by side (measured on this project's 2-core
# test machine: 300 declares and binds one after another 5.2 ms each, 1,600 over 16
# channels 1.4 ms each).
DECLARE_CHANNELS = 8


async def _close_quietly(
    channel: AbstractChannel | aiormq.abc.AbstractChannel, timeout: float
) -> None:
    with contextlib.suppress(Exception):  # closing: whatever it raises, it is gone
        async with asyncio.timeout(timeout):
            await channel.close()


_EXCHANGES = (
    (REQUESTS_EXCHANGE, aio_pika.ExchangeType.DIRECT),
    (RESULTS_EXCHANGE, aio_pika.ExchangeType.DIRECT),
    (CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT),
    (DEAD_EXCHANGE, aio_pika.ExchangeType.FANOUT),
)


CONSUMER_TIMEOUT_FIX = (
    "RabbitMQ closed the lane's channel: a lane message stayed unacked longer than its "
    "consumer_timeout (default 30 min). Raise consumer_timeout in rabbitmq.conf (in ms) above "
    "FAIRLANE_LANE_PREFETCH x requests per lane message (up to 256) x the longest time one "
    "request takes with its retries; see docs/deploy.md, RabbitMQ"
)


def consumer_timed_out(exc: BaseException) -> bool:
    """Whether the broker closed a channel for a delivery left unacked past RabbitMQ's
    consumer_timeout: PRECONDITION_FAILED "delivery acknowledgement on channel N timed out"."""
    text = str(exc).lower()
    return (
        isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed)
        and "delivery acknowledgement" in text
        and "timed out" in text
    )


class AmqpDelivery:
    """A lane message as aiormq delivers it (lane channels are aiormq's; see
    amqp_lanes.LaneChannels)."""

    __slots__ = ("_message", "body", "headers", "redelivered")

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._message = message
        self.body = message.body
        headers = message.header.properties.headers or {}
        self.headers = {k: str(v) for k, v in headers.items()}
        self.redelivered = bool(getattr(message.delivery, "redelivered", False))

    @property
    def stale(self) -> bool:
        """The channel it came on is gone: the broker has requeued it for redelivery."""
        return bool(self._message.channel.is_closed)

    async def ack(self) -> None:
        await self._message.channel.basic_ack(self._tag())

    async def reject(self, *, requeue: bool) -> None:
        await self._message.channel.basic_reject(self._tag(), requeue=requeue)

    def _tag(self) -> int:
        tag = getattr(self._message.delivery, "delivery_tag", None)
        if tag is None:  # pragma: no cover - a Basic.Deliver always carries one
            raise BrokerError("lane message without a delivery tag")
        return int(tag)


class AmqpLaneConsumer:
    """A lane consumer on its own channel.

    Closing the channel is what hands a lane back safely: RabbitMQ requeues the channel's
    unacked messages in their original positions before it activates the next single
    active consumer. A basic.cancel alone would let the next consumer start on later
    messages while ours are still unacked, breaking the lane's order.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, user_id: str = "") -> None:
        self._channel = channel
        self.user_id = user_id
        self.cancelled_by_broker = False  # the lane queue was deleted under us
        self.last_delivery = 0.0
        channel.closing.add_done_callback(self._on_channel_closed)

    def _on_broker_cancel(self, *_: Any) -> None:
        self.cancelled_by_broker = True

    def _on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        if closing.cancelled():
            return
        exc = closing.exception()
        if exc is not None and consumer_timed_out(exc):
            # The worker sees a dead consumer and consumes the lane again; the request it
            # was running is cut short and counted as an attempt, and the message comes
            # back from the start. Said loudly: only RabbitMQ's setting cures it.
            log.error(
                "broker_consumer_timeout",
                lane=self.user_id,
                channel=self.channel_number,
                error=describe_error(exc),
                fix=CONSUMER_TIMEOUT_FIX,
            )

    def delivered(self) -> None:
        self.last_delivery = time.monotonic()

    @property
    def channel_number(self) -> int:
        return int(self._channel.number or 0)

    @property
    def alive(self) -> bool:
        return not self._channel.is_closed and not self.cancelled_by_broker

    async def cancel(self) -> None:
        # If the connection is gone, the broker already released the lane.
        await _close_quietly(self._channel, CLOSE_TIMEOUT)


@dataclass(slots=True)
class _Subscription:
    exchange: str
    route: str
    handler: BytesHandler


class AmqpBroker:
    """The Broker contract on RabbitMQ. A service builds it with broker_for(settings)."""

    def __init__(
        self,
        url: str,
        *,
        lane_max_length: int,
        queue_type: str = "classic",
        quorum_size: int = 0,
        publish_timeout: float = 10.0,
        lanes_per_connection: int = LANES_PER_CONNECTION,
    ) -> None:
        nodes = broker_nodes(url)
        self._lane_args: dict[str, Any] = {
            "x-single-active-consumer": True,
            "x-max-length": lane_max_length,
            "x-overflow": "reject-publish",
            "x-queue-type": queue_type,
        }
        if queue_type == "quorum" and quorum_size > 0:
            # RabbitMQ 3.10 gives a quorum queue a member on every node by default: on a
            # large cluster each lane would cost every node memory and every publish a
            # write on every node.
            self._lane_args["x-quorum-initial-group-size"] = quorum_size
        self._quorum = queue_type == "quorum"
        self._timeout = publish_timeout
        self._data = NodeConnection(
            nodes, name="data", on_connected=self._setup_data, timeout=publish_timeout
        )
        self._admin = NodeConnection(
            nodes, name="housekeeping", on_connected=self._setup_admin, timeout=publish_timeout
        )
        # Lane consumers (workers only) on connections of their own, opened as needed.
        self._lanes = LaneChannels(nodes, timeout=publish_timeout, limit=lanes_per_connection)
        self._pub: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        # Housekeeping channels (declares), used round robin; see _housekeeping.
        self._admin_channels: list[AbstractChannel | None] = [None] * DECLARE_CHANNELS
        self._next_admin = 0
        self._consume: AbstractChannel | None = None
        self._declared: set[str] = set()
        self._subscriptions: list[_Subscription] = []
        self._data.on_reconnected(self._declared.clear)
        # Both connections back off on their own; once one is through, the other follows
        # at once instead of leaving housekeeping (lane declares) down for seconds more.
        self._data.on_reconnected(self._admin.retry_now)
        self._admin.on_reconnected(self._data.retry_now)

    # -- connections --------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """The data path is up (housekeeping may be reconnecting meanwhile)."""
        return self._data.is_connected

    @property
    def is_blocked(self) -> bool:
        """RabbitMQ blocks a connection of this broker (memory or disk alarm): publishes
        wait unanswered until the alarm clears, and time out meanwhile."""
        return self.blocked_reason is not None

    @property
    def blocked_reason(self) -> str | None:
        """RabbitMQ's reason for the block ("low on memory", "low on disk"), or None."""
        return self._data.blocked_reason or self._admin.blocked_reason or self._lanes.blocked_reason

    @property
    def lane_connections(self) -> int:
        """Connections that carry this process's lane consumers."""
        return self._lanes.connections

    @property
    def node(self) -> str:
        """host:port of the node the data connection is on."""
        return self._data.node

    async def connect(self) -> None:
        try:
            # Housekeeping first: it declares the exchanges the data path binds to.
            await self._admin.start()
            await self._data.start()
        except BrokerUnreachable as exc:
            await self.close()
            raise BrokerError(f"cannot connect to RabbitMQ: {describe_error(exc)}") from exc

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """After the data connection or a lane connection came back (on any node)."""
        self._data.on_reconnected(listener)
        self._lanes.on_reconnected(listener)

    async def close(self) -> None:
        await self._lanes.close()
        await self._data.close()
        await self._admin.close()

    async def _setup_admin(self, connection: AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        exchanges = {}
        for name, kind in _EXCHANGES:
            exchanges[name] = await channel.declare_exchange(name, kind, durable=True)
        channel = await self._declare_dead_queue(connection, channel, exchanges[DEAD_EXCHANGE])
        # The others belonged to the connection before this one: opened again when used.
        self._admin_channels = [channel] + [None] * (DECLARE_CHANNELS - 1)

    async def _declare_dead_queue(
        self, connection: AbstractConnection, channel: AbstractChannel, exchange: Any
    ) -> AbstractChannel:
        """Declares and binds the dead-letter queue; returns an open channel.

        The queue is a copy of what the request log holds (ListDeadRequests reads the log),
        so its declare never keeps the housekeeping connection down. On quorum lanes it is
        a quorum queue too: a classic queue lives on one node, and while that node is down
        its declare fails on every node ("home node ... is down"), which kept every process
        from starting and every running one from getting housekeeping back (an outside
        review of a 3-node cluster). One that exists with another type is kept: RabbitMQ
        changes a queue's type only by deleting it (docs/deploy.md)."""
        arguments: dict[str, Any] | None = {"x-queue-type": "quorum"} if self._quorum else None
        try:
            dead = await channel.declare_queue(DEAD_QUEUE, durable=True, arguments=arguments)
            await dead.bind(exchange)
        except aiormq.exceptions.ChannelClosed as exc:
            # Refused for this queue alone (another type, its home node down): the channel
            # is closed, the connection is fine.
            log.warning("dead_queue_not_declared", queue=DEAD_QUEUE, error=describe_error(exc))
            channel = await connection.channel(publisher_confirms=False)
        return channel

    async def _setup_data(self, connection: AbstractConnection) -> None:
        pub = await connection.channel(publisher_confirms=True)
        exchanges = {name: await pub.get_exchange(name, ensure=False) for name, _ in _EXCHANGES}
        consume = await connection.channel(publisher_confirms=False)
        for sub in self._subscriptions:
            await self._bind_subscription(consume, exchanges[sub.exchange], sub)
        self._pub, self._exchanges = pub, exchanges
        self._consume = consume

    async def _housekeeping(self) -> AbstractChannel:
        """One of the shared housekeeping channels (declares), round robin, reopened if an
        error closed it. Several, because a channel carries one declare at a time: a burst
        of new lanes (thousands at once, at first use or after the janitor deleted them)
        queued behind each other's round trips on a single channel, 5 ms a lane on an idle
        broker and far more on a busy one, and their first requests waited minutes."""
        slot = self._next_admin
        self._next_admin = (slot + 1) % DECLARE_CHANNELS
        channel = self._admin_channels[slot]
        if channel is None or channel.is_closed:
            channel = await (await self._admin_connection()).channel(publisher_confirms=False)
            current = self._admin_channels[slot]
            if current is not None and not current.is_closed:
                # Another declare reopened this slot while we waited: use that one.
                await _close_quietly(channel, CLOSE_TIMEOUT)
                return current
            self._admin_channels[slot] = channel
        return channel

    async def _admin_connection(self) -> AbstractConnection:
        if not self._admin.is_connected and self._data.is_connected:
            # The cluster answers (the data path is up) and housekeeping is a step behind
            # it after a failover: wait for it rather than refuse a lane declare. With
            # every node down this fails at once, like a publish.
            await self._admin.wait_connected(self._timeout)
        connection = self._admin.connection
        if connection is None or not self._admin.is_connected:
            raise BrokerError("housekeeping connection to RabbitMQ is down")
        return connection

    @contextlib.asynccontextmanager
    async def _scratch(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        """A housekeeping channel of its own, for an operation that may close it (a
        passive declare of a missing queue, a refused delete)."""
        channel = await (await self._admin_connection()).channel(publisher_confirms=False)
        try:
            yield await channel.get_underlay_channel()
        finally:
            if not channel.is_closed:
                with contextlib.suppress(Exception):  # closing: whatever it raises, it is gone
                    await channel.close()

    def _data_connection(self) -> AbstractConnection:
        connection = self._data.connection
        if connection is None or not self._data.is_connected:
            raise BrokerError("broker not connected")
        return connection

    # -- lanes --------------------------------------------------------------------------

    async def declare_lane(self, user_id: str) -> None:
        name = lane_queue(user_id)
        if name in self._declared:
            return
        try:
            channel = await self._housekeeping()
            try:
                queue = await channel.declare_queue(name, durable=True, arguments=self._lane_args)
            except aiormq.exceptions.ChannelPreconditionFailed:
                # The lane exists with other arguments (declared before the settings
                # changed: another queue type, quorum size or bound). It is used as it is,
                # and takes the new arguments when it is re-created after idling.
                log.warning("lane_arguments_differ", lane=user_id)
                channel = await self._housekeeping()
                queue = await channel.declare_queue(name, passive=True)
            await queue.bind(REQUESTS_EXCHANGE, routing_key=user_id)
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"cannot declare lane {name}: {describe_error(exc)}") from exc
        self._declared.add(name)

    async def lane_stats(self, user_id: str) -> LaneStats | None:
        try:
            async with self._scratch() as channel:
                ok = await channel.queue_declare(
                    lane_queue(user_id), passive=True, timeout=self._timeout
                )
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"cannot read lane {user_id}: {describe_error(exc)}") from exc
        return LaneStats(messages=int(ok.message_count or 0), consumers=int(ok.consumer_count or 0))

    async def delete_lane(self, user_id: str) -> bool:
        """Deletes the lane unless it holds ready messages; False if it held some.

        The lane is read (passive declare) and then deleted, on either queue type.
        RabbitMQ's if-empty would check and delete in one step, but quorum queues refuse
        it (and if-unused) with a connection-level NOT_IMPLEMENTED in RabbitMQ 3.10, and
        a lane may be of the other type than the settings say (declared before they
        changed). A message arriving between the read and the delete would be lost: the
        caller must fence publishes first (LaneJanitor holds the lane's row in the
        request log, see janitor.py); this read only backs that up."""
        name = lane_queue(user_id)
        try:
            stats = await self.lane_stats(user_id)
            if stats is None:
                self._declared.discard(name)
                return True
            if stats.messages:
                return False
            async with self._scratch() as channel:
                ok = await channel.queue_delete(name, timeout=self._timeout)
        except aiormq.exceptions.ChannelNotFoundEntity:
            pass  # already gone
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"cannot delete lane {name}: {describe_error(exc)}") from exc
        else:
            if ok.message_count:
                # Cannot happen while the caller fences publishes; say so loudly.
                log.error("lane_deleted_with_messages", lane=user_id, count=ok.message_count)
        self._declared.discard(name)
        return True

    async def publish_lane(self, user_id: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            result = await self._publish(
                REQUESTS_EXCHANGE, user_id, body, headers, persistent=True, mandatory=True
            )
        except aio_pika.exceptions.DeliveryError as exc:
            if not self._quorum:
                raise LaneFull(f"lane {user_id} is full") from exc
            # On a quorum lane a nack can also mean a leader change, and RabbitMQ 3.10 keeps
            # nacking a channel opened before the new leader was known: try once more on a
            # fresh channel before calling the lane full.
            result = await self._publish_on_fresh_channel(user_id, body, headers)
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"publish to lane failed: {describe_error(exc)}") from exc
        if not isinstance(result, aiormq.spec.Basic.Ack):
            # Returned unroutable: the lane queue is gone (deleted while idle). The caller
            # declares it again and retries; nothing was enqueued.
            self._declared.discard(lane_queue(user_id))
            raise LaneMissing(f"lane {user_id} does not exist")

    async def _publish_on_fresh_channel(
        self, user_id: str, body: bytes, headers: dict[str, str]
    ) -> Any:
        connection = self._data_connection()
        await asyncio.sleep(QUORUM_RETRY_DELAY)
        try:
            channel = await connection.channel(publisher_confirms=True)
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"publish to lane failed: {describe_error(exc)}") from exc
        try:
            return await self._basic_publish(
                channel, REQUESTS_EXCHANGE, user_id, body, headers, persistent=True, mandatory=True
            )
        except aio_pika.exceptions.DeliveryError as exc:
            raise LaneFull(f"lane {user_id} is full") from exc
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"publish to lane failed: {describe_error(exc)}") from exc
        finally:
            with contextlib.suppress(Exception):  # closing: whatever it raises, it is gone
                await channel.close()

    async def consume_lane(
        self, user_id: str, handler: DeliveryHandler, *, prefetch: int
    ) -> AmqpLaneConsumer:
        """Consumes an existing lane (passive declare: a consumer never creates or
        re-creates a lane; LaneMissing if the queue service has not declared it or the
        janitor deleted it)."""
        try:
            channel = await self._lanes.open()
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"cannot consume lane {user_id}: {describe_error(exc)}") from exc
        consumer = AmqpLaneConsumer(channel, user_id)
        queue = lane_queue(user_id)

        async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
            consumer.delivered()
            await handler(AmqpDelivery(message))

        try:
            # Bounded: a connection that stops answering mid-setup (its replies lost, or
            # closed by a connection error that leaves the RPC waiting) must not hold the
            # caller, which holds the lane's lock (its next consume or hand-back waits for it).
            async with asyncio.timeout(self._timeout):
                await channel.basic_qos(prefetch_count=prefetch)
                await channel.queue_declare(queue, passive=True)
                channel.on_consumer_cancel_callbacks.add(consumer._on_broker_cancel)
                await channel.basic_consume(queue, on_message, no_ack=False)
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            raise LaneMissing(f"lane {user_id} does not exist") from exc
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            await _close_quietly(channel, self._timeout)
            raise BrokerError(f"cannot consume lane {user_id}: {describe_error(exc)}") from exc
        return consumer

    # -- events -------------------------------------------------------------------------

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
        started = time.perf_counter()
        pub = self._pub
        if pub is None or exchange not in self._exchanges or not self._data.is_connected:
            raise BrokerError("broker not connected")
        try:
            return await self._basic_publish(
                pub,
                exchange,
                routing_key,
                body,
                headers,
                persistent=persistent,
                mandatory=mandatory,
            )
        finally:
            metrics.PUBLISH_SECONDS.labels(exchange).observe(time.perf_counter() - started)

    async def _basic_publish(
        self,
        channel: AbstractChannel,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, str] | None,
        *,
        persistent: bool,
        mandatory: bool,
    ) -> Any:
        """aio-pika's Exchange.publish minus its Message: building an aio_pika.Message and
        its properties took 11 us a publish against 0.9 us for the properties alone, and
        the relay publishes once per lane per run (py-spy at 1,000 lanes: 3 % of the
        queue's samples). Same checks, same frames."""
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        underlay = await channel.get_underlay_channel()
        # Our own message id, so that a publish given up on can be forgotten before it is
        # cancelled. aiormq 7.2.4 finds a returned message's publish by its message id and
        # sets the result on that publish's confirmation; if the publish was cancelled (a
        # timeout) just before, that raises in the channel's reader and kills it, and the
        # connection's reader then blocks for good on the channel's full frame queue: no
        # confirm or delivery of the connection arrives until the heartbeat drops it, and
        # the next late return does it again. Forgotten first, a late return is only
        # logged. The publish runs shielded, so that forgetting comes before cancelling.
        message_id = uuid.uuid4().hex
        publish = asyncio.ensure_future(
            underlay.basic_publish(  # type: ignore[call-arg]  # wait: aiormq.Channel's own
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=aiormq.spec.Basic.Properties(
                    delivery_mode=_PERSISTENT if persistent else _NOT_PERSISTENT,
                    headers=headers or None,  # type: ignore[arg-type]
                    message_id=message_id,
                ),
                mandatory=mandatory,
                # Not waiting for the socket write: a publish holds the channel's lock
                # until then, so publishes of many lanes went out one per several turns
                # of the loop. The connection's bounded write queue still pushes back.
                wait=False,
            )
        )
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(publish)
        except BaseException:
            if not publish.done():
                pending: dict[str, int] | None = getattr(underlay, "message_id_delivery_tag", None)
                if pending is not None:
                    pending.pop(message_id, None)
                publish.cancel()
            publish.add_done_callback(_retrieved)
            raise

    async def publish_results(self, route: str, body: bytes) -> None:
        """Confirmed and mandatory: returns once the broker holds the event for the queue
        replica bound to `route`; ResultsUnroutable if no replica is bound (it died, or is
        reconnecting); BrokerError if the broker did not confirm."""
        try:
            result = await self._publish(
                RESULTS_EXCHANGE, route, body, persistent=False, mandatory=True
            )
        except aio_pika.exceptions.DeliveryError as exc:
            raise BrokerError(
                f"results for {route} were not confirmed: {describe_error(exc)}"
            ) from exc
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"publish of results failed: {describe_error(exc)}") from exc
        if not isinstance(result, aiormq.spec.Basic.Ack):
            raise ResultsUnroutable(f"no queue replica is bound to results route {route}")

    async def _bind_subscription(
        self, channel: AbstractChannel, exchange: AbstractExchange, sub: _Subscription
    ) -> None:
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key=sub.route)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await sub.handler(message.body)

        await queue.consume(on_message, no_ack=True)

    async def _subscribe(self, exchange: str, route: str, handler: BytesHandler) -> None:
        sub = _Subscription(exchange, route, handler)
        if self._consume is None or exchange not in self._exchanges:
            raise BrokerError("broker not connected")
        try:
            await self._bind_subscription(self._consume, self._exchanges[exchange], sub)
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"cannot subscribe to {exchange}: {describe_error(exc)}") from exc
        # Bound again on every reconnect (the queue is exclusive to the connection).
        self._subscriptions.append(sub)

    async def consume_results(self, route: str, handler: BytesHandler) -> None:
        await self._subscribe(RESULTS_EXCHANGE, route, handler)

    async def publish_control(self, body: bytes) -> None:
        try:
            await self._publish(CONTROL_EXCHANGE, "", body, persistent=False, mandatory=False)
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"publish of control event failed: {describe_error(exc)}") from exc

    async def consume_control(self, handler: BytesHandler) -> None:
        await self._subscribe(CONTROL_EXCHANGE, "", handler)

    async def publish_dead(self, body: bytes, headers: dict[str, str]) -> None:
        try:
            await self._publish(DEAD_EXCHANGE, "", body, headers, persistent=True, mandatory=False)
        except Exception as exc:
            if not _broker_failure(exc):
                raise
            raise BrokerError(f"publish to {DEAD_EXCHANGE} failed: {describe_error(exc)}") from exc


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Marks the outcome of a publish nobody waits for any more as seen."""
    if not task.cancelled():
        task.exception()


_PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)
_NOT_PERSISTENT = int(aio_pika.DeliveryMode.NOT_PERSISTENT)


def broker_for(settings: Settings) -> AmqpBroker:
    """The broker of a service process: RabbitMQ at every node of FAIRLANE_BROKER_URL, with
    lanes of FAIRLANE_LANE_QUEUE_TYPE bounded by FAIRLANE_LANE_MAX_LENGTH. Not connected."""
    return AmqpBroker(
        settings.broker_url,
        lane_max_length=settings.lane_max_length,
        queue_type=settings.lane_queue_type,
        quorum_size=settings.lane_quorum_size,
    )
