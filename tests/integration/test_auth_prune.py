"""The auth tables stay bounded (AuthStore.prune), on PostgreSQL and SQLite: expired refresh
tokens go, and revoked families go once nothing can use them, but never the newest one."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.auth import service as service_module
from fairlane_server.auth.service import AuthService
from fairlane_server.auth.store import AuthStore
from fairlane_server.core.models import refresh_tokens, revoked_families, users
from tests.e2e.suite import wait_until

pytestmark = pytest.mark.integration

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)
HOUR = timedelta(hours=1)


async def _user(engine: AsyncEngine) -> uuid.UUID:
    user = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=user, username=f"p-{user.hex}", password_hash="x", created_at=NOW
            )
        )
    return user


async def _token(
    engine: AsyncEngine, user: uuid.UUID, family: uuid.UUID, expires: datetime
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            refresh_tokens.insert().values(
                id=uuid.uuid4(),
                user_id=user,
                family_id=family,
                token_hash=uuid.uuid4().hex,
                created_at=NOW - 48 * HOUR,
                expires_at=expires,
            )
        )


async def _revoked(
    engine: AsyncEngine, store: AuthStore, user: uuid.UUID, at: datetime
) -> uuid.UUID:
    family = uuid.uuid4()
    assert await store.revoke_family(family, user, at, "revoke")
    return family


async def _left(engine: AsyncEngine) -> tuple[set[uuid.UUID], int]:
    async with engine.connect() as conn:
        families = set((await conn.execute(sa.select(revoked_families.c.family_id))).scalars())
        tokens = (
            await conn.execute(sa.select(sa.func.count()).select_from(refresh_tokens))
        ).scalar_one()
    return families, int(tokens)


async def test_expired_tokens_and_useless_revocations_go_the_rest_stays(
    engine: AsyncEngine,
) -> None:
    store = AuthStore(engine)
    user = await _user(engine)
    cutoff = NOW - HOUR  # revoked before this: every access token of the family expired
    # Revoked long ago, every token expired: goes.
    gone = await _revoked(engine, store, user, NOW - 5 * HOUR)
    await _token(engine, user, gone, NOW - HOUR)
    # Revoked long ago but a refresh token of it is unexpired: Refresh must still see it.
    guarded = await _revoked(engine, store, user, NOW - 4 * HOUR)
    await _token(engine, user, guarded, NOW + HOUR)
    # Revoked recently: its access tokens may be valid still.
    recent = await _revoked(engine, store, user, NOW - timedelta(minutes=5))
    # Old, nothing left, but the newest number: kept, so no number is used twice.
    newest = await _revoked(engine, store, user, NOW - 3 * HOUR)
    # Tokens of a live login: one expired (goes), one not.
    live = uuid.uuid4()
    await _token(engine, user, live, NOW - timedelta(seconds=1))
    await _token(engine, user, live, NOW + 24 * HOUR)

    assert await store.prune(NOW, revoked_before=cutoff, batch=1) == (2, 1)
    assert await _left(engine) == ({guarded, recent, newest}, 2)
    assert await store.prune(NOW, revoked_before=cutoff) == (0, 0)
    # A revocation after the prune gets a number above every reader's cursor.
    later = await _revoked(engine, store, user, NOW)
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(revoked_families.c.family_id, revoked_families.c.seq))
        seqs = {r.family_id: r.seq for r in rows}
    assert seqs[later] == max(seqs.values())
    assert seqs[later] > seqs[newest]


@pytest.fixture
def prune_often(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before the service starts: its pass sleeps this long first.
    monkeypatch.setattr(service_module, "PRUNE_EVERY_SECONDS", 0.05)


async def test_the_auth_service_prunes_on_its_own(
    prune_often: None, auth_service: AuthService
) -> None:
    service = auth_service
    user = await _user(service.engine)
    await _token(service.engine, user, uuid.uuid4(), datetime.now(UTC) - HOUR)
    await _token(service.engine, user, uuid.uuid4(), datetime.now(UTC) + HOUR)

    async def one_left() -> bool:
        return (await _left(service.engine))[1] == 1

    await wait_until(one_left, timeout=10)
