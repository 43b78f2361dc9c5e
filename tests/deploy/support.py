"""Shared helpers for the deploy/ checks: tool lookup, commands, ports, YAML, settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent
INSTALL_HINT = "run scripts/install_deploy_tools.sh (make test does)"


# Metric names the alerts and dashboards may use: the agreed list plus the ones the
# services already define (services/core/metrics.py), without the _total/_bucket/...
# suffixes Prometheus adds.
def _exported_families() -> frozenset[str]:
    """Every fairlane_* family the services define (their modules register them)."""
    import fairlane_server.core.breaker
    import fairlane_server.core.grpc_metrics
    import fairlane_server.core.metrics  # noqa: F401  (registers the families)

    return frozenset(
        family.name
        for family in prometheus_client.REGISTRY.collect()
        if family.name.startswith("fairlane_")
    )


KNOWN_METRICS = _exported_families()
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


def load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


def settings_defaults() -> dict[str, object]:
    """FAIRLANE_* variable -> default of every field of the services' Settings.

    Fields with a computed default (a factory) map to None.
    """
    from fairlane_server.core.settings import Settings

    out: dict[str, object] = {}
    for name, field in Settings.model_fields.items():
        env = f"FAIRLANE_{name.upper()}"
        out[env] = None if field.default_factory is not None else field.default
    return out


# --- running the real services (e2e) ----------------------------------------------------

DATABASE_URL = os.environ.get(
    "FAIRLANE_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
BROKER_ROOT = os.environ.get("FAIRLANE_TEST_BROKER_ROOT", "amqp://guest:guest@127.0.0.1:5672/")


def fairlane_bin() -> str:
    """The installed `fairlane` console script (pip install -e . puts it in the venv)."""
    path = VENV_BIN / "fairlane"
    if not path.exists():
        pytest.fail("the fairlane console script is not installed (pip install -e .)")
    return str(path)


def service_env(**settings: str) -> dict[str, str]:
    """This environment without any FAIRLANE_*/OTEL_* of the caller, the venv first on
    PATH (supervisord finds `fairlane` there), plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAIRLANE_", "OTEL_"))}
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env.update(settings)
    return env


def rabbitmqctl(*args: str) -> None:
    run([tool("rabbitmqctl"), "-q", *args], timeout=60)


async def drop_pg_schema(schema: str) -> None:
    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    assert re.fullmatch(r"t_[0-9a-f]+", schema), schema
    engine = create_async_engine(DATABASE_URL)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await engine.dispose()


class Backends:
    """A PostgreSQL schema and a RabbitMQ vhost of one test's own, removed by close()."""

    def __init__(self) -> None:
        import uuid

        self.schema = f"t_{uuid.uuid4().hex[:12]}"
        self.vhost = f"t_{uuid.uuid4().hex[:12]}"
        rabbitmqctl("add_vhost", self.vhost)
        rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")

    @property
    def settings(self) -> dict[str, str]:
        return {
            "FAIRLANE_DATABASE_URL": DATABASE_URL,
            "FAIRLANE_DATABASE_SCHEMA": self.schema,
            "FAIRLANE_BROKER_URL": f"{BROKER_ROOT}{self.vhost}",
        }

    def migrate(self, env: Mapping[str, str]) -> None:
        """`fairlane migrate` against this schema, as an operator runs it."""
        run([fairlane_bin(), "migrate"], env=env, timeout=180)

    async def aclose(self) -> None:
        try:
            await drop_pg_schema(self.schema)
        finally:
            rabbitmqctl("delete_vhost", self.vhost)

    def close(self) -> None:
        import asyncio

        asyncio.run(self.aclose())


def wait_serving(
    target: str, service: str = "", timeout: float = 90, logs: Callable[[], str] = str
) -> None:
    """deploy/docker/healthcheck.py --wait: the image's own health check, run here."""
    script = str(DEPLOY / "docker" / "healthcheck.py")
    out = run(
        [sys.executable, script, "--wait", str(timeout), target, service],
        timeout=timeout + 30,
        check=False,
    )
    if out.returncode != 0:
        pytest.fail(f"{out.stdout.strip()} after {timeout}s\n{logs()}", pytrace=False)
