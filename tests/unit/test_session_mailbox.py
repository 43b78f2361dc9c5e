"""The Session's mailbox: an unbounded queue with one consumer."""

from __future__ import annotations

import asyncio

from fairlane_server.queue.session import _Mailbox


async def test_items_come_out_in_the_order_put_and_a_waiting_get_wakes() -> None:
    box: _Mailbox[int] = _Mailbox()
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)  # the getter waits on an empty mailbox
    assert not getter.done()
    box.put_nowait(1)
    box.put_nowait(2)
    assert await getter == 1
    assert (box.qsize(), box.empty()) == (1, False)
    assert box.get_nowait() == 2
    assert box.empty()


async def test_a_cancelled_get_loses_nothing() -> None:
    box: _Mailbox[str] = _Mailbox()
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put_nowait("a")  # wakes the getter, which is cancelled before it runs
    getter.cancel()
    await asyncio.gather(getter, return_exceptions=True)
    assert getter.cancelled()
    assert await box.get() == "a"
