"""Channel options and request building shared by the client modules."""

from __future__ import annotations

import json
import math
import numbers
import operator
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import timestamp_pb2

from fairlane.client.errors import InvalidArgument
from fairlane.queue.v1 import queue_pb2

# The servers' own message limit (services/core/grpc_host.py), repeated here so the client
# depends on no server code. The services dial each other with these options too.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Ping long-lived streams (Session, WatchResults) so a half-open connection is noticed.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Reconnect soon after a server comes back. gRPC's defaults (1 s, growing 1.6 times
    # per failed attempt up to 120 s) leave a client, or a service dialing auth while both
    # start, waiting long after the server is up: a suite starting took 5 s where its
    # servers were ready in 3. Up to 5 s between attempts (gRPC adds 20 % jitter), a
    # refused connect to a down server costs it little.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
    # With several addresses behind a target (a list, or DNS with many records), spread
    # calls over all of them instead of gRPC's default of sticking to the first.
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
]

Metadata = tuple[tuple[str, str], ...]

Deadline = datetime | timedelta | float | int | None
"""An absolute time (timezone-aware, or naive meaning UTC), a timedelta from now, or
seconds from now."""

Payload = bytes | bytearray | memoryview | str
"""Handler input; a str is sent UTF-8 encoded."""


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def field_size(size: int) -> int:
    """Bytes that a message of `size` bytes takes as a field of another (a tag of one
    byte, the length as a varint, then the message): SessionRequest(enqueue=r) is
    field_size(r.ByteSize()) bytes."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def unsigned(name: str, value: int, high: int) -> int:
    """`value` for an unsigned protobuf field, or InvalidArgument (protobuf itself raises
    a bare ValueError)."""
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidArgument(f"{name} must be a whole number, not {value!r}") from None
    if not 0 <= number <= high:
        raise InvalidArgument(f"{name} must be from 0 to {high}, not {number}")
    return number


def deadline_timestamp(deadline: Deadline) -> timestamp_pb2.Timestamp | None:
    if deadline is None:
        return None
    if not isinstance(deadline, datetime | timedelta) and (
        not isinstance(deadline, numbers.Real) or not math.isfinite(deadline)
    ):
        raise InvalidArgument(
            "deadline must be a datetime, a timedelta or a finite number of seconds, "
            f"not {deadline!r}"
        )
    try:
        if isinstance(deadline, datetime):
            when = deadline if deadline.tzinfo is not None else deadline.replace(tzinfo=UTC)
        elif isinstance(deadline, timedelta):
            when = datetime.now(UTC) + deadline
        else:
            when = datetime.now(UTC) + timedelta(seconds=float(deadline))
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(when.astimezone(UTC))
    except (OverflowError, ValueError):  # past the year 9999 (or before 1)
        raise InvalidArgument(
            f"deadline {deadline!r} is out of range (it must fall in the years 1 to 9999)"
        ) from None
    return ts


def payload_bytes(payload: Payload) -> bytes:
    return payload.encode() if isinstance(payload, str) else bytes(payload)


def new_idempotency_key() -> str:
    """A key no other request of the user has (122 random bits)."""
    return uuid.uuid4().hex


def enqueue_request(
    handler: str,
    payload: Payload,
    *,
    idempotency_key: str | None,
    deadline: Deadline,
    max_attempts: int,
    client_ref: str,
) -> queue_pb2.EnqueueRequest:
    """The EnqueueRequest to send. It always carries an idempotency key (a new one when
    the caller gave none): whoever sends it again, the client after a lost connection or
    the caller after an error, cannot make the request run twice. A value that cannot
    be sent raises InvalidArgument."""
    return queue_pb2.EnqueueRequest(
        handler=handler,
        payload=payload_bytes(payload),
        idempotency_key=idempotency_key or new_idempotency_key(),
        deadline=deadline_timestamp(deadline),
        max_attempts=unsigned("max_attempts", max_attempts, UINT32_MAX),
        client_ref=client_ref,
    )


def too_large(request: queue_pb2.EnqueueRequest, size: int, limit: int) -> str | None:
    """Why an enqueue of `size` serialized bytes cannot be sent under a message limit of
    `limit` bytes, or None when it can."""
    if size <= limit:
        return None
    mib = f" ({limit // 2**20} MiB)" if limit % 2**20 == 0 else ""
    return (
        f"the request is {size} bytes serialized (payload {len(request.payload)} bytes), "
        f"over the {limit}-byte gRPC message limit{mib}; it was not sent"
    )
