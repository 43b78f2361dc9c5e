"""gRPC errors with google.rpc details (grpcio-status), e.g. RetryInfo on rejections."""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


def retry_status(code: grpc.StatusCode, message: str, retry_after_ms: int) -> grpc.Status:
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(
            seconds=retry_after_ms // 1000, nanos=(retry_after_ms % 1000) * 1_000_000
        )
    )
    detail = status_pb2.Status().details.add()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return rpc_status.to_status(status)


async def abort_retry(
    context: grpc.aio.ServicerContext,
    code: grpc.StatusCode,
    message: str,
    retry_after_ms: int,
) -> NoReturn:
    await context.abort_with_status(retry_status(code, message, retry_after_ms))
    raise AssertionError("abort_with_status returned")  # pragma: no cover
