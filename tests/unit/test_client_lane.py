"""The Python client's Lane: what GetLane says, including an operator's pause."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from fairlane.client import Lane
from fairlane.queue.v1 import queue_pb2


def test_a_lane_says_when_it_was_paused_and_an_unpaused_one_says_none() -> None:
    paused = Timestamp()
    paused.FromDatetime(datetime(2026, 12, 7, 16, 0, tzinfo=UTC))
    lane = Lane.from_proto(
        queue_pb2.Lane(user_id="u1", queue_name="fairlane.lane.u1", pending=2, paused_at=paused)
    )
    assert lane.paused_at == datetime(2026, 12, 7, 16, 0, tzinfo=UTC)
    assert (lane.user_id, lane.pending) == ("u1", 2)
    assert Lane.from_proto(queue_pb2.Lane(user_id="u1")).paused_at is None
