"""Checks on an enqueue before anything is stored; each failure is one clear message.

Everything the request log or the lane message could refuse later is refused here, as
the sender's own INVALID_ARGUMENT: a value that fails in a batched write would otherwise
fail (or split) the batch it shares with other users' requests.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fairlane.queue.v1 import queue_pb2
from fairlane_server.queue.accept_store import NewRequest
from fairlane_server.queue.catalog import HandlerCatalog

MAX_ATTEMPTS_LIMIT = 100
MAX_KEY_LENGTH = 200
MAX_HANDLER_LENGTH = 128
ECHO_LENGTH = 64  # names echoed back in errors are cut to this many characters


class InvalidEnqueue(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Limits:
    max_payload_bytes: int
    default_max_attempts: int
    # A deadline further ahead than this is refused: it is almost certainly a unit error,
    # and far-future instants (year 9999) overflow conversions downstream.
    max_deadline_seconds: float = 366 * 24 * 3600


def echo(text: str) -> str:
    """A client-supplied name, quoted and cut short, for an error message."""
    return repr(text[:ECHO_LENGTH] + ("..." if len(text) > ECHO_LENGTH else ""))


def _check_text(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidEnqueue(f"{name} is longer than {limit} characters")
    # PostgreSQL text cannot hold NUL; refusing it here keeps it out of shared batches.
    if "\x00" in value:
        raise InvalidEnqueue(f"{name} must not contain NUL characters")


def deadline_of(msg: queue_pb2.EnqueueRequest, now: datetime, limits: Limits) -> datetime | None:
    if not msg.HasField("deadline"):
        return None
    ts = msg.deadline
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidEnqueue("deadline.nanos must be in [0, 999999999]")
    try:
        deadline = ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise InvalidEnqueue("deadline is not a valid timestamp") from None
    if deadline <= now:
        raise InvalidEnqueue("deadline has already passed")
    if deadline - now > timedelta(seconds=limits.max_deadline_seconds):
        raise InvalidEnqueue(f"deadline is more than {_span(limits.max_deadline_seconds)} ahead")
    return deadline


def _span(seconds: float) -> str:
    """366 days, or 90 seconds for a limit that is not a whole number of days."""
    days, rest = divmod(seconds, 86400)
    return f"{int(days)} days" if days and not rest else f"{seconds:g} seconds"


async def build_request(
    msg: queue_pb2.EnqueueRequest,
    *,
    user_id: uuid.UUID,
    catalog: HandlerCatalog,
    limits: Limits,
    request_id: uuid.UUID,
    trace_id: str = "",
) -> NewRequest:
    if not msg.handler:
        raise InvalidEnqueue("handler is required")
    if len(msg.handler) > MAX_HANDLER_LENGTH or "\x00" in msg.handler:
        raise InvalidEnqueue(f"unknown handler {echo(msg.handler)}")
    _check_text("idempotency_key", msg.idempotency_key, MAX_KEY_LENGTH)
    _check_text("client_ref", msg.client_ref, MAX_KEY_LENGTH)
    if len(msg.payload) > limits.max_payload_bytes:
        raise InvalidEnqueue(
            f"payload is {len(msg.payload)} bytes; the limit is {limits.max_payload_bytes}"
        )
    if msg.max_attempts > MAX_ATTEMPTS_LIMIT:
        raise InvalidEnqueue(f"max_attempts must be at most {MAX_ATTEMPTS_LIMIT}")
    now = datetime.now(UTC)
    deadline = deadline_of(msg, now, limits)
    spec = await catalog.get(msg.handler)
    if spec is None:
        raise InvalidEnqueue(f"unknown handler {echo(msg.handler)}")
    return NewRequest(
        id=request_id,
        user_id=user_id,
        handler=msg.handler,
        payload=msg.payload,
        idempotency_key=msg.idempotency_key or None,
        client_ref=msg.client_ref,
        max_attempts=msg.max_attempts
        # A handler's own value, if it is one an enqueue could carry: a worker of a
        # release that did not check its handlers may have registered any number.
        or (spec.max_attempts if 1 <= spec.max_attempts <= MAX_ATTEMPTS_LIMIT else 0)
        or limits.default_max_attempts,
        deadline=deadline,
        trace_id=trace_id,
        enqueued_at=now,
    )
