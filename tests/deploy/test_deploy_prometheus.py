"""Prometheus scrape config and alert rules, checked by promtool; Grafana dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import prometheus_client
import yaml

from tests.deploy.support import DEPLOY, KNOWN_METRICS, REPO, load_yaml, metric_families, run, tool

PROM = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
JOBS = {"fairlane-auth": 9101, "fairlane-queue": 9102, "fairlane-worker": 9103}


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(PROM / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def test_promtool_check_config() -> None:
    out = run([tool("promtool"), "check", "config", str(PROM / "prometheus.yml")])
    assert "SUCCESS" in out.stdout
    # The rule file is loaded through the config, not just checked on its own.
    assert "1 rule files found" in out.stdout


def test_promtool_check_rules() -> None:
    out = run([tool("promtool"), "check", "rules", str(PROM / "alerts.yml")])
    assert f"SUCCESS: {len(alert_rules())} rules found" in out.stdout


def test_every_exported_family_passes_promtool_lint() -> None:
    """Names, types and help as Prometheus's own linter wants them (no `_total` on a
    gauge, base units): what every process exports, from the one registry."""
    exposition = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "fairlane_requests_total" in exposition
    out = run([tool("promtool"), "check", "metrics"], stdin=exposition, check=False)
    assert (out.returncode, out.stdout + out.stderr) == (0, "")


def test_promtool_test_rules() -> None:
    out = run([tool("promtool"), "test", "rules", str(PROM / "alerts_test.yml")])
    assert "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = load_yaml(PROM / "alerts_test.yml")["tests"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts with no test where they fire"
    assert names - quiet == set(), "alerts with no test where they stay quiet"
    assert fires | quiet <= names, "tests of alerts that do not exist"


def test_alerts_are_labelled_and_documented() -> None:
    docs = (REPO / "docs" / "deploy.md").read_text()
    anchors = {slug(h) for h in re.findall(r"^#+\s+(.*)$", docs, flags=re.M)}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        ann = rule["annotations"]
        assert ann["summary"], rule["alert"]
        assert ann["description"], rule["alert"]
        anchor = ann["runbook_url"].split("#", 1)[1]
        assert ann["runbook_url"].startswith("docs/deploy.md#"), rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, f"docs/deploy.md has no section for {rule['alert']}"


def test_alerts_use_known_metrics_and_jobs() -> None:
    text = (PROM / "alerts.yml").read_text()
    assert metric_families(text) <= KNOWN_METRICS
    for job in re.findall(r'job=~?"([^"]+)"', text):
        assert any(re.fullmatch(job, name) for name in JOBS), job


def test_scrape_config_covers_every_service() -> None:
    cfg = load_yaml(PROM / "prometheus.yml")
    assert cfg["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    for name, port in JOBS.items():
        sd = jobs[name]["dns_sd_configs"][0]
        assert sd["port"] == port
        assert sd["names"] == [name.removeprefix("fairlane-")]  # compose service names


def slug(heading: str) -> str:
    """GitHub-style anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# --- Grafana -------------------------------------------------------------------------


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads((GRAFANA / "dashboards" / "fairlane.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_dashboard_is_consistent() -> None:
    dash = json.loads((GRAFANA / "dashboards" / "fairlane.json").read_text())
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    prom_uid = next(d["uid"] for d in datasources["datasources"] if d["type"] == "prometheus")
    assert dash["uid"] == "fairlane-overview"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["datasource"]["uid"] == prom_uid, panel["title"]
        assert panel["targets"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
    exprs = " ".join(expr for _, expr in dashboard_exprs())
    assert metric_families(exprs) <= KNOWN_METRICS


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Every panel query is valid PromQL (Grafana variables replaced by sample values)."""
    rules = []
    for i, (title, expr) in enumerate(dashboard_exprs()):
        concrete = (
            expr.replace("$__rate_interval", "1m")
            .replace("$job", "fairlane-.*")
            .replace("$instance", ".*")
        )
        assert "$" not in concrete, f"unhandled variable in {title!r}: {expr}"
        rules.append({"record": f"fairlane:dashboard:panel{i}", "expr": concrete})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([tool("promtool"), "check", "rules", str(path)])
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "fairlane.yml")["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards/fairlane"
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    urls = {d["type"]: d["url"] for d in datasources["datasources"]}
    assert urls["prometheus"] == "http://prometheus:9090"  # the compose service
