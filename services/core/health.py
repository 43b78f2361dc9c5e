"""Readiness: reports NOT_SERVING on "" and the service's name while a dependency
(database, broker) is down. Liveness is the separate "liveness" health service
(grpc_host.LIVENESS), which this never touches: an outage must not restart the processes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core import metrics
from fairlane_server.core.broker import Broker
from fairlane_server.core.grpc_host import GrpcHost
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait

log = get_logger(__name__)


_READ_ONLY = sa.text("SELECT current_setting('transaction_read_only') = 'on'")


class DependencyMonitor:
    def __init__(
        self,
        host: GrpcHost,
        *,
        engine: AsyncEngine | None = None,
        broker: Broker | None = None,
        stalls: dict[str, Callable[[], float]] | None = None,
        stall_seconds: float = 30.0,
        interval: float = 2.0,
    ) -> None:
        self._host = host
        self._engine = engine
        self._broker = broker
        self._stalls = stalls or {}
        self._stall_seconds = stall_seconds
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.serving: bool | None = None
        # The dependencies that failed the last check ("database", "broker", "stage:<name>").
        self.failed: tuple[str, ...] = ()

    async def check(self) -> bool:
        # Which dependency failed, and how: the log line of a change names them, so an
        # operator paged for a NOT_SERVING replica need not guess.
        failed: dict[str, str] = {}
        if self._broker is not None and not self._broker.is_connected:
            failed["broker"] = "disconnected"
        elif self._broker is not None and (blocked := self._broker.blocked_reason) is not None:
            # Connected, but RabbitMQ holds every publish (a memory or disk alarm): a worker
            # runs requests whose results it cannot send.
            failed["broker"] = f"blocked: {blocked}"
        if self._engine is not None:
            try:
                async with asyncio.timeout(self._interval):
                    async with self._engine.connect() as conn:
                        if conn.dialect.name == "postgresql" and await conn.scalar(_READ_ONLY):
                            # SELECT 1 answers on a database that refuses every write (read-
                            # only, or a standby after a failover gone wrong): the replica
                            # looked healthy while it refused every request.
                            failed["database"] = "read-only"
                        else:
                            await conn.execute(sa.text("SELECT 1"))
            except TimeoutError:
                failed["database"] = f"no answer within {self._interval:g} s"
            except Exception as exc:
                failed["database"] = type(exc).__name__
        for stage, stalled_for in self._stalls.items():
            # A batch stage with work and no progress: requests pile up behind it while the
            # process looks alive. Health says so, and the gauge drives an alert.
            stalled = stalled_for() >= self._stall_seconds
            metrics.STAGE_STALLED.labels(stage).set(1 if stalled else 0)
            if stalled:
                failed[f"stage:{stage}"] = f"stalled {round(stalled_for(), 1)} s"
                log.warning("stage_stalled", stage=stage, seconds=round(stalled_for(), 1))
        ok = not failed
        names = tuple(sorted(failed))
        if ok != self.serving or names != self.failed:
            if ok:
                log.info("health_changed", serving=True)
            else:
                log.warning("health_changed", serving=False, failed=list(names), reasons=failed)
            self.failed = names
        if ok != self.serving:
            self.serving = ok
            await self._host.set_serving(ok)
        return ok

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dependency-monitor")

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
