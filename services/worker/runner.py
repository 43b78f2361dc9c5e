"""Runs lanes: one consumer and one sequential task per lane, handlers bounded by a
shared concurrency limit, retries in place, dead letters, pause/resume/drain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane.handlers import Hooks, PermanentError, PlainContext
from fairlane.worker.v1 import worker_pb2
from services.core import dberrors, metrics, status, tracing
from services.core.broker import Broker, BrokerError, Delivery, LaneConsumer, lane_queue
from services.core.logging import get_logger
from services.worker.context import Context
from services.worker.registry import Handler
from services.worker.store import Attempt, Outcome, StoredState, WorkerStore
from services.worker.writer import ResultWriter, WriteFailed

log = get_logger(__name__)

RUNNING_MARK_SECONDS = 0.05  # handlers that take longer show RUNNING in the log
CANCELLED_MEMORY = 10_000  # recent cancel requests remembered for requests not yet started


# The state of a request on its first delivery: queued, never started.
FRESH = StoredState(
    status=status.QUEUED,
    lane_seq=None,
    attempts=0,
    output=None,
    error=None,
    client_ref="",
    handler="",
)


class RequestCancelled(Exception):
    pass


class Stats:
    def __init__(self) -> None:
        self.succeeded: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.retried: Counter[str] = Counter()
        self.running: Counter[str] = Counter()


class Lane:
    def __init__(self, runner: Runner, user_id: str) -> None:
        self.user_id = user_id
        self._runner = runner
        self.deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.consumer: LaneConsumer | None = None
        # Set while the lane waits for a message or at a closed gate: nothing of it runs.
        self.quiet = asyncio.Event()
        self.acks: set[asyncio.Task[None]] = set()
        self.task = asyncio.create_task(self._run(), name=f"lane-{user_id}")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return  # released on purpose
        error = task.exception()
        log.error(
            "lane_task_failed",
            lane=self.user_id,
            error=f"{type(error).__name__}: {error}"[:300],
        )
        metrics.LANE_FAILURES.inc()
        self._runner.rebuild_later(self.user_id)

    async def on_delivery(self, delivery: Delivery) -> None:
        self.deliveries.put_nowait(delivery)

    async def _run(self) -> None:
        while True:
            self.quiet.set()
            delivery = await self.deliveries.get()
            self.quiet.clear()
            if delivery.stale:
                continue  # its channel died; the broker redelivers it on the new one
            await self._runner.process(self, delivery)

    @property
    def alive(self) -> bool:
        """Consuming and processing. A lane whose task ended (a bug in processing) is not:
        the runner rebuilds it, and its unacked messages go back to the lane in order."""
        return self.consumer is not None and self.consumer.alive and not self.task.done()

    async def release(self) -> None:
        """Stops processing, then consuming: whatever was not acked (the message being
        worked on and those buffered) goes back to the lane in order."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        if self.consumer is not None:
            await self.consumer.cancel()


class Runner:
    def __init__(
        self,
        *,
        broker: Broker,
        store: WorkerStore,
        writer: ResultWriter,
        handlers: dict[str, Handler],
        concurrency: int,
        prefetch: int,
        retry_base: float,
        retry_max: float,
        worker_id: str,
        hooks: list[Hooks] | None = None,
    ) -> None:
        self._broker = broker
        self._store = store
        self._writer = writer
        self.handlers = handlers
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._prefetch = prefetch
        self._retry_base = retry_base
        self._retry_max = retry_max
        self.worker_id = worker_id
        self.lanes: dict[str, Lane] = {}
        self.state = worker_pb2.WORKER_STATE_RUNNING
        self._resumed = asyncio.Event()
        self._resumed.set()
        self.in_flight = 0
        self.stats = Stats()
        self._hooks = hooks or []
        self._running: dict[str, asyncio.Future[Any]] = {}
        self._cancelled: dict[str, None] = {}  # insertion-ordered, bounded
        self._processes: ProcessPoolExecutor | None = None
        self._lock = asyncio.Lock()
        # Requests run here whose outcome is not yet written: a copy of one (republished
        # from the outbox) arriving meanwhile is skipped rather than run twice.
        self._inflight: set[uuid.UUID] = set()
        self._lane_failures: dict[str, int] = {}
        self._rebuilds: set[asyncio.Task[None]] = set()

    # -- lanes -----------------------------------------------------------------------------

    async def add_lane(self, user_id: str) -> None:
        """Consumes the lane; a lane whose consumer died (broker connection lost) is
        consumed again from scratch."""
        async with self._lock:
            if self.state in (worker_pb2.WORKER_STATE_DRAINING, worker_pb2.WORKER_STATE_DRAINED):
                return
            existing = self.lanes.get(user_id)
            if existing is not None:
                if existing.alive:
                    return
                del self.lanes[user_id]
                await existing.release()
            lane = Lane(self, user_id)
            try:
                lane.consumer = await self._broker.consume_lane(
                    user_id, lane.on_delivery, prefetch=self._prefetch
                )
            except BrokerError:
                await lane.release()
                raise
            self.lanes[user_id] = lane
            metrics.ACTIVE_LANES.set(len(self.lanes))

    def rebuild_later(self, user_id: str) -> None:
        """Consumes a lane again whose task ended unexpectedly, after a growing delay (a
        message that breaks processing every time must not spin the worker)."""
        failures = self._lane_failures.get(user_id, 0) + 1
        self._lane_failures[user_id] = failures
        delay = min(30.0, 0.25 * 2 ** (failures - 1))

        async def rebuild() -> None:
            await asyncio.sleep(delay)
            try:
                await self.add_lane(user_id)
            except BrokerError as exc:
                log.warning("lane_rebuild_failed", lane=user_id, error=str(exc)[:200])

        task = asyncio.create_task(rebuild(), name=f"rebuild-{user_id}")
        self._rebuilds.add(task)
        task.add_done_callback(self._rebuilds.discard)

    async def repair(self) -> int:
        """Consumes again every lane whose consumer died; returns how many."""
        dead = [u for u, lane in list(self.lanes.items()) if not lane.alive]
        for user_id in dead:
            await self.add_lane(user_id)
        return len(dead)

    async def remove_lane(self, user_id: str) -> None:
        async with self._lock:
            lane = self.lanes.pop(user_id, None)
            metrics.ACTIVE_LANES.set(len(self.lanes))
        if lane is not None:
            await lane.release()

    # -- control ---------------------------------------------------------------------------

    def pause(self, lane: str = "") -> None:
        if lane:
            if lane in self.lanes:
                self.lanes[lane].resumed.clear()
            return
        if self.state == worker_pb2.WORKER_STATE_RUNNING:
            self.state = worker_pb2.WORKER_STATE_PAUSED
            self._resumed.clear()

    def resume(self, lane: str = "") -> None:
        if lane:
            if lane in self.lanes:
                self.lanes[lane].resumed.set()
            return
        if self.state == worker_pb2.WORKER_STATE_PAUSED:
            self.state = worker_pb2.WORKER_STATE_RUNNING
            self._resumed.set()

    def paused_lanes(self) -> list[str]:
        return [u for u, lane in self.lanes.items() if not lane.resumed.is_set()]

    async def drain(self, timeout: float) -> int:
        """Finishes running handlers (up to `timeout`), then hands every lane back."""
        self.state = worker_pb2.WORKER_STATE_DRAINING
        self._resumed.clear()
        abandoned = 0

        async def settled(lane: Lane) -> None:
            await lane.quiet.wait()
            await asyncio.gather(*list(lane.acks), return_exceptions=True)

        try:
            await asyncio.wait_for(
                asyncio.gather(*(settled(lane) for lane in list(self.lanes.values()))), timeout
            )
        except TimeoutError:
            abandoned = self.in_flight
        for user_id in list(self.lanes):
            await self.remove_lane(user_id)
        self.state = worker_pb2.WORKER_STATE_DRAINED
        return abandoned

    # -- processing ------------------------------------------------------------------------

    async def _states(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, StoredState]:
        delay = 0.1
        while True:
            try:
                return await self._store.states(ids)
            except Exception as exc:
                if not dberrors.is_transient(exc):
                    raise
                log.warning("state_read_failed", error=str(exc)[:200], retry_in=delay)
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)

    async def process(self, lane: Lane, delivery: Delivery) -> None:
        try:
            batch = lane_pb2.LaneBatch.FromString(delivery.body)
            user = uuid.UUID(batch.user_id)
        except (DecodeError, ValueError):
            log.warning("undecodable_lane_message", lane=lane.user_id, size=len(delivery.body))
            await self._publish_dead(delivery.body, {"reason": "undecodable"})
            await _settle(delivery, requeue=None)
            return
        items: list[tuple[uuid.UUID, lane_pb2.LaneItem]] = []
        for item in batch.items:
            try:
                items.append((uuid.UUID(item.request_id), item))
            except ValueError:
                log.warning(
                    "malformed_lane_item", lane=lane.user_id, request_id=item.request_id[:64]
                )
                await self._publish_dead(item.SerializeToString(), {"reason": "malformed id"})
        # A first delivery cannot have finished before; only a redelivery, or a request
        # published from the outbox by another replica, needs the log (finished requests
        # are re-sent, not re-run). A cancel that lands meanwhile is caught by the cancel
        # events and by the final write, which lets CANCELLED win.
        check = [rid for rid, item in items if delivery.redelivered or item.recovered]
        states = await self._states(check) if check else {}
        pending: list[asyncio.Future[None]] = []
        for rid, item in items:
            if rid in self._inflight:
                continue  # a copy of a request this worker runs now; its result follows
            state = states.get(rid) if rid in check else FRESH
            try:
                future = await self._run_item(
                    lane, batch, user=user, request_id=rid, item=item, state=state
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug while handling one request must not stop its lane: the request
                # fails with a generic error and the lane moves on to the next one.
                log.exception("request_processing_failed", request_id=str(rid))
                metrics.ITEM_FAILURES.labels("worker").inc()
                future = self._writer.finish(
                    Outcome(rid, user, status.FAILED, error="internal error in the worker"),
                    route=batch.reply_route,
                    client_ref=item.client_ref,
                    handler=item.handler,
                )
            if future is not None:
                self._inflight.add(rid)
                future.add_done_callback(functools.partial(_forget, self._inflight, rid))
                pending.append(future)
        # The lane goes on with its next message while this one's outcomes are written
        # (the writer keeps them in order); the message is acked once they are durable.
        task = asyncio.create_task(self._ack_when_written(delivery, pending))
        lane.acks.add(task)
        task.add_done_callback(lane.acks.discard)

    async def _publish_dead(self, body: bytes, headers: dict[str, str]) -> None:
        try:
            await self._broker.publish_dead(body, headers)
        except BrokerError as exc:
            log.warning("dead_letter_publish_failed", error=str(exc)[:200])

    async def _ack_when_written(
        self, delivery: Delivery, pending: list[asyncio.Future[None]]
    ) -> None:
        try:
            await asyncio.gather(*pending)
        except WriteFailed:
            await _settle(delivery, requeue=True)
            return
        await _settle(delivery, requeue=None)

    async def _run_item(
        self,
        lane: Lane,
        batch: lane_pb2.LaneBatch,
        *,
        user: uuid.UUID,
        request_id: uuid.UUID,
        item: lane_pb2.LaneItem,
        state: StoredState | None,
    ) -> asyncio.Future[None] | None:
        if state is None:
            # Requests are published only once committed, so this is a message that did
            # not come from a queue replica of this deployment.
            log.warning("request_not_in_log", request_id=item.request_id)
            return None
        if state.lane_seq is not None:
            # Finished before (redelivery): send the stored result again, run nothing.
            self._writer.publish(
                lane_pb2.LaneEvent(
                    user_id=batch.user_id,
                    result=common_pb2.Result(
                        request_id=item.request_id,
                        lane_seq=state.lane_seq,
                        status=status.to_proto(state.status),
                        output=state.output or b"",
                        error=state.error or "",
                        attempts=state.attempts,
                        client_ref=state.client_ref,
                        handler=state.handler,
                    ),
                ),
                route=batch.reply_route,
            )
            return None
        if state.status == status.CANCELLED or item.request_id in self._cancelled:
            outcome = Outcome(request_id, user, status.CANCELLED, error="cancelled by the client")
        elif item.HasField("deadline") and item.deadline.ToDatetime(tzinfo=UTC) <= datetime.now(
            UTC
        ):
            outcome = Outcome(
                request_id, user, status.EXPIRED, error="deadline passed before start"
            )
        elif (spec := self.handlers.get(item.handler)) is None:
            outcome = Outcome(
                request_id,
                user,
                status.FAILED,
                error=f"handler {item.handler!r} is not available on worker {self.worker_id}",
            )
        else:
            span = (
                None
                if not tracing.enabled()
                else tracing.start(
                    f"process {item.handler}",
                    parent_traceparent=item.traceparent,
                    kind=SpanKind.CONSUMER,
                    attributes={
                        "fairlane.request_id": item.request_id,
                        "fairlane.lane": batch.user_id,
                        "messaging.system": "rabbitmq",
                        "messaging.operation.type": "process",
                        "messaging.destination.name": lane_queue(batch.user_id),
                    },
                )
            )
            outcome = await self._execute(lane, batch, item, spec, state.attempts, span=span)
            if span is not None:
                outcome.traceparent = tracing.traceparent(span)
                span.set_attribute("fairlane.status", outcome.status)
            future = self._writer.finish(
                outcome, route=batch.reply_route, client_ref=item.client_ref, handler=item.handler
            )
            if span is not None:
                future.add_done_callback(lambda _: tracing.end(span))
            return future
        return self._writer.finish(
            outcome, route=batch.reply_route, client_ref=item.client_ref, handler=item.handler
        )

    async def _gate(self, lane: Lane) -> None:
        if self._resumed.is_set() and lane.resumed.is_set():
            return
        lane.quiet.set()
        try:
            while not (self._resumed.is_set() and lane.resumed.is_set()):
                await self._resumed.wait()
                await lane.resumed.wait()
        finally:
            lane.quiet.clear()

    async def _execute(
        self,
        lane: Lane,
        batch: lane_pb2.LaneBatch,
        item: lane_pb2.LaneItem,
        spec: Handler,
        previous_attempts: int,
        *,
        span: Span | None = None,
    ) -> Outcome:
        request_id = uuid.UUID(item.request_id)
        user = uuid.UUID(batch.user_id)
        max_attempts = item.max_attempts or spec.max_attempts
        deadline = item.deadline.ToDatetime(tzinfo=UTC) if item.HasField("deadline") else None
        attempts: list[Attempt] = []
        number = previous_attempts + 1
        if number == 1:
            # UUIDv7 ids carry their acceptance time (ms since the epoch, top 48 bits).
            accepted_ms = request_id.int >> 80
            metrics.QUEUE_WAIT_SECONDS.observe(max(0.0, time.time() - accepted_ms / 1000))
        while True:
            await self._gate(lane)
            if item.request_id in self._cancelled:
                return Outcome(
                    request_id,
                    user,
                    status.CANCELLED,
                    error="cancelled by the client",
                    attempts=attempts,
                )
            attempt = Attempt(number, datetime.now(UTC))
            attempts.append(attempt)
            ctx = Context(
                request_id=item.request_id,
                user_id=batch.user_id,
                attempt=number,
                deadline=deadline,
                writer=self._writer,
                route=batch.reply_route,
            )
            await self._hooks_before(ctx, spec.name)
            outcome: Outcome | None = None
            attempt_span = (
                None
                if span is None
                else tracing.start(
                    f"attempt {number}",
                    parent_span=span,
                    attributes={"fairlane.request_id": item.request_id, "fairlane.attempt": number},
                )
            )
            try:
                with tracing.current(attempt_span):
                    output = await self._call(spec, ctx, item.payload, request_id, number)
            except RequestCancelled:
                attempt.error = "cancelled by the client"
                outcome = Outcome(
                    request_id, user, status.CANCELLED, error=attempt.error, attempts=attempts
                )
            except PermanentError as exc:
                attempt.error = str(exc) or exc.__class__.__name__
                self.stats.failed[spec.name] += 1
                outcome = Outcome(
                    request_id, user, status.FAILED, error=attempt.error, attempts=attempts
                )
            except Exception as exc:
                attempt.error = f"{exc.__class__.__name__}: {exc}"
                with tracing.current(attempt_span):
                    log.warning(
                        "attempt_failed",
                        request_id=item.request_id,
                        handler=spec.name,
                        attempt=number,
                        max_attempts=max_attempts,
                        error=attempt.error,
                    )
            else:
                self.stats.succeeded[spec.name] += 1
                outcome = Outcome(
                    request_id, user, status.SUCCEEDED, output=output, attempts=attempts
                )
            if outcome is None and number >= max_attempts:
                self.stats.failed[spec.name] += 1
                await self._dead_letter(batch, item, attempts)
                outcome = Outcome(
                    request_id,
                    user,
                    status.DEAD,
                    error=f"gave up after {number} attempts: {attempt.error}",
                    attempts=attempts,
                )
            if attempt_span is not None:
                attempt_span.set_attribute(
                    "fairlane.outcome", outcome.status if outcome else "RETRY"
                )
                if attempt.error:
                    attempt_span.set_status(trace.Status(trace.StatusCode.ERROR, attempt.error))
                attempt_span.end()
            await self._hooks_after(
                ctx, spec.name, outcome.status if outcome else "RETRY", attempt.error
            )
            if outcome is not None:
                return outcome
            self.stats.retried[spec.name] += 1
            metrics.RETRIES.labels(spec.name).inc()
            # Exponential backoff with full jitter; the lane waits, so order holds.
            cap = min(self._retry_max, self._retry_base * 2 ** (number - 1))
            await asyncio.sleep(random.uniform(0, cap))
            number += 1

    async def _hooks_before(self, ctx: Context, handler: str) -> None:
        for hooks in self._hooks:
            try:
                await hooks.before_request(ctx, handler)
            except Exception:
                log.exception("before_request_hook_failed", handler=handler)

    async def _hooks_after(self, ctx: Context, handler: str, outcome: str, error: str) -> None:
        for hooks in self._hooks:
            try:
                await hooks.after_request(ctx, handler, outcome, error)
            except Exception:
                log.exception("after_request_hook_failed", handler=handler)

    def cancel(self, request_id: str) -> None:
        """Stops the handler running `request_id` here, or skips it when its turn comes."""
        self._cancelled[request_id] = None
        while len(self._cancelled) > CANCELLED_MEMORY:
            self._cancelled.pop(next(iter(self._cancelled)))
        task = self._running.get(request_id)
        if task is not None:
            task.cancel()

    def _start(self, spec: Handler, ctx: Context, payload: bytes) -> Awaitable[Any]:
        if spec.is_async:
            coro: Awaitable[Any] = spec.fn(ctx, payload)
            return asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        if spec.executor == "process":
            if self._processes is None:
                self._processes = ProcessPoolExecutor()
            plain = PlainContext(ctx.request_id, ctx.user_id, ctx.attempt, ctx.deadline)
            return loop.run_in_executor(self._processes, spec.fn, plain, payload)
        return loop.run_in_executor(None, functools.partial(spec.fn, ctx, payload))

    async def _call(
        self, spec: Handler, ctx: Context, payload: bytes, request_id: uuid.UUID, number: int
    ) -> bytes:
        async with self._slots:
            self.in_flight += 1
            self.stats.running[spec.name] += 1
            metrics.IN_FLIGHT.inc()
            started = time.perf_counter()
            mark = asyncio.get_running_loop().call_later(
                RUNNING_MARK_SECONDS, self._mark_running, request_id, number
            )
            running = asyncio.ensure_future(self._start(spec, ctx, payload))
            self._running[ctx.request_id] = running
            try:
                async with asyncio.timeout(spec.timeout):
                    result = await running
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the worker itself is stopping
                # Only the handler was cancelled: the client asked for it. A thread or
                # process keeps running to its end; its result is discarded.
                raise RequestCancelled from None
            finally:
                del self._running[ctx.request_id]
                mark.cancel()
                _handler_seconds(spec.name).observe(time.perf_counter() - started)
                metrics.IN_FLIGHT.dec()
                self.stats.running[spec.name] -= 1
                self.in_flight -= 1
        if result is None:
            return b""
        if isinstance(result, str):
            return result.encode()
        if not isinstance(result, bytes | bytearray | memoryview):
            raise PermanentError(f"handler returned {type(result).__name__}, not bytes")
        return bytes(result)

    async def start(self) -> None:
        for hooks in self._hooks:
            await hooks.on_startup()

    async def shutdown(self) -> None:
        for hooks in self._hooks:
            try:
                await hooks.on_shutdown()
            except Exception:
                log.exception("on_shutdown_hook_failed")
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)

    def _mark_running(self, request_id: uuid.UUID, number: int) -> None:
        self._writer.running(request_id, number, datetime.now(UTC))

    async def _dead_letter(
        self, batch: lane_pb2.LaneBatch, item: lane_pb2.LaneItem, attempts: list[Attempt]
    ) -> None:
        history = [
            {"attempt": a.number, "started_at": a.started_at.isoformat(), "error": a.error}
            for a in attempts
        ]
        headers = {
            "user_id": batch.user_id,
            "request_id": item.request_id,
            "handler": item.handler,
            "attempts": str(len(attempts)),
            "history": json.dumps(history),
        }
        metrics.DEAD_LETTERED.labels(item.handler).inc()
        try:
            await self._broker.publish_dead(item.SerializeToString(), headers)
        except BrokerError as exc:
            # The request log keeps the same history; ListDeadRequests reads it from there.
            log.warning("dead_letter_publish_failed", request_id=item.request_id, error=str(exc))


async def _settle(delivery: Delivery, *, requeue: bool | None) -> None:
    """Acks (requeue=None) or rejects. If the channel died meanwhile (broker connection cut)
    the broker has already put the message back; the redelivery finds the finished
    requests in the log and only re-sends their results."""
    try:
        if requeue is None:
            await delivery.ack()
        else:
            await delivery.reject(requeue=requeue)
    except Exception as exc:
        log.warning("settle_failed", error=str(exc))


@functools.cache
def _handler_seconds(handler: str) -> Any:
    """The histogram child of one handler, looked up once rather than per request."""
    return metrics.HANDLER_SECONDS.labels(handler)


def _forget(inflight: set[uuid.UUID], request_id: uuid.UUID, _: object) -> None:
    inflight.discard(request_id)
