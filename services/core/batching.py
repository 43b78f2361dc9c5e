"""Collecting work into batches: whatever is ready, and while the stage is busy, whatever
arrives within a short linger."""

from __future__ import annotations

import asyncio
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """Takes batches off a queue for a stage that writes them one at a time.

    Under load the queue already holds a batch when the stage comes back for more (what
    arrived while it wrote the last one), so it needs no waiting. Lingering only pays when
    arrivals are steady: then a few milliseconds more fill the next batch and save a round
    trip. So the batcher lingers only after a batch of at least `busy_size` items; a lone
    request on an idle stage goes at once, and a light load costs no added latency.
    """

    def __init__(
        self, queue: asyncio.Queue[T], *, max_size: int, linger: float, busy_size: int = 16
    ) -> None:
        self._queue = queue
        self._max_size = max_size
        self._linger = linger
        self._busy_size = busy_size
        self._busy = False

    async def next(self) -> list[T]:
        batch = [await self._queue.get()]
        self._take_ready(batch)
        if self._busy and self._linger > 0:
            deadline = time.monotonic() + self._linger
            while len(batch) < self._max_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
                self._take_ready(batch)
        self._busy = len(batch) >= self._busy_size
        return batch

    def _take_ready(self, batch: list[T]) -> None:
        while len(batch) < self._max_size:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return
