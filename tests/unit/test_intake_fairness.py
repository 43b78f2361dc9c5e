"""One user's backlog of large requests does not hold another user's enqueue back: the
intake's batches take users in turn and are bounded in bytes, and each user's requests are
still committed in the order they were submitted.

The store here numbers each lane's requests in batch order like RequestStore.accept, and
its accept can be held (a gate), so that the test decides what waits when a batch forms.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import DataError

from fairlane_server.queue.accept_store import NewRequest, OutboxItem
from fairlane_server.queue.intake import (
    BATCH_BYTES,
    ROW_BYTES,
    Admitted,
    Intake,
    Rejection,
    Submission,
)
from tests.unit.test_intake import Relay

LARGE = b"x" * 100_000  # one object shared by every large request: memory stays small


class LaneStore:
    """Accepts batches as RequestStore does: a lane's requests get the lane's next
    positions in batch order. `gate`, while set to an unset event, holds every accept."""

    dialect = "sqlite"

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.called = asyncio.Event()
        self.positions: dict[uuid.UUID, tuple[uuid.UUID, int]] = {}
        self.accepted: dict[uuid.UUID, int] = {}
        self.gate: asyncio.Event | None = None
        self.bad: set[uuid.UUID] = set()

    async def accept(
        self, batch: Sequence[Any], *, lane_limit: int
    ) -> tuple[list[OutboxItem], list[Any]]:
        self.batches.append(list(batch))
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if any(p.request.id in self.bad for p in batch):
            raise DataError("INSERT ...", {}, Exception("invalid byte sequence"))
        items = []
        for p in batch:
            r = p.request
            pos = self.accepted.get(r.user_id, 0) + 1
            self.accepted[r.user_id] = pos
            self.positions[r.id] = (r.user_id, pos)
            items.append(
                OutboxItem(
                    r.id, r.user_id, pos, "r", "", r.handler, r.payload, 3, None, "", r.enqueued_at
                )
            )
        return items, []

    async def find_idempotent(self, keys: Sequence[Any]) -> dict[Any, uuid.UUID]:
        return {}

    async def stored(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        return {i for i in ids if i in self.positions}

    def lane_order(self, user: uuid.UUID) -> list[uuid.UUID]:
        """The user's accepted requests in lane order."""
        mine = [(pos, rid) for rid, (u, pos) in self.positions.items() if u == user]
        return [rid for _, rid in sorted(mine)]


def _sub(user: uuid.UUID, payload: bytes = b"") -> Submission:
    return Submission(
        request=NewRequest(
            id=uuid.uuid4(),
            user_id=user,
            handler="echo",
            payload=payload,
            idempotency_key=None,
            client_ref="",
            max_attempts=3,
            deadline=None,
            trace_id="",
            enqueued_at=datetime.now(UTC),
        ),
        reply_route="r",
    )


def _intake(store: LaneStore, **kwargs: Any) -> Intake:
    # The service's defaults: batches of 500 at most, a 2 ms linger.
    options: dict[str, Any] = {"batch_size": 500, "linger_ms": 2, "lane_limit": 100_000}
    options.update(kwargs)
    return Intake(store, Relay(), **options)  # type: ignore[arg-type]


async def _answers(futures: list[asyncio.Future[Admitted]]) -> list[Admitted | Rejection]:
    async def one(f: asyncio.Future[Admitted]) -> Admitted | Rejection:
        try:
            return await asyncio.shield(f)
        except Rejection as rej:
            return rej

    return await asyncio.wait_for(asyncio.gather(*(one(f) for f in futures)), 30)


async def _while_held(store: LaneStore, intake: Intake, first: Submission) -> asyncio.Event:
    """Starts the intake with `first` held in its accept: whatever is submitted next waits
    until the returned gate opens."""
    gate = asyncio.Event()
    store.gate = gate
    intake.start()
    intake.submit(first)
    await asyncio.wait_for(store.called.wait(), 10)
    return gate


def _batch_bytes(batch: list[Any]) -> int:
    return sum(len(p.request.payload) + ROW_BYTES for p in batch)


def _index_of(store: LaneStore, sub: Submission) -> int:
    return next(i for i, b in enumerate(store.batches) if any(p is sub for p in b))


async def test_a_large_backlog_of_one_user_delays_another_by_one_batch_at_most() -> None:
    store = LaneStore()
    intake = _intake(store)
    a, b = uuid.uuid4(), uuid.uuid4()
    try:
        gate = await _while_held(store, intake, _sub(a, LARGE))
        # While a batch is being written, user A submits 110 MB (1,100 requests of 100 kB,
        # within the payload limit), then user B one small request.
        flood = [_sub(a, LARGE) for _ in range(1100)]
        futures = [intake.submit(s) for s in flood]
        small = _sub(b, b"ping")
        futures.append(intake.submit(small))
        assert intake.pending == 1 + len(futures)  # all waiting, one batch in flight
        gate.set()
        answers = await _answers(futures)
    finally:
        await intake.stop()
    assert all(isinstance(x, Admitted) for x in answers)
    # B's request is in the first batch formed after it arrived (batch 0 was in flight).
    assert _index_of(store, small) == 1
    # No batch is over the byte cap.
    assert all(_batch_bytes(batch) <= BATCH_BYTES for batch in store.batches)
    assert max(len(batch) for batch in store.batches) < 500
    # Each user's requests are in their lane in the order submitted.
    assert store.lane_order(a)[1:] == [s.request.id for s in flood]
    assert store.lane_order(b) == [small.request.id]


async def test_users_backlogged_together_share_every_batch_in_order() -> None:
    store = LaneStore()
    intake = _intake(store)
    users = [uuid.uuid4() for _ in range(3)]
    try:
        gate = await _while_held(store, intake, _sub(users[0]))
        subs = {
            u: [_sub(u, LARGE if n == 0 else b"y" * 10) for _ in range(300)]
            for n, u in enumerate(users)
        }
        futures = [intake.submit(s) for i in range(300) for s in (subs[u][i] for u in users)]
        gate.set()
        answers = await _answers(futures)
    finally:
        await intake.stop()
    assert all(isinstance(x, Admitted) for x in answers)
    for u in users:
        assert [rid for rid in store.lane_order(u) if rid in {s.request.id for s in subs[u]}] == [
            s.request.id for s in subs[u]
        ]
    # Every batch formed while all three still had requests waiting holds some of each.
    last = {u: max(_index_of(store, s) for s in subs[u]) for u in users}
    shared = range(1, min(last.values()) + 1)
    assert len(shared) >= 2
    for i in shared:
        assert {p.request.user_id for p in store.batches[i]} == set(users)
    assert all(_batch_bytes(batch) <= BATCH_BYTES for batch in store.batches)


async def test_a_request_over_the_byte_cap_is_committed_alone() -> None:
    store = LaneStore()
    cap = 300_000
    intake = _intake(store, batch_bytes=cap)
    a, b = uuid.uuid4(), uuid.uuid4()
    sizes = [10, 400_000, 50_000, 10, 290_000, 1_000_000, 10, 10]
    try:
        gate = await _while_held(store, intake, _sub(b))
        subs = [_sub(a, b"z" * n) for n in sizes] + [_sub(b, b"w" * n) for n in sizes]
        futures = [intake.submit(s) for s in subs]
        gate.set()
        answers = await _answers(futures)
    finally:
        await intake.stop()
    assert all(isinstance(x, Admitted) for x in answers)
    for batch in store.batches:
        assert len(batch) == 1 or _batch_bytes(batch) <= cap, [
            len(p.request.payload) for p in batch
        ]
    assert store.lane_order(a) == [s.request.id for s in subs[: len(sizes)]]
    assert store.lane_order(b)[1:] == [s.request.id for s in subs[len(sizes) :]]


async def test_many_users_small_requests_still_fill_batches_of_the_count_cap() -> None:
    store = LaneStore()
    intake = _intake(store)
    users = [uuid.uuid4() for _ in range(50)]
    try:
        gate = await _while_held(store, intake, _sub(users[0]))
        futures = [intake.submit(_sub(u, b"n" * 16)) for _ in range(32) for u in users]
        gate.set()
        await _answers(futures)
    finally:
        await intake.stop()
    assert [len(b) for b in store.batches] == [1, 500, 500, 500, 100]


async def test_a_refused_item_in_a_shared_batch_keeps_every_user_in_order() -> None:
    store = LaneStore()
    intake = _intake(store)
    a, b = uuid.uuid4(), uuid.uuid4()
    try:
        gate = await _while_held(store, intake, _sub(a))
        subs = [_sub(a if i % 3 else b, b"q") for i in range(30)]
        store.bad = {subs[13].request.id}
        futures = [intake.submit(s) for s in subs]
        gate.set()
        answers = await _answers(futures)
    finally:
        await intake.stop()
    refused = [i for i, x in enumerate(answers) if isinstance(x, Rejection)]
    assert refused == [13]
    for user in (a, b):
        sent = [s.request.id for i, s in enumerate(subs) if s.request.user_id == user and i != 13]
        assert [r for r in store.lane_order(user) if r in set(sent)] == sent


async def test_stop_answers_a_submission_taken_while_the_intake_lingered() -> None:
    """A batch is formed when the linger ends: a stop during it answers what waits (the
    batch the old batcher was gathering was lost, its callers never answered)."""
    store = LaneStore()
    intake = _intake(store, linger_ms=3_600_000)
    user = uuid.uuid4()
    intake.start()
    try:
        busy = [intake.submit(_sub(user)) for _ in range(20)]  # a busy batch: lingers next
        await _answers(busy)
        late = intake.submit(_sub(user))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not late.done()
    finally:
        await intake.stop()
    assert late.done()
    rejection = late.exception()
    assert isinstance(rejection, Rejection)
    assert rejection.reason == "shutdown"
    assert intake.pending == 0
