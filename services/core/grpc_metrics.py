"""Prometheus metrics for every gRPC method a server handles: calls by method and status
code, and their latency. Hand-written because the maintained interceptor packages
(py-grpc-prometheus, grpc-interceptor) do not support grpc.aio servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from fairlane_server.core.grpc_wrap import wrap

HANDLED = Counter(
    "fairlane_grpc_server_handled",
    "RPCs completed on the server, by method and gRPC status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
SECONDS = Histogram(
    "fairlane_grpc_server_handling_seconds",
    "Time from the start to the end of an RPC on the server (whole stream for streams).",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 300),
)


def _code(context: Any, error: BaseException | None) -> str:
    code = context.code()  # set by abort() and by set_code()
    if code is not None:
        return str(code.name)
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, method = handler_call_details.method.lstrip("/").partition("/")
        ok = HANDLED.labels(service, method, "OK")
        seconds = SECONDS.labels(service, method)

        def done(context: Any, started: float, error: BaseException | None) -> None:
            code = _code(context, error)
            (ok if code == "OK" else HANDLED.labels(service, method, code)).inc()
            seconds.observe(time.perf_counter() - started)

        @asynccontextmanager
        async def measured(request: Any, context: Any) -> AsyncIterator[Any]:
            started = time.perf_counter()
            try:
                yield request
            except BaseException as exc:
                done(context, started, exc)
                raise
            done(context, started, None)

        return wrap(handler, measured)
