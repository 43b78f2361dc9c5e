"""The committed stubs must be exactly what the protos generate."""

from __future__ import annotations

import importlib.util
import re
import tomllib
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


def _floor(requirements: list[str], name: str) -> tuple[int, ...]:
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}>=([0-9.]+)(,<\d+)?", requirement)
        if match:
            return tuple(int(part) for part in match.group(1).split("."))
    raise AssertionError(f"{name} has no >= floor in {requirements}")


def test_the_client_requires_the_runtimes_its_stubs_check_for() -> None:
    """Generated code refuses to import on an older grpcio or protobuf than generated it,
    so a user pinned to the declared floor would fail at import time."""
    stubs = ROOT / "clients/fairlane/queue/v1"
    grpc_gen = re.search(
        r"GRPC_GENERATED_VERSION = '([0-9.]+)'", (stubs / "queue_pb2_grpc.py").read_text()
    )
    pb_gen = re.search(r"Protobuf Python Version: ([0-9.]+)", (stubs / "queue_pb2.py").read_text())
    assert grpc_gen is not None
    assert pb_gen is not None
    for pyproject in (ROOT / "clients/pyproject.toml", ROOT / "pyproject.toml"):
        requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        for name, generated in (("grpcio", grpc_gen), ("protobuf", pb_gen)):
            needed = tuple(int(part) for part in generated.group(1).split("."))
            assert _floor(requirements, name) >= needed, (pyproject.name, name, needed)
