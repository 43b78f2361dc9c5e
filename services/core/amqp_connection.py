"""One AMQP connection that stays up across a RabbitMQ cluster.

aio-pika's robust connection takes one URL (aio-pika issue #141, still open), and when it
recovers it declares again every queue its channels ever declared and re-consumes every
consumer the server cancelled. For lanes that is wrong: a lane queue the janitor deleted
on purpose comes back on the next hiccup. So this module is hand-written and small:

- `broker_nodes` turns FAIRLANE_BROKER_URL into one URL per node. It takes a list of URLs
  (comma or whitespace separated) or one URL with several hosts, RabbitMQ-style:
  ``amqp://user:pass@h1:5672,h2:5672,h3:5672/vhost``.
- `NodeConnection` connects to any node, and when its connection drops it connects to the
  next node that answers (in turn, with jittered backoff once every node has failed), then
  runs the owner's `on_connected` set-up again: channels, consumers, whatever the owner
  wants back. Nothing is restored behind the owner's back.
- A connection RabbitMQ blocks (a memory or disk alarm: Connection.Blocked, sent once the
  connection publishes) is logged (`broker_blocked`, `broker_unblocked`), counted in the
  `fairlane_broker_blocked` gauge and shown by `NodeConnection.is_blocked`. Its publishes
  wait unanswered until the alarm clears; without this, nothing said so.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from fairlane_server.core.logging import get_logger
from fairlane_server.core.metrics import BROKER_BLOCKED

log = get_logger(__name__)

# Every NodeConnection of the process that RabbitMQ blocks now (all brokers, all roles):
# the gauge is 1 while any is.
_BLOCKED_NOW: set[NodeConnection] = set()
# aiormq 7.2 has no callback for Connection.Blocked and Connection.Unblocked: its reader
# passes them to these two (name-mangled) methods of the connection, which only pause its
# writer's start. They are wrapped on each connection object (tests/unit/test_amqp_blocked.py
# fails if an aiormq upgrade renames them).
_ON_BLOCKED = "_Connection__handle_connection_blocked"
_ON_UNBLOCKED = "_Connection__handle_connection_unblocked"

CONNECT_ERRORS = (
    aiormq.exceptions.AMQPError,
    ConnectionError,
    OSError,
    asyncio.TimeoutError,
)
# One attempt (connect, handshake and the owner's set-up) may take this many `timeout`s.
ATTEMPT_TIMEOUTS = 2
DEFAULT_HEARTBEAT = 10  # seconds; a node that vanishes without a TCP reset is noticed in ~2x
_SCHEME = re.compile(r"^amqps?://", re.IGNORECASE)


def broker_nodes(setting: str) -> list[str]:
    """One URL per broker node, in the order given; ValueError with a clear message for a
    setting that names no node or mixes schemes."""
    parts = [p for p in re.split(r"[\s,]+", setting.strip()) if p]
    if not parts:
        raise ValueError("the broker URL is empty")
    if all(_SCHEME.match(p) for p in parts):
        urls = parts
    elif _SCHEME.match(parts[0]) and not any(_SCHEME.match(p) for p in parts[1:]):
        urls = _expand_hosts(setting.strip())
    else:
        raise ValueError(
            f"cannot read broker URL {_redact(setting)!r}: give amqp://user:pass@h1:port,"
            "h2:port/vhost or a comma-separated list of amqp:// URLs"
        )
    for url in urls:
        parts_ = urlsplit(url)
        if not parts_.hostname:
            raise ValueError(f"broker URL {_redact(url)!r} names no host")
        try:
            parts_.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError:
            raise ValueError(f"broker URL {_redact(url)!r} has a bad port") from None
    return urls


def _expand_hosts(url: str) -> list[str]:
    """amqp://user:pass@h1:1,h2:2/vhost?q -> one URL per host, sharing the rest."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    prefix = f"{userinfo}@" if userinfo else ""
    return [
        urlunsplit(parts._replace(netloc=f"{prefix}{host.strip()}"))
        for host in hosts.split(",")
        if host.strip()
    ]


def _redact(url: str) -> str:
    return re.sub(r"(amqps?://[^:/@]*:)[^@]*@", r"\1******@", url, flags=re.IGNORECASE)


def node_name(url: str) -> str:
    """host:port of a node URL, for logs (never the credentials)."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}"


def _with_defaults(url: str, connection_name: str) -> str:
    parts = urlsplit(url)
    query = [q for q in parts.query.split("&") if q]
    if not any(q.startswith("heartbeat=") for q in query):
        query.append(f"heartbeat={DEFAULT_HEARTBEAT}")
    if not any(q.startswith("name=") for q in query):
        query.append(f"name={connection_name}")
    return urlunsplit(parts._replace(query="&".join(query)))


class BrokerUnreachable(Exception):
    """No node of the list accepted a connection."""


class AttemptFailed(Exception):
    """One connect attempt failed, for whatever reason (`cause`)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause


class NodeConnection:
    """A connection to any node of `urls` that comes back on its own after a loss.

    `on_connected(connection)` runs after every (re)connect, before the connection counts
    as up; if it fails, that node is given up and the next one tried. `on_reconnected`
    listeners run after each re-connect (not the first)."""

    def __init__(
        self,
        urls: list[str],
        *,
        name: str,
        on_connected: Callable[[AbstractConnection], Awaitable[None]],
        timeout: float = 10.0,
        max_backoff: float = 5.0,
    ) -> None:
        if not urls:
            raise ValueError("no broker node given")
        self._urls = [_with_defaults(u, f"fairlane-{name}") for u in urls]
        # Start at a random node so the replicas of a service spread over the cluster.
        self._next = random.randrange(len(self._urls))
        self.name = name
        self._on_connected = on_connected
        self._timeout = timeout
        self._max_backoff = max_backoff
        self.connection: AbstractConnection | None = None
        self.node = ""
        self._up = asyncio.Event()
        self._closing = False
        self._recover: asyncio.Task[None] | None = None
        self._reconnected: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        # RabbitMQ's reason while it blocks the connection, and which connection it blocks
        # (a late frame of one given up on must not mark its successor).
        self.blocked_reason: str | None = None
        self._blocked_by: object | None = None
        self._blocked_at = 0.0

    @property
    def is_connected(self) -> bool:
        c = self.connection
        return self._up.is_set() and c is not None and c.connected.is_set()

    @property
    def is_blocked(self) -> bool:
        """RabbitMQ blocks this connection (resource alarm): publishes on it wait."""
        return self.blocked_reason is not None

    def on_reconnected(self, listener: Callable[[], None]) -> None:
        self._reconnected.append(listener)

    def retry_now(self) -> None:
        """Cuts a reconnect backoff short: another connection just reached the cluster,
        so this one need not sleep out its backoff (up to max_backoff) before following."""
        self._wake.set()

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._up.wait()
        return self.is_connected

    async def start(self) -> None:
        """Connects to the first node that answers, trying each once."""
        self._closing = False
        errors = []
        for _ in range(len(self._urls)):
            try:
                await self._attempt()
                return
            except AttemptFailed as failed:
                errors.append(f"{self.node or '?'}: {failed.cause!r}")
        raise BrokerUnreachable("; ".join(errors))

    async def _attempt(self) -> None:
        """One connect to the next node, bounded in time; AttemptFailed for any way it
        can fail. A connection that dies during the handshake or the set-up surfaces
        from aiormq in ways no list of exception types covers: a bare Exception (reset
        right after Connection.OpenOk, with a channel open under way), a CancelledError
        from a future aiormq cancelled, or no answer at all (aio-pika's `timeout` does not
        cover its wait for the connection to be ready). A reconnect loop that let one of
        them out ended for good, and the service stayed off the broker until restarted."""
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUTS * self._timeout):
                await self._connect_next()
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if self._closing or (task is not None and task.cancelling()):
                raise  # our own cancellation (close()), not aiormq's
            raise AttemptFailed(exc) from exc
        except Exception as exc:
            if not isinstance(exc, (*CONNECT_ERRORS, BrokerUnreachable)):
                log.warning(
                    "broker_connect_failed_oddly",
                    connection=self.name,
                    node=self.node,
                    error=repr(exc),
                    exc_info=True,
                )
            raise AttemptFailed(exc) from exc

    async def _connect_next(self) -> None:
        url = self._urls[self._next]
        self._next = (self._next + 1) % len(self._urls)
        self.node = node_name(url)
        connection = await aio_pika.connect(url, timeout=self._timeout)
        self._watch_blocking(connection)
        try:
            await self._on_connected(connection)
        except BaseException:
            self._mark_unblocked(connection, quiet=True)
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        connection.close_callbacks.add(self._lost)
        self.connection = connection
        self._up.set()
        log.info("broker_connected", connection=self.name, node=self.node)

    def _watch_blocking(self, connection: AbstractConnection) -> None:
        transport = connection.transport
        underlay = transport.connection if transport is not None else None
        on_blocked = getattr(underlay, _ON_BLOCKED, None)
        on_unblocked = getattr(underlay, _ON_UNBLOCKED, None)
        if on_blocked is None or on_unblocked is None:
            log.warning("broker_blocking_not_watched", connection=self.name, node=self.node)
            return

        async def blocked(frame: aiormq.spec.Connection.Blocked) -> None:
            await on_blocked(frame)
            self._mark_blocked(connection, str(frame.reason or "") or "no reason given")

        async def unblocked(frame: aiormq.spec.Connection.Unblocked) -> None:
            await on_unblocked(frame)
            self._mark_unblocked(connection)

        setattr(underlay, _ON_BLOCKED, blocked)
        setattr(underlay, _ON_UNBLOCKED, unblocked)

    def _mark_blocked(self, connection: object, reason: str) -> None:
        if self._closing:
            return
        self._blocked_by, self.blocked_reason = connection, reason
        self._blocked_at = time.monotonic()
        _BLOCKED_NOW.add(self)
        BROKER_BLOCKED.set(1)
        # RabbitMQ's reason names the alarm: "low on memory", "low on disk".
        log.warning("broker_blocked", connection=self.name, node=self.node, reason=reason)

    def _mark_unblocked(self, connection: object, *, quiet: bool = False) -> None:
        """The alarm cleared (`quiet`: the connection is gone, and with it its block; a
        new connection is blocked again at its first publish if the alarm holds)."""
        if self._blocked_by is not connection or self.blocked_reason is None:
            return
        if not quiet:
            log.info(
                "broker_unblocked",
                connection=self.name,
                node=self.node,
                blocked_seconds=round(time.monotonic() - self._blocked_at, 3),
            )
        self._blocked_by, self.blocked_reason = None, None
        _BLOCKED_NOW.discard(self)
        BROKER_BLOCKED.set(1 if _BLOCKED_NOW else 0)

    def _lost(self, connection: Any, exc: BaseException | None = None) -> None:
        self._mark_unblocked(connection, quiet=True)
        if self._closing:
            return
        self._up.clear()
        log.warning("broker_connection_lost", connection=self.name, node=self.node, error=repr(exc))
        if self._recover is None or self._recover.done():
            self._recover = asyncio.get_running_loop().create_task(
                self._reconnect(), name=f"amqp-reconnect-{self.name}"
            )

    async def _reconnect(self) -> None:
        delay = 0.05
        failed_in_row = 0
        while not self._closing:
            try:
                await self._attempt()
            except AttemptFailed as failed:
                failed_in_row += 1
                log.info(
                    "broker_reconnect_failed",
                    connection=self.name,
                    node=self.node,
                    error=repr(failed.cause),
                )
                # Try every node at once; back off only when a whole round failed.
                if failed_in_row % len(self._urls) == 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(random.uniform(delay / 2, delay)):
                            await self._wake.wait()
                    delay = min(delay * 2, self._max_backoff)
                continue
            for listener in self._reconnected:
                try:
                    listener()
                except Exception:
                    log.exception("reconnect_listener_failed", connection=self.name)
            return

    async def close(self) -> None:
        self._closing = True
        self._up.clear()
        if self._recover is not None:
            self._recover.cancel()
            await asyncio.gather(self._recover, return_exceptions=True)
        connection, self.connection = self.connection, None
        self._mark_unblocked(connection, quiet=True)
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
