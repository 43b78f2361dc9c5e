"""A replica's Sessions reading overdue results from the log: the asks that wait while a
read runs are answered together by the next one, a few reads at most run at once, and
every ask succeeds or fails on its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import pytest
from sqlalchemy.exc import DataError, OperationalError

from fairlane_server.queue.catch_up import READERS, CatchUpReader, CatchUpStopped
from fairlane_server.queue.domain import QueueDomain


def _row(user: uuid.UUID, rid: uuid.UUID, seq: int) -> SimpleNamespace:
    return SimpleNamespace(id=rid, user_id=user, lane_seq=seq)


class _Store:
    """finished_of() over a dict of finished rows; it waits for `release` when `hold` is
    set, counts its reads, and fails as told."""

    def __init__(self, rows: Sequence[SimpleNamespace] = ()) -> None:
        self.rows = {r.id: r for r in rows}
        self.reads: list[list[tuple[uuid.UUID, list[uuid.UUID]]]] = []
        self.in_flight = 0
        self.most = 0
        self.hold = False
        self.release = asyncio.Event()
        self.fail: BaseException | None = None
        self.refuse: uuid.UUID | None = None  # an id whose every read fails

    async def finished_of(self, asks: Sequence[tuple[uuid.UUID, Sequence[uuid.UUID]]]) -> list[Any]:
        self.reads.append([(u, list(ids)) for u, ids in asks])
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            if self.hold:
                await self.release.wait()
        finally:
            self.in_flight -= 1
        if self.fail is not None:
            raise self.fail
        if self.refuse is not None and any(self.refuse in ids for _, ids in asks):
            raise DataError("SELECT", {}, Exception("refused"))
        return [self.rows[i] for _, ids in asks for i in ids if i in self.rows]


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def _occupy(reader: CatchUpReader) -> list[asyncio.Task[list[Any]]]:
    """Every reader busy with an ask of its own (the store holding them)."""
    tasks = []
    for _ in range(READERS):
        tasks.append(asyncio.create_task(reader.finished(uuid.uuid4(), [uuid.uuid4()])))
        await _settle()
    return tasks


@pytest.fixture
async def held() -> Any:
    """A started reader whose store holds every read until released."""
    store = _Store()
    store.hold = True
    reader = CatchUpReader(store, max_ids=100)  # type: ignore[arg-type]
    reader.start()
    yield store, reader
    await reader.stop()


async def test_asks_waiting_behind_a_read_are_answered_by_one_read(held: Any) -> None:
    store, reader = held
    first = await _occupy(reader)
    assert store.in_flight == READERS  # one ask each: the readers took the first two
    later = [asyncio.create_task(reader.finished(uuid.uuid4(), [uuid.uuid4()])) for _ in range(60)]
    await _settle()
    store.release.set()
    assert await asyncio.gather(*first, *later) == [[]] * 62
    assert store.most == READERS
    # The 60 that waited went in one read (60 ids, under max_ids).
    assert sorted(len(r) for r in store.reads) == [1, 1, 60]


async def test_a_read_takes_at_most_max_ids_but_never_splits_an_ask(held: Any) -> None:
    store, reader = held
    blockers = await _occupy(reader)
    sizes = [30, 50, 40, 150, 10]
    asks = [
        asyncio.create_task(reader.finished(uuid.uuid4(), [uuid.uuid4() for _ in range(n)]))
        for n in sizes
    ]
    await _settle()
    store.release.set()
    await asyncio.gather(*blockers, *asks)
    ids_per_read = [sum(len(ids) for _, ids in read) for read in store.reads[2:]]
    # In order: 30+50 (40 more would pass 100), 40, 150 alone (an ask is whole), 10.
    assert ids_per_read == [80, 40, 150, 10]


async def test_each_ask_gets_its_own_finished_requests_in_lane_order() -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    a1, a2, a3, b1 = (uuid.uuid4() for _ in range(4))
    store = _Store([_row(alice, a1, 7), _row(alice, a2, 5), _row(bob, b1, 1)])
    reader = CatchUpReader(store)  # type: ignore[arg-type]
    store.hold = True
    reader.start()
    try:
        blockers = await _occupy(reader)
        mine = asyncio.create_task(reader.finished(alice, [a1, a2, a3]))
        # Bob asks for Alice's request too: it is found, but not handed to him.
        his = asyncio.create_task(reader.finished(bob, [b1, a1]))
        await _settle()
        store.release.set()
        await asyncio.gather(*blockers)
        assert [r.id for r in await mine] == [a2, a1]  # lane order, a3 unfinished
        assert [r.id for r in await his] == [b1]
        assert len(store.reads) == 3  # Alice's and Bob's asks were one read
    finally:
        await reader.stop()


async def test_a_caller_that_goes_away_leaves_the_others_answered(held: Any) -> None:
    store, reader = held
    user = uuid.uuid4()
    rid = uuid.uuid4()
    store.rows[rid] = _row(user, rid, 1)
    blockers = await _occupy(reader)
    gone = asyncio.create_task(reader.finished(uuid.uuid4(), [uuid.uuid4()]))
    stays = asyncio.create_task(reader.finished(user, [rid]))
    await _settle()
    gone.cancel()  # its Session closed while it waited
    await _settle()
    store.release.set()
    await asyncio.gather(*blockers)
    assert [r.id for r in await stays] == [rid]
    assert gone.cancelled()
    # The abandoned ask was not read.
    assert all(len(read) == 1 for read in store.reads)


async def test_an_ask_the_database_refuses_fails_alone() -> None:
    store = _Store()
    user = uuid.uuid4()
    good, bad = uuid.uuid4(), uuid.uuid4()
    store.rows[good] = _row(user, good, 3)
    store.refuse = bad
    store.hold = True
    reader = CatchUpReader(store)  # type: ignore[arg-type]
    reader.start()
    try:
        blockers = await _occupy(reader)
        ok = asyncio.create_task(reader.finished(user, [good]))
        refused = asyncio.create_task(reader.finished(uuid.uuid4(), [bad]))
        await _settle()
        store.release.set()
        await asyncio.gather(*blockers)
        assert [r.id for r in await ok] == [good]
        with pytest.raises(DataError):
            await refused
        # The batch of two failed, then each was read on its own.
        assert [len(read) for read in store.reads[2:]] == [2, 1, 1]
    finally:
        await reader.stop()


async def test_the_database_away_fails_the_read_and_the_next_asks_are_read_again() -> None:
    store = _Store()
    store.fail = OperationalError("SELECT", {}, ConnectionRefusedError("down"))
    reader = CatchUpReader(store)  # type: ignore[arg-type]
    reader.start()
    try:
        with pytest.raises(OperationalError):
            await reader.finished(uuid.uuid4(), [uuid.uuid4()])
        assert len(store.reads) == 1  # transient: not split, not retried here
        store.fail = None
        assert await reader.finished(uuid.uuid4(), [uuid.uuid4()]) == []
    finally:
        await reader.stop()


async def test_stopping_fails_the_asks_left_and_refuses_new_ones(held: Any) -> None:
    store, reader = held
    blockers = await _occupy(reader)
    waiting = asyncio.create_task(reader.finished(uuid.uuid4(), [uuid.uuid4()]))
    await _settle()
    assert len(store.reads) == READERS  # it waits for a reader
    await reader.stop()
    with pytest.raises(CatchUpStopped):
        await waiting
    with pytest.raises(CatchUpStopped):
        await reader.finished(uuid.uuid4(), [uuid.uuid4()])
    for task in blockers:  # their reads were cancelled with the readers
        with pytest.raises(CatchUpStopped):
            await task


async def test_no_ids_asks_nothing() -> None:
    store = _Store()
    reader = CatchUpReader(store)  # type: ignore[arg-type]
    assert await reader.finished(uuid.uuid4(), []) == []
    assert store.reads == []


def domain_on(store: Any, catch_up: CatchUpReader | None = None) -> QueueDomain:
    """A QueueDomain whose store (and overdue-result reader) are given; nothing else of it
    is used here."""
    other = MagicMock()
    return QueueDomain(
        store=store,
        intake=other,
        hub=other,
        catalog=other,
        catch_up=catch_up or CatchUpReader(store),
        broker=other,
        admission=other,
        limits=other,
        streams=other,
        reply_route="route",
    )
