"""`buf breaking` against the released contract (protos/release-image.json) passes for
protos/ as they are and fails for a change that breaks a client."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / ".tools/node_modules/.bin/buf"
RELEASE = ROOT / "protos/release-image.json"


def _breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    assert BUF.exists(), "buf is not installed: run `make install`"
    return subprocess.run(
        [str(BUF), "breaking", "--against", str(RELEASE)],
        check=False,
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    workspace = tmp_path / "ws"
    shutil.copytree(ROOT / "protos", workspace / "protos")
    shutil.copy(ROOT / "buf.yaml", workspace / "buf.yaml")
    return workspace


def test_protos_keep_the_released_contract(tmp_path: Path) -> None:
    run = _breaking(_copy(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_renumbered_field_is_reported(tmp_path: Path) -> None:
    workspace = _copy(tmp_path)
    proto = workspace / "protos/fairlane/queue/v1/queue.proto"
    text = proto.read_text()
    assert "uint32 retry_after_ms = 4;" in text
    proto.write_text(text.replace("uint32 retry_after_ms = 4;", "uint32 retry_after_ms = 9;"))
    run = _breaking(workspace)
    assert run.returncode != 0
    assert "retry_after_ms" in run.stdout
