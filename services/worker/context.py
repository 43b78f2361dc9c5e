"""The context a worker hands to each handler attempt: its implementation of
fairlane.handlers.HandlerContext, reporting progress through the result writer."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane_server.core.logging import get_logger
from fairlane_server.worker.writer import ResultWriter


class AttemptContext:
    __slots__ = ("_logger", "_route", "_writer", "attempt", "deadline", "request_id", "user_id")

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
        self._logger: Any = None

    @property
    def logger(self) -> Any:
        # Bound on first use: most handlers never log, and binding costs on the hot path.
        if self._logger is None:
            self._logger = get_logger("fairlane.handler").bind(
                request_id=self.request_id, attempt=self.attempt
            )
        return self._logger

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
