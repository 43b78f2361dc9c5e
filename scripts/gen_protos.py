"""Generate the Python stubs for protos/ with grpcio-tools.

Usage: python scripts/gen_protos.py [OUT_DIR]   (default: clients/)

The output is committed; tests/unit/test_generated_stubs.py regenerates into a temporary
directory and fails if anything differs, so stale stubs cannot land.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
BIN = Path(sys.executable).parent


def generate(out: Path) -> list[Path]:
    # Only our own protos: the copies of google/rpc and grpc/health under protos/ are
    # already generated in googleapis-common-protos and grpcio-health-checking.
    files = sorted((PROTOS / "fairlane").rglob("*.proto"))
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        # mypy-protobuf types the messages and the (aio) service stubs for mypy --strict.
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(f.relative_to(PROTOS)) for f in files),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted(p for p in (out / "fairlane").rglob("*_pb2*.py*"))
    # Every level below fairlane/ must be a regular package for setuptools and mypy.
    for package in {p.parent for p in generated}:
        level = package
        while level != out / "fairlane":
            (level / "__init__.py").touch()
            level = level.parent
    return generated


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "clients"
    for path in generate(target):
        print(path.relative_to(target))
