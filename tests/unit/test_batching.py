"""The batcher: a lone item goes at once; lingering only while the stage is busy."""

from __future__ import annotations

import asyncio
import time

from fairlane_server.core.batching import Batcher
from fairlane_server.core.tasks import cancel_and_wait


async def test_an_idle_stage_takes_a_lone_item_at_once() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    batcher = Batcher(queue, max_size=10, linger=5.0, busy_size=3)
    queue.put_nowait(1)
    started = time.monotonic()
    assert await batcher.next() == [1]
    assert time.monotonic() - started < 1.0  # no 5 s linger


async def test_whatever_is_ready_goes_in_one_batch_up_to_the_maximum() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    batcher = Batcher(queue, max_size=4, linger=0.0)
    for i in range(6):
        queue.put_nowait(i)
    assert await batcher.next() == [0, 1, 2, 3]
    assert await batcher.next() == [4, 5]


async def test_a_busy_stage_lingers_for_late_arrivals() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    batcher = Batcher(queue, max_size=10, linger=5.0, busy_size=3)
    for i in range(3):
        queue.put_nowait(i)
    assert await batcher.next() == [0, 1, 2]  # busy from now on
    queue.put_nowait(3)

    async def late() -> None:
        await asyncio.sleep(0.05)
        queue.put_nowait(4)

    task = asyncio.create_task(late())
    first = time.monotonic()
    batch = await asyncio.wait_for(batcher.next(), 10)
    await task
    # It waited for the late item, and not the whole linger once the queue stayed empty...
    assert batch[:2] == [3, 4]
    assert time.monotonic() - first >= 0.05
    # ...and a small batch ends the busy spell: the next lone item goes at once.
    queue.put_nowait(5)
    started = time.monotonic()
    assert await batcher.next() == [5]
    assert time.monotonic() - started < 1.0


async def test_a_lingering_stage_cancelled_as_an_item_arrives_ends_and_leaves_the_item() -> None:
    """Stopping a stage cancels its batcher; an item put in that same turn of the loop
    must neither keep it running (asyncio.wait_for on Python 3.11 did) nor vanish."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    batcher = Batcher(queue, max_size=10, linger=3600.0, busy_size=1)
    queue.put_nowait(0)
    assert await batcher.next() == [0]  # busy from now on: the next batch lingers
    queue.put_nowait(1)
    task = asyncio.create_task(batcher.next())
    for _ in range(5):
        await asyncio.sleep(0)
    queue.put_nowait(2)
    task.cancel()
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert task.cancelled()
    assert queue.get_nowait() == 2
