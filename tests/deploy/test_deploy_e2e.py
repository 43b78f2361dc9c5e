"""The deploy files driving the real services (marked e2e: they need working services,
RabbitMQ on 127.0.0.1:5672 and PostgreSQL on 127.0.0.1:5432).

- supervisord (deploy/supervisor/supervisord.conf) starts auth, queue and worker on
  loopback; all reach SERVING on grpc.health.v1, serve /metrics, and stop cleanly.
- Envoy (deploy/envoy/envoy.yaml) in front of two real queue replicas: both get sessions,
  and a bounded burst past the budget gets RESOURCE_EXHAUSTED.

Each test has its own PostgreSQL schema (migrated with `fairlane migrate`, dropped after),
its own RabbitMQ vhost and free ports, and stops everything it starts.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from tests.deploy.lb import burst, envoy_config, http_get, metadata_of, run_envoy, stop
from tests.deploy.support import (
    DEPLOY,
    Backends,
    fairlane_bin,
    metric_families,
    run,
    service_env,
    tool,
    wait_serving,
)
from tests.ports import free_ports

pytestmark = pytest.mark.e2e

SUPERVISOR_CONF = DEPLOY / "supervisor" / "supervisord.conf"
GRPC_SERVICES = {
    "auth": "fairlane.auth.v1.AuthService",
    "queue": "fairlane.queue.v1.QueueService",
    "worker": "fairlane.worker.v1.WorkerService",
}


# --- supervisord ---------------------------------------------------------------------------


@dataclass
class Supervised:
    run_dir: Path
    env: dict[str, str]
    grpc: dict[str, int]
    metrics: dict[str, int]
    proc: subprocess.Popen[bytes]

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [tool("supervisorctl"), "-c", str(SUPERVISOR_CONF), *args]
        return run(cmd, env=self.env, check=check, timeout=90)

    def logs(self) -> str:
        out = []
        for name in ("console", "supervisord", "auth", "queue", "worker"):
            path = self.run_dir / f"{name}.log"
            if path.exists():
                out.append(f"--- {name}.log\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    run_dir = tmp_path_factory.mktemp("supervisor")
    backends = Backends()
    try:
        ports = free_ports(6)
        grpc_ports = dict(zip(GRPC_SERVICES, ports[:3], strict=True))
        metrics_ports = dict(zip(GRPC_SERVICES, ports[3:], strict=True))
        env = service_env(
            FAIRLANE_RUN_DIR=str(run_dir),
            FAIRLANE_SERVICE_SECRET=secrets.token_urlsafe(24),
            FAIRLANE_METRICS_HOST="127.0.0.1",
            FAIRLANE_GRACE_SECONDS="5",
            FAIRLANE_REFLECTION="true",
            **backends.settings,
            **{f"FAIRLANE_{n.upper()}_LISTEN": f"127.0.0.1:{p}" for n, p in grpc_ports.items()},
            **{f"FAIRLANE_{n.upper()}_METRICS_PORT": str(p) for n, p in metrics_ports.items()},
            FAIRLANE_AUTH_TARGET=f"127.0.0.1:{grpc_ports['auth']}",
            FAIRLANE_QUEUE_TARGET=f"127.0.0.1:{grpc_ports['queue']}",
        )
        backends.migrate(env)
        with (run_dir / "console.log").open("wb") as console:
            proc = subprocess.Popen(
                [tool("supervisord"), "-n", "-c", str(SUPERVISOR_CONF)],
                env=env,
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        stack = Supervised(run_dir, env, grpc_ports, metrics_ports, proc)
        try:
            deadline = time.monotonic() + 30
            while not (run_dir / "supervisor.sock").exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"supervisord did not start ({proc.poll()}):\n{stack.logs()}")
                time.sleep(0.1)
            for name, port in grpc_ports.items():
                wait_serving(f"127.0.0.1:{port}", GRPC_SERVICES[name], logs=stack.logs)
            yield stack
        finally:
            if proc.poll() is None:
                stack.ctl("shutdown", check=False)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    finally:
        backends.close()


def test_supervisord_runs_all_three_serving(supervised: Supervised) -> None:
    # supervisord calls a program RUNNING once it has stayed up for startsecs (3 s), which
    # may be after the services already answer SERVING.
    deadline = time.monotonic() + 15
    status = supervised.ctl("status").stdout
    while status.count("RUNNING") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        status = supervised.ctl("status").stdout
    for name in GRPC_SERVICES:
        assert f"fairlane:{name}" in status
    assert status.count("RUNNING") == 3, status
    for name, port in supervised.grpc.items():
        target = f"127.0.0.1:{port}"
        wait_serving(target, "", timeout=5)
        wait_serving(target, GRPC_SERVICES[name], timeout=5)
        listed = run([tool("grpcurl"), "-plaintext", target, "list"], timeout=30).stdout
        assert GRPC_SERVICES[name] in listed.split()
        assert "grpc.health.v1.Health" in listed.split()


def test_metrics_cover_alerts_and_dashboard(supervised: Supervised) -> None:
    """Every fairlane_ metric the alert rules and the dashboard use is served by some
    service (prometheus_client lists a family even before its first sample)."""
    served: set[str] = set()
    for port in supervised.metrics.values():
        text = http_get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        assert "# TYPE " in text
        served |= metric_families(text)
    used = metric_families((DEPLOY / "prometheus" / "alerts.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "fairlane.json").read_text())
    used |= metric_families(json.dumps(dashboard))
    assert used - served == set(), "used by alerts/dashboard but not served"


def test_supervisord_stops_cleanly(supervised: Supervised) -> None:
    supervised.ctl("stop", "fairlane:*")
    log = (supervised.run_dir / "supervisord.log").read_text()
    for name in GRPC_SERVICES:
        assert f"stopped: {name} (exit status 0)" in log, supervised.logs()
    supervised.ctl("shutdown")
    assert supervised.proc.wait(60) == 0


# --- Envoy in front of two real queue replicas ----------------------------------------


@dataclass
class Procs:
    log_dir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, service: str, **settings: str) -> None:
        with (self.log_dir / f"{name}.log").open("wb") as log:
            self.procs[name] = subprocess.Popen(
                [fairlane_bin(), "serve", service],
                env={**self.env, **settings},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop_all(self) -> dict[str, int]:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        codes = {}
        for name, proc in self.procs.items():
            stop(proc, timeout=30, signalled=True)
            codes[name] = proc.returncode
        return codes


@pytest.fixture
async def two_queues(tmp_path: Path) -> AsyncIterator[tuple[Procs, dict[str, int]]]:
    backends = Backends()
    try:
        auth, q1, q2, m1, m2, worker = free_ports(6)
        env = service_env(
            FAIRLANE_SERVICE_SECRET=secrets.token_urlsafe(24),
            FAIRLANE_METRICS_HOST="127.0.0.1",
            FAIRLANE_GRACE_SECONDS="5",
            FAIRLANE_AUTH_LISTEN=f"127.0.0.1:{auth}",
            FAIRLANE_AUTH_TARGET=f"127.0.0.1:{auth}",
            FAIRLANE_AUTH_METRICS_PORT="0",
            **backends.settings,
        )
        await asyncio.to_thread(backends.migrate, env)
        procs = Procs(tmp_path, env)
        ports = {"auth": auth, "queue-1": q1, "queue-2": q2, "worker": worker}
        try:
            procs.start("auth", "auth")
            for name, grpc_port, metrics_port in (("queue-1", q1, m1), ("queue-2", q2, m2)):
                procs.start(
                    name,
                    "queue",
                    FAIRLANE_QUEUE_LISTEN=f"127.0.0.1:{grpc_port}",
                    FAIRLANE_QUEUE_METRICS_PORT=str(metrics_port),
                    FAIRLANE_INSTANCE_ID=f"{name}-{uuid.uuid4().hex[:6]}",
                )
            # A worker, so the queue replicas know the "echo" handler.
            procs.start(
                "worker",
                "worker",
                FAIRLANE_WORKER_LISTEN=f"127.0.0.1:{worker}",
                FAIRLANE_QUEUE_TARGET=f"127.0.0.1:{q1}",
                FAIRLANE_WORKER_METRICS_PORT="0",
            )
            for name, port in ports.items():
                service = GRPC_SERVICES[name.split("-")[0]]
                await asyncio.to_thread(wait_serving, f"127.0.0.1:{port}", service, 90, procs.logs)
            yield procs, ports
        finally:
            codes = procs.stop_all()
        assert codes == dict.fromkeys(procs.procs, 0), procs.logs()
    finally:
        await backends.aclose()


async def login(auth_target: str) -> str:
    async with grpc.aio.insecure_channel(auth_target) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        name, password = f"lb-{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(16)
        await stub.Register(auth_pb2.RegisterRequest(username=name, password=password))
        reply = await stub.Login(auth_pb2.LoginRequest(username=name, password=password))
        return str(reply.access_token)


async def test_envoy_balances_sessions_and_rate_limits(
    two_queues: tuple[Procs, dict[str, int]], tmp_path: Path
) -> None:
    procs, ports = two_queues
    listen, admin = free_ports(2)
    budget, sessions, calls = 30, 4, 40
    cfg = envoy_config(listen, admin, [ports["queue-1"], ports["queue-2"]], budget=budget)
    envoy_dir = tmp_path / "envoy"
    envoy_dir.mkdir()
    token = await login(f"127.0.0.1:{ports['auth']}")
    metadata = (("authorization", f"Bearer {token}"),)
    with run_envoy(cfg, envoy_dir) as envoy:
        await envoy.wait_healthy(hosts=2)
        target = f"127.0.0.1:{listen}"
        async with grpc.aio.insecure_channel(target) as channel:
            stub = queue_pb2_grpc.QueueServiceStub(channel)
            opened = []
            for i in range(sessions):
                call = stub.Session(metadata=metadata, timeout=60)
                enqueue = queue_pb2.EnqueueRequest(
                    handler="echo", payload=b"lb", client_ref=f"s{i}"
                )
                await call.write(queue_pb2.SessionRequest(enqueue=enqueue))
                reply = await call.read()
                assert reply.WhichOneof("kind") == "accepted", (reply, procs.logs())
                assert reply.accepted.client_ref == f"s{i}"
                opened.append(call)
            # Every stream is open at once, round robin put half on each replica.
            per_host = {h: s for h, s in envoy.host_stats().items() if ":" in h}
            assert [int(s["rq_active"]) for s in per_host.values()] == [2, 2], per_host
            for call in opened:
                call.cancel()
        # The budget minus the sessions is admitted, the rest of a bounded burst is shed.
        codes, errors = await burst(target, calls, metadata)
        shed = [e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert len(shed) == calls - (budget - sessions), codes
        assert all(metadata_of(e).get("x-fairlane-rate-limited") == "envoy" for e in shed)
        assert codes["OK"] >= 1, (codes, [e.details() for e in errors][:3])
    # Nothing fell over on the way.
    assert all(p.poll() is None for p in procs.procs.values()), procs.logs()
