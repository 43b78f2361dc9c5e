"""Tracing helpers: one trace per request across gRPC and the broker (W3C traceparent).

Spans are only built when a tracer provider is installed (fairlane_server.core.telemetry), so the
hot path pays nothing for tracing that goes nowhere.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

tracer = trace.get_tracer("fairlane")
_propagator = TraceContextTextMapPropagator()
_enabled = False


def enable() -> None:
    global _enabled
    _enabled = True


def enabled() -> bool:
    return _enabled


def traceparent(span: Span | None = None) -> str:
    """The W3C traceparent of `span` (or the current span); empty when not tracing."""
    if not _enabled:
        return ""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    _propagator.inject(carrier, context=ctx)
    return carrier.get("traceparent", "")


def parent(traceparent_value: str) -> context.Context | None:
    if not traceparent_value:
        return None
    return _propagator.extract({"traceparent": traceparent_value})


def trace_id(span: Span | None) -> str:
    if span is None:
        return ""
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def start(
    name: str,
    *,
    parent_span: Span | None = None,
    parent_traceparent: str = "",
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: dict[str, Any] | None = None,
    links: list[Span] | None = None,
) -> Span | None:
    """Starts (not as current) a span, or returns None when not tracing."""
    if not _enabled:
        return None
    if parent_span is not None:
        ctx: context.Context | None = trace.set_span_in_context(parent_span)
    else:
        ctx = parent(parent_traceparent)
    return tracer.start_span(
        name,
        context=ctx,
        kind=kind,
        attributes=attributes,
        links=[Link(s.get_span_context()) for s in links or ()],
    )


def end(span: Span | None, error: BaseException | None = None) -> None:
    if span is None:
        return
    if error is not None:
        span.record_exception(error)
        span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
    span.end()


class current:
    """Makes `span` current for the block (no-op for None), so nested spans and log lines
    carry its ids."""

    def __init__(self, span: Span | None) -> None:
        self._span = span
        self._token: object | None = None

    def __enter__(self) -> None:
        if self._span is not None:
            self._token = context.attach(trace.set_span_in_context(self._span))

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            context.detach(self._token)  # type: ignore[arg-type]


def server_interceptors() -> list[Any]:
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]


def client_interceptors() -> list[Any]:
    if not _enabled:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())  # type: ignore[no-untyped-call]
