"""Request status names shared by the request log and the wire format."""

from __future__ import annotations

from fairlane.common.v1 import common_pb2

QUEUED = "QUEUED"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
EXPIRED = "EXPIRED"
DEAD = "DEAD"

FINAL = frozenset({SUCCEEDED, FAILED, CANCELLED, EXPIRED, DEAD})

_TO_PROTO = {
    QUEUED: common_pb2.REQUEST_STATUS_QUEUED,
    RUNNING: common_pb2.REQUEST_STATUS_RUNNING,
    SUCCEEDED: common_pb2.REQUEST_STATUS_SUCCEEDED,
    FAILED: common_pb2.REQUEST_STATUS_FAILED,
    CANCELLED: common_pb2.REQUEST_STATUS_CANCELLED,
    EXPIRED: common_pb2.REQUEST_STATUS_EXPIRED,
    DEAD: common_pb2.REQUEST_STATUS_DEAD,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


def to_proto(status: str) -> common_pb2.RequestStatus.ValueType:
    return _TO_PROTO[status]


def from_proto(status: common_pb2.RequestStatus.ValueType) -> str | None:
    return _FROM_PROTO.get(status)
