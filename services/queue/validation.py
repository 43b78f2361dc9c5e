"""Checks on an enqueue before anything is stored; each failure is one clear message."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from fairlane.queue.v1 import queue_pb2
from services.queue.catalog import HandlerCatalog
from services.queue.store import NewRequest

MAX_ATTEMPTS_LIMIT = 100
MAX_KEY_LENGTH = 200


class InvalidEnqueue(Exception):
    pass


async def build_request(
    msg: queue_pb2.EnqueueRequest,
    *,
    user_id: uuid.UUID,
    catalog: HandlerCatalog,
    max_payload_bytes: int,
    default_max_attempts: int,
    request_id: uuid.UUID,
    trace_id: str = "",
) -> NewRequest:
    if not msg.handler:
        raise InvalidEnqueue("handler is required")
    spec = await catalog.get(msg.handler)
    if spec is None:
        raise InvalidEnqueue(f"unknown handler {msg.handler!r}")
    if len(msg.payload) > max_payload_bytes:
        raise InvalidEnqueue(
            f"payload is {len(msg.payload)} bytes; the limit is {max_payload_bytes}"
        )
    if len(msg.idempotency_key) > MAX_KEY_LENGTH:
        raise InvalidEnqueue(f"idempotency_key is longer than {MAX_KEY_LENGTH} characters")
    if len(msg.client_ref) > MAX_KEY_LENGTH:
        raise InvalidEnqueue(f"client_ref is longer than {MAX_KEY_LENGTH} characters")
    if msg.max_attempts > MAX_ATTEMPTS_LIMIT:
        raise InvalidEnqueue(f"max_attempts must be at most {MAX_ATTEMPTS_LIMIT}")
    now = datetime.now(UTC)
    deadline = None
    if msg.HasField("deadline"):
        deadline = msg.deadline.ToDatetime(tzinfo=UTC)
        if deadline <= now:
            raise InvalidEnqueue("deadline has already passed")
    return NewRequest(
        id=request_id,
        user_id=user_id,
        handler=msg.handler,
        payload=msg.payload,
        idempotency_key=msg.idempotency_key or None,
        client_ref=msg.client_ref,
        max_attempts=msg.max_attempts or spec.max_attempts or default_max_attempts,
        deadline=deadline,
        trace_id=trace_id,
        enqueued_at=now,
    )
