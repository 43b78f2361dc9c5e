"""The context a worker hands to each handler attempt: its implementation of
fairlane.handlers.HandlerContext, reporting progress through the result writer.

Progress is advice, and a handler may report it in a tight loop: 200,000 reports from
three handlers held another user's echo from 26 ms to 0.3-4.3 s, as every report was a
message through the worker, the broker and the queue, and a report never let the event
loop run anything else. So an attempt sends at most one report per PROGRESS_INTERVAL: one
that comes sooner replaces the one waiting, which goes when the interval ends (the latest
report always goes, unless the result overtakes it); each report lets the loop turn once;
and a message is cut to MAX_PROGRESS_MESSAGE characters. Once its attempt has ended, a
context sends nothing: a task the handler left running would otherwise report progress
after the result, or in the middle of the next attempt.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane_server.core.logging import get_logger
from fairlane_server.worker.writer import ResultWriter

PROGRESS_INTERVAL = 0.05  # seconds between two reports of one attempt, at least
MAX_PROGRESS_MESSAGE = 1024  # characters of a report's message


class AttemptContext:
    # The identity is read-only: the worker keys the attempt's lane and its progress on it,
    # and a handler that wrote ctx.user_id let the next request of its lane start beside an
    # abandoned one, or sent its progress to another user's Session.
    __slots__ = (
        "_attempt",
        "_deadline",
        "_ended",
        "_last_sent",
        "_logger",
        "_request_id",
        "_route",
        "_user_id",
        "_waiting",
        "_writer",
    )

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
        self._request_id = request_id
        self._user_id = user_id
        self._attempt = attempt
        self._deadline = deadline
        self._writer = writer
        self._route = route
        self._logger: Any = None
        self._last_sent = float("-inf")  # loop time of the last report sent
        # The report waiting for the interval to end (its timer is running), if any.
        self._waiting: common_pb2.Progress | None = None
        self._ended = False

    def end(self) -> None:
        """The attempt is over: reports from now on, and the one waiting, are dropped."""
        self._ended = True
        self._waiting = None

    @property
    def request_id(self) -> str:
        return self._request_id

    @property
    def user_id(self) -> str:
        return self._user_id

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def deadline(self) -> datetime | None:
        return self._deadline

    @property
    def logger(self) -> Any:
        # Bound on first use: most handlers never log, and binding costs on the hot path.
        if self._logger is None:
            self._logger = get_logger("fairlane.handler").bind(
                request_id=self.request_id, attempt=self.attempt
            )
        return self._logger

    async def progress(self, done: int, total: int = 0, message: str = "") -> None:
        if self._ended:
            await asyncio.sleep(0)
            return
        report = common_pb2.Progress(
            request_id=self.request_id,
            done=done,
            total=total,
            message=message[:MAX_PROGRESS_MESSAGE],
        )
        loop = asyncio.get_running_loop()
        wait = self._last_sent + PROGRESS_INTERVAL - loop.time()
        if wait <= 0 and self._waiting is None:
            self._send(report, loop.time())
        else:
            if self._waiting is None:
                loop.call_later(max(wait, 0.0), self._send_waiting)
            self._waiting = report
        # One turn of the loop: a handler reporting in a loop without awaiting anything
        # else would otherwise hold every other attempt of this worker still.
        await asyncio.sleep(0)

    def _send_waiting(self) -> None:
        report, self._waiting = self._waiting, None
        if report is not None:
            self._send(report, asyncio.get_running_loop().time())

    def _send(self, report: common_pb2.Progress, now: float) -> None:
        self._last_sent = now
        self._writer.publish(
            lane_pb2.LaneEvent(user_id=self.user_id, progress=report), route=self._route
        )
