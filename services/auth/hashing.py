"""Argon2id password hashing on a small dedicated thread pool, with a bounded queue.

Each hash holds `memory_kib` of memory while it runs, so the pool size bounds auth memory,
and a login storm can only queue here: the event loop, token verification, JWKS and
Refresh never wait for a hash. Past `max_waiting` queued calls, new ones are refused
(`HashingBusy`) rather than queued without end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

T = TypeVar("T")


class HashingBusy(Exception):
    """Too many password checks are queued; the caller should come back later."""


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
        self._capacity = concurrency + max_waiting
        self._pending = 0

    @property
    def pending(self) -> int:
        """Hashes running or queued."""
        return self._pending

    async def _run(self, fn: Callable[..., T], *args: str) -> T:
        if self._pending >= self._capacity:
            raise HashingBusy
        self._pending += 1
        try:
            # A cancelled call (the client gave up) leaves the queue without being hashed.
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._pending -= 1

    async def hash(self, password: str) -> str:
        return await self._run(self._hasher.hash, password)

    def hash_now(self, password: str) -> str:
        """Synchronous hash, for start-up only (the dummy hash)."""
        return self._hasher.hash(password)

    async def verify(self, stored: str, password: str) -> bool:
        return await self._run(self._verify, stored, password)

    def _verify(self, stored: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored: str) -> bool:
        return self._hasher.check_needs_rehash(stored)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
