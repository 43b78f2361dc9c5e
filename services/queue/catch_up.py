"""Reading overdue results from the log for all of a replica's Sessions at once.

A Session whose results the fan-out has not brought within the grace time reads them from
the log. Each reading on its own, 10,000 Sessions of one request each held every pooled
connection with those reads (the intake and the relay, which bring the results, waited
behind them), and a bound on concurrent reads then left a few hundred reads a second to
answer them all. Here the asks that wait while a read runs are answered together by the
next read: one statement for up to `max_ids` requests, whichever Sessions asked.

A read loads at most the log's bound of bytes of outputs (RESULT_READ_BYTES, 4 MiB, or
its first output alone when larger), the asks taking turns: the first request of each,
then the second of each... Past the bound a finished request comes `withheld`, without its
output; its Session holds it so and reads the output when its turn to be written comes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fairlane_server.core import dberrors
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait, fail_quietly
from fairlane_server.queue.store import RequestStore

log = get_logger(__name__)

# Reads that run at once, each on a pooled connection of its own: few, so that the intake
# and the relay always find one.
READERS = 2
# Requests one read asks for. An ask is never split, so a read may take more when a single
# ask is larger (a Session asks for at most a results page).
MAX_IDS = 2000


class CatchUpStopped(Exception):
    """The replica is shutting down: the ask was not answered."""


@dataclass(slots=True)
class _Ask:
    user: uuid.UUID
    ids: list[uuid.UUID]
    future: asyncio.Future[list[Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class CatchUpReader:
    """Answers Sessions' asks for the finished among their requests, batching the asks."""

    def __init__(
        self, store: RequestStore, *, readers: int = READERS, max_ids: int = MAX_IDS
    ) -> None:
        self._store = store
        self._readers = readers
        self._max_ids = max_ids
        self._asks: deque[_Ask] = deque()
        self._waiting = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"catch-up-{n}") for n in range(self._readers)
        ]

    async def stop(self) -> None:
        self._stopped = True
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks = []
        stopped = CatchUpStopped("the server is shutting down")
        while self._asks:
            fail_quietly(self._asks.popleft().future, stopped)

    async def finished(self, user: uuid.UUID, ids: list[uuid.UUID]) -> list[Any]:
        """Those of the user's requests `ids` that have finished, in lane order, some of
        them perhaps withheld (RequestStore.finished_of). A caller that goes away leaves
        the read to the others who asked."""
        if not ids:
            return []
        if self._stopped:
            raise CatchUpStopped("the server is shutting down")
        ask = _Ask(user, list(ids))
        self._asks.append(ask)
        self._waiting.set()
        return await ask.future

    async def _run(self) -> None:
        while True:
            await self._waiting.wait()
            batch = self._take()
            if not self._asks:
                self._waiting.clear()
            if not batch:
                continue
            try:
                await self._answer(batch)
            except asyncio.CancelledError:
                for ask in batch:
                    fail_quietly(ask.future, CatchUpStopped("the server is shutting down"))
                raise
            except Exception as exc:
                # A bug, not the database's answer: these asks fail, the reader goes on.
                log.exception("catch_up_read_failed", size=len(batch))
                for ask in batch:
                    fail_quietly(ask.future, exc)

    def _take(self) -> list[_Ask]:
        batch: list[_Ask] = []
        n = 0
        while self._asks and (not batch or n + len(self._asks[0].ids) <= self._max_ids):
            ask = self._asks.popleft()
            if ask.future.done():  # its Session went away
                continue
            batch.append(ask)
            n += len(ask.ids)
        return batch

    async def _answer(self, batch: list[_Ask]) -> None:
        try:
            rows = await self._store.finished_of([(a.user, a.ids) for a in batch])
        except Exception as exc:
            if dberrors.is_transient(exc) or len(batch) == 1:
                for ask in batch:
                    fail_quietly(ask.future, exc)
                return
            # Not the database being away: one ask may be what it refuses. Each is read
            # on its own, so that it fails alone.
            log.warning("catch_up_batch_split", size=len(batch), error=str(exc)[:200])
            for ask in batch:
                await self._answer([ask])
            return
        by_id = {row.id: row for row in rows}
        for ask in batch:
            if ask.future.done():
                continue
            # The log is asked by id alone; a request of another user is never handed out.
            mine = [r for i in ask.ids if (r := by_id.get(i)) is not None and r.user_id == ask.user]
            mine.sort(key=lambda r: r.lane_seq)
            ask.future.set_result(mine)
