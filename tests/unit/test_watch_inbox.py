"""WatchResults over a scripted log and the replica's fan-out: a watcher whose client does
not read keeps a bounded part of the fan-out (events and bytes), and gets every result, in
order and with its output, once it reads; a watcher that reads takes results live."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from typing import Any

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane_server.queue.domain import StreamLimits
from fairlane_server.queue.hub import Hub
from fairlane_server.queue.store import ResultPage
from fairlane_server.queue.watch import MAX_WAITING_BYTES, MAX_WAITING_EVENTS, watch_results
from tests.polling import until

USER = str(uuid.uuid4())
SIZE = 100_000


class Domain:
    def __init__(self) -> None:
        self.hub = Hub()
        self.streams = StreamLimits(
            session_window=8,
            max_batch_items=4,
            max_streams_per_user=2,
            results_page=100,
            result_grace_seconds=5.0,
        )
        self.log: list[Any] = []
        self.reads = 0

    async def results_after(
        self, user: uuid.UUID, after: int, upto: int | None = None
    ) -> ResultPage:
        self.reads += 1
        rows = [r for r in self.log if r.lane_seq > after and (upto is None or r.lane_seq < upto)]
        page = self.streams.results_page
        return ResultPage(rows[:page], more=len(rows) > page)

    async def finish(self, *seqs: int) -> None:
        """Results written to the log, then fanned out in one message."""
        events = []
        for seq in seqs:
            row = SimpleNamespace(
                id=uuid.uuid4(),
                lane_seq=seq,
                status="SUCCEEDED",
                output=output(seq),
                error="",
                attempts=1,
                client_ref=f"ref-{seq}",
                handler="echo",
            )
            self.log.append(row)
            events.append(
                lane_pb2.LaneEvent(
                    user_id=USER,
                    result=common_pb2.Result(
                        request_id=str(row.id),
                        lane_seq=seq,
                        status=common_pb2.REQUEST_STATUS_SUCCEEDED,
                        output=row.output,
                        attempts=1,
                        client_ref=row.client_ref,
                        handler="echo",
                    ),
                )
            )
        await self.hub.on_message(lane_pb2.LaneEventBatch(events=events).SerializeToString())

    def inbox(self) -> Any:
        """The watcher's sink's owner, as the hub holds it."""
        (sink,) = self.hub._subscribers[USER]
        return sink.__self__  # type: ignore[attr-defined]


def output(seq: int) -> bytes:
    return seq.to_bytes(4, "big") * (SIZE // 4)


def check(results: list[common_pb2.Result], first: int, last: int) -> None:
    assert [r.lane_seq for r in results] == list(range(first, last + 1))
    assert all(r.output == output(r.lane_seq) for r in results)
    assert all(r.client_ref == f"ref-{r.lane_seq}" for r in results)


async def test_a_watcher_that_does_not_read_holds_a_bounded_part_then_gets_everything() -> None:
    domain = Domain()
    watch = watch_results(domain, USER, 0)  # type: ignore[arg-type]
    first = asyncio.ensure_future(anext(watch))
    await until(lambda: domain.hub.has_subscribers(USER))
    await domain.finish(1)
    results = [await asyncio.wait_for(first, 5)]
    # The watcher now waits for its client, which reads nothing while 30 MB of results
    # are fanned out, one by one and in batches.
    n = 300
    for seq in range(2, 100):
        await domain.finish(seq)
        events, size = domain.inbox().held()
        assert events <= MAX_WAITING_EVENTS
        assert size <= MAX_WAITING_BYTES
    await domain.finish(*range(100, n + 1))
    events, size = domain.inbox().held()
    assert events <= MAX_WAITING_EVENTS
    assert size <= MAX_WAITING_BYTES
    # Progress is not kept at all: watchers send results only.
    for _ in range(5000):
        await domain.hub.on_message(
            lane_pb2.LaneEventBatch(
                events=[
                    lane_pb2.LaneEvent(
                        user_id=USER, progress=common_pb2.Progress(request_id="x", done=1)
                    )
                ]
            ).SerializeToString()
        )
    assert domain.inbox().held()[0] <= 1

    results += [await asyncio.wait_for(anext(watch), 5) for _ in range(n - 1)]
    check(results, 1, n)
    # Live again: the next result comes from the fan-out, without a read of the log.
    reads = domain.reads
    nxt = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0)
    await domain.finish(n + 1)
    check([await asyncio.wait_for(nxt, 5)], n + 1, n + 1)
    assert domain.reads == reads
    await watch.aclose()
    assert not domain.hub.has_subscribers(USER)


async def test_a_watcher_that_reads_takes_results_live_without_reading_the_log() -> None:
    domain = Domain()
    watch = watch_results(domain, USER, 0)  # type: ignore[arg-type]
    results = []
    for seq in range(1, 51):
        nxt = asyncio.ensure_future(anext(watch))
        await until(lambda: domain.hub.has_subscribers(USER))
        await asyncio.sleep(0)
        await domain.finish(seq)
        results.append(await asyncio.wait_for(nxt, 5))
    check(results, 1, 50)
    assert domain.reads == 1  # the first, of what was stored before the watch
    await watch.aclose()


async def test_a_wake_up_replaces_what_waits_and_the_log_has_it_all() -> None:
    """A wake-up (news in the log of results accepted elsewhere) makes the results waiting
    redundant: one read of the log brings them all."""
    domain = Domain()
    watch = watch_results(domain, USER, 0)  # type: ignore[arg-type]
    first = asyncio.ensure_future(anext(watch))
    await until(lambda: domain.hub.has_subscribers(USER))
    await domain.finish(1)
    results = [await asyncio.wait_for(first, 5)]
    await domain.finish(2, 3)
    assert domain.inbox().held() == (2, 2 * SIZE)
    domain.hub.wake([USER])
    assert domain.inbox().held() == (1, 0)
    await domain.finish(4)  # covered by the read the wake-up brings
    assert domain.inbox().held() == (1, 0)
    results += [await asyncio.wait_for(anext(watch), 5) for _ in range(3)]
    check(results, 1, 4)
    await watch.aclose()
