"""`fairlane dev`: the embedded default, started as a user would, with nothing else running."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.suite import ROOT
from tests.ports import free_port

pytestmark = pytest.mark.e2e


def _stacks(pid: int) -> str:
    """Every thread's Python stack of a process that will not stop (py-spy, a dev
    dependency), so that a rare hang is diagnosed from the first failure."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        dump = subprocess.run(
            [spy, "dump", "--pid", str(pid), "--locals"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(no stacks: {exc})"
    return dump.stdout + dump.stderr


def test_dev_demo_round_trip_and_clean_ctrl_c(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT / "clients"), str(ROOT)]),
        FAIRLANE_AUTH_LISTEN=f"127.0.0.1:{free_port()}",
        FAIRLANE_QUEUE_LISTEN=f"127.0.0.1:{free_port()}",
        FAIRLANE_WORKER_LISTEN=f"127.0.0.1:{free_port()}",
        FAIRLANE_QUEUE_METRICS_PORT=str(free_port()),
        # Point the real backends at nothing: dev must not need them.
        FAIRLANE_BROKER_URL="amqp://guest:guest@127.0.0.1:1/",
        FAIRLANE_DATABASE_URL="postgresql+asyncpg://nobody@127.0.0.1:1/none",
    )
    env["FAIRLANE_AUTH_TARGET"] = env["FAIRLANE_AUTH_LISTEN"]
    env["FAIRLANE_QUEUE_TARGET"] = env["FAIRLANE_QUEUE_LISTEN"]
    out = tmp_path / "dev.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fairlane.cli.main",
                "dev",
                "--demo",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 90
            while "demo: 10/10 results" not in out.read_text(errors="replace"):
                assert proc.poll() is None, out.read_text(errors="replace")
                assert time.monotonic() < deadline, out.read_text(errors="replace")
                time.sleep(0.2)
            text = out.read_text(errors="replace")
            assert "in the order sent" in text
            assert env["FAIRLANE_QUEUE_LISTEN"] in text  # the endpoints are printed
            assert "grpcurl" in text
            assert (tmp_path / "data" / "fairlane.db").exists()
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                stacks = _stacks(proc.pid)  # the output has the services' stop_slow lines
                pytest.fail(
                    f"running 10 s after Ctrl-C:\n{stacks}\n{out.read_text(errors='replace')}"
                )
        finally:
            if proc.poll() is None:
                proc.kill()
    assert code == 0, out.read_text(errors="replace")
    assert time.monotonic() - started < 10
