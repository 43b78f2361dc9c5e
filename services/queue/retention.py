"""Log maintenance: partitions for the coming days, and retention of finished requests.

Every queue replica runs it (at start, then every `interval` seconds); on PostgreSQL an
advisory lock lets one replica at a time do a pass, and the others skip theirs.
`fairlane maintain` runs one pass by hand. The rule for what is removed is in
services/queue/retention_store.py.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from fairlane_server.core import metrics
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait
from fairlane_server.queue.retention_store import (
    Partition,
    Report,
    RetentionStore,
    day_bound,
    day_of,
)

log = get_logger(__name__)

# Days of partitions kept ready ahead of today: inserts never wait for one, and a week
# without any queue replica running is needed before an insert could find none.
AHEAD_DAYS = 7


@dataclass(slots=True)
class _Pass:
    conn: AsyncConnection
    cutoff: datetime
    limit: uuid.UUID
    report: Report = field(default_factory=Report)


class Retention:
    def __init__(
        self, store: RetentionStore, *, days: float, interval_seconds: float = 3600.0
    ) -> None:
        self._store = store
        self._days = days
        self._interval = interval_seconds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log-retention")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("log_maintenance_failed", error=str(exc)[:300])
            except Exception:
                # A bug must not end maintenance for the life of the replica: without it the
                # coming days get no partitions.
                log.exception("log_maintenance_failed")
            # Jitter keeps replicas from trying at the same moment.
            await asyncio.sleep(self._interval * random.uniform(0.8, 1.2))

    async def run_once(self, now: datetime | None = None) -> Report:
        """One pass; `now` may be moved (tests, or to see what a later pass would do)."""
        now = now or datetime.now(UTC)
        started = time.monotonic()
        if not self._store.partitioned:
            report = Report()
            if self._days > 0:
                cutoff = now - timedelta(days=self._days)
                report.rows_deleted, report.keys_deleted = await self._store.delete_expired_rows(
                    cutoff
                )
        else:
            conn = await self._store.connect()
            try:
                if not await self._store.try_lock(conn):
                    return Report(skipped=True)
                try:
                    report = await self._pass(conn, now)
                finally:
                    await self._store.unlock(conn)
            finally:
                await self._store.release(conn)
        metrics.LOG_MAINTENANCE_TIMESTAMP.set_to_current_time()
        metrics.LOG_PARTITIONS_PAST_RETENTION.set(
            sum(1 for name, _ in report.kept if name.startswith("requests"))
        )
        metrics.LOG_REMOVED.inc(
            sum(1 for name in report.dropped if name.startswith("requests")) + report.rows_deleted
        )
        if report.created or report.dropped or report.kept or report.rows_deleted:
            log.info(
                "log_maintenance",
                created=report.created,
                dropped=report.dropped,
                kept=[f"{name}: {why}" for name, why in report.kept],
                requests_deleted=report.rows_deleted,
                keys_deleted=report.keys_deleted,
                seconds=round(time.monotonic() - started, 3),
            )
        return report

    async def _pass(self, conn: AsyncConnection, now: datetime) -> Report:
        store = self._store
        cutoff = now - timedelta(days=self._days)
        # Ids below `limit` were all made before the cutoff.
        run = _Pass(conn, cutoff, uuid.UUID(int=int(cutoff.timestamp() * 1000) << 80))
        report, limit = run.report, run.limit
        # A detach interrupted mid-way (process or connection gone) is completed first;
        # the table is then dealt with like any other detached one.
        for table in ("requests", "request_events"):
            for p in await store.partitions(conn, table):
                if p.detach_pending:
                    await store.finalize(conn, table, p.name)
                    await self._settle_detached(run, table, p)
        today = day_of(now)
        for table in ("requests", "request_events"):
            existing = await store.partitions(conn, table)
            for day in range(today, today + AHEAD_DAYS + 1):
                if not any(p.covers(day_bound(day)) for p in existing):
                    report.created.append(await store.create_day(table, day))
        if self._days <= 0:
            return report
        for p in await store.partitions(conn, "requests"):
            if p.upper is None or p.upper > limit:
                continue
            reason = await store.holds_live(conn, p.name, cutoff)
            if reason is not None:
                report.kept.append((p.name, reason))
                continue
            await store.detach(conn, "requests", p.name)
            await self._settle_detached(run, "requests", p)
        # The history of requests whose partition is gone (normally dropped just above;
        # also left over by a pass that stopped between the two).
        live = {(p.lower, p.upper) for p in await store.partitions(conn, "requests")}
        for p in await store.partitions(conn, "request_events"):
            if p.upper is not None and p.upper <= limit and (p.lower, p.upper) not in live:
                await store.detach(conn, "request_events", p.name)
                await self._settle_detached(run, "request_events", p)
        return report

    async def _settle_detached(self, run: _Pass, table: str, p: Partition) -> None:
        """Drops a detached partition that the rule lets go, or attaches it back."""
        store, conn, report = self._store, run.conn, run.report
        reason: str | None = None
        if self._days <= 0 or p.upper is None or p.upper > run.limit:
            reason = "not past retention"
        elif table == "requests":
            reason = await store.holds_live(conn, p.name, run.cutoff)
        else:
            live = {(q.lower, q.upper) for q in await store.partitions(conn, "requests")}
            if (p.lower, p.upper) in live:
                reason = "its requests are kept"
        if reason is not None:
            await store.attach(conn, table, p)
            report.kept.append((p.name, reason))
            return
        await store.drop(conn, p.name)
        report.dropped.append(p.name)
        if table == "requests" and p.upper is not None:
            report.keys_deleted += await store.delete_keys_between(conn, p.lower, p.upper)


def describe(report: Report) -> str:
    """A few lines for `fairlane maintain`."""
    if report.skipped:
        return "another replica is running maintenance; nothing done"
    lines = [
        f"partitions created: {', '.join(report.created) or 'none'}",
        f"partitions dropped: {', '.join(report.dropped) or 'none'}",
    ]
    lines += [f"kept {name}: {why}" for name, why in report.kept]
    if report.rows_deleted:
        lines.append(f"requests deleted: {report.rows_deleted}")
    lines.append(f"idempotency keys deleted: {report.keys_deleted}")
    return "\n".join(lines)
