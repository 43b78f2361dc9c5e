"""Fan-out of worker events (results, progress) to the sessions and watchers of this replica."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from fairlane.common.v1 import lane_pb2
from fairlane_server.core.logging import get_logger

log = get_logger(__name__)


class Hub:
    """Routes LaneEvents by user id to every subscriber of that user on this replica."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[asyncio.Queue[lane_pb2.LaneEvent]]] = defaultdict(set)

    def subscribe(self, user_id: str) -> asyncio.Queue[lane_pb2.LaneEvent]:
        queue: asyncio.Queue[lane_pb2.LaneEvent] = asyncio.Queue()
        self._subscribers[user_id].add(queue)
        return queue

    def unsubscribe(self, user_id: str, queue: asyncio.Queue[lane_pb2.LaneEvent]) -> None:
        subs = self._subscribers.get(user_id)
        if subs is not None:
            subs.discard(queue)
            if not subs:
                del self._subscribers[user_id]

    def users(self) -> list[str]:
        return list(self._subscribers)

    def has_subscribers(self, user_id: str) -> bool:
        return user_id in self._subscribers

    def wake(self, user_ids: list[str]) -> None:
        """Tells the users' subscribers that the log has news for them: an event with no
        kind, on which watchers read the log (sessions ignore it)."""
        for user_id in user_ids:
            for queue in self._subscribers.get(user_id, ()):
                queue.put_nowait(lane_pb2.LaneEvent(user_id=user_id))

    def wake_all(self) -> None:
        self.wake(list(self._subscribers))

    async def on_message(self, body: bytes) -> None:
        batch = lane_pb2.LaneEventBatch()
        try:
            batch.ParseFromString(body)
        except Exception:
            log.warning("bad_event_batch", size=len(body))
            return
        for event in batch.events:
            for queue in self._subscribers.get(event.user_id, ()):
                queue.put_nowait(event)
