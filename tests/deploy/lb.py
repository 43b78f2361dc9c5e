"""Running Envoy and nginx from the shipped configs in front of gRPC replicas on loopback.

The shipped files name production addresses (the "queue" host, ports 8080/50052/50062);
these helpers change only addresses, ports and the size of the rate-limit budget, so the
tests exercise everything else exactly as shipped.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from tests.deploy.support import DEPLOY, load_yaml, tool

ENVOY_YAML = DEPLOY / "envoy" / "envoy.yaml"
NGINX_CONF = DEPLOY / "nginx" / "nginx.conf"
QUEUE_SERVICE = "fairlane.queue.v1.QueueService"


def _rate_limit(cfg: dict[str, Any]) -> dict[str, Any]:
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    limited = [r for r in routes if "typed_per_filter_config" in r]
    assert len(limited) == 1
    rl: dict[str, Any] = limited[0]["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]
    return rl


def _static(cluster: dict[str, Any], ports: Sequence[int]) -> None:
    assert cluster["type"] == "STRICT_DNS"
    cluster["type"] = "STATIC"
    cluster["load_assignment"]["endpoints"] = [
        {
            "lb_endpoints": [
                {
                    "endpoint": {
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                    }
                }
                for p in ports
            ]
        }
    ]


def envoy_config(
    listen_port: int,
    admin_port: int,
    upstreams: Sequence[int],
    *,
    budget: int,
    auth: int | None = None,
    path: Path = ENVOY_YAML,
) -> dict[str, Any]:
    """deploy/envoy/envoy.yaml (or `path`) on loopback ports, with a rate-limit budget of
    `budget` calls that does not refill during a test. Auth's cluster points at `auth`,
    or at a port where nothing listens."""
    cfg: dict[str, Any] = copy.deepcopy(load_yaml(path))
    cfg["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    listener = cfg["static_resources"]["listeners"][0]
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert set(clusters) == {"fairlane_queue", "fairlane_auth"}
    _static(clusters["fairlane_queue"], upstreams)
    _static(clusters["fairlane_auth"], [auth if auth is not None else 1])
    bucket = _rate_limit(cfg)["token_bucket"]
    bucket.update(max_tokens=budget, tokens_per_fill=budget, fill_interval="3600s")
    return cfg


def envoy_validate(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("envoy"), "--mode", "validate", "-c", str(config_path), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def http_get(url: str, timeout: float = 2) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body.decode()


class Envoy:
    def __init__(self, proc: subprocess.Popen[bytes], admin_port: int, log: Path) -> None:
        self.proc = proc
        self.admin = f"http://127.0.0.1:{admin_port}"
        self.log = log

    def host_stats(self, cluster: str = "fairlane_queue") -> dict[str, dict[str, str]]:
        """upstream "ip:port" -> stat -> value, from the admin /clusters page."""
        out: dict[str, dict[str, str]] = {}
        for line in http_get(f"{self.admin}/clusters").splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster:
                out.setdefault(parts[1], {})[parts[2]] = parts[3]
        return out

    def stat(self, name: str) -> int:
        for line in http_get(f"{self.admin}/stats?filter={re.escape(name)}$").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    async def wait_healthy(
        self, hosts: int, timeout: float = 60, cluster: str = "fairlane_queue"
    ) -> None:
        """Until Envoy's active gRPC health checks pass on `hosts` upstreams (the event loop
        keeps running: the upstreams may live in this process)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"envoy exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                stats = self.host_stats(cluster)
                last = stats
                healthy = [h for h, s in stats.items() if s.get("health_flags") == "healthy"]
                if len(healthy) == hosts:
                    return
            except OSError as exc:
                last = exc
            await asyncio.sleep(0.2)
        pytest.fail(f"envoy upstreams not healthy after {timeout}s: {last}")


@contextmanager
def run_envoy(cfg: dict[str, Any], workdir: Path) -> Iterator[Envoy]:
    path = workdir / "envoy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = workdir / "envoy.log"
    admin_port = int(cfg["admin"]["address"]["socket_address"]["port_value"])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                tool("envoy"),
                "-c",
                str(path),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Envoy(proc, admin_port, log)
    finally:
        stop(proc)


def nginx_config(
    listen_port: int,
    upstreams: Sequence[int],
    pid: Path,
    *,
    burst: int,
    auth: int | None = None,
    path: Path = NGINX_CONF,
) -> str:
    """deploy/nginx/nginx.conf (or `path`) on loopback ports; the budget is `burst` + 1
    calls, refilled at one per minute (slower than any test). Auth's upstream is `auth`,
    or a port where nothing listens."""
    text = path.read_text()
    servers = "\n".join(
        f"        server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;" for p in upstreams
    )
    replacements = [
        (r"^pid .*;$", f"pid {pid};"),
        (r"listen 127\.0\.0\.1:(8080|8443) ", f"listen 127.0.0.1:{listen_port} "),
        (
            r"(upstream fairlane_queue \{\n(?: *#[^\n]*\n)*)"
            r"(?: *server 127\.0\.0\.1:\d+ [^\n]*\n)+",
            rf"\g<1>{servers}\n",
        ),
        (
            r"(upstream fairlane_auth \{\n *server 127\.0\.0\.1:)\d+",
            rf"\g<1>{auth if auth is not None else 1}",
        ),
        (r"rate=\d+r/s", "rate=1r/m"),
        (r"burst=\d+", f"burst={burst}"),
    ]
    for pattern, new in replacements:
        text, n = re.subn(pattern, new, text, count=1, flags=re.M)
        assert n == 1, f"{path.name} no longer has {pattern!r}"
    return text


@contextmanager
def run_nginx(conf: str, workdir: Path) -> Iterator[subprocess.Popen[bytes]]:
    path = workdir / "nginx.conf"
    path.write_text(conf)
    log = workdir / "nginx.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                tool("nginx"),
                "-p",
                str(workdir),
                "-e",
                "stderr",
                "-c",
                str(path),
                "-g",
                "daemon off;",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        stop(proc)


async def wait_grpc(target: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until a Health.Check through `target` answers (whatever the status)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args!r} exited {proc.returncode}")
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
            except grpc.aio.AioRpcError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """Until 127.0.0.1:`port` accepts a TCP connection."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args!r} exited {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
        else:
            writer.close()
            await writer.wait_closed()
            return


def stop(proc: subprocess.Popen[bytes], timeout: float = 20, *, signalled: bool = False) -> None:
    """SIGTERM (unless already sent), then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        if not signalled:
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- a stand-in queue replica ------------------------------------------------------------


async def start_fake_queue(name: str, port: int) -> grpc.aio.Server:
    """A stand-in queue replica: grpc.health.v1 SERVING, and GetLane answering with its
    own name as the lane's user id, so a client can tell the replicas apart."""

    async def get_lane(
        request: queue_pb2.GetLaneRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> queue_pb2.GetLaneResponse:
        return queue_pb2.GetLaneResponse(lane=queue_pb2.Lane(user_id=name))

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        get_lane,
        request_deserializer=queue_pb2.GetLaneRequest.FromString,
        response_serializer=queue_pb2.GetLaneResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(QUEUE_SERVICE, {"GetLane": handler})]
    )
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await servicer.set(QUEUE_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


# --- clients -------------------------------------------------------------------------------


async def get_lane_names(target: str, count: int) -> list[str]:
    """`count` GetLane calls one after another; the replica name that answered each."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        names = []
        for _ in range(count):
            reply = await stub.GetLane(queue_pb2.GetLaneRequest(), timeout=10)
            names.append(reply.lane.user_id)
        return names


async def health_checks(target: str, count: int) -> Counter[str]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        codes: Counter[str] = Counter()
        for _ in range(count):
            try:
                await stub.Check(health_pb2.HealthCheckRequest(service=QUEUE_SERVICE), timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
        return codes


async def burst(
    target: str, count: int, metadata: Sequence[tuple[str, str]] = ()
) -> tuple[Counter[str], list[grpc.aio.AioRpcError]]:
    """`count` concurrent GetLane calls (bounded, one round); status counts and the errors."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)

        async def one() -> grpc.aio.AioRpcError | None:
            try:
                await stub.GetLane(queue_pb2.GetLaneRequest(), metadata=tuple(metadata), timeout=10)
            except grpc.aio.AioRpcError as exc:
                return exc
            return None

        results = await asyncio.gather(*(one() for _ in range(count)))
    errors = [r for r in results if r is not None]
    codes: Counter[str] = Counter({"OK": len(results) - len(errors)})
    codes.update(e.code().name for e in errors)
    return codes, errors


def metadata_of(error: grpc.aio.AioRpcError) -> dict[str, str]:
    out = {}
    for md in (error.initial_metadata(), error.trailing_metadata()):
        for key, value in md or ():
            out[key] = value if isinstance(value, str) else value.decode()
    return out


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=1, default=str)
