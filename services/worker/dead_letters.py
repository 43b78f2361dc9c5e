"""Dead letters: requests that used up their attempts, and messages no worker can read,
go to the fairlane.dead exchange with their history for an operator."""

from __future__ import annotations

import json

from fairlane.common.v1 import lane_pb2
from fairlane_server.core import metrics
from fairlane_server.core.broker import Broker, BrokerError
from fairlane_server.core.describe import describe_error
from fairlane_server.core.logging import get_logger
from fairlane_server.worker.store import Attempt

log = get_logger(__name__)


class DeadLetters:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    async def request(
        self, batch: lane_pb2.LaneBatch, item: lane_pb2.LaneItem, attempts: list[Attempt]
    ) -> None:
        """A request that failed every attempt, with the history of its attempts."""
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
            log.warning(
                "dead_letter_publish_failed", request_id=item.request_id, error=describe_error(exc)
            )

    async def unreadable(self, body: bytes, reason: str) -> None:
        """A lane message (or item) that cannot be decoded: kept for inspection, never run."""
        try:
            await self._broker.publish_dead(body, {"reason": reason})
        except BrokerError as exc:
            log.warning(
                "dead_letter_publish_failed", reason=reason, error=describe_error(exc)[:200]
            )
