"""How bench lanes start on a queue too busy to take new calls quickly: GetLane (where
the lane stands before it sends), and every lane open before any sends."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any
from unittest.mock import MagicMock

import grpc
import pytest

from fairlane.queue.v1 import queue_pb2
from fairlane_server.bench.runner import MAX_RESUMES_WITHOUT_PROGRESS, BenchConfig, BenchRun
from fairlane_server.bench.stats import LaneRecord


def _error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="x")


class _Stub:
    """GetLane answering from a script: an exception to raise or a last_lane_seq."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.timeouts: list[float] = []

    async def GetLane(self, request: Any, *, metadata: Any, timeout: float) -> Any:
        self.timeouts.append(timeout)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return queue_pb2.GetLaneResponse(lane=queue_pb2.Lane(last_lane_seq=step))


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda a, b: 0.0)


async def test_one_call_may_wait_the_whole_drain_timeout_and_is_not_asked_again() -> None:
    # A call given up on at its deadline still waits in the server's line: asking again
    # would add a second call behind it for every slow lane.
    run = BenchRun(BenchConfig(drain_timeout=120))
    stub = _Stub(_error(grpc.StatusCode.DEADLINE_EXCEEDED), 7)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run._lane_seq_now(stub, "token")
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(stub.timeouts) == 1
    assert 119 < stub.timeouts[0] <= 120


async def test_an_unavailable_queue_is_asked_again_within_what_is_left() -> None:
    run = BenchRun(BenchConfig(drain_timeout=120))
    stub = _Stub(_error(grpc.StatusCode.UNAVAILABLE), _error(grpc.StatusCode.UNAVAILABLE), 42)
    assert await run._lane_seq_now(stub, "token") == 42
    assert len(stub.timeouts) == 3
    assert stub.timeouts[0] >= stub.timeouts[1] >= stub.timeouts[2] > 119


async def test_a_new_user_has_no_lane_yet() -> None:
    run = BenchRun(BenchConfig(drain_timeout=5))
    assert await run._lane_seq_now(_Stub(_error(grpc.StatusCode.NOT_FOUND)), "token") == 0


class _OpeningCall:
    """A Session call whose initial metadata (the queue took it) comes when released."""

    def __init__(self) -> None:
        self.taken = asyncio.Event()

    async def initial_metadata(self) -> tuple[()]:
        await self.taken.wait()
        return ()


def _run_with_lanes(count: int, drain_timeout: float) -> BenchRun:
    run = BenchRun(BenchConfig(lanes=count, drain_timeout=drain_timeout))
    run.lanes = [
        LaneRecord(index=i, username=f"u{i}", user_id=f"id{i}", prefix=f"p.{i}.")
        for i in range(count)
    ]
    run.t_start = time.perf_counter()
    return run


async def test_no_lane_begins_before_every_lane_is_open() -> None:
    # A busy queue takes new calls slowly: lanes that sent as soon as they were open kept
    # it from taking the others' calls for minutes.
    run = _run_with_lanes(3, drain_timeout=60)
    calls = [_OpeningCall() for _ in run.lanes]
    waiting = [
        asyncio.create_task(run._open_together(lane, call))
        for lane, call in zip(run.lanes, calls, strict=True)
    ]
    calls[0].taken.set()
    calls[1].taken.set()
    await asyncio.sleep(0.01)
    assert not any(task.done() for task in waiting)
    calls[2].taken.set()
    await asyncio.wait_for(asyncio.gather(*waiting), 5)


async def test_a_lane_that_failed_before_its_session_does_not_hold_the_others() -> None:
    run = _run_with_lanes(2, drain_timeout=60)
    call = _OpeningCall()
    call.taken.set()
    waiting = asyncio.create_task(run._open_together(run.lanes[0], call))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    run._lane_open(run.lanes[1])  # its GetLane failed
    await asyncio.wait_for(waiting, 5)


async def test_lanes_begin_anyway_once_the_drain_timeout_has_passed() -> None:
    run = _run_with_lanes(2, drain_timeout=0.05)
    call = _OpeningCall()
    call.taken.set()
    started = time.perf_counter()
    await run._open_together(run.lanes[0], call)  # lane 1 never opens
    assert time.perf_counter() - started < 5
    assert not run._all_open.is_set()


def _lane_run() -> BenchRun:
    run = _run_with_lanes(1, drain_timeout=60)
    run.progress.phase = "measuring"
    return run


async def test_a_lane_whose_session_broke_before_any_answer_is_opened_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its Session went to a replica that died under it: a client opens it again (round
    # robin takes it to a live replica), it does not count the lane as failed.
    run = _lane_run()
    lane = run.lanes[0]
    outcomes: list[grpc.aio.AioRpcError | None] = [
        _error(grpc.StatusCode.UNAVAILABLE),
        None,
    ]
    sessions: list[int] = []

    async def session(lane_: LaneRecord, stub: Any, token: str) -> grpc.aio.AioRpcError | None:
        sessions.append(1)
        return outcomes.pop(0)

    async def lane_seq_now(stub: Any, token: str) -> int:
        return 0

    monkeypatch.setattr(run, "_session", session)
    monkeypatch.setattr(run, "_lane_seq_now", lane_seq_now)
    await run._lane(lane, MagicMock(), "token")
    assert len(sessions) == 2
    assert lane.stream_error == ""
    assert lane.resumes == 1


async def test_a_target_that_never_answers_fails_the_lane_after_a_few_tries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = _lane_run()
    lane = run.lanes[0]
    sessions: list[int] = []

    async def session(lane_: LaneRecord, stub: Any, token: str) -> grpc.aio.AioRpcError | None:
        sessions.append(1)
        return _error(grpc.StatusCode.UNAVAILABLE)

    async def lane_seq_now(stub: Any, token: str) -> int:
        return 0

    monkeypatch.setattr(run, "_session", session)
    monkeypatch.setattr(run, "_lane_seq_now", lane_seq_now)
    await run._lane(lane, MagicMock(), "token")
    assert len(sessions) == MAX_RESUMES_WITHOUT_PROGRESS + 1
    assert lane.stream_error.startswith("UNAVAILABLE")


class _EndedCall:
    """A Session the server ended at once, whose initial metadata never comes."""

    def __init__(self) -> None:
        self.written: list[Any] = []

    async def initial_metadata(self) -> tuple[()]:
        await asyncio.Event().wait()
        return ()

    async def read(self) -> Any:
        return grpc.aio.EOF

    async def write(self, message: Any) -> None:
        self.written.append(message)

    async def done_writing(self) -> None:
        return None

    def cancel(self) -> bool:
        return True


class _SessionStub:
    def Session(self, *, metadata: Any) -> _EndedCall:
        return _EndedCall()


@pytest.mark.parametrize(("warmup", "waits"), [(2.0, True), (0.0, False)])
async def test_only_runs_with_a_warm_up_open_their_lanes_together(
    warmup: float, waits: bool
) -> None:
    # Without a warm-up a run measures the lanes' start (new lanes): each lane goes as soon
    # as its Session is open, and 10,000 Sessions are never held open together for it.
    run = _run_with_lanes(2, drain_timeout=60)
    run.config.warmup = warmup
    session = asyncio.create_task(run._session(run.lanes[0], _SessionStub(), "token"))
    done, _ = await asyncio.wait({session}, timeout=1.0)
    assert bool(done) is not waits
    session.cancel()
    await asyncio.gather(session, return_exceptions=True)
