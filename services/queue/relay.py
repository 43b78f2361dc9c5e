"""The lane relay: publishes accepted requests from the outbox to their lanes, in order.

A request is accepted once its row and its outbox row are committed; from then on this
relay owes it a publish. Per lane it publishes strictly in lane position order, and only
while it holds the lane's publish lock, so replicas never interleave one lane. Broker
faults are retried on fresh channels, with backoff, for as long as they last: nothing
accepted is dropped, and nothing is published ahead of an older request of its lane.

Each lane has at most one publish in flight, which keeps its order, and lanes do not wait
for each other's confirms: a lane queue slow to confirm (a crashed queue process, a busy
node) delays its own lane only. The relay's loop only takes locks, reads and deletes (one
statement for many lanes each); publishes run in a task per lane.

A lane's lock is kept while the lane is busy and for `hold_seconds` after (taking it again
costs a lock and a read of the lane's outbox rows); a replica that fails to take it names
the lane on the lane-wanted channel, and the holder lets go as soon as it has published
what it has of it (`wanted`).

What a replica left behind (it died, or a commit's outcome was unknown to it) is found in
the outbox: by the next holder of the lane's lock, which reads the lane's rows before
publishing, and by a periodic sweep for rows older than `stale_after`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
import uuid
from dataclasses import dataclass, field

from google.protobuf import timestamp_pb2
from opentelemetry.trace import SpanKind

from fairlane.common.v1 import lane_pb2
from fairlane_server.core import dberrors, metrics, tracing
from fairlane_server.core.broker import Broker, BrokerError, LaneMissing, lane_queue
from fairlane_server.core.describe import describe_error
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait, wait_event
from fairlane_server.queue.accept_store import OutboxItem
from fairlane_server.queue.outbox_store import LaneOutbox, OutboxStore

log = get_logger(__name__)

# One lane message carries at most this many requests, so a redelivery after a worker
# crash repeats a bounded amount of bookkeeping.
MAX_ITEMS_PER_MESSAGE = 256


@dataclass(slots=True)
class _Lane:
    user_id: uuid.UUID
    items: dict[uuid.UUID, OutboxItem] = field(default_factory=dict)
    locked: bool = False
    # Lowest lane position not yet published; known only while the lock is held.
    next_pos: int | None = None
    needs_reading: bool = False  # read the lane's outbox rows before publishing more
    retry_at: float = 0.0
    failures: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    # Another replica failed to take the lock: let go as soon as nothing is left to publish.
    wanted: bool = False
    publishing: bool = False  # a publish task of the lane is running


def lane_item(item: OutboxItem) -> lane_pb2.LaneItem:
    message = lane_pb2.LaneItem(
        request_id=str(item.request_id),
        handler=item.handler,
        payload=item.payload,
        max_attempts=item.max_attempts,
        client_ref=item.client_ref,
        traceparent=item.traceparent,
        recovered=item.recovered,
    )
    if item.deadline is not None:
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(item.deadline)
        message.deadline.CopyFrom(ts)
    return message


class LaneRelay:
    def __init__(
        self,
        store: OutboxStore,
        broker: Broker,
        *,
        hold_seconds: float = 2.0,
        max_locks: int = 2000,
        sweep_seconds: float = 5.0,
        stale_after: float = 10.0,
        delete_after: float = 0.05,
    ) -> None:
        self._store = store
        self._broker = broker
        self._hold = hold_seconds
        self._max_locks = max_locks
        self._sweep_every = sweep_seconds
        self._stale_after = stale_after
        self._delete_after = delete_after
        self._lanes: dict[uuid.UUID, _Lane] = {}
        # Lanes with something to do (items, or a read): a round costs O(these), not
        # O(lanes held); a lane idle under its lock is looked at by the idle scan only.
        # Kept as the lanes themselves, so that a round's walks hash no UUIDs (a
        # Python-level __hash__: with 10,000 lanes busy they took a third of the queue's
        # CPU).
        self._busy: dict[uuid.UUID, _Lane] = {}
        self._held: set[uuid.UUID] = set()
        self._publishing: dict[uuid.UUID, asyncio.Task[None]] = {}
        self._halted = False
        # Confirmed requests whose outbox rows are not deleted yet: deleted together, at
        # most `delete_after` later, and always before a read or a lock is given up.
        self._confirmed: list[uuid.UUID] = []
        self._confirmed_since = 0.0
        self._announced: set[uuid.UUID] = set()
        self._expected: set[uuid.UUID] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_sweep = time.monotonic() + sweep_seconds
        self._next_idle_scan = 0.0
        self._scan_now = False
        self._last_progress = time.monotonic()
        self._store_failures = 0
        self._backlog = 0
        for error in ("BrokerError", "LaneFull", "LaneMissing"):
            metrics.RELAY_PUBLISH_FAILURES.labels(error)  # exported at 0 from the start

    # -- feeding -----------------------------------------------------------------------------

    def hand(self, items: list[OutboxItem]) -> None:
        """Takes over committed requests (each lane's in position order) for publishing."""
        if not self._backlog:
            self._last_progress = time.monotonic()  # idle until now: a stall counts from here
        now = time.perf_counter()
        for item in items:
            item.handed_at = now
            lane = self._lane(item.user_id)
            if lane.next_pos is not None and item.lane_pos < lane.next_pos:
                continue  # published already, by a holder that found it in the outbox
            if item.request_id not in lane.items:
                lane.items[item.request_id] = item
                self._backlog += 1
                self._busy[lane.user_id] = lane
            if not lane.failures:
                lane.retry_at = 0.0  # a gap this item fills is waited for no longer
        metrics.OUTBOX_BACKLOG.set(self._backlog)
        self._wake.set()

    def expect(self, request_ids: list[uuid.UUID]) -> None:
        """Requests this replica is committing now. Until `hand` or `settled`, their rows
        seen in the outbox are not loaded as leftovers: that would cost a read, and mark
        them recovered, which makes the worker check the log before running them."""
        self._expected.update(request_ids)

    def settled(self, request_ids: list[uuid.UUID]) -> None:
        """The commit of these requests is over: handed, refused, or (after a bug) left
        in the outbox, where the sweep finds them."""
        self._expected.difference_update(request_ids)

    def look(self, user_ids: list[uuid.UUID]) -> None:
        """These lanes have rows in the outbox that were not handed over (a commit whose
        answer was lost): read them at the next round, as the sweep would later."""
        for user in user_ids:
            lane = self._lane(user)
            lane.needs_reading = True
            self._settle(lane)
        if user_ids:
            self._wake.set()

    def wanted(self, user_ids: list[str]) -> None:
        """Other replicas could not take these lanes' locks (they have requests of them to
        publish): the ones held here are let go once what this replica has of them is
        published, without waiting for the hold time. Names of lanes not held are ignored."""
        for name in user_ids:
            try:
                lane = self._lanes.get(uuid.UUID(name))
            except ValueError:
                continue
            if lane is not None and lane.locked:
                lane.wanted = True
                self._scan_now = True
                self._wake.set()

    def forget_lane(self, user_id: uuid.UUID) -> None:
        """The lane queue was deleted (idle): declare and announce it again on next use."""
        self._announced.discard(user_id)

    @property
    def backlog(self) -> int:
        """Accepted requests of this replica not yet confirmed by the broker. Counted up
        as requests are handed over and recounted after every round: admission reads it
        for every enqueue, so it must not cost a walk over the lanes."""
        return self._backlog

    def _recount(self) -> None:
        # Only busy lanes hold items, so this costs O(lanes with work).
        self._backlog = sum(len(lane.items) for lane in self._busy.values())
        metrics.OUTBOX_BACKLOG.set(self._backlog)

    def stalled_for(self) -> float:
        """Seconds the relay has had work without publishing anything (0 when fine)."""
        if not self.backlog:
            return 0.0
        return time.monotonic() - self._last_progress

    def _lane(self, user_id: uuid.UUID) -> _Lane:
        lane = self._lanes.get(user_id)
        if lane is None:
            lane = self._lanes[user_id] = _Lane(user_id)
        return lane

    def _settle(self, lane: _Lane) -> None:
        """Files the lane as busy or not after its state changed."""
        if lane.items or lane.needs_reading:
            self._busy[lane.user_id] = lane
        else:
            self._busy.pop(lane.user_id, None)
            if lane.wanted:
                self._scan_now = True  # let go now, not at the next idle scan

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lane-relay")

    async def stop(self, timeout: float = 5.0) -> None:
        """Publishes what it can within `timeout`; the rest stays in the outbox for the
        replica that takes the lane over. Closing the store gives up every lock."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.backlog and self._task is not None and not self._task.done():
                    self._wake.set()
                    await asyncio.sleep(0.02)
        await cancel_and_wait(self._task)
        # Before the locks go: a publish still in flight could otherwise land after the
        # next holder's publishes of later requests of its lane.
        for task in list(self._publishing.values()):
            await cancel_and_wait(task)
        with contextlib.suppress(Exception):
            await self._delete_confirmed()
        with contextlib.suppress(Exception):
            await self._store.close()

    async def _run(self) -> None:
        while True:
            await self._sleep_until_work()
            try:
                await self._round()
                self._store_failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The lock connection or the database failed: every lock may be gone, so
                # nothing is published again before the locks are retaken and the rows
                # reread, and the publishes in flight end before that (a new holder must
                # not overtake them). What they confirm is deleted by a later round.
                self._store_failures += 1
                if dberrors.is_database_error(exc):
                    log.warning("relay_store_failed", error=describe_error(exc)[:200])
                else:
                    log.exception("relay_round_failed")
                self._halted = True  # lane tasks end after the publish they are in
                if self._publishing:
                    await asyncio.wait(list(self._publishing.values()))
                self._halted = False
                for lane in self._lanes.values():
                    lane.locked = False
                    lane.next_pos = None
                self._held.clear()
                with contextlib.suppress(Exception):
                    await self._store.reset()
                await asyncio.sleep(_backoff(self._store_failures))

    async def _sleep_until_work(self) -> None:
        now = time.monotonic()
        wake_at = self._next_sweep
        if self._held:
            wake_at = min(wake_at, now if self._scan_now else self._next_idle_scan)
        if self._confirmed:
            wake_at = min(wake_at, self._confirmed_since + self._delete_after)
        for lane in self._busy.values():
            if not lane.publishing:
                wake_at = min(wake_at, max(lane.retry_at, now))
        if wake_at <= now:
            return
        await wait_event(self._wake, wake_at - now)
        self._wake.clear()

    # -- one round ---------------------------------------------------------------------------

    async def _round(self) -> None:
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_every
            await self._sweep()
        # Lanes ready to publish go first: the lock and read below wait for the database.
        self._start_publishing(now)
        due = [
            lane
            for lane in self._busy.values()
            if not lane.publishing
            and lane.retry_at <= now
            and (not lane.locked or lane.needs_reading)
        ]
        wanted = [lane for lane in due if not lane.locked]
        if wanted:
            locked = await self._store.lock([lane.user_id for lane in wanted])
            for lane in wanted:
                if lane.user_id in locked:
                    lane.locked, lane.needs_reading, lane.failures = True, True, 0
                    self._held.add(lane.user_id)
                else:
                    # Another replica holds it; it publishes what it has, then lets go.
                    lane.failures += 1
                    lane.retry_at = now + min(0.02 * 2**lane.failures, 1.0) * random.uniform(
                        0.5, 1.0
                    )
        reading = [lane for lane in due if lane.locked and lane.needs_reading]
        if reading:
            # The read must not see rows of requests published already: it would load
            # them again as another replica's leftovers.
            await self._delete_confirmed()
            await self._read([lane.user_id for lane in reading])
        self._start_publishing(time.monotonic())
        await self._release()
        self._recount()

    def _start_publishing(self, now: float) -> None:
        """Starts a publish for every held, read lane with items and none in flight. One
        publish per lane at a time keeps its order; lanes do not wait for each other's
        confirms (a lane whose queue is slow to confirm delays only itself)."""
        for lane in list(self._busy.values()):
            if lane.publishing or not lane.locked or lane.needs_reading or lane.retry_at > now:
                continue
            run = self._run_of(lane)
            if run:
                task = asyncio.create_task(self._publish_lane(lane, run))
                self._publishing[lane.user_id] = task
                lane.publishing = True
                task.add_done_callback(functools.partial(self._published, lane.user_id))
            self._settle(lane)

    def _published(self, user: uuid.UUID, task: asyncio.Task[None]) -> None:
        self._publishing.pop(user, None)
        lane = self._lanes.get(user)
        if lane is not None:
            lane.publishing = False
        if not task.cancelled() and (error := task.exception()) is not None:
            # Not a broker error (those are retried in _publish_run): a fault in this code
            # or a library. The lane is tried again after a backoff, not in a tight loop.
            log.error(
                "lane_publish_failed",
                lane=str(user),
                error_type=type(error).__name__,
                error=describe_error(error)[:200],
            )
            if lane is not None:
                lane.failures += 1
                lane.retry_at = time.monotonic() + _backoff(lane.failures)
        if lane is not None:
            self._settle(lane)
            if user in self._busy or self._scan_now:
                self._wake.set()  # a read, a retry, or a release for the loop to do

    async def _delete_confirmed(self, unlock: list[uuid.UUID] | None = None) -> None:
        ids = list(self._confirmed)
        if not ids and not unlock:
            return
        await self._store.release(ids, unlock or [])
        del self._confirmed[: len(ids)]

    async def _release(self) -> None:
        """Deletes the rows of confirmed requests when due, and gives up idle lanes."""
        now = time.monotonic()
        unlock = self._releasable(now)
        if unlock or (self._confirmed and now >= self._confirmed_since + self._delete_after):
            await self._delete_confirmed(unlock)

    def _releasable(self, now: float) -> list[uuid.UUID]:
        """Held lanes with nothing left to publish, idle for the hold time, or at once when
        another replica asked for them or too many locks are held. Walks the held lanes,
        so only every quarter of the hold time or when a lane is wanted."""
        crowded = len(self._held) > self._max_locks
        if not (crowded or self._scan_now or now >= self._next_idle_scan):
            return []
        self._scan_now = False
        self._next_idle_scan = now + max(self._hold / 4, 0.01)
        out: list[uuid.UUID] = []
        for lane in list(self._lanes.values()):
            if lane.publishing or lane.user_id in self._busy:
                continue
            if not lane.locked:
                del self._lanes[lane.user_id]
            elif crowded or lane.wanted or now - lane.idle_since >= self._hold:
                lane.locked, lane.next_pos = False, None
                self._held.discard(lane.user_id)
                out.append(lane.user_id)
                del self._lanes[lane.user_id]
        return out

    async def _read(self, users: list[uuid.UUID]) -> None:
        """Brings held lanes in line with the outbox: drops what another holder published
        meanwhile, takes over what others left, learns where publishing resumes."""
        found = await self._store.pending(users)
        unknown: list[uuid.UUID] = []
        for user in users:
            lane = self._lanes[user]
            state = found.get(user, LaneOutbox(accepted=0, rows=[]))
            in_outbox = {row.request_id for row in state.rows}
            # Gone from the outbox: published by another holder. Only for positions the
            # read could see: a batch committed and handed over while the read was in
            # flight is newer than its snapshot, not published.
            for request_id in [
                r
                for r, item in lane.items.items()
                if r not in in_outbox and item.lane_pos <= state.accepted
            ]:
                del lane.items[request_id]
            unknown.extend(
                r.request_id
                for r in state.rows
                if r.request_id not in lane.items and r.request_id not in self._expected
            )
            lane.next_pos = state.next_pos
            lane.needs_reading = False
            self._settle(lane)
        if unknown:
            recovered = await self._store.load(unknown)
            metrics.OUTBOX_RECOVERED.inc(len(recovered))
            log.info("outbox_recovered", count=len(recovered))
            for item in recovered:
                lane = self._lanes[item.user_id]
                lane.items.setdefault(item.request_id, item)
                self._settle(lane)
        self._recount()

    async def _sweep(self) -> None:
        """Finds lanes whose outbox rows nobody is publishing."""
        for user in await self._store.stale_lanes(self._stale_after):
            lane = self._lane(user)
            if not lane.locked:
                lane.needs_reading = True
                self._settle(lane)

    def _run_of(self, lane: _Lane) -> list[OutboxItem]:
        """The lane's contiguous run of items from next_pos (empty at a gap)."""
        assert lane.next_pos is not None
        run: list[OutboxItem] = []
        expected = lane.next_pos
        for item in sorted(lane.items.values(), key=lambda i: i.lane_pos):
            if item.lane_pos < expected:
                del lane.items[item.request_id]  # published before this holder took over
                continue
            if item.lane_pos != expected:
                break
            run.append(item)
            expected += 1
        if not run and lane.items:
            # A gap: a request of this lane accepted on another replica sits between what
            # was published and what this replica holds, or one of this replica's own is
            # between its commit and its handover. Read the outbox again shortly; the
            # handover wakes the relay sooner.
            lane.needs_reading = True
            lane.retry_at = time.monotonic() + 0.01
        return run

    async def _publish_lane(self, lane: _Lane, run: list[OutboxItem]) -> None:
        """Publishes the lane's runs for as long as one is ready: requests handed over
        while a publish was in flight go out after its confirm without waiting for a
        round of the relay (a round per confirm walked every busy lane: 6 % of the queue's
        CPU at 1,000 lanes)."""
        while await self._publish_run(lane, run):
            if self._halted or lane.needs_reading or not lane.locked:
                return
            run = self._run_of(lane)
            if not run:
                return

    async def _publish_run(self, lane: _Lane, run: list[OutboxItem]) -> bool:
        """Publishes a lane's run in order; what the broker confirmed is queued for
        deletion from the outbox. False if the broker failed (retried later)."""
        user_id = str(lane.user_id)
        try:
            # No declare first: a lane that does not exist (new, or deleted while idle)
            # sends the publish back as unroutable, and _publish_chunk declares it then.
            # Declaring first cost two broker round trips per lane after every restart,
            # all on one channel, before the first publish of any lane.
            for start in range(0, len(run), MAX_ITEMS_PER_MESSAGE):
                chunk = run[start : start + MAX_ITEMS_PER_MESSAGE]
                await self._publish_chunk(lane.user_id, chunk)
                now = time.perf_counter()
                if not self._confirmed:
                    self._confirmed_since = time.monotonic()
                    self._wake.set()  # the relay's loop deletes them within delete_after
                for item in chunk:
                    if lane.items.pop(item.request_id, None) is not None:
                        self._backlog -= 1
                    self._confirmed.append(item.request_id)
                    if item.handed_at:
                        _RELAY_SECONDS.observe(now - item.handed_at)
                lane.next_pos = chunk[-1].lane_pos + 1
                self._last_progress = time.monotonic()
        except BrokerError as exc:
            # The broker may hold a copy even so (a confirm that came too late, a publish
            # that went out after its caller gave up): the copy published next is checked
            # in the log by the worker, so that a request is never run twice.
            for item in run:
                item.recovered = True
            lane.failures += 1
            lane.retry_at = time.monotonic() + _backoff(lane.failures)
            metrics.RELAY_PUBLISH_FAILURES.labels(type(exc).__name__).inc()
            if lane.failures == 1 or lane.failures % 20 == 0:
                log.warning(
                    "lane_publish_retrying",
                    lane=user_id,
                    failures=lane.failures,
                    waiting=len(lane.items),
                    error=describe_error(exc)[:200],
                )
            lane.idle_since = time.monotonic()
            return False
        lane.failures = 0
        lane.idle_since = time.monotonic()
        return True

    async def _declare(self, user: uuid.UUID) -> None:
        await self._broker.declare_lane(str(user))

    async def _publish_chunk(self, user: uuid.UUID, chunk: list[OutboxItem]) -> None:
        user_id = str(user)
        body = lane_pb2.LaneBatch(
            user_id=user_id,
            reply_route=chunk[0].reply_route,
            items=[lane_item(i) for i in chunk],
        ).SerializeToString()
        span = None
        if tracing.enabled() and chunk[0].traceparent:
            span = tracing.start(
                f"publish {lane_queue(user_id)}",
                parent_traceparent=chunk[0].traceparent,
                kind=SpanKind.CLIENT,
                attributes={
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "publish",
                    "messaging.destination.name": lane_queue(user_id),
                    "messaging.batch.message_count": len(chunk),
                },
            )
        try:
            with tracing.current(span):
                try:
                    await self._broker.publish_lane(user_id, body, {})
                except LaneMissing:
                    # Deleted while idle since it was declared: declare it again, and
                    # announce it, since the workers stopped consuming it.
                    self._announced.discard(user)
                    await self._declare(user)
                    await self._broker.publish_lane(user_id, body, {})
        except BrokerError as exc:
            # LaneFull included: the log bounds a lane below the broker's own limit, so a
            # full lane means copies republished after a crash fill it; wait for room.
            tracing.end(span, exc)
            raise
        tracing.end(span)
        if user not in self._announced:
            await self._announce(user)

    async def _announce(self, user: uuid.UUID) -> None:
        """Tells the workers about a lane. Best effort: a worker that misses it finds the
        lane at its next ListLanes poll."""
        try:
            await self._broker.publish_control(
                lane_pb2.ControlEvent(lane_created=str(user)).SerializeToString()
            )
        except BrokerError as exc:
            log.warning("lane_announce_failed", lane=str(user), error=describe_error(exc)[:200])
            return
        self._announced.add(user)


_RELAY_SECONDS = metrics.STAGE_SECONDS.labels("relay")


def _backoff(failures: int) -> float:
    """Exponential backoff with full jitter, from 50 ms up to 2 s."""
    return random.uniform(0.0, min(2.0, 0.05 * 2 ** min(failures, 10)))
