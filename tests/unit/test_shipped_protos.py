"""The copies of grpc.health.v1 and google.rpc under protos/ define the same messages,
enums and methods as the modules the servers are built on, so a client generated from
protos/ speaks exactly what the servers speak."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parents[2] / "protos"


def _compiled(name: str, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "set.binpb"
    well_known = str(resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{PROTOS}", f"-I{well_known}", f"--descriptor_set_out={out}", name]
    assert protoc.main(args) == 0
    found = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return next(f for f in found.file if f.name == name)


def _without_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    # protoc fills json_name in, the Python runtime leaves it out: not part of the shape.
    for field in message.field:
        field.ClearField("json_name")
    for nested in message.nested_type:
        _without_json_names(nested)


def _shape(file: descriptor_pb2.FileDescriptorProto) -> dict[str, object]:
    """What goes on the wire: messages, enums and methods, order aside."""
    for message in file.message_type:
        _without_json_names(message)
    services = {
        s.name: sorted(m.SerializeToString(deterministic=True) for m in s.method)
        for s in file.service
    }
    return {
        "package": file.package,
        "dependencies": sorted(file.dependency),
        "messages": sorted(m.SerializeToString(deterministic=True) for m in file.message_type),
        "enums": sorted(e.SerializeToString(deterministic=True) for e in file.enum_type),
        "services": services,
    }


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("grpc/health/v1/health.proto", health_pb2),
        ("google/rpc/code.proto", code_pb2),
        ("google/rpc/status.proto", status_pb2),
        ("google/rpc/error_details.proto", error_details_pb2),
    ],
)
def test_shipped_copy_matches_what_the_servers_use(
    name: str, module: ModuleType, tmp_path: Path
) -> None:
    served = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(served)
    # grpcio-health-checking registers its copy as grpc_health/v1/health.proto: the file
    # name differs, the package and everything on the wire must not.
    assert served.name.replace("grpc_health/", "grpc/health/") == name
    assert _shape(_compiled(name, tmp_path)) == _shape(served)


def test_every_shipped_proto_is_ours_or_a_checked_copy() -> None:
    ours = {p.relative_to(PROTOS).as_posix() for p in (PROTOS / "fairlane").rglob("*.proto")}
    copies = {
        "grpc/health/v1/health.proto",
        "google/rpc/code.proto",
        "google/rpc/status.proto",
        "google/rpc/error_details.proto",
    }
    shipped = {p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto")}
    assert shipped == ours | copies
