"""Unexpected failures reach a client as INTERNAL with an id and nothing else; a busy pool
as UNAVAILABLE with RetryInfo; undecodable messages as INVALID_ARGUMENT, logged once per
peer a minute. A real grpc.aio server on loopback, handlers made here."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from fairlane.client.errors import retry_delay_ms
from fairlane.worker.v1 import worker_pb2
from fairlane_server.core.errors import MALFORMED, ErrorInterceptor
from fairlane_server.core.grpc_host import GrpcHost, abort
from fairlane_server.core.grpc_metrics import MetricsInterceptor

SERVICE = "fairlane.test.Faulty"
LEAK = "SELECT password_hash FROM users WHERE name = $1 /srv/app/store.py"


async def _explode(request: Any, context: Any) -> bytes:
    raise ValueError(LEAK)


async def _pool(request: Any, context: Any) -> bytes:
    raise PoolTimeout("QueuePool limit of size 10 overflow 0 reached")


class _Deadlock(Exception):
    sqlstate = "40P01"


async def _deadlock(request: Any, context: Any) -> bytes:
    raise OperationalError("SELECT ...", {}, _Deadlock("deadlock detected"))


async def _echo(request: worker_pb2.PauseRequest, context: Any) -> worker_pb2.PauseResponse:
    return worker_pb2.PauseResponse(state=len(request.lane))  # type: ignore[arg-type]


async def _count(requests: AsyncIterator[worker_pb2.PauseRequest], context: Any) -> Any:
    seen = [r async for r in requests]
    return worker_pb2.PauseResponse(state=len(seen))  # type: ignore[arg-type]


async def _explode_mid_stream(request: Any, context: Any) -> AsyncIterator[bytes]:
    yield b"first"
    raise KeyError(LEAK)


def _raw(value: bytes) -> bytes:
    return value


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[MetricsInterceptor(), ErrorInterceptor()])
    pause = {
        "request_deserializer": worker_pb2.PauseRequest.FromString,
        "response_serializer": worker_pb2.PauseResponse.SerializeToString,
    }
    handlers = {
        "Explode": grpc.unary_unary_rpc_method_handler(
            _explode, request_deserializer=_raw, response_serializer=_raw
        ),
        "Pool": grpc.unary_unary_rpc_method_handler(
            _pool, request_deserializer=_raw, response_serializer=_raw
        ),
        "Deadlock": grpc.unary_unary_rpc_method_handler(
            _deadlock, request_deserializer=_raw, response_serializer=_raw
        ),
        "Echo": grpc.unary_unary_rpc_method_handler(_echo, **pause),
        "Count": grpc.stream_unary_rpc_method_handler(_count, **pause),
        "Stream": grpc.unary_stream_rpc_method_handler(
            _explode_mid_stream, request_deserializer=_raw, response_serializer=_raw
        ),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(None)


async def _fail(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value


async def test_unexpected_exceptions_are_internal_with_an_id_only(
    channel: grpc.aio.Channel,
) -> None:
    explode = channel.unary_unary(f"/{SERVICE}/Explode")
    with structlog.testing.capture_logs() as logs:
        errors = [await _fail(explode(b"x")) for _ in range(3)]
    ids = []
    for error in errors:
        assert error.code() == grpc.StatusCode.INTERNAL
        found = re.fullmatch(r"internal error \(id ([0-9a-f]{16})\)", error.details() or "")
        assert found, error.details()
        ids.append(found.group(1))
        assert "ValueError" not in error.debug_error_string()
    assert len(set(ids)) == 3
    logged = [e for e in logs if e["event"] == "internal_error"]
    assert [e["error_id"] for e in logged] == ids
    assert all(e["error"] == LEAK and e["error_type"] == "ValueError" for e in logged)
    # The traceback once a minute per method and exception type.
    assert [("exc_info" in e) for e in logged] == [True, False, False]


async def test_failure_mid_stream(channel: grpc.aio.Channel) -> None:
    stream = channel.unary_stream(f"/{SERVICE}/Stream")
    received: list[bytes] = []

    async def collect() -> None:
        async for item in stream(b"x"):
            received.append(item)

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await collect()
    assert received == [b"first"]
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    assert LEAK not in (failed.value.details() or "")


async def test_pool_exhaustion_is_unavailable_with_retry_info(channel: grpc.aio.Channel) -> None:
    error = await _fail(channel.unary_unary(f"/{SERVICE}/Pool")(b"x"))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "the database is busy, try again",
    )
    assert retry_delay_ms(error) == 1000


async def test_a_transient_database_error_is_unavailable_with_retry_info(
    channel: grpc.aio.Channel,
) -> None:
    with structlog.testing.capture_logs() as logs:
        error = await _fail(channel.unary_unary(f"/{SERVICE}/Deadlock")(b"x"))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "temporarily unavailable, try again",
    )
    assert retry_delay_ms(error) == 1000
    assert [e["event"] for e in logs] == ["transient_error"]
    assert logs[0]["sqlstate"] == "40P01"  # which transient error, for the operator


async def test_malformed_messages_are_invalid_argument_logged_once(
    channel: grpc.aio.Channel,
) -> None:
    echo = channel.unary_unary(f"/{SERVICE}/Echo")
    count = channel.stream_unary(f"/{SERVICE}/Count")
    good = worker_pb2.PauseRequest(lane="abc").SerializeToString()
    assert worker_pb2.PauseResponse.FromString(await echo(good)).state == 3
    assert worker_pb2.PauseResponse.FromString(await count(iter([good, good]))).state == 2
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            error = await _fail(echo(b"\xff\xff\xff"))
            assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
        error = await _fail(count(iter([good, b"\x0a\x05ab"])))
        assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)
    malformed = [e for e in logs if e["event"] == "malformed_message"]
    assert len(malformed) == 1, logs
    assert "exc_info" not in malformed[0]


async def test_health_watch_streams_through_every_interceptor() -> None:
    host = GrpcHost("127.0.0.1:0", ["fairlane.test.Faulty"])
    await host.start()
    await host.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(host.address) as ch:
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
            first = await watch.read()
            watch.cancel()
    finally:
        await host.stop(0)
    assert first.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_call_that_ended_under_its_handler_is_no_server_error() -> None:
    # The race a busy event loop opens: the client's deadline passes, and the handler,
    # which has not seen its cancellation yet, answers. grpc cannot send that answer; the
    # call ends as a cancelled one, with no INTERNAL report and no second abort.
    answered = asyncio.Event()

    async def late(request: Any, context: Any) -> bytes:
        # Swallowed: stands for a cancellation that has not reached this task yet.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)
        try:
            await abort(context, grpc.StatusCode.NOT_FOUND, "no lane yet")
        finally:
            answered.set()

    server = grpc.aio.server(interceptors=[MetricsInterceptor(), ErrorInterceptor()])
    handler = grpc.unary_unary_rpc_method_handler(
        late, request_deserializer=_raw, response_serializer=_raw
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE, {"Late": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with structlog.testing.capture_logs() as logs:
                error = await _fail(ch.unary_unary(f"/{SERVICE}/Late")(b"x", timeout=0.2))
                await asyncio.wait_for(answered.wait(), 10)
                # The interceptor ran right after the handler, in the same task step.
                await asyncio.sleep(0)
    finally:
        await server.stop(None)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [e for e in logs if e["event"] == "internal_error"] == []
