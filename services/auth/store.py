"""Users and refresh tokens in the database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.models import refresh_tokens, users


class UsernameTaken(Exception):
    pass


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
    revoked_at: datetime | None


class AuthStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create_user(self, username: str, password_hash: str, now: datetime) -> uuid.UUID:
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
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(users.c.id, users.c.username, users.c.password_hash).where(
                        users.c.username == username
                    )
                )
            ).first()
        return User(row.id, row.username, row.password_hash) if row else None

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                users.update().where(users.c.id == user_id).values(password_hash=password_hash)
            )

    async def add_refresh(
        self,
        *,
        user_id: uuid.UUID,
        family_id: uuid.UUID,
        token_hash: str,
        now: datetime,
        expires_at: datetime,
    ) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                refresh_tokens.insert().values(
                    id=uuid.uuid4(),
                    user_id=user_id,
                    family_id=family_id,
                    token_hash=token_hash,
                    created_at=now,
                    expires_at=expires_at,
                )
            )

    async def spend_refresh(self, token_hash: str, now: datetime) -> RefreshRecord | None:
        """Marks the token used and returns it as it was before, in one transaction."""
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    sa.select(
                        refresh_tokens.c.id,
                        refresh_tokens.c.user_id,
                        users.c.username,
                        refresh_tokens.c.family_id,
                        refresh_tokens.c.expires_at,
                        refresh_tokens.c.used_at,
                        refresh_tokens.c.revoked_at,
                    )
                    .join(users, users.c.id == refresh_tokens.c.user_id)
                    .where(refresh_tokens.c.token_hash == token_hash)
                    .with_for_update(of=refresh_tokens)
                )
            ).first()
            if row is None:
                return None
            if row.used_at is None:
                await conn.execute(
                    refresh_tokens.update().where(refresh_tokens.c.id == row.id).values(used_at=now)
                )
        return RefreshRecord(*row)

    async def revoke_family(self, family_id: uuid.UUID, now: datetime) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                refresh_tokens.update()
                .where(
                    refresh_tokens.c.family_id == family_id, refresh_tokens.c.revoked_at.is_(None)
                )
                .values(revoked_at=now)
            )

    async def family_of(self, token_hash: str) -> uuid.UUID | None:
        async with self._engine.connect() as conn:
            return (
                await conn.execute(
                    sa.select(refresh_tokens.c.family_id).where(
                        refresh_tokens.c.token_hash == token_hash
                    )
                )
            ).scalar_one_or_none()
