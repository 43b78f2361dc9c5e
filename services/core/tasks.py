"""Ending the background tasks that every stage and monitor runs."""

from __future__ import annotations

import asyncio
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
