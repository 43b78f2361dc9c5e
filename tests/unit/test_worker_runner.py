"""The worker's runner on the in-memory broker with an in-memory request log: the retry loop
(backoff, dead letters, permanent failures, cancels), lane order, copies of requests that
are finished or running, a lane whose task breaks being rebuilt, and lane pauses (held from
a lane's first request, stored and announced, kept in step with the lane listing)."""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY

from fairlane.common.v1 import lane_pb2
from fairlane.handlers import PermanentError
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.worker.registry import Handler
from fairlane_server.worker.runner import Runner, RunnerState
from fairlane_server.worker.store import Outcome, StoredState
from fairlane_server.worker.writer import ResultWriter
from tests.polling import until

ROUTE = "queue.test"


class MemoryLog:
    """The part of the request log a worker reads and writes, kept in a dict."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, StoredState] = {}
        self.outcomes: list[Outcome] = []
        self.running_marks: list[tuple[uuid.UUID, int]] = []
        self.marked = asyncio.Event()
        self.last_seq: dict[uuid.UUID, int] = {}
        self.fail_reads = 0
        # The lanes table: the lanes that exist, and those paused.
        self.lanes: set[str] = set()
        self.paused: set[str] = set()
        self.pause_reads = 0
        self.pause_read_gate = asyncio.Event()
        self.pause_read_gate.set()
        self.fail_pause_reads = False

    async def set_lane_paused(self, user_id: uuid.UUID, paused: bool) -> bool:
        lane = str(user_id)
        if lane not in self.lanes:
            return False
        if paused:
            self.paused.add(lane)
        else:
            self.paused.discard(lane)
        return True

    async def paused_lanes(self) -> set[str]:
        return set(self.paused)

    async def lane_paused(self, user_id: uuid.UUID) -> bool | None:
        self.pause_reads += 1
        await self.pause_read_gate.wait()
        if self.fail_pause_reads:
            raise RuntimeError("the log is down")
        lane = str(user_id)
        return None if lane not in self.lanes else lane in self.paused

    def queued(self, request_id: uuid.UUID) -> None:
        self.rows[request_id] = StoredState("QUEUED", None, 0, None, None, "", "h")

    async def states(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StoredState]:
        if self.fail_reads:
            self.fail_reads -= 1
            raise RuntimeError("a bug while reading states")
        return {i: self.rows[i] for i in ids if i in self.rows}

    async def finish(
        self, outcomes: Sequence[Outcome], running: Sequence[tuple[uuid.UUID, int, datetime]] = ()
    ) -> list[Outcome]:
        self.running_marks.extend((rid, attempt) for rid, attempt, _ in running)
        if running:
            self.marked.set()
        written = []
        for o in outcomes:
            row = self.rows.get(o.request_id)
            if row is None or row.lane_seq is not None:
                continue
            o.lane_seq = self.last_seq.get(o.user_id, 0) + 1
            self.last_seq[o.user_id] = o.lane_seq
            self.rows[o.request_id] = StoredState(
                o.status, o.lane_seq, o.attempt_count, o.output, o.error, "", "h"
            )
            self.outcomes.append(o)
            written.append(o)
        return written


def handler(
    name: str, fn: Callable[..., Any], attempts: int = 3, timeout: float | None = None
) -> Handler:
    return Handler(name, fn, asyncio.iscoroutinefunction(fn), attempts, timeout, "")


class FailsOnce:
    """A handler whose first call fails, so that a retry follows, and the others succeed."""

    def __init__(self, output: bytes = b"") -> None:
        self.calls = 0
        self.output = output

    async def __call__(self, ctx: Any, payload: bytes) -> bytes:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("the first attempt fails")
        return self.output


class Counted:
    """A handler that only counts its calls (for tests where it must not run)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, ctx: Any, payload: bytes) -> bytes:
        self.calls += 1
        return b""


class World:
    def __init__(self, handlers: dict[str, Handler], *, max_output_bytes: int = 1 << 20) -> None:
        self.broker = MemoryBroker(lane_max_length=100)
        self.log = MemoryLog()
        self.sleeps: list[float] = []
        self.results: list[lane_pb2.LaneEvent] = []
        self.writer = ResultWriter(self.log, self.broker, batch_size=100, linger_ms=0)  # type: ignore[arg-type]

        async def sleep(seconds: float) -> None:
            self.sleeps.append(seconds)

        self.runner = Runner(
            broker=self.broker,
            store=self.log,  # type: ignore[arg-type]
            writer=self.writer,
            handlers=handlers,
            concurrency=4,
            prefetch=4,
            retry_base=0.5,
            retry_max=30.0,
            worker_id="w1",
            max_output_bytes=max_output_bytes,
            sleep=sleep,
            rng=random.Random(7),
        )

    async def start(self, user: str) -> None:
        await self.broker.connect()

        async def on_results(body: bytes) -> None:
            self.results.extend(lane_pb2.LaneEventBatch.FromString(body).events)

        await self.broker.consume_results(ROUTE, on_results)
        await self.broker.declare_lane(user)
        self.writer.start()
        await self.runner.add_lane(user)

    async def publish(self, user: str, payloads: list[bytes], **item: Any) -> list[uuid.UUID]:
        ids = [uuid.uuid4() for _ in payloads]
        for i in ids:
            self.log.queued(i)
        batch = lane_pb2.LaneBatch(
            user_id=user,
            reply_route=ROUTE,
            items=[
                lane_pb2.LaneItem(request_id=str(i), payload=p, **item)
                for i, p in zip(ids, payloads, strict=True)
            ],
        )
        await self.broker.publish_lane(user, batch.SerializeToString(), {})
        return ids

    async def running_on_a_dead_worker(
        self, user: str, handler: str, attempts: int, *, cancel_requested: bool = False
    ) -> uuid.UUID:
        """A request the log shows RUNNING its `attempts`-th attempt, whose worker died: its
        message comes again (flagged, so the runner reads its state)."""
        rid = uuid.uuid4()
        self.log.rows[rid] = StoredState(
            "RUNNING", None, attempts, None, None, "", handler, cancel_requested
        )
        item = lane_pb2.LaneItem(request_id=str(rid), handler=handler, recovered=True)
        batch = lane_pb2.LaneBatch(user_id=user, reply_route=ROUTE, items=[item])
        await self.broker.publish_lane(user, batch.SerializeToString(), {})
        return rid

    async def until_finished(self, n: int) -> None:
        async with asyncio.timeout(5):
            while True:
                if len([e for e in self.results if e.HasField("result")]) >= n:
                    return
                await asyncio.sleep(0.005)

    async def stop(self) -> None:
        await self.runner.drain(1.0)
        await self.writer.stop()


@pytest.fixture
def user() -> str:
    return str(uuid.uuid4())


async def test_a_failing_request_is_retried_with_backoff_then_dead_lettered(user: str) -> None:
    calls = 0

    async def flaky(ctx: Any, payload: bytes) -> bytes:
        nonlocal calls
        calls += 1
        raise ValueError(f"boom {calls}")

    world = World({"flaky": handler("flaky", flaky, attempts=3)})
    await world.start(user)
    (rid,) = await world.publish(user, [b"x"], handler="flaky")
    await world.until_finished(1)
    await world.stop()
    (outcome,) = world.log.outcomes
    assert (outcome.request_id, outcome.status, outcome.attempt_count) == (rid, "DEAD", 3)
    assert calls == 3
    # Full jitter under a cap that doubles: 0.5 s, then 1 s.
    assert len(world.sleeps) == 2
    assert 0 <= world.sleeps[0] <= 0.5
    assert 0 <= world.sleeps[1] <= 1.0
    (body, headers) = world.broker.dead[0]
    assert lane_pb2.LaneItem.FromString(body).request_id == str(rid)
    history = json.loads(headers["history"])
    assert [h["error"] for h in history] == [
        "ValueError: boom 1",
        "ValueError: boom 2",
        "ValueError: boom 3",
    ]


async def test_a_permanent_error_fails_at_once(user: str) -> None:
    async def refuse(ctx: Any, payload: bytes) -> bytes:
        raise PermanentError("not this one")

    world = World({"refuse": handler("refuse", refuse)})
    await world.start(user)
    await world.publish(user, [b"x"], handler="refuse")
    await world.until_finished(1)
    await world.stop()
    (outcome,) = world.log.outcomes
    assert (outcome.status, outcome.error, outcome.attempt_count) == ("FAILED", "not this one", 1)
    assert world.sleeps == []
    assert world.broker.dead == []


async def test_requests_run_one_at_a_time_in_lane_order(user: str) -> None:
    running: list[bytes] = []
    overlap = False

    async def step(ctx: Any, payload: bytes) -> bytes:
        nonlocal overlap
        overlap = overlap or bool(running)
        running.append(payload)
        await asyncio.sleep(0.002)
        running.remove(payload)
        return payload

    world = World({"step": handler("step", step)})
    await world.start(user)
    sent = [str(i).encode() for i in range(12)]
    await world.publish(user, sent[:5], handler="step")
    await world.publish(user, sent[5:], handler="step")
    await world.until_finished(12)
    await world.stop()
    assert not overlap
    assert [o.output for o in world.log.outcomes] == sent
    assert [o.lane_seq for o in world.log.outcomes] == list(range(1, 13))


async def test_a_cancelled_running_request_ends_cancelled_and_the_lane_goes_on(user: str) -> None:
    started = asyncio.Event()

    async def slow(ctx: Any, payload: bytes) -> bytes:
        if payload == b"slow":
            started.set()
            await asyncio.sleep(30)
        return payload

    world = World({"slow": handler("slow", slow)})
    await world.start(user)
    first, _ = await world.publish(user, [b"slow", b"next"], handler="slow")
    await asyncio.wait_for(started.wait(), 5)
    world.runner.cancel(str(first))
    await world.until_finished(2)
    await world.stop()
    assert [(o.status, o.output) for o in world.log.outcomes] == [
        ("CANCELLED", b""),
        ("SUCCEEDED", b"next"),
    ]


async def test_a_handler_past_its_timeout_fails_that_attempt_and_the_lane_goes_on(
    user: str,
) -> None:
    calls = 0

    async def stuck_once(ctx: Any, payload: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if payload == b"stuck" and calls == 1:
            await asyncio.sleep(30)
        return payload

    world = World({"h": handler("h", stuck_once, attempts=2, timeout=0.2)})
    await world.start(user)
    await world.publish(user, [b"stuck", b"next"], handler="h")
    await world.until_finished(2)
    await world.stop()
    first, second = world.log.outcomes
    assert (first.status, first.output, first.attempt_count) == ("SUCCEEDED", b"stuck", 2)
    assert first.attempts[0].error == "TimeoutError: handler timed out after 0.2 s"
    assert (second.status, second.output, second.attempt_count) == ("SUCCEEDED", b"next", 1)


async def test_only_a_handler_that_runs_past_the_mark_is_marked_running(user: str) -> None:
    release = asyncio.Event()

    async def wait(ctx: Any, payload: bytes) -> bytes:
        if payload == b"slow":
            await release.wait()
        return payload

    world = World({"h": handler("h", wait)})
    await world.start(user)
    fast, slow = await world.publish(user, [b"fast", b"slow"], handler="h")
    await asyncio.wait_for(world.log.marked.wait(), 5)
    release.set()
    await world.until_finished(2)
    await world.stop()
    assert world.log.running_marks == [(slow, 1)]
    assert [o.request_id for o in world.log.outcomes] == [fast, slow]


async def test_a_long_handler_is_marked_running_then_timed_out_by_one_timer(user: str) -> None:
    async def forever(ctx: Any, payload: bytes) -> bytes:
        await asyncio.sleep(30)
        return payload

    world = World({"h": handler("h", forever, attempts=1, timeout=0.3)})
    await world.start(user)
    (rid,) = await world.publish(user, [b"x"], handler="h")
    await world.until_finished(1)
    await world.stop()
    assert world.log.running_marks == [(rid, 1)]
    (outcome,) = world.log.outcomes
    assert outcome.status == "DEAD"
    assert outcome.attempts[0].error == "TimeoutError: handler timed out after 0.3 s"


async def test_a_recovered_copy_of_a_finished_request_is_not_run_again(user: str) -> None:
    calls: list[bytes] = []

    async def echo(ctx: Any, payload: bytes) -> bytes:
        calls.append(payload)
        return payload

    world = World({"echo": handler("echo", echo)})
    await world.start(user)
    (rid,) = await world.publish(user, [b"once"], handler="echo")
    await world.until_finished(1)
    # The outbox published it again (its replica died before deleting the row).
    copy = lane_pb2.LaneBatch(
        user_id=user,
        reply_route=ROUTE,
        items=[
            lane_pb2.LaneItem(request_id=str(rid), handler="echo", payload=b"once", recovered=True)
        ],
    )
    await world.broker.publish_lane(user, copy.SerializeToString(), {})
    await world.until_finished(2)
    await world.stop()
    assert calls == [b"once"]
    assert len(world.log.outcomes) == 1
    # The stored result is sent again, with the same lane_seq.
    assert [e.result.lane_seq for e in world.results] == [1, 1]


async def test_a_lane_whose_task_breaks_is_rebuilt_and_loses_nothing(user: str) -> None:
    async def echo(ctx: Any, payload: bytes) -> bytes:
        return payload

    world = World({"echo": handler("echo", echo)})
    await world.start(user)
    world.log.fail_reads = 1  # a bug outside any one request, on the first read
    ids = await world.publish(user, [b"a", b"b"], handler="echo", recovered=True)
    await world.until_finished(2)
    assert world.runner.lanes[user].alive
    await world.stop()
    assert [o.request_id for o in world.log.outcomes] == ids
    assert world.runner.state == RunnerState.DRAINED


async def test_repair_consumes_dead_lanes_again_and_leaves_deleted_ones_alone(user: str) -> None:
    async def echo(ctx: Any, payload: bytes) -> bytes:
        return payload

    world = World({"echo": handler("echo", echo)})
    await world.start(user)
    deleted = str(uuid.uuid4())
    await world.broker.declare_lane(deleted)
    await world.runner.add_lane(deleted)
    consumer = world.runner.lanes[user].consumer
    assert consumer is not None
    await consumer.cancel()  # as when its channel dies with the broker connection
    assert await world.broker.delete_lane(deleted)  # the janitor deleted it meanwhile
    assert not world.runner.lanes[user].alive
    assert await world.runner.repair() == 2
    assert world.runner.lanes[user].alive
    assert deleted not in world.runner.lanes
    ids = await world.publish(user, [b"a"], handler="echo")
    await world.until_finished(1)
    await world.stop()
    assert [o.request_id for o in world.log.outcomes] == ids


async def test_a_lane_is_handed_back_between_messages(user: str) -> None:
    started = asyncio.Event()

    async def slow(ctx: Any, payload: bytes) -> bytes:
        started.set()
        await asyncio.sleep(0.05)
        return payload

    world = World({"slow": handler("slow", slow)})
    await world.start(user)
    first = await world.publish(user, [b"a", b"b", b"c"], handler="slow")
    second = await world.publish(user, [b"d"], handler="slow")
    await asyncio.wait_for(started.wait(), 5)
    # Mid-message: the message in progress finishes (all three), is acked, then the lane
    # goes; the next message stays in the lane, untouched, for the next holder.
    await world.runner.remove_lane(user, finish_current=5.0)
    assert [o.request_id for o in world.log.outcomes] == first
    assert user not in world.runner.lanes
    assert world.broker.lane_depth(user) == 1
    await world.runner.add_lane(user)
    await world.until_finished(4)
    await world.stop()
    assert [o.request_id for o in world.log.outcomes] == first + second
    assert [o.lane_seq for o in world.log.outcomes] == [1, 2, 3, 4]


# -- handlers that stop the worker, and the attempts they use up ----------------------------


async def test_a_handler_raising_system_exit_or_keyboard_interrupt_fails_only_its_attempt(
    user: str,
) -> None:
    """asyncio lets SystemExit and KeyboardInterrupt out of the event loop: one handler's
    sys.exit() stopped the worker, and the next one that took the lane."""

    async def leave(ctx: Any, payload: bytes) -> bytes:
        raise SystemExit(3)

    def interrupt(ctx: Any, payload: bytes) -> bytes:  # runs in a thread
        raise KeyboardInterrupt

    async def fine(ctx: Any, payload: bytes) -> bytes:
        return payload

    world = World(
        {
            "leave": handler("leave", leave, attempts=2),
            "interrupt": handler("interrupt", interrupt, attempts=2),
            "fine": handler("fine", fine),
        }
    )
    await world.start(user)
    await world.publish(user, [b"a"], handler="leave")
    await world.publish(user, [b"b"], handler="interrupt")
    await world.publish(user, [b"c"], handler="fine")
    await world.until_finished(3)
    await world.stop()
    left, interrupted, fine_one = world.log.outcomes
    assert (left.status, left.attempt_count) == ("DEAD", 2)
    assert "SystemExit(3)" in left.error
    assert (interrupted.status, interrupted.attempt_count) == ("DEAD", 2)
    assert "KeyboardInterrupt" in interrupted.error
    assert (fine_one.status, fine_one.output) == ("SUCCEEDED", b"c")


async def test_a_request_whose_every_attempt_stopped_a_worker_ends_dead_without_running(
    user: str,
) -> None:
    """The log says its last attempt started and never finished (the worker running it
    died: os._exit, a segfault, the OOM killer), and it has no attempt left."""
    crash = Counted()
    world = World({"crash": Handler("crash", crash, True, 2, None, "")})
    await world.start(user)
    await world.running_on_a_dead_worker(user, "crash", attempts=2)
    await world.until_finished(1)
    await world.stop()
    (outcome,) = world.log.outcomes
    assert (outcome.status, outcome.attempt_count) == ("DEAD", 2)
    assert "the worker stopped during attempt 2" in outcome.error
    assert crash.calls == 0
    assert len(world.broker.dead) == 1


async def test_a_redelivered_request_is_marked_running_in_the_log_before_its_handler_runs(
    user: str,
) -> None:
    """So a handler that kills the worker at once still leaves its attempt counted."""
    marks_seen: list[list[tuple[uuid.UUID, int]]] = []

    async def look(ctx: Any, payload: bytes) -> bytes:
        marks_seen.append(list(world.log.running_marks))
        return b"ok"

    world = World({"look": handler("look", look, attempts=3)})
    await world.start(user)
    # Attempt 1 started on a worker that died; attempt 2 runs here.
    rid = await world.running_on_a_dead_worker(user, "look", attempts=1)
    await world.until_finished(1)
    await world.stop()
    assert marks_seen == [[(rid, 2)]]
    (outcome,) = world.log.outcomes
    assert (outcome.status, outcome.attempt_count) == ("SUCCEEDED", 2)


async def test_retries_are_marked_running_in_the_log_before_they_run(user: str) -> None:
    world = World({"twice": Handler("twice", FailsOnce(b"ok"), True, 3, None, "")})
    await world.start(user)
    (rid,) = await world.publish(user, [b"x"], handler="twice")
    await world.until_finished(1)
    await world.stop()
    assert (rid, 2) in world.log.running_marks
    assert world.log.outcomes[0].status == "SUCCEEDED"


async def test_an_output_over_the_limit_fails_the_request_at_once(user: str) -> None:
    async def big(ctx: Any, payload: bytes) -> bytes:
        return b"x" * 101

    world = World({"big": handler("big", big)}, max_output_bytes=100)
    await world.start(user)
    await world.publish(user, [b""], handler="big")
    await world.publish(user, [b""], handler="big", max_attempts=1)
    await world.until_finished(2)
    await world.stop()
    for outcome in world.log.outcomes:
        assert (outcome.status, outcome.attempt_count, outcome.output) == ("FAILED", 1, b"")
        assert (
            outcome.error
            == "handler output is 101 bytes; the limit is 100 (FAIRLANE_MAX_OUTPUT_BYTES)"
        )


async def test_a_deadline_that_passes_while_the_worker_is_paused_expires_the_request(
    user: str,
) -> None:
    work = Counted()
    world = World({"work": Handler("work", work, True, 3, None, "")})
    await world.start(user)
    world.runner.pause()
    deadline = datetime.now(UTC) + timedelta(seconds=1)
    stamp = Timestamp()
    stamp.FromDatetime(deadline)
    await world.publish(user, [b""], handler="work", deadline=stamp)
    lane = world.runner.lanes[user]
    await asyncio.wait_for(lane.quiet.wait(), 5)  # it waits at the gate, not yet expired
    assert datetime.now(UTC) < deadline
    while datetime.now(UTC) <= deadline:  # noqa: ASYNC110 (the wall clock, not an event)
        await asyncio.sleep(0.01)
    world.runner.resume()
    await world.until_finished(1)
    await world.stop()
    (outcome,) = world.log.outcomes
    assert (outcome.status, outcome.error) == ("EXPIRED", "deadline passed before start")
    assert work.calls == 0


def _queue_waits() -> float:
    return REGISTRY.get_sample_value("fairlane_queue_wait_seconds_count") or 0.0


async def test_queue_wait_is_observed_once_per_request_that_starts(user: str) -> None:
    """metrics.md: once per request, when its first attempt starts. Not for one that
    expires or is cancelled before it starts, nor again for a retry."""
    flaky = FailsOnce()
    work = Counted()
    world = World(
        {"work": handler("work", work), "flaky": Handler("flaky", flaky, True, 3, None, "")}
    )
    await world.start(user)
    before = _queue_waits()
    world.runner.pause()
    deadline = datetime.now(UTC) + timedelta(milliseconds=50)
    stamp = Timestamp()
    stamp.FromDatetime(deadline)
    await world.publish(user, [b""], handler="work", deadline=stamp)
    (cancelled,) = await world.publish(user, [b""], handler="work")
    await asyncio.wait_for(world.runner.lanes[user].quiet.wait(), 5)
    while datetime.now(UTC) <= deadline:  # noqa: ASYNC110 (the wall clock, not an event)
        await asyncio.sleep(0.01)
    world.runner.cancel(str(cancelled))
    world.runner.resume()
    await world.until_finished(2)
    assert [o.status for o in world.log.outcomes] == ["EXPIRED", "CANCELLED"]
    assert _queue_waits() == before
    await world.publish(user, [b""], handler="flaky")
    await world.until_finished(3)
    await world.stop()
    assert (world.log.outcomes[-1].status, flaky.calls, work.calls) == ("SUCCEEDED", 2, 0)
    assert _queue_waits() == before + 1


async def test_a_request_cancelled_while_its_worker_died_is_not_run_again(user: str) -> None:
    """The cancel reached the log (cancel_requested) but not the worker, which died: the
    worker that takes the lane over ends it CANCELLED without running it."""
    work = Counted()
    world = World({"work": Handler("work", work, True, 3, None, "")})
    await world.start(user)
    await world.running_on_a_dead_worker(user, "work", attempts=1, cancel_requested=True)
    await world.until_finished(1)
    await world.stop()
    (outcome,) = world.log.outcomes
    assert outcome.status == "CANCELLED"
    assert work.calls == 0


# -- lane pauses, on every replica --------------------------------------------------------


async def _waiting_at_the_gate(world: World, user: str) -> None:
    """Until the lane has taken every message and stands still: at the gate (a handler that
    ran instead would have counted its call)."""
    async with asyncio.timeout(5):
        while True:
            lane = world.runner.lanes[user]
            if (
                world.broker.lane_depth(user) == 0
                and lane.deliveries.empty()
                and lane.quiet.is_set()
            ):
                return
            await asyncio.sleep(0.005)


async def test_a_lane_paused_before_this_replica_consumes_it_starts_paused(user: str) -> None:
    """A pause this replica heard of (or read from the log) before it took the lane holds
    from the lane's first request; the whole replica's resume does not lift it."""
    work = Counted()
    world = World({"work": Handler("work", work, True, 3, None, "")})
    world.runner.set_lane_paused(user, True)
    await world.start(user)
    await world.publish(user, [b"1", b"2"], handler="work")
    await _waiting_at_the_gate(world, user)
    assert work.calls == 0
    assert world.runner.paused_lanes() == [user]
    world.runner.pause()
    world.runner.resume()  # the replica's own pause: the lane's stays
    await _waiting_at_the_gate(world, user)
    assert work.calls == 0
    world.runner.set_lane_paused(user, False)
    await world.until_finished(2)
    await world.stop()
    assert work.calls == 2
    assert world.runner.paused_lanes() == []


async def test_pause_lane_stores_applies_and_announces_the_pause(user: str) -> None:
    world = World({"work": handler("work", Counted())})
    await world.start(user)
    heard: list[lane_pb2.ControlEvent] = []

    async def on_control(body: bytes) -> None:
        heard.append(lane_pb2.ControlEvent.FromString(body))

    await world.broker.consume_control(on_control)
    # A lane without a row in the log: nothing stored, applied or announced.
    assert not await world.runner.pause_lane(user, True)
    assert (world.log.paused, world.runner.paused_lanes(), heard) == (set(), [], [])

    world.log.lanes.add(user)
    assert await world.runner.pause_lane(user, True)
    assert world.log.paused == {user}
    assert world.runner.paused_lanes() == [user]
    assert not world.runner.lanes[user].resumed.is_set()
    assert await world.runner.pause_lane(user, False)
    assert world.log.paused == set()
    assert world.runner.paused_lanes() == []
    assert world.runner.lanes[user].resumed.is_set()
    assert heard == [
        lane_pb2.ControlEvent(lane_paused=user),
        lane_pb2.ControlEvent(lane_resumed=user),
    ]
    await world.stop()


async def test_a_listing_lifts_pauses_it_leaves_out_but_not_newer_announcements() -> None:
    world = World({})
    runner = world.runner
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    runner.set_lane_paused(a, True)
    runner.set_lane_paused(b, True)
    since = time.monotonic()
    # Heard after the listing began: the listing may have been read before it.
    runner.set_lane_paused(c, True)
    runner.set_lane_paused(b, False)
    # A page of the listing only adds pauses (the lane may be on a later page) ...
    runner.sync_lane_pauses({b}, since=since, complete=False)
    assert runner.paused_lanes() == sorted([a, c])
    # ... the whole listing also lifts those it leaves out, except what came meanwhile.
    runner.sync_lane_pauses({b}, since=since, complete=True)
    assert runner.paused_lanes() == [c]
    # Once a later listing has them, it alone decides.
    runner.sync_lane_pauses({b}, since=time.monotonic(), complete=True)
    assert runner.paused_lanes() == [b]


async def test_a_replica_loads_the_pauses_of_the_log(user: str) -> None:
    world = World({})
    world.log.paused = {user}
    await world.runner.load_lane_pauses()
    assert world.runner.paused_lanes() == [user]
    world.log.paused = set()
    await world.runner.load_lane_pauses()
    assert world.runner.paused_lanes() == []


async def _pause_reads_done(runner: Any) -> None:
    await until(lambda: not runner._pause_reading)  # the reads the announcements started


async def test_crossed_announcements_end_as_the_log_says(user: str) -> None:
    """Two replicas resume and then pause a lane at once: the log ends paused, but the
    announcements arrive the other way round. The lane ends paused here too (applied
    as they came, it ended running until the next lane listing)."""
    world = World({})
    world.log.lanes.add(user)
    world.log.paused = {user}
    world.runner.heard_lane_pause(user, True)
    world.runner.heard_lane_pause(user, False)
    await _pause_reads_done(world.runner)
    assert world.runner.paused_lanes() == [user]
    # And the other way: the log ends resumed, the pause's announcement comes last.
    world.log.paused = set()
    world.runner.heard_lane_pause(user, False)
    world.runner.heard_lane_pause(user, True)
    await _pause_reads_done(world.runner)
    assert world.runner.paused_lanes() == []


async def test_a_resume_waits_for_the_log_and_a_pause_does_not(user: str) -> None:
    world = World({})
    world.log.lanes.add(user)
    world.log.pause_read_gate.clear()  # the reads wait
    world.log.paused = {user}
    world.runner.heard_lane_pause(user, True)
    assert world.runner.paused_lanes() == [user]  # at once, before the log is read
    world.log.paused = set()
    world.runner.heard_lane_pause(user, False)
    await until(lambda: world.log.pause_reads == 2)
    assert world.runner.paused_lanes() == [user]  # a resume: only once the log says so
    world.log.pause_read_gate.set()
    await _pause_reads_done(world.runner)
    assert world.runner.paused_lanes() == []


async def test_an_announcement_stands_when_the_log_cannot_be_read(user: str) -> None:
    world = World({})
    world.log.lanes.add(user)
    world.log.fail_pause_reads = True
    world.runner.heard_lane_pause(user, True)
    await _pause_reads_done(world.runner)
    assert world.runner.paused_lanes() == [user]
    world.runner.heard_lane_pause(user, False)
    await _pause_reads_done(world.runner)
    assert world.runner.paused_lanes() == []


class _Own(BaseException):
    pass


class _Unreadable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


async def test_odd_exceptions_fail_only_their_attempt_with_a_message_fit_to_store(
    user: str,
) -> None:
    """GeneratorExit or a BaseException of the handler's own (async or in a thread) ended
    the lane's task; a CancelledError nobody asked for read as the client's cancel; a
    message of megabytes, with NULs or lone surrogates, or a __str__ that raises made the
    request unreadable or its outcome refused."""

    async def generator_exit(ctx: Any, payload: bytes) -> bytes:
        raise GeneratorExit

    def own(ctx: Any, payload: bytes) -> bytes:  # runs in a thread
        raise _Own("mine")

    async def cancelled(ctx: Any, payload: bytes) -> bytes:
        raise asyncio.CancelledError

    async def huge(ctx: Any, payload: bytes) -> bytes:
        raise PermanentError("x" * 10_000_000)

    async def dirty(ctx: Any, payload: bytes) -> bytes:
        raise ValueError("nul \x00 and a lone \udc80 surrogate")

    async def unreadable(ctx: Any, payload: bytes) -> bytes:
        raise _Unreadable

    async def fine(ctx: Any, payload: bytes) -> bytes:
        return payload

    bad = {
        "generator_exit": generator_exit,
        "own": own,
        "cancelled": cancelled,
        "huge": huge,
        "dirty": dirty,
        "unreadable": unreadable,
    }
    world = World(
        {name: handler(name, fn, attempts=2) for name, fn in bad.items()}
        | {"fine": handler("fine", fine)}
    )
    await world.start(user)
    for name in bad:
        await world.publish(user, [b""], handler=name)
    await world.publish(user, [b"ok"], handler="fine")
    await world.until_finished(len(bad) + 1)
    await world.stop()
    got = dict(zip([*bad, "fine"], world.log.outcomes, strict=True))
    assert [o.lane_seq for o in world.log.outcomes] == list(range(1, len(bad) + 2))
    assert (got["generator_exit"].status, got["generator_exit"].attempt_count) == ("DEAD", 2)
    assert "GeneratorExit" in got["generator_exit"].error
    assert (got["own"].status, got["own"].attempt_count) == ("DEAD", 2)
    assert "_Own(mine)" in got["own"].error
    assert (got["cancelled"].status, got["cancelled"].attempt_count) == ("DEAD", 2)
    assert "the handler raised CancelledError" in got["cancelled"].error
    assert got["huge"].status == "FAILED"
    assert len(got["huge"].error) < 5000
    assert got["huge"].error.endswith("(10000000 characters in all)")
    assert got["dirty"].status == "DEAD"
    assert "\x00" not in got["dirty"].error
    got["dirty"].error.encode("utf-8")  # no lone surrogate left
    assert (got["unreadable"].status, got["unreadable"].attempt_count) == ("DEAD", 2)
    assert "_Unreadable: (its message could not be read)" in got["unreadable"].error
    assert (got["fine"].status, got["fine"].output) == ("SUCCEEDED", b"ok")


async def test_a_handler_cannot_rename_its_context(user: str) -> None:
    """The worker keys the attempt's lane and its progress on the context's ids: writing
    them let the next request of the lane start beside an abandoned one, or sent progress
    to another user's Session."""
    seen: list[str] = []

    async def rename(ctx: Any, payload: bytes) -> bytes:
        for field in ("user_id", "request_id", "attempt", "deadline"):
            try:
                setattr(ctx, field, "00000000-0000-0000-0000-000000000000")
            except AttributeError:
                seen.append(field)
        user_id: str = ctx.user_id
        return user_id.encode()

    world = World({"rename": handler("rename", rename)})
    await world.start(user)
    await world.publish(user, [b""], handler="rename")
    await world.until_finished(1)
    await world.stop()
    (outcome,) = world.log.outcomes
    assert (outcome.status, outcome.output) == ("SUCCEEDED", user.encode())
    assert seen == ["user_id", "request_id", "attempt", "deadline"]
