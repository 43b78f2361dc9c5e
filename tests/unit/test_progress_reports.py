"""A handler's progress reports: at most one per interval and attempt (the latest one
waiting goes when the interval ends), each report lets the event loop turn, and a
report's message is bounded."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane_server.worker import context
from fairlane_server.worker.attempts import Attempts
from fairlane_server.worker.context import MAX_PROGRESS_MESSAGE, AttemptContext
from fairlane_server.worker.registry import Handler


class Writer:
    def __init__(self) -> None:
        self.sent: list[common_pb2.Progress] = []
        self.second = asyncio.Event()

    def publish(self, event: Any, *, route: str) -> None:
        assert route == "queue.route"
        self.sent.append(event.progress)
        if len(self.sent) >= 2:
            self.second.set()


def _context(writer: Writer) -> AttemptContext:
    return AttemptContext(
        request_id="r1",
        user_id="u1",
        attempt=1,
        deadline=None,
        writer=writer,  # type: ignore[arg-type]
        route="queue.route",
    )


async def test_reports_in_a_tight_loop_go_once_per_interval_the_latest_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A long interval, so that the whole loop falls inside the first one however slow
    # the machine is.
    monkeypatch.setattr(context, "PROGRESS_INTERVAL", 2.0)
    writer = Writer()
    ctx = _context(writer)
    for done in range(1, 1001):
        await ctx.progress(done, 1000, f"step {done}")
    assert [(p.done, p.total, p.message) for p in writer.sent] == [(1, 1000, "step 1")]
    # The latest report waiting goes when the interval ends; the 998 between are dropped.
    await asyncio.wait_for(writer.second.wait(), 10)
    assert [(p.request_id, p.done, p.message) for p in writer.sent] == [
        ("r1", 1, "step 1"),
        ("r1", 1000, "step 1000"),
    ]


async def test_a_report_after_a_quiet_interval_goes_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(context, "PROGRESS_INTERVAL", 0.01)
    writer = Writer()
    ctx = _context(writer)
    await ctx.progress(1)
    await asyncio.sleep(0.05)  # past the interval: nothing waits, so the next goes now
    await ctx.progress(2)
    assert [p.done for p in writer.sent] == [1, 2]


async def test_each_report_lets_the_loop_turn() -> None:
    writer = Writer()
    ctx = _context(writer)
    ran = asyncio.Event()

    async def bystander() -> None:
        ran.set()

    task = asyncio.create_task(bystander())
    seen_before_end = []
    for done in range(3):
        await ctx.progress(done)  # nothing else awaited in this loop
        seen_before_end.append(ran.is_set())
    await task
    assert seen_before_end[0] is True


async def test_a_long_message_is_cut() -> None:
    writer = Writer()
    await _context(writer).progress(1, 2, "x" * (MAX_PROGRESS_MESSAGE * 100))
    assert len(writer.sent[0].message) == MAX_PROGRESS_MESSAGE


async def test_an_ended_attempt_reports_nothing_more(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context, "PROGRESS_INTERVAL", 2.0)
    writer = Writer()
    ctx = _context(writer)
    await ctx.progress(1)
    await ctx.progress(2)  # waits for the interval to end
    ctx.end()
    ctx._send_waiting()  # what the interval's timer does when it fires
    await ctx.progress(3)
    assert [p.done for p in writer.sent] == [1]


class RecordingWriter:
    """What an attempt uses of the result writer, recording the progress it publishes."""

    def __init__(self) -> None:
        self.progress: list[int] = []

    def running(self, *args: Any) -> None:
        pass

    def publish(self, event: Any, *, route: str) -> None:
        self.progress.append(event.progress.done)


class NoDeadLetters:
    async def request(self, *args: Any) -> None:
        raise AssertionError("nothing goes to dead letters here")


async def test_a_task_the_handler_left_running_reports_nothing_after_the_attempt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A handler that returns while a task of its own goes on reporting: its reports after
    # the result would reach the client's Session after the result, or in the middle of a
    # retry's attempt. No interval, so that a report would go at once.
    monkeypatch.setattr(context, "PROGRESS_INTERVAL", 0.0)
    writer = RecordingWriter()
    attempts = Attempts(
        writer=writer,  # type: ignore[arg-type]
        dead_letters=NoDeadLetters(),  # type: ignore[arg-type]
        concurrency=2,
        retry_base=0.1,
        retry_max=1.0,
    )
    go_on = asyncio.Event()
    left: list[asyncio.Task[None]] = []

    async def later(ctx: Any) -> None:
        await go_on.wait()
        await ctx.progress(2)

    async def handler(ctx: Any, payload: bytes) -> bytes:
        await ctx.progress(1)
        left.append(asyncio.create_task(later(ctx)))
        return payload

    rid = uuid.uuid4()
    user = uuid.uuid4()
    outcome = await attempts.run(
        lane_pb2.LaneBatch(user_id=str(user), reply_route="r"),
        lane_pb2.LaneItem(request_id=str(rid), payload=b"x"),
        Handler("bg", handler, True, 1, None, ""),
        0,
        request_id=rid,
        user=user,
        gate=_open_gate,
    )
    assert outcome.status == "SUCCEEDED"
    go_on.set()
    await left[0]
    assert writer.progress == [1]


async def _open_gate() -> None:
    pass
