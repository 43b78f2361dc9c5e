"""What the queue service does, whichever RPC asks: admit an enqueue, cancel a request,
read results from the log, and bound the streams each user may hold open.

The servicer (gRPC surface) and the Session stream both talk to this object and to
nothing else of the service's internals.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass

from opentelemetry.trace import SpanKind
from uuid_utils.compat import uuid7

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane.queue.v1 import queue_pb2
from fairlane_server.core import dberrors, status, tracing
from fairlane_server.core.broker import Broker, BrokerError, lane_queue
from fairlane_server.core.tasks import fail_quietly
from fairlane_server.core.tokens import Principal
from fairlane_server.queue.admission import Admission
from fairlane_server.queue.catalog import HandlerCatalog
from fairlane_server.queue.catch_up import CatchUpReader
from fairlane_server.queue.convert import result_from_row
from fairlane_server.queue.hub import Hub
from fairlane_server.queue.intake import Admitted, Intake, Rejection, Submission
from fairlane_server.queue.store import RequestStore, ResultPage
from fairlane_server.queue.validation import Limits, build_request


@dataclass(frozen=True, slots=True)
class StreamLimits:
    session_window: int
    max_batch_items: int
    max_streams_per_user: int
    results_page: int
    result_grace_seconds: float
    # Bytes of result outputs a Session holds before it holds results without them.
    session_buffer_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Withheld:
    """A finished result read from the log without its output, which did not fit in the
    read's bytes (RequestStore.read_bytes): read it again when it is wanted."""

    result: common_pb2.Result  # its request_id and lane_seq only
    size: int  # bytes of the output left out

    @property
    def request_id(self) -> str:
        return self.result.request_id


class LogUnavailable(Exception):
    """The request log could not be reached (a transient error): try again later."""


class TooManyStreams(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"you have {limit} streams open on this server; close one first")
        self.limit = limit


class QueueDomain:
    def __init__(
        self,
        *,
        store: RequestStore,
        intake: Intake,
        hub: Hub,
        catalog: HandlerCatalog,
        catch_up: CatchUpReader,
        broker: Broker,
        admission: Admission,
        limits: Limits,
        streams: StreamLimits,
        reply_route: str,
        retry_after_ms: int = 1000,
    ) -> None:
        self.store = store
        self.hub = hub
        self.streams = streams
        self._intake = intake
        self._catalog = catalog
        self._catch_up = catch_up
        self._broker = broker
        self._admission = admission
        self._limits = limits
        self._reply_route = reply_route
        self.retry_after_ms = retry_after_ms  # the RetryInfo delay of transient refusals
        self._open: Counter[str] = Counter()

    # -- enqueue ---------------------------------------------------------------------------

    async def admit(
        self, msg: queue_pb2.EnqueueRequest, principal: Principal
    ) -> tuple[uuid.UUID, asyncio.Future[Admitted]]:
        """Validates and submits one enqueue. Raises InvalidEnqueue for bad input; the
        future fails with Rejection when it is refused (nothing stored), or gives the
        admitted request once it is committed."""
        # Time-ordered ids whose top 48 bits are the acceptance time in ms: the worker
        # measures queue wait from them, and they keep the log in acceptance order.
        request_id = uuid7()
        # The request's own span: a child of the RPC's, ended once the request is durable.
        # Attributes are only built when tracing is on: this runs once per request.
        span = None
        if tracing.enabled():
            span = tracing.start(
                f"enqueue {msg.handler[:64]}",
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
                limits=self._limits,
                request_id=request_id,
                # Without tracing the request id (a UUID, 128 bits like a W3C trace id)
                # stands in, so every request has an id to find it by in logs and traces.
                trace_id=tracing.trace_id(span) if span is not None else request_id.hex,
            )
        except Exception as exc:
            tracing.end(span, exc)
            raise
        sub = Submission(
            request=request,
            reply_route=self._reply_route,
            traceparent=tracing.traceparent(span) if span else "",
            span=span,
        )
        if span is not None:
            sub.future.add_done_callback(lambda f: tracing.end(span, _error(f)))
        try:
            self._admission.check(principal.user_id, self._intake.load(request.user_id))
        except Rejection as rejection:
            fail_quietly(sub.future, rejection)
            return request_id, sub.future
        return request_id, self._intake.submit(sub)

    # -- cancel ----------------------------------------------------------------------------

    async def cancel(self, user: uuid.UUID, request_id: uuid.UUID) -> str | None:
        """Cancels a queued request in the log and asks workers to stop it if it runs.
        Returns the status afterwards (None: no such request of this user)."""
        try:
            after = await self.store.cancel_queued(user, request_id)
        except Exception as exc:
            if dberrors.is_transient(exc):
                raise LogUnavailable from exc
            raise
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

    # -- results from the log ----------------------------------------------------------------

    async def stored_result(
        self, user: uuid.UUID, request_id: uuid.UUID
    ) -> common_pb2.Result | None:
        row = await self.store.get(user, request_id)
        if row is None or not row.lane_seq:
            return None
        return result_from_row(row)

    async def finished(
        self, user: uuid.UUID, ids: list[uuid.UUID]
    ) -> list[common_pb2.Result | Withheld]:
        """Results of those requests that have finished, in lane order (a Session's read
        of its overdue results, batched with the other Sessions' of this replica). The read
        loads a bounded number of bytes of outputs: past them a result is Withheld. The
        first of `ids`, when it has finished, comes with its output if no other ask read
        with it took those bytes first."""
        rows = await self._catch_up.finished(user, ids)
        return [
            Withheld(common_pb2.Result(request_id=str(r.id), lane_seq=r.lane_seq), r.size)
            if r.withheld
            else result_from_row(r)
            for r in rows
        ]

    async def results_after(
        self, user: uuid.UUID, after: int, upto: int | None = None
    ) -> ResultPage:
        """The user's next results after `after` (before `upto`), at most a results page
        and a bounded number of bytes of outputs; `more` says whether to read again."""
        return await self.store.results_after(
            user, after, upto=upto, limit=self.streams.results_page
        )

    # -- streams -----------------------------------------------------------------------------

    def stream_slot(self, user_id: str) -> StreamSlot:
        """Takes one of the user's open-stream slots on this replica (TooManyStreams when
        none is left); the slot is given back when the returned context exits."""
        if self._open[user_id] >= self.streams.max_streams_per_user:
            raise TooManyStreams(self.streams.max_streams_per_user)
        self._open[user_id] += 1
        return StreamSlot(self._open, user_id)


class StreamSlot:
    def __init__(self, counts: Counter[str], user_id: str) -> None:
        self._counts = counts
        self._user_id = user_id

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._counts[self._user_id] -= 1
        if self._counts[self._user_id] <= 0:
            del self._counts[self._user_id]


def _error(future: asyncio.Future[Admitted]) -> BaseException | None:
    if future.cancelled():
        return None
    return future.exception()
