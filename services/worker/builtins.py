"""Built-in handlers for demos, tests and benchmarks."""

from __future__ import annotations

import asyncio
import hashlib
import json

from fairlane.handlers import HandlerContext, PermanentError, handler


@handler(max_attempts=1)
async def noop(ctx: HandlerContext, payload: bytes) -> bytes:
    """Returns nothing, at once: measures Fairlane itself."""
    return b""


@handler(max_attempts=1)
async def echo(ctx: HandlerContext, payload: bytes) -> bytes:
    """Returns the payload unchanged."""
    return payload


@handler(max_attempts=3)
async def sleep(ctx: HandlerContext, payload: bytes) -> bytes:
    """Sleeps for the payload's number of seconds (float, default 0.1), reporting progress."""
    try:
        seconds = float(payload or b"0.1")
    except ValueError:
        raise PermanentError("payload must be a number of seconds") from None
    if not 0 <= seconds <= 3600:
        raise PermanentError("sleep must be between 0 and 3600 seconds")
    steps = 4
    for step in range(steps):
        await asyncio.sleep(seconds / steps)
        await ctx.progress(step + 1, steps)
    return payload


@handler(max_attempts=1)
def cpu(ctx: HandlerContext, payload: bytes) -> bytes:
    """Hashes the payload N times (payload: the integer N, default 10000), in a thread."""
    try:
        rounds = int(payload or b"10000")
    except ValueError:
        raise PermanentError("payload must be an integer number of rounds") from None
    digest = b""
    for _ in range(min(rounds, 10_000_000)):
        digest = hashlib.sha256(digest).digest()
    return digest.hex().encode()


@handler(max_attempts=5)
async def fail(ctx: HandlerContext, payload: bytes) -> bytes:
    """Fails the first N attempts, then succeeds. Payload: {"times": N, "permanent": false}."""
    try:
        spec = json.loads(payload or b"{}")
        times = int(spec.get("times", 1))
        permanent = bool(spec.get("permanent", False))
    except (ValueError, AttributeError):
        raise PermanentError('payload must be JSON like {"times": 2}') from None
    if permanent:
        raise PermanentError("asked to fail permanently")
    if ctx.attempt <= times:
        raise RuntimeError(f"failing attempt {ctx.attempt} of {times}")
    return f"succeeded on attempt {ctx.attempt}".encode()
