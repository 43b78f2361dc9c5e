"""Request-log rows to protobuf messages."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from fairlane.common.v1 import common_pb2
from fairlane_server.core import status


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def result_from_row(row: Any) -> common_pb2.Result:
    return common_pb2.Result(
        request_id=str(row.id),
        lane_seq=row.lane_seq or 0,
        status=status.to_proto(row.status),
        output=row.output or b"",
        error=row.error or "",
        attempts=row.attempts,
        client_ref=row.client_ref,
        handler=row.handler,
    )


def request_from_row(row: Any) -> common_pb2.Request:
    m = row._mapping
    return common_pb2.Request(
        request_id=str(m["id"]),
        user_id=str(m["user_id"]),
        handler=m["handler"],
        status=status.to_proto(m["status"]),
        payload=m.get("payload") or b"",
        output=m.get("output") or b"",
        error=m["error"] or "",
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        idempotency_key=m["idempotency_key"] or "",
        client_ref=m["client_ref"],
        lane_seq=m["lane_seq"] or 0,
        enqueued_at=_ts(m["enqueued_at"]),
        started_at=_ts(m["started_at"]),
        finished_at=_ts(m["finished_at"]),
        deadline=_ts(m["deadline"]),
        trace_id=m["trace_id"],
    )


def timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    return _ts(value)
