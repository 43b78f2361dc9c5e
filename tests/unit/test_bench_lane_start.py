"""How a bench lane learns where its lane stands before it sends (GetLane), on a queue
too busy to take new calls quickly."""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest

from fairlane.queue.v1 import queue_pb2
from fairlane_server.bench.runner import BenchConfig, BenchRun


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
