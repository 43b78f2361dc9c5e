"""Wrapping a grpc.aio method handler's behaviour, for the server interceptors.

grpc.aio has no per-call interceptor hook: an interceptor returns a new method handler
whose behaviour calls the old one. Streaming behaviours come in two shapes (an async
generator, or a coroutine that writes with `context.write`, like grpc_health's Watch) and
the wrapper must keep the shape, because grpc.aio picks how to drive the behaviour from it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

Scope = Callable[[Any, Any], AbstractAsyncContextManager[Any]]
"""scope(request, context): entered around the whole call (for a streaming response, around
every item too, since the generator runs inside it); it yields the request to pass on
(the message, or the request iterator of a client stream), possibly replaced. Exceptions
of the call reach its exit, which may replace them (e.g. by aborting)."""


def wrap(
    handler: grpc.RpcMethodHandler,
    scope: Scope,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """`handler` with every call run inside `scope`."""
    deserializer = request_deserializer or handler.request_deserializer
    serializer = handler.response_serializer
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: Any) -> Any:
            async with scope(request, context) as passed:
                return await inner(passed, context)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(unary, request_deserializer=deserializer, response_serializer=serializer)

    inner_stream = handler.unary_stream or handler.stream_stream
    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    if inspect.isasyncgenfunction(inner_stream):

        async def generated(request: Any, context: Any) -> AsyncIterator[Any]:
            async with scope(request, context) as passed:
                async for response in inner_stream(passed, context):
                    yield response

        return factory(generated, request_deserializer=deserializer, response_serializer=serializer)

    async def written(request: Any, context: Any) -> None:
        async with scope(request, context) as passed:
            await inner_stream(passed, context)

    return factory(written, request_deserializer=deserializer, response_serializer=serializer)
