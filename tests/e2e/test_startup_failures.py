"""A dependency that does not answer while a service starts: the process exits 1 (for its
supervisor to start it again) with one `startup_failed` line naming the dependency, not a
Python traceback outside the JSON log."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import DATABASE_URL
from tests.e2e.suite import ROOT, SERVICE_SECRET
from tests.ports import free_port

pytestmark = pytest.mark.e2e


def _serve(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FAIRLANE_")}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT / "clients"), str(ROOT)])
    settings = {
        "FAIRLANE_SERVICE_SECRET": SERVICE_SECRET,
        "FAIRLANE_AUTH_METRICS_PORT": "0",
        "FAIRLANE_WORKER_METRICS_PORT": "0",
        "FAIRLANE_AUTH_LISTEN": f"127.0.0.1:{free_port()}",
        "FAIRLANE_WORKER_LISTEN": f"127.0.0.1:{free_port()}",
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "fairlane.cli.main", "serve", service],
        env={**base, **settings},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )


@pytest.mark.parametrize(
    ("service", "env", "dependency", "reason"),
    [
        (
            "auth",
            {"FAIRLANE_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:{closed}/test"},
            "database",
            "Connection refused",
        ),
        (
            "worker",
            {"FAIRLANE_BROKER_URL": "amqp://guest:guest@127.0.0.1:{closed}/"},
            "broker",
            "RabbitMQ",
        ),
        (
            "worker",
            {"FAIRLANE_DATABASE_SCHEMA": "{schema}_never_migrated"},
            "database",
            "the schema is not migrated",
        ),
    ],
    ids=["auth-database-down", "worker-broker-down", "worker-not-migrated"],
)
async def test_an_unreachable_dependency_at_start_is_one_log_line_and_exit_1(
    pg_schema: str, service: str, env: dict[str, str], dependency: str, reason: str
) -> None:
    closed = free_port()  # nothing listens there
    settings = {
        "FAIRLANE_DATABASE_URL": DATABASE_URL,
        "FAIRLANE_DATABASE_SCHEMA": pg_schema,
        **{k: v.format(closed=closed, schema=pg_schema) for k, v in env.items()},
    }
    proc = await asyncio.to_thread(_serve, service, settings)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "startup_failed"]
    assert len(failed) == 1, proc.stderr
    assert (failed[0]["component"], failed[0]["dependency"]) == (service, dependency)
    assert reason in failed[0]["reason"]
    plain = [line for line in proc.stderr.splitlines() if line and not line.startswith("{")]
    assert plain == [], proc.stderr
