"""The intake's waiting room: one FIFO per user, served by deficit round robin, taken off
in batches bounded in count and in bytes.

One FIFO for everybody let one user's large payloads stall everyone else: 4 Sessions of
100 kB requests queued 400 MB ahead of another user's small enqueue, which then waited
6 s for its commit. Here each user waits in a FIFO of their own, and a batch is formed by
visiting the users with work in turn (deficit round robin: a visit may spend its credit,
`quantum` bytes more per visit, on the user's oldest items). A user who arrives joins the
end of the round and is visited before anyone's second visit, so another user's backlog
delays them by one visit each, at most about one batch, whatever its size. Each user's
items leave in the order they came (only the oldest is ever taken); different users'
items interleave.

Costs are bytes: the intake counts a request's payload plus a fixed allowance for the rest
of its row, so that requests without a payload are not free. A batch holds at most
`max_size` items and `max_cost` bytes; a single item over `max_cost` goes alone.

Batching as in `fairlane_server.core.batching.Batcher`: whatever is waiting is taken at
once, and only after a busy batch (`busy_size` items or more) does the next one linger up
to `linger` seconds, until a batch's worth waits. The batch is formed when the linger ends,
so items stay here until then: a stage cancelled while lingering leaves them all, for its
owner to answer.

O(1) per item: a put is a dict lookup and an append, a take pops from the front of the
round (an item costing more than one quantum has its user passed over cost/quantum times
at most: 16 for 1 MiB at the intake's 64 KiB); a user's FIFO is recycled when it empties,
so a busy replica allocates none per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

T = TypeVar("T")

# Recycled FIFOs kept for users who come back: enough for the users of a busy replica's
# batch, and a bound on what idle ones hold.
_SPARE_LANES = 1024


class _Lane(Generic[T]):
    """One user's waiting items, oldest first, and the bytes its visits may still spend."""

    __slots__ = ("credit", "items", "key")

    def __init__(self) -> None:
        self.items: deque[tuple[int, T]] = deque()
        self.credit = 0
        self.key: Hashable = None


class FairQueue(Generic[T]):
    def __init__(
        self,
        *,
        max_size: int,
        max_cost: int,
        quantum: int,
        linger: float,
        busy_size: int = 16,
    ) -> None:
        if max_size < 1 or max_cost < 1 or quantum < 1:
            raise ValueError("max_size, max_cost and quantum must be positive")
        self._max_size = max_size
        self._max_cost = max_cost
        self._quantum = quantum
        self._linger = linger
        self._busy_size = busy_size
        self._busy = False
        self._lanes: dict[Hashable, _Lane[T]] = {}
        # The users with waiting items, in visiting order: the first is being visited.
        self._round: deque[_Lane[T]] = deque()
        self._spare: list[_Lane[T]] = []
        self._count = 0
        self._cost = 0
        # The stage waiting in next(), woken once `_want` items or a batch's bytes wait.
        self._waiter: asyncio.Future[None] | None = None
        self._want = 1

    def __len__(self) -> int:
        return self._count

    @property
    def keys(self) -> int:
        """How many keys (users) have items waiting."""
        return len(self._lanes)

    def waiting(self, key: Hashable) -> int:
        """How many of `key`'s items wait."""
        lane = self._lanes.get(key)
        return len(lane.items) if lane is not None else 0

    def put(self, item: T, key: Hashable, cost: int) -> None:
        """Adds `item` at the end of `key`'s FIFO; `cost` is its size in bytes (positive)."""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._spare.pop() if self._spare else _Lane()
            lane.key = key
            # A newcomer's first visit: it joins the end of the round with one quantum.
            lane.credit = self._quantum
            self._lanes[key] = lane
            self._round.append(lane)
        lane.items.append((cost, item))
        self._count += 1
        self._cost += cost
        waiter = self._waiter
        if (
            waiter is not None
            and (self._count >= self._want or self._cost >= self._max_cost)
            and not waiter.done()
        ):
            waiter.set_result(None)

    async def next(self) -> list[T]:
        """The next batch: at least one item, waiting for it if need be."""
        if not self._count:
            await self._wait(1, None)
        if (
            self._busy
            and self._linger > 0
            and self._count < self._max_size
            and self._cost < self._max_cost
        ):
            await self._wait(self._max_size, self._linger)
        batch = self._take()
        self._busy = len(batch) >= self._busy_size
        return batch

    def drain(self) -> list[T]:
        """Everything still waiting (each user's items in order), leaving it empty."""
        out: list[T] = []
        for lane in self._round:
            out.extend(item for _, item in lane.items)
            lane.items.clear()
        self._round.clear()
        self._lanes.clear()
        self._count = 0
        self._cost = 0
        return out

    async def _wait(self, want: int, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        self._want = want
        timer = loop.call_later(timeout, _wake, waiter) if timeout is not None else None
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def _take(self) -> list[T]:
        batch: list[T] = []
        append = batch.append
        room = self._max_cost
        left = self._max_size
        rnd = self._round
        quantum = self._quantum
        while left and rnd:
            lane = rnd[0]
            items = lane.items
            credit = lane.credit
            # The visit: the lane's oldest items while its credit and the batch allow.
            while True:
                cost, item = items[0]
                if cost > credit:
                    # This visit is spent: the next one brings another quantum.
                    lane.credit = credit + quantum
                    rnd.rotate(-1)
                    break
                if cost > room and batch:
                    # Full. The lane stays first, with its credit, for the next batch.
                    lane.credit = credit
                    left = 0
                    break
                credit -= cost
                items.popleft()
                append(item)
                room -= cost
                left -= 1
                if not items:
                    rnd.popleft()
                    del self._lanes[lane.key]
                    if len(self._spare) < _SPARE_LANES:
                        self._spare.append(lane)
                    break
                if not left:
                    lane.credit = credit
                    break
        self._count -= len(batch)
        self._cost -= self._max_cost - room
        return batch


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
