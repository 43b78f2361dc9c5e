"""Throttle counters in the database, so that every auth replica sees the same limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fairlane_server.core.db import upsert
from fairlane_server.core.models import auth_throttle

t = auth_throttle.c


@dataclass(frozen=True, slots=True)
class Claim:
    """One event to count on `key`, whose first `free` events in a window cost nothing.
    `blocks[i]` is when the block that the (free + 1 + i)-th event starts ends; the last
    one also serves every later event (the delay has reached its cap)."""

    key: str
    free: int
    blocks: Sequence[datetime]

    def block_after(self, events: int) -> datetime | None:
        """The end of the block that the `events`-th event starts, if it starts one."""
        over = events - self.free
        if over <= 0:
            return None
        return self.blocks[min(over, len(self.blocks)) - 1]


class Blocked(Exception):
    def __init__(self, until: datetime) -> None:
        super().__init__(f"blocked until {until.isoformat()}")
        self.until = until


class ThrottleStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def _claim_statement(self, claim: Claim, now: datetime, quiet_since: datetime) -> sa.Insert:
        insert = upsert(self._engine.dialect.name, auth_throttle)
        row = insert.table.c
        stale = row.last_event_at < quiet_since
        events = sa.case((stale, 1), else_=row.events + 1)
        # The block this event starts, computed from the count the statement itself
        # produces: the ends are bound values, so this reads the same on both dialects.
        ends = [sa.literal(end, t.blocked_until.type) for end in claim.blocks]
        block = sa.case(
            (events <= claim.free, sa.null()),
            *[(events == claim.free + 1 + i, end) for i, end in enumerate(ends[:-1])],
            else_=ends[-1],
        )
        stmt: sa.Insert = (
            insert.values(
                key=claim.key, events=1, last_event_at=now, blocked_until=claim.block_after(1)
            )
            .on_conflict_do_update(
                index_elements=[t.key],
                set_={"events": events, "blocked_until": block, "last_event_at": now},
                # A key still blocked is left alone, and the statement returns no row.
                where=sa.or_(row.blocked_until.is_(None), row.blocked_until <= now),
            )
            .returning(t.events)
        )
        return stmt

    async def claim(
        self,
        claims: Sequence[Claim],
        now: datetime,
        quiet_since: datetime,
        read: Sequence[str] = (),
    ) -> tuple[list[int], dict[str, tuple[datetime | None, datetime]]]:
        """Counts one event on every claim's key, and starts the block that event earns,
        in one transaction; or, when any of the keys is blocked, counts nothing and raises
        Blocked. Each key is checked and counted by one statement, so concurrent calls,
        on this replica or another, cannot all pass the check before any of them counts.
        Returns the counts, in the order of `claims`, and read(`read`) as of then."""
        counts: dict[str, int] = {}
        async with self._engine.begin() as conn:
            # Keys in one order, so that two calls locking the same two rows cannot deadlock.
            for claim in sorted(claims, key=lambda c: c.key):
                events = (
                    await conn.execute(self._claim_statement(claim, now, quiet_since))
                ).scalar_one_or_none()
                if events is None:
                    until: datetime = (
                        await conn.execute(sa.select(t.blocked_until).where(t.key == claim.key))
                    ).scalar_one()
                    raise Blocked(until)  # leaving the block rolls back the other counts
                counts[claim.key] = events
            rows = await self._read(conn, read) if read else {}
        return [counts[c.key] for c in claims], rows

    @staticmethod
    async def _give_back(conn: AsyncConnection, key: str, block: datetime | None) -> None:
        values: dict[str, sa.ColumnElement[object]] = {
            "events": sa.case((t.events > 0, t.events - 1), else_=0)
        }
        if block is not None:
            # Only the block that event started; a later one is someone else's.
            values["blocked_until"] = sa.case(
                (t.blocked_until == block, sa.null()), else_=t.blocked_until
            )
        await conn.execute(auth_throttle.update().where(t.key == key).values(values))

    async def give_back(self, returned: Sequence[tuple[str, datetime | None]]) -> None:
        """Uncounts one event on each key, and ends the block that event started, if it
        is still the key's block: for events that turned out not to count."""
        async with self._engine.begin() as conn:
            for key, block in sorted(returned, key=lambda r: r[0]):
                await self._give_back(conn, key, block)

    @staticmethod
    async def _read(
        conn: AsyncConnection, keys: Sequence[str]
    ) -> dict[str, tuple[datetime | None, datetime]]:
        rows = await conn.execute(
            sa.select(t.key, t.blocked_until, t.last_event_at).where(t.key.in_(keys))
        )
        return {r.key: (r.blocked_until, r.last_event_at) for r in rows}

    async def read(self, keys: list[str]) -> dict[str, tuple[datetime | None, datetime]]:
        """(blocked_until, last_event_at) of those keys that have a record."""
        async with self._engine.connect() as conn:
            return await self._read(conn, keys)

    async def settle(
        self,
        *,
        clear: str | None,
        touch: Sequence[str],
        now: datetime,
        returned: Sequence[tuple[str, datetime | None]] = (),
    ) -> None:
        """Deletes `clear`, gives back the `returned` events (see give_back) and records an
        event now on each key of `touch`, in one transaction."""
        changes: list[tuple[str, datetime | None, bool]] = [(k, b, False) for k, b in returned]
        if clear is not None:
            changes.append((clear, None, True))
        async with self._engine.begin() as conn:
            # In key order, as claim() locks them.
            for key, block, delete in sorted(changes, key=lambda c: c[0]):
                if delete:
                    await conn.execute(auth_throttle.delete().where(t.key == key))
                else:
                    await self._give_back(conn, key, block)
            for key in sorted(touch):
                insert = upsert(self._engine.dialect.name, auth_throttle)
                await conn.execute(
                    insert.values(key=key, events=1, last_event_at=now).on_conflict_do_update(
                        index_elements=[t.key], set_={"last_event_at": now}
                    )
                )

    async def prune(
        self, quiet_since: datetime, now: datetime, *, kept: Sequence[str], kept_since: datetime
    ) -> int:
        """Deletes counters that have restarted anyway and block nothing, and records with
        a `kept` prefix older than `kept_since`."""
        long_lived = sa.or_(*(t.key.startswith(prefix, autoescape=True) for prefix in kept))
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
