"""The intake's batch isolation with a scripted store: callers that go away, items the
log refuses, transient errors and commits with a lost answer each touch only their own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from fairlane_server.queue.accept_store import CommitUnknown, NewRequest, OutboxItem, PartlyStored
from fairlane_server.queue.intake import Admitted, Intake, Rejection, Submission


class DeadlockError(Exception):
    sqlstate = "40P01"


def _data_error() -> DataError:
    return DataError("INSERT ...", {}, Exception("invalid byte sequence"))


def _deadlock() -> OperationalError:
    return OperationalError("INSERT ...", {}, DeadlockError("deadlock detected"))


class ScriptedStore:
    """Accepts batches like RequestStore, failing as `fail` says for a batch."""

    dialect = "sqlite"

    def __init__(self, fail: Callable[[list[Any]], BaseException | None] = lambda _: None) -> None:
        self.fail = fail
        self.rows: dict[uuid.UUID, NewRequest] = {}
        self.keys: dict[tuple[uuid.UUID, str], uuid.UUID] = {}
        self.calls: list[int] = []
        self.gate: asyncio.Event | None = None

    async def accept(
        self, batch: Sequence[Any], *, lane_limit: int
    ) -> tuple[list[OutboxItem], list[Any]]:
        self.calls.append(len(batch))
        if self.gate is not None:
            await self.gate.wait()
        error = self.fail(list(batch))
        if isinstance(error, CommitUnknown):
            # The transaction went through; only its answer was lost.
            for p in batch:
                self.rows[p.request.id] = p.request
            raise error
        if error is not None:
            raise error
        items = []
        for pos, p in enumerate(batch, 1):
            self.rows[p.request.id] = p.request
            if p.request.idempotency_key:
                self.keys[(p.request.user_id, p.request.idempotency_key)] = p.request.id
            items.append(_item(p.request, pos))
        return items, []

    async def find_idempotent(
        self, keys: Sequence[tuple[uuid.UUID, str]]
    ) -> dict[tuple[uuid.UUID, str], uuid.UUID]:
        return {k: self.keys[k] for k in keys if k in self.keys}

    async def stored(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        return {i for i in ids if i in self.rows}


class Relay:
    def __init__(self) -> None:
        self.handed: list[OutboxItem] = []
        self.backlog = 0
        self.expected: set[uuid.UUID] = set()
        self.handed_unexpected: list[uuid.UUID] = []

    def expect(self, ids: list[uuid.UUID]) -> None:
        self.expected.update(ids)

    def settled(self, ids: list[uuid.UUID]) -> None:
        self.expected.difference_update(ids)

    def hand(self, items: list[OutboxItem]) -> None:
        self.handed.extend(items)
        self.handed_unexpected.extend(
            i.request_id for i in items if i.request_id not in self.expected
        )


def _item(r: NewRequest, pos: int) -> OutboxItem:
    return OutboxItem(
        r.id, r.user_id, pos, "r", "", r.handler, r.payload, 3, None, r.client_ref, r.enqueued_at
    )


def _sub(client_ref: str = "", key: str | None = None, user: uuid.UUID | None = None) -> Submission:
    return Submission(
        request=NewRequest(
            id=uuid.uuid4(),
            user_id=user or uuid.uuid4(),
            handler="echo",
            payload=b"",
            idempotency_key=key,
            client_ref=client_ref,
            max_attempts=3,
            deadline=None,
            trace_id="",
            enqueued_at=datetime.now(UTC),
        ),
        reply_route="r",
    )


def _intake(store: ScriptedStore, relay: Relay | None = None) -> Intake:
    # A long linger gathers every submission of a test into one batch.
    return Intake(
        store,  # type: ignore[arg-type]
        relay or Relay(),  # type: ignore[arg-type]
        batch_size=100,
        linger_ms=50,
        lane_limit=1000,
        transient_patience=1.0,
    )


async def _outcome(future: asyncio.Future[Admitted]) -> Admitted | Rejection:
    try:
        return await asyncio.shield(future)
    except Rejection as rej:
        return rej


@pytest.fixture
def running() -> list[Intake]:
    return []


async def _run(intake: Intake, subs: list[Submission]) -> list[Admitted | Rejection]:
    intake.start()
    try:
        futures = [intake.submit(s) for s in subs]
        return await asyncio.wait_for(asyncio.gather(*(_outcome(f) for f in futures)), 5)
    finally:
        await intake.stop()


async def test_a_refused_item_fails_alone_and_the_batch_is_split() -> None:
    subs = [_sub(str(i)) for i in range(8)]
    bad = subs[5].request.id
    store = ScriptedStore(lambda b: _data_error() if any(p.request.id == bad for p in b) else None)
    relay = Relay()
    outcomes = await _run(_intake(store, relay), subs)
    refused = [o for o in outcomes if isinstance(o, Rejection)]
    assert len(refused) == 1
    assert outcomes[5] is refused[0]
    assert refused[0].reason == "refused"
    assert "nothing was stored" in str(refused[0])
    assert set(store.rows) == {s.request.id for s in subs} - {bad}
    # Halves go in order, so accepted requests still reach the relay in the order sent.
    assert [i.request_id for i in relay.handed] == [
        s.request.id for s in subs if s.request.id != bad
    ]


async def test_transient_errors_are_retried_for_the_whole_batch() -> None:
    failures = iter([_deadlock(), _deadlock()])
    store = ScriptedStore(lambda _: next(failures, None))
    subs = [_sub() for _ in range(3)]
    outcomes = await _run(_intake(store), subs)
    assert all(isinstance(o, Admitted) for o in outcomes)
    assert store.calls == [3, 3, 3]


async def test_a_database_that_stays_down_refuses_everything_as_unavailable() -> None:
    store = ScriptedStore(lambda _: _deadlock())
    outcomes = await _run(_intake(store), [_sub(), _sub()])
    assert all(isinstance(o, Rejection) and o.reason == "database_unavailable" for o in outcomes)
    assert not store.rows


async def test_a_caller_that_goes_away_changes_nothing_for_the_others() -> None:
    store = ScriptedStore()
    store.gate = asyncio.Event()
    intake = _intake(store)
    intake.start()
    try:
        subs = [_sub(str(i)) for i in range(4)]
        futures = [intake.submit(s) for s in subs]
        # Caller 1 gives up while the batch is being written (its deadline passed).
        impatient = asyncio.create_task(_outcome(futures[1]))
        others = asyncio.gather(*(_outcome(f) for i, f in enumerate(futures) if i != 1))
        await asyncio.sleep(0.1)
        impatient.cancel()
        store.gate.set()
        outcomes = await asyncio.wait_for(others, 5)
    finally:
        await intake.stop()
    assert all(isinstance(o, Admitted) for o in outcomes)
    # Its request was stored all the same, and its answer (unread) is the truth.
    assert futures[1].result().request_id == subs[1].request.id


async def test_a_lost_commit_answer_is_settled_by_reading_the_log() -> None:
    subs = [_sub(), _sub()]
    first = True

    def lose_answer(batch: list[Any]) -> BaseException | None:
        nonlocal first
        if first:
            first = False
            return CommitUnknown(
                OSError("connection reset"), [_item(p.request, 1) for p in batch], []
            )
        return None

    relay = Relay()
    outcomes = await _run(_intake(ScriptedStore(lose_answer), relay), subs)
    assert [o.request_id for o in outcomes if isinstance(o, Admitted)] == [
        s.request.id for s in subs
    ]
    assert len(relay.handed) == 2


async def test_a_repeated_key_in_one_batch_gets_the_first_request() -> None:
    user = uuid.uuid4()
    subs = [_sub(key="k", user=user), _sub(key="k", user=user), _sub(user=user)]
    store = ScriptedStore()
    outcomes = await _run(_intake(store), subs)
    first, again, other = outcomes
    assert isinstance(first, Admitted)
    assert isinstance(again, Admitted)
    assert isinstance(other, Admitted)
    assert (again.request_id, again.duplicate) == (first.request_id, True)
    assert len(store.rows) == 2


async def test_a_key_stored_meanwhile_by_another_replica_is_a_duplicate() -> None:
    user = uuid.uuid4()
    original = uuid.uuid4()
    store = ScriptedStore()

    def conflict(batch: list[Any]) -> BaseException | None:
        if any(p.request.idempotency_key == "k" for p in batch):
            store.keys[(user, "k")] = original  # the other replica committed first
            return IntegrityError("INSERT ...", {}, Exception("duplicate key"))
        return None

    store.fail = conflict
    outcomes = await _run(_intake(store), [_sub(key="k", user=user), _sub(user=user)])
    assert isinstance(outcomes[0], Admitted)
    assert (outcomes[0].request_id, outcomes[0].duplicate) == (original, True)
    assert isinstance(outcomes[1], Admitted)
    assert not outcomes[1].duplicate


async def test_a_key_conflict_in_the_second_statement_fails_nobody_else() -> None:
    """PostgreSQL accepts a batch in two statements when some lanes were created after the
    first one's snapshot. A key another replica stored meanwhile made the second one fail,
    which was taken for a lost answer: its other requests were refused "unavailable"."""
    user, other_user = uuid.uuid4(), uuid.uuid4()
    original = uuid.uuid4()
    store = ScriptedStore()
    first = True

    def second_statement_refused(batch: list[Any]) -> BaseException | None:
        nonlocal first
        if first:
            first = False
            early, late = batch[:1], batch[1:]
            for p in early:
                store.rows[p.request.id] = p.request
            store.keys[(user, "k")] = original  # the other replica committed first
            return PartlyStored(
                IntegrityError("INSERT ...", {}, Exception("duplicate key")),
                [_item(p.request, 1) for p in early],
                [],
                late,
            )
        if any(p.request.idempotency_key == "k" for p in batch):
            return IntegrityError("INSERT ...", {}, Exception("duplicate key"))
        return None

    store.fail = second_statement_refused
    subs = [_sub(user=other_user), _sub(key="k", user=user), _sub(user=user)]
    relay = Relay()
    outcomes = await _run(_intake(store, relay), subs)
    stored, duplicate, fresh = outcomes
    assert isinstance(stored, Admitted), stored
    assert isinstance(duplicate, Admitted), duplicate
    assert isinstance(fresh, Admitted), fresh
    assert (stored.request_id, stored.duplicate) == (subs[0].request.id, False)
    assert (duplicate.request_id, duplicate.duplicate) == (original, True)
    assert (fresh.request_id, fresh.duplicate) == (subs[2].request.id, False)
    assert sorted(i.request_id for i in relay.handed) == sorted(
        [subs[0].request.id, subs[2].request.id]
    )


async def test_the_relay_is_told_of_a_commit_before_it_and_settled_after_it() -> None:
    store = ScriptedStore()
    relay = Relay()
    seen: list[set[uuid.UUID]] = []
    accept = store.accept

    async def watching(batch: Sequence[Any], *, lane_limit: int) -> Any:
        seen.append(set(relay.expected))
        return await accept(batch, lane_limit=lane_limit)

    store.accept = watching  # type: ignore[method-assign]
    subs = [_sub() for _ in range(3)]
    outcomes = await _run(_intake(store, relay), subs)
    assert all(isinstance(o, Admitted) for o in outcomes)
    # Expected while committing (rows may show in the outbox before the handover), handed
    # while still expected, and nothing left expected afterwards.
    assert seen == [{s.request.id for s in subs}]
    assert relay.handed_unexpected == []
    assert relay.expected == set()
