"""gRPC surface of QueueService."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core import authz, status
from fairlane_server.core.broker import BrokerError, lane_queue
from fairlane_server.core.grpc_host import MAX_MESSAGE_BYTES, ServicerContext, abort
from fairlane_server.core.metrics import OPEN_SESSIONS
from fairlane_server.core.rich_status import abort_retry
from fairlane_server.core.settings import Settings
from fairlane_server.core.tokens import InvalidToken, Principal, TokenVerifier
from fairlane_server.queue.convert import request_from_row, timestamp
from fairlane_server.queue.domain import LogUnavailable, QueueDomain, StreamSlot, TooManyStreams
from fairlane_server.queue.intake import Rejection
from fairlane_server.queue.session import SessionStream, StreamError, rejection_code
from fairlane_server.queue.validation import MAX_ATTEMPTS_LIMIT, InvalidEnqueue
from fairlane_server.queue.watch import watch_results

MAX_LANE_SEQ = 2**63 - 1  # lane_seq is a BIGINT in the log


@dataclass(frozen=True, slots=True)
class PageSize:
    """A list RPC's page size: `default` for a page_size of 0, larger ones cut to `maximum`.
    Constants, not settings: queue.proto promises these numbers to every client."""

    default: int
    maximum: int

    def of(self, requested: int) -> int:
        return min(requested or self.default, self.maximum)


REQUESTS_PAGE = PageSize(default=50, maximum=500)  # ListRequests, ListDeadRequests
LANES_PAGE = PageSize(default=1000, maximum=10_000)  # ListLanes
# A page of requests with their payloads (ListDeadRequests) ends early, its token set, once
# it holds this many bytes: 500 payloads of 1 MiB would not fit in gRPC's 8 MiB message.
PAGE_BYTES = MAX_MESSAGE_BYTES // 2
# The idempotency key a replay is enqueued with, followed by the dead request's id.
REPLAY_KEY_PREFIX = "fairlane.replay:"


def _decode_token(token: str) -> uuid.UUID | None:
    if not token:
        return None
    return uuid.UUID(bytes=base64.urlsafe_b64decode(token.encode()))


async def _page_token(token: str, context: ServicerContext) -> uuid.UUID | None:
    """The position a page token stands for; INVALID_ARGUMENT for a malformed one."""
    try:
        return _decode_token(token)
    except ValueError:
        await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token")


def _encode_token(value: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(value.bytes).decode()


class QueueServicer(queue_pb2_grpc.QueueServiceServicer):
    def __init__(
        self,
        *,
        settings: Settings,
        verifier: TokenVerifier,
        domain: QueueDomain,
    ) -> None:
        self._settings = settings
        self._verifier = verifier
        self._d = domain
        self._store = domain.store

    # -- helpers -------------------------------------------------------------------------

    async def _request_id(self, text: str, context: ServicerContext) -> uuid.UUID:
        try:
            return uuid.UUID(text)
        except ValueError:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id is not a valid id")

    async def _own_request(self, principal: Principal, text: str, context: ServicerContext) -> Any:
        """The caller's request of that id; NOT_FOUND whether it is another user's or none."""
        row = await self._store.get(
            uuid.UUID(principal.user_id), await self._request_id(text, context)
        )
        if row is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such request")
        return row

    async def _request_page(
        self,
        principal: Principal,
        page_size: int,
        page_token: str,
        context: ServicerContext,
        *,
        status_name: str | None,
        with_bodies: bool = False,
    ) -> tuple[list[common_pb2.Request], str]:
        """One page of the caller's requests, newest first, and the token of the next."""
        limit = REQUESTS_PAGE.of(page_size)
        before = await _page_token(page_token, context)
        user = uuid.UUID(principal.user_id)
        if with_bodies:
            rows, more = await self._store.list_requests_with_bodies(
                user, status_name=status_name, limit=limit, before=before, max_bytes=PAGE_BYTES
            )
        else:
            rows = await self._store.list_requests(
                user, status_name=status_name, limit=limit, before=before
            )
            more = len(rows) == limit
        page: list[common_pb2.Request] = []
        size = 0
        for row in rows:
            item = request_from_row(row)
            size += item.ByteSize() + 6  # and the field's tag and length
            if page and size > PAGE_BYTES:
                return page, _encode_token(rows[len(page) - 1].id)
            page.append(item)
        token = _encode_token(rows[-1].id) if rows and more else ""
        return page, token

    # -- enqueue paths ---------------------------------------------------------------------

    async def Enqueue(
        self, request: queue_pb2.EnqueueRequest, context: ServicerContext
    ) -> queue_pb2.EnqueueResponse:
        principal = authz.principal()
        try:
            _, future = await self._d.admit(request, principal)
        except InvalidEnqueue as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            # Shielded: a caller that goes away must not cancel what the intake resolves.
            admitted = await asyncio.shield(future)
        except Rejection as rej:
            await abort_retry(context, rejection_code(rej), str(rej), rej.retry_after_ms)
        return queue_pb2.EnqueueResponse(
            request_id=str(admitted.request_id), duplicate=admitted.duplicate
        )

    async def Session(
        self, request_iterator: AsyncIterator[queue_pb2.SessionRequest], context: ServicerContext
    ) -> AsyncIterator[queue_pb2.SessionResponse]:
        principal = authz.principal()
        slot = await self._stream_slot(principal, context)
        with slot:
            # Tell the client at once that the stream is accepted: a client that waits for
            # this before writing never writes into a stream the server already refused
            # (grpc would then report INTERNAL instead of the refusal's status).
            await context.send_initial_metadata(())
            session = SessionStream(self._d, principal, request_iterator, self._verifier)
            OPEN_SESSIONS.inc()
            try:
                async for response in session.run():
                    yield response
            except StreamError as exc:
                await abort(context, exc.code, str(exc))
            finally:
                OPEN_SESSIONS.dec()

    async def _stream_slot(self, principal: Principal, context: ServicerContext) -> StreamSlot:
        """One of the user's open-stream slots; RESOURCE_EXHAUSTED when all are taken."""
        try:
            return self._d.stream_slot(principal.user_id)
        except TooManyStreams as exc:
            await abort_retry(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                str(exc),
                self._settings.retry_after_ms,
            )

    # -- reading results -------------------------------------------------------------------

    async def WatchResults(
        self, request: queue_pb2.WatchResultsRequest, context: ServicerContext
    ) -> AsyncIterator[queue_pb2.WatchResultsResponse]:
        principal = authz.principal()
        if request.after_lane_seq > MAX_LANE_SEQ:
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"after_lane_seq must be at most {MAX_LANE_SEQ}",
            )
        slot = await self._stream_slot(principal, context)
        with slot:
            await context.send_initial_metadata(())
            results = watch_results(
                self._d,
                principal.user_id,
                request.after_lane_seq,
                token=self._verifier,
                principal=principal,
            )
            try:
                async for result in results:
                    yield queue_pb2.WatchResultsResponse(result=result)
            except InvalidToken as exc:  # the login was revoked while open
                await abort(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))

    async def GetRequest(
        self, request: queue_pb2.GetRequestRequest, context: ServicerContext
    ) -> queue_pb2.GetRequestResponse:
        row = await self._own_request(authz.principal(), request.request_id, context)
        return queue_pb2.GetRequestResponse(request=request_from_row(row))

    async def ListRequests(
        self, request: queue_pb2.ListRequestsRequest, context: ServicerContext
    ) -> queue_pb2.ListRequestsResponse:
        status_name = None
        if request.HasField("status"):
            # Explicit presence: a set but unknown or UNSPECIFIED status (a misspelt enum
            # name encodes as 0 in many clients) must not silently list every status.
            status_name = status.from_proto(request.status)
            if status_name is None:
                await abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"status {request.status} is not a request status; leave it unset for all",
                )
        page, token = await self._request_page(
            authz.principal(),
            request.page_size,
            request.page_token,
            context,
            status_name=status_name,
        )
        return queue_pb2.ListRequestsResponse(requests=page, next_page_token=token)

    async def CancelRequest(
        self, request: queue_pb2.CancelRequestRequest, context: ServicerContext
    ) -> queue_pb2.CancelRequestResponse:
        principal = authz.principal()
        request_id = await self._request_id(request.request_id, context)
        try:
            after = await self._d.cancel(uuid.UUID(principal.user_id), request_id)
        except BrokerError:
            await abort_retry(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "cannot reach the workers now",
                self._settings.retry_after_ms,
            )
        except LogUnavailable:
            await abort_retry(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the request log is unavailable; retry the cancel",
                self._settings.retry_after_ms,
            )
        if after is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such request")
        return queue_pb2.CancelRequestResponse(status=status.to_proto(after))

    # -- lanes -----------------------------------------------------------------------------

    async def GetLane(
        self, request: queue_pb2.GetLaneRequest, context: ServicerContext
    ) -> queue_pb2.GetLaneResponse:
        principal = authz.principal()
        found = await self._store.lane(uuid.UUID(principal.user_id))
        if found is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no lane yet: enqueue a request first")
        row, pending = found
        return queue_pb2.GetLaneResponse(lane=_lane(row, pending))

    async def ListLanes(
        self, request: queue_pb2.ListLanesRequest, context: ServicerContext
    ) -> queue_pb2.ListLanesResponse:
        limit = LANES_PAGE.of(request.page_size)
        after = await _page_token(request.page_token, context)
        rows = await self._store.lanes(
            after=after, limit=limit, idle_seconds=self._settings.lane_idle_ttl_seconds
        )
        token = _encode_token(rows[-1].user_id) if len(rows) == limit else ""
        return queue_pb2.ListLanesResponse(lanes=[_lane(r, 0) for r in rows], next_page_token=token)

    async def ListDeadRequests(
        self, request: queue_pb2.ListDeadRequestsRequest, context: ServicerContext
    ) -> queue_pb2.ListDeadRequestsResponse:
        page, token = await self._request_page(
            authz.principal(),
            request.page_size,
            request.page_token,
            context,
            status_name=status.DEAD,
            with_bodies=True,
        )
        return queue_pb2.ListDeadRequestsResponse(requests=page, next_page_token=token)

    async def ReplayDeadRequest(
        self, request: queue_pb2.ReplayDeadRequestRequest, context: ServicerContext
    ) -> queue_pb2.ReplayDeadRequestResponse:
        principal = authz.principal()
        if request.max_attempts > MAX_ATTEMPTS_LIMIT:
            # The request itself is checked before anything is looked up.
            await abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"max_attempts must be at most {MAX_ATTEMPTS_LIMIT}",
            )
        row = await self._own_request(principal, request.request_id, context)
        if row.status != status.DEAD:
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"request is {row.status}, not DEAD"
            )
        replay = queue_pb2.EnqueueRequest(
            handler=row.handler,
            payload=row.payload,
            max_attempts=request.max_attempts or row.max_attempts,
            client_ref=row.client_ref,
            # A key of the dead request's own makes a replay idempotent: a caller who
            # retries the call (its answer lost) gets the first replay, not a second run.
            idempotency_key=f"{REPLAY_KEY_PREFIX}{row.id}",
        )
        try:
            _, future = await self._d.admit(replay, principal)
            admitted = await asyncio.shield(future)
        except InvalidEnqueue as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Rejection as rej:
            await abort_retry(context, rejection_code(rej), str(rej), rej.retry_after_ms)
        return queue_pb2.ReplayDeadRequestResponse(request_id=str(admitted.request_id))


def _lane(row: Any, pending: int) -> queue_pb2.Lane:
    return queue_pb2.Lane(
        user_id=str(row.user_id),
        queue_name=lane_queue(str(row.user_id)),
        created_at=timestamp(row.created_at),
        last_active_at=timestamp(row.last_active_at),
        last_lane_seq=row.last_seq,
        pending=pending,
        paused_at=timestamp(row.paused_at),
    )
