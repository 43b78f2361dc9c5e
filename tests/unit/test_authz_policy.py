"""The authorization policy covers every RPC, and the interceptor enforces it.

The interceptor runs in a real grpc.aio server on loopback, with a real TokenVerifier
over a key made here: no broker or database is involved.
"""

from __future__ import annotations

import importlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from jwt.algorithms import OKPAlgorithm

from fairlane_server.core import authz
from fairlane_server.core.authz import POLICY, Access, AuthzInterceptor
from fairlane_server.core.tokens import ROLE_ADMIN, ROLE_SERVICE, ROLE_USER, TokenVerifier

# Every proto file of the project (found, not listed: a new file's services count too),
# plus health and reflection, which GrpcHost adds to every server.
PROTO_ROOT = Path(__file__).resolve().parents[2] / "clients" / "fairlane"


def _served() -> list[FileDescriptor]:
    files: list[FileDescriptor] = [health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]
    for path in sorted(PROTO_ROOT.glob("*/v1/*_pb2.py")):
        module = importlib.import_module(f"fairlane.{path.parent.parent.name}.v1.{path.stem}")
        files.append(module.DESCRIPTOR)
    return files


def _methods() -> Iterator[str]:
    for file in _served():
        for service in file.services_by_name.values():
            for method in service.methods:
                yield f"/{service.full_name}/{method.name}"


def test_every_rpc_has_exactly_one_policy_row() -> None:
    methods = set(_methods())
    missing = sorted(methods - POLICY.keys())
    stale = sorted(POLICY.keys() - methods)
    assert not missing, f"RPCs without an authorization policy row: {missing}"
    assert not stale, f"policy rows for RPCs no proto defines: {stale}"


def test_control_and_lane_listing_are_never_for_users() -> None:
    for method in (
        "/fairlane.worker.v1.WorkerService/Pause",
        "/fairlane.worker.v1.WorkerService/Resume",
        "/fairlane.worker.v1.WorkerService/Drain",
        "/fairlane.queue.v1.QueueService/ListLanes",
    ):
        assert ROLE_USER not in authz.ROLES[POLICY[method]], method


# -- the interceptor in a real server ------------------------------------------------------

ISSUER = AUDIENCE = "fairlane-test"
TEST_SERVICE = "fairlane.test.Probe"


class Keys:
    def __init__(self) -> None:
        self.private = Ed25519PrivateKey.generate()
        self.kid = uuid.uuid4().hex
        jwk = json.loads(OKPAlgorithm.to_jwk(self.private.public_key()))
        jwk.update(kid=self.kid, alg="EdDSA", use="sig")
        self.jwks = json.dumps({"keys": [jwk]})

    def token(self, role: str, subject: str = "", **changes: Any) -> str:
        now = datetime.now(UTC)
        claims: dict[str, Any] = {
            "sub": subject or str(uuid.uuid4()),
            "name": "someone",
            "role": role,
            "iss": ISSUER,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + timedelta(minutes=5),
        }
        claims.update(changes)
        return jwt.encode(claims, self.private, algorithm="EdDSA", headers={"kid": self.kid})


def _whoami(request: bytes, context: Any) -> bytes:
    found = authz.principal()
    return f"{found.role}:{found.user_id}".encode()


async def _whoami_async(request: bytes, context: Any) -> bytes:
    return _whoami(request, context)


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield _whoami(request, context)


async def _count(requests: AsyncIterator[bytes], context: Any) -> bytes:
    seen = [r async for r in requests]
    return f"{authz.principal().role}:{len(seen)}".encode()


def _identity(value: bytes) -> bytes:
    return value


POLICY_UNDER_TEST = {
    f"/{TEST_SERVICE}/Open": Access.OPEN,
    f"/{TEST_SERVICE}/Anyone": Access.AUTHENTICATED,
    f"/{TEST_SERVICE}/User": Access.USER,
    f"/{TEST_SERVICE}/Service": Access.SERVICE,
    f"/{TEST_SERVICE}/Admin": Access.ADMIN,
    f"/{TEST_SERVICE}/Stream": Access.USER,
    f"/{TEST_SERVICE}/Upload": Access.SERVICE,
    # "/Unlisted" is registered below but has no row.
}


@pytest.fixture
async def probe() -> AsyncIterator[tuple[grpc.aio.Channel, Keys]]:
    keys = Keys()

    async def jwks() -> str:
        return keys.jwks

    verifier = TokenVerifier(jwks, issuer=ISSUER, audience=AUDIENCE)
    server = grpc.aio.server(interceptors=[AuthzInterceptor(POLICY_UNDER_TEST, verifier)])
    unary = {
        name: grpc.unary_unary_rpc_method_handler(
            _whoami_async if name != "Open" else _open,
            request_deserializer=_identity,
            response_serializer=_identity,
        )
        for name in ("Open", "Anyone", "User", "Service", "Admin", "Unlisted")
    }
    unary["Stream"] = grpc.unary_stream_rpc_method_handler(
        _stream, request_deserializer=_identity, response_serializer=_identity
    )
    unary["Upload"] = grpc.stream_unary_rpc_method_handler(
        _count, request_deserializer=_identity, response_serializer=_identity
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(TEST_SERVICE, unary)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, keys
    finally:
        await server.stop(None)


async def _open(request: bytes, context: Any) -> bytes:
    with pytest.raises(LookupError):
        authz.principal()
    return b"open"


def _auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def _call(
    channel: grpc.aio.Channel, method: str, token: str | None = None
) -> tuple[grpc.StatusCode, bytes]:
    call = channel.unary_unary(f"/{TEST_SERVICE}/{method}")
    try:
        reply = await call(b"x", metadata=_auth(token) if token else None, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), (exc.details() or "").encode()
    return grpc.StatusCode.OK, reply


@pytest.mark.parametrize(
    ("method", "role", "allowed"),
    [
        ("Anyone", ROLE_USER, True),
        ("Anyone", ROLE_SERVICE, True),
        ("Anyone", ROLE_ADMIN, True),
        ("User", ROLE_USER, True),
        ("User", ROLE_SERVICE, False),
        ("User", ROLE_ADMIN, False),
        ("Service", ROLE_USER, False),
        ("Service", ROLE_SERVICE, True),
        ("Service", ROLE_ADMIN, True),
        ("Admin", ROLE_USER, False),
        ("Admin", ROLE_SERVICE, False),
        ("Admin", ROLE_ADMIN, True),
    ],
)
async def test_roles_per_access_level(
    probe: tuple[grpc.aio.Channel, Keys], method: str, role: str, allowed: bool
) -> None:
    channel, keys = probe
    subject = f"{role}:{uuid.uuid4().hex}"
    code, reply = await _call(channel, method, keys.token(role, subject))
    if allowed:
        assert (code, reply) == (grpc.StatusCode.OK, f"{role}:{subject}".encode())
    else:
        assert code == grpc.StatusCode.PERMISSION_DENIED
        access = POLICY_UNDER_TEST[f"/{TEST_SERVICE}/{method}"]
        assert reply == f"this call needs a {access.value} token".encode()


async def test_tokens_that_do_not_authenticate(probe: tuple[grpc.aio.Channel, Keys]) -> None:
    channel, keys = probe
    other = Keys()
    expired = keys.token(ROLE_ADMIN, exp=datetime.now(UTC) - timedelta(minutes=1))
    hs256 = jwt.encode(
        {"sub": "x", "role": ROLE_ADMIN}, "k" * 32, algorithm="HS256", headers={"kid": keys.kid}
    )
    for token in (None, "junk", expired, other.token(ROLE_ADMIN), hs256):
        code, _ = await _call(channel, "Admin", token)
        assert code == grpc.StatusCode.UNAUTHENTICATED, token


async def test_a_header_naming_another_algorithm_is_refused_cleanly(
    probe: tuple[grpc.aio.Channel, Keys],
) -> None:
    channel, keys = probe
    header = jwt.utils.base64url_encode(
        json.dumps({"alg": "RS256", "kid": keys.kid, "typ": "JWT"}).encode()
    )
    body = jwt.utils.base64url_encode(b'{"sub":"x","role":"admin"}')
    forged = b".".join([header, body, jwt.utils.base64url_encode(b"junk-signature")]).decode()
    code, details = await _call(channel, "Admin", forged)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert b"Error" not in details
    assert b"PEM" not in details


async def test_open_methods_need_no_token_and_unlisted_ones_do_not_exist(
    probe: tuple[grpc.aio.Channel, Keys],
) -> None:
    channel, keys = probe
    assert await _call(channel, "Open") == (grpc.StatusCode.OK, b"open")
    unlisted = await _call(channel, "Unlisted", keys.token(ROLE_ADMIN))
    missing = await _call(channel, "NoSuchMethod", keys.token(ROLE_ADMIN))
    assert unlisted[0] == grpc.StatusCode.UNIMPLEMENTED
    assert unlisted == missing, "an unlisted method must look like a missing one"


async def test_streams_see_the_principal(probe: tuple[grpc.aio.Channel, Keys]) -> None:
    channel, keys = probe
    stream = channel.unary_stream(f"/{TEST_SERVICE}/Stream")
    user = str(uuid.uuid4())
    replies = [r async for r in stream(b"x", metadata=_auth(keys.token(ROLE_USER, user)))]
    assert replies == [f"user:{user}".encode()] * 3

    upload = channel.stream_unary(f"/{TEST_SERVICE}/Upload")
    reply = await upload(iter([b"a", b"b"]), metadata=_auth(keys.token(ROLE_SERVICE)))
    assert reply == b"service:2"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await upload(iter([b"a"]), metadata=_auth(keys.token(ROLE_USER)))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_keys_unavailable_is_retryable_not_a_bad_token() -> None:
    async def unreachable() -> str:
        raise ConnectionError("auth is down")

    verifier = TokenVerifier(unreachable, issuer=ISSUER, audience=AUDIENCE)
    server = grpc.aio.server(interceptors=[AuthzInterceptor(POLICY_UNDER_TEST, verifier)])
    handlers = {
        "Anyone": grpc.unary_unary_rpc_method_handler(
            _whoami_async, request_deserializer=_identity, response_serializer=_identity
        )
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(TEST_SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            code, details = await _call(channel, "Anyone", Keys().token(ROLE_ADMIN))
    finally:
        await server.stop(None)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == b"token keys are unavailable, try again"


def test_docs_table_is_the_policy() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    rows = dict(re.findall(r"^\| `(/[\w.]+/\w+)` \| (\w+) \|$", doc, flags=re.MULTILINE))
    assert rows == {method: access.value for method, access in POLICY.items()}
