"""gRPC surface of QueueService."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uuid6
from google.rpc import code_pb2
from opentelemetry.trace import SpanKind

from fairlane.common.v1 import lane_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from services.core import authz, status, tracing
from services.core.broker import Broker, BrokerError, lane_queue
from services.core.grpc_host import ServicerContext, abort
from services.core.metrics import OPEN_SESSIONS
from services.core.rich_status import abort_retry
from services.core.settings import Settings
from services.core.tokens import Principal, TokenVerifier
from services.queue.admission import Admission
from services.queue.catalog import HandlerCatalog
from services.queue.convert import request_from_row, result_from_row, timestamp
from services.queue.hub import Hub
from services.queue.intake import Admission as Admitted
from services.queue.intake import Intake, Rejection, Submission
from services.queue.store import RequestStore
from services.queue.validation import InvalidEnqueue, build_request

Context = ServicerContext
_DONE = object()
WATCH_POLL_SECONDS = 0.25
MAX_BATCH = 512  # responses coalesced into one Session message


def rejection_code(rejection: Rejection) -> grpc.StatusCode:
    """Client's fault (slow down) vs server's trouble (try later)."""
    if rejection.reason in ("lane_full", "rate_limited"):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    return grpc.StatusCode.UNAVAILABLE


def _page_size(requested: int, default: int, maximum: int) -> int:
    return min(requested or default, maximum)


def _decode_token(token: str) -> uuid.UUID | None:
    if not token:
        return None
    return uuid.UUID(bytes=base64.urlsafe_b64decode(token.encode()))


async def _page_token(token: str, context: Context) -> uuid.UUID | None:
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
        store: RequestStore,
        intake: Intake,
        hub: Hub,
        catalog: HandlerCatalog,
        broker: Broker,
        admission: Admission,
    ) -> None:
        self._settings = settings
        self._verifier = verifier
        self._store = store
        self._intake = intake
        self._hub = hub
        self._catalog = catalog
        self._broker = broker
        self._admission = admission

    # -- helpers -------------------------------------------------------------------------

    async def _request_id(self, text: str, context: Context) -> uuid.UUID:
        try:
            return uuid.UUID(text)
        except ValueError:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, "request_id is not a valid id")

    async def _admit(
        self, msg: queue_pb2.EnqueueRequest, principal: Principal
    ) -> tuple[uuid.UUID, asyncio.Future[Admitted]]:
        request_id = uuid6.uuid7()
        # The request's own span: a child of the RPC's, ended once the request is durable.
        # Attributes are only built when tracing is on: this runs once per request.
        span = None
        if tracing.enabled():
            span = tracing.start(
                f"enqueue {msg.handler}",
                kind=SpanKind.PRODUCER,
                attributes={
                    "fairlane.request_id": str(request_id),
                    "fairlane.lane": principal.user_id,
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "publish",
                    "messaging.destination.name": lane_queue(principal.user_id),
                },
            )
        try:
            request = await build_request(
                msg,
                user_id=uuid.UUID(principal.user_id),
                catalog=self._catalog,
                max_payload_bytes=self._settings.max_payload_bytes,
                default_max_attempts=self._settings.default_max_attempts,
                request_id=request_id,
                trace_id=tracing.trace_id(span),
            )
        except InvalidEnqueue as exc:
            tracing.end(span, exc)
            raise
        sub = Submission(
            request=request,
            reply_route=self._settings.reply_route,
            traceparent=tracing.traceparent(span) if span else "",
            span=span,
        )
        if span is not None:
            sub.future.add_done_callback(lambda f: tracing.end(span, f.exception()))
        try:
            self._admission.check(principal.user_id, self._intake.pending)
        except Rejection as rejection:
            sub.future.set_exception(rejection)
            return request_id, sub.future
        return request_id, self._intake.submit(sub)

    # -- enqueue paths ---------------------------------------------------------------------

    async def Enqueue(
        self, request: queue_pb2.EnqueueRequest, context: Context
    ) -> queue_pb2.EnqueueResponse:
        principal = authz.principal()
        try:
            _, future = await self._admit(request, principal)
        except InvalidEnqueue as exc:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            admission = await future
        except Rejection as rej:
            await abort_retry(context, rejection_code(rej), str(rej), rej.retry_after_ms)
        return queue_pb2.EnqueueResponse(
            request_id=str(admission.request_id), duplicate=admission.duplicate
        )

    async def Session(
        self, request_iterator: AsyncIterator[queue_pb2.SessionRequest], context: Context
    ) -> AsyncIterator[queue_pb2.SessionResponse]:
        principal = authz.principal()
        # Tell the client at once that the stream is accepted: a client that waits for this
        # before writing never writes into a stream the server already refused (grpc would
        # then report INTERNAL instead of the refusal's status).
        await context.send_initial_metadata(())
        session = _Session(self, principal, request_iterator)
        OPEN_SESSIONS.inc()
        try:
            async for response in session.run():
                yield response
        finally:
            OPEN_SESSIONS.dec()

    # -- reading results -------------------------------------------------------------------

    async def WatchResults(
        self, request: queue_pb2.WatchResultsRequest, context: Context
    ) -> AsyncIterator[queue_pb2.WatchResultsResponse]:
        principal = authz.principal()
        await context.send_initial_metadata(())
        user = uuid.UUID(principal.user_id)
        # Subscribe before reading the log: a result committed after the read is then
        # certain to arrive live, and one seen twice is dropped by its lane_seq.
        events = self._hub.subscribe(principal.user_id)
        last = request.after_lane_seq
        try:
            async for missed in self._missed(user, last, None):
                yield missed
                last = missed.result.lane_seq
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), WATCH_POLL_SECONDS)
                except TimeoutError:
                    # Results of requests accepted on another replica are pushed to that
                    # replica; the log has them too, so a quiet watcher reads it.
                    async for missed in self._missed(user, last, None):
                        yield missed
                        last = missed.result.lane_seq
                    continue
                if event.WhichOneof("kind") != "result":
                    continue
                seq = event.result.lane_seq
                if seq <= last:
                    continue
                if seq > last + 1:
                    async for missed in self._missed(user, last, seq):
                        yield missed
                        last = missed.result.lane_seq
                yield queue_pb2.WatchResultsResponse(result=event.result)
                last = seq
        finally:
            self._hub.unsubscribe(principal.user_id, events)

    async def _missed(
        self, user: uuid.UUID, after: int, upto: int | None
    ) -> AsyncIterator[queue_pb2.WatchResultsResponse]:
        """Stored results with after < lane_seq (< upto), in order, in pages."""
        while True:
            rows = await self._store.results_after(user, after, upto=upto)
            for row in rows:
                yield queue_pb2.WatchResultsResponse(result=result_from_row(row))
                after = row.lane_seq
            if len(rows) < 1000:
                return

    async def GetRequest(
        self, request: queue_pb2.GetRequestRequest, context: Context
    ) -> queue_pb2.GetRequestResponse:
        principal = authz.principal()
        request_id = await self._request_id(request.request_id, context)
        row = await self._store.get(uuid.UUID(principal.user_id), request_id)
        if row is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such request")
        return queue_pb2.GetRequestResponse(request=request_from_row(row))

    async def ListRequests(
        self, request: queue_pb2.ListRequestsRequest, context: Context
    ) -> queue_pb2.ListRequestsResponse:
        principal = authz.principal()
        limit = _page_size(request.page_size, 50, 500)
        before = await _page_token(request.page_token, context)
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
        rows = await self._store.list_requests(
            uuid.UUID(principal.user_id), status_name=status_name, limit=limit, before=before
        )
        token = _encode_token(rows[-1].id) if len(rows) == limit else ""
        return queue_pb2.ListRequestsResponse(
            requests=[request_from_row(r) for r in rows], next_page_token=token
        )

    async def CancelRequest(
        self, request: queue_pb2.CancelRequestRequest, context: Context
    ) -> queue_pb2.CancelRequestResponse:
        principal = authz.principal()
        request_id = await self._request_id(request.request_id, context)
        try:
            after = await self.cancel(uuid.UUID(principal.user_id), request_id)
        except BrokerError as exc:
            await abort_retry(
                context, grpc.StatusCode.UNAVAILABLE, f"cannot reach workers: {exc}", 1000
            )
        if after is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such request")
        return queue_pb2.CancelRequestResponse(status=status.to_proto(after))

    async def cancel(self, user: uuid.UUID, request_id: uuid.UUID) -> str | None:
        """Cancels a queued request in the log and asks workers to stop it if it runs."""
        after = await self._store.cancel_queued(user, request_id)
        if after in (status.CANCELLED, status.RUNNING):
            # The log may still say QUEUED for a handler that just started; the worker
            # running it (if any) stops it and records CANCELLED itself.
            try:
                await self._broker.publish_control(
                    lane_pb2.ControlEvent(cancel_request=str(request_id)).SerializeToString()
                )
            except BrokerError:
                if after == status.RUNNING:
                    raise
        return after

    # -- lanes -----------------------------------------------------------------------------

    async def GetLane(
        self, request: queue_pb2.GetLaneRequest, context: Context
    ) -> queue_pb2.GetLaneResponse:
        principal = authz.principal()
        found = await self._store.lane(uuid.UUID(principal.user_id))
        if found is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no lane yet: enqueue a request first")
        row, pending = found
        return queue_pb2.GetLaneResponse(lane=_lane(row, pending))

    async def ListLanes(
        self, request: queue_pb2.ListLanesRequest, context: Context
    ) -> queue_pb2.ListLanesResponse:
        limit = _page_size(request.page_size, 1000, 10_000)
        after = await _page_token(request.page_token, context)
        rows = await self._store.lanes(
            after=after, limit=limit, idle_seconds=self._settings.lane_idle_ttl_seconds
        )
        token = _encode_token(rows[-1].user_id) if len(rows) == limit else ""
        return queue_pb2.ListLanesResponse(lanes=[_lane(r, 0) for r in rows], next_page_token=token)

    async def ListDeadRequests(
        self, request: queue_pb2.ListDeadRequestsRequest, context: Context
    ) -> queue_pb2.ListDeadRequestsResponse:
        principal = authz.principal()
        limit = _page_size(request.page_size, 50, 500)
        before = await _page_token(request.page_token, context)
        rows = await self._store.list_requests(
            uuid.UUID(principal.user_id),
            status_name=status.DEAD,
            limit=limit,
            before=before,
            with_bodies=True,
        )
        token = _encode_token(rows[-1].id) if len(rows) == limit else ""
        return queue_pb2.ListDeadRequestsResponse(
            requests=[request_from_row(r) for r in rows], next_page_token=token
        )

    async def ReplayDeadRequest(
        self, request: queue_pb2.ReplayDeadRequestRequest, context: Context
    ) -> queue_pb2.ReplayDeadRequestResponse:
        principal = authz.principal()
        request_id = await self._request_id(request.request_id, context)
        row = await self._store.get(uuid.UUID(principal.user_id), request_id)
        if row is None:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no such request")
        if row.status != status.DEAD:
            await abort(
                context, grpc.StatusCode.FAILED_PRECONDITION, f"request is {row.status}, not DEAD"
            )
        replay = queue_pb2.EnqueueRequest(
            handler=row.handler,
            payload=row.payload,
            max_attempts=request.max_attempts or row.max_attempts,
            client_ref=row.client_ref,
        )
        try:
            _, future = await self._admit(replay, principal)
            admission = await future
        except InvalidEnqueue as exc:
            await abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except Rejection as rej:
            await abort_retry(context, rejection_code(rej), str(rej), rej.retry_after_ms)
        return queue_pb2.ReplayDeadRequestResponse(request_id=str(admission.request_id))


def _lane(row: Any, pending: int) -> queue_pb2.Lane:
    return queue_pb2.Lane(
        user_id=str(row.user_id),
        queue_name=lane_queue(str(row.user_id)),
        created_at=timestamp(row.created_at),
        last_active_at=timestamp(row.last_active_at),
        last_lane_seq=row.last_seq,
        pending=pending,
    )


class _Session:
    """One Session stream: reads enqueues, answers them in order, forwards results.

    Answers (accepted/rejected) go out in the order the enqueues came in. A result is
    never sent before the accepted of its request. The stream stops reading once
    `session_window` requests are unfinished, which lets HTTP/2 flow control push back
    on the client.
    """

    def __init__(
        self,
        servicer: QueueServicer,
        principal: Principal,
        request_iterator: AsyncIterator[queue_pb2.SessionRequest],
    ) -> None:
        self._s = servicer
        self._principal = principal
        self._requests = request_iterator
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._answers: asyncio.Queue[Any] = asyncio.Queue()
        self._window = asyncio.Semaphore(servicer._settings.session_window)
        # request id -> True once its accepted was sent; removed when its result is sent.
        self._mine: dict[str, bool] = {}
        self._stash: dict[str, list[lane_pb2.LaneEvent]] = {}
        self._reading = True
        self._batching = False  # set once the client sends an enqueue_batch

    async def run(self) -> AsyncIterator[queue_pb2.SessionResponse]:
        user = self._principal.user_id
        events = self._s._hub.subscribe(user)
        tasks = [
            asyncio.create_task(self._guard(self._read())),
            asyncio.create_task(self._guard(self._answer())),
            asyncio.create_task(self._guard(self._pump(events))),
        ]
        try:
            while True:
                item = await self._out.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                if not self._batching or self._out.empty():
                    yield item
                    continue
                # Coalesce what is ready into one message: one gRPC write instead of many.
                batch = [item]
                ended: Any = None
                while len(batch) < MAX_BATCH and not self._out.empty():
                    nxt = self._out.get_nowait()
                    if nxt is _DONE or isinstance(nxt, BaseException):
                        ended = nxt
                        break
                    batch.append(nxt)
                yield queue_pb2.SessionResponse(
                    batch=queue_pb2.SessionResponseBatch(responses=batch)
                )
                if ended is _DONE:
                    return
                if ended is not None:
                    raise ended
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._s._hub.unsubscribe(user, events)

    async def _guard(self, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._out.put_nowait(exc)

    def _reject(
        self,
        client_ref: str | None,
        code: grpc.StatusCode,
        message: str,
        retry: int = 0,
        *,
        cancel_request_id: str | None = None,
    ) -> None:
        """An enqueue's rejection names its client_ref, a cancel's its request id (the
        `subject` oneof); a message of no kind gets neither."""
        rejected = queue_pb2.Rejected(
            code=code_pb2.Code.ValueType(code.value[0]), message=message, retry_after_ms=retry
        )
        if client_ref is not None:
            rejected.client_ref = client_ref
        elif cancel_request_id is not None:
            rejected.cancel_request_id = cancel_request_id
        self._out.put_nowait(queue_pb2.SessionResponse(rejected=rejected))

    async def _enqueue(self, enqueue: queue_pb2.EnqueueRequest) -> None:
        await self._window.acquire()
        try:
            request_id, future = await self._s._admit(enqueue, self._principal)
        except InvalidEnqueue as exc:
            self._answers.put_nowait((enqueue.client_ref, None, str(exc)))
            return
        self._mine[str(request_id)] = False
        self._answers.put_nowait((enqueue.client_ref, future, str(request_id)))

    async def _read(self) -> None:
        async for msg in self._requests:
            kind = msg.WhichOneof("kind")
            if kind == "enqueue":
                await self._enqueue(msg.enqueue)
            elif kind == "enqueue_batch":
                self._batching = True
                for enqueue in msg.enqueue_batch.requests:
                    await self._enqueue(enqueue)
            elif kind == "cancel":
                await self._cancel(msg.cancel.request_id)
            else:
                self._reject(None, grpc.StatusCode.INVALID_ARGUMENT, "empty SessionRequest")
        self._answers.put_nowait(None)

    async def _cancel(self, request_id: str) -> None:
        try:
            rid = uuid.UUID(request_id)
        except ValueError:
            self._reject(
                None,
                grpc.StatusCode.INVALID_ARGUMENT,
                "invalid request_id",
                cancel_request_id=request_id,
            )
            return
        try:
            after = await self._s.cancel(uuid.UUID(self._principal.user_id), rid)
        except BrokerError as exc:
            self._reject(
                None,
                grpc.StatusCode.UNAVAILABLE,
                f"cannot cancel now: {exc}",
                1000,
                cancel_request_id=request_id,
            )
            return
        if after is None:
            self._reject(
                None, grpc.StatusCode.NOT_FOUND, "no such request", cancel_request_id=request_id
            )

    async def _answer(self) -> None:
        while (item := await self._answers.get()) is not None:
            client_ref, future, detail = item
            if future is None:
                self._window.release()
                self._reject(client_ref, grpc.StatusCode.INVALID_ARGUMENT, detail)
                continue
            try:
                admission: Admitted = await future
            except Rejection as rej:
                self._mine.pop(detail, None)
                self._stash.pop(detail, None)
                self._window.release()
                self._reject(client_ref, rejection_code(rej), str(rej), rej.retry_after_ms)
                continue
            rid = str(admission.request_id)
            if admission.duplicate:
                self._mine.pop(detail, None)
            self._mine[rid] = True
            self._out.put_nowait(
                queue_pb2.SessionResponse(
                    accepted=queue_pb2.Accepted(
                        client_ref=client_ref, request_id=rid, duplicate=admission.duplicate
                    )
                )
            )
            for event in self._stash.pop(rid, []):
                self._deliver(event)
            if admission.duplicate:
                await self._send_stored_result(admission.request_id)
        self._reading = False
        self._maybe_done()

    async def _send_stored_result(self, request_id: uuid.UUID) -> None:
        row = await self._s._store.get(uuid.UUID(self._principal.user_id), request_id)
        rid = str(request_id)
        if row is not None and row.lane_seq and self._mine.get(rid):
            self._deliver(lane_pb2.LaneEvent(result=result_from_row(row)))

    async def _pump(self, events: asyncio.Queue[lane_pb2.LaneEvent]) -> None:
        while True:
            event = await events.get()
            kind = event.WhichOneof("kind")
            rid = event.result.request_id if kind == "result" else event.progress.request_id
            announced = self._mine.get(rid)
            if announced is None:
                continue
            if announced:
                self._deliver(event)
            else:
                self._stash.setdefault(rid, []).append(event)

    def _deliver(self, event: lane_pb2.LaneEvent) -> None:
        if event.WhichOneof("kind") == "progress":
            if event.progress.request_id in self._mine:
                self._out.put_nowait(queue_pb2.SessionResponse(progress=event.progress))
            return
        rid = event.result.request_id
        if self._mine.pop(rid, None) is None:
            return  # already delivered (a redelivered result)
        if event.traceparent:
            tracing.end(
                tracing.start(
                    "deliver result",
                    parent_traceparent=event.traceparent,
                    attributes={"fairlane.request_id": rid},
                )
            )
        self._window.release()
        self._out.put_nowait(queue_pb2.SessionResponse(result=event.result))
        self._maybe_done()

    def _maybe_done(self) -> None:
        if not self._reading and not self._mine:
            self._out.put_nowait(_DONE)
