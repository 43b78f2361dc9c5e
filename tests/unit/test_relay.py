"""The lane relay on the in-memory broker, with an in-memory outbox: lane order kept
through broker failures, other replicas' rows and held locks; nothing dropped or doubled."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pytest

from fairlane.common.v1 import lane_pb2
from fairlane_server.core.broker import BrokerError, Delivery, LaneMissing
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.queue.accept_store import OutboxItem
from fairlane_server.queue.outbox_store import LaneOutbox, OutboxRow
from fairlane_server.queue.relay import LaneRelay
from tests.polling import until


class FakeOutbox:
    """The outbox table and the per-lane locks, as OutboxStore sees them."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, OutboxItem] = {}
        self.accepted: dict[uuid.UUID, int] = {}
        self.held_elsewhere: set[uuid.UUID] = set()
        self.mine: set[uuid.UUID] = set()
        # Runs after pending() took its snapshot and before it answers (a commit racing it).
        self.during_read: Callable[[], None] | None = None

    def commit(self, user: uuid.UUID, n: int, route: str = "r") -> list[OutboxItem]:
        """A replica's accept transaction: n requests at the lane's next positions."""
        items = []
        for _ in range(n):
            self.accepted[user] = self.accepted.get(user, 0) + 1
            item = OutboxItem(
                request_id=uuid.uuid4(),
                user_id=user,
                lane_pos=self.accepted[user],
                reply_route=route,
                traceparent="",
                handler="echo",
                payload=str(self.accepted[user]).encode(),
                max_attempts=3,
                deadline=None,
                client_ref="",
                created_at=datetime.now(UTC),
            )
            self.rows[item.request_id] = item
            items.append(item)
        return items

    async def lock(self, users: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        got = {u for u in users if u not in self.held_elsewhere}
        self.mine |= got
        return got

    async def pending(self, users: Sequence[uuid.UUID]) -> dict[uuid.UUID, LaneOutbox]:
        out = {}
        for user in users:
            rows = sorted(
                (
                    OutboxRow(i.request_id, i.lane_pos)
                    for i in self.rows.values()
                    if i.user_id == user
                ),
                key=lambda r: r.lane_pos,
            )
            out[user] = LaneOutbox(accepted=self.accepted.get(user, 0), rows=rows)
        if self.during_read is not None:
            racing, self.during_read = self.during_read, None
            await asyncio.sleep(0)
            racing()
        return out

    async def load(self, ids: Sequence[uuid.UUID]) -> list[OutboxItem]:
        items = []
        for i in ids:
            item = self.rows[i]
            items.append(
                OutboxItem(**{**{f: getattr(item, f) for f in item.__slots__}, "recovered": True})
            )
        return items

    async def release(self, published: Sequence[uuid.UUID], unlock: Sequence[uuid.UUID]) -> None:
        for i in published:
            self.rows.pop(i, None)
        self.mine.difference_update(unlock)

    async def stale_lanes(self, older_than: float, limit: int = 1000) -> list[uuid.UUID]:
        return sorted({i.user_id for i in self.rows.values()})

    async def reset(self) -> None:
        self.mine.clear()

    async def close(self) -> None:
        self.mine.clear()


class FlakyBroker(MemoryBroker):
    """Fails the next `failures` lane publishes with `error`: by default as a broker that
    went away would."""

    def __init__(self) -> None:
        super().__init__(lane_max_length=10_000)
        self.failures = 0
        self.error: Exception = BrokerError("connection lost")

    async def publish_lane(self, user_id: str, body: bytes, headers: dict[str, str]) -> None:
        if self.failures:
            self.failures -= 1
            raise self.error
        await super().publish_lane(user_id, body, headers)


async def consume(broker: MemoryBroker, user: uuid.UUID) -> list[lane_pb2.LaneItem]:
    """Every item published to the lane so far, in lane order."""
    got: list[lane_pb2.LaneItem] = []

    async def on(delivery: Delivery) -> None:
        got.extend(lane_pb2.LaneBatch.FromString(delivery.body).items)
        await delivery.ack()

    try:
        consumer = await broker.consume_lane(str(user), on, prefetch=100)
    except LaneMissing:
        return []  # never declared: nothing was published to it
    for _ in range(50):
        await asyncio.sleep(0)
    await consumer.cancel()
    return got


@pytest.fixture
async def broker() -> FlakyBroker:
    b = FlakyBroker()
    await b.connect()
    return b


def _fresh(n: int) -> list[tuple[bytes, bool]]:
    """What a lane gets for n requests handed over by this replica: payloads 1..n in order,
    none flagged recovered."""
    return [(b"%d" % i, False) for i in range(1, n + 1)]


def relay_for(outbox: FakeOutbox, broker: MemoryBroker) -> LaneRelay:
    return LaneRelay(outbox, broker, hold_seconds=0.01, sweep_seconds=3600)  # type: ignore[arg-type]


async def test_lanes_are_published_in_order_and_the_outbox_emptied(broker: FlakyBroker) -> None:
    outbox = FakeOutbox()
    relay = relay_for(outbox, broker)
    relay.start()
    a, b = uuid.uuid4(), uuid.uuid4()
    try:
        first_a, first_b = outbox.commit(a, 3), outbox.commit(b, 2)
        relay.hand(first_b + first_a)
        second_a = outbox.commit(a, 2)
        relay.hand(second_a)
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    got_a = await consume(broker, a)
    assert [i.payload for i in got_a] == [b"1", b"2", b"3", b"4", b"5"]
    assert [i.payload for i in await consume(broker, b)] == [b"1", b"2"]
    assert not any(i.recovered for i in got_a)
    assert relay.backlog == 0


async def test_broker_failures_are_retried_without_loss_or_reordering(broker: FlakyBroker) -> None:
    outbox = FakeOutbox()
    relay = relay_for(outbox, broker)
    relay.start()
    user = uuid.uuid4()
    try:
        broker.failures = 4
        relay.hand(outbox.commit(user, 3))
        await until(lambda: broker.failures == 0)
        relay.hand(outbox.commit(user, 3))
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    # The broker may hold a copy of a publish it did not confirm: what is published again
    # is flagged for the worker to check in the log first; what came later is not.
    assert [(i.payload, i.recovered) for i in await consume(broker, user)] == [
        (b"%d" % n, n <= 3) for n in range(1, 7)
    ]


class HeldBroker(FlakyBroker):
    """Holds back the confirm of every publish to the lanes in `held` until `go` is set,
    as a lane queue that is slow to confirm (a crashed queue process, a busy node)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: set[str] = set()
        self.go = asyncio.Event()
        self.waiting = 0
        self.events: list[str] = []

    async def publish_lane(self, user_id: str, body: bytes, headers: dict[str, str]) -> None:
        if user_id in self.held:
            self.waiting += 1
            await self.go.wait()
        await super().publish_lane(user_id, body, headers)
        self.events.append(f"confirmed {user_id}")


async def test_a_lane_slow_to_confirm_does_not_hold_back_the_others() -> None:
    broker = HeldBroker()
    await broker.connect()
    outbox = FakeOutbox()
    relay = relay_for(outbox, broker)
    slow, fast = uuid.uuid4(), uuid.uuid4()
    broker.held.add(str(slow))
    relay.start()
    try:
        relay.hand(outbox.commit(slow, 2) + outbox.commit(fast, 2))
        await until(lambda: broker.waiting == 1)
        # The fast lane's requests, and those handed over after them, go out while the
        # slow lane's publish waits for its confirm.
        await until(lambda: not any(i.user_id == fast for i in outbox.rows.values()))
        relay.hand(outbox.commit(fast, 2))
        relay.hand(outbox.commit(slow, 1))
        await until(lambda: not any(i.user_id == fast for i in outbox.rows.values()))
        assert [i.payload for i in await consume(broker, fast)] == [b"1", b"2", b"3", b"4"]
        assert broker.waiting == 1, "a second publish of the slow lane went out meanwhile"
        broker.go.set()
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    assert [i.payload for i in await consume(broker, slow)] == [b"1", b"2", b"3"]
    assert relay.backlog == 0


async def test_a_store_failure_gives_up_the_locks_only_after_the_publishes_in_flight() -> None:
    """Another replica takes the lanes once the locks are gone; a publish of this replica
    still in flight then could land after its publishes of later requests."""
    broker = HeldBroker()
    await broker.connect()
    outbox = FakeOutbox()
    relay = relay_for(outbox, broker)
    slow, other = uuid.uuid4(), uuid.uuid4()
    broker.held.add(str(slow))
    release, reset = outbox.release, outbox.reset
    failed = False

    async def failing_release(published: Sequence[uuid.UUID], unlock: Sequence[uuid.UUID]) -> None:
        nonlocal failed
        if not failed:
            failed = True
            raise ConnectionResetError("lock connection lost")
        await release(published, unlock)

    async def logged_reset() -> None:
        broker.events.append("locks given up")
        await reset()

    outbox.release = failing_release  # type: ignore[method-assign]
    outbox.reset = logged_reset  # type: ignore[method-assign]
    relay.start()
    try:
        relay.hand(outbox.commit(slow, 1) + outbox.commit(other, 1))
        await until(lambda: broker.waiting == 1 and failed)
        await asyncio.sleep(0.05)
        assert "locks given up" not in broker.events
        broker.go.set()
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    assert broker.events.index(f"confirmed {slow}") < broker.events.index("locks given up")
    assert [i.payload for i in await consume(broker, slow)] == [b"1"]


async def test_an_unexpected_publish_error_is_retried_for_that_lane_alone(
    broker: FlakyBroker,
) -> None:
    broker.error = RuntimeError("a bug, not a broker fault")
    broker.failures = 2
    outbox = FakeOutbox()
    relay = relay_for(outbox, broker)
    user = uuid.uuid4()
    relay.start()
    try:
        relay.hand(outbox.commit(user, 2))
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    assert broker.failures == 0
    assert [i.payload for i in await consume(broker, user)] == [b"1", b"2"]


async def test_rows_of_another_replica_in_between_are_published_in_their_place(
    broker: FlakyBroker,
) -> None:
    outbox = FakeOutbox()
    relay = relay_for(outbox, broker)
    relay.start()
    user = uuid.uuid4()
    try:
        mine = outbox.commit(user, 1)
        theirs = outbox.commit(user, 2, route="other")  # committed by a replica that died
        later = outbox.commit(user, 1)
        relay.hand(mine + later)
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    got = await consume(broker, user)
    assert [i.payload for i in got] == [b"1", b"2", b"3", b"4"]
    assert [i.recovered for i in got] == [False, True, True, False]
    assert {i.request_id for i in got[1:3]} == {str(t.request_id) for t in theirs}


async def test_a_lane_held_by_another_replica_waits_for_it(broker: FlakyBroker) -> None:
    outbox = FakeOutbox()
    relay = relay_for(outbox, broker)
    relay.start()
    user = uuid.uuid4()
    outbox.held_elsewhere.add(user)
    try:
        relay.hand(outbox.commit(user, 2))
        await asyncio.sleep(0.1)
        assert await consume(broker, user) == []  # not a message while the other holds it
        assert relay.backlog == 2
        outbox.held_elsewhere.clear()
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    assert [i.payload for i in await consume(broker, user)] == [b"1", b"2"]


async def test_a_lane_wanted_elsewhere_is_let_go_once_published_not_after_the_hold(
    broker: FlakyBroker,
) -> None:
    outbox = FakeOutbox()
    relay = LaneRelay(outbox, broker, hold_seconds=3600, sweep_seconds=3600)  # type: ignore[arg-type]
    relay.start()
    idle, busy, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        relay.hand(outbox.commit(idle, 2))
        await until(lambda: not outbox.rows)
        assert idle in outbox.mine  # idle, but held: the hold is an hour
        relay.wanted([str(idle), str(other), "not-a-uuid"])  # names not held are ignored
        await until(lambda: idle not in outbox.mine)

        # A lane with requests still to publish is let go only once they are published.
        broker.failures = 1000
        relay.hand(outbox.commit(busy, 2))
        await until(lambda: busy in outbox.mine)
        relay.wanted([str(busy)])
        await until(lambda: broker.failures <= 998)  # two more rounds with the lane wanted
        assert outbox.rows
        assert busy in outbox.mine, "let go with requests of its own unpublished"
        broker.failures = 0
        await until(lambda: not outbox.rows and busy not in outbox.mine)
    finally:
        await relay.stop()
    assert [i.payload for i in await consume(broker, busy)] == [b"1", b"2"]
    assert relay.backlog == 0


async def test_rows_another_holder_published_meanwhile_are_not_sent_again(
    broker: FlakyBroker,
) -> None:
    outbox = FakeOutbox()
    relay = relay_for(outbox, broker)
    user = uuid.uuid4()
    items = outbox.commit(user, 3)
    # Another replica held the lane and published the first two (deleting their rows).
    del outbox.rows[items[0].request_id], outbox.rows[items[1].request_id]
    relay.start()
    try:
        relay.hand(items)
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    assert [i.payload for i in await consume(broker, user)] == [b"3"]


async def test_the_sweep_publishes_what_a_dead_replica_left(broker: FlakyBroker) -> None:
    outbox = FakeOutbox()
    relay = LaneRelay(outbox, broker, hold_seconds=0.01, sweep_seconds=0.01)  # type: ignore[arg-type]
    user = uuid.uuid4()
    outbox.commit(user, 2, route="dead-replica")
    relay.start()
    try:
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    got = await consume(broker, user)
    assert [(i.payload, i.recovered) for i in got] == [(b"1", True), (b"2", True)]


async def test_rows_of_this_replica_not_yet_handed_over_are_not_loaded_as_leftovers(
    broker: FlakyBroker,
) -> None:
    outbox = FakeOutbox()
    loaded: list[uuid.UUID] = []
    load = outbox.load

    async def counting_load(ids: Sequence[uuid.UUID]) -> list[OutboxItem]:
        loaded.extend(ids)
        return await load(ids)

    outbox.load = counting_load  # type: ignore[method-assign]
    relay = relay_for(outbox, broker)
    user = uuid.uuid4()
    first = outbox.commit(user, 2)
    # The intake's next batch is committed (its rows are in the outbox) but its handover
    # has not run yet when the relay reads the lane.
    second = outbox.commit(user, 2)
    relay.expect([i.request_id for i in second])
    relay.start()
    try:
        relay.hand(first)
        await until(lambda: all(i.request_id not in outbox.rows for i in first))
        assert relay.backlog == 0
        relay.hand(second)
        relay.settled([i.request_id for i in second])
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    got = await consume(broker, user)
    assert [(i.payload, i.recovered) for i in got] == _fresh(4)
    assert loaded == []


async def test_expected_rows_never_handed_over_are_found_by_the_sweep(
    broker: FlakyBroker,
) -> None:
    outbox = FakeOutbox()
    relay = LaneRelay(outbox, broker, hold_seconds=0.01, sweep_seconds=0.01, stale_after=0.0)  # type: ignore[arg-type]
    user = uuid.uuid4()
    committed = outbox.commit(user, 2)
    ids = [i.request_id for i in committed]
    relay.expect(ids)
    relay.start()
    try:
        await asyncio.sleep(0.1)
        assert len(outbox.rows) == 2  # expected: waited for, not loaded
        relay.settled(ids)  # the intake failed after its commit and never handed them
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    got = await consume(broker, user)
    assert [(i.payload, i.recovered) for i in got] == [(b"1", True), (b"2", True)]


async def test_a_batch_handed_over_while_the_outbox_is_read_is_kept(broker: FlakyBroker) -> None:
    outbox = FakeOutbox()
    relay = relay_for(outbox, broker)
    user = uuid.uuid4()
    first = outbox.commit(user, 2)

    def commit_and_hand() -> None:
        # The intake's next batch commits and is handed over after the relay's read took
        # its snapshot: the read does not show its rows, and must not drop its items.
        relay.hand(outbox.commit(user, 2))

    outbox.during_read = commit_and_hand
    relay.start()
    try:
        relay.hand(first)
        await until(lambda: not outbox.rows)
    finally:
        await relay.stop()
    got = await consume(broker, user)
    assert [(i.payload, i.recovered) for i in got] == _fresh(4)


async def test_stop_ends_the_relay_even_when_it_is_woken_at_that_moment(
    broker: FlakyBroker,
) -> None:
    """asyncio.wait_for on Python 3.11 swallows a cancellation that arrives as the awaited
    event is set: the relay then carried on, and stop() waited for it forever (a unit
    test hung in CI; `fairlane dev` once did not stop on Ctrl-C)."""
    relay = relay_for(FakeOutbox(), broker)
    relay.start()
    for _ in range(10):
        await asyncio.sleep(0)  # the relay is idle, waiting for work
    relay.hand([])  # wakes it, and stop() cancels it in the same turn of the loop
    async with asyncio.timeout(5):
        await relay.stop()
