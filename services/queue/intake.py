"""Batched durable intake: many concurrent enqueues become one transaction and one
confirmed publish per lane, and each caller learns its outcome only after both are durable.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2
from opentelemetry.trace import Span, SpanKind
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from fairlane.common.v1 import lane_pb2
from services.core import batching, metrics, tracing
from services.core.breaker import CircuitBreaker, CircuitOpen
from services.core.broker import Broker, BrokerError, LaneFull, LaneMissing, lane_queue
from services.core.logging import get_logger
from services.queue.store import NewRequest, RequestStore

log = get_logger(__name__)

# One lane message carries at most this many requests, so a redelivery after a worker
# crash repeats a bounded amount of bookkeeping.
MAX_ITEMS_PER_MESSAGE = 256
_DB_ERRORS = (SQLAlchemyError, OSError, TimeoutError)
T = TypeVar("T")


class Rejection(Exception):
    def __init__(self, reason: str, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True, slots=True)
class Admission:
    request_id: uuid.UUID
    duplicate: bool


@dataclass(slots=True)
class Submission:
    request: NewRequest
    reply_route: str
    traceparent: str = ""
    span: Span | None = None
    future: asyncio.Future[Admission] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _lane_item(sub: Submission) -> lane_pb2.LaneItem:
    r = sub.request
    item = lane_pb2.LaneItem(
        request_id=str(r.id),
        handler=r.handler,
        payload=r.payload,
        max_attempts=r.max_attempts,
        client_ref=r.client_ref,
        traceparent=sub.traceparent,
    )
    if r.deadline is not None:
        item.deadline.CopyFrom(_timestamp(r.deadline.timestamp()))
    return item


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class Intake:
    def __init__(
        self,
        store: RequestStore,
        broker: Broker,
        *,
        batch_size: int,
        linger_ms: float,
        retry_after_ms: int = 1000,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._store = store
        self._broker = broker
        self._batch_size = batch_size
        self._linger = linger_ms / 1000
        self._retry_after_ms = retry_after_ms
        self._pending: asyncio.Queue[Submission] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._announced: set[uuid.UUID] = set()
        self._in_batch = 0
        self._breaker = breaker or CircuitBreaker("database")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="intake")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._pending.empty():
            self._fail(
                [self._pending.get_nowait()],
                Rejection("shutdown", "server is shutting down", self._retry_after_ms),
            )

    def submit(self, sub: Submission) -> asyncio.Future[Admission]:
        self._pending.put_nowait(sub)
        return sub.future

    async def _run(self) -> None:
        while True:
            batch = await batching.collect(
                self._pending, max_size=self._batch_size, linger=self._linger
            )
            self._in_batch = len(batch)
            try:
                await self._process(batch)
            except Exception as exc:  # never let one bad batch stop intake
                log.exception("intake_batch_failed", size=len(batch))
                self._fail(batch, Rejection("internal", f"internal error: {exc}", 1000))
            finally:
                self._in_batch = 0

    def _fail(self, subs: list[Submission], rejection: Rejection) -> None:
        for sub in subs:
            if not sub.future.done():
                sub.future.set_exception(rejection)
            metrics.REJECTIONS.labels(rejection.reason).inc()

    @property
    def pending(self) -> int:
        """Requests waiting for their durable write on this replica."""
        return self._pending.qsize() + self._in_batch

    async def _db(self, call: Callable[[], Awaitable[T]]) -> T:
        """A request-log call through the database's circuit breaker."""
        self._breaker.before_call()
        try:
            result = await call()
        except IntegrityError:
            self._breaker.success()  # the database answered
            raise
        except _DB_ERRORS:
            self._breaker.failure()
            raise
        self._breaker.success()
        return result

    def _db_rejection(self, exc: BaseException) -> Rejection:
        if isinstance(exc, CircuitOpen):
            delay = int(exc.retry_after * 1000)
        else:
            delay = self._retry_after_ms
        return Rejection(
            "database_unavailable",
            f"the request log is unavailable ({exc.__class__.__name__}); nothing was stored",
            max(delay, 100),
        )

    async def _process(self, batch: list[Submission]) -> None:
        fresh = await self._dedupe(batch)
        if not fresh:
            return
        started = time.perf_counter()
        db_span = _batch_span(
            "INSERT requests",
            fresh,
            {
                "db.system": self._store.dialect,
                "db.operation.name": "INSERT",
                "db.collection.name": "requests",
                "fairlane.batch_size": len(fresh),
            },
        )
        try:
            with tracing.current(db_span):
                await self._db(lambda: self._store.insert([s.request for s in fresh]))
        except IntegrityError as exc:
            tracing.end(db_span, exc)
            # A concurrent replica inserted one of the idempotency keys; settle one by one.
            for sub in fresh:
                await self._process_one(sub)
            return
        except (*_DB_ERRORS, CircuitOpen) as exc:
            tracing.end(db_span, exc)
            self._fail(fresh, self._db_rejection(exc))
            return
        tracing.end(db_span)
        metrics.DB_BATCH_SIZE.labels("intake").observe(len(fresh))
        metrics.DB_BATCH_SECONDS.labels("intake").observe(time.perf_counter() - started)
        await self._publish(fresh)

    async def _process_one(self, sub: Submission) -> None:
        again = await self._dedupe([sub])
        if not again:
            return
        try:
            await self._db(lambda: self._store.insert([sub.request]))
        except (*_DB_ERRORS, CircuitOpen) as exc:
            self._fail([sub], self._db_rejection(exc))
            return
        await self._publish([sub])

    async def _dedupe(self, batch: list[Submission]) -> list[Submission]:
        """Answers repeats of an idempotency key with the first request; returns the rest."""
        keys = {
            (s.request.user_id, s.request.idempotency_key)
            for s in batch
            if s.request.idempotency_key is not None
        }
        if not keys:
            return batch
        try:
            existing = await self._db(lambda: self._store.find_idempotent(list(keys)))
        except (*_DB_ERRORS, CircuitOpen) as exc:
            self._fail(batch, self._db_rejection(exc))
            return []
        fresh: list[Submission] = []
        first: dict[tuple[uuid.UUID, str], Submission] = {}
        for sub in batch:
            key = sub.request.idempotency_key
            if not key:
                fresh.append(sub)
                continue
            k = (sub.request.user_id, key)
            if k in existing:
                sub.future.set_result(Admission(existing[k], duplicate=True))
            elif k in first:
                _chain(first[k].future, sub.future)
            else:
                first[k] = sub
                fresh.append(sub)
        return fresh

    async def _publish(self, subs: list[Submission]) -> None:
        by_lane: dict[uuid.UUID, list[Submission]] = defaultdict(list)
        for sub in subs:
            by_lane[sub.request.user_id].append(sub)
        outcomes = await asyncio.gather(
            *(self._publish_lane(user, lane_subs) for user, lane_subs in by_lane.items())
        )
        failed: list[tuple[list[Submission], Rejection]] = []
        for (user, lane_subs), error in zip(by_lane.items(), outcomes, strict=True):
            if error is None:
                for sub in lane_subs:
                    sub.future.set_result(Admission(sub.request.id, duplicate=False))
                metrics.ACCEPTED.inc(len(lane_subs))
            else:
                failed.append((lane_subs, error))
                log.warning("lane_publish_failed", lane=str(user), error=str(error))
        if not failed:
            return
        try:
            await self._store.delete([s.request.id for lane_subs, _ in failed for s in lane_subs])
        except (SQLAlchemyError, OSError):
            # The rows stay QUEUED with no lane message behind them and nothing will run
            # them; the client was told they were rejected. Logged for an operator.
            log.exception("compensating_delete_failed", count=sum(len(f[0]) for f in failed))
        for lane_subs, error in failed:
            self._fail(lane_subs, error)

    async def _publish_lane(self, user: uuid.UUID, subs: list[Submission]) -> Rejection | None:
        user_id = str(user)
        span = _batch_span(
            f"publish {lane_queue(user_id)}",
            subs,
            {
                "messaging.system": "rabbitmq",
                "messaging.operation.type": "publish",
                "messaging.destination.name": lane_queue(user_id),
                "messaging.batch.message_count": len(subs),
            },
        )
        with tracing.current(span):
            rejection = await self._publish_lane_messages(user, user_id, subs)
        tracing.end(span, rejection)
        return rejection

    async def _publish_lane_messages(
        self, user: uuid.UUID, user_id: str, subs: list[Submission]
    ) -> Rejection | None:
        try:
            new_lane = await self._ensure_lane(user_id)
            for start in range(0, len(subs), MAX_ITEMS_PER_MESSAGE):
                chunk = subs[start : start + MAX_ITEMS_PER_MESSAGE]
                body = lane_pb2.LaneBatch(
                    user_id=user_id,
                    reply_route=chunk[0].reply_route,
                    items=[_lane_item(s) for s in chunk],
                ).SerializeToString()
                try:
                    await self._broker.publish_lane(user_id, body, {})
                except LaneMissing:
                    # Deleted while idle since we declared it: declare again, announce it
                    # to the workers, publish again (nothing was enqueued the first time).
                    self._announced.discard(user)
                    new_lane = await self._ensure_lane(user_id)
                    await self._broker.publish_lane(user_id, body, {})
            if new_lane:
                await self._announce(user_id)
        except LaneFull:
            return Rejection(
                "lane_full", "your lane is full; slow down and retry", self._retry_after_ms
            )
        except BrokerError as exc:
            self._announced.discard(user)
            return Rejection("broker_unavailable", str(exc), self._retry_after_ms)
        return None

    async def _ensure_lane(self, user_id: str) -> bool:
        """Declares the lane (the broker caches declarations); True if not yet announced."""
        await self._broker.declare_lane(user_id)
        return uuid.UUID(user_id) not in self._announced

    async def _announce(self, user_id: str) -> None:
        """Tells workers about a lane this replica has not announced yet."""
        await self._broker.publish_control(
            lane_pb2.ControlEvent(lane_created=user_id).SerializeToString()
        )
        self._announced.add(uuid.UUID(user_id))


def _chain(source: asyncio.Future[Admission], target: asyncio.Future[Admission]) -> None:
    def copy(done: asyncio.Future[Admission]) -> None:
        if target.done():
            return
        if done.exception() is not None:
            target.set_exception(done.exception())  # type: ignore[arg-type]
        else:
            r = done.result()
            target.set_result(Admission(r.request_id, duplicate=True))

    source.add_done_callback(copy)


def _batch_span(name: str, subs: list[Submission], attributes: dict[str, Any]) -> Span | None:
    """A span for work done once for many requests: a child of the first request's span,
    linked to the others'."""
    spans = [s.span for s in subs if s.span is not None]
    if not spans:
        return None
    return tracing.start(
        name, parent_span=spans[0], kind=SpanKind.CLIENT, attributes=attributes, links=spans[1:]
    )
