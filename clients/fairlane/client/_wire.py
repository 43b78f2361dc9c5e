"""Channel options and request building shared by the client modules."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import timestamp_pb2

from fairlane.queue.v1 import queue_pb2

# The servers' own message limit (services/core/grpc_host.py), repeated here so the client
# depends on no server code. The services dial each other with these options too.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024

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


def deadline_timestamp(deadline: Deadline) -> timestamp_pb2.Timestamp | None:
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        when = deadline if deadline.tzinfo is not None else deadline.replace(tzinfo=UTC)
    elif isinstance(deadline, timedelta):
        when = datetime.now(UTC) + deadline
    else:
        when = datetime.now(UTC) + timedelta(seconds=float(deadline))
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when.astimezone(UTC))
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
    the caller after an error, cannot make the request run twice."""
    return queue_pb2.EnqueueRequest(
        handler=handler,
        payload=payload_bytes(payload),
        idempotency_key=idempotency_key or new_idempotency_key(),
        deadline=deadline_timestamp(deadline),
        max_attempts=max_attempts,
        client_ref=client_ref,
    )
