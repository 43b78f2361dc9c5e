"""The client's exceptions: one small hierarchy instead of raw grpc.aio.AioRpcError."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

if TYPE_CHECKING:
    from fairlane.client.types import Result

__all__ = [
    "AlreadyExists",
    "ClientClosed",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FairlaneError",
    "InvalidArgument",
    "NotFound",
    "NotLoggedIn",
    "PermissionDenied",
    "Rejected",
    "RequestFailed",
    "ResourceExhausted",
    "SessionClosed",
    "Unauthenticated",
    "Unavailable",
    "cancelled_by_caller",
    "code_name",
    "error_from_rpc",
    "retry_delay_ms",
]

_CODES_BY_NUMBER: dict[int, Any] = {code.value[0]: code for code in grpc.StatusCode}


def code_name(code: int | Any) -> str:
    """'INVALID_ARGUMENT' for 3 or grpc.StatusCode.INVALID_ARGUMENT."""
    if isinstance(code, int):
        found = _CODES_BY_NUMBER.get(code)
        return str(found.name) if found is not None else str(code)
    return str(code.name)


class FairlaneError(Exception):
    """Base of every error the client raises.

    `code` is the gRPC status code name ('NOT_FOUND', ...) or '' for client-side errors;
    `retry_after_ms` is the server's RetryInfo delay when it sent one, else 0.
    """

    code: str = ""

    def __init__(self, message: str, *, code: str | None = None, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after_ms = retry_after_ms

    def __str__(self) -> str:
        return self.message


class Unauthenticated(FairlaneError):
    """Bad credentials, or a token that is missing, expired or revoked."""

    code = "UNAUTHENTICATED"


class NotLoggedIn(Unauthenticated):
    """A call needs an access token and the client has none (call login first)."""


class PermissionDenied(FairlaneError):
    code = "PERMISSION_DENIED"


class NotFound(FairlaneError):
    code = "NOT_FOUND"


class AlreadyExists(FairlaneError):
    code = "ALREADY_EXISTS"


class InvalidArgument(FairlaneError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(FairlaneError):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(FairlaneError):
    """Slow down: the lane is full, or the caller is over its rate."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(FairlaneError):
    """The server is overloaded, a dependency is down, or it cannot be reached."""

    code = "UNAVAILABLE"


class DeadlineExceeded(FairlaneError):
    code = "DEADLINE_EXCEEDED"


class Rejected(FairlaneError):
    """A Session enqueue was not accepted; nothing was stored.

    `code` says why (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE, ...) and
    `retry_after_ms` how long to wait before sending it again when that makes sense.
    """

    def __init__(
        self, code: str, message: str, retry_after_ms: int = 0, client_ref: str = ""
    ) -> None:
        super().__init__(message, code=code, retry_after_ms=retry_after_ms)
        self.client_ref = client_ref

    def __str__(self) -> str:
        return f"rejected ({self.code}): {self.message}"


class SessionClosed(FairlaneError):
    """The Session stream ended before this request was answered or finished."""


class OutcomeUnknown(SessionClosed):
    """The server accepted this request (it is stored, and runs or ran), but the Session
    ended, for `reason`, before its result arrived and the results could not be collected
    from WatchResults either. Its result is in the log: read it with Client.get or
    Client.watch. Never resubmit it as if it had failed."""

    def __init__(self, request_id: str, reason: FairlaneError) -> None:
        super().__init__(
            f"request {request_id} was accepted (it is stored, and runs or ran), but the "
            f"session ended before its result: {reason.message}; read the result with "
            f"Client.get({request_id!r}) or Client.watch(after_lane_seq=...)",
            code=reason.code,
            retry_after_ms=reason.retry_after_ms,
        )
        self.request_id = request_id
        self.reason = reason


class ClientClosed(FairlaneError):
    """The client was closed (Client.close) while this call was in progress, or before
    it began."""

    def __init__(self, message: str = "the client is closed") -> None:
        super().__init__(message)


class RequestFailed(FairlaneError):
    """Raised by Result.raise_for_status for a request that did not succeed."""

    def __init__(self, result: Result) -> None:
        detail = f": {result.error}" if result.error else ""
        super().__init__(f"request {result.request_id} {result.status.name}{detail}")
        self.result = result


_BY_CODE: dict[str, type[FairlaneError]] = {
    cls.code: cls
    for cls in (
        Unauthenticated,
        PermissionDenied,
        NotFound,
        AlreadyExists,
        InvalidArgument,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
    )
}


def cancelled_by_caller() -> bool:
    """Whether the running task is being cancelled (someone called its cancel()).

    grpc.aio also raises asyncio.CancelledError from a call that was cancelled under the
    caller, when its channel is closed: that one is not the caller's and must not look
    like its cancellation."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def retry_delay_ms(error: grpc.aio.AioRpcError) -> int | None:
    """The google.rpc.RetryInfo delay the server attached to an error, if any."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that contradict the status line: ignore them
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            delay: int = info.retry_delay.seconds * 1000 + info.retry_delay.nanos // 1_000_000
            return delay
    return None


def error_from_rpc(error: grpc.aio.AioRpcError) -> FairlaneError:
    """The FairlaneError for a failed call, keeping the server's message and RetryInfo."""
    name = code_name(error.code())
    message = error.details() or name.replace("_", " ").lower()
    cls = _BY_CODE.get(name, FairlaneError)
    exc = cls(message, code=name, retry_after_ms=retry_delay_ms(error) or 0)
    exc.__cause__ = error
    return exc
