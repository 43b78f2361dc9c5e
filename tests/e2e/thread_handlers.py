"""Sync handlers (run in the worker's threads) for the e2e tests: one blocks until the
test creates a file, as a handler stuck on I/O would. Registered with FAIRLANE_HANDLERS."""

from __future__ import annotations

import time
from pathlib import Path

from fairlane import HandlerContext, PermanentError, handler


@handler(max_attempts=3)
def wait_for_flag(ctx: HandlerContext, payload: bytes) -> bytes:
    """Blocks until the file named by the payload exists (at most ten minutes)."""
    flag = Path(payload.decode())
    deadline = time.monotonic() + 600
    while not flag.exists():
        if time.monotonic() > deadline:
            raise PermanentError("the flag never came")
        time.sleep(0.02)
    return b"released"
