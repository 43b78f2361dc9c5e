"""Starts the three services as separate processes on free ports, like an operator would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fairlane.client.channels import CHANNEL_OPTIONS
from tests.certs import Authority, Issued
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
SERVICE_SECRET = "e2e-service-secret"


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float = 30) -> None:
    """Polls external state (a database row, an RPC) until `check` holds or time runs out."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


@dataclass(frozen=True)
class Tls:
    """Certificates for a suite on TLS: every service serves `server`, dials with `ca`
    and presents `server` as its client certificate; `mutual` makes every listener
    require client certificates from `ca`. Test clients present `client`."""

    ca: Authority
    server: Issued
    client: Issued
    mutual: bool = True

    @classmethod
    def make(cls, directory: Path, *, mutual: bool = True) -> Tls:
        ca = Authority(directory)
        return cls(ca, ca.issue("services"), ca.issue("test-client", server=False), mutual)

    def env(self) -> dict[str, str]:
        env = {
            "FAIRLANE_TLS_CERT_FILE": str(self.server.cert),
            "FAIRLANE_TLS_KEY_FILE": str(self.server.key),
            "FAIRLANE_TLS_CA_FILE": str(self.ca.cert),
        }
        if self.mutual:
            env["FAIRLANE_TLS_CLIENT_CA_FILE"] = str(self.ca.cert)
        return env

    def credentials(self, client: Issued | None = None) -> grpc.ChannelCredentials:
        chain, key = (client or self.client).read()
        return grpc.ssl_channel_credentials(self.ca.cert.read_bytes(), key, chain)


@dataclass
class Suite:
    database_url: str
    schema: str
    broker_url: str
    log_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    tls: Tls | None = None

    def __post_init__(self) -> None:
        for name in ("auth", "queue", "worker"):
            self.ports[name] = free_port()

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT / "clients"), str(ROOT)]),
            FAIRLANE_DATABASE_URL=self.database_url,
            FAIRLANE_DATABASE_SCHEMA=self.schema,
            FAIRLANE_BROKER_URL=self.broker_url,
            FAIRLANE_SERVICE_SECRET=SERVICE_SECRET,
            FAIRLANE_AUTH_LISTEN=self.target("auth"),
            FAIRLANE_QUEUE_LISTEN=self.target("queue"),
            FAIRLANE_WORKER_LISTEN=self.target("worker"),
            FAIRLANE_AUTH_TARGET=self.target("auth"),
            FAIRLANE_QUEUE_TARGET=self.target("queue"),
            FAIRLANE_AUTH_METRICS_PORT="0",
            FAIRLANE_QUEUE_METRICS_PORT="0",
            FAIRLANE_WORKER_METRICS_PORT="0",
            FAIRLANE_GRACE_SECONDS="5",
            FAIRLANE_REFLECTION="true",
        )
        if self.tls is not None:
            env.update(self.tls.env())
        env.update(self.extra_env)
        env.update(overrides)
        return env

    def start(self, name: str, service: str | None = None, **env: str) -> None:
        service = service or name
        log = (self.log_dir / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "fairlane.cli.main", "serve", service],
            env=self.env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    async def wait_serving(self, name: str, target: str | None = None, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        async with self.channel(target or self.target(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)}")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not SERVING after {timeout}s:\n{self.log(name)}")
                await asyncio.sleep(0.1)

    def channel(self, target: str) -> grpc.aio.Channel:
        """A test client's channel to `target`: TLS with the client certificate when the
        suite runs on TLS."""
        if self.tls is None:
            return grpc.aio.insecure_channel(target, CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(target, self.tls.credentials(), CHANNEL_OPTIONS)

    def start_worker(self, name: str, **env: str) -> str:
        """Another worker replica on its own port; returns its target."""
        self.ports[name] = free_port()
        self.start(name, "worker", FAIRLANE_WORKER_LISTEN=self.target(name), **env)
        return self.target(name)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stop_all(self) -> dict[str, int]:
        codes = {}
        for name in reversed(list(self.procs)):
            codes[name] = self.stop(name)
        return codes


@contextlib.asynccontextmanager
async def serving(suite: Suite) -> AsyncIterator[Suite]:
    """Runs auth, queue and worker for the block; then stops them all and asserts that
    each exited cleanly (their logs are in the failure message). The three start at once:
    the queue and the worker wait for auth themselves, as they do in a deployment."""
    try:
        suite.start("auth")
        suite.start("queue")
        suite.start("worker")
        await suite.wait_serving("auth")
        await suite.wait_serving("queue")
        await suite.wait_serving("worker")
        yield suite
    finally:
        codes = suite.stop_all()
    assert codes == {"worker": 0, "queue": 0, "auth": 0}, {n: suite.log(n) for n in codes}


@contextlib.asynccontextmanager
async def auth_and_queue(suite: Suite, *, kills: bool = False) -> AsyncIterator[Suite]:
    """Runs auth and one queue replica for the block, and no worker: the test starts the
    worker replicas it needs (Suite.start_worker). Then stops every process and asserts
    that each exited cleanly; with `kills`, one the test killed (SIGKILL) may not have."""
    try:
        suite.start("auth")
        suite.start("queue")
        await suite.wait_serving("auth")
        await suite.wait_serving("queue")
        yield suite
    finally:
        codes = suite.stop_all()
    allowed = (0, -signal.SIGKILL) if kills else (0,)
    bad = {name for name, code in codes.items() if code not in allowed}
    assert not bad, {name: (codes[name], suite.log(name)) for name in bad}
