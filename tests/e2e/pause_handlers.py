"""A handler the lane-pause tests register with FAIRLANE_HANDLERS: it runs until the test
lets it finish, so the test decides when a lane could start its next request."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fairlane import HandlerContext, handler


@handler(max_attempts=1)
async def hold(ctx: HandlerContext, payload: bytes) -> bytes:
    """Runs until the file named by the payload exists; returns the payload."""
    release = Path(payload.decode())
    while not await asyncio.to_thread(release.exists):  # noqa: ASYNC110 (another process)
        await asyncio.sleep(0.01)
    return payload
