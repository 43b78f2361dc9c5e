"""What a client sees when a call fails in a way the servicer did not answer itself.

One interceptor on every server:

- an exception a servicer lets escape becomes `INTERNAL "internal error (id <id>)"`; the
  id is in the log line that has the details (exception type, message, and the traceback
  once per method and exception type a minute). No SQL, class names, paths or tracebacks
  reach the client;
- a database pool that has no connection to give (SQLAlchemy's pool TimeoutError) becomes
  `UNAVAILABLE` with RetryInfo: the call may be retried, nothing is wrong with it;
- a message that cannot be decoded becomes `INVALID_ARGUMENT "malformed request
  message"`; the log says so once per peer host a minute (with the count held back), not
  once per call, and has no traceback;
- a call that ended under its handler (the client went away, or its deadline passed,
  before grpc cancelled the handler) ends as a cancelled call does: grpc could not send
  an answer, nobody is left to read one, and it is no server error.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import grpc
from sqlalchemy.exc import TimeoutError as PoolTimeout

from fairlane_server.core import dberrors
from fairlane_server.core.authz import peer
from fairlane_server.core.grpc_wrap import wrap
from fairlane_server.core.log_limit import LogLimiter, peer_host
from fairlane_server.core.logging import get_logger
from fairlane_server.core.rich_status import abort_retry

log = get_logger(__name__)

MALFORMED = "malformed request message"


class Malformed:
    """Stands for a request message that did not decode (grpc.aio would otherwise answer
    UNKNOWN with the exception's class and message, and log a traceback per call)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


class MalformedMessage(Exception):
    """Raised into a servicer reading a client stream when a message did not decode."""


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except Exception as exc:
            return Malformed(type(exc).__name__)

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            raise MalformedMessage(request.error)
        yield request


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, *, retry_after_ms: int = 1000, period: float = 60.0) -> None:
        self._retry_after_ms = retry_after_ms
        self._tracebacks = LogLimiter(period)
        self._malformed = LogLimiter(period)

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        streaming = bool(handler.request_streaming)

        @asynccontextmanager
        async def guarded(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await self._refuse_malformed(method, request.error, context)
            try:
                yield _checked(request) if streaming else request
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise  # the servicer answered (abort) or the call is already over
            except grpc.aio.InternalError as exc:
                if not context.done():
                    await self._internal(method, exc, context)
                # grpc could not send the answer: the call ended under the handler (its
                # client went away or its deadline passed) before grpc cancelled this task.
                # Nobody is left to answer, and aborting again fails ("Abort already
                # called!"): end as grpc ends a cancelled call, without an error report.
                log.debug("call_ended_under_handler", method=method, error=str(exc)[:200])
                raise asyncio.CancelledError from exc
            except MalformedMessage as exc:
                await self._refuse_malformed(method, str(exc), context)
            except PoolTimeout:
                log.warning("database_pool_exhausted", method=method)
                await abort_retry(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    "the database is busy, try again",
                    self._retry_after_ms,
                )
            except Exception as exc:
                if dberrors.is_transient(exc):
                    # A lost connection, a timeout, a deadlock: the call may pass if tried
                    # again, so it is not a bug (INTERNAL) but UNAVAILABLE with retry advice,
                    # whichever RPC met it.
                    log.warning(
                        "transient_error",
                        method=method,
                        error_type=type(exc).__name__,
                        # Which one (40P01 a deadlock, 40001 a serialization failure, 57P01
                        # a terminated connection, ...): what an operator needs to act on.
                        # Not the message: SQLAlchemy's carries the statement's parameters.
                        sqlstate=dberrors.sqlstate(exc),
                    )
                    await abort_retry(
                        context,
                        grpc.StatusCode.UNAVAILABLE,
                        "temporarily unavailable, try again",
                        self._retry_after_ms,
                    )
                await self._internal(method, exc, context)

        return wrap(handler, guarded, request_deserializer=_tolerant(handler.request_deserializer))

    async def _refuse_malformed(self, method: str, error: str, context: Any) -> NoReturn:
        address = peer(context)
        allowed, held_back = self._malformed.allow(peer_host(address))
        if allowed:
            log.warning(
                "malformed_message", method=method, peer=address, error=error, suppressed=held_back
            )
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        raise AssertionError("abort returned")  # pragma: no cover

    async def _internal(self, method: str, exc: Exception, context: Any) -> NoReturn:
        error_id = uuid.uuid4().hex[:16]
        kind = type(exc).__name__
        allowed, held_back = self._tracebacks.allow(f"{method} {type(exc).__qualname__}")
        fields: dict[str, Any] = {
            "error_id": error_id,
            "method": method,
            "error_type": kind,
            "error": str(exc)[:2000],
        }
        if allowed:
            log.error("internal_error", exc_info=exc, suppressed_tracebacks=held_back, **fields)
        else:
            log.error("internal_error", **fields)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error (id {error_id})")
        raise AssertionError("abort returned")  # pragma: no cover
