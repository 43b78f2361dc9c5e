"""Channels: one grpc.aio channel per target, opened on first use, and typed stubs on them.

The transport half of the client (after httpx's transport): it knows where each service
is and how to reach it, and nothing about tokens, retries or the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import grpc

from fairlane.auth.v1 import auth_pb2_grpc
from fairlane.client._wire import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES
from fairlane.client.errors import ClientClosed, FairlaneError, cancelled_by_caller
from fairlane.queue.v1 import queue_pb2_grpc
from fairlane.worker.v1 import worker_pb2_grpc

if TYPE_CHECKING:
    from fairlane.auth.v1.auth_pb2_grpc import AuthServiceAsyncStub
    from fairlane.queue.v1.queue_pb2_grpc import QueueServiceAsyncStub
    from fairlane.worker.v1.worker_pb2_grpc import WorkerServiceAsyncStub

__all__ = ["CHANNEL_OPTIONS", "Channels", "ServiceName", "grpc_target"]

ServiceName = Literal["auth", "queue", "worker"]

_STUBS: dict[ServiceName, Any] = {
    "auth": auth_pb2_grpc.AuthServiceStub,
    "queue": queue_pb2_grpc.QueueServiceStub,
    "worker": worker_pb2_grpc.WorkerServiceStub,
}


class Channels:
    """Where the three services are (`targets`; None: not configured) and the channels
    to them.

    Services on the same target share one channel. With `credentials` the channels are
    secure (see `grpc.ssl_channel_credentials`); `options` are added to (and override)
    the client's defaults in CHANNEL_OPTIONS.
    """

    def __init__(
        self,
        targets: Mapping[ServiceName, str | None],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.targets: dict[ServiceName, str | None] = dict(targets)
        self._credentials = credentials
        self._options = list({**dict(CHANNEL_OPTIONS), **dict(options)}.items())
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[ServiceName, Any] = {}
        self._closed = False

    @property
    def tls(self) -> bool:
        return self._credentials is not None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def max_message_bytes(self) -> int:
        """The largest message a call may send: the channels' `grpc.max_send_message_length`
        (8 MiB unless the options change it), and never more than the servers' own 8 MiB
        receive limit. gRPC fails a larger message on the client side, and with it the
        whole call: a Session refuses such an enqueue itself instead."""
        limit = dict(self._options).get("grpc.max_send_message_length", -1)
        if not isinstance(limit, int) or limit < 0:  # unlimited on the client side
            return MAX_MESSAGE_BYTES
        return min(limit, MAX_MESSAGE_BYTES)

    @contextlib.contextmanager
    def interrupted_by_close(self) -> Iterator[None]:
        """Wraps awaiting a call: when the client closes, grpc.aio ends the calls on its
        channels with asyncio.CancelledError, which would tell the caller it was
        cancelled; it is raised as ClientClosed instead. The caller's own cancellation
        goes on as it is."""
        try:
            yield
        except asyncio.CancelledError:
            if cancelled_by_caller():
                raise
            raise self.interrupted() from None

    def interrupted(self) -> FairlaneError:
        """The error for a call that grpc.aio cancelled without the caller asking."""
        if self._closed:
            return ClientClosed()
        return FairlaneError("the call was cancelled on the client side", code="CANCELLED")

    def channel(self, service: ServiceName) -> grpc.aio.Channel:
        """The channel to `service`, opened now if it is the first use of its target."""
        target = self.targets.get(service)
        if not target:
            raise FairlaneError(f"no {service} target configured")
        if self._closed:
            raise ClientClosed()
        channel = self._channels.get(target)
        if channel is None:
            address = grpc_target(target)
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, self._options)
            else:
                channel = grpc.aio.insecure_channel(address, self._options)
            self._channels[target] = channel
        return channel

    def _stub(self, service: ServiceName) -> Any:
        stub = self._stubs.get(service)
        if stub is None:
            stub = self._stubs[service] = _STUBS[service](self.channel(service))
        return stub

    def auth(self) -> AuthServiceAsyncStub:
        return cast("AuthServiceAsyncStub", self._stub("auth"))

    def queue(self) -> QueueServiceAsyncStub:
        return cast("QueueServiceAsyncStub", self._stub("queue"))

    def worker(self) -> WorkerServiceAsyncStub:
        return cast("WorkerServiceAsyncStub", self._stub("worker"))

    async def close(self) -> None:
        """Closes every channel; calls in progress end (ClientClosed), new ones are
        refused."""
        self._closed = True
        channels, self._channels = list(self._channels.values()), {}
        self._stubs.clear()
        for channel in channels:
            await channel.close()


def grpc_target(target: str) -> str:
    """A gRPC target for `target`: one address, a gRPC URI (e.g. `dns:///queue:50052`, whose
    every address is used), or a comma-separated list of IP:port addresses, spread
    round-robin by the channel (see ROUND_ROBIN in the channel options)."""
    if "," not in target:
        return target
    addresses = [a.strip() for a in target.split(",") if a.strip()]
    for address in addresses:
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise FairlaneError(
                f"{address!r}: a list of targets must be IP:port addresses; for host names "
                "use one dns:///name:port target"
            ) from None
    scheme = "ipv6" if any(a.startswith("[") for a in addresses) else "ipv4"
    return f"{scheme}:{','.join(addresses)}"
