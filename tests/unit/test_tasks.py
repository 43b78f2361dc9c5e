"""cancel_and_wait and wait_event: how every stage and monitor waits, and how its
background task is ended."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from fairlane_server.core.tasks import cancel_and_wait, wait_event


async def test_it_returns_once_the_task_has_ended() -> None:
    cleaned_up = asyncio.Event()

    async def loop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # clean-up that itself awaits
            cleaned_up.set()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert task.cancelled()
    assert cleaned_up.is_set()


async def test_none_and_finished_tasks_are_fine() -> None:
    await cancel_and_wait(None)

    async def done() -> int:
        return 1

    task = asyncio.create_task(done())
    await task
    await cancel_and_wait(task)
    assert task.result() == 1


async def test_a_task_that_died_of_an_error_is_logged_not_raised() -> None:
    async def broken() -> None:
        raise RuntimeError("lost the connection")

    task = asyncio.create_task(broken(), name="relay")
    await asyncio.wait([task])
    with capture_logs() as logs:
        await cancel_and_wait(task)
    assert [(e["event"], e["task"], e["error"]) for e in logs] == [
        ("background_task_failed", "relay", "lost the connection")
    ]


async def test_a_cancelled_caller_stays_cancelled() -> None:
    """The caller's own cancellation must reach it, even while the task it stops is
    still cleaning up; awaiting under suppress(CancelledError) would swallow it."""
    release = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0)
    assert not stopping.done()
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    release.set()
    await asyncio.wait([task])
    assert task.cancelled()


async def test_wait_event_says_whether_the_event_was_set_in_time() -> None:
    event = asyncio.Event()
    assert not await wait_event(event, 0.01)
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_event(event, 5)


async def _loop_until_cancelled(event: asyncio.Event, waits: list[bool]) -> None:
    while True:
        waits.append(await wait_event(event, 3600))
        event.clear()


async def test_a_loop_cancelled_as_its_event_is_set_ends() -> None:
    """The turn of the loop in which asyncio.wait_for (Python 3.11) swallowed the
    cancellation: the event is set and the task cancelled together."""
    event = asyncio.Event()
    waits: list[bool] = []
    task = asyncio.create_task(_loop_until_cancelled(event, waits))
    for _ in range(5):
        await asyncio.sleep(0)
    event.set()
    task.cancel()
    async with asyncio.timeout(5):
        await cancel_and_wait(task)
    assert task.cancelled()
    assert waits == []
