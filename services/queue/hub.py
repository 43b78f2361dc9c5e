"""Fan-out of worker events (results, progress) to the sessions and watchers of this replica."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable

from fairlane.common.v1 import lane_pb2
from fairlane_server.core.logging import get_logger

log = get_logger(__name__)


Sink = Callable[[lane_pb2.LaneEvent], None]


class Hub:
    """Routes LaneEvents by user id to every subscriber of that user on this replica.

    A subscriber is a sink, called with each event as it arrives. A Session's sink handles
    the event on the spot; a watcher's keeps it in a bounded inbox (services/queue/watch.py);
    `subscribe` gives an unbounded queue's put_nowait instead (the tests use it). A Session
    used to take its events through a queue and a task of its own: a task, a queue and a
    turn of the loop per event, for work that never waits."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Sink]] = defaultdict(set)

    def listen(self, user_id: str, sink: Sink) -> None:
        self._subscribers[user_id].add(sink)

    def unlisten(self, user_id: str, sink: Sink) -> None:
        subs = self._subscribers.get(user_id)
        if subs is not None:
            subs.discard(sink)
            if not subs:
                del self._subscribers[user_id]

    def subscribe(self, user_id: str) -> asyncio.Queue[lane_pb2.LaneEvent]:
        queue: asyncio.Queue[lane_pb2.LaneEvent] = asyncio.Queue()
        self.listen(user_id, queue.put_nowait)
        return queue

    def unsubscribe(self, user_id: str, queue: asyncio.Queue[lane_pb2.LaneEvent]) -> None:
        self.unlisten(user_id, queue.put_nowait)

    def users(self) -> list[str]:
        return list(self._subscribers)

    def has_subscribers(self, user_id: str) -> bool:
        return user_id in self._subscribers

    def wake(self, user_ids: list[str]) -> None:
        """Tells the users' subscribers that the log has news for them: an event with no
        kind, on which watchers read the log (sessions ignore it)."""
        for user_id in user_ids:
            for sink in list(self._subscribers.get(user_id, ())):
                _call(sink, lane_pb2.LaneEvent(user_id=user_id))

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
            # A copy of the set: a sink may end its subscriber (a Session's last result).
            for sink in list(self._subscribers.get(event.user_id, ())):
                _call(sink, event)


def _call(sink: Sink, event: lane_pb2.LaneEvent) -> None:
    """One subscriber's fault reaches none of the others."""
    try:
        sink(event)
    except Exception:
        log.exception("hub_subscriber_failed", user=event.user_id)
