"""AuthService in process against real PostgreSQL: users, passwords, token rotation."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import grpc
import jwt
import pytest
from prometheus_client import REGISTRY

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane_server.auth.service import AuthService
from fairlane_server.core.settings import Settings
from tests.conftest import DATABASE_URL, unique

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery"


@pytest.fixture
async def auth(pg_schema: str) -> AsyncIterator[auth_pb2_grpc.AuthServiceStub]:
    settings = Settings(
        database_url=DATABASE_URL,
        database_schema=pg_schema,
        auth_listen="127.0.0.1:0",
        service_secret="the-secret",
        # Strict rotation here; the reuse interval has its own tests (test_auth_security).
        refresh_reuse_interval_seconds=0,
    )
    service = AuthService(settings)
    await service.start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            yield auth_pb2_grpc.AuthServiceStub(channel)
    finally:
        await service.stop(1)


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_register_login_whoami(auth: auth_pb2_grpc.AuthServiceStub) -> None:
    name = unique("alice")
    reg = await auth.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
    login = await auth.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    assert login.expires_in == 900
    me = await auth.WhoAmI(
        auth_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {login.access_token}"),)
    )
    assert (me.user_id, me.username) == (reg.user_id, name)

    jwks = json.loads((await auth.GetJwks(auth_pb2.GetJwksRequest())).keys_json)
    header = jwt.get_unverified_header(login.access_token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] in {k["kid"] for k in jwks["keys"]}
    assert all("d" not in k for k in jwks["keys"]), "private key material published"


@pytest.mark.parametrize(
    ("username", "password", "code"),
    [
        ("", PASSWORD, grpc.StatusCode.INVALID_ARGUMENT),
        ("ab", PASSWORD, grpc.StatusCode.INVALID_ARGUMENT),
        ("has space", PASSWORD, grpc.StatusCode.INVALID_ARGUMENT),
        ("bob", "", grpc.StatusCode.INVALID_ARGUMENT),
        ("bob", "short", grpc.StatusCode.INVALID_ARGUMENT),
        ("bob", "aaaaaaaaaaaa", grpc.StatusCode.INVALID_ARGUMENT),
        ("bob", "x" * 2000, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_register_rejects_bad_input(
    auth: auth_pb2_grpc.AuthServiceStub, username: str, password: str, code: grpc.StatusCode
) -> None:
    assert (
        await _code(auth.Register(auth_pb2.RegisterRequest(username=username, password=password)))
        == code
    )


async def test_duplicate_wrong_password_unknown_user(auth: auth_pb2_grpc.AuthServiceStub) -> None:
    name = unique("carol")
    await auth.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
    dup = auth.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
    assert await _code(dup) == grpc.StatusCode.ALREADY_EXISTS
    wrong = auth.Login(auth_pb2.LoginRequest(username=name, password="wrong password"))
    assert await _code(wrong) == grpc.StatusCode.UNAUTHENTICATED
    unknown = auth.Login(auth_pb2.LoginRequest(username="nobody-here", password=PASSWORD))
    assert await _code(unknown) == grpc.StatusCode.UNAUTHENTICATED
    empty = auth.Login(auth_pb2.LoginRequest())
    assert await _code(empty) == grpc.StatusCode.UNAUTHENTICATED
    assert await _code(auth.WhoAmI(auth_pb2.WhoAmIRequest())) == grpc.StatusCode.UNAUTHENTICATED


async def test_refresh_rotates_and_reuse_revokes_the_family(
    auth: auth_pb2_grpc.AuthServiceStub,
) -> None:
    name = unique("dave")
    await auth.Register(auth_pb2.RegisterRequest(username=name, password=PASSWORD))
    first = await auth.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    second = await auth.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token))
    assert second.refresh_token != first.refresh_token
    third = await auth.Refresh(auth_pb2.RefreshRequest(refresh_token=second.refresh_token))

    # Replaying a spent token revokes every token of that login, even the newest.
    replay = auth.Refresh(auth_pb2.RefreshRequest(refresh_token=first.refresh_token))
    assert await _code(replay) == grpc.StatusCode.UNAUTHENTICATED
    newest = auth.Refresh(auth_pb2.RefreshRequest(refresh_token=third.refresh_token))
    assert await _code(newest) == grpc.StatusCode.UNAUTHENTICATED

    # Another login is a separate family; Revoke ends it.
    other = await auth.Login(auth_pb2.LoginRequest(username=name, password=PASSWORD))
    await auth.Revoke(auth_pb2.RevokeRequest(refresh_token=other.refresh_token))
    after = auth.Refresh(auth_pb2.RefreshRequest(refresh_token=other.refresh_token))
    assert await _code(after) == grpc.StatusCode.UNAUTHENTICATED
    garbage = auth.Refresh(auth_pb2.RefreshRequest(refresh_token="nope"))
    assert await _code(garbage) == grpc.StatusCode.UNAUTHENTICATED
    missing = auth.Refresh(auth_pb2.RefreshRequest())
    assert await _code(missing) == grpc.StatusCode.INVALID_ARGUMENT


async def test_service_token_needs_the_secret(auth: auth_pb2_grpc.AuthServiceStub) -> None:
    good = await auth.IssueServiceToken(
        auth_pb2.IssueServiceTokenRequest(service="worker", secret="the-secret")
    )
    assert jwt.decode(good.access_token, options={"verify_signature": False})["role"] == "service"
    bad = auth.IssueServiceToken(auth_pb2.IssueServiceTokenRequest(service="worker", secret="x"))
    assert await _code(bad) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("role", "issued"),
    [
        (auth_pb2.SERVICE_TOKEN_ROLE_UNSPECIFIED, "service"),
        (auth_pb2.SERVICE_TOKEN_ROLE_SERVICE, "service"),
        (auth_pb2.SERVICE_TOKEN_ROLE_ADMIN, "admin"),
        (7, None),
        (-1, None),
    ],
)
async def test_service_token_roles_are_known_ones(
    auth: auth_pb2_grpc.AuthServiceStub, role: int, issued: str | None
) -> None:
    request = auth_pb2.IssueServiceTokenRequest(service="worker", secret="the-secret", role=role)  # type: ignore[arg-type]
    if issued is not None:
        reply = await auth.IssueServiceToken(request)
        claims = jwt.decode(reply.access_token, options={"verify_signature": False})
        assert (claims["role"], claims["sub"]) == (issued, f"{issued}:worker")
        return
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await auth.IssueServiceToken(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"unknown role {role}" in (refused.value.details() or "")


def _handled(method: str, code: str) -> float:
    value = REGISTRY.get_sample_value(
        "fairlane_grpc_server_handled_total",
        {"grpc_service": "fairlane.auth.v1.AuthService", "grpc_method": method, "grpc_code": code},
    )
    return value or 0.0


async def test_grpc_server_metrics_count_calls_by_method_and_code(
    auth: auth_pb2_grpc.AuthServiceStub,
) -> None:
    ok_before = _handled("GetJwks", "OK")
    denied_before = _handled("Login", "UNAUTHENTICATED")
    latency_before = (
        REGISTRY.get_sample_value(
            "fairlane_grpc_server_handling_seconds_count",
            {"grpc_service": "fairlane.auth.v1.AuthService", "grpc_method": "GetJwks"},
        )
        or 0.0
    )
    await auth.GetJwks(auth_pb2.GetJwksRequest())
    await auth.GetJwks(auth_pb2.GetJwksRequest())
    assert (
        await _code(auth.Login(auth_pb2.LoginRequest(username="nobody", password="x" * 10)))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    assert _handled("GetJwks", "OK") == ok_before + 2
    # abort() sends the status before the server's coroutine goes on to count it, and this
    # server runs in the test's own loop: the count may land a turn after the answer.
    for _ in range(500):
        if _handled("Login", "UNAUTHENTICATED") != denied_before:
            break
        await asyncio.sleep(0.01)
    assert _handled("Login", "UNAUTHENTICATED") == denied_before + 1
    latency_after = REGISTRY.get_sample_value(
        "fairlane_grpc_server_handling_seconds_count",
        {"grpc_service": "fairlane.auth.v1.AuthService", "grpc_method": "GetJwks"},
    )
    assert latency_after == latency_before + 2
