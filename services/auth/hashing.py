"""Argon2id password hashing on a small dedicated thread pool, with a bounded queue.

Each hash holds `memory_kib` of memory while it runs, so the pool size bounds auth memory,
and a login storm can only queue here: the event loop, token verification, JWKS and
Refresh never wait for a hash. Past `max_waiting` queued calls, new ones are refused
(`HashingBusy`) rather than queued without end.

Waiting calls form two lanes: `priority` ones (the domain gives priority to addresses that
logged in successfully before) are served before the others, and may also queue beyond
`max_waiting`, up to twice as many. So a storm of guesses from unknown addresses delays
returning users by at most the hashes already running. The lanes are hand-written because
an executor's queue has no priorities.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

T = TypeVar("T")


class HashingBusy(Exception):
    """Too many password checks are queued; the caller should come back later."""


class HashGate:
    """Admits `concurrency` holders at once; waiters form a priority and a normal lane,
    each served in arrival order, the priority lane first."""

    def __init__(self, concurrency: int, max_waiting: int) -> None:
        self._concurrency = concurrency
        self._max_waiting = max_waiting
        self._running = 0
        # [priority, others]: futures resolved when a slot is handed over.
        self._lanes: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(),
            deque(),
        )

    @property
    def pending(self) -> int:
        """Holders and waiters."""
        return self._running + len(self._lanes[0]) + len(self._lanes[1])

    async def acquire(self, priority: bool) -> None:
        """Raises HashingBusy when the caller's lane allowance of waiters is used up."""
        waiting = len(self._lanes[0]) + len(self._lanes[1])
        if self._running < self._concurrency and not waiting:
            self._running += 1
            return
        if waiting >= self._max_waiting * (2 if priority else 1):
            raise HashingBusy
        lane = self._lanes[0 if priority else 1]
        slot = asyncio.get_running_loop().create_future()
        lane.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            # The caller gave up: leave the lane, or pass on a slot granted meanwhile.
            if slot.done() and not slot.cancelled():
                self.release()
            elif slot in lane:
                lane.remove(slot)
            raise

    def release(self) -> None:
        self._running -= 1
        for lane in self._lanes:
            while lane:
                slot = lane.popleft()
                if not slot.done():
                    self._running += 1
                    slot.set_result(None)
                    return


class PasswordHashing:
    def __init__(
        self,
        *,
        memory_kib: int,
        time_cost: int,
        parallelism: int,
        concurrency: int,
        max_waiting: int,
    ) -> None:
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="argon2")
        self._gate = HashGate(concurrency, max_waiting)

    @property
    def pending(self) -> int:
        """Hashes running or queued."""
        return self._gate.pending

    async def _run(self, fn: Callable[..., T], *args: str, priority: bool) -> T:
        await self._gate.acquire(priority)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            # A hash whose caller gave up runs on, but the pool still holds hashes to
            # `concurrency` at once, so memory stays bounded.
            self._gate.release()

    async def hash(self, password: str, *, priority: bool = False) -> str:
        return await self._run(self._hasher.hash, password, priority=priority)

    def hash_now(self, password: str) -> str:
        """Synchronous hash, for start-up only (the dummy hash)."""
        return self._hasher.hash(password)

    async def verify(self, stored: str, password: str, *, priority: bool = False) -> bool:
        return await self._run(self._verify, stored, password, priority=priority)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        return self._hasher.check_needs_rehash(stored)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
