"""Channels: one channel per target, cached stubs, options and targets as gRPC wants them.

grpc.aio's channel constructors are replaced by recorders: nothing connects.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from fairlane.client import ClientClosed, FairlaneError, SyncClient
from fairlane.client.channels import Channels, grpc_target
from fairlane.queue.v1 import queue_pb2_grpc


class Opened:
    """Records the channels Channels opens (instead of opening them)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.closed = 0
        monkeypatch.setattr(grpc.aio, "insecure_channel", self.insecure)
        monkeypatch.setattr(grpc.aio, "secure_channel", self.secure)

    def _channel(self) -> Any:
        opened = self

        class FakeChannel:
            def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
                return object()

            unary_stream = stream_unary = stream_stream = unary_unary

            async def close(self) -> None:
                opened.closed += 1

        return FakeChannel()

    def insecure(self, address: str, options: Any) -> Any:
        self.calls.append(("insecure", address, dict(options)))
        return self._channel()

    def secure(self, address: str, credentials: Any, options: Any) -> Any:
        self.calls.append(("secure", address, dict(options)))
        return self._channel()


async def test_services_on_one_target_share_a_channel_and_stubs_are_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened = Opened(monkeypatch)
    channels = Channels({"auth": "h:1", "queue": "h:2", "worker": "h:1"})
    assert channels.channel("auth") is channels.channel("worker")
    assert channels.channel("queue") is not channels.channel("auth")
    assert [address for _, address, _ in opened.calls] == ["h:1", "h:2"]
    stub = channels.queue()
    assert isinstance(stub, queue_pb2_grpc.QueueServiceStub)
    assert channels.queue() is stub
    assert not channels.tls

    await channels.close()
    assert opened.closed == 2
    with pytest.raises(ClientClosed, match="the client is closed"):
        channels.queue()


def test_a_closed_sync_client_says_so() -> None:
    client = SyncClient("auth:1", "queue:1")
    client.close()
    with pytest.raises(ClientClosed, match="the client is closed"):
        client.whoami()


def test_a_missing_target_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    Opened(monkeypatch)
    channels = Channels({"auth": "h:1", "queue": "h:2", "worker": None})
    with pytest.raises(FairlaneError, match="no worker target configured"):
        channels.worker()


def test_options_override_the_defaults_and_credentials_make_it_secure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened = Opened(monkeypatch)
    credentials = grpc.ssl_channel_credentials()
    channels = Channels(
        {"auth": "10.0.0.1:1,10.0.0.2:1", "queue": "q:2"},
        credentials=credentials,
        options=[("grpc.keepalive_time_ms", 5_000), ("grpc.primary_user_agent", "test")],
    )
    assert channels.tls
    channels.auth()
    kind, address, options = opened.calls[0]
    assert (kind, address) == ("secure", "ipv4:10.0.0.1:1,10.0.0.2:1")
    assert options["grpc.keepalive_time_ms"] == 5_000  # overridden
    assert options["grpc.primary_user_agent"] == "test"  # added
    assert options["grpc.max_receive_message_length"] == 8 * 1024 * 1024  # default kept
    # A server back after an outage is dialed again within seconds, not gRPC's 120 s.
    assert options["grpc.max_reconnect_backoff_ms"] == 5_000


def test_grpc_target_accepts_one_address_a_uri_or_a_list_of_ips() -> None:
    assert grpc_target("queue:50052") == "queue:50052"
    assert grpc_target("dns:///queue:50052") == "dns:///queue:50052"
    assert grpc_target("10.0.0.1:1, 10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert grpc_target("[::1]:1,[::2]:1") == "ipv6:[::1]:1,[::2]:1"
    with pytest.raises(FairlaneError, match="use one dns:///name:port target"):
        grpc_target("a:1,b:2")
