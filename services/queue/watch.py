"""WatchResults: a user's results after a lane_seq, first from the log, then live.

A watcher costs nothing while its user is quiet: it waits for the replica's fan-out (the
results of requests this replica accepted) or for a wake-up from the request log's change
notifications (results of requests accepted elsewhere), and reads the log only then. The
listener wakes every watcher whenever it (re)connects, since notifications may have been
missed meanwhile; a rare safety read (every 2.5 to 5 minutes, spread so that watchers opened
together do not read together) is the last line behind that.

What the fan-out brings waits for the watcher in a bounded inbox: a watcher whose client
does not read (it waits at `yield` under HTTP/2 flow control) keeps at most
MAX_WAITING_EVENTS results and MAX_WAITING_BYTES of their outputs waiting, besides the
batch it took before and is sending. Past that, what waits is dropped and one wake-up is
left in its place: the watcher then reads everything after its last lane_seq from the log,
which has every dropped result (results are committed before they are published). A read
of the log brings at most FAIRLANE_RESULTS_PAGE_SIZE results and RESULT_READ_BYTES (4 MiB)
of their outputs, or one output alone when it is larger (services/queue/store.py): the
watcher keeps one read while it sends it, and reads again until the log says it is done.

The stream was authenticated when it opened. With `token`, its login is watched while the
stream is open: once the login is revoked, the stream ends with InvalidToken (the servicer
answers UNAUTHENTICATED), before the next result it would have sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane_server.core.tokens import InvalidToken, Principal, TokenCheck
from fairlane_server.queue.convert import result_from_row
from fairlane_server.queue.domain import QueueDomain

# Profiled with 1,000 idle watchers: at one read per 30 s these reads were the largest part
# of the queue's CPU (scripts/idle_watchers.py).
SAFETY_READ_SECONDS = 300.0
# What a watcher keeps of the fan-out while it has not taken it: past either bound it is
# dropped for one log read. A results page's worth of events costs no more to read again.
MAX_WAITING_EVENTS = 1000
MAX_WAITING_BYTES = 4 * 1024 * 1024


class _Inbox:
    """A watcher's events from the hub (the sink is `put`), bounded in count and bytes: past
    the bound, what waits gives way to one wake-up, on which the watcher reads the log.
    Progress is not kept: watchers send results only."""

    __slots__ = ("_bytes", "_events", "_waiter", "_woken")

    def __init__(self) -> None:
        self._events: list[lane_pb2.LaneEvent] = []
        self._bytes = 0  # of the outputs of the results in _events
        self._woken = False  # _events is one wake-up
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: lane_pb2.LaneEvent) -> None:
        if self._woken:
            return  # the log read the wake-up brings covers this one too
        kind = event.WhichOneof("kind")
        if kind == "result":
            size = len(event.result.output)
            if len(self._events) < MAX_WAITING_EVENTS and self._bytes + size <= MAX_WAITING_BYTES:
                self._events.append(event)
                self._bytes += size
                self._wake_taker()
                return
        elif kind is not None:
            return
        # A wake-up, or one result too many: a read of the log replaces all that waits.
        self._events = [lane_pb2.LaneEvent(user_id=event.user_id)]
        self._bytes = 0
        self._woken = True
        self._wake_taker()

    def held(self) -> tuple[int, int]:
        """The events waiting and the bytes of their outputs."""
        return len(self._events), self._bytes

    def _wake_taker(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, timeout: float) -> list[lane_pb2.LaneEvent]:
        """All that waits, once something does or `timeout` seconds have passed ([])."""
        if not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._waiter
            finally:
                self._waiter = None
        events = self._events
        self._events, self._bytes, self._woken = [], 0, False
        return events


async def watch_results(
    domain: QueueDomain,
    user_id: str,
    after: int,
    *,
    token: TokenCheck | None = None,
    principal: Principal | None = None,
) -> AsyncGenerator[common_pb2.Result, None]:
    user = uuid.UUID(user_id)
    # Subscribe before reading the log: a result committed after the read is then certain
    # to arrive live (or to wake the watcher), and one seen twice is dropped by lane_seq.
    inbox = _Inbox()
    sink = inbox.put
    domain.hub.listen(user_id, sink)
    refused: list[str] = []

    def on_refused(reason: str) -> None:
        refused.append(reason)
        inbox.put(lane_pb2.LaneEvent(user_id=user_id))  # wakes the wait below

    unwatch: Callable[[], None] | None = None
    if token is not None and principal is not None:
        unwatch = token.watch(principal, on_refused)

    def check() -> None:
        if refused:
            raise InvalidToken(refused[0])

    last = after
    try:
        async for result in _stored(domain, user, last, None):
            check()
            yield result
            last = result.lane_seq
        while True:
            batch = await inbox.take(random.uniform(0.5, 1.0) * SAFETY_READ_SECONDS)
            check()
            if not batch or any(e.WhichOneof("kind") is None for e in batch):
                # A wake-up, or the safety read: the log has everything these events carry
                # (results are committed before they are published), so one read covers it.
                async for result in _stored(domain, user, last, None):
                    check()
                    yield result
                    last = result.lane_seq
                continue
            for event in batch:
                if event.WhichOneof("kind") != "result":
                    continue
                seq = event.result.lane_seq
                if seq <= last:
                    continue
                if seq > last + 1:
                    async for result in _stored(domain, user, last, seq):
                        check()
                        yield result
                        last = result.lane_seq
                check()
                yield event.result
                last = seq
    finally:
        if unwatch is not None:
            unwatch()
        domain.hub.unlisten(user_id, sink)


async def _stored(
    domain: QueueDomain, user: uuid.UUID, after: int, upto: int | None
) -> AsyncIterator[common_pb2.Result]:
    """Stored results with after < lane_seq (< upto), in order, page by page. A page is
    bounded in count and in bytes: one short of its count is the end only when the log
    says so (a page cut by its bytes is not)."""
    while True:
        page = await domain.results_after(user, after, upto)
        for row in page.rows:
            yield result_from_row(row)
            after = row.lane_seq
        if not page.more:
            return
