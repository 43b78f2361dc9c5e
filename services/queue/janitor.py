"""Deletes idle lanes: no open session, nothing pending, no activity for lane_idle_ttl.

Deletion is RabbitMQ's if-empty, so a message that arrives meanwhile is never dropped; a
later request declares the lane again (see Intake) and announces it to the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid

from sqlalchemy.exc import SQLAlchemyError

from fairlane.common.v1 import lane_pb2
from services.core import metrics
from services.core.broker import Broker, BrokerError
from services.core.logging import get_logger
from services.queue.hub import Hub
from services.queue.store import RequestStore

log = get_logger(__name__)


class LaneJanitor:
    def __init__(
        self, store: RequestStore, broker: Broker, hub: Hub, *, idle_seconds: float
    ) -> None:
        self._store = store
        self._broker = broker
        self._hub = hub
        self._idle = idle_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="lane-janitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        interval = min(max(self._idle / 3, 0.2), 15.0)
        while True:
            # Jitter keeps replicas from sweeping in lockstep.
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
            try:
                await self.sweep()
            except (SQLAlchemyError, OSError, BrokerError) as exc:
                log.warning("lane_sweep_failed", error=str(exc))

    async def sweep(self) -> list[str]:
        """One pass; returns the lanes it deleted. Also records lane depth."""
        deepest, total = await self._store.queued_depth()
        metrics.LANE_DEPTH.set(deepest)
        metrics.LANE_DEPTH_TOTAL.set(total)
        # Open sessions on this replica keep their lanes alive for every replica.
        await self._store.touch_lanes([uuid.UUID(u) for u in self._hub.users()])
        deleted: list[str] = []
        for user in await self._store.idle_lanes(self._idle):
            user_id = str(user)
            if self._hub.has_subscribers(user_id):
                continue
            if not await self._broker.delete_lane(user_id):
                continue  # a message arrived meanwhile: not idle after all
            await self._broker.publish_control(
                lane_pb2.ControlEvent(lane_deleted=user_id).SerializeToString()
            )
            deleted.append(user_id)
            log.info("lane_deleted", lane=user_id)
        return deleted
