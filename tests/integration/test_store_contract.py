"""The request log behaves the same on PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from uuid_utils.compat import uuid7

from fairlane_server.core import status
from fairlane_server.core.db import create_engine, migrate
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.models import lanes, request_events, requests, users
from fairlane_server.queue.accept_store import AcceptStore, NewRequest, OutboxItem
from fairlane_server.queue.intake import Intake, Submission
from fairlane_server.queue.outbox_store import OutboxStore
from fairlane_server.queue.relay import LaneRelay
from fairlane_server.queue.store import RESULT_READ_BYTES, RequestStore
from fairlane_server.worker.store import Attempt, Outcome, WorkerStore
from fairlane_server.worker.writer import ResultWriter
from tests.conftest import DATABASE_URL, unique

pytestmark = pytest.mark.integration


async def _user(engine: AsyncEngine) -> uuid.UUID:
    uid = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=uid, username=unique("u"), password_hash="x", created_at=datetime.now(UTC)
            )
        )
    return uid


def new_request(user: uuid.UUID, key: str | None = None) -> NewRequest:
    return NewRequest(
        # Request ids are UUIDv7, as the queue makes them: the log is partitioned by their time.
        id=uuid7(),
        user_id=user,
        handler="echo",
        payload=b"p",
        idempotency_key=key,
        client_ref="",
        max_attempts=3,
        deadline=None,
        trace_id="",
        enqueued_at=datetime.now(UTC),
    )


@dataclass
class _Pending:
    request: NewRequest
    reply_route: str = "queue.test"
    traceparent: str = ""


async def _accept(
    engine: AsyncEngine, batch: list[NewRequest], lane_limit: int = 1000
) -> tuple[list[OutboxItem], list[NewRequest]]:
    pending = [_Pending(r) for r in batch]
    kept, refused = await AcceptStore(engine).accept(pending, lane_limit=lane_limit)
    return kept, [p.request for p in refused]


async def test_batch_insert_finish_and_replay(engine: AsyncEngine) -> None:
    store, worker = RequestStore(engine), WorkerStore(engine)
    a, b = await _user(engine), await _user(engine)
    batch = [new_request(a), new_request(b), new_request(a), new_request(a, key="k1")]
    await _accept(engine, batch)
    assert await AcceptStore(engine).find_idempotent([(a, "k1"), (b, "k1")]) == {
        (a, "k1"): batch[3].id
    }

    now = datetime.now(UTC)
    outcomes = [
        Outcome(r.id, r.user_id, "SUCCEEDED", output=b"o", attempts=[Attempt(1, now)])
        for r in batch
    ]
    await worker.finish(outcomes[:2])
    await worker.finish(outcomes[2:])
    # lane_seq counts per lane, in the order outcomes were written
    assert [o.lane_seq for o in outcomes] == [1, 1, 2, 3]
    states = await worker.states([r.id for r in batch])
    assert {s.status for s in states.values()} == {"SUCCEEDED"}

    replay = (await store.results_after(a, 1)).rows
    assert [(r.id, r.lane_seq) for r in replay] == [(batch[2].id, 2), (batch[3].id, 3)]
    assert [r.lane_seq for r in (await store.results_after(a, 0, upto=3)).rows] == [1, 2]


async def test_finished_of_reads_several_users_asks_in_one_statement(
    engine: AsyncEngine,
) -> None:
    store, worker = RequestStore(engine), WorkerStore(engine)
    a, b = await _user(engine), await _user(engine)
    a1, a2, a3, b1, b2 = batch = [
        new_request(a),
        new_request(a),
        new_request(a),
        new_request(b),
        new_request(b),
    ]
    await _accept(engine, batch)
    await worker.finish([Outcome(r.id, r.user_id, "SUCCEEDED", output=b"o") for r in (a2, a1, b2)])
    # More ids than SQLite takes as parameters of one statement (one JSON array there).
    unknown = [uuid7() for _ in range(1500)]
    rows = await store.finished_of([(a, [a1.id, a2.id, a3.id, *unknown]), (b, [b1.id, b2.id])])
    found = {r.id: (r.user_id, r.lane_seq, r.status, r.output) for r in rows}
    assert found == {
        a2.id: (a, 1, "SUCCEEDED", b"o"),
        a1.id: (a, 2, "SUCCEEDED", b"o"),
        b2.id: (b, 1, "SUCCEEDED", b"o"),
    }
    assert await store.finished_of([(a, [])]) == []


def big_output(seq: int, size: int) -> bytes:
    """An output of `size` bytes that says which result it is (and does not compress)."""
    return random.Random(seq).randbytes(size)


async def _finished(engine: AsyncEngine, user: uuid.UUID, sizes: Sequence[int]) -> list[NewRequest]:
    """Requests of the user finished in order (lane_seq 1, 2, ...) with outputs of `sizes`."""
    worker = WorkerStore(engine)
    batch = [new_request(user) for _ in sizes]
    await _accept(engine, batch)
    for n, (r, size) in enumerate(zip(batch, sizes, strict=True), start=1):
        await worker.finish([Outcome(r.id, user, "SUCCEEDED", output=big_output(n, size))])
    return batch


def _outputs(rows: Sequence[Any]) -> int:
    return sum(len(r.output or b"") for r in rows)


async def test_results_after_reads_pages_bounded_in_bytes_and_pages_to_the_end(
    engine: AsyncEngine,
) -> None:
    store = RequestStore(engine)
    user = await _user(engine)
    size = 512 * 1024
    n = 40  # 20 MiB of outputs, five times the bound, in far fewer than a page's count
    batch = await _finished(engine, user, [size] * n)

    first = await store.results_after(user, 0)
    assert 1 <= len(first.rows) < n
    assert _outputs(first.rows) <= RESULT_READ_BYTES
    assert first.more  # short of its count, and not the end

    seen: list[Any] = []
    after, reads = 0, 0
    while True:
        page = await store.results_after(user, after)
        reads += 1
        assert page.rows
        assert _outputs(page.rows) <= RESULT_READ_BYTES
        seen.extend(page.rows)
        after = page.rows[-1].lane_seq
        if not page.more:
            break
    assert reads >= n * size // RESULT_READ_BYTES
    assert [(r.id, r.lane_seq) for r in seen] == [(q.id, i) for i, q in enumerate(batch, 1)]
    assert all(r.output == big_output(r.lane_seq, size) for r in seen)
    # The end, and past it: nothing, and nothing more.
    last = await store.results_after(user, n)
    assert (last.rows, last.more) == ([], False)
    # The count still bounds a page of small outputs; a full page may be followed by more.
    small = await _user(engine)
    await _finished(engine, small, [10] * 5)
    full = await store.results_after(small, 0, limit=5)
    assert (len(full.rows), full.more) == (5, True)
    assert (await store.results_after(small, 5, limit=5)).more is False
    short = await store.results_after(small, 0, upto=4, limit=5)
    assert ([r.lane_seq for r in short.rows], short.more) == ([1, 2, 3], False)


async def test_an_output_larger_than_the_bound_comes_alone(engine: AsyncEngine) -> None:
    store = RequestStore(engine)
    user = await _user(engine)
    huge = RESULT_READ_BYTES + 1024
    await _finished(engine, user, [100, huge, 100, 100])
    pages = []
    after = 0
    while True:
        page = await store.results_after(user, after)
        pages.append([(r.lane_seq, len(r.output)) for r in page.rows])
        after = page.rows[-1].lane_seq
        if not page.more:
            break
    assert pages == [[(1, 100)], [(2, huge)], [(3, 100), (4, 100)]]
    assert (await store.results_after(user, 1)).rows[0].output == big_output(2, huge)


async def test_a_listing_with_bodies_loads_them_up_to_the_bound(engine: AsyncEngine) -> None:
    """ListDeadRequests returns payloads and outputs: a page of 500 of 1 MiB was loaded
    whole (500 MB) and cut to 4 MiB only afterwards. Now the sizes come first."""
    store = RequestStore(engine)
    user = await _user(engine)
    size = 256 * 1024
    batch = await _finished(engine, user, [size] * 12)  # 3 MiB of outputs
    loaded: list[int] = []
    seen: list[Any] = []
    before = None
    while True:
        rows, more = await store.list_requests_with_bodies(
            user, status_name="SUCCEEDED", limit=500, before=before, max_bytes=1024 * 1024
        )
        loaded.append(_outputs(rows))
        seen.extend(rows)
        if not more:
            break
        before = rows[-1].id
    assert all(0 < n <= 1024 * 1024 for n in loaded)
    # Three outputs and their payloads fit under 1 MiB; four outputs alone are 1 MiB.
    assert loaded == [3 * size] * 4
    assert [r.id for r in seen] == [r.id for r in reversed(batch)]  # newest first, once each
    assert all(r.output == big_output(r.lane_seq, size) and r.payload == b"p" for r in seen)
    # One larger than the bound comes alone; the count still bounds a page.
    rows, more = await store.list_requests_with_bodies(
        user, status_name=None, limit=500, before=None, max_bytes=1000
    )
    assert ([r.id for r in rows], more) == ([batch[-1].id], True)
    rows, more = await store.list_requests_with_bodies(
        user, status_name=None, limit=12, before=None, max_bytes=10 * 1024 * 1024
    )
    assert (len(rows), more) == (12, True)
    rows, more = await store.list_requests_with_bodies(
        user, status_name="DEAD", limit=12, before=None, max_bytes=10 * 1024 * 1024
    )
    assert (rows, more) == ([], False)


async def test_finished_of_reads_outputs_up_to_the_bound_the_asks_taking_turns(
    engine: AsyncEngine,
) -> None:
    store = RequestStore(engine)
    a, b = await _user(engine), await _user(engine)
    mib = 1024 * 1024
    mine = await _finished(engine, a, [mib] * 12)
    his = await _finished(engine, b, [mib] * 3)
    asks = [(a, [r.id for r in mine]), (b, [r.id for r in his])]
    rows = {r.id: r for r in await store.finished_of(asks)}
    assert set(rows) == {r.id for r in mine + his}  # every finished one, some withheld
    read = [r for r in rows.values() if not r.withheld]
    assert _outputs(read) <= RESULT_READ_BYTES
    # The first of each ask, then the second of each: the bound is shared in turns.
    assert {r.id for r in read} == {mine[0].id, his[0].id, mine[1].id, his[1].id}
    for r in rows.values():
        seq = r.lane_seq
        assert r.size == mib
        assert r.output == (None if r.withheld else big_output(seq, mib))
        assert r.user_id == (a if r.id in asks[0][1] else b)
    assert [rows[q.id].lane_seq for q in mine] == list(range(1, 13))

    # Asking again for what was withheld gets every output, a bounded read at a time.
    wanted = [r.id for r in mine if rows[r.id].withheld]
    got: dict[uuid.UUID, bytes] = {}
    while wanted:
        again = await store.finished_of([(a, wanted)])
        assert len(again) == len(wanted)
        assert _outputs(again) <= RESULT_READ_BYTES
        got.update({r.id: r.output for r in again if not r.withheld})
        assert wanted[0] in got  # the first asked for always comes
        wanted = [i for i in wanted if i not in got]
    assert all(got[q.id] == big_output(n, mib) for n, q in enumerate(mine, 1) if q.id in got)

    # One output larger than the bound comes alone, and first; a result without an output
    # has nothing to leave out, and comes whole.
    c = await _user(engine)
    huge, small, empty = await _finished(engine, c, [RESULT_READ_BYTES + 1, 10, 0])
    alone = {r.id: r for r in await store.finished_of([(c, [huge.id, small.id, empty.id])])}
    assert alone[huge.id].output == big_output(1, RESULT_READ_BYTES + 1)
    assert alone[small.id].withheld
    assert alone[small.id].output is None
    assert alone[small.id].lane_seq == 2
    assert not alone[empty.id].withheld
    assert (alone[empty.id].lane_seq, alone[empty.id].status) == (3, "SUCCEEDED")


async def test_duplicate_idempotency_key_is_refused_by_the_log(engine: AsyncEngine) -> None:
    user = await _user(engine)
    await _accept(engine, [new_request(user, key="same")])
    with pytest.raises(IntegrityError):
        await _accept(engine, [new_request(user, key="same")])


async def test_accept_numbers_lanes_and_fills_the_outbox(engine: AsyncEngine) -> None:
    outbox = OutboxStore(engine)
    a, b = await _user(engine), await _user(engine)
    first = [new_request(a), new_request(b), new_request(a)]
    kept, refused = await _accept(engine, first)
    assert refused == []
    # Each lane's requests keep their batch order and get the lane's next positions.
    assert [(i.request_id, i.lane_pos) for i in kept if i.user_id == a] == [
        (first[0].id, 1),
        (first[2].id, 2),
    ]
    assert [(i.request_id, i.lane_pos) for i in kept if i.user_id == b] == [(first[1].id, 1)]
    kept, _ = await _accept(engine, [new_request(a)])
    assert [i.lane_pos for i in kept] == [3]
    lanes = await outbox.pending([a, b])
    assert [r.lane_pos for r in lanes[a].rows] == [1, 2, 3]
    assert lanes[a].next_pos == 1
    loaded = await outbox.load([r.request_id for r in lanes[b].rows])
    assert [(i.request_id, i.handler, i.payload, i.recovered) for i in loaded] == [
        (first[1].id, "echo", b"p", True)
    ]
    await outbox.release([r.request_id for r in lanes[a].rows[:2]], [])
    lanes = await outbox.pending([a])
    assert lanes[a].next_pos == 3
    await outbox.close()


async def test_the_lane_bound_is_counted_from_the_log(engine: AsyncEngine) -> None:
    store, worker = RequestStore(engine), WorkerStore(engine)
    user = await _user(engine)
    batch = [new_request(user) for _ in range(4)]
    kept, refused = await _accept(engine, batch, lane_limit=3)
    assert [i.request_id for i in kept] == [r.id for r in batch[:3]]
    assert refused == [batch[3]]
    assert await store.get(user, batch[3].id) is None  # nothing stored for it
    await worker.finish([Outcome(batch[0].id, user, "SUCCEEDED")])
    kept, refused = await _accept(engine, [new_request(user), new_request(user)], lane_limit=3)
    assert (len(kept), len(refused)) == (1, 1)
    assert kept[0].lane_pos == 4


async def test_cancel_only_while_queued(engine: AsyncEngine) -> None:
    store, worker = RequestStore(engine), WorkerStore(engine)
    user = await _user(engine)
    queued, done = new_request(user), new_request(user)
    await _accept(engine, [queued, done])
    await worker.finish([Outcome(done.id, user, "SUCCEEDED")])
    assert await store.cancel_queued(user, queued.id) == "CANCELLED"
    assert await store.cancel_queued(user, done.id) == "SUCCEEDED"
    assert await store.cancel_queued(user, uuid.uuid4()) is None


async def test_a_cancel_of_a_running_request_is_kept_in_the_log_and_wins(
    engine: AsyncEngine,
) -> None:
    """CancelRequest answers RUNNING and the worker running it is asked to stop; the log
    keeps the cancel too, so a worker that takes the request over (its first one died)
    sees it, and an outcome the handler produced anyway is written CANCELLED."""
    store, worker = RequestStore(engine), WorkerStore(engine)
    user = await _user(engine)
    at = datetime.now(UTC)
    running, other = new_request(user), new_request(user)
    await store_requests(engine, [running, other])
    await worker.finish([], [(running.id, 1, at), (other.id, 1, at)])
    assert await store.cancel_queued(user, running.id) == "RUNNING"
    states = await worker.states([running.id, other.id])
    assert (states[running.id].status, states[running.id].cancel_requested) == ("RUNNING", True)
    assert states[other.id].cancel_requested is False
    _ok(
        await write_results(
            worker,
            [
                Outcome(running.id, user, "SUCCEEDED", output=b"x", attempts=[Attempt(1, at)]),
                Outcome(other.id, user, "SUCCEEDED", output=b"y", attempts=[Attempt(1, at)]),
            ],
        )
    )
    rows = await _rows(engine, [running.id, other.id])
    assert (rows[running.id].status, rows[running.id].output) == ("CANCELLED", None)
    assert (rows[other.id].status, rows[other.id].output) == ("SUCCEEDED", b"y")
    assert [rows[running.id].lane_seq, rows[other.id].lane_seq] == [1, 2]
    assert await store.cancel_queued(user, running.id) == "CANCELLED"  # finished now


async def test_an_outcome_written_twice_keeps_the_first_and_no_seq_is_lost(
    engine: AsyncEngine,
) -> None:
    # A redelivery can run a request again before its first outcome was written; both
    # outcomes may then reach the writer, even in one batch.
    store, worker = RequestStore(engine), WorkerStore(engine)
    user = await _user(engine)
    a, b = new_request(user), new_request(user)
    await _accept(engine, [a, b])
    first = Outcome(a.id, user, "SUCCEEDED", output=b"first")
    again = Outcome(a.id, user, "SUCCEEDED", output=b"again")
    later = Outcome(b.id, user, "SUCCEEDED", output=b"b")
    written = await worker.finish([first, again, later])
    assert written == [first, later]
    assert [o.lane_seq for o in written] == [1, 2]
    assert await worker.finish([Outcome(a.id, user, "FAILED")]) == []
    replay = (await store.results_after(user, 0)).rows
    assert [(r.id, r.lane_seq, r.output) for r in replay] == [(a.id, 1, b"first"), (b.id, 2, b"b")]


# ------------------------------------------------------------------------------------------
# Multi-item batches (issue 12): every shape of batch the services write. One batch is one
# call; whatever one item does, the others keep their own fate.
#
# The adapters just below are the only code here that knows how a batch is handed to the
# stores and how the failure of a single item is reported. When that API changes, only
# they change.
# ------------------------------------------------------------------------------------------

Mark = tuple[uuid.UUID, int, datetime]  # (request id, attempt number, started at)


async def write_results(
    worker: WorkerStore, outcomes: Sequence[Outcome], marks: Sequence[Mark] = ()
) -> dict[uuid.UUID, BaseException | None]:
    """One result-writer batch. Maps the request of every outcome and mark to the error
    that kept it (alone) out of the log, or to None when it was written or deliberately
    left out (already finished, or not in the log)."""
    ids = [o.request_id for o in outcomes] + [m[0] for m in marks]
    try:
        await worker.finish(list(outcomes), list(marks))
    except Exception as exc:  # today a batch shares one fate: every item gets the error
        return dict.fromkeys(ids, exc)
    return dict.fromkeys(ids)


# A batch that holds an item the database refuses goes through the stage that writes it
# (intake, result writer): whichever layer isolates the item, only that item may fail.
STAGE_PATIENCE = 15.0  # a batch of a few items settles far sooner; past this it is stuck


async def through_intake(
    engine: AsyncEngine, batch: Sequence[NewRequest]
) -> dict[uuid.UUID, BaseException | None]:
    """One intake batch. Maps every request to the error it was answered with (None:
    accepted), or to TimeoutError when the stage never answered it."""
    broker = MemoryBroker(lane_max_length=1000)
    await broker.connect()
    relay = LaneRelay(OutboxStore(engine), broker)
    intake = Intake(AcceptStore(engine), relay, batch_size=len(batch), linger_ms=0, lane_limit=1000)
    futures = [intake.submit(Submission(request=r, reply_route="queue.test")) for r in batch]
    intake.start()
    try:
        await asyncio.wait(futures, timeout=STAGE_PATIENCE)
        return {r.id: _answer(f) for r, f in zip(batch, futures, strict=True)}
    finally:
        await intake.stop()
        await broker.close()


async def through_writer(
    worker: WorkerStore, outcomes: Sequence[Outcome], marks: Sequence[Mark] = ()
) -> dict[uuid.UUID, BaseException | None]:
    """One result-writer batch. Maps every outcome's request to the error its write ended
    with (None: written, or deliberately left out), or to TimeoutError when it never
    ended."""
    broker = MemoryBroker(lane_max_length=1000)
    await broker.connect()
    results: list[bytes] = []

    async def deliver(body: bytes) -> None:
        results.append(body)

    await broker.consume_results("queue.test", deliver)  # a queue replica is listening
    writer = ResultWriter(worker, broker, batch_size=1000, linger_ms=0)
    for mark in marks:
        writer.running(*mark)
    futures = [
        writer.finish(o, route="queue.test", client_ref="", handler="echo") for o in outcomes
    ]
    writer.start()
    try:
        await asyncio.wait(futures, timeout=STAGE_PATIENCE)
        return {o.request_id: _answer(f) for o, f in zip(outcomes, futures, strict=True)}
    finally:
        await writer.stop(timeout=0)
        await broker.close()


def _answer(future: asyncio.Future[Any]) -> BaseException | None:
    if not future.done():
        return TimeoutError("the stage never answered")
    return future.exception()


async def store_requests(engine: AsyncEngine, batch: Sequence[NewRequest]) -> None:
    """Stores a batch that is accepted whole."""
    _, refused = await _accept(engine, list(batch))
    assert not refused


async def _rows(engine: AsyncEngine, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Any]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(requests).where(requests.c.id.in_(list(ids))))
        return {r.id: r for r in rows}


async def _final_events(
    engine: AsyncEngine, ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[str]]:
    """The final-status events of each request, oldest first."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(request_events.c.request_id, request_events.c.status)
            .where(
                request_events.c.request_id.in_(list(ids)),
                request_events.c.status.in_(sorted(status.FINAL)),
            )
            .order_by(request_events.c.id)
        )
        found: dict[uuid.UUID, list[str]] = {}
        for request_id, name in rows.all():
            found.setdefault(request_id, []).append(name)
        return found


async def _assert_lane_consistent(engine: AsyncEngine, user: uuid.UUID) -> list[Any]:
    """The lane's finished requests hold lane_seq 1..n without gaps, lanes.last_seq is n,
    and each one's history ends as its row does. Returns the finished rows."""
    async with engine.connect() as conn:
        finished = list(
            (
                await conn.execute(
                    sa.select(requests)
                    .where(requests.c.user_id == user, requests.c.lane_seq.is_not(None))
                    .order_by(requests.c.lane_seq)
                )
            ).all()
        )
        last_seq = (
            await conn.execute(sa.select(lanes.c.last_seq).where(lanes.c.user_id == user))
        ).scalar_one()
    assert [r.lane_seq for r in finished] == list(range(1, len(finished) + 1))
    assert last_seq == len(finished)
    assert all(r.status in status.FINAL for r in finished)
    # The history agrees with the row: it ran to an end once (a cancel may be recorded
    # both when asked and when the worker let go of the request).
    events = await _final_events(engine, [r.id for r in finished])
    assert {r.id: set(events.get(r.id, [])) for r in finished} == {
        r.id: {r.status} for r in finished
    }
    assert all(len(events[r.id]) == 1 for r in finished if r.status != "CANCELLED")
    return finished


def _ok(outcome_of: dict[uuid.UUID, BaseException | None]) -> None:
    failed = {k: v for k, v in outcome_of.items() if v is not None}
    assert not failed, failed


async def test_cancels_racing_outcomes(engine: AsyncEngine) -> None:
    """A cancel and the batch holding the outcome of the same request, in either order
    and at once: the cancel's answer is the truth, and the lane keeps its numbering."""
    store, worker = RequestStore(engine), WorkerStore(engine)
    user = await _user(engine)
    at = datetime.now(UTC)

    # Cancelled first: the outcome that follows becomes CANCELLED and keeps its place.
    a, b = new_request(user), new_request(user)
    await store_requests(engine, [a, b])
    assert await store.cancel_queued(user, a.id) == "CANCELLED"
    _ok(
        await write_results(
            worker,
            [
                Outcome(a.id, user, "SUCCEEDED", output=b"a", attempts=[Attempt(1, at)]),
                Outcome(b.id, user, "SUCCEEDED", output=b"b", attempts=[Attempt(1, at)]),
            ],
        )
    )
    rows = await _rows(engine, [a.id, b.id])
    assert (rows[a.id].status, rows[a.id].lane_seq, rows[a.id].output) == ("CANCELLED", 1, None)
    assert (rows[b.id].status, rows[b.id].lane_seq) == ("SUCCEEDED", 2)

    # Written first: the cancel finds it finished.
    c = new_request(user)
    await store_requests(engine, [c])
    _ok(await write_results(worker, [Outcome(c.id, user, "SUCCEEDED", output=b"c")]))
    assert await store.cancel_queued(user, c.id) == "SUCCEEDED"

    # At once, many times over: cancels of some of a batch's requests race its write,
    # and a mark of a cancelled request does not make it RUNNING again.
    for _ in range(10):
        batch = [new_request(user) for _ in range(4)]
        await store_requests(engine, batch)
        outcomes = [
            Outcome(r.id, user, "SUCCEEDED", output=b"o", attempts=[Attempt(1, at)])
            for r in batch[:3]
        ]
        written, *answers = await asyncio.gather(
            write_results(worker, outcomes, [(batch[3].id, 1, at)]),
            store.cancel_queued(user, batch[1].id),
            store.cancel_queued(user, batch[3].id),
        )
        _ok(written)
        rows = await _rows(engine, [r.id for r in batch])
        assert answers[0] == rows[batch[1].id].status
        assert answers[0] in ("CANCELLED", "SUCCEEDED")
        # Marked RUNNING first (the cancel then goes to the worker) or cancelled first
        # (and the mark leaves it CANCELLED).
        assert answers[1] == rows[batch[3].id].status
        assert answers[1] in ("CANCELLED", "RUNNING")
        for r in batch[:3]:
            row = rows[r.id]
            assert row.lane_seq is not None
            assert row.output == (None if row.status == "CANCELLED" else b"o")
    await _assert_lane_consistent(engine, user)


async def test_several_running_marks_in_one_batch(engine: AsyncEngine) -> None:
    worker = WorkerStore(engine)
    user = await _user(engine)
    batch = [new_request(user) for _ in range(4)]
    await store_requests(engine, batch)
    at = datetime.now(UTC)
    marks = [(r.id, 1, at) for r in batch[:3]]
    _ok(await write_results(worker, [], marks))
    rows = await _rows(engine, [r.id for r in batch])
    assert [rows[r.id].status for r in batch] == ["RUNNING"] * 3 + ["QUEUED"]
    assert [rows[r.id].attempts for r in batch] == [1, 1, 1, 0]
    assert all(rows[r.id].started_at is not None for r in batch[:3])
    assert all(rows[r.id].lane_seq is None for r in batch)

    # A later attempt of the same requests (a retry) is marked in the next batch.
    _ok(await write_results(worker, [], [(r.id, 2, at) for r in batch[:2]]))
    rows = await _rows(engine, [r.id for r in batch])
    assert [rows[r.id].attempts for r in batch] == [2, 2, 1, 0]


async def test_marks_together_with_outcomes_in_one_batch(engine: AsyncEngine) -> None:
    worker = WorkerStore(engine)
    a, b = await _user(engine), await _user(engine)
    # Two lanes, four requests each: lane a's first two finish while its others start.
    ra = [new_request(a) for _ in range(4)]
    rb = [new_request(b) for _ in range(4)]
    await store_requests(engine, ra + rb)
    at = datetime.now(UTC)
    outcomes = [
        Outcome(ra[0].id, a, "SUCCEEDED", output=b"a0", attempts=[Attempt(1, at)]),
        Outcome(rb[0].id, b, "FAILED", error="no", attempts=[Attempt(1, at, "no")]),
        Outcome(ra[1].id, a, "SUCCEEDED", output=b"a1", attempts=[Attempt(1, at)]),
    ]
    marks = [(ra[2].id, 1, at), (rb[1].id, 1, at), (rb[2].id, 1, at), (ra[3].id, 1, at)]
    _ok(await write_results(worker, outcomes, marks))
    rows = await _rows(engine, [r.id for r in ra + rb])
    assert [(rows[r.id].status, rows[r.id].lane_seq) for r in ra] == [
        ("SUCCEEDED", 1),
        ("SUCCEEDED", 2),
        ("RUNNING", None),
        ("RUNNING", None),
    ]
    assert [(rows[r.id].status, rows[r.id].lane_seq) for r in rb] == [
        ("FAILED", 1),
        ("RUNNING", None),
        ("RUNNING", None),
        ("QUEUED", None),
    ]
    assert rows[ra[1].id].output == b"a1"

    # The marked ones finish in the next batch, beside new marks; a late mark of a
    # finished request (its mark timer fired as it finished) never makes it RUNNING again.
    outcomes = [
        Outcome(ra[2].id, a, "SUCCEEDED", attempts=[Attempt(1, at)]),
        Outcome(rb[1].id, b, "SUCCEEDED", attempts=[Attempt(1, at)]),
    ]
    marks = [(rb[3].id, 1, at), (ra[0].id, 1, at), (rb[0].id, 2, at)]
    _ok(await write_results(worker, outcomes, marks))
    rows = await _rows(engine, [r.id for r in ra + rb])
    assert [(rows[r.id].status, rows[r.id].lane_seq) for r in ra] == [
        ("SUCCEEDED", 1),
        ("SUCCEEDED", 2),
        ("SUCCEEDED", 3),
        ("RUNNING", None),
    ]
    assert [(rows[r.id].status, rows[r.id].lane_seq) for r in rb] == [
        ("FAILED", 1),
        ("SUCCEEDED", 2),
        ("RUNNING", None),
        ("RUNNING", None),
    ]
    assert rows[rb[0].id].attempts == 1
    await _assert_lane_consistent(engine, a)
    await _assert_lane_consistent(engine, b)


async def test_the_same_request_twice_in_one_batch(engine: AsyncEngine) -> None:
    worker = WorkerStore(engine)
    user = await _user(engine)
    a, b, c = new_request(user), new_request(user), new_request(user)
    await store_requests(engine, [a, b, c])
    at = datetime.now(UTC)
    # Two marks of one request (attempt 1, then its retry), and a mark beside the outcome
    # of the same request: the outcome wins whatever the order in the batch.
    marks = [(a.id, 1, at), (a.id, 2, at), (b.id, 1, at)]
    outcome_b = Outcome(b.id, user, "SUCCEEDED", output=b"b", attempts=[Attempt(1, at)])
    _ok(await write_results(worker, [outcome_b], marks))
    rows = await _rows(engine, [a.id, b.id, c.id])
    assert (rows[a.id].status, rows[a.id].attempts) == ("RUNNING", 2)
    assert (rows[b.id].status, rows[b.id].lane_seq, rows[b.id].output) == ("SUCCEEDED", 1, b"b")

    # Two outcomes of one request (a redelivery ran it again) with its mark in between.
    first = Outcome(a.id, user, "SUCCEEDED", output=b"first", attempts=[Attempt(2, at)])
    again = Outcome(a.id, user, "FAILED", error="again", attempts=[Attempt(3, at, "again")])
    last = Outcome(c.id, user, "SUCCEEDED", output=b"c", attempts=[Attempt(1, at)])
    _ok(await write_results(worker, [first, again, last], [(a.id, 3, at)]))
    finished = await _assert_lane_consistent(engine, user)
    assert [(r.id, r.status, r.output) for r in finished] == [
        (b.id, "SUCCEEDED", b"b"),
        (a.id, "SUCCEEDED", b"first"),
        (c.id, "SUCCEEDED", b"c"),
    ]


# One request the database refuses in an intake batch: PostgreSQL refuses NUL in text
# (SQLite stores it); a deadline at the very end of 9999 is stored by both, but must then
# travel in the lane message too.
INTAKE_POISONS = ["nul_in_client_ref", "nul_in_idempotency_key", "deadline_at_the_end_of_9999"]


@pytest.mark.parametrize("kind", INTAKE_POISONS)
async def test_one_bad_request_fails_alone_in_an_intake_batch(
    engine: AsyncEngine, kind: str
) -> None:
    a, b = await _user(engine), await _user(engine)
    poison = new_request(a)
    if kind == "nul_in_client_ref":
        poison.client_ref = "ref\x00nul"
    elif kind == "nul_in_idempotency_key":
        poison.idempotency_key = "key\x00nul"
    else:
        poison.deadline = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    batch = [
        new_request(a),
        new_request(b, key="k1"),
        poison,
        new_request(a, key="k2"),
        new_request(b),
    ]

    errors = await through_intake(engine, batch)

    good = [r for r in batch if r is not poison]
    assert {r.id: errors[r.id] for r in good} == {r.id: None for r in good}
    rows = await _rows(engine, [r.id for r in batch])
    assert all(rows[r.id].status == "QUEUED" for r in good)
    if errors[poison.id] is not None:
        # Refused alone, and nothing of it was stored: no row, no event.
        assert poison.id not in rows
        async with engine.connect() as conn:
            events = await conn.execute(
                sa.select(sa.func.count()).where(request_events.c.request_id == poison.id)
            )
            assert events.scalar_one() == 0
    else:
        stored = rows[poison.id]
        assert (stored.client_ref, stored.idempotency_key) == (
            poison.client_ref,
            poison.idempotency_key,
        )
        assert (stored.deadline is None) == (poison.deadline is None)


async def test_one_bad_outcome_fails_alone_in_a_result_batch(engine: AsyncEngine) -> None:
    """PostgreSQL refuses a handler's error text with a NUL in it; on either database an
    outcome whose lane row is gone (its user was deleted) cannot be numbered. Neither may
    keep the other lanes' outcomes, or the marks beside them, out of the log."""
    store, worker = RequestStore(engine), WorkerStore(engine)
    a, b, gone = await _user(engine), await _user(engine), await _user(engine)
    ra = [new_request(a) for _ in range(3)]
    rb = [new_request(b) for _ in range(2)]
    rg = new_request(gone)
    await store_requests(engine, [*ra, *rb, rg])
    async with engine.begin() as conn:
        await conn.execute(users.delete().where(users.c.id == gone))
    at = datetime.now(UTC)
    outcomes = [
        Outcome(ra[0].id, a, "SUCCEEDED", output=b"a0", attempts=[Attempt(1, at)]),
        Outcome(rb[0].id, b, "SUCCEEDED", output=b"b0", attempts=[Attempt(1, at)]),
        Outcome(rg.id, gone, "SUCCEEDED", output=b"g", attempts=[Attempt(1, at)]),
        Outcome(ra[1].id, a, "SUCCEEDED", output=b"a1", attempts=[Attempt(1, at)]),
    ]
    nul = Outcome(rb[1].id, b, "FAILED", error="bad\x00text", attempts=[Attempt(1, at, "x\x00")])
    if store.dialect == "postgresql":
        outcomes.insert(2, nul)
    errors = await through_writer(worker, outcomes, [(ra[2].id, 1, at)])

    good = [o for o in outcomes if o.request_id not in (rg.id, nul.request_id)]
    assert {o.request_id: errors[o.request_id] for o in good} == {o.request_id: None for o in good}
    rows = await _rows(engine, [r.id for r in [*ra, *rb, rg]])
    assert [(rows[r.id].status, rows[r.id].lane_seq) for r in ra] == [
        ("SUCCEEDED", 1),
        ("SUCCEEDED", 2),
        ("RUNNING", None),
    ]
    assert (rows[rb[0].id].status, rows[rb[0].id].lane_seq) == ("SUCCEEDED", 1)
    await _assert_lane_consistent(engine, a)
    await _assert_lane_consistent(engine, b)
    # The outcome without a lane row cannot be numbered, whatever else happens to it.
    assert rows[rg.id].lane_seq is None
    if store.dialect == "postgresql":
        # The NUL outcome is refused alone (its request stays unfinished, holding no
        # lane_seq) or written with text the database takes.
        bad = rows[nul.request_id]
        if errors[nul.request_id] is None:
            assert (bad.status, bad.lane_seq) == ("FAILED", 2)
        else:
            assert bad.lane_seq is None


async def test_a_cancel_committed_between_the_writers_read_and_write_wins_on_sqlite(
    tmp_path: Path,
) -> None:
    """SQLite has no SELECT ... FOR UPDATE: the result writer's read of the rows locks
    nothing, and its write lock comes with its first write. A cancel that commits in
    between (answered CANCELLED to its client) must still win, as it does on PostgreSQL.

    The cancel is made at that exact point (before the writer's first write, which
    numbers the lane) from a statement hook, on a connection of its own, with the UPDATE
    RequestStore.cancel_queued runs."""
    path = tmp_path / "race.db"
    url = f"sqlite+aiosqlite:///{path}"
    await migrate(url)
    engine = create_engine(url)
    try:
        store, worker = RequestStore(engine), WorkerStore(engine)
        user = await _user(engine)
        r = new_request(user)
        await store_requests(engine, [r])
        cancelled: list[int] = []

        def cancel_in_between(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if cancelled or not statement.startswith("UPDATE lanes SET last_seq"):
                return
            # timeout=0: a writer that took its lock with its read locks the cancel out
            # at once, and the cancel then comes after the write.
            with contextlib.closing(sqlite3.connect(path, timeout=0)) as other:
                try:
                    done = other.execute(
                        "UPDATE requests SET status = 'CANCELLED',"
                        " error = 'cancelled by the client' WHERE id = ? AND status = 'QUEUED'",
                        (r.id.hex,),
                    )
                    other.commit()
                except sqlite3.OperationalError:
                    cancelled.append(0)
                else:
                    cancelled.append(done.rowcount)

        event.listen(engine.sync_engine, "before_cursor_execute", cancel_in_between)
        await worker.finish([Outcome(r.id, user, "SUCCEEDED", output=b"o")])
        row = (await _rows(engine, [r.id]))[r.id]
        if cancelled == [1]:  # the cancel landed between the read and the write: it wins
            assert (row.status, row.output, row.lane_seq) == ("CANCELLED", None, 1)
        else:  # locked out: the write came first, and a cancel now finds it finished
            assert cancelled == [0]
            assert (row.status, row.lane_seq) == ("SUCCEEDED", 1)
            assert await store.cancel_queued(user, r.id) == "SUCCEEDED"
    finally:
        await engine.dispose()


async def test_a_lane_another_replica_creates_meanwhile_is_counted_from_its_row(
    pg_schema: str,
) -> None:
    """PostgreSQL accepts a batch in one statement, which creates the lanes it sees for the
    first time. A lane another transaction creates while the statement waits for it (after
    the statement's snapshot) is neither created nor seen by it: its requests are placed
    by a second statement, from the lane's committed row, with the lane limit kept."""
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=3)
    try:
        user = await _user(engine)
        batch = [new_request(user) for _ in range(3)]
        async with engine.connect() as other:
            # The other replica's transaction: the lane, with 3 accepted and 1 finished.
            await other.execute(
                lanes.insert().values(
                    user_id=user,
                    created_at=datetime.now(UTC),
                    last_active_at=datetime.now(UTC),
                    last_seq=1,
                    accepted=3,
                )
            )
            accepting = asyncio.create_task(_accept(engine, batch, lane_limit=4))

            async def waits_for_the_lane() -> bool:
                async with engine.connect() as conn:
                    waiting = await conn.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO lanes%'"
                            " AND datname = current_database()"
                        )
                    )
                    return bool(waiting.scalar_one())

            for _ in range(500):
                if await waits_for_the_lane() or accepting.done():
                    break
                await asyncio.sleep(0.01)
            assert not accepting.done(), "the accept did not wait for the other transaction"
            await other.commit()
        kept, refused = await accepting
        # Room for 4 - (3 - 1) = 2: positions 4 and 5; the third is refused.
        assert [(i.request_id, i.lane_pos) for i in kept] == [(batch[0].id, 4), (batch[1].id, 5)]
        assert refused == [batch[2]]
        async with engine.connect() as conn:
            lane = (await conn.execute(sa.select(lanes).where(lanes.c.user_id == user))).one()
        assert (lane.accepted, lane.last_seq) == (5, 1)
        assert set(await _rows(engine, [r.id for r in batch])) == {batch[0].id, batch[1].id}
    finally:
        await engine.dispose()
