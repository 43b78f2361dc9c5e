"""Handlers that end the worker process the way user code can: the e2e tests register
them with FAIRLANE_HANDLERS and check that the request, not the worker, pays for it."""

from __future__ import annotations

import os
import sys

from fairlane import HandlerContext, handler


@handler(max_attempts=2)
async def exit_process(ctx: HandlerContext, payload: bytes) -> bytes:
    """Ends the process at once, as a segfault or the OOM killer would: no cleanup."""
    os._exit(7)


@handler(max_attempts=2)
async def system_exit(ctx: HandlerContext, payload: bytes) -> bytes:
    sys.exit(3)
