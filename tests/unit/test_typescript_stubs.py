"""The committed TypeScript stubs (clients/typescript/src/gen) must be exactly what the
protos generate: a proto change comes with `make gen`, which regenerates both clients."""

from __future__ import annotations

import subprocess
from pathlib import Path

TS = Path(__file__).resolve().parents[2] / "clients" / "typescript"


def test_typescript_stubs_are_up_to_date() -> None:
    assert (TS / "node_modules" / ".bin" / "buf").exists(), "run `make install` (npm ci)"
    run = subprocess.run(
        ["node", "scripts/check-generated.mjs"],
        cwd=TS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, f"{run.stdout}{run.stderr}\nrun `make gen`"
