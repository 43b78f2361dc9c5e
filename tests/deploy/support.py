"""Shared helpers for the deploy/ checks: tool lookup, commands, ports, YAML, settings."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
INSTALL_HINT = "run scripts/install_deploy_tools.sh (make test does)"

# Metric names the alerts and dashboards may use: the agreed list plus the ones the
# services already define (services/core/metrics.py), without the _total/_bucket/...
# suffixes Prometheus adds.
KNOWN_METRICS = frozenset(
    {
        "fairlane_requests",
        "fairlane_rejections",
        "fairlane_dead_lettered",
        "fairlane_retries",
        "fairlane_lane_depth",
        "fairlane_in_flight",
        "fairlane_breaker_state",
        "fairlane_handler_duration_seconds",
        "fairlane_queue_wait_seconds",
        "fairlane_db_batch_size",
        "fairlane_db_batch_seconds",
        "fairlane_accepted",
        "fairlane_active_lanes",
        "fairlane_open_sessions",
        "fairlane_broker_publish_seconds",
    }
)
_METRIC_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")
_METRIC_RE = re.compile(r"\bfairlane_[a-z0-9_]+")


def metric_families(text: str) -> set[str]:
    """Metric family names (suffixes stripped) mentioned in PromQL or exposition text."""
    names = set()
    for found in _METRIC_RE.findall(text):
        name = found
        for suffix in _METRIC_SUFFIXES:
            if found.endswith(suffix) and found[: -len(suffix)] in KNOWN_METRICS:
                name = found[: -len(suffix)]
                break
        names.add(name)
    return names


def tool(name: str) -> str:
    """Absolute path of a checking tool; a missing tool FAILS the test (never skips)."""
    candidate = VENV_BIN / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def run(
    args: Sequence[str],
    *,
    timeout: float = 120,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; on a non-zero exit fail with its output."""
    proc = subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        cwd=cwd or REPO,
        input=stdin,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}",
            pytrace=False,
        )
    return proc


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open together while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def settings_defaults() -> dict[str, object]:
    """FAIRLANE_* variable -> default of every field of the services' Settings.

    Fields with a computed default (a factory) map to None.
    """
    from services.core.settings import Settings

    out: dict[str, object] = {}
    for name, field in Settings.model_fields.items():
        env = f"FAIRLANE_{name.upper()}"
        out[env] = None if field.default_factory is not None else field.default
    return out


# Settings the deploy files already set but the services do not read yet (pydantic-settings
# ignores unknown FAIRLANE_* variables). Each must become a real setting; the e2e check
# test_awaited_settings_exist fails until it is.
AWAITED_SETTINGS = {
    "FAIRLANE_LANE_QUEUE_TYPE": "DESIGN.md: lanes' x-queue-type, classic unless set to quorum",
}
