"""The committed stubs must be exactly what the protos generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts/gen_protos.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_stubs_are_up_to_date(tmp_path: Path) -> None:
    fresh = _generator().generate(tmp_path)
    assert fresh, "no stubs were generated"
    committed = ROOT / "clients"
    stale = []
    for path in fresh:
        rel = path.relative_to(tmp_path)
        current = committed / rel
        if not current.exists() or current.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    fresh_set = {p.relative_to(tmp_path) for p in fresh}
    extra = [
        str(p.relative_to(committed))
        for p in (committed / "fairlane").rglob("*_pb2*.py*")
        if p.relative_to(committed) not in fresh_set
    ]
    assert not stale, f"stale generated stubs, run `make gen`: {stale}"
    assert not extra, f"generated stubs without a proto, delete them: {extra}"
