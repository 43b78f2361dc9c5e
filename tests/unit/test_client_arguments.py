"""A value the client cannot send is InvalidArgument (a FairlaneError), raised before any
call, never a bare ValueError or OverflowError from protobuf or datetime."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import pytest

from fairlane.client import Client, InvalidArgument
from fairlane.client.async_client import MAX_TIMEOUT
from fairlane.client.channels import Channels
from tests.unit.test_client_retry import _recording
from tests.unit.test_client_session import _client

BAD_ENQUEUES: list[dict[str, Any]] = [
    {"max_attempts": -1},
    {"max_attempts": 2**32},
    {"max_attempts": 1.5},
    {"deadline": float("nan")},
    {"deadline": float("inf")},
    {"deadline": -float("inf")},
    {"deadline": 1e12},  # past the year 9999
    {"deadline": -1e12},
    {"deadline": timedelta(days=4_000_000)},
]


def _ids(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v!r}" for k, v in options.items())


@pytest.mark.parametrize("options", BAD_ENQUEUES, ids=_ids)
async def test_bad_enqueue_values_are_invalid_argument(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    client, queue, _ = _client(monkeypatch)
    name = next(iter(options))
    with pytest.raises(InvalidArgument, match=name):
        await client.enqueue("echo", b"x", **options)
    assert queue.enqueued == []
    async with client.session() as session:
        with pytest.raises(InvalidArgument, match=name):
            await session.submit("echo", b"x", **options)
        assert session.in_flight == 0  # nothing was queued for the stream
        await session.close()
        queue.calls[0].end()


async def test_bad_listing_and_watching_values_are_invalid_argument(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, _, _ = _client(monkeypatch)
    with pytest.raises(InvalidArgument, match="unknown status 'bogus'"):
        await anext(client.requests(status="bogus"))
    with pytest.raises(InvalidArgument, match="page_size"):
        await anext(client.requests(page_size=-1))
    # Raised by the call itself, not later by the first result.
    for after in (-1, 2**64):
        with pytest.raises(InvalidArgument, match="after_lane_seq"):
            client.watch(after_lane_seq=after)
    with pytest.raises(InvalidArgument, match="max_in_flight"):
        client.session(max_in_flight=0)
    with pytest.raises(InvalidArgument, match="go together"):
        Client("auth:1", "queue:1", client_cert=b"cert")


def test_the_message_limit_is_the_channels_and_never_over_the_servers() -> None:
    eight = 8 * 1024 * 1024
    assert Channels({}).max_message_bytes == eight
    lower = [("grpc.max_send_message_length", 1000)]
    assert Channels({}, options=lower).max_message_bytes == 1000
    higher = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    assert Channels({}, options=higher).max_message_bytes == eight
    unlimited = [("grpc.max_send_message_length", -1)]
    assert Channels({}, options=unlimited).max_message_bytes == eight


@pytest.mark.parametrize("timeout", [math.nan, -1, 0, -math.inf, "10"], ids=repr)
async def test_a_timeout_not_more_than_0_is_invalid_argument(
    monkeypatch: pytest.MonkeyPatch, timeout: Any
) -> None:
    """gRPC would fail the call at once as DEADLINE_EXCEEDED (nan and 0 or less)."""
    with pytest.raises(InvalidArgument, match="timeout must be"):
        Client("auth:1", "queue:1", timeout=timeout)
    client, queue, _ = _client(monkeypatch)
    with pytest.raises(InvalidArgument, match="timeout must be"):
        await client.enqueue("echo", b"x", timeout=timeout)
    assert queue.enqueued == []
    with pytest.raises(InvalidArgument, match="timeout must be"):
        client.session(timeout=timeout)
    assert queue.calls == []


async def test_an_infinite_timeout_is_none_and_a_huge_one_the_longest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gRPC fails a call at once (DEADLINE_EXCEEDED) for a deadline past the year 2262."""
    client, queue, _ = _client(monkeypatch, timeout=math.inf)
    assert client.timeout is None
    method, calls = _recording(["one", "two", "three"])
    await client._unary("queue", method, object())
    await client._unary("queue", method, object(), timeout=1e12)
    client.timeout = 1e20
    await client._unary("queue", method, object())
    assert [timeout for _, timeout in calls] == [None, MAX_TIMEOUT, MAX_TIMEOUT]
    for timeout in (math.inf, 1e12):
        async with client.session(timeout=timeout) as session:
            await session.close()
            queue.calls[-1].end()
    assert queue.timeouts[0] is None
    assert queue.timeouts[1] is not None
    assert MAX_TIMEOUT - 60 < queue.timeouts[1] <= MAX_TIMEOUT
