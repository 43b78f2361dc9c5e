"""The lanes table as the janitor reads and writes it: idle lanes page by page, and the
claim that fences a lane's deletion against a concurrent enqueue."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core import status
from fairlane_server.core.db import write_transaction
from fairlane_server.core.models import lanes, requests


@dataclass(frozen=True, slots=True)
class IdleLane:
    user_id: uuid.UUID
    last_active_at: datetime


class LaneHousekeepingStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def _idle(self, idle_seconds: float) -> sa.ColumnElement[bool]:
        """Idle for `idle_seconds`, nothing pending, not paused, and a queue that still
        exists (never deleted, or active again since it was). A paused lane is never idle:
        ListLanes lists it for every worker replica to consume (and to learn of its pause),
        so its queue stays until it is resumed and idle again."""
        cutoff = datetime.now(UTC) - timedelta(seconds=idle_seconds)
        pending = (
            sa.select(requests.c.id)
            .where(
                requests.c.user_id == lanes.c.user_id,
                requests.c.status.in_([status.QUEUED, status.RUNNING]),
                # Implied by those statuses; lets PostgreSQL use ix_requests_unsequenced.
                requests.c.lane_seq.is_(None),
            )
            .exists()
        )
        return sa.and_(
            lanes.c.last_active_at <= cutoff,
            lanes.c.paused_at.is_(None),
            ~pending,
            sa.or_(
                lanes.c.queue_deleted_at.is_(None),
                lanes.c.queue_deleted_at < lanes.c.last_active_at,
            ),
        )

    async def idle_page(
        self, *, after: uuid.UUID | None, limit: int, idle_seconds: float
    ) -> list[IdleLane]:
        """Up to `limit` idle lanes with a queue, in user_id order after `after` (keyset
        pagination: a page costs the same wherever it starts)."""
        query = (
            sa.select(lanes.c.user_id, lanes.c.last_active_at)
            .where(self._idle(idle_seconds))
            .order_by(lanes.c.user_id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(lanes.c.user_id > after)
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [IdleLane(r.user_id, r.last_active_at) for r in rows]

    async def delete_if_idle(
        self, lane: IdleLane, idle_seconds: float, delete: Callable[[], Awaitable[bool]]
    ) -> bool:
        """Runs `delete` (the broker's) while the lane's row is claimed; records the deletion.

        The claim is an UPDATE of the lane's row that holds only if the row is unchanged
        since `idle_page` read it (same last_active_at), so it takes the row lock that every
        enqueue takes too: intake inserts a lane's requests and touches its row (a new
        last_active_at) in one transaction, and publishes only after that commits. So either
        that commit came first, and the claim finds the row changed and deletes nothing, or
        the claim came first, and the enqueue's transaction waits for the deletion to be
        committed and publishes to a queue that is gone: the publish is returned, and intake
        declares the lane again. No message can be published to a queue this deletes.
        Returns False (nothing recorded) if the row changed or `delete` kept the queue."""
        claim = (
            lanes.update()
            .where(
                lanes.c.user_id == lane.user_id,
                lanes.c.last_active_at == lane.last_active_at,
                self._idle(idle_seconds),
            )
            .values(queue_deleted_at=datetime.now(UTC))
            .returning(lanes.c.user_id)
        )
        async with self._engine.connect() as conn, conn.begin() as transaction:
            if (await conn.execute(claim)).first() is None:
                return False
            if not await delete():
                await transaction.rollback()
                return False
        return True

    async def touch(self, users: list[uuid.UUID]) -> None:
        """Marks lanes active now (their sessions are open on this replica). The rows are
        locked in user_id order first, the order intake and the result writer lock them
        in, so this never deadlocks with them. On SQLite the transaction takes the write
        lock at BEGIN: a read that then writes could not wait for another writer (SQLite
        answers "database is locked" at once rather than risk a deadlock)."""
        if not users:
            return
        ordered = sorted(users)
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                sa.select(lanes.c.user_id)
                .where(lanes.c.user_id.in_(ordered))
                .order_by(lanes.c.user_id)
                .with_for_update()
            )
            await conn.execute(
                lanes.update()
                .where(lanes.c.user_id.in_(ordered))
                .values(last_active_at=datetime.now(UTC))
            )

    async def deleted_at(self, user_id: uuid.UUID) -> datetime | None:
        async with self._engine.connect() as conn:
            value: datetime | None = (
                await conn.execute(
                    sa.select(lanes.c.queue_deleted_at).where(lanes.c.user_id == user_id)
                )
            ).scalar_one_or_none()
        return value
