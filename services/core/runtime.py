"""Runs service components until SIGTERM/SIGINT, then stops them within a grace period."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from fairlane_server.core.logging import get_logger

log = get_logger(__name__)


class Component(Protocol):
    name: str

    @property
    def address(self) -> str: ...

    async def start(self) -> None: ...
    async def stop(self, grace: float) -> None: ...


async def run_until_signalled(
    components: Sequence[Component],
    *,
    grace: float,
    on_started: Callable[[], Awaitable[None]] | None = None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[Component] = []
    try:
        for component in components:
            await component.start()
            started.append(component)
            log.info("service_started", component=component.name, address=component.address)
        if on_started is not None:
            await on_started()
        await stop.wait()
        log.info("shutdown_requested", grace=grace)
    finally:
        # Stop in reverse start order: workers first hand lanes back, auth goes last.
        for component in reversed(started):
            try:
                await asyncio.wait_for(component.stop(grace), grace + 5)
            except Exception:
                log.exception("stop_failed", component=component.name)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def run(main: Awaitable[None]) -> None:
    """asyncio.run on uvloop where available (faster gRPC/AMQP I/O)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(main)  # type: ignore[arg-type]
        return
    uvloop.run(main)  # type: ignore[arg-type]
