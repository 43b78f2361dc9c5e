"""Throttle counters in the database, so that every auth replica sees the same limits."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core.db import upsert
from fairlane_server.core.models import auth_throttle

t = auth_throttle.c


class ThrottleStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def blocked_until(self, keys: list[str], now: datetime) -> datetime | None:
        """The latest end of a block still running on any of `keys`."""
        async with self._engine.connect() as conn:
            until: datetime | None = (
                await conn.execute(
                    sa.select(sa.func.max(t.blocked_until)).where(
                        t.key.in_(keys), t.blocked_until > now
                    )
                )
            ).scalar_one_or_none()
        return until

    async def count(self, key: str, now: datetime, quiet_since: datetime) -> int:
        """Counts one event on `key` and returns the count, which restarts at 1 when the
        previous event is older than `quiet_since`."""
        insert = upsert(self._engine.dialect.name, auth_throttle)
        stale = insert.table.c.last_event_at < quiet_since
        stmt = (
            insert.values(key=key, events=1, last_event_at=now)
            .on_conflict_do_update(
                index_elements=[t.key],
                set_={
                    "events": sa.case((stale, 1), else_=insert.table.c.events + 1),
                    "blocked_until": sa.case((stale, None), else_=insert.table.c.blocked_until),
                    "last_event_at": now,
                },
            )
            .returning(t.events)
        )
        async with self._engine.begin() as conn:
            events: int = (await conn.execute(stmt)).scalar_one()
        return events

    async def block(self, key: str, until: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                auth_throttle.update().where(t.key == key).values(blocked_until=until)
            )

    async def read(self, keys: list[str]) -> dict[str, tuple[datetime | None, datetime]]:
        """(blocked_until, last_event_at) of those keys that have a record."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(t.key, t.blocked_until, t.last_event_at).where(t.key.in_(keys))
            )
            return {r.key: (r.blocked_until, r.last_event_at) for r in rows}

    async def settle(self, *, clear: str | None, touch: str | None, now: datetime) -> None:
        """Deletes `clear` and records an event now on `touch`, in one transaction."""
        async with self._engine.begin() as conn:
            if clear is not None:
                await conn.execute(auth_throttle.delete().where(t.key == clear))
            if touch is not None:
                insert = upsert(self._engine.dialect.name, auth_throttle)
                await conn.execute(
                    insert.values(key=touch, events=1, last_event_at=now).on_conflict_do_update(
                        index_elements=[t.key], set_={"last_event_at": now}
                    )
                )

    async def prune(
        self, quiet_since: datetime, now: datetime, *, kept: str, kept_since: datetime
    ) -> int:
        """Deletes counters that have restarted anyway and block nothing, and records with
        the `kept` prefix older than `kept_since`."""
        long_lived = t.key.startswith(kept, autoescape=True)
        async with self._engine.begin() as conn:
            result = await conn.execute(
                auth_throttle.delete().where(
                    sa.or_(
                        sa.and_(
                            ~long_lived,
                            t.last_event_at < quiet_since,
                            sa.or_(t.blocked_until.is_(None), t.blocked_until <= now),
                        ),
                        sa.and_(long_lived, t.last_event_at < kept_since),
                    )
                )
            )
        return int(result.rowcount)
