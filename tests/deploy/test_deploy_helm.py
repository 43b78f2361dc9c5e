"""deploy/helm/fairlane: linted and rendered by Helm's own engine (PyPI helm-python-sdk),
every rendered document validated by kubernetes-validate --strict."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from tests.deploy.support import (
    DEPLOY,
    REPO,
    load_yaml,
    run,
    settings_defaults,
    tool,
)

CHART = DEPLOY / "helm" / "fairlane"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest the
# pinned kubernetes-validate knows.
KUBE_VERSIONS = ("1.30.0", "1.37.0")
VALUES_FILES = sorted(p.name for p in CHART.glob("values-*.yaml"))
SERVICES = {
    "auth": (50051, 9101, "fairlane.auth.v1.AuthService"),
    "queue": (50052, 9102, "fairlane.queue.v1.QueueService"),
    "worker": (50053, 9103, "fairlane.worker.v1.WorkerService"),
}
CRD_KINDS = {"ServiceMonitor"}  # not in the Kubernetes schemas; checked by content below


def values_of(name: str | None) -> dict[str, Any] | None:
    return None if name is None else dict(load_yaml(CHART / name))


LOOKUP = 'lookup "v1" "Secret" .Release.Namespace (include "fairlane.fullname" .)'


def chart_in_cluster(tmp_path: Path, secret: dict[str, Any]) -> Path:
    """A copy of the chart whose lookup of its own Secret finds `secret`, as on an
    upgrade (offline, lookup finds nothing)."""
    copy = tmp_path / "fairlane"
    shutil.copytree(CHART, copy)
    helpers = copy / "templates" / "_helpers.tpl"
    text = helpers.read_text()
    assert text.count(LOOKUP) == 1, "the chart looks its Secret up elsewhere too"
    helpers.write_text(text.replace(LOOKUP, f"fromJson {json.dumps(json.dumps(secret))}"))
    return copy


def render(
    values: dict[str, Any] | None, *, upgrade: bool = False, chart_dir: Path = CHART
) -> list[dict[str, Any]]:
    with helm.Chart.load(chart_dir) as chart:
        manifests = chart.render(
            values,
            name="fl",
            namespace="fairlane",
            is_install=not upgrade,
            is_upgrade=upgrade,
        )
    docs: list[dict[str, Any]] = []
    for path, text in sorted(manifests.items()):
        if not path.endswith(".yaml"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(deploy: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from deploy["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_helm_lint_strict(values_file: str | None) -> None:
    report = helm.lint(CHART, values_of(values_file), strict=True, namespace="fairlane")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


@pytest.mark.parametrize("upgrade", [False, True])
@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_rendered_manifests_validate_strict(
    values_file: str | None, upgrade: bool, tmp_path: Path
) -> None:
    docs = render(values_of(values_file), upgrade=upgrade)
    files = []
    for i, doc in enumerate(docs):
        if doc["kind"] in CRD_KINDS:
            continue
        path = tmp_path / f"{i:02d}-{doc['kind']}-{doc['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        files.append(str(path))
    assert len(files) >= 10
    for version in KUBE_VERSIONS:
        out = run([tool("kubernetes-validate"), "--strict", "-k", version, "--quiet", *files])
        assert out.stdout.strip() == "", out.stdout


def test_kubernetes_validate_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """The validator really is strict: an unknown probe field fails."""
    deploy = by_kind(render(None), "Deployment")["fl-fairlane-queue"]
    next(containers(deploy))["readinessProbe"]["grpc"]["serviceName"] = "typo"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(deploy))
    out = run([tool("kubernetes-validate"), "--strict", "-k", "1.30.0", str(path)], check=False)
    assert out.returncode != 0
    assert "serviceName" in out.stdout + out.stderr


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_deployments_probes_ports_limits(values_file: str | None) -> None:
    docs = render(values_of(values_file))
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    assert set(deployments) == {f"fl-fairlane-{n}" for n in SERVICES}
    for name, (grpc_port, metrics_port, grpc_service) in SERVICES.items():
        deploy = deployments[f"fl-fairlane-{name}"]
        pod = deploy["spec"]["template"]
        assert (
            pod["metadata"]["labels"].items() >= deploy["spec"]["selector"]["matchLabels"].items()
        )
        (c,) = containers(deploy)
        assert c["args"] == ["serve", name]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port}
        # Liveness and startup answer for the process, readiness for its dependencies:
        # a dependency outage takes pods out of rotation and restarts none.
        expected = {
            "readinessProbe": grpc_service,
            "livenessProbe": "liveness",
            "startupProbe": "liveness",
        }
        for probe, service in expected.items():
            if (values_of(values_file) or {}).get("tls", {}).get("enabled"):
                # The kubelet's gRPC probe cannot speak TLS: the image's script does.
                assert c[probe]["exec"]["command"] == [
                    "fairlane-healthcheck",
                    "--timeout",
                    "2",
                    f"127.0.0.1:{grpc_port}",
                    service,
                ]
            else:
                assert c[probe]["grpc"] == {"port": grpc_port, "service": service}
        env = {e["name"]: e for e in c["env"]}
        assert env["FAIRLANE_METRICS_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "status.podIP"
        ), "metrics listen on the pod network only"
        liveness = c["livenessProbe"]
        assert liveness["periodSeconds"] * liveness["failureThreshold"] >= 60
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{name} {kind}"
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        grace = int(pod["spec"]["terminationGracePeriodSeconds"])
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        # The service gives up what still runs FAIRLANE_GRACE_SECONDS + 5 s after SIGTERM.
        assert grace > pre_stop + 20 + 5, "SIGKILL before the graceful stop has ended"
        svc = services[f"fl-fairlane-{name}"]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        svc_ports = {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]}
        assert svc_ports == {"grpc": (grpc_port, "grpc"), "metrics": (metrics_port, "metrics")}


def test_settings_configmap_and_secret() -> None:
    docs = render({"secret": {"serviceSecret": "fixed"}})
    (cm,) = by_kind(docs, "ConfigMap").values()
    secret = by_kind(docs, "Secret")["fl-fairlane"]
    known = set(settings_defaults())
    for key in cm["data"]:
        assert key in known or key.startswith("OTEL_"), key
    assert set(secret["data"]) == {
        "FAIRLANE_DATABASE_URL",
        "FAIRLANE_BROKER_URL",
        "FAIRLANE_SERVICE_SECRET",
    }
    assert not set(secret["data"]) & set(cm["data"]), "secrets never go in the ConfigMap"
    assert cm["data"]["FAIRLANE_AUTH_TARGET"] == "fl-fairlane-auth:50051"
    assert cm["data"]["FAIRLANE_QUEUE_TARGET"] == "dns:///fl-fairlane-queue-headless:50052"
    assert cm["data"]["FAIRLANE_LANE_QUEUE_TYPE"] == "classic"
    headless = by_kind(docs, "Service")["fl-fairlane-queue-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    for deploy in by_kind(docs, "Deployment").values():
        (c,) = containers(deploy)
        refs = {next(iter(e)): next(iter(e.values()))["name"] for e in c["envFrom"]}
        assert refs == {"configMapRef": cm["metadata"]["name"], "secretRef": "fl-fairlane"}


def test_migration_job_runs_before_install_and_upgrade() -> None:
    docs = render(None)
    (job,) = by_kind(docs, "Job").values()
    hook_secret = by_kind(docs, "Secret")["fl-fairlane-migrate"]
    ann = job["metadata"]["annotations"]
    assert ann["helm.sh/hook"] == "pre-install,pre-upgrade"
    secret_ann = hook_secret["metadata"]["annotations"]
    assert secret_ann["helm.sh/hook"] == ann["helm.sh/hook"]
    assert int(secret_ann["helm.sh/hook-weight"]) < int(ann["helm.sh/hook-weight"])
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["migrate"]
    env = {e["name"]: e for e in c["env"]}
    ref = env["FAIRLANE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "fl-fairlane-migrate"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_autoscaling_and_disruption_budgets() -> None:
    docs = render(None)
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"fl-fairlane-queue", "fl-fairlane-worker"}
    deployments = by_kind(docs, "Deployment")
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
        assert "replicas" not in deployments[name]["spec"], "the HPA owns the replica count"
    assert deployments["fl-fairlane-auth"]["spec"]["replicas"] == 2
    pdbs = by_kind(docs, "PodDisruptionBudget")
    assert set(pdbs) == set(deployments)
    for name, pdb in pdbs.items():
        pod_labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_minimal_values() -> None:
    docs = render(values_of("values-minimal.yaml"))
    assert by_kind(docs, "HorizontalPodAutoscaler") == {}
    assert by_kind(docs, "PodDisruptionBudget") == {}
    for deploy in by_kind(docs, "Deployment").values():
        assert deploy["spec"]["replicas"] == 1


def test_production_values_quorum_lanes_and_service_monitor() -> None:
    docs = render(values_of("values-production.yaml"))
    (cm,) = by_kind(docs, "ConfigMap").values()
    assert cm["data"]["FAIRLANE_LANE_QUEUE_TYPE"] == "quorum"
    assert cm["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http://")
    # An existing Secret: the chart creates none, and everything reads that one.
    assert by_kind(docs, "Secret") == {}
    (job,) = by_kind(docs, "Job").values()
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert (
        env["FAIRLANE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "fairlane-credentials"
    )
    for deploy in by_kind(docs, "Deployment").values():
        (c,) = containers(deploy)
        assert {"secretRef": {"name": "fairlane-credentials"}} in c["envFrom"]
        assert c["image"] == "registry.example.com/fairlane:0.1.0"
    (sm,) = by_kind(docs, "ServiceMonitor").values()
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert endpoint["relabelings"][0]["replacement"] == "fairlane-$1"  # job names of alerts.yml
    selector = sm["spec"]["selector"]["matchLabels"]
    for svc in by_kind(docs, "Service").values():
        if svc["metadata"]["name"].endswith("-headless"):
            continue
        assert selector.items() <= svc["metadata"]["labels"].items()
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpas["fl-fairlane-worker"]["spec"]["minReplicas"] == 4


def secret_checksums(docs: list[dict[str, Any]]) -> set[str]:
    return {
        d["spec"]["template"]["metadata"]["annotations"]["checksum/secret-values"]
        for d in by_kind(docs, "Deployment").values()
    }


def test_pods_roll_with_the_secret_values_through_a_salted_hash(tmp_path: Path) -> None:
    values = {"secret": {"serviceSecret": "s3cret-s3cret-s3cret"}}
    installed = render(values)
    (checksum,) = secret_checksums(installed)  # one salt for every Deployment
    secret = by_kind(installed, "Secret")["fl-fairlane"]
    salt = secret["metadata"]["annotations"]["fairlane/checksum-salt"]
    assert len(salt) == 32
    # Not a hash of the values alone, which anyone who may read pods could test guesses
    # against (the old annotation hashed "existingSecret|databaseUrl|brokerUrl|secret").
    s = values_of("values.yaml")["secret"]  # type: ignore[index]
    plain = [s["databaseUrl"], s["brokerUrl"], "s3cret-s3cret-s3cret"]
    for guess in ("|".join(["", *plain]), "|".join(plain), json.dumps(plain)):
        assert checksum != hashlib.sha256(guess.encode()).hexdigest()
    # Another release (or a re-install) gets another salt.
    assert secret_checksums(render(values)) != {checksum}
    # Upgrades, where lookup finds the Secret the install made: the same values keep the
    # pods; a changed value rolls them.
    in_cluster = chart_in_cluster(tmp_path, secret)
    assert secret_checksums(render(values, upgrade=True, chart_dir=in_cluster)) == {checksum}
    upgraded = render(values, upgrade=True, chart_dir=in_cluster)
    assert by_kind(upgraded, "Secret")["fl-fairlane"]["metadata"] == secret["metadata"]
    for changed in ("databaseUrl", "brokerUrl", "serviceSecret"):
        other = {"secret": {**values["secret"], changed: "postgresql+asyncpg://x:y@z/w"}}
        assert secret_checksums(render(other, upgrade=True, chart_dir=in_cluster)) != {checksum}


def test_generated_service_secret_is_kept_on_upgrade(tmp_path: Path) -> None:
    installed = by_kind(render(None), "Secret")["fl-fairlane"]
    in_cluster = chart_in_cluster(tmp_path, installed)
    upgraded = by_kind(render(None, upgrade=True, chart_dir=in_cluster), "Secret")["fl-fairlane"]
    assert upgraded["data"] == installed["data"]


def test_existing_secret_checksum_names_only_the_secret() -> None:
    docs = render({"secret": {"existingSecret": "mine"}})
    (checksum,) = secret_checksums(docs)
    assert checksum == hashlib.sha256(b'["existingSecret","mine"]').hexdigest()


def notes(values: dict[str, Any] | None) -> str:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="fl", namespace="fairlane", is_install=True)
    return rendered["fairlane/templates/NOTES.txt"]


NOTES_CASES: dict[str, dict[str, Any]] = {
    "plaintext": {},
    "plaintext, reflection": {"reflection": True},
    "tls": {"tls": {"enabled": True, "secretName": "t", "mutual": False}},
    "tls, reflection": {
        "reflection": True,
        "tls": {"enabled": True, "secretName": "t", "mutual": False},
    },
    "mtls": {"tls": {"enabled": True, "secretName": "t"}},
    "mtls, reflection": {"reflection": True, "tls": {"enabled": True, "secretName": "t"}},
}


@pytest.mark.parametrize("case", NOTES_CASES)
def test_notes_grpcurl_command_works(case: str, tmp_path: Path) -> None:
    """The grpcurl line NOTES.txt prints, run against a stand-in queue served the way
    the values say (reflection, TLS, mTLS) behind the port-forward it names."""
    values = NOTES_CASES[case]
    text = notes(values)
    (command,) = [line.strip() for line in text.splitlines() if line.strip().startswith("grpcurl ")]
    asyncio.run(_run_notes_command(command, values, tmp_path))


async def _run_notes_command(command: str, values: dict[str, Any], tmp_path: Path) -> None:
    import shlex

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from tests.certs import Authority
    from tests.ports import free_ports

    (port,) = free_ports(1)
    tls = values.get("tls", {})
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set(SERVICES["queue"][2], health_pb2.HealthCheckResponse.SERVING)
    if values.get("reflection"):
        names = (SERVICES["queue"][2], "grpc.health.v1.Health", reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    address = f"127.0.0.1:{port}"
    if tls.get("enabled"):
        ca = Authority(tmp_path / "pki")
        # Only the Service's name: the port-forward's 127.0.0.1 is not in it.
        leaf = ca.issue("tls", hosts=("fl-fairlane-queue",))
        for name, src in (("ca.crt", ca.cert), ("tls.crt", leaf.cert), ("tls.key", leaf.key)):
            (tmp_path / name).write_bytes(src.read_bytes())
        creds = grpc.ssl_server_credentials(
            [(leaf.key.read_bytes(), leaf.cert.read_bytes())],
            root_certificates=ca.cert.read_bytes(),
            require_client_auth=tls.get("mutual", True),
        )
        server.add_secure_port(address, creds)
    else:
        server.add_insecure_port(address)
    (tmp_path / "protos").symlink_to(REPO / "protos")
    await server.start()
    try:
        args = shlex.split(command.replace("127.0.0.1:50052", address))
        out = await asyncio.to_thread(run, [tool("grpcurl"), *args[1:]], cwd=tmp_path, timeout=60)
    finally:
        await server.stop(None)
    if values.get("reflection"):
        assert SERVICES["queue"][2] in out.stdout.split()
    else:
        assert '"status": "SERVING"' in out.stdout


def test_notes_name_the_endpoints() -> None:
    with helm.Chart.load(CHART) as chart:
        notes = chart.render(None, name="fl", namespace="fairlane", is_install=True)
    text = notes["fairlane/templates/NOTES.txt"]
    for name, (port, _, _) in SERVICES.items():
        assert f"fl-fairlane-{name}:{port}" in text
    assert "dns:///fl-fairlane-queue-headless:50052" in text


def test_service_secret_is_generated_once() -> None:
    """Without a value the chart generates a service secret (lookup keeps it on upgrade)."""
    secret = by_kind(render(None), "Secret")["fl-fairlane"]
    assert len(secret["data"]["FAIRLANE_SERVICE_SECRET"]) > 40


def test_plaintext_is_explicit_and_tls_is_a_value() -> None:
    (plain,) = by_kind(render(None), "ConfigMap").values()
    assert plain["data"]["FAIRLANE_ALLOW_INSECURE"] == "true"
    assert plain["data"]["FAIRLANE_REFLECTION"] == "false"
    assert "FAIRLANE_TLS_CERT_FILE" not in plain["data"]
    docs = render({"tls": {"enabled": True, "secretName": "fl-tls"}})
    (cm,) = by_kind(docs, "ConfigMap").values()
    assert cm["data"]["FAIRLANE_ALLOW_INSECURE"] == "false"
    assert cm["data"]["FAIRLANE_TLS_CERT_FILE"] == "/etc/fairlane/tls/tls.crt"
    assert cm["data"]["FAIRLANE_TLS_CLIENT_CA_FILE"] == "/etc/fairlane/tls/ca.crt"
    for deploy in by_kind(docs, "Deployment").values():
        pod = deploy["spec"]["template"]["spec"]
        (c,) = containers(deploy)
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["tls"] == {"name": "tls", "mountPath": "/etc/fairlane/tls", "readOnly": True}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "fl-tls"
    one_way = render({"tls": {"enabled": True, "secretName": "fl-tls", "mutual": False}})
    (cm,) = by_kind(one_way, "ConfigMap").values()
    assert "FAIRLANE_TLS_CLIENT_CA_FILE" not in cm["data"]


def test_network_policy_confines_grpc_and_metrics() -> None:
    policies = by_kind(render(None), "NetworkPolicy")
    fairlane_pods = {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "fairlane"}}}
    monitoring = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }
    for name in SERVICES:
        policy = policies[f"fl-fairlane-{name}"]["spec"]
        assert policy["policyTypes"] == ["Ingress"]
        assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
        grpc_rule, metrics_rule = policy["ingress"]
        assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
        assert metrics_rule == {
            "ports": [{"port": "metrics", "protocol": "TCP"}],
            "from": [monitoring],
        }
        if name == "worker":
            # Worker control: the Fairlane pods only, unless operators are listed.
            assert grpc_rule["from"] == [fairlane_pods]
        else:
            assert grpc_rule["from"] == [fairlane_pods, {"namespaceSelector": {}}]
    assert by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == {}
