"""`fairlane dev` stopped in the middle of work and started again on the same data: its
broker lives in memory, so what its lanes held is put back from the log (SQLite)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fairlane.client import Client, Status
from fairlane.client.errors import FairlaneError, Unavailable
from fairlane.client.retry import NO_RETRY
from tests.e2e.suite import ROOT, wait_until
from tests.ports import free_port

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"
LANE_MAX = 6
USERS = 3


class Dev:
    """One `fairlane dev` data directory, started and stopped as a user would."""

    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        self.out = tmp_path / "dev.out"
        listen = {name: f"127.0.0.1:{free_port()}" for name in ("auth", "queue", "worker")}
        self.auth, self.queue, self.worker = listen["auth"], listen["queue"], listen["worker"]
        self.env = dict(os.environ)
        self.env.update(
            PYTHONPATH=os.pathsep.join([str(ROOT / "clients"), str(ROOT)]),
            FAIRLANE_AUTH_LISTEN=self.auth,
            FAIRLANE_QUEUE_LISTEN=self.queue,
            FAIRLANE_WORKER_LISTEN=self.worker,
            FAIRLANE_AUTH_TARGET=self.auth,
            FAIRLANE_QUEUE_TARGET=self.queue,
            FAIRLANE_QUEUE_METRICS_PORT=str(free_port()),
            FAIRLANE_LANE_MAX_LENGTH=str(LANE_MAX),
            FAIRLANE_GRACE_SECONDS="1",
        )

    def start(self) -> subprocess.Popen[bytes]:
        with self.out.open("ab") as sink:
            return subprocess.Popen(
                [sys.executable, "-m", "fairlane.cli.main", "dev", "--data-dir", str(self.data)],
                env=self.env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.data.parent,
            )

    def output(self) -> str:
        return self.out.read_text(errors="replace")


async def _serving(dev: Dev, proc: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(dev.queue) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def up() -> bool:
            assert proc.poll() is None, dev.output()
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await wait_until(up, timeout=60)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_a_restart_loses_nothing_and_keeps_every_lane_in_order(
    tmp_path: Path, sig: int
) -> None:
    dev = Dev(tmp_path)
    proc = dev.start()
    # No retries: a full lane's refusal is what the test looks for.
    clients = [
        Client(dev.auth, dev.queue, dev.worker, timeout=10, retry=NO_RETRY) for _ in range(USERS)
    ]
    try:
        await _serving(dev, proc)
        for i, client in enumerate(clients):
            name = f"restart-{i}-{uuid.uuid4().hex[:8]}"
            await client.register(name, PASSWORD)
            await client.login(name, PASSWORD)
        # Each lane full: a request running when the process stops, five queued behind it.
        lanes: list[list[str]] = []
        for i, client in enumerate(clients):
            first = await client.enqueue("sleep", b"1.5")
            rest = [await client.enqueue("echo", f"{i}-{n}".encode()) for n in range(5)]
            lanes.append([first.request_id] + [r.request_id for r in rest])
        with pytest.raises(FairlaneError) as full:
            await clients[0].enqueue("echo", b"one too many")
        assert full.value.code == "RESOURCE_EXHAUSTED"

        async def running() -> bool:
            got = [await c.get(lane[0]) for c, lane in zip(clients, lanes, strict=True)]
            return all(r.status == Status.RUNNING for r in got)

        await wait_until(running, timeout=30)
        code = _stop(proc, sig)
        assert code in ((-signal.SIGKILL,) if sig == signal.SIGKILL else (0,)), dev.output()

        proc = dev.start()
        await _serving(dev, proc)

        async def finished() -> bool:
            try:
                for client, lane in zip(clients, lanes, strict=True):
                    for request_id in lane:
                        state = (await client.get(request_id)).status
                        if state in (Status.QUEUED, Status.RUNNING):
                            return False
            except Unavailable:
                # The clients' channels failed to connect while the process was down and
                # wait out gRPC's reconnect backoff (up to seconds) before they try again.
                return False
            return True

        await wait_until(finished, timeout=60)
        for i, (client, lane) in enumerate(zip(clients, lanes, strict=True)):
            got = [await client.get(request_id) for request_id in lane]
            assert [r.status for r in got] == [Status.SUCCEEDED] * 6, got
            # In the order accepted, each once: the stopped one first, where it stood.
            assert [r.lane_seq for r in got] == [1, 2, 3, 4, 5, 6], got
            assert [r.output for r in got[1:]] == [f"{i}-{n}".encode() for n in range(5)]
            # The attempt the stop cut short counts (SIGTERM's grace is shorter than it).
            assert got[0].attempts == 2, got[0]
            # The lane's bound is free again, and the lane goes on after them.
            again = await client.enqueue("echo", b"after")

            async def done(client: Client = client, request_id: str = again.request_id) -> bool:
                return (await client.get(request_id)).status == Status.SUCCEEDED

            await wait_until(done, timeout=30)
            assert (await client.get(again.request_id)).lane_seq == 7

        # A second process on the same data would run the same lanes twice: refused.
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "fairlane.cli.main", "dev", "--data-dir", str(dev.data)],
            env={**dev.env, "FAIRLANE_AUTH_LISTEN": f"127.0.0.1:{free_port()}"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        assert "another process is running on" in second.stdout + second.stderr
        assert proc.poll() is None, dev.output()
    finally:
        await asyncio.gather(*(c.close() for c in clients))
        started = time.monotonic()
        code = _stop(proc)
    assert code == 0, dev.output()
    assert time.monotonic() - started < 30
