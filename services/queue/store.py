"""The request log as the queue service reads and writes it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core import status
from services.core.db import upsert
from services.core.models import handlers, lanes, request_events, requests


@dataclass(slots=True)
class NewRequest:
    id: uuid.UUID
    user_id: uuid.UUID
    handler: str
    payload: bytes
    idempotency_key: str | None
    client_ref: str
    max_attempts: int
    deadline: datetime | None
    trace_id: str
    enqueued_at: datetime


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    name: str
    max_attempts: int


RESULT_COLUMNS = (
    requests.c.id,
    requests.c.lane_seq,
    requests.c.status,
    requests.c.output,
    requests.c.error,
    requests.c.attempts,
    requests.c.client_ref,
    requests.c.handler,
)


class RequestStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        # Built once: a statement built per call costs compile time on the hot path.
        lane_upsert = upsert(self._dialect, lanes)
        self._touch_lane = lane_upsert.on_conflict_do_update(
            index_elements=[lanes.c.user_id],
            set_={"last_active_at": lane_upsert.excluded.last_active_at},
        )

    @property
    def dialect(self) -> str:
        return self._dialect

    async def find_idempotent(
        self, keys: Sequence[tuple[uuid.UUID, str]]
    ) -> dict[tuple[uuid.UUID, str], uuid.UUID]:
        if not keys:
            return {}
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(requests.c.user_id, requests.c.idempotency_key, requests.c.id).where(
                    sa.tuple_(requests.c.user_id, requests.c.idempotency_key).in_(list(keys))
                )
            )
            return {(r.user_id, r.idempotency_key): r.id for r in rows}

    async def insert(self, batch: Sequence[NewRequest]) -> None:
        """One transaction for the whole batch: rows, QUEUED events, lane bookkeeping."""
        now = datetime.now(UTC)
        users = {r.user_id for r in batch}
        async with self._engine.begin() as conn:
            await conn.execute(
                requests.insert(),
                [
                    {
                        "id": r.id,
                        "user_id": r.user_id,
                        "handler": r.handler,
                        "payload": r.payload,
                        "idempotency_key": r.idempotency_key,
                        "client_ref": r.client_ref,
                        "status": status.QUEUED,
                        "attempts": 0,
                        "max_attempts": r.max_attempts,
                        "enqueued_at": r.enqueued_at,
                        "deadline": r.deadline,
                        "trace_id": r.trace_id,
                    }
                    for r in batch
                ],
            )
            await conn.execute(
                request_events.insert(),
                [{"request_id": r.id, "at": r.enqueued_at, "status": status.QUEUED} for r in batch],
            )
            await conn.execute(
                self._touch_lane,
                [
                    {"user_id": u, "created_at": now, "last_active_at": now, "last_seq": 0}
                    for u in users
                ],
            )

    async def delete(self, ids: Sequence[uuid.UUID]) -> None:
        """Undo an insert whose publish failed, so nothing half-written stays behind."""
        if not ids:
            return
        async with self._engine.begin() as conn:
            await conn.execute(request_events.delete().where(request_events.c.request_id.in_(ids)))
            await conn.execute(requests.delete().where(requests.c.id.in_(ids)))

    async def handler_specs(self) -> dict[str, HandlerSpec]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(sa.select(handlers.c.name, handlers.c.max_attempts))
            return {r.name: HandlerSpec(r.name, r.max_attempts) for r in rows}

    async def get(self, user_id: uuid.UUID, request_id: uuid.UUID) -> Any:
        async with self._engine.connect() as conn:
            return (
                await conn.execute(
                    sa.select(requests).where(
                        requests.c.id == request_id, requests.c.user_id == user_id
                    )
                )
            ).first()

    async def list_requests(
        self,
        user_id: uuid.UUID,
        *,
        status_name: str | None,
        limit: int,
        before: uuid.UUID | None,
        with_bodies: bool = False,
    ) -> list[Any]:
        columns = [c for c in requests.c if with_bodies or c.name not in ("payload", "output")]
        query = sa.select(*columns).where(requests.c.user_id == user_id)
        if status_name:
            query = query.where(requests.c.status == status_name)
        if before is not None:
            query = query.where(requests.c.id < before)
        query = query.order_by(requests.c.id.desc()).limit(limit)
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def results_after(
        self, user_id: uuid.UUID, after: int, *, upto: int | None = None, limit: int = 1000
    ) -> list[Any]:
        query = sa.select(*RESULT_COLUMNS).where(
            requests.c.user_id == user_id, requests.c.lane_seq > after
        )
        if upto is not None:
            query = query.where(requests.c.lane_seq < upto)
        query = query.order_by(requests.c.lane_seq).limit(limit)
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def cancel_queued(self, user_id: uuid.UUID, request_id: uuid.UUID) -> str | None:
        """Marks a QUEUED request CANCELLED; returns the status it has afterwards."""
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            updated = await conn.execute(
                requests.update()
                .where(
                    requests.c.id == request_id,
                    requests.c.user_id == user_id,
                    requests.c.status == status.QUEUED,
                )
                .values(status=status.CANCELLED, finished_at=now, error="cancelled by the client")
            )
            if updated.rowcount:
                await conn.execute(
                    request_events.insert().values(
                        request_id=request_id, at=now, status=status.CANCELLED
                    )
                )
                return status.CANCELLED
            current = await conn.execute(
                sa.select(requests.c.status).where(
                    requests.c.id == request_id, requests.c.user_id == user_id
                )
            )
            return current.scalar_one_or_none()

    async def lane(self, user_id: uuid.UUID) -> tuple[Any, int] | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(lanes).where(lanes.c.user_id == user_id))).first()
            if row is None:
                return None
            pending = (
                await conn.execute(
                    sa.select(sa.func.count()).where(
                        requests.c.user_id == user_id,
                        requests.c.status.in_([status.QUEUED, status.RUNNING]),
                    )
                )
            ).scalar_one()
            return row, int(pending)

    def _pending_exists(self) -> Any:
        return (
            sa.select(requests.c.id)
            .where(
                requests.c.user_id == lanes.c.user_id,
                requests.c.status.in_([status.QUEUED, status.RUNNING]),
            )
            .exists()
        )

    async def lanes(self, *, after: uuid.UUID | None, limit: int, idle_seconds: float) -> list[Any]:
        """Live lanes: active within `idle_seconds` or with requests still pending."""
        cutoff = datetime.now(UTC) - timedelta(seconds=idle_seconds)
        query = (
            sa.select(lanes)
            .where(sa.or_(lanes.c.last_active_at > cutoff, self._pending_exists()))
            .order_by(lanes.c.user_id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(lanes.c.user_id > after)
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def idle_lanes(self, idle_seconds: float, limit: int = 100) -> list[uuid.UUID]:
        cutoff = datetime.now(UTC) - timedelta(seconds=idle_seconds)
        query = (
            sa.select(lanes.c.user_id)
            .where(lanes.c.last_active_at <= cutoff, ~self._pending_exists())
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def queued_depth(self) -> tuple[int, int]:
        """(deepest lane, all lanes) in QUEUED requests."""
        per_lane = (
            sa.select(sa.func.count().label("n"))
            .where(requests.c.status == status.QUEUED)
            .group_by(requests.c.user_id)
            .subquery()
        )
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(sa.select(sa.func.max(per_lane.c.n), sa.func.sum(per_lane.c.n)))
            ).one()
        return int(row[0] or 0), int(row[1] or 0)

    async def touch_lanes(self, users: list[uuid.UUID]) -> None:
        if not users:
            return
        async with self._engine.begin() as conn:
            await conn.execute(
                lanes.update()
                .where(lanes.c.user_id.in_(users))
                .values(last_active_at=datetime.now(UTC))
            )
