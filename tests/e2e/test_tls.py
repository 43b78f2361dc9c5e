"""The suite on TLS with mTLS between every service (worker/queue -> auth, worker -> queue),
certificates made by the test (tests/certs.py); and the startup refusals of unsafe
configurations."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.client import Client
from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane.worker.v1 import worker_pb2, worker_pb2_grpc
from tests.certs import Authority
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import ROOT, SERVICE_SECRET, Suite, Tls
from tests.e2e.test_bench import _bench
from tests.e2e.test_cli import Cli
from tests.e2e.users import PASSWORD, bearer

pytestmark = pytest.mark.e2e


@pytest.fixture
async def tls_suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path, tls=Tls.make(tmp_path / "pki"))
    try:
        s.start("auth")
        await s.wait_serving("auth")
        s.start("queue")
        await s.wait_serving("queue")
        # After the queue, so the worker's first lane sync (ListLanes over mTLS) must work.
        s.start("worker")
        await s.wait_serving("worker")
        yield s
    finally:
        codes = s.stop_all()
    assert codes == {"worker": 0, "queue": 0, "auth": 0}, {n: s.log(n) for n in codes}


async def test_round_trip_over_mutual_tls(tls_suite: Suite) -> None:
    s = tls_suite
    async with s.channel(s.target("auth")) as ach, s.channel(s.target("queue")) as qch:
        auth = auth_pb2_grpc.AuthServiceStub(ach)
        await auth.Register(auth_pb2.RegisterRequest(username="tls-user", password=PASSWORD))
        login = await auth.Login(auth_pb2.LoginRequest(username="tls-user", password=PASSWORD))
        queue = queue_pb2_grpc.QueueServiceStub(qch)

        async def requests() -> AsyncIterator[queue_pb2.SessionRequest]:
            yield queue_pb2.SessionRequest(
                enqueue=queue_pb2.EnqueueRequest(handler="echo", payload=b"sealed", client_ref="1")
            )

        # The queue verifies the token with keys it fetched from auth over mTLS; the worker
        # found the lane through the queue over mTLS and wrote the result.
        replies = [
            r
            async for r in queue.Session(
                requests(), metadata=bearer(login.access_token), timeout=60
            )
        ]
        results = [r.result for r in replies if r.WhichOneof("kind") == "result"]
        assert [(r.status, r.output) for r in results] == [
            (common_pb2.REQUEST_STATUS_SUCCEEDED, b"sealed")
        ]
        admin = await auth.IssueServiceToken(
            auth_pb2.IssueServiceTokenRequest(
                service="tls-operator",
                secret=SERVICE_SECRET,
                role=auth_pb2.SERVICE_TOKEN_ROLE_ADMIN,
            )
        )
    # The worker verifies an operator's token with keys from auth over mTLS.
    async with s.channel(s.target("worker")) as wch:
        worker = worker_pb2_grpc.WorkerServiceStub(wch)
        status = await worker.GetStatus(
            worker_pb2.GetStatusRequest(), metadata=bearer(admin.access_token), timeout=10
        )
    assert status.state == worker_pb2.WORKER_STATE_RUNNING
    assert len(status.lanes) == 1
    for name in ("queue", "worker"):
        assert "lane_sync_failed" not in s.log(name)
        assert "insecure_plaintext" not in s.log(name)


async def _health(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_only_clients_with_a_certificate_of_the_ca_get_in(
    tls_suite: Suite, tmp_path: Path
) -> None:
    tls = tls_suite.tls
    assert tls is not None
    stranger = Authority(tmp_path / "stranger", "stranger-ca")
    ca = tls.ca.cert.read_bytes()
    stranger_chain, stranger_key = stranger.issue("intruder", server=False).read()
    credentials = {
        "mutual TLS": tls.credentials(),
        "plaintext": None,
        "TLS without a client certificate": grpc.ssl_channel_credentials(ca),
        "a client certificate of another CA": grpc.ssl_channel_credentials(
            ca, stranger_key, stranger_chain
        ),
        "a client that trusts another CA": grpc.ssl_channel_credentials(
            stranger.cert.read_bytes(), *reversed(tls.client.read())
        ),
    }
    for name in ("auth", "queue", "worker"):
        target = tls_suite.target(name)
        codes = {}
        for what, creds in credentials.items():
            channel = (
                grpc.aio.insecure_channel(target)
                if creds is None
                else grpc.aio.secure_channel(target, creds)
            )
            async with channel:
                codes[what] = await _health(channel)
        assert codes == {
            "mutual TLS": grpc.StatusCode.OK,
            "plaintext": grpc.StatusCode.UNAVAILABLE,
            "TLS without a client certificate": grpc.StatusCode.UNAVAILABLE,
            "a client certificate of another CA": grpc.StatusCode.UNAVAILABLE,
            "a client that trusts another CA": grpc.StatusCode.UNAVAILABLE,
        }, name
    # gRPC core logs a failed handshake as a plain line of its own unless told not to: each
    # refused connection above would add one, outside the JSON lines.
    for name in ("auth", "queue", "worker"):
        lines = (tls_suite.log_dir / f"{name}.log").read_text().splitlines()
        plain = [line for line in lines if not line.startswith("{")]
        assert plain == [], name


# -- configurations a service refuses to start with -----------------------------------------


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FAIRLANE_")}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT / "clients"), str(ROOT)])
    return subprocess.run(
        [sys.executable, "-m", "fairlane.cli.main", "serve", "auth"],
        env={**base, "FAIRLANE_AUTH_METRICS_PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def _refusal(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    refused = [e for e in events if e["event"] == "startup_refused"]
    assert len(refused) == 1, proc.stderr
    reason: str = refused[0]["reason"]
    return reason


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({}, "FAIRLANE_SERVICE_SECRET is not set"),
        ({"FAIRLANE_SERVICE_SECRET": "compose-insecure-change-me"}, "is a placeholder"),
        ({"FAIRLANE_SERVICE_SECRET": "short"}, "shorter than 16 characters"),
        (
            {"FAIRLANE_SERVICE_SECRET": SERVICE_SECRET, "FAIRLANE_AUTH_LISTEN": "0.0.0.0:0"},
            "refusing plaintext gRPC listener 0.0.0.0:0: it is not a loopback address",
        ),
        (
            {
                "FAIRLANE_SERVICE_SECRET": SERVICE_SECRET,
                "FAIRLANE_TLS_CERT_FILE": "/nonexistent/cert.pem",
                "FAIRLANE_TLS_KEY_FILE": "/nonexistent/key.pem",
            },
            "cannot read TLS key '/nonexistent/key.pem': No such file or directory",
        ),
    ],
)
async def test_unsafe_configurations_refuse_to_start(env: dict[str, str], reason: str) -> None:
    """Each is refused before any port is bound or backend reached."""
    proc = await asyncio.to_thread(_serve, env)
    assert reason in _refusal(proc)


async def test_client_cli_and_bench_over_mutual_tls(tls_suite: Suite, tmp_path: Path) -> None:
    s = tls_suite
    tls = s.tls
    assert tls is not None
    chain, key = tls.client.read()
    async with Client(
        s.target("auth"),
        s.target("queue"),
        s.target("worker"),
        root_certificates=tls.ca.cert.read_bytes(),
        client_cert=chain,
        client_key=key,
    ) as client:
        await client.register("tls-client", PASSWORD)
        await client.login("tls-client", PASSWORD)
        async with client.session() as session:
            future = await session.submit("echo", b"over mTLS")
            result = await future
        assert result.output == b"over mTLS"
        operator = await client.admin_token("tls-operator", SERVICE_SECRET)
    async with Client(
        s.target("auth"),
        s.target("queue"),
        s.target("worker"),
        root_certificates=tls.ca.cert.read_bytes(),
        client_cert=chain,
        client_key=key,
        tokens=operator,
    ) as admin:
        assert len((await admin.worker_status()).lanes) == 1

    cli = Cli(
        tmp_path / "cli",
        FAIRLANE_CA_FILE=str(tls.ca.cert),
        FAIRLANE_CLIENT_CERT_FILE=str(tls.client.cert),
        FAIRLANE_CLIENT_KEY_FILE=str(tls.client.key),
        FAIRLANE_AUTH_TARGET=s.target("auth"),
        FAIRLANE_QUEUE_TARGET=s.target("queue"),
        FAIRLANE_WORKER_TARGET=s.target("worker"),
    )
    await cli.ok("register", "tls-cli", "--password-stdin", stdin=f"{PASSWORD}\n".encode())
    assert (await cli.json("whoami"))["username"] == "tls-cli"

    code, report, err = await _bench(
        s,
        "--lanes",
        "2",
        "--requests",
        "40",
        "--warmup",
        "0",
        "--ca-file",
        str(tls.ca.cert),
        "--client-cert",
        str(tls.client.cert),
        "--client-key",
        str(tls.client.key),
    )
    assert code == 0, err
    assert report["valid"], report
