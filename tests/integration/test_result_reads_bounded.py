"""The streams' reads of results from the real request log (PostgreSQL and SQLite) are
bounded in bytes, not only in count: a WatchResults from 0 and a Session catching up from
the log over results whose outputs add up to far more than one read's bound get every
result, in order, with its output, and no read of the log returns more than the bound of
outputs (or one output alone, when it is larger)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Sequence
from typing import Any
from unittest.mock import MagicMock

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2
from fairlane_server.core.tokens import Principal
from fairlane_server.queue.catch_up import CatchUpReader
from fairlane_server.queue.domain import QueueDomain, StreamLimits
from fairlane_server.queue.hub import Hub
from fairlane_server.queue.intake import Admitted
from fairlane_server.queue.session import SessionStream
from fairlane_server.queue.store import RESULT_READ_BYTES, RequestStore
from fairlane_server.queue.watch import watch_results
from tests.integration.test_store_contract import _finished, _user, big_output
from tests.unit.test_session_stream import Client, Domain

pytestmark = pytest.mark.integration

SIZE = 512 * 1024
N = 24  # 12 MiB of outputs per user: three times one read's bound


def _rows(answer: Any) -> Sequence[Any]:
    """The rows of a read, a page of them or a list."""
    rows: Sequence[Any] = answer.rows if hasattr(answer, "rows") else answer
    return rows


class CountingStore(RequestStore):
    """The real store, recording the bytes of outputs each read of results returned."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.reads: list[int] = []

    def _count(self, rows: Sequence[Any]) -> None:
        self.reads.append(sum(len(r.output or b"") for r in rows))

    async def results_after(self, *args: Any, **kwargs: Any) -> Any:
        answer = await super().results_after(*args, **kwargs)
        self._count(_rows(answer))
        return answer

    async def finished_of(self, asks: Sequence[tuple[uuid.UUID, Sequence[uuid.UUID]]]) -> Any:
        rows = await super().finished_of(asks)
        self._count(rows)
        return rows


def _domain(store: RequestStore, reader: CatchUpReader, **streams: Any) -> QueueDomain:
    """A QueueDomain over the real store; only its reads of results are used."""
    other = MagicMock()
    limits = StreamLimits(
        session_window=64,
        max_batch_items=16,
        max_streams_per_user=4,
        results_page=1000,
        result_grace_seconds=0.2,
    )
    return QueueDomain(
        store=store,
        intake=other,
        hub=Hub(),
        catalog=other,
        catch_up=reader,
        broker=other,
        admission=other,
        limits=other,
        streams=dataclasses.replace(limits, **streams),
        reply_route="route",
    )


async def test_a_watcher_from_zero_gets_every_result_in_bounded_reads(engine: AsyncEngine) -> None:
    store = CountingStore(engine)
    reader = CatchUpReader(store)
    domain = _domain(store, reader)
    user = await _user(engine)
    batch = await _finished(engine, user, [SIZE] * N)

    results: list[common_pb2.Result] = []
    watcher = watch_results(domain, str(user), 0)
    try:
        # A page cut by its bytes is not the end: the watcher reads on, at once (the next
        # read it would otherwise wait for is minutes away).
        async with asyncio.timeout(30):
            while len(results) < N:
                results.append(await anext(watcher))
    finally:
        await watcher.aclose()

    assert [(r.request_id, r.lane_seq) for r in results] == [
        (str(q.id), n) for n, q in enumerate(batch, 1)
    ]
    assert all(r.output == big_output(r.lane_seq, SIZE) for r in results)
    assert max(store.reads) <= RESULT_READ_BYTES
    assert len(store.reads) >= N * SIZE // RESULT_READ_BYTES


class LogSessionDomain(Domain):
    """Admits the requests `ids` (already finished in the log) in turn; their results never
    come through the fan-out, so the Session reads them from the log, through the replica's
    real catch-up reader and store."""

    def __init__(self, real: QueueDomain, ids: Sequence[uuid.UUID], budget: int) -> None:
        super().__init__(window=64, grace=0.2)
        self.streams = dataclasses.replace(
            real.streams, session_window=64, session_buffer_bytes=budget
        )
        self._real = real
        self._ids = iter(ids)

    async def admit(
        self, msg: queue_pb2.EnqueueRequest, principal: Principal
    ) -> tuple[uuid.UUID, asyncio.Future[Admitted]]:
        rid = next(self._ids)
        future: asyncio.Future[Admitted] = asyncio.get_running_loop().create_future()
        future.set_result(Admitted(rid, duplicate=False))
        return rid, future

    async def finished(self, user: uuid.UUID, ids: list[uuid.UUID]) -> Any:
        return await self._real.finished(user, ids)


async def _session_results(
    domain: LogSessionDomain, user: uuid.UUID, n: int
) -> tuple[list[common_pb2.Result], SessionStream]:
    client = Client()
    principal = Principal(user_id=str(user), username="u", role="user")
    stream = SessionStream(domain, principal, client.requests())  # type: ignore[arg-type]
    for i in range(n):
        client.enqueue(str(i))
    client.close()
    results: list[common_pb2.Result] = []
    async with asyncio.timeout(60):
        async for response in stream.run():
            flat = (
                response.batch.responses if response.WhichOneof("kind") == "batch" else [response]
            )
            results.extend(r.result for r in flat if r.WhichOneof("kind") == "result")
    return results, stream


@pytest.mark.parametrize("budget", [8 * 1024 * 1024, 1024 * 1024])
async def test_sessions_catching_up_from_the_log_get_every_result_in_bounded_reads(
    engine: AsyncEngine, budget: int
) -> None:
    store = CountingStore(engine)
    reader = CatchUpReader(store)
    reader.start()
    real = _domain(store, reader)
    try:
        # Two users' Sessions at once: their asks share the catch-up reader's reads.
        users = [await _user(engine), await _user(engine)]
        batches = [await _finished(engine, user, [SIZE] * N) for user in users]
        domains = [
            LogSessionDomain(real, [q.id for q in batch], budget)
            for user, batch in zip(users, batches, strict=True)
        ]
        answers = await asyncio.gather(
            *(_session_results(d, user, N) for d, user in zip(domains, users, strict=True))
        )
    finally:
        await reader.stop()

    for (results, stream), batch in zip(answers, batches, strict=True):
        assert [(r.request_id, r.lane_seq) for r in results] == [
            (str(q.id), n) for n, q in enumerate(batch, 1)
        ]
        assert all(r.output == big_output(r.lane_seq, SIZE) for r in results)
        assert stream.buffered_bytes == 0
    assert max(store.reads) <= RESULT_READ_BYTES
    assert len(store.reads) >= 2 * N * SIZE // RESULT_READ_BYTES
