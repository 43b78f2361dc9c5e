"""The request log's partitions and retention, as the maintenance task manages them.

On PostgreSQL `requests` (by `id`) and `request_events` (by `request_id`) are partitioned
into UTC days of UUIDv7 ids (migration 0005). Maintenance creates the partitions of the
coming days ahead of time and drops the partitions whose requests are all past retention.

The rule for dropping a day (a partition and its events partition):
  * every id in its range is older than the cutoff (now - retention), i.e. every request in
    it was accepted before the cutoff, and
  * none of its requests is unfinished: each has its lane_seq (its result was handed out;
    a request still queued, running, or cancelled but not yet released by its worker keeps
    the whole day, however old), and
  * none finished after the cutoff: a request that ran long keeps its day until its result,
    too, is older than retention.
A day is dropped whole or not at all, so a request lives at least `retention` past its
result and at most about a day more (the partition's width).

A partition is detached with DETACH PARTITION ... CONCURRENTLY (SHARE UPDATE EXCLUSIVE on
the parent: reads and writes of the log go on) and dropped only once detached, never row by
row. The rule is checked again on the detached table before the drop; a table that fails it
(it cannot, short of a clock set back by more than the retention) is attached back.

On SQLite (the single-user embedded log) the same rule applies per request, by row deletes.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fairlane_server.core.models import idempotency_keys, request_events, requests

DAY_MS = 86_400_000
TABLES = ("requests", "request_events")
# The advisory lock that makes one replica at a time run maintenance ("FLMT").
_LOCK_KEY = 0x46_4C_4D_54
_KEY_BATCH = 10_000
_BOUND = re.compile(
    r"FROM \((?:'([0-9a-f-]{36})'|MINVALUE)\) TO \((?:'([0-9a-f-]{36})'|MAXVALUE)\)"
)


def day_of(at: datetime) -> int:
    """The UTC day (days since the Unix epoch) of a moment."""
    return int(at.timestamp() * 1000) // DAY_MS


def day_bound(day: int) -> uuid.UUID:
    """The smallest UUIDv7 of a UTC day: the day's first millisecond, every other bit 0."""
    return uuid.UUID(int=(day * DAY_MS) << 80)


def id_day(request_id: uuid.UUID) -> int:
    """The UTC day a UUIDv7 was made in."""
    return (request_id.int >> 80) // DAY_MS


def partition_name(table: str, day: int) -> str:
    try:
        suffix = (date(1970, 1, 1) + timedelta(days=day)).strftime("%Y%m%d")
    except OverflowError:
        suffix = f"d{day}"
    return f"{table}_p{suffix}"


@dataclass(frozen=True, slots=True)
class Partition:
    name: str
    lower: uuid.UUID | None  # None: MINVALUE
    upper: uuid.UUID | None  # None: MAXVALUE
    detach_pending: bool = False

    def covers(self, value: uuid.UUID) -> bool:
        return (self.lower is None or self.lower <= value) and (
            self.upper is None or value < self.upper
        )

    @property
    def bounds_sql(self) -> str:
        lower = "MINVALUE" if self.lower is None else f"'{self.lower}'"
        upper = "MAXVALUE" if self.upper is None else f"'{self.upper}'"
        return f"FROM ({lower}) TO ({upper})"


@dataclass(slots=True)
class Report:
    """What one maintenance pass did."""

    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    # Partitions past the cutoff that were kept, with the reason.
    kept: list[tuple[str, str]] = field(default_factory=list)
    keys_deleted: int = 0
    rows_deleted: int = 0  # SQLite only
    skipped: bool = False  # another replica held the maintenance lock


_PARTITIONS = sa.text(
    """
    SELECT c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound,
           i.inhdetachpending AS pending
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = CAST(:parent AS regclass)
    """
)


class RetentionStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"

    @property
    def partitioned(self) -> bool:
        return self._pg

    # -- PostgreSQL -------------------------------------------------------------------------

    async def partitions(self, conn: AsyncConnection, table: str) -> list[Partition]:
        found = []
        for r in await conn.execute(_PARTITIONS, {"parent": table}):
            match = _BOUND.search(r.bound)
            if match is None:  # not a range partition of ours
                continue
            lower, upper = (uuid.UUID(b) if b else None for b in match.groups())
            found.append(Partition(r.name, lower, upper, bool(r.pending)))
        return sorted(found, key=lambda p: (p.lower is not None, p.lower or uuid.UUID(int=0)))

    async def connect(self) -> AsyncConnection:
        """The connection a pass holds its lock on and detaches partitions with."""
        conn = await self._engine.connect()
        # DETACH ... CONCURRENTLY cannot run inside a transaction block.
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        # Waiting for a lock is fine, but not behind a long transaction for ever: the
        # partition work then waits for the next pass.
        await conn.execute(sa.text("SET lock_timeout = '5s'"))
        return conn

    async def release(self, conn: AsyncConnection) -> None:
        """Returns the connection to its pool as it was taken (it may be the service's)."""
        try:
            await conn.execute(sa.text("RESET lock_timeout"))
        finally:
            await conn.close()

    async def try_lock(self, conn: AsyncConnection) -> bool:
        got = await conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY})
        return bool(got.scalar_one())

    async def unlock(self, conn: AsyncConnection) -> None:
        await conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})

    async def create_day(self, table: str, day: int) -> str:
        """Creates the partition of one day. Created apart, then attached: ATTACH takes
        SHARE UPDATE EXCLUSIVE on the parent, which blocks no read or write of the log
        (CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE)."""
        name = partition_name(table, day)
        async with self._engine.begin() as conn:
            await conn.execute(sa.text("SET LOCAL lock_timeout = '5s'"))
            await conn.execute(
                sa.text(f'CREATE TABLE "{name}" (LIKE "{table}" INCLUDING DEFAULTS)')
            )
            await conn.execute(
                sa.text(
                    f'ALTER TABLE "{table}" ATTACH PARTITION "{name}" FOR VALUES '
                    f"FROM ('{day_bound(day)}') TO ('{day_bound(day + 1)}')"
                )
            )
        return name

    async def holds_live(self, conn: AsyncConnection, name: str, cutoff: datetime) -> str | None:
        """Why a requests partition (attached or detached) must be kept, or None."""
        unfinished = await conn.execute(
            sa.text(f'SELECT count(*) FROM "{name}" WHERE lane_seq IS NULL')
        )
        n = unfinished.scalar_one()
        if n:
            return f"{n} unfinished request(s)"
        recent = await conn.execute(
            sa.text(f'SELECT EXISTS (SELECT 1 FROM "{name}" WHERE finished_at >= :cutoff)'),
            {"cutoff": cutoff},
        )
        if recent.scalar_one():
            return "requests finished within the retention period"
        return None

    async def detach(self, conn: AsyncConnection, table: str, name: str) -> None:
        await conn.execute(sa.text(f'ALTER TABLE "{table}" DETACH PARTITION "{name}" CONCURRENTLY'))

    async def finalize(self, conn: AsyncConnection, table: str, name: str) -> None:
        """Completes a concurrent detach that was interrupted."""
        await conn.execute(sa.text(f'ALTER TABLE "{table}" DETACH PARTITION "{name}" FINALIZE'))

    async def attach(self, conn: AsyncConnection, table: str, p: Partition) -> None:
        await conn.execute(
            sa.text(f'ALTER TABLE "{table}" ATTACH PARTITION "{p.name}" FOR VALUES {p.bounds_sql}')
        )

    async def drop(self, conn: AsyncConnection, name: str) -> None:
        await conn.execute(sa.text(f'DROP TABLE "{name}"'))

    async def delete_keys_between(
        self, conn: AsyncConnection, lower: uuid.UUID | None, upper: uuid.UUID
    ) -> int:
        """Deletes the idempotency keys of the requests in [lower, upper) (a dropped
        partition), in batches so that no transaction grows large."""
        k = idempotency_keys.c
        where = [k.request_id < upper] + ([k.request_id >= lower] if lower else [])
        total = 0
        while True:
            chosen = sa.select(k.user_id, k.idempotency_key).where(*where).limit(_KEY_BATCH)
            result = await conn.execute(
                idempotency_keys.delete().where(sa.tuple_(k.user_id, k.idempotency_key).in_(chosen))
            )
            total += result.rowcount
            if result.rowcount < _KEY_BATCH:
                return total

    # -- SQLite -----------------------------------------------------------------------------

    async def delete_expired_rows(self, cutoff: datetime) -> tuple[int, int]:
        """Deletes finished requests whose result is older than `cutoff`, with their history
        and keys; returns (requests, idempotency keys) deleted."""
        expired = sa.select(requests.c.id).where(
            requests.c.lane_seq.is_not(None), requests.c.finished_at < cutoff
        )
        async with self._engine.begin() as conn:
            await conn.execute(
                request_events.delete().where(request_events.c.request_id.in_(expired))
            )
            keys = await conn.execute(
                idempotency_keys.delete().where(idempotency_keys.c.request_id.in_(expired))
            )
            gone = await conn.execute(requests.delete().where(requests.c.id.in_(expired)))
        return gone.rowcount, keys.rowcount
