"""WatchResults: a user's results after a lane_seq, first from the log, then live.

A watcher costs nothing while its user is quiet: it waits for the replica's fan-out (the
results of requests this replica accepted) or for a wake-up from the request log's change
notifications (results of requests accepted elsewhere), and reads the log only then. The
listener wakes every watcher whenever it (re)connects, since notifications may have been
missed meanwhile; a rare safety read (every 2.5 to 5 minutes, spread so that watchers opened
together do not read together) is the last line behind that.

The stream was authenticated when it opened. With `token`, its login is watched while the
stream is open: once the login is revoked, the stream ends with InvalidToken (the servicer
answers UNAUTHENTICATED), before the next result it would have sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane_server.core.tokens import InvalidToken, Principal, TokenCheck
from fairlane_server.queue.convert import result_from_row
from fairlane_server.queue.domain import QueueDomain

# Profiled with 1,000 idle watchers: at one read per 30 s these reads were the largest part
# of the queue's CPU (scripts/idle_watchers.py).
SAFETY_READ_SECONDS = 300.0


async def watch_results(
    domain: QueueDomain,
    user_id: str,
    after: int,
    *,
    token: TokenCheck | None = None,
    principal: Principal | None = None,
) -> AsyncIterator[common_pb2.Result]:
    user = uuid.UUID(user_id)
    # Subscribe before reading the log: a result committed after the read is then certain
    # to arrive live (or to wake the watcher), and one seen twice is dropped by lane_seq.
    events = domain.hub.subscribe(user_id)
    refused: list[str] = []

    def on_refused(reason: str) -> None:
        refused.append(reason)
        events.put_nowait(lane_pb2.LaneEvent(user_id=user_id))  # wakes the wait below

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
            batch: list[lane_pb2.LaneEvent] = []
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(random.uniform(0.5, 1.0) * SAFETY_READ_SECONDS):
                    batch.append(await events.get())
            while not events.empty():
                batch.append(events.get_nowait())
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
        domain.hub.unsubscribe(user_id, events)


async def _stored(
    domain: QueueDomain, user: uuid.UUID, after: int, upto: int | None
) -> AsyncIterator[common_pb2.Result]:
    """Stored results with after < lane_seq (< upto), in order, page by page."""
    page = domain.streams.results_page
    while True:
        rows = await domain.results_after(user, after, upto)
        for row in rows:
            yield result_from_row(row)
            after = row.lane_seq
        if len(rows) < page:
            return
