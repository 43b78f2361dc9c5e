"""Fuzz every RPC of the three services, as separate processes: random and hostile messages
built from the protos, mutated encodings and raw bytes, with no token, a junk one, and
user, service and operator tokens.

Asserts: no process dies and all stay SERVING; every status is one of ALLOWED (never
UNKNOWN, never INTERNAL from project code) and no message leaks SQL, paths, class names or
tracebacks; nothing accepted is left QUEUED or RUNNING; the logs stay small.

FAIRLANE_FUZZ_PER_RPC sets the inputs per RPC (`make soak` runs many more).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.queue.v1 import queue_pb2
from fairlane.worker.v1 import worker_pb2
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import requests
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.fuzz import Generator
from tests.e2e.suite import SERVICE_SECRET, Suite, serving, wait_until
from tests.e2e.users import admin_token, new_user

pytestmark = pytest.mark.e2e

PER_RPC = int(os.environ.get("FAIRLANE_FUZZ_PER_RPC", "300"))
SEED = int(os.environ.get("FAIRLANE_FUZZ_SEED", "1303"))
CONCURRENCY = 16
# Every log of the run together stays under this many bytes per call made (a traceback
# per bad message would be about 1 KB each).
LOG_BYTES_PER_CALL = 120

S = grpc.StatusCode
_CODES = {code.value[0]: code for code in S}
ALLOWED = {
    S.OK,
    S.INVALID_ARGUMENT,
    S.NOT_FOUND,
    S.ALREADY_EXISTS,
    S.PERMISSION_DENIED,
    S.UNAUTHENTICATED,
    S.RESOURCE_EXHAUSTED,
    S.FAILED_PRECONDITION,
    S.OUT_OF_RANGE,
    S.UNIMPLEMENTED,
    # The test's own deadline, on streams that are meant to stay open (WatchResults).
    S.DEADLINE_EXCEEDED,
}
LEAK = re.compile(
    r"Traceback|File \"|\.py\b|sqlalchemy|asyncpg|psycopg|\bSELECT\b|\bINSERT\b|\bWHERE\b"
    r"|<class |\w(Error|Exception)\b|0x[0-9a-f]{6,}"
)

# A client that writes into a stream the server has just ended gets this from grpc core
# itself, in place of the server's status (which the server logged).
CORE_WRITE_RACE = "Internal error from Core"

SERVICES = [
    ("auth", auth_pb2.DESCRIPTOR.services_by_name["AuthService"]),
    ("queue", queue_pb2.DESCRIPTOR.services_by_name["QueueService"]),
    ("worker", worker_pb2.DESCRIPTOR.services_by_name["WorkerService"]),
]
# Tokens each RPC is tried with (weights). An operator's Drain would take the worker away
# for good (by design), so Drain only ever gets tokens that must be refused.
TOKENS_BY_ACCESS: dict[str, list[tuple[str, int]]] = {
    "auth": [("none", 6), ("junk", 1), ("user", 2), ("admin", 1)],
    "queue": [("user", 7), ("none", 1), ("junk", 1), ("service", 1), ("admin", 1)],
    "worker": [("admin", 4), ("service", 2), ("user", 2), ("none", 1), ("junk", 1)],
    "Drain": [("user", 3), ("none", 1), ("junk", 1)],
}


def _raw(value: bytes) -> bytes:
    return value


@dataclass
class Finding:
    method: str
    kind: str
    token: str
    code: grpc.StatusCode
    details: str
    data: bytes

    def __str__(self) -> str:
        return (
            f"{self.method} [{self.kind}, token {self.token}] -> {self.code.name} "
            f"{self.details[:300]!r}; input {self.data[:120].hex()} ({len(self.data)} bytes)"
        )


@dataclass
class Tally:
    codes: Counter[tuple[str, str]]
    findings: list[Finding]
    calls: int = 0


@pytest.fixture
async def fuzz_suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    # Retries of `fail` requests end in moments, so nothing is left running at the end.
    s.extra_env.update(FAIRLANE_RETRY_BASE_SECONDS="0.01", FAIRLANE_RETRY_MAX_SECONDS="0.05")
    async with serving(s):
        yield s


async def _service_token(auth_target: str) -> str:
    async with grpc.aio.insecure_channel(auth_target) as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).IssueServiceToken(
            auth_pb2.IssueServiceTokenRequest(service="fuzz-service", secret=SERVICE_SECRET)
        )
        token: str = reply.access_token
        return token


def _metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


class Fuzzer:
    def __init__(self, suite: Suite, tokens: dict[str, str | None], tally: Tally) -> None:
        self.suite = suite
        self.tokens = tokens
        self.tally = tally
        self.gen = Generator(SEED)

    def _token(self, weights: list[tuple[str, int]]) -> str:
        names = [n for n, _ in weights]
        return self.gen.rng.choices(names, weights=[w for _, w in weights])[0]

    def _record(self, finding: Finding, streaming: bool) -> None:
        self.tally.calls += 1
        self.tally.codes[(finding.method, finding.code.name)] += 1
        if streaming and (finding.code, finding.details) == (S.INTERNAL, CORE_WRITE_RACE):
            return
        if finding.code not in ALLOWED or LEAK.search(finding.details):
            self.tally.findings.append(finding)

    async def rpc(self, service: str, channel: grpc.aio.Channel, method: Any) -> None:
        path = f"/{method.containing_service.full_name}/{method.name}"
        weights = TOKENS_BY_ACCESS.get(method.name, TOKENS_BY_ACCESS[service])
        limit = asyncio.Semaphore(CONCURRENCY)

        async def one() -> None:
            token = self._token(weights)
            metadata = _metadata(self.tokens[token])
            count = self.gen.rng.randrange(1, 5) if method.client_streaming else 1
            inputs = [self.gen.encoded(method.input_type) for _ in range(count)]
            kind = "+".join(k for k, _ in inputs)
            data = b"|".join(d for _, d in inputs)
            async with limit:
                code, details = await self._call(channel, path, method, inputs, metadata)
            finding = Finding(method.name, kind, token, code, details, data)
            self._record(finding, method.client_streaming)

        await asyncio.gather(*(one() for _ in range(PER_RPC)))

    async def _call(
        self,
        channel: grpc.aio.Channel,
        path: str,
        method: Any,
        inputs: Sequence[tuple[str, bytes]],
        metadata: tuple[tuple[str, str], ...],
    ) -> tuple[grpc.StatusCode, str]:
        data = inputs[0][1]
        try:
            if method.client_streaming:
                return await self._session(channel, path, inputs, metadata)
            if method.server_streaming:
                call = channel.unary_stream(
                    path, request_serializer=_raw, response_deserializer=_raw
                )
                # A valid watch stays open: the deadline ends it.
                async for _ in call(data, metadata=metadata, timeout=1.5):
                    pass
            else:
                unary = channel.unary_unary(
                    path, request_serializer=_raw, response_deserializer=_raw
                )
                await unary(data, metadata=metadata, timeout=20)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return S.OK, ""

    async def _session(
        self,
        channel: grpc.aio.Channel,
        path: str,
        inputs: Sequence[tuple[str, bytes]],
        metadata: tuple[tuple[str, str], ...],
    ) -> tuple[grpc.StatusCode, str]:
        """Like the Python client: waits for the stream's acceptance before writing (writing
        into a stream the server refused is reported INTERNAL by grpc core itself), and
        checks every Rejected inside the stream like a status."""
        call = channel.stream_stream(path, request_serializer=_raw, response_deserializer=_raw)(
            metadata=metadata, timeout=20
        )
        await call.initial_metadata()
        for _, data in inputs:
            if call.done():
                break
            await call.write(data)
        if not call.done():
            await call.done_writing()
        async for raw in call:
            reply = queue_pb2.SessionResponse.FromString(raw)
            replies = reply.batch.responses if reply.HasField("batch") else [reply]
            for one in replies:
                if one.WhichOneof("kind") == "rejected":
                    code = _CODES[one.rejected.code]
                    if code not in ALLOWED or LEAK.search(one.rejected.message):
                        return code, f"Rejected in the stream: {one.rejected.message}"
        return await call.code(), await call.details() or ""


async def _unfinished(suite: Suite) -> int:
    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            count = await conn.scalar(
                sa.select(sa.func.count()).where(requests.c.status.in_(["QUEUED", "RUNNING"]))
            )
    finally:
        await engine.dispose()
    return int(count or 0)


async def _serving(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _log_bytes(suite: Suite) -> dict[str, int]:
    return {n: (suite.log_dir / f"{n}.log").stat().st_size for n in ("auth", "queue", "worker")}


async def test_fuzz_every_rpc(fuzz_suite: Suite) -> None:
    s = fuzz_suite
    started = time.monotonic()
    _, user = await new_user(s.target("auth"))
    tokens: dict[str, str | None] = {
        "none": None,
        "junk": "eyJhbGciOiJub25lIn0.e30.",
        "user": user,
        "service": await _service_token(s.target("auth")),
        "admin": await admin_token(s.target("auth")),
    }
    logs_before = _log_bytes(s)
    tally = Tally(Counter(), [])
    fuzzer = Fuzzer(s, tokens, tally)
    for service, descriptor in SERVICES:
        async with grpc.aio.insecure_channel(s.target(service)) as channel:
            for method in descriptor.methods:
                await fuzzer.rpc(service, channel, method)

    # Every process alive and serving; an operator resumes whatever the fuzz paused.
    for name, proc in s.procs.items():
        assert proc.poll() is None, f"{name} died ({proc.returncode}):\n{s.log(name)}"
        assert await _serving(s.target(name)), name
    async with grpc.aio.insecure_channel(s.target("worker")) as channel:
        resume = channel.unary_unary(
            "/fairlane.worker.v1.WorkerService/Resume",
            request_serializer=worker_pb2.ResumeRequest.SerializeToString,
            response_deserializer=worker_pb2.ResumeResponse.FromString,
        )
        await resume(worker_pb2.ResumeRequest(), metadata=_metadata(tokens["admin"]), timeout=10)

    async def settled() -> bool:
        return await _unfinished(s) == 0

    await wait_until(settled, 60)
    elapsed = time.monotonic() - started
    grown = {n: size - logs_before[n] for n, size in _log_bytes(s).items()}
    summary = sorted(tally.codes.items())
    print(f"\nfuzz: {tally.calls} calls in {elapsed:.1f}s, log growth {grown}")
    for (rpc, code), count in summary:
        print(f"  {rpc:22} {code:20} {count}")
    # INTERNAL from project code, whatever the client saw: the interceptor logs each.
    problems = [str(f) for f in tally.findings]
    problems += [f"internal_error in the logs: {text}" for text in _internal_errors(s)]
    assert not problems, "\n".join(problems[:40])
    assert sum(grown.values()) < LOG_BYTES_PER_CALL * tally.calls, grown


def _internal_errors(suite: Suite) -> list[str]:
    """Every internal_error line of the run, as "id method error_type: error"."""
    found = []
    for name in ("auth", "queue", "worker"):
        for line in (suite.log_dir / f"{name}.log").read_text(errors="replace").splitlines():
            if '"internal_error"' in line:
                e = json.loads(line)
                found.append(f"{e['error_id']} {e['method']} {e['error_type']}: {e['error'][:300]}")
    return found
