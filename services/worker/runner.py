"""Runs a worker replica's lanes: decodes lane messages, skips what is finished or running
already, hands each request to its attempts, acks a message once its outcomes are durable;
and the replica's control state (pause, resume, drain) and the lanes paused on every
replica.

The lanes themselves (consumers, tasks, supervision) are in lanes.py, one request's
attempts (retries, executors, hooks) in attempts.py, dead letters in dead_letters.py.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import math
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from google.protobuf.message import DecodeError
from opentelemetry.trace import SpanKind

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane.handlers import Hooks
from fairlane_server.core import dberrors, metrics, status, tracing
from fairlane_server.core.broker import Broker, Delivery, lane_queue
from fairlane_server.core.describe import describe_error
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait
from fairlane_server.worker.attempts import Attempts, Stats
from fairlane_server.worker.dead_letters import DeadLetters
from fairlane_server.worker.lanes import ConsumedLane, LaneSet
from fairlane_server.worker.registry import Handler
from fairlane_server.worker.store import Outcome, StoredState, WorkerStore
from fairlane_server.worker.writer import ResultWriter, WriteFailed

log = get_logger(__name__)

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


class RunnerState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"  # no new attempt starts; running ones finish
    DRAINING = "draining"  # running ones finish, then every lane is handed back
    DRAINED = "drained"  # holds no lane, takes none again until restarted


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
        max_output_bytes: int = 4 * 1024 * 1024,
        hooks: list[Hooks] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._broker = broker
        self._writer = writer
        self._dead = DeadLetters(broker)
        self._attempts = Attempts(
            writer=writer,
            dead_letters=self._dead,
            concurrency=concurrency,
            retry_base=retry_base,
            retry_max=retry_max,
            max_output_bytes=max_output_bytes,
            hooks=hooks,
            sleep=sleep,
            rng=rng,
        )
        self._lanes = LaneSet(broker, prefetch=prefetch, process=self.process)
        self.handlers = handlers
        self.worker_id = worker_id
        self.state = RunnerState.RUNNING
        self._resumed = asyncio.Event()
        self._resumed.set()
        # Lanes an operator paused, on every replica, as this replica knows them: also lanes
        # it does not consume (yet), so that a lane it takes later starts paused. The request
        # log keeps them (lanes.paused_at); see set_lane_paused and sync_lane_pauses.
        self._paused_lanes: set[str] = set()
        # When (time.monotonic()) this replica last heard of each lane's pause or resume,
        # from its own call or an announcement: a lane listing read before that is older.
        self._pause_heard: dict[str, float] = {}
        # Per lane, the number of the newest read of its pause from the log that an
        # announcement started (see heard_lane_pause): only that one may apply its answer.
        self._pause_reads: dict[str, int] = {}
        self._pause_reading: set[asyncio.Task[None]] = set()
        # Requests run here whose outcome is not yet written: a copy of one (republished
        # from the outbox) arriving meanwhile is skipped rather than run twice.
        self._inflight: set[uuid.UUID] = set()
        metrics.ITEM_FAILURES.labels("worker")  # exported at 0 from the start

    # -- what the servicer and discovery read ------------------------------------------------

    @property
    def lanes(self) -> dict[str, ConsumedLane]:
        return self._lanes.lanes

    @property
    def concurrency(self) -> int:
        return self._attempts.concurrency

    @property
    def in_flight(self) -> int:
        return self._attempts.in_flight

    @property
    def stats(self) -> Stats:
        return self._attempts.stats

    def paused_lanes(self) -> list[str]:
        """The lanes paused on every replica, as this replica knows them."""
        return sorted(self._paused_lanes)

    # -- lanes -----------------------------------------------------------------------------

    async def add_lane(self, user_id: str) -> None:
        await self._lanes.add(user_id)
        lane = self.lanes.get(user_id)
        if lane is not None and user_id in self._paused_lanes:
            lane.resumed.clear()  # the gate checks the set too: nothing ran meanwhile

    async def remove_lane(self, user_id: str, *, finish_current: float = 30.0) -> None:
        """Hands the lane back once its current message is done (or `finish_current`
        seconds have passed): between messages, so its order holds for the next holder."""
        await self._lanes.remove(user_id, finish_current=finish_current)

    async def repair(self) -> int:
        return await self._lanes.repair()

    def cancel(self, request_id: str) -> None:
        self._attempts.cancel(request_id)

    # -- control ---------------------------------------------------------------------------

    def pause(self) -> None:
        """Pauses this whole replica (only this one): no new attempt starts here."""
        if self.state == RunnerState.RUNNING:
            self.state = RunnerState.PAUSED
            self._resumed.clear()

    def resume(self) -> None:
        if self.state == RunnerState.PAUSED:
            self.state = RunnerState.RUNNING
            self._resumed.set()

    # -- lane pauses, on every replica -----------------------------------------------------
    #
    # A lane pause is about the lane, wherever it runs: every replica consumes every lane
    # and any of them may be its active consumer. So the pause is kept in the request log
    # (lanes.paused_at), announced on fairlane.control (lane_paused, lane_resumed) for the
    # replicas running now, and listed by ListLanes (Lane.paused_at) for those that missed
    # the announcement or start later.

    async def pause_lane(self, lane: str, paused: bool) -> bool:
        """Pauses (or resumes) a lane on every replica: stores it, applies it here, announces
        it to the others. False (nothing changed) if the lane does not exist. A BrokerError
        from the announcement leaves the pause stored and applied here; the other replicas
        learn it at their next lane listing."""
        if not await self._store.set_lane_paused(uuid.UUID(lane), paused):
            return False
        self.set_lane_paused(lane, paused)
        event = (
            lane_pb2.ControlEvent(lane_paused=lane)
            if paused
            else lane_pb2.ControlEvent(lane_resumed=lane)
        )
        await self._broker.publish_control(event.SerializeToString())
        return True

    def heard_lane_pause(self, lane: str, paused: bool) -> None:
        """Another replica's announcement (or this one's own, which the fanout brings back).

        Two replicas pausing and resuming a lane at once commit in one order and may
        announce in the other: applying announcements as they came left replicas running
        a lane the log said was paused (or holding one it said was resumed) until their
        next lane listing. So what the log says decides: it is read after each
        announcement (announcements are published after their commit, so the read sees
        at least that one), and only the newest read of a lane applies its answer. A
        pause is applied at once as well, before the read: stopping a lane a moment early
        is harmless, starting one a moment late would not be."""
        if paused:
            self.set_lane_paused(lane, True)
        number = self._pause_reads.get(lane, 0) + 1
        self._pause_reads[lane] = number
        task = asyncio.create_task(self._read_lane_pause(lane, paused, number))
        self._pause_reading.add(task)
        task.add_done_callback(self._pause_reading.discard)

    async def _read_lane_pause(self, lane: str, announced: bool, number: int) -> None:
        try:
            stored = await self._store.lane_paused(uuid.UUID(lane))
        except Exception as exc:
            # The announcement stands until the next lane listing corrects it.
            log.warning("lane_pause_read_failed", lane=lane, error=describe_error(exc)[:200])
            stored = announced
        if self._pause_reads.get(lane) != number:
            return  # a newer read decides
        del self._pause_reads[lane]
        if stored is not None:  # None: the lane is gone, and so is its pause
            self.set_lane_paused(lane, stored)

    def set_lane_paused(self, lane: str, paused: bool) -> None:
        """Applies a lane pause or resume this replica heard of: its own call, or another
        replica's announcement."""
        self._pause_heard[lane] = time.monotonic()
        self._apply_lane_pause(lane, paused)

    async def load_lane_pauses(self) -> None:
        """Reads the lanes paused from the request log (at start, before any lane is
        consumed, so a replica started later honours pauses from its first request)."""
        since = time.monotonic()
        self.sync_lane_pauses(await self._store.paused_lanes(), since=since, complete=True)

    def sync_lane_pauses(self, paused: set[str], *, since: float, complete: bool) -> None:
        """Makes the lanes in `paused` (read from the request log after `since`, a
        time.monotonic() value) paused here; with `complete` (every paused lane is in it),
        also resumes the lanes paused here that are not. A lane this replica heard of at or
        after `since` is left as it is: that announcement may be newer than the read."""
        lanes = paused | self._paused_lanes if complete else paused
        for lane in lanes:
            if self._pause_heard.get(lane, -math.inf) < since:
                self._apply_lane_pause(lane, lane in paused)
        if complete:
            # What was heard before this read is in it: no longer needed.
            self._pause_heard = {u: t for u, t in self._pause_heard.items() if t >= since}

    def _apply_lane_pause(self, lane: str, paused: bool) -> None:
        if paused:
            self._paused_lanes.add(lane)
        else:
            self._paused_lanes.discard(lane)
        consumed = self.lanes.get(lane)
        if consumed is not None:
            if paused:
                consumed.resumed.clear()
            else:
                consumed.resumed.set()

    async def drain(self, timeout: float) -> int:
        """Finishes running handlers (up to `timeout`), then hands every lane back."""
        self.state = RunnerState.DRAINING
        self._lanes.accepting = False
        self._resumed.clear()
        abandoned = 0
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(lane.settled() for lane in list(self.lanes.values())))
        except TimeoutError:
            abandoned = self.in_flight
        for user_id in list(self.lanes):
            # Already waited for above: what still runs is cut short and goes back whole.
            await self.remove_lane(user_id, finish_current=0)
        self.state = RunnerState.DRAINED
        return abandoned

    async def _gate(self, lane: ConsumedLane) -> None:
        if lane.user_id in self._paused_lanes:
            lane.resumed.clear()  # paused before the lane was consumed (see add_lane)
        if self._resumed.is_set() and lane.resumed.is_set():
            return
        lane.quiet.set()
        try:
            while not (self._resumed.is_set() and lane.resumed.is_set()):
                await self._resumed.wait()
                await lane.resumed.wait()
        finally:
            lane.quiet.clear()

    async def start(self) -> None:
        await self._attempts.start()

    async def shutdown(self) -> None:
        for task in list(self._pause_reading):
            await cancel_and_wait(task)
        await self._attempts.shutdown()

    # -- processing ------------------------------------------------------------------------

    async def _states(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, StoredState]:
        delay = 0.1
        while True:
            try:
                return await self._store.states(ids)
            except Exception as exc:
                if not dberrors.is_transient(exc):
                    raise
                log.warning("state_read_failed", error=describe_error(exc)[:200], retry_in=delay)
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)

    async def process(self, lane: ConsumedLane, delivery: Delivery) -> None:
        try:
            batch = lane_pb2.LaneBatch.FromString(delivery.body)
            user = uuid.UUID(batch.user_id)
        except (DecodeError, ValueError):
            log.warning("undecodable_lane_message", lane=lane.user_id, size=len(delivery.body))
            await self._dead.unreadable(delivery.body, "undecodable")
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
                await self._dead.unreadable(item.SerializeToString(), "malformed id")
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
        lane: ConsumedLane,
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
        if (
            state.status == status.CANCELLED
            or state.cancel_requested
            or self._attempts.cancelled(item.request_id)
        ):
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
            outcome = await self._attempts.run(
                batch,
                item,
                spec,
                state.attempts,
                request_id=request_id,
                user=user,
                gate=functools.partial(self._gate, lane),
                span=span,
                interrupted=state is not FRESH and state.status == status.RUNNING,
                redelivered=state is not FRESH,
            )
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
        log.warning("settle_failed", error=describe_error(exc))


def _forget(inflight: set[uuid.UUID], request_id: uuid.UUID, _: object) -> None:
    inflight.discard(request_id)
