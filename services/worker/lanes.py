"""The lanes a worker consumes: one consumer and one sequential task per lane, and the
supervision that rebuilds a lane whose task ended unexpectedly."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from fairlane_server.core import metrics
from fairlane_server.core.broker import Broker, BrokerError, Delivery, LaneConsumer, LaneMissing
from fairlane_server.core.describe import describe_error
from fairlane_server.core.logging import get_logger

log = get_logger(__name__)


FAILURES_FORGOTTEN = 300.0


class ConsumedLane:
    """One lane: deliveries are processed one message at a time, in order."""

    def __init__(
        self,
        user_id: str,
        process: Callable[[ConsumedLane, Delivery], Awaitable[None]],
        on_failed: Callable[[str], None],
    ) -> None:
        self.user_id = user_id
        self._process = process
        self._on_failed = on_failed
        self.deliveries: asyncio.Queue[Delivery] = asyncio.Queue()
        self.resumed = asyncio.Event()
        self.resumed.set()
        self.consumer: LaneConsumer | None = None
        # Set while the lane waits for a message or at a closed gate: nothing of it runs.
        self.quiet = asyncio.Event()
        self.acks: set[asyncio.Task[None]] = set()
        self._busy = False  # within a message (False while waiting for the next one)
        self._stopping = False  # hand the lane back once the current message is done
        self.task = asyncio.create_task(self._run(), name=f"lane-{user_id}")
        self.task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or (self._stopping and task.exception() is None):
            return  # released on purpose
        error = task.exception()
        log.error(
            "lane_task_failed",
            lane=self.user_id,
            error=f"{type(error).__name__}: {error}"[:300],
        )
        metrics.LANE_FAILURES.inc()
        self._on_failed(self.user_id)

    async def on_delivery(self, delivery: Delivery) -> None:
        self.deliveries.put_nowait(delivery)

    async def _run(self) -> None:
        while not self._stopping:
            self.quiet.set()
            self._busy = False
            delivery = await self.deliveries.get()
            self._busy = True
            self.quiet.clear()
            if delivery.stale:
                continue  # its channel died; the broker redelivers it on the new one
            await self._process(self, delivery)

    @property
    def alive(self) -> bool:
        """Consuming and processing. A lane whose task ended (a bug in processing) is not:
        it is rebuilt, and its unacked messages go back to the lane in order first."""
        return self.consumer is not None and self.consumer.alive and not self.task.done()

    async def settled(self) -> None:
        """Waits until nothing of the lane runs and its finished messages are acked."""
        await self.quiet.wait()
        await asyncio.gather(*list(self.acks), return_exceptions=True)

    async def settled_acks(self) -> None:
        """Waits until every finished message's outcomes are written and acked."""
        await asyncio.gather(*list(self.acks), return_exceptions=True)

    async def finish_message(self, within: float) -> bool:
        """Stops the lane's task at its next message boundary: at once when it waits for
        a message, else once the message in progress is done. False (and the lane goes on
        as before) if that takes longer than `within` seconds."""
        if self.task.done():
            return True
        if not self._busy:
            # Waiting for a delivery: nothing is in progress, and a cancelled get() takes
            # no message off the queue.
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            return True
        self._stopping = True
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(self.task)
        except TimeoutError:
            self._stopping = False
            return False
        return True

    async def release(self, *, finish_current: float = 0.0) -> None:
        """Stops processing, then consuming: whatever was not acked goes back to the lane
        in order. With `finish_current`, the message in progress is first finished (up to
        that many seconds) and its outcomes written and acked, so the lane moves between
        messages; past that, or without it, the message is cut short and goes back whole
        (its finished requests are not run again: the next holder finds them in the log)."""
        if finish_current > 0:
            await self.finish_message(finish_current)
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        # A task that ended with an error was already reported by _ended; not re-raised.
        # Finished messages are acked before the channel closes (their outcomes are
        # durable), so they are not delivered again.
        await asyncio.gather(*list(self.acks), return_exceptions=True)
        if self.consumer is not None:
            await self.consumer.cancel()


class _LaneLocks:
    """An asyncio.Lock per lane, kept only while someone holds or waits for it.

    A lock per lane, not one for the set: a lane's consume is four round trips to the
    broker (channel, prefetch, passive declare, consume), and a burst of new lanes (thousands
    announced at once) waited for each other's under one lock. Counted, so that a lock is
    dropped only when nobody waits for it: a waiter on a dropped lock and a newcomer with a
    fresh one would both hold the lane."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, user_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(user_id) or (asyncio.Lock(), 0)
        self._locks[user_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[user_id]
            if users == 1:
                del self._locks[user_id]
            else:
                self._locks[user_id] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class LaneSet:
    """The lanes of one worker replica, keyed by user id."""

    def __init__(
        self,
        broker: Broker,
        *,
        prefetch: int,
        process: Callable[[ConsumedLane, Delivery], Awaitable[None]],
    ) -> None:
        self._broker = broker
        self._prefetch = prefetch
        self._process = process
        self.lanes: dict[str, ConsumedLane] = {}
        self.accepting = True  # False once the worker drains: no lane is taken again
        self._locks = _LaneLocks()
        # lane -> (task failures in a row, loop time of the last one)
        self._failures: dict[str, tuple[int, float]] = {}
        self._rebuilds: set[asyncio.Task[None]] = set()

    async def add(self, user_id: str) -> None:
        """Consumes the lane; a lane whose consumer died (broker connection lost) or whose
        task ended is consumed again from scratch."""
        async with self._locks.hold(user_id):
            if not self.accepting:
                return
            existing = self.lanes.get(user_id)
            if existing is not None:
                if existing.alive:
                    return
                del self.lanes[user_id]
                await existing.release()
            lane = ConsumedLane(user_id, self._process, self.rebuild_later)
            try:
                lane.consumer = await self._broker.consume_lane(
                    user_id, lane.on_delivery, prefetch=self._prefetch
                )
            except BaseException:
                await lane.release()  # whatever failed, its task must not outlive it
                raise
            if not self.accepting:
                # The worker began to drain during the consume, and may have listed its
                # lanes to hand back already: this one goes back at once.
                await lane.release()
                return
            self.lanes[user_id] = lane
            metrics.ACTIVE_LANES.set(len(self.lanes))

    async def remove(self, user_id: str, *, finish_current: float = 30.0) -> None:
        """Hands the lane back between messages (see ConsumedLane.release): its unacked
        messages return to the lane in order, for the next consumer."""
        async with self._locks.hold(user_id):
            lane = self.lanes.pop(user_id, None)
            metrics.ACTIVE_LANES.set(len(self.lanes))
        if lane is not None:
            await lane.release(finish_current=finish_current)

    async def repair(self) -> int:
        """Consumes again every lane whose consumer or task died (connection lost, or the
        broker cancelled it because the janitor deleted the lane); returns how many. A
        deleted lane is left alone: its next request declares and announces it again."""
        dead = [u for u, lane in list(self.lanes.items()) if not lane.alive]
        for user_id in dead:
            with contextlib.suppress(LaneMissing):
                await self.add(user_id)
        return len(dead)

    def rebuild_later(self, user_id: str) -> None:
        """Consumes a lane again whose task ended unexpectedly, after a growing delay (a
        message that breaks processing every time must not spin the worker)."""
        now = time.monotonic()
        count, last = self._failures.get(user_id, (0, now))
        # A lane quiet for FAILURES_FORGOTTEN since its last failure starts again at the
        # shortest delay: one bad message must not slow its rebuilds for the process's life.
        failures = count + 1 if now - last < FAILURES_FORGOTTEN else 1
        self._failures[user_id] = (failures, now)
        delay = min(30.0, 0.25 * 2 ** (failures - 1))

        async def rebuild() -> None:
            await asyncio.sleep(delay)
            try:
                await self.add(user_id)
            except BrokerError as exc:
                log.warning("lane_rebuild_failed", lane=user_id, error=describe_error(exc)[:200])

        task = asyncio.create_task(rebuild(), name=f"rebuild-{user_id}")
        self._rebuilds.add(task)
        task.add_done_callback(self._rebuilds.discard)
