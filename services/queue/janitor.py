"""Deletes idle lanes: no open session, nothing pending, no activity for lane_idle_ttl,
and not paused (a lane paused by an operator keeps its queue until it is resumed).

A sweep pages through every idle lane (keyset pagination, PAGE_SIZE rows a query), so it
holds at any number of lanes; a deletion is recorded in the lane's row
(lanes.queue_deleted_at), so the next sweep does not delete the same queue again, until the
lane is active again.

Why a deletion never drops a message: the deletion runs while the lane's row is claimed
in the request log, and every enqueue touches that row before it publishes (see
LaneHousekeepingStore.delete_if_idle). That fence is what makes quorum lanes safe to
delete: RabbitMQ 3.10 refuses if-empty on quorum queues (with a connection-level
NOT_IMPLEMENTED), so the broker alone cannot check and delete in one step. The broker's
own emptiness check (AmqpBroker.delete_lane) only backs it up. A later request declares
the lane again (see Intake) and announces it to the workers.
"""

from __future__ import annotations

import asyncio
import random
import uuid

from sqlalchemy.exc import SQLAlchemyError

from fairlane.common.v1 import lane_pb2
from fairlane_server.core import metrics
from fairlane_server.core.broker import Broker, BrokerError
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait
from fairlane_server.queue.hub import Hub
from fairlane_server.queue.lane_store import IdleLane, LaneHousekeepingStore
from fairlane_server.queue.store import RequestStore

log = get_logger(__name__)

PAGE_SIZE = 100
# A delete whose answer was lost (timeout, connection gone) is asked again, with these
# pauses between, before the claim is given up: see _delete_settled.
SETTLE_PAUSES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class DeletionUncertain(BrokerError):
    """The broker never answered whether it deleted the lane."""


class LaneJanitor:
    def __init__(
        self,
        store: RequestStore,
        lanes: LaneHousekeepingStore,
        broker: Broker,
        hub: Hub,
        *,
        idle_seconds: float,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self._store = store
        self._lanes = lanes
        self._broker = broker
        self._hub = hub
        self._idle = idle_seconds
        self._page_size = page_size
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lane-janitor")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        interval = min(max(self._idle / 3, 0.2), 15.0)
        while True:
            # Jitter keeps replicas from sweeping in lockstep.
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await self.sweep()
            except (SQLAlchemyError, OSError, BrokerError) as exc:
                log.warning("lane_sweep_failed", error=str(exc))
            except Exception:
                # A loop that runs for the process's life: one bad pass must not end it.
                log.exception("lane_sweep_failed_unexpectedly")

    async def sweep(self) -> list[str]:
        """One pass over every idle lane; returns the lanes it deleted. Also records lane
        depth."""
        deepest, total = await self._store.queued_depth()
        metrics.LANE_DEPTH.set(deepest)
        metrics.QUEUED_REQUESTS.set(total)
        # Open sessions on this replica keep their lanes alive for every replica.
        await self._lanes.touch([uuid.UUID(u) for u in self._hub.users()])
        deleted: list[str] = []
        after: uuid.UUID | None = None
        while True:
            page = await self._lanes.idle_page(
                after=after, limit=self._page_size, idle_seconds=self._idle
            )
            for lane in page:
                if await self._delete(lane):
                    deleted.append(str(lane.user_id))
            if len(page) < self._page_size:
                return deleted
            after = page[-1].user_id

    async def _delete(self, lane: IdleLane) -> bool:
        user_id = str(lane.user_id)
        if self._hub.has_subscribers(user_id):
            return False

        try:
            if not await self._lanes.delete_if_idle(
                lane, self._idle, lambda: self._delete_settled(user_id)
            ):
                return False  # active again, or a message arrived: not idle after all
        except DeletionUncertain as exc:
            log.exception("lane_delete_uncertain", lane=user_id, error=str(exc))
            return False
        log.info("lane_deleted", lane=user_id)
        try:
            await self._broker.publish_control(
                lane_pb2.ControlEvent(lane_deleted=user_id).SerializeToString()
            )
        except BrokerError as exc:
            # Workers notice anyway: the broker cancelled their consumers of the lane.
            log.warning("lane_deleted_event_failed", lane=user_id, error=str(exc))
        return True

    async def _delete_settled(self, user_id: str) -> bool:
        """The broker's delete, with a definite answer before the claim ends.

        A delete whose answer is lost (a timeout, the connection gone) may still be carried
        out by the broker, so the claim must not let an enqueue in before it is known
        whether the queue is gone: the delete is asked again (it is idempotent) on a fresh
        channel, on another node if the housekeeping connection moved, until the broker
        answers. Meanwhile an enqueue of this lane waits on its row (an idle lane rarely
        has one). If it never answers, the claim is given up and that is logged as an
        error: the one case the fence cannot cover."""
        for pause in (*SETTLE_PAUSES, None):
            try:
                return await self._broker.delete_lane(user_id)
            except BrokerError as exc:
                if pause is None:
                    raise DeletionUncertain(str(exc)) from exc
                log.warning("lane_delete_unanswered", lane=user_id, error=str(exc))
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")
