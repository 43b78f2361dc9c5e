"""Batches finished requests of every lane into one transaction and one publish per
queue replica, then tells each lane its outcomes are durable."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from opentelemetry.trace import SpanKind

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane_server.core import batching, dberrors, metrics, status, tracing
from fairlane_server.core.broker import Broker, BrokerError, ResultsUnroutable
from fairlane_server.core.describe import describe_error
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait
from fairlane_server.worker.store import Attempt, Outcome, WorkerStore

log = get_logger(__name__)


@dataclass(slots=True)
class _Pending:
    route: str
    client_ref: str
    handler: str
    outcome: Outcome | None = None  # None: an event to publish only
    event: lane_pb2.LaneEvent | None = None
    running: tuple[uuid.UUID, int, datetime] | None = None
    queued_at: float = field(default_factory=time.perf_counter)
    # A final outcome has one (a lane acks its message once it resolves), and a mark
    # that must be in the log before its handler runs.
    future: asyncio.Future[None] | None = None


class WriteFailed(Exception):
    pass


class ResultWriter:
    def __init__(
        self,
        store: WorkerStore,
        broker: Broker,
        *,
        batch_size: int,
        linger_ms: float,
        publish_patience: float = 15.0,
    ) -> None:
        self._store = store
        self._broker = broker
        self._publish_patience = publish_patience
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._batcher = batching.Batcher(self._queue, max_size=batch_size, linger=linger_ms / 1000)
        self._task: asyncio.Task[None] | None = None
        self._busy = False
        self._last_progress = time.monotonic()
        metrics.BATCH_SPLITS.labels("results")  # exported at 0 from the start
        metrics.ITEM_FAILURES.labels("results")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="result-writer")

    async def stop(self, timeout: float = 10.0) -> None:
        """Writes what is queued (up to `timeout`), then stops."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._queue.join()
        await cancel_and_wait(self._task)

    def finish(
        self, outcome: Outcome, *, route: str, client_ref: str, handler: str
    ) -> asyncio.Future[None]:
        """Queues a final outcome; the future resolves once it is in the log."""
        future = asyncio.get_running_loop().create_future()
        item = _Pending(
            route=route, client_ref=client_ref, handler=handler, outcome=outcome, future=future
        )
        self._put(item)
        return future

    def running(self, request_id: uuid.UUID, attempt: int, at: datetime) -> None:
        """Queues a RUNNING mark, written with the next batch (skipped if the outcome of
        the same request is in that batch)."""
        item = _Pending(route="", client_ref="", handler="", running=(request_id, attempt, at))
        self._put(item)

    async def running_written(self, request_id: uuid.UUID, attempt: int, at: datetime) -> None:
        """A RUNNING mark, returning once its batch is written. WriteFailed if the batch
        failed; a mark the log refuses on its own is dropped, as `running`'s are."""
        future = asyncio.get_running_loop().create_future()
        mark = (request_id, attempt, at)
        self._put(_Pending(route="", client_ref="", handler="", running=mark, future=future))
        await future

    def publish(self, event: lane_pb2.LaneEvent, *, route: str) -> None:
        """Queues an event (progress, or a stored result sent again) for publishing only."""
        item = _Pending(route=route, client_ref="", handler="", event=event)
        self._put(item)

    def _put(self, item: _Pending) -> None:
        if not self._busy and self._queue.empty():
            self._last_progress = time.monotonic()  # idle until now: a stall counts from here
        self._queue.put_nowait(item)

    async def _run(self) -> None:
        while True:
            batch = await self._batcher.next()
            self._busy = True
            try:
                await self._flush(batch)
            except Exception as exc:
                log.exception("result_batch_failed", size=len(batch))
                for item in batch:
                    if item.future is not None and not item.future.done():
                        item.future.set_exception(WriteFailed(str(exc)))
            finally:
                self._busy = False
                self._last_progress = time.monotonic()
                for _ in batch:
                    self._queue.task_done()

    def stalled_for(self) -> float:
        """Seconds the writer has had work without finishing a batch (0 when fine)."""
        if not self._busy and self._queue.empty():
            return 0.0
        return time.monotonic() - self._last_progress

    async def _write(
        self, outcomes: list[Outcome], running: list[tuple[uuid.UUID, int, datetime]]
    ) -> list[Outcome]:
        """Writes a batch; returns the outcomes written.

        Transient errors (connection, timeout, deadlock) are retried until they pass:
        batches are written strictly in turn, so a lane's results keep their order across a
        database outage; meanwhile the lanes wait (their messages stay unacked), and a long
        wait shows as a stalled stage in health and metrics. Any other error belongs to
        some item of the batch: the batch is split until that item is alone, and only it
        fails."""
        delay = 0.1
        while True:
            try:
                return await self._store.finish(outcomes, running)
            except Exception as exc:
                if not dberrors.is_database_error(exc):
                    raise
                if not dberrors.is_transient(exc):
                    return await self._split(outcomes, running, exc)
                log.warning("result_write_failed", error=describe_error(exc)[:300], retry_in=delay)
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)

    async def _split(
        self,
        outcomes: list[Outcome],
        running: list[tuple[uuid.UUID, int, datetime]],
        exc: BaseException,
    ) -> list[Outcome]:
        if len(outcomes) + len(running) <= 1:
            return await self._refused(outcomes, running, exc)
        metrics.BATCH_SPLITS.labels("results").inc()
        if outcomes and running:
            # Marks first, on their own: they only ever move a request to RUNNING.
            return await self._write([], running) + await self._write(outcomes, [])
        if running:
            middle = len(running) // 2
            await self._write([], running[:middle])
            await self._write([], running[middle:])
            return []
        # Halves in order, so each lane's outcomes are still numbered in lane order.
        middle = len(outcomes) // 2
        return await self._write(outcomes[:middle], []) + await self._write(outcomes[middle:], [])

    async def _refused(
        self,
        outcomes: list[Outcome],
        running: list[tuple[uuid.UUID, int, datetime]],
        exc: BaseException,
    ) -> list[Outcome]:
        """One item the log refuses on its own. A mark is dropped (the outcome follows);
        an outcome is written as FAILED with the reason, so the lane moves on."""
        metrics.ITEM_FAILURES.labels("results").inc()
        reason = dberrors.sqlstate(exc) or type(exc).__name__
        if running:
            log.warning("running_mark_refused", request_id=str(running[0][0]), reason=reason)
            return []
        original = outcomes[0]
        log.warning(
            "outcome_refused",
            request_id=str(original.request_id),
            status=original.status,
            reason=reason,
            error=str(getattr(exc, "orig", exc))[:300],
        )
        fallback = Outcome(
            original.request_id,
            original.user_id,
            status.FAILED,
            error=f"the request log refused this request's outcome ({reason})",
            attempts=[Attempt(a.number, a.started_at) for a in original.attempts],
            traceparent=original.traceparent,
        )
        try:
            written = await self._store.finish([fallback])
        except Exception as err:
            if not dberrors.is_database_error(err):
                raise
            log.exception(
                "outcome_lost", request_id=str(original.request_id), error=describe_error(err)[:300]
            )
            return []
        for o in written:
            # The caller matches written outcomes by identity: stand the fallback in.
            original.status, original.output, original.error = o.status, b"", o.error
            original.lane_seq = o.lane_seq
            original.attempts = o.attempts
            return [original]
        return []

    async def _publish_events(self, route: str, events: list[lane_pb2.LaneEvent]) -> None:
        """Publishes one replica's events, retrying through a broker reconnect for a while;
        past that they are dropped (they are in the log; Sessions read overdue results
        from it, and WatchResults always can). A route nobody is bound to any more (its
        replica died) is dropped at once: waiting cannot bring it back."""
        body = lane_pb2.LaneEventBatch(events=events).SerializeToString()
        delay = 0.05
        deadline = time.monotonic() + self._publish_patience
        while True:
            try:
                await self._broker.publish_results(route, body)
                return
            except ResultsUnroutable:
                log.info("result_route_gone", route=route, events=len(events))
                return
            except BrokerError as exc:
                if time.monotonic() + delay > deadline:
                    log.warning(
                        "result_publish_dropped",
                        route=route,
                        events=len(events),
                        error=describe_error(exc),
                    )
                    return
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 2.0)

    async def _flush(self, batch: list[_Pending]) -> None:
        outcomes = [i.outcome for i in batch if i.outcome is not None]
        finishing = {o.request_id for o in outcomes}
        running = [i.running for i in batch if i.running and i.running[0] not in finishing]
        written: set[int] = set()
        written_at = time.perf_counter()
        if outcomes or running:
            started = time.perf_counter()
            first = next((o.traceparent for o in outcomes if o.traceparent), "")
            span = (
                tracing.start(
                    "UPDATE requests",
                    parent_traceparent=first,
                    kind=SpanKind.CLIENT,
                    attributes={
                        "db.system": self._store.dialect,
                        "db.operation.name": "UPDATE",
                        "db.collection.name": "requests",
                        "fairlane.batch_size": len(outcomes),
                    },
                )
                if first
                else None
            )
            with tracing.current(span):
                written = {id(o) for o in await self._write(outcomes, running)}
            written_at = time.perf_counter()
            tracing.end(span)
            if outcomes:
                metrics.DB_BATCH_SIZE.labels("results").observe(len(outcomes))
                metrics.DB_BATCH_SECONDS.labels("results").observe(time.perf_counter() - started)
        by_route: dict[str, list[lane_pb2.LaneEvent]] = defaultdict(list)
        for item in batch:
            o = item.outcome
            if o is not None:
                if id(o) not in written:
                    # Already finished (a replica that lost its lane raced us) or rolled
                    # back at intake: the log keeps the first outcome; nothing to send.
                    log.warning("outcome_not_written", request_id=str(o.request_id))
                    continue
                _requests_counter(item.handler, o.status).inc()
                _RESULTS_SECONDS.observe(written_at - item.queued_at)
                item.event = lane_pb2.LaneEvent(
                    user_id=str(o.user_id),
                    traceparent=o.traceparent,
                    result=common_pb2.Result(
                        request_id=str(o.request_id),
                        lane_seq=o.lane_seq,
                        status=status.to_proto(o.status),
                        output=o.output,
                        error=o.error,
                        attempts=o.attempt_count,
                        client_ref=item.client_ref,
                        handler=item.handler,
                    ),
                )
            if item.route and item.event is not None:
                by_route[item.route].append(item.event)
        # Published before the lanes ack: a lane handed to another worker after its acks
        # has every result of this holder out before the next holder produces one, so a
        # lane's results reach its sessions in order.
        await asyncio.gather(
            *(self._publish_events(route, events) for route, events in by_route.items())
        )
        for item in batch:
            if item.future is not None and not item.future.done():
                item.future.set_result(None)


_RESULTS_SECONDS = metrics.STAGE_SECONDS.labels("results")


@functools.cache
def _requests_counter(handler: str, status_name: str) -> Any:
    return metrics.REQUESTS.labels(handler, status_name)
