"""The workers table: which worker replicas are alive (by heartbeat) and how many lanes each
is the active consumer of."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core.db import upsert
from fairlane_server.core.models import workers

FORGET_AFTER = timedelta(minutes=10)  # rows of replicas gone this long are deleted


@dataclass(frozen=True, slots=True)
class Peer:
    worker_id: str
    busy_lanes: int


class PresenceStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        insert = upsert(engine.dialect.name, workers)
        self._beat = insert.on_conflict_do_update(
            index_elements=[workers.c.worker_id],
            set_={
                "heartbeat_at": insert.excluded.heartbeat_at,
                "busy_lanes": insert.excluded.busy_lanes,
            },
        )

    async def beat(
        self, worker_id: str, busy_lanes: int, *, started_at: datetime, alive_for: float
    ) -> list[Peer]:
        """Records this replica's heartbeat; returns every replica (this one too) whose
        heartbeat is younger than `alive_for` seconds."""
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            await conn.execute(
                self._beat,
                {
                    "worker_id": worker_id,
                    "started_at": started_at,
                    "heartbeat_at": now,
                    "busy_lanes": busy_lanes,
                },
            )
            await conn.execute(workers.delete().where(workers.c.heartbeat_at < now - FORGET_AFTER))
            rows = await conn.execute(
                sa.select(workers.c.worker_id, workers.c.busy_lanes)
                .where(workers.c.heartbeat_at > now - timedelta(seconds=alive_for))
                .order_by(workers.c.worker_id)
            )
            return [Peer(r.worker_id, r.busy_lanes) for r in rows]

    async def leave(self, worker_id: str) -> None:
        """A replica that stops says so, so the others take over its share at once."""
        async with self._engine.begin() as conn:
            await conn.execute(workers.delete().where(workers.c.worker_id == worker_id))
