"""The replica's fan-out: worker events reach every subscriber of their user and no one
else; a wake-up tells watchers to read the log."""

from __future__ import annotations

import asyncio

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane_server.queue.hub import Hub


def _result(user: str, request_id: str, seq: int) -> lane_pb2.LaneEvent:
    return lane_pb2.LaneEvent(
        user_id=user, result=common_pb2.Result(request_id=request_id, lane_seq=seq)
    )


def _progress(user: str, request_id: str, done: int) -> lane_pb2.LaneEvent:
    return lane_pb2.LaneEvent(
        user_id=user, progress=common_pb2.Progress(request_id=request_id, done=done)
    )


def _body(*events: lane_pb2.LaneEvent) -> bytes:
    return lane_pb2.LaneEventBatch(events=events).SerializeToString()


def _drain(queue: asyncio.Queue[lane_pb2.LaneEvent]) -> list[lane_pb2.LaneEvent]:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


async def test_a_batch_reaches_every_subscriber_of_each_user_in_order() -> None:
    hub = Hub()
    alice_session, alice_watch = hub.subscribe("alice"), hub.subscribe("alice")
    bob = hub.subscribe("bob")
    await hub.on_message(
        _body(
            _result("alice", "a1", 1),
            _progress("bob", "b1", 3),
            _result("alice", "a2", 2),
            _result("bob", "b1", 1),
        )
    )
    for queue in (alice_session, alice_watch):
        assert [e.result.lane_seq for e in _drain(queue)] == [1, 2]
    assert [e.WhichOneof("kind") for e in _drain(bob)] == ["progress", "result"]


async def test_events_of_users_with_no_subscriber_here_are_dropped() -> None:
    hub = Hub()
    alice = hub.subscribe("alice")
    await hub.on_message(_body(_result("carol", "c1", 1)))
    assert alice.empty()
    assert not hub.has_subscribers("carol")


async def test_an_unsubscribed_queue_gets_nothing_more_and_the_user_is_forgotten() -> None:
    hub = Hub()
    first, second = hub.subscribe("alice"), hub.subscribe("alice")
    hub.unsubscribe("alice", first)
    await hub.on_message(_body(_result("alice", "a1", 1)))
    assert first.empty()
    assert len(_drain(second)) == 1
    assert hub.users() == ["alice"]
    hub.unsubscribe("alice", second)
    assert not hub.has_subscribers("alice")
    assert hub.users() == []
    hub.unsubscribe("alice", second)  # twice is harmless


async def test_an_undecodable_message_is_dropped_without_harm() -> None:
    hub = Hub()
    alice = hub.subscribe("alice")
    await hub.on_message(b"\xff\xff\xff not a batch")
    await hub.on_message(_body(_result("alice", "a1", 1)))
    assert [e.result.request_id for e in _drain(alice)] == ["a1"]


async def test_a_wake_up_is_an_event_of_no_kind_for_the_named_users_only() -> None:
    hub = Hub()
    alice, bob, carol = hub.subscribe("alice"), hub.subscribe("bob"), hub.subscribe("carol")
    hub.wake(["alice", "bob", "nobody"])
    for queue, user in ((alice, "alice"), (bob, "bob")):
        woken = _drain(queue)
        assert [(e.user_id, e.WhichOneof("kind")) for e in woken] == [(user, None)]
    assert carol.empty()


async def test_wake_all_reaches_every_subscriber() -> None:
    hub = Hub()
    queues = [hub.subscribe("alice"), hub.subscribe("alice"), hub.subscribe("bob")]
    hub.wake_all()
    assert [len(_drain(q)) for q in queues] == [1, 1, 1]


async def test_a_listener_is_called_with_each_event_and_a_failing_one_harms_no_other() -> None:
    hub = Hub()
    got: list[str] = []

    def session(event: lane_pb2.LaneEvent) -> None:
        got.append(event.result.request_id)

    def broken(event: lane_pb2.LaneEvent) -> None:
        raise RuntimeError("a bug in one subscriber")

    hub.listen("alice", broken)
    hub.listen("alice", session)
    watcher = hub.subscribe("alice")
    await hub.on_message(_body(_result("alice", "a1", 1), _result("alice", "a2", 2)))
    assert got == ["a1", "a2"]
    assert [e.result.request_id for e in _drain(watcher)] == ["a1", "a2"]
    hub.unlisten("alice", session)
    hub.unlisten("alice", broken)
    hub.unsubscribe("alice", watcher)
    assert not hub.has_subscribers("alice")


async def test_a_listener_that_leaves_while_called_does_not_upset_the_fan_out() -> None:
    hub = Hub()
    got: list[str] = []

    def last_result(event: lane_pb2.LaneEvent) -> None:
        got.append(event.result.request_id)
        hub.unlisten("alice", last_result)  # a Session ending on its last result

    hub.listen("alice", last_result)
    other = hub.subscribe("alice")
    await hub.on_message(_body(_result("alice", "a1", 1), _result("alice", "a2", 2)))
    assert got == ["a1"]
    assert [e.result.request_id for e in _drain(other)] == ["a1", "a2"]
