"""The outbox as the lane relay reads and clears it, and the per-lane publish locks.

Only the holder of a lane's lock publishes that lane, so two queue replicas never publish
one lane's requests out of order. On PostgreSQL the lock is a session-level advisory lock
held on one dedicated connection: when a replica dies, its connection closes and its locks
go with it, with no lease to wait out. The embedded default (SQLite) runs a single queue
service, so an in-process set is the lock there.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fairlane_server.core.models import lanes, outbox, requests
from fairlane_server.core.notify import notify_statements
from fairlane_server.queue.accept_store import OutboxItem

# Advisory lock keys live in one namespace per database; this tag keeps the relay's keys
# apart from any other user of advisory locks.
_KEY_TAG = 0x46_4C_52_4C  # "FLRL"


def lock_key(user_id: uuid.UUID) -> int:
    """A signed 64-bit advisory lock key for a lane."""
    key = ((user_id.int >> 64) ^ _KEY_TAG) & 0xFFFF_FFFF_FFFF_FFFF
    return key - (1 << 64) if key >= 1 << 63 else key


@dataclass(frozen=True, slots=True)
class OutboxRow:
    request_id: uuid.UUID
    lane_pos: int


@dataclass(slots=True)
class LaneOutbox:
    """A lane's acceptance count and its unpublished requests, in publish order."""

    accepted: int
    rows: list[OutboxRow]

    @property
    def next_pos(self) -> int:
        """The lowest position not yet published: every lower one has been."""
        return self.rows[0].lane_pos if self.rows else self.accepted + 1


_PG_LOCK = sa.text(
    """
    SELECT w.u AS user_id
    FROM unnest(CAST(:users AS uuid[]), CAST(:keys AS bigint[])) AS w(u, k)
    WHERE pg_try_advisory_lock(w.k)
    """
)

_PG_RELEASE = sa.text(
    """
    WITH gone AS (DELETE FROM outbox WHERE request_id = ANY(CAST(:ids AS uuid[])))
    SELECT pg_advisory_unlock(k) FROM unnest(CAST(:keys AS bigint[])) AS k
    """
)


_PG_WANTED = sa.text("SELECT pg_notify(:channel, :payload)")


class OutboxStore:
    def __init__(self, engine: AsyncEngine, *, wanted_channel: str | None = None) -> None:
        """`wanted_channel`: where lanes whose lock another replica holds are named, so
        that it lets go of them (services/core/notify.py)."""
        self._engine = engine
        self._pg = engine.dialect.name == "postgresql"
        self._wanted_channel = wanted_channel
        self._conn: AsyncConnection | None = None
        self._local_locks: set[uuid.UUID] = set()

    async def _lock_connection(self) -> AsyncConnection:
        if self._conn is None:
            conn = await self._engine.connect()
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    async def reset(self) -> None:
        """Drops the lock connection (after an error on it); every lock is gone with it."""
        conn, self._conn = self._conn, None
        self._local_locks.clear()
        if conn is not None:
            try:
                await conn.invalidate()
            finally:
                await conn.close()

    async def lock(self, users: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Tries to take each lane's publish lock; returns the lanes now held."""
        if not users:
            return set()
        if not self._pg:
            locked = {u for u in users if u not in self._local_locks}
            self._local_locks |= locked
            return locked
        conn = await self._lock_connection()
        result = await conn.execute(
            _PG_LOCK, {"users": list(users), "keys": [lock_key(u) for u in users]}
        )
        locked = set(result.scalars())
        if self._wanted_channel is not None and len(locked) < len(users):
            # Autocommit: the holder hears it at once, and lets go once it has published.
            wanted = [str(u) for u in users if u not in locked]
            for payload in notify_statements(wanted):
                await conn.execute(
                    _PG_WANTED, {"channel": self._wanted_channel, "payload": payload}
                )
        return locked

    async def pending(self, users: Sequence[uuid.UUID]) -> dict[uuid.UUID, LaneOutbox]:
        """What each lane has in the outbox, read after its lock was taken (a statement of
        its own, so its snapshot cannot predate the lock and show rows already gone)."""
        if not users:
            return {}
        query = (
            sa.select(lanes.c.user_id, lanes.c.accepted, outbox.c.request_id, outbox.c.lane_pos)
            .select_from(lanes.outerjoin(outbox, outbox.c.user_id == lanes.c.user_id))
            .where(lanes.c.user_id.in_(list(users)))
        )
        found: dict[uuid.UUID, LaneOutbox] = {}
        async with self._engine.connect() as conn:
            for r in await conn.execute(query):
                lane = found.setdefault(r.user_id, LaneOutbox(accepted=r.accepted, rows=[]))
                if r.request_id is not None:
                    lane.rows.append(OutboxRow(r.request_id, r.lane_pos))
        for lane in found.values():
            lane.rows.sort(key=lambda row: row.lane_pos)
        return found

    async def load(self, ids: Sequence[uuid.UUID]) -> list[OutboxItem]:
        """The full items of outbox rows this replica did not accept itself."""
        if not ids:
            return []
        query = (
            sa.select(
                outbox.c.request_id,
                outbox.c.user_id,
                outbox.c.lane_pos,
                outbox.c.reply_route,
                outbox.c.traceparent,
                outbox.c.created_at,
                requests.c.handler,
                requests.c.payload,
                requests.c.max_attempts,
                requests.c.deadline,
                requests.c.client_ref,
            )
            .join(requests, requests.c.id == outbox.c.request_id)
            .where(outbox.c.request_id.in_(list(ids)))
        )
        async with self._engine.connect() as conn:
            rows = list(await conn.execute(query))
        return [
            OutboxItem(
                request_id=r.request_id,
                user_id=r.user_id,
                lane_pos=r.lane_pos,
                reply_route=r.reply_route,
                traceparent=r.traceparent,
                handler=r.handler,
                payload=r.payload,
                max_attempts=r.max_attempts,
                deadline=_aware(r.deadline),
                client_ref=r.client_ref,
                created_at=_aware(r.created_at) or datetime.now(UTC),
                recovered=True,
            )
            for r in rows
        ]

    async def release(self, published: Sequence[uuid.UUID], unlock: Sequence[uuid.UUID]) -> None:
        """Deletes the rows of published requests and gives up the locks of `unlock`."""
        if not published and not unlock:
            return
        if self._pg:
            conn = await self._lock_connection()
            await conn.execute(
                _PG_RELEASE, {"ids": list(published), "keys": [lock_key(u) for u in unlock]}
            )
            return
        if published:
            async with self._engine.begin() as conn:
                await conn.execute(outbox.delete().where(outbox.c.request_id.in_(list(published))))
        self._local_locks.difference_update(unlock)

    async def stale_lanes(self, older_than: float, limit: int = 1000) -> list[uuid.UUID]:
        """Lanes with outbox rows older than `older_than` seconds: left by a replica that
        died, or held by one that cannot reach the broker."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than)
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(outbox.c.user_id)
                .where(outbox.c.created_at < cutoff)
                .group_by(outbox.c.user_id)
                .limit(limit)
            )
            return list(rows.scalars())

    async def close(self) -> None:
        """Closing the connection releases every advisory lock this replica holds."""
        await self.reset()


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
