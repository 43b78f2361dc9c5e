"""Users and refresh tokens in the database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core.db import upsert, write_transaction
from fairlane_server.core.models import refresh_tokens, revoked_families, users


class UsernameTaken(Exception):
    pass


def fold(username: str) -> str:
    """The form in which usernames are compared: they are case-insensitive. They are ASCII
    (fairlane_server.auth.domain.USERNAME), so lower() is the fold, the same as the
    database's lower()."""
    return username.lower()


def _named(username: str) -> sa.ColumnElement[bool]:
    # The expression of the unique index ix_users_lower_username, so lookups use it.
    return sa.func.lower(users.c.username) == fold(username)


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    username: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class RefreshRecord:
    id: uuid.UUID
    user_id: uuid.UUID
    username: str
    family_id: uuid.UUID
    expires_at: datetime
    used_at: datetime | None
    successor_sealed: bytes | None
    revoked: bool


@dataclass(frozen=True, slots=True)
class NewRefresh:
    user_id: uuid.UUID
    family_id: uuid.UUID
    token_hash: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Revoked:
    family_id: uuid.UUID
    revoked_at: datetime


@dataclass(frozen=True, slots=True)
class RevokedPage:
    families: list[Revoked]
    # The number read up to: the next page starts above it.
    last: int
    # More families were numbered up to the read than `families` holds.
    more: bool


class AuthStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create_user(self, username: str, password_hash: str, now: datetime) -> uuid.UUID:
        """Raises UsernameTaken when a user has that name in any case: the unique index on
        lower(username) decides, so of registrations racing for one name, whatever their
        cases, exactly one creates a user."""
        user_id = uuid.uuid4()
        try:
            async with self._engine.begin() as conn:
                await conn.execute(
                    users.insert().values(
                        id=user_id, username=username, password_hash=password_hash, created_at=now
                    )
                )
        except IntegrityError as exc:
            raise UsernameTaken(username) from exc
        return user_id

    async def user_by_name(self, username: str) -> User | None:
        """The user of that name whatever its case, with the name as registered."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(users.c.id, users.c.username, users.c.password_hash).where(
                        _named(username)
                    )
                )
            ).first()
        return User(row.id, row.username, row.password_hash) if row else None

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                users.update().where(users.c.id == user_id).values(password_hash=password_hash)
            )

    async def username_taken(self, username: str) -> bool:
        """Whether a user has that name in any case."""
        async with self._engine.connect() as conn:
            found = (await conn.execute(sa.select(users.c.id).where(_named(username)))).first()
        return found is not None

    @staticmethod
    def _refresh_row(token: NewRefresh, now: datetime) -> dict[str, object]:
        return {
            "id": uuid.uuid4(),
            "user_id": token.user_id,
            "family_id": token.family_id,
            "token_hash": token.token_hash,
            "created_at": now,
            "expires_at": token.expires_at,
        }

    async def add_refresh(self, token: NewRefresh, now: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(refresh_tokens.insert().values(self._refresh_row(token, now)))

    async def refresh_record(self, token_hash: str) -> RefreshRecord | None:
        rt = refresh_tokens.c
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        rt.id,
                        rt.user_id,
                        users.c.username,
                        rt.family_id,
                        rt.expires_at,
                        rt.used_at,
                        rt.successor_sealed,
                        revoked_families.c.family_id.is_not(None),
                    )
                    .join(users, users.c.id == rt.user_id)
                    .outerjoin(revoked_families, revoked_families.c.family_id == rt.family_id)
                    .where(rt.token_hash == token_hash)
                )
            ).first()
        return RefreshRecord(*row) if row else None

    async def rotate(
        self, spent_id: uuid.UUID, successor: NewRefresh, sealed: bytes, now: datetime
    ) -> bool:
        """Spends a token and stores its successor in one transaction. False when another
        call spent it first or its family is revoked: nothing is written then."""
        rt = refresh_tokens.c
        not_revoked = ~sa.exists().where(revoked_families.c.family_id == successor.family_id)
        async with self._engine.begin() as conn:
            # The conditional UPDATE is the arbiter between concurrent refreshes of one
            # token, on PostgreSQL (row lock, re-checked after the wait) and SQLite alike.
            spent = await conn.execute(
                refresh_tokens.update()
                .where(rt.id == spent_id, rt.used_at.is_(None), not_revoked)
                .values(used_at=now, successor_sealed=sealed)
            )
            if spent.rowcount != 1:
                return False
            await conn.execute(refresh_tokens.insert().values(self._refresh_row(successor, now)))
        return True

    async def revoke_family(
        self, family_id: uuid.UUID, user_id: uuid.UUID, now: datetime, reason: str
    ) -> bool:
        """True when this call revoked it, False when it already was.

        The revocation gets the next `seq`, and numbers are taken in commit order: when a
        reader sees number n, every revocation numbered below n has committed (or never
        will). Services read only the numbers above the last they saw, so a revocation
        that committed after a later-numbered one was read would be missed for good. A
        sequence alone does not give that order (numbers are drawn when rows are
        inserted, and transactions commit in any order), nor do timestamps (each auth
        replica's clock, and the same race). So the number is drawn under a lock held
        to commit: on PostgreSQL a table lock that only writers of this table take
        (readers, Refresh's check included, do not wait; the previous release's plain
        inserts do, which keeps them in order during a rolling update); on SQLite the
        write lock, which a write transaction holds from BEGIN. Each revocation needs a
        login's password check, so they come at tens a second per auth replica at most:
        one at a time (about a millisecond each) costs nothing. A number is never reused
        on PostgreSQL (identity); SQLite takes max + 1, reused only if the newest
        revocation's user is deleted before the next.
        """
        rf = revoked_families.c
        dialect = self._engine.dialect.name
        values: dict[str, object] = {
            "family_id": family_id,
            "user_id": user_id,
            "revoked_at": now,
            "reason": reason,
        }
        async with write_transaction(self._engine) as conn:
            if dialect == "postgresql":
                # SHARE ROW EXCLUSIVE conflicts with itself and with the ROW EXCLUSIVE of
                # any INSERT, not with the ACCESS SHARE of reads; the identity supplies seq.
                await conn.execute(
                    sa.text("LOCK TABLE revoked_families IN SHARE ROW EXCLUSIVE MODE")
                )
            else:
                values["seq"] = sa.select(
                    sa.func.coalesce(sa.func.max(rf.seq), 0) + 1
                ).scalar_subquery()
            result = await conn.execute(
                upsert(dialect, revoked_families)
                .values(**values)
                .on_conflict_do_nothing(index_elements=[rf.family_id])
            )
        return bool(result.rowcount)

    async def prune(
        self, now: datetime, *, revoked_before: datetime, batch: int = 5000
    ) -> tuple[int, int]:
        """Deletes refresh tokens past their expiry, then revoked families that nothing can
        use any more: revoked before `revoked_before` (so their access tokens have expired
        too) with no unexpired refresh token left (Refresh reads the revocation through
        them). The newest revocation is always kept: on SQLite the next number is the
        highest plus one, and a number used again would be skipped by every reader past
        it. In batches of `batch` rows, each its own short transaction, so Revoke and the
        logins wait at most one batch. Returns (tokens, families) deleted."""
        rt, rf = refresh_tokens.c, revoked_families.c
        expired = sa.select(rt.id).where(rt.expires_at < now).limit(batch)
        useless = (
            sa.select(rf.family_id)
            .where(
                rf.revoked_at < revoked_before,
                rf.seq < sa.select(sa.func.max(rf.seq)).scalar_subquery(),
                ~sa.exists().where(rt.family_id == rf.family_id, rt.expires_at >= now),
            )
            .limit(batch)
        )
        counts = []
        for table, key, chosen in (
            (refresh_tokens, rt.id, expired),
            (revoked_families, rf.family_id, useless),
        ):
            total = 0
            while True:
                async with self._engine.begin() as conn:
                    result = await conn.execute(
                        table.delete().where(key.in_(chosen.scalar_subquery()))
                    )
                total += result.rowcount
                if result.rowcount < batch:
                    break
            counts.append(total)
        return counts[0], counts[1]

    async def family_of(self, token_hash: str) -> tuple[uuid.UUID, uuid.UUID] | None:
        """(family id, user id) of a refresh token."""
        rt = refresh_tokens.c
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(rt.family_id, rt.user_id).where(rt.token_hash == token_hash)
                )
            ).first()
        return (row.family_id, row.user_id) if row else None

    async def revoked_page(self, after: int | None, since: datetime, limit: int) -> RevokedPage:
        """Up to `limit` families revoked after the time `since` and numbered above `after`,
        in number (commit) order: a page of the deny list services fetch. `after` None
        starts with the lowest number revoked after `since`, as does an `after` above
        every number (the table restored from an older backup: starting over repeats
        families, never skips one)."""
        rf = revoked_families.c
        async with self._engine.connect() as conn:
            # Read first: every number up to it has committed (revoke_family), so the page
            # below, read later, sees all of them whatever commits meanwhile.
            top = (await conn.execute(sa.select(sa.func.max(rf.seq)))).scalar() or 0
            if after is None or after > top:
                # From the (revoked_at, seq) index alone, not a walk over expired history.
                first = (
                    await conn.execute(sa.select(sa.func.min(rf.seq)).where(rf.revoked_at > since))
                ).scalar()
                if first is None:
                    return RevokedPage([], top, more=False)
                after = first - 1
            rows = (
                await conn.execute(
                    sa.select(rf.family_id, rf.revoked_at, rf.seq)
                    .where(rf.seq > after, rf.seq <= top, rf.revoked_at > since)
                    .order_by(rf.seq)
                    .limit(limit + 1)
                )
            ).all()
        more = len(rows) > limit
        families = [Revoked(r.family_id, r.revoked_at) for r in rows[:limit]]
        # Caught up: everything up to `top` was read (rows not listed had expired).
        return RevokedPage(families, rows[limit - 1].seq if more else top, more=more)
