"""Collecting work into batches: the first item, then whatever arrives within a linger."""

from __future__ import annotations

import asyncio
import time
from typing import TypeVar

T = TypeVar("T")


async def collect(queue: asyncio.Queue[T], *, max_size: int, linger: float) -> list[T]:
    """Waits for one item, then takes more until `max_size` or `linger` seconds passed.

    Under load the queue already holds a batch and nothing waits; when idle a lone item
    waits at most `linger`, which bounds the latency batching adds."""
    batch = [await queue.get()]
    deadline = time.monotonic() + linger
    while len(batch) < max_size:
        try:
            batch.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(queue.get(), remaining))
        except TimeoutError:
            break
    return batch
