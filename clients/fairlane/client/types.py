"""Plain, typed values the client returns instead of raw protobuf messages."""

from __future__ import annotations

import base64
import enum
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from fairlane.client.errors import RequestFailed, code_name
from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2
from fairlane.worker.v1 import worker_pb2

__all__ = [
    "Accepted",
    "Enqueued",
    "Event",
    "HandlerInfo",
    "HandlerStats",
    "Identity",
    "Lane",
    "Progress",
    "RejectedEvent",
    "Request",
    "Result",
    "Status",
    "Tokens",
    "WorkerState",
    "WorkerStatus",
]


class Status(enum.IntEnum):
    """Lifecycle state of a request (mirrors fairlane.common.v1.RequestStatus)."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    EXPIRED = 6
    DEAD = 7

    @property
    def final(self) -> bool:
        """True for a status a request never leaves."""
        return self not in (Status.UNSPECIFIED, Status.QUEUED, Status.RUNNING)

    @classmethod
    def parse(cls, value: Status | str | int) -> Status:
        """Accepts a Status, its number, or a name in any case ('succeeded', 'SUCCEEDED',
        'REQUEST_STATUS_SUCCEEDED')."""
        if isinstance(value, Status):
            return value
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper().removeprefix("REQUEST_STATUS_")
        try:
            return cls[name]
        except KeyError:
            names = ", ".join(s.name.lower() for s in cls if s is not Status.UNSPECIFIED)
            raise ValueError(f"unknown status {value!r} (one of: {names})") from None


class WorkerState(enum.IntEnum):
    """Run state of a worker replica (mirrors fairlane.worker.v1.WorkerState)."""

    UNSPECIFIED = 0
    RUNNING = 1
    PAUSED = 2
    DRAINING = 3
    DRAINED = 4


def _status(value: int) -> Status:
    try:
        return Status(value)
    except ValueError:
        return Status.UNSPECIFIED


def _worker_state(value: int) -> WorkerState:
    try:
        return WorkerState(value)
    except ValueError:
        return WorkerState.UNSPECIFIED


def _jwt_claims(token: str) -> dict[str, Any]:
    """A JWT's claims, read without verifying them (the server verifies)."""
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError, TypeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def _time(msg: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    return msg.ToDatetime(tzinfo=UTC) if present else None


@dataclass(frozen=True, slots=True)
class Tokens:
    """What a login gives: a short-lived access token and a rotating refresh token.

    `expires_at` is a wall-clock UNIX time so tokens can be cached across processes;
    `lifetime` is the access token's lifetime in seconds as the server announced it.
    """

    access_token: str
    refresh_token: str
    expires_at: float
    lifetime: float
    username: str = ""

    @classmethod
    def issued(
        cls, access_token: str, refresh_token: str, expires_in: int, username: str = ""
    ) -> Tokens:
        expires_at = time.time() + expires_in
        claims = _jwt_claims(access_token)
        exp = claims.get("exp")
        if isinstance(exp, int | float):
            # The server rounds `exp` down to whole seconds: trust the earlier of the two.
            expires_at = min(expires_at, float(exp))
        # Usernames are case-insensitive: the token names the user as registered, which
        # is what a login typed as "ALICE" should show.
        name = claims.get("name")
        return cls(
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at=expires_at,
            lifetime=float(expires_in),
            username=name if isinstance(name, str) and name else username,
        )

    def expires_within(self, seconds: float, now: float | None = None) -> bool:
        """True if the access token expires in less than `seconds` (or already has)."""
        return (now if now is not None else time.time()) >= self.expires_at - seconds


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an access token belongs to (AuthService.WhoAmI)."""

    user_id: str
    username: str


@dataclass(frozen=True, slots=True)
class Enqueued:
    """Answer to a unary enqueue: the request is durable and queued. `idempotency_key`
    is the key it was sent with (generated when the caller gave none)."""

    request_id: str
    duplicate: bool = False
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class Accepted:
    """Session event: an enqueue was accepted (durable in the broker and the log)."""

    client_ref: str
    request_id: str
    duplicate: bool = False

    @classmethod
    def from_proto(cls, msg: queue_pb2.Accepted) -> Accepted:
        return cls(client_ref=msg.client_ref, request_id=msg.request_id, duplicate=msg.duplicate)


@dataclass(frozen=True, slots=True)
class RejectedEvent:
    """Session event: an enqueue (or a cancel) was not accepted; nothing was stored.

    `code` is the gRPC status code name (e.g. 'INVALID_ARGUMENT', 'RESOURCE_EXHAUSTED').
    A refused cancel has `cancel_request_id` set (the id it named) and an empty client_ref.
    """

    client_ref: str
    code: str
    message: str
    retry_after_ms: int = 0
    cancel_request_id: str = ""

    @classmethod
    def from_proto(cls, msg: queue_pb2.Rejected) -> RejectedEvent:
        return cls(
            client_ref=msg.client_ref,
            code=code_name(msg.code),
            message=msg.message,
            retry_after_ms=msg.retry_after_ms,
            cancel_request_id=msg.cancel_request_id,
        )


@dataclass(frozen=True, slots=True)
class Progress:
    """Session event: a running handler reported progress."""

    request_id: str
    done: int
    total: int
    message: str = ""

    @classmethod
    def from_proto(cls, msg: common_pb2.Progress) -> Progress:
        return cls(request_id=msg.request_id, done=msg.done, total=msg.total, message=msg.message)


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one finished request."""

    request_id: str
    lane_seq: int
    status: Status
    output: bytes = b""
    error: str = ""
    attempts: int = 0
    client_ref: str = ""
    handler: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED

    def raise_for_status(self) -> Result:
        """Returns self if the request succeeded, else raises RequestFailed."""
        if not self.ok:
            raise RequestFailed(self)
        return self

    @classmethod
    def from_proto(cls, msg: common_pb2.Result) -> Result:
        return cls(
            request_id=msg.request_id,
            lane_seq=msg.lane_seq,
            status=_status(msg.status),
            output=msg.output,
            error=msg.error,
            attempts=msg.attempts,
            client_ref=msg.client_ref,
            handler=msg.handler,
        )


Event = Accepted | RejectedEvent | Progress | Result
"""What `Session.events()` yields."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request as stored in the request log."""

    request_id: str
    user_id: str
    handler: str
    status: Status
    payload: bytes = b""
    output: bytes = b""
    error: str = ""
    attempts: int = 0
    max_attempts: int = 0
    idempotency_key: str = ""
    client_ref: str = ""
    lane_seq: int = 0
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline: datetime | None = None
    trace_id: str = ""

    @classmethod
    def from_proto(cls, msg: common_pb2.Request) -> Request:
        return cls(
            request_id=msg.request_id,
            user_id=msg.user_id,
            handler=msg.handler,
            status=_status(msg.status),
            payload=msg.payload,
            output=msg.output,
            error=msg.error,
            attempts=msg.attempts,
            max_attempts=msg.max_attempts,
            idempotency_key=msg.idempotency_key,
            client_ref=msg.client_ref,
            lane_seq=msg.lane_seq,
            enqueued_at=_time(msg.enqueued_at, msg.HasField("enqueued_at")),
            started_at=_time(msg.started_at, msg.HasField("started_at")),
            finished_at=_time(msg.finished_at, msg.HasField("finished_at")),
            deadline=_time(msg.deadline, msg.HasField("deadline")),
            trace_id=msg.trace_id,
        )


@dataclass(frozen=True, slots=True)
class Lane:
    """A user's lane."""

    user_id: str
    queue_name: str
    created_at: datetime | None
    last_active_at: datetime | None
    last_lane_seq: int
    pending: int
    # When an operator paused the lane (no new request of it starts on any worker until
    # it is resumed), or None.
    paused_at: datetime | None = None

    @classmethod
    def from_proto(cls, msg: queue_pb2.Lane) -> Lane:
        return cls(
            user_id=msg.user_id,
            queue_name=msg.queue_name,
            created_at=_time(msg.created_at, msg.HasField("created_at")),
            last_active_at=_time(msg.last_active_at, msg.HasField("last_active_at")),
            last_lane_seq=msg.last_lane_seq,
            pending=msg.pending,
            paused_at=_time(msg.paused_at, msg.HasField("paused_at")),
        )


@dataclass(frozen=True, slots=True)
class HandlerStats:
    """Counters of one handler on one worker replica since it started."""

    name: str
    succeeded: int
    failed: int
    retried: int
    running: int


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """State of one worker replica (WorkerService.GetStatus)."""

    state: WorkerState
    worker_id: str
    lanes: list[str]
    in_flight: int
    concurrency: int
    handlers: list[HandlerStats] = field(default_factory=list)
    paused_lanes: list[str] = field(default_factory=list)

    @classmethod
    def from_proto(cls, msg: worker_pb2.GetStatusResponse) -> WorkerStatus:
        return cls(
            state=_worker_state(msg.state),
            worker_id=msg.worker_id,
            lanes=list(msg.lanes),
            in_flight=msg.in_flight,
            concurrency=msg.concurrency,
            handlers=[
                HandlerStats(
                    name=h.name,
                    succeeded=h.succeeded,
                    failed=h.failed,
                    retried=h.retried,
                    running=h.running,
                )
                for h in msg.handlers
            ],
            paused_lanes=list(msg.paused_lanes),
        )


@dataclass(frozen=True, slots=True)
class HandlerInfo:
    """A handler a worker replica can run."""

    name: str
    description: str
    max_attempts: int
    timeout_seconds: float
