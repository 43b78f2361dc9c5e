"""OpenTelemetry setup from the standard OTEL_* variables."""

from __future__ import annotations

import json
import os
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from fairlane_server.core import tracing


def configure(service: str, *, console: bool = False) -> bool:
    """Installs a tracer provider when spans have somewhere to go; returns whether it did.

    OTLP (gRPC) when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is
    set, the console when asked; otherwise tracing stays a no-op and costs nothing.
    """
    otlp = bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )
    if not otlp and not console:
        return False
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource)
    if otlp:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    if console:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(formatter=json_line)))
    trace.set_tracer_provider(provider)
    tracing.enable()
    return True


_IDS = frozenset({"trace_id", "span_id", "parent_id"})


def _bare_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: v[2:] if k in _IDS and isinstance(v, str) and v.startswith("0x") else _bare_ids(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_bare_ids(v) for v in value]
    return value


def json_line(span: ReadableSpan) -> str:
    """One span as one line of JSON (JSON Lines, as `--trace-console > spans.jsonl`
    promises), its trace and span ids as the logs print them: bare hex, where the SDK's
    own format is indented over many lines with 0x-prefixed ids."""
    return json.dumps(_bare_ids(json.loads(span.to_json(indent=None)))) + os.linesep


def shutdown() -> None:
    """Flushes spans still buffered (called on the way out)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()
