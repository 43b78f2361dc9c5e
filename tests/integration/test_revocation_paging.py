"""The revocation list against real PostgreSQL: a list longer than a page reaches a
verifier whole, in pages of bounded size; revocations are numbered in commit order even
when a slow transaction commits after a later one; and migration 0011 numbers the rows
that were there before it."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import jwt
import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane_server.auth.domain import MAX_REVOKED_PAGE
from fairlane_server.auth.service import AuthService
from fairlane_server.auth.store import AuthStore
from fairlane_server.core.auth_client import AuthClient
from fairlane_server.core.db import _alembic_config, create_engine, drop_schema, migrate
from fairlane_server.core.models import users
from fairlane_server.core.revocation import RevokedFamilies
from tests.conftest import DATABASE_URL, unique
from tests.e2e.suite import wait_until

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery"


@pytest.fixture
async def auth(auth_service: AuthService) -> AuthService:
    return auth_service


async def _user(engine: AsyncEngine) -> uuid.UUID:
    user = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            users.insert().values(
                id=user, username=unique("u"), password_hash="x", created_at=datetime.now(UTC)
            )
        )
    return user


async def _bulk_revoke(engine: AsyncEngine, user: uuid.UUID, n: int) -> None:
    """`n` revoked families in one statement, numbered by the column's identity."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO revoked_families (family_id, user_id, revoked_at, reason) "
                "SELECT gen_random_uuid(), :user, now(), 'revoke' FROM generate_series(1, :n)"
            ),
            {"user": user, "n": n},
        )


async def test_a_verifier_sees_every_family_of_a_list_longer_than_a_page(
    auth: AuthService,
) -> None:
    many = 2 * MAX_REVOKED_PAGE + 500
    await _bulk_revoke(auth.engine, await _user(auth.engine), many)
    # And one revoked the real way, last.
    async with grpc.aio.insecure_channel(auth.address) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        name = unique("paged")
        await stub.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
        login = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
        await stub.Revoke(auth_pb2.RevokeRequest(refresh_token=login.refresh_token))
        family = jwt.decode(login.access_token, options={"verify_signature": False})["fam"]

        # The pages as the wire carries them: each bounded, together the whole list.
        sizes, ids, token = [], set(), ""
        while True:
            page = await stub.GetRevokedFamilies(
                auth_pb2.GetRevokedFamiliesRequest(page_token=token, page_size=0)
            )
            sizes.append(page.ByteSize())
            ids |= set(page.family_ids)
            assert len(page.expire_times) == len(page.family_ids)
            token = page.next_page_token
            if not page.more_pages:
                break
        assert len(sizes) == 3
        assert max(sizes) < 1024 * 1024
        assert len(ids) == many + 1
        # Caught up: the next call carries nothing.
        latest = await stub.GetRevokedFamilies(auth_pb2.GetRevokedFamiliesRequest(page_token=token))
        assert (list(latest.family_ids), latest.more_pages) == ([], False)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetRevokedFamilies(auth_pb2.GetRevokedFamiliesRequest(page_token="x"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    client = AuthClient(auth.address)
    try:
        revoked = RevokedFamilies(client.revoked_families, max_age=5.0)
        assert await revoked.contains(family)
        assert len(revoked) == many + 1
        # A revocation after the first read comes with the next, small fetch.
        extra = uuid.uuid4()
        await AuthStore(auth.engine).revoke_family(
            extra, await _user(auth.engine), datetime.now(UTC), "revoke"
        )
        await revoked.refresh()
        assert await revoked.contains(str(extra))
        assert len(revoked) == many + 2
    finally:
        await client.close()


async def test_a_revocation_waits_for_one_that_started_before_it_to_commit(
    pg_schema: str,
) -> None:
    """A plain INSERT (a slow transaction, or a replica of the previous release) has drawn
    its number but not committed; a revocation after it must not commit first, or a reader
    would move its cursor past the first one's number and never see it."""
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=4)
    store = AuthStore(engine)
    since = datetime.now(UTC) - timedelta(minutes=16)
    try:
        user = await _user(engine)
        start = await store.revoked_page(None, since, 10)
        slow, quick = uuid.uuid4(), uuid.uuid4()
        async with engine.connect() as held:
            await held.execute(
                sa.text(
                    "INSERT INTO revoked_families (family_id, user_id, revoked_at, reason) "
                    "VALUES (:f, :u, now(), 'revoke')"
                ),
                {"f": slow, "u": user},
            )
            second = asyncio.ensure_future(
                store.revoke_family(quick, user, datetime.now(UTC), "revoke")
            )

            async def second_waits_for_the_lock() -> bool:
                async with engine.connect() as conn:
                    waiting = await conn.execute(
                        sa.text(
                            "SELECT count(*) FROM pg_locks WHERE NOT granted "
                            "AND relation = 'revoked_families'::regclass"
                        )
                    )
                    return bool(waiting.scalar_one())

            await wait_until(second_waits_for_the_lock, timeout=10)
            assert not second.done()
            # Readers do not wait, and see neither yet.
            between = await store.revoked_page(start.last, since, 10)
            assert between.families == []
            await held.commit()
        assert await asyncio.wait_for(second, 10)
        after = await store.revoked_page(between.last, since, 10)
        assert [r.family_id for r in after.families] == [slow, quick]
    finally:
        await engine.dispose()


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
async def test_migration_0011_numbers_the_rows_there_before_it(kind: str, tmp_path: Path) -> None:
    if kind == "postgresql":
        url, schema = DATABASE_URL, unique()
    else:
        url, schema = f"sqlite+aiosqlite:///{tmp_path}/auth.db", ""
    await migrate(url, schema=schema, revision="0010")
    engine = create_engine(url, schema=schema, pool_size=1)
    try:
        user = await _user(engine)
        now = datetime.now(UTC)
        before = [uuid.uuid4() for _ in range(3)]
        # The table as 0010 left it: the statement names no seq.
        old_table = sa.table(
            "revoked_families",
            sa.column("family_id", sa.Uuid),
            sa.column("user_id", sa.Uuid),
            sa.column("revoked_at", sa.DateTime(timezone=True)),
            sa.column("reason", sa.String),
        )
        async with engine.begin() as conn:
            for i, family in enumerate(before):
                await conn.execute(
                    old_table.insert().values(
                        family_id=family,
                        user_id=user,
                        revoked_at=now - timedelta(seconds=3 - i),
                        reason="revoke",
                    )
                )
        await migrate(url, schema=schema)
        store = AuthStore(engine)
        later = uuid.uuid4()
        await store.revoke_family(later, user, now, "revoke")
        page = await store.revoked_page(None, now - timedelta(minutes=16), 10)
        listed = [r.family_id for r in page.families]
        assert sorted(listed[:3]) == sorted(before)  # numbered, all below the next one
        assert listed[3] == later

        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.downgrade(_alembic_config(sync), "0010"))
        async with engine.connect() as conn:
            columns = await conn.run_sync(
                lambda sync: {c["name"] for c in sa.inspect(sync).get_columns("revoked_families")}
            )
            count = (
                await conn.execute(sa.text("SELECT count(*) FROM revoked_families"))
            ).scalar_one()
        assert ("seq" in columns, count) == (False, 4)
    finally:
        await engine.dispose()
        if schema:
            await drop_schema(url, schema)
