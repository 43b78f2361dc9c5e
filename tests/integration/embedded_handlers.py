"""Handlers and hooks the embedded-stack test registers by module:attr."""

from __future__ import annotations

import os
from typing import ClassVar

from fairlane import HandlerContext, Hooks, PlainContext, handler


@handler(executor="process", max_attempts=1)
def square(ctx: PlainContext, payload: bytes) -> bytes:
    """Squares an integer in a worker process, and says which process did it."""
    n = int(payload)
    return f"{n * n} pid={os.getpid()}".encode()


class Recorder(Hooks):
    calls: ClassVar[list[str]] = []

    async def on_startup(self) -> None:
        self.calls.append("startup")

    async def on_shutdown(self) -> None:
        self.calls.append("shutdown")

    async def before_request(self, ctx: HandlerContext, handler: str) -> None:
        self.calls.append(f"before {handler} {ctx.attempt}")

    async def after_request(
        self, ctx: HandlerContext, handler: str, status: str, error: str
    ) -> None:
        self.calls.append(f"after {handler} {status}")
