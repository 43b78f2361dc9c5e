"""Ending the background tasks that every stage and monitor runs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fairlane_server.core.logging import get_logger

log = get_logger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancels `task` and returns once it has ended, whatever it ended with.

    Waits with `asyncio.wait` instead of awaiting the task under
    `suppress(CancelledError)`: that would also swallow a cancellation of the caller, so a
    `stop()` that was itself cancelled would carry on as if it had not been. A task that
    died of an error before it was cancelled is logged, not raised: a shutdown goes on
    stopping the other parts.
    """
    if task is None:
        return
    task.cancel()
    await asyncio.wait([task])
    if not task.cancelled() and (error := task.exception()) is not None:
        log.error(
            "background_task_failed",
            task=task.get_name(),
            error_type=type(error).__name__,
            error=str(error),
        )


def fail_quietly(future: asyncio.Future[Any], exc: BaseException) -> None:
    """Fails `future` with `exc` unless it is done, and marks the exception retrieved: the
    caller waiting for it may have gone away (a cancelled RPC), and asyncio would log an
    unretrieved exception when the future is collected."""
    if not future.done():
        future.set_exception(exc)
        future.exception()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Waits until `event` is set or `timeout` seconds have passed; returns whether it is set.

    Not `asyncio.wait_for(event.wait(), timeout)`: on Python 3.11 that swallows a
    cancellation which arrives in the same turn of the loop as the event is set (it
    returns the result instead, cpython gh-86296), so a loop waiting that way carried on
    after its stop() cancelled it, and stop() waited for it forever. `asyncio.timeout`
    delivers the cancellation; ruff bans `asyncio.wait_for` in this code base for this.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    return event.is_set()
