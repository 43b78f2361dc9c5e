"""Channels for lane consumers: one channel per lane, over as many connections as needed.

Every worker consumes every lane, one channel each (closing a lane's channel is what hands
it back in order). Two limits of one AMQP connection matter then:

- RabbitMQ negotiates channel_max = 2047 by default, and opening one channel more is a
  connection-level NOT_ALLOWED: the broker closes the whole connection, and every lane
  on it with it. So a connection carries at most LANES_PER_CONNECTION lane channels, and
  the pool opens another connection (to any node) when they are all full.
- aiormq numbers a new channel one above the highest open one, so on a connection whose
  lanes come and go (rebalancing, idle lanes deleted and re-created) the numbers climb
  past channel_max after a couple of thousand changes, with the same result. The pool
  numbers channels itself, within channel_max.
- A number must not be reused the moment its channel closes. When the broker closes a
  channel (a passive declare of a lane not declared yet), aiormq frees the number on the
  broker's Channel.Close, before its own CloseOk is written; a Channel.Open with that
  number sent in between is "second 'channel.open' seen", a connection error that takes
  every lane on the connection down (seen at 1,000 new lanes). So numbers go round: a
  freed number comes back only after every other free number was handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import aiormq.abc
from aio_pika.abc import AbstractConnection

from fairlane_server.core.amqp_connection import BrokerUnreachable, NodeConnection

LANES_PER_CONNECTION = 1000  # well below RabbitMQ's default channel_max of 2047
# A lane connection goes round twice as many channel numbers as the lanes it carries (2,000,
# within channel_max), so a freed number rests for at least `limit` opens.
NUMBERS_PER_LANE = 2


async def _nothing_to_set_up(_connection: AbstractConnection) -> None:
    """Lane connections hold lane channels only; each lane opens its own."""


@dataclass
class _LaneConnection:
    node: NodeConnection
    channels: dict[int, aiormq.abc.AbstractChannel] = field(default_factory=dict)
    last: int = 0  # the number handed out last

    def next_numbers(self, limit: int, numbers: int) -> list[int]:
        """Numbers to try for a new channel, in round order after the last one handed
        out; none when `limit` channels are open."""
        for number, channel in list(self.channels.items()):
            if channel.is_closed:
                del self.channels[number]
        if len(self.channels) >= limit:
            return []
        order = [(self.last + i) % numbers + 1 for i in range(numbers)]
        return [n for n in order if n not in self.channels]


class LaneChannels:
    def __init__(
        self,
        urls: list[str],
        *,
        timeout: float,
        limit: int = LANES_PER_CONNECTION,
    ) -> None:
        self._urls = urls
        self._timeout = timeout
        self._limit = limit
        self._connections: list[_LaneConnection] = []
        self._listeners: list[Callable[[], None]] = []
        self._lock = asyncio.Lock()

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def blocked_reason(self) -> str | None:
        """RabbitMQ's reason if it blocks one of the lane connections. They only ack, and
        RabbitMQ blocks connections that publish, so this is for completeness."""
        return next((c.node.blocked_reason for c in self._connections if c.node.is_blocked), None)

    def on_reconnected(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)
        for conn in self._connections:
            conn.node.on_reconnected(listener)

    async def open(self) -> aiormq.abc.AbstractChannel:
        """A new channel for one lane, on a connection with room for it."""
        async with self._lock:
            for conn in self._connections:
                # One that is reconnecting is waited for, not replaced: an outage must not
                # open a connection per lane.
                if not await conn.node.wait_connected(self._timeout):
                    raise BrokerUnreachable(f"lane connection {conn.node.name} is down")
                channel = await self._open_on(conn)
                if channel is not None:
                    return channel
            channel = await self._open_on(await self._new_connection())
            if channel is None:  # pragma: no cover - a new connection has every number free
                raise BrokerUnreachable("no free channel number on a new lane connection")
            return channel

    async def _open_on(self, conn: _LaneConnection) -> aiormq.abc.AbstractChannel | None:
        connection = conn.node.connection
        underlay = connection.transport if connection is not None else None
        if underlay is None:
            raise BrokerUnreachable(f"lane connection {conn.node.name} is down")
        for number in conn.next_numbers(self._limit, NUMBERS_PER_LANE * self._limit):
            try:
                async with asyncio.timeout(self._timeout):
                    # aiormq's channel, not aio-pika's: an aio-pika channel leaves two
                    # callbacks on its connection's close future when it closes (aio-pika
                    # removes them from another of the observers aiormq's `closing` hands
                    # out), about 4 KB a channel, and a worker opens one per lane consume.
                    channel = await underlay.connection.channel(
                        channel_number=number, publisher_confirms=False
                    )
            except ValueError:
                continue  # aiormq still holds it: the broker has not confirmed its close
            conn.last = number
            conn.channels[number] = channel  # under the pool's lock: no other open races it
            return channel
        return None

    async def _new_connection(self) -> _LaneConnection:
        node = NodeConnection(
            self._urls,
            name=f"lanes-{len(self._connections) + 1}",
            on_connected=_nothing_to_set_up,
            timeout=self._timeout,
        )
        for listener in self._listeners:
            node.on_reconnected(listener)
        await node.start()  # BrokerUnreachable if no node answers
        conn = _LaneConnection(node)
        self._connections.append(conn)
        return conn

    async def close(self) -> None:
        connections, self._connections = self._connections, []
        for conn in connections:
            with contextlib.suppress(Exception):
                await conn.node.close()


__all__ = ["LANES_PER_CONNECTION", "BrokerUnreachable", "LaneChannels"]
