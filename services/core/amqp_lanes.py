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
  gives each channel the lowest free number instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractChannel, AbstractConnection

from fairlane_server.core.amqp_connection import BrokerUnreachable, NodeConnection

LANES_PER_CONNECTION = 1000  # well below RabbitMQ's default channel_max of 2047


async def _nothing_to_set_up(_connection: AbstractConnection) -> None:
    """Lane connections hold lane channels only; each lane opens its own."""


@dataclass
class _LaneConnection:
    node: NodeConnection
    channels: dict[int, AbstractChannel] = field(default_factory=dict)

    def free_number(self, limit: int) -> int | None:
        for number, channel in list(self.channels.items()):
            if channel.is_closed:
                del self.channels[number]
        if len(self.channels) >= limit:
            return None
        return next(n for n in range(1, limit + 1) if n not in self.channels)


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

    def on_reconnected(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)
        for conn in self._connections:
            conn.node.on_reconnected(listener)

    async def open(self) -> AbstractChannel:
        """A new channel for one lane, on a connection with room for it."""
        async with self._lock:
            for conn in self._connections:
                # One that is reconnecting is waited for, not replaced: an outage must not
                # open a connection per lane.
                if not await conn.node.wait_connected(self._timeout):
                    raise BrokerUnreachable(f"lane connection {conn.node.name} is down")
                number = conn.free_number(self._limit)
                if number is not None:
                    return await self._open_on(conn, number)
            conn = await self._new_connection()
            return await self._open_on(conn, 1)

    async def _open_on(self, conn: _LaneConnection, number: int) -> AbstractChannel:
        connection = conn.node.connection
        if connection is None:
            raise BrokerUnreachable(f"lane connection {conn.node.name} is down")
        channel = await connection.channel(channel_number=number, publisher_confirms=False)
        conn.channels[number] = channel  # under the pool's lock: no other open races it
        return channel

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
