"""Usernames are case-insensitive and keep their registered spelling: Register, Login, the
login throttle, the unique index that decides races (migration 0008) and that migration's
refusal of existing names that differ only in case. On PostgreSQL and SQLite alike."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane_server.auth.service import AuthService
from fairlane_server.auth.store import AuthStore, UsernameTaken
from fairlane_server.core.db import (
    MigrationRefused,
    _alembic_config,
    create_engine,
    drop_schema,
    migrate,
)
from fairlane_server.core.models import users
from fairlane_server.core.settings import Settings
from tests.conftest import DATABASE_URL, unique

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery"


@dataclass(frozen=True)
class Database:
    url: str
    schema: str

    def engine(self) -> AsyncEngine:
        return create_engine(self.url, schema=self.schema, pool_size=4)


async def _database(kind: str, tmp_path: Path, revision: str = "head") -> Database:
    if kind == "postgresql":
        db = Database(DATABASE_URL, unique())
    else:
        db = Database(f"sqlite+aiosqlite:///{tmp_path}/auth.db", "")
    await migrate(db.url, schema=db.schema, revision=revision)
    return db


async def _drop(db: Database) -> None:
    if db.schema:
        await drop_schema(db.url, db.schema)


@pytest.fixture(params=["postgresql", "sqlite"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    """A database migrated to head, of each kind."""
    database = await _database(request.param, tmp_path)
    try:
        yield database
    finally:
        await _drop(database)


Start = Callable[..., Awaitable[auth_pb2_grpc.AuthServiceStub]]


@pytest.fixture
async def start_auth(db: Database) -> AsyncIterator[Start]:
    """Starts auth replicas on `db`, with settings overridden per test."""
    started: list[tuple[AuthService, grpc.aio.Channel]] = []

    async def start(**overrides: Any) -> auth_pb2_grpc.AuthServiceStub:
        values: dict[str, Any] = {
            "database_url": db.url,
            "database_schema": db.schema,
            "auth_listen": "127.0.0.1:0",
            "service_secret": "the-secret",
            # Addresses come from x-forwarded-for, as behind a load balancer.
            "trusted_proxies": ["127.0.0.0/8"],
        }
        values.update(overrides)
        service = AuthService(Settings(**values))
        await service.start()
        channel = grpc.aio.insecure_channel(service.address)
        started.append((service, channel))
        return auth_pb2_grpc.AuthServiceStub(channel)

    try:
        yield start
    finally:
        for service, channel in started:
            await channel.close()
            await service.stop(1)


async def _code(call: Awaitable[object]) -> str:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return "OK"


def _register(
    stub: auth_pb2_grpc.AuthServiceStub, name: str, address: str = "192.0.2.9"
) -> Awaitable[auth_pb2.RegisterResponse]:
    return stub.Register(  # type: ignore[no-any-return]
        auth_pb2.RegisterRequest(username=name, password=PASSWORD),
        metadata=(("x-forwarded-for", address),),
    )


def _login(
    stub: auth_pb2_grpc.AuthServiceStub, name: str, password: str, address: str = "198.51.100.1"
) -> Awaitable[auth_pb2.LoginResponse]:
    return stub.Login(  # type: ignore[no-any-return]
        auth_pb2.LoginRequest(username=name, password=password),
        metadata=(("x-forwarded-for", address),),
    )


def _variants(name: str) -> list[str]:
    """Alice_3f.., alice_3f.., ALICE_3F..: one name in three cases."""
    return [name, name.lower(), name.upper()]


async def test_a_name_that_differs_only_in_case_is_taken(start_auth: Start) -> None:
    stub = await start_auth()
    name = unique("Alice")
    await _register(stub, name)
    assert [await _code(_register(stub, n)) for n in (*_variants(name), name.swapcase())] == [
        "ALREADY_EXISTS"
    ] * 4


async def test_login_finds_the_user_in_any_case_and_keeps_the_registered_spelling(
    start_auth: Start,
) -> None:
    stub = await start_auth()
    name = unique("Alice")
    registered = await _register(stub, name)
    with capture_logs() as logs:
        login = await _login(stub, name.upper(), PASSWORD)
        assert await _code(_login(stub, name.lower(), "wrong password!")) == "UNAUTHENTICATED"
    claims = jwt.decode(login.access_token, options={"verify_signature": False})
    assert (claims["sub"], claims["name"]) == (registered.user_id, name)
    me = await stub.WhoAmI(
        auth_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {login.access_token}"),)
    )
    assert (me.user_id, me.username) == (registered.user_id, name)
    # Refreshed tokens name the registered spelling too.
    fresh = await stub.Refresh(auth_pb2.RefreshRequest(refresh_token=login.refresh_token))
    assert jwt.decode(fresh.access_token, options={"verify_signature": False})["name"] == name
    # Audit names the user as registered, whatever case was typed.
    audited = [
        (e["event"], e["username"], e.get("user_known"))
        for e in logs
        if e["event"] in {"auth.login.succeeded", "auth.login.failed"}
    ]
    assert audited == [("auth.login.succeeded", name, None), ("auth.login.failed", name, True)]


async def test_case_variants_of_a_name_share_one_throttle_allowance(start_auth: Start) -> None:
    stub = await start_auth(login_user_free_failures=3, throttle_base_delay_seconds=120)
    known = unique("Known")
    await _register(stub, known)
    for name in (known, unique("Unknown")):
        # Each guess in another case and from another address: still one count, so three
        # free failures, a fourth that starts the block, then refusals, as for one spelling.
        spellings = _variants(name) * 2
        codes = [
            await _code(_login(stub, spelled, "wrong password!", f"198.51.100.{10 + i}"))
            for i, spelled in enumerate(spellings)
        ]
        assert codes == ["UNAUTHENTICATED"] * 4 + ["RESOURCE_EXHAUSTED"] * 2, (name, codes)
    # Blocked in every case, the right password too.
    for spelled in _variants(known):
        assert await _code(_login(stub, spelled, PASSWORD, "203.0.113.5")) == "RESOURCE_EXHAUSTED"


async def test_parallel_guesses_in_many_cases_get_only_one_names_free_failures(
    start_auth: Start,
) -> None:
    # Two replicas, 30 guesses at once at one name in three cases, each from its own
    # address: the free failures of one name and the one that starts the block are
    # checked, the rest refused unchecked.
    settings = {"login_user_free_failures": 5, "throttle_base_delay_seconds": 120}
    first, second = await start_auth(**settings), await start_auth(**settings)
    name = unique("Besieged")
    await _register(first, name)
    spellings = _variants(name) * 10
    codes = await asyncio.gather(
        *(
            _code(_login((first, second)[i % 2], spelled, f"guess {i}", f"198.51.100.{100 + i}"))
            for i, spelled in enumerate(spellings)
        )
    )
    assert (codes.count("UNAUTHENTICATED"), codes.count("RESOURCE_EXHAUSTED")) == (6, 24), codes


async def test_concurrent_registrations_of_one_name_in_different_cases_make_one_user(
    start_auth: Start, db: Database
) -> None:
    # Both replicas check that the name is free before hashing the password, so every
    # registration passes that check; the unique index on lower(username) decides.
    first, second = await start_auth(), await start_auth()
    name = unique("Racer")
    spellings = [*_variants(name), name.swapcase()]
    codes = await asyncio.gather(
        *(
            _code(_register((first, second)[i % 2], spelled, f"192.0.2.{20 + i}"))
            for i, spelled in enumerate(spellings)
        )
    )
    assert sorted(codes) == ["ALREADY_EXISTS"] * 3 + ["OK"], codes
    engine = db.engine()
    try:
        async with engine.connect() as conn:
            stored = await conn.execute(
                sa.select(users.c.username).where(sa.func.lower(users.c.username) == name.lower())
            )
            assert [n for (n,) in stored] in ([s] for s in spellings)
    finally:
        await engine.dispose()


async def test_the_database_refuses_a_second_user_differing_only_in_case(db: Database) -> None:
    # Past the store's check, as when two registrations race: the insert itself fails.
    engine = db.engine()
    try:
        store = AuthStore(engine)
        name = unique("Bob")
        now = datetime.now(UTC)
        await store.create_user(name, "x", now)
        for spelled in (name.lower(), name.upper()):
            with pytest.raises(UsernameTaken):
                await store.create_user(spelled, "x", now)
        results = await asyncio.gather(
            *(store.create_user(s, "x", now) for s in _variants(unique("Eve"))),
            return_exceptions=True,
        )
        assert sorted(type(r).__name__ for r in results) == [
            "UUID",
            "UsernameTaken",
            "UsernameTaken",
        ]
        found = await store.user_by_name(name.upper())
        assert found is not None
        assert found.username == name
        assert await store.username_taken(name.swapcase())
    finally:
        await engine.dispose()


async def test_lookups_by_name_use_the_lower_username_index(db: Database) -> None:
    engine = db.engine()
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM users" in statement:
            statements.append((statement, parameters))

    sa.event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        store = AuthStore(engine)
        await store.user_by_name("Nobody")
        await store.username_taken("Nobody")
        sa.event.remove(engine.sync_engine, "before_cursor_execute", record)
        assert len(statements) == 2
        async with engine.connect() as conn:
            for statement, parameters in statements:
                if db.schema:
                    # An empty table: make the planner show whether the index can serve.
                    await conn.exec_driver_sql("SET enable_seqscan = off")
                    plan = await conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
                else:
                    plan = await conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
                text = " ".join(str(v) for row in plan for v in row)
                assert "ix_users_lower_username" in text, (statement, text)
    finally:
        await engine.dispose()


# -- migration 0008 -----------------------------------------------------------------------


async def _insert_users(db: Database, names: list[str]) -> None:
    engine = db.engine()
    try:
        async with engine.begin() as conn:
            await conn.execute(
                users.insert(),
                [
                    {
                        "id": uuid.uuid4(),
                        "username": n,
                        "password_hash": "x",
                        "created_at": datetime.now(UTC),
                    }
                    for n in names
                ],
            )
    finally:
        await engine.dispose()


async def _revision_and_index(db: Database) -> tuple[str, bool]:
    """The schema's revision, and whether it has the index on lower(username)."""
    engine = db.engine()
    try:
        async with engine.connect() as conn:
            revision = (
                await conn.exec_driver_sql("SELECT version_num FROM alembic_version")
            ).scalar_one()
            indexes = (
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
                if db.schema
                else "SELECT name FROM sqlite_master WHERE type = 'index'"
            )
            names = (await conn.exec_driver_sql(indexes)).scalars().all()
        return str(revision), "ix_users_lower_username" in names
    finally:
        await engine.dispose()


async def _downgrade(db: Database, revision: str) -> None:
    from alembic import command

    engine = create_engine(db.url, schema=db.schema, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.downgrade(_alembic_config(sync), revision))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("kind", ["postgresql", "sqlite"])
async def test_the_migration_refuses_names_that_already_differ_only_in_case(
    kind: str, tmp_path: Path
) -> None:
    db = await _database(kind, tmp_path, revision="0007")
    try:
        carol, dave, erin = unique("Carol"), unique("dave"), unique("Erin")
        await _insert_users(db, [carol, carol.lower(), carol.upper(), dave, dave.upper(), erin])
        with pytest.raises(MigrationRefused) as refused:
            await migrate(db.url, schema=db.schema)
        message = str(refused.value)
        assert "differ only in case" in message
        assert "Rename all but one user of each group" in message
        for colliding in (carol, carol.lower(), carol.upper(), dave, dave.upper()):
            assert repr(colliding) in message
        assert erin not in message
        # An operator running `fairlane migrate` reads the message, not a traceback.
        env = {**os.environ, "FAIRLANE_DATABASE_URL": db.url, "FAIRLANE_DATABASE_SCHEMA": db.schema}
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fairlane.cli.main",
            "migrate",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(cli.communicate(), 120)
        assert cli.returncode == 1
        assert err.decode().startswith("fairlane migrate: migration 0008 makes usernames")
        assert "Traceback" not in err.decode()
        # Nothing changed: still at 0007, no index.
        assert await _revision_and_index(db) == ("0007", False)

        # Once an operator resolves them, the migration goes through and the index holds.
        engine = db.engine()
        try:
            async with engine.begin() as conn:
                await conn.execute(users.delete().where(users.c.username == carol.upper()))
                await conn.execute(
                    users.update()
                    .where(users.c.username == carol.lower())
                    .values(username=unique("carol2"))
                )
                await conn.execute(users.delete().where(users.c.username == dave.upper()))
        finally:
            await engine.dispose()
        await migrate(db.url, schema=db.schema)
        revision, indexed = await _revision_and_index(db)
        assert revision != "0007"
        assert indexed
        await _downgrade(db, "0007")
        assert await _revision_and_index(db) == ("0007", False)
        await migrate(db.url, schema=db.schema)
        with pytest.raises(sa.exc.IntegrityError):
            await _insert_users(db, [erin.upper()])
    finally:
        await _drop(db)
