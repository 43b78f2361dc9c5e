"""The HandlerContext a worker hands to each handler attempt."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fairlane.common.v1 import common_pb2, lane_pb2
from services.core.logging import get_logger
from services.worker.writer import ResultWriter


class Context:
    __slots__ = ("_route", "_writer", "attempt", "deadline", "logger", "request_id", "user_id")

    def __init__(
        self,
        *,
        request_id: str,
        user_id: str,
        attempt: int,
        deadline: datetime | None,
        writer: ResultWriter,
        route: str,
    ) -> None:
        self.request_id = request_id
        self.user_id = user_id
        self.attempt = attempt
        self.deadline = deadline
        self._writer = writer
        self._route = route
        self.logger: Any = get_logger("fairlane.handler").bind(
            request_id=request_id, attempt=attempt
        )

    async def progress(self, done: int, total: int = 0, message: str = "") -> None:
        self._writer.publish(
            lane_pb2.LaneEvent(
                user_id=self.user_id,
                progress=common_pb2.Progress(
                    request_id=self.request_id, done=done, total=total, message=message
                ),
            ),
            route=self._route,
        )
