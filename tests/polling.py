"""Waiting in tests for state that another task changes and that signals nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Returns once `check()` is true; TimeoutError after `timeout` seconds.

    For in-memory state of the code under test (a task that ended, a counter), which has
    no event to wait on; the timeout only bounds a failing test."""
    async with asyncio.timeout(timeout):
        while True:
            if check():
                return
            await asyncio.sleep(0.005)
