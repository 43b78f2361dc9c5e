"""Signing keys at rest against real PostgreSQL: clear or encrypted, re-encryption under a
new encryption key, signing-key rotation with encrypted keys, and running replicas
following a rotation and a retirement."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.testing import capture_logs

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane_server.auth import keys
from fairlane_server.auth.service import AuthService
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import signing_keys
from fairlane_server.core.settings import Settings
from tests.conftest import DATABASE_URL, unique
from tests.e2e.suite import ROOT

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery"
KEY_A = "a" * 16 + "-first-encryption-key-0123456789"
KEY_B = "b" * 16 + "-second-encryption-key-987654321"

Run = Callable[..., Awaitable[Any]]


@pytest.fixture
def with_auth(pg_schema: str) -> Run:
    """Runs `body(stub)` against an auth service started with the given settings."""

    async def run(
        body: Callable[[auth_pb2_grpc.AuthServiceStub], Awaitable[Any]],
        dev: bool = False,
        **overrides: Any,
    ) -> Any:
        settings = Settings(
            database_url=DATABASE_URL,
            database_schema=pg_schema,
            auth_listen="127.0.0.1:0",
            **overrides,
        )
        service = AuthService(settings, dev=dev)
        await service.start()
        try:
            async with grpc.aio.insecure_channel(service.address) as channel:
                return await body(auth_pb2_grpc.AuthServiceStub(channel))
        finally:
            await service.stop(1)

    return run


@pytest.fixture
async def rows(pg_schema: str) -> AsyncIterator[Callable[[], Awaitable[list[Any]]]]:
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=1)

    async def read() -> list[Any]:
        async with engine.connect() as conn:
            return list(
                (
                    await conn.execute(sa.select(signing_keys).order_by(signing_keys.c.created_at))
                ).all()
            )

    try:
        yield read
    finally:
        await engine.dispose()


async def _login(stub: auth_pb2_grpc.AuthServiceStub) -> str:
    name = unique("keys")
    await stub.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
    login = await stub.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    return str(login.access_token)


async def _whoami(stub: auth_pb2_grpc.AuthServiceStub, token: str) -> str:
    me = await stub.WhoAmI(
        auth_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {token}"),)
    )
    return str(me.username)


def _opens(pem: str, secret: str | None) -> bool:
    try:
        serialization.load_pem_private_key(
            pem.encode(), password=secret.encode() if secret else None
        )
    except (ValueError, TypeError):
        return False
    return True


async def test_without_an_encryption_key_keys_stay_clear_with_a_warning(
    with_auth: Run, rows: Callable[[], Awaitable[list[Any]]]
) -> None:
    with capture_logs() as logs:
        await with_auth(_login)
    assert "signing_keys_unencrypted" in [e["event"] for e in logs]
    (row,) = await rows()
    assert _opens(row.private_pem, None)
    with capture_logs() as logs:
        await with_auth(_login, dev=True)
    assert "signing_keys_unencrypted" not in [e["event"] for e in logs]


async def test_keys_are_encrypted_and_a_clear_key_is_encrypted_in_place(
    with_auth: Run, rows: Callable[[], Awaitable[list[Any]]], tmp_path: Path
) -> None:
    token = await with_auth(_login)
    (clear,) = await rows()

    key_file = tmp_path / "signing.key"
    key_file.write_text(KEY_A + "\n")

    async def still_verifies(stub: auth_pb2_grpc.AuthServiceStub) -> None:
        assert await _whoami(stub, token)
        assert await _whoami(stub, await _login(stub))

    with capture_logs() as logs:
        await with_auth(still_verifies, signing_key_encryption_key_file=str(key_file))
    assert "signing_keys_unencrypted" not in [e["event"] for e in logs]
    (row,) = await rows()
    assert row.kid == clear.kid
    assert row.private_pem.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert not _opens(row.private_pem, None)
    assert _opens(row.private_pem, KEY_A)


async def test_a_new_encryption_key_takes_over_from_the_previous_one(
    with_auth: Run, rows: Callable[[], Awaitable[list[Any]]]
) -> None:
    token = await with_auth(_login, signing_key_encryption_key=KEY_A)

    async def verifies(stub: auth_pb2_grpc.AuthServiceStub) -> None:
        assert await _whoami(stub, token)

    await with_auth(
        verifies, signing_key_encryption_key=KEY_B, signing_key_previous_encryption_keys=[KEY_A]
    )
    (row,) = await rows()
    assert _opens(row.private_pem, KEY_B)
    assert not _opens(row.private_pem, KEY_A)
    await with_auth(verifies, signing_key_encryption_key=KEY_B)

    # A key nobody can open stops auth from starting, rather than signing with a new one.
    with pytest.raises(keys.SigningKeyError, match="none of the configured encryption keys"):
        await with_auth(verifies, signing_key_encryption_key=KEY_A)
    with pytest.raises(keys.SigningKeyError, match="none of the configured encryption keys"):
        await with_auth(verifies)


def test_a_short_encryption_key_is_refused() -> None:
    with pytest.raises(keys.SigningKeyError, match="at least 32"):
        keys.KeyEncryption.from_settings(
            Settings(signing_key_encryption_key=SecretStr("too-short"))
        )


async def _age(engine: AsyncEngine, kid: str, seconds: float) -> None:
    """Moves a key's creation back, as if `seconds` had passed since."""
    async with engine.begin() as conn:
        await conn.execute(
            signing_keys.update()
            .where(signing_keys.c.kid == kid)
            .values(created_at=signing_keys.c.created_at - timedelta(seconds=seconds))
        )


async def test_signing_key_rotation_with_encrypted_keys(
    with_auth: Run, rows: Callable[[], Awaitable[list[Any]]], pg_schema: str
) -> None:
    old_token = await with_auth(_login, signing_key_encryption_key=KEY_A)
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=1)
    try:
        rotated = await keys.rotate(engine, keys.KeyEncryption(KEY_A.encode()), reload_seconds=5)
        new_kid = rotated.kid
        assert (rotated.signs_from - rotated.created_at).total_seconds() == keys.sign_delay(5)

        async def signs_with(stub: auth_pb2_grpc.AuthServiceStub) -> tuple[str, set[str]]:
            new_token = await _login(stub)
            assert await _whoami(stub, old_token)
            assert await _whoami(stub, new_token)
            jwks = json.loads((await stub.GetJwks(auth_pb2.GetJwksRequest())).keys_json)
            return jwt.get_unverified_header(new_token)["kid"], {k["kid"] for k in jwks["keys"]}

        # Published at once, not signed with before it is ready, even by a replica that
        # starts after the rotation.
        old, _ = await rows()
        assert await with_auth(signs_with, signing_key_encryption_key=KEY_A) == (
            old.kid,
            {old.kid, new_kid},
        )
        await _age(engine, new_kid, keys.sign_delay(5))
        assert await with_auth(signs_with, signing_key_encryption_key=KEY_A) == (
            new_kid,
            {old.kid, new_kid},
        )
        for row in await rows():
            assert _opens(row.private_pem, KEY_A)
            assert not _opens(row.private_pem, None)

        assert await keys.retire(engine, old.kid)
        assert not await keys.retire(engine, old.kid)  # once

        async def old_refused(stub: auth_pb2_grpc.AuthServiceStub) -> set[str]:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _whoami(stub, old_token)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            jwks = json.loads((await stub.GetJwks(auth_pb2.GetJwksRequest())).keys_json)
            return {k["kid"] for k in jwks["keys"]}

        assert await with_auth(old_refused, signing_key_encryption_key=KEY_A) == {new_kid}
    finally:
        await engine.dispose()


async def test_replicas_follow_a_rotation_and_a_retirement_while_running(pg_schema: str) -> None:
    """Two key rings on one database, as two running replicas: a rotation is published by
    both within a reload and signed with by both once ready; a retirement is dropped by
    both within a reload. Each change calls on_change (the replica's own verifier)."""
    engine = create_engine(DATABASE_URL, schema=pg_schema, pool_size=2)
    reload = 0.2
    rings = [keys.KeyRing(engine, keys.KeyEncryption(), reload_seconds=reload) for _ in range(2)]
    changes = [0, 0]
    try:
        for i, ring in enumerate(rings):

            async def changed(i: int = i) -> None:
                changes[i] += 1

            await ring.load_first()
            ring.on_change = changed
            ring.start()
        first = rings[0].signer.kid
        assert rings[1].signer.kid == first

        rotated = await keys.rotate(engine, reload_seconds=reload)
        began = time.monotonic()

        async def published_everywhere() -> bool:
            return all({k["kid"] for k in r.published} == {first, rotated.kid} for r in rings)

        await wait_for(published_everywhere, 5)
        published_after = time.monotonic() - began
        assert published_after < 2 * reload + 1, published_after
        assert [r.signer.kid for r in rings] == [first, first]  # not ready yet

        async def signing_everywhere() -> bool:
            return all(r.signer.kid == rotated.kid for r in rings)

        await wait_for(signing_everywhere, keys.sign_delay(reload) + 5)
        switched_after = time.monotonic() - began
        assert switched_after >= keys.sign_delay(reload) - 0.5, switched_after

        assert await keys.retire(engine, first)

        async def retired_everywhere() -> bool:
            return all([k["kid"] for k in r.published] == [rotated.kid] for r in rings)

        await wait_for(retired_everywhere, 2 * reload + 1)
        assert changes == [2, 2]

        # Every key retired (not through the CLI, which refuses): the replicas make a new
        # one rather than go on with a retired key, and agree on which to sign with.
        assert await keys.retire(engine, rotated.kid)

        async def replaced_everywhere() -> bool:
            kids = {r.signer.kid for r in rings}
            return (
                len(kids) == 1
                and rotated.kid not in kids
                and (all(rotated.kid not in {k["kid"] for k in r.published} for r in rings))
            )

        await wait_for(replaced_everywhere, 4 * reload + 2)
    finally:
        for ring in rings:
            await ring.stop()
        await engine.dispose()


async def wait_for(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fairlane.cli.main",
        "keys",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_rotate_refuses_settings_the_replicas_cannot_open(
    with_auth: Run, rows: Callable[[], Awaitable[list[Any]]], pg_schema: str
) -> None:
    """A key added under another encryption key than the replicas' would become the one
    they sign with and could not open: `fairlane keys rotate` refuses, adding nothing."""

    async def nothing(stub: auth_pb2_grpc.AuthServiceStub) -> None:
        return None

    await with_auth(nothing, signing_key_encryption_key=SecretStr(KEY_A))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "clients"), str(ROOT)]),
        "FAIRLANE_DATABASE_URL": DATABASE_URL,
        "FAIRLANE_DATABASE_SCHEMA": pg_schema,
    }
    for other in ({}, {"FAIRLANE_SIGNING_KEY_ENCRYPTION_KEY": KEY_B}):
        code, _, err = await _cli({**env, **other}, "rotate")
        assert code == 1, err
        assert "the auth replicas' settings" in err, err
        assert "Traceback" not in err
    assert len(await rows()) == 1
    code, _, err = await _cli({**env, "FAIRLANE_SIGNING_KEY_ENCRYPTION_KEY": KEY_A}, "rotate")
    assert code == 0, err
    assert len(await rows()) == 2
    # A wrong schema, or a URL that is none: one line, no traceback.
    for bad in (
        {"FAIRLANE_DATABASE_SCHEMA": unique("none")},
        {"FAIRLANE_DATABASE_URL": "bogus://"},
    ):
        code, _, err = await _cli({**env, **bad}, "list")
        assert code == 1, err
        assert err.startswith("fairlane keys list: "), err
        assert "Traceback" not in err
