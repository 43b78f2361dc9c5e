"""`fairlane dev --trace-console`: one span a line (JSON Lines), with the ids the logs use."""

from __future__ import annotations

import json

from opentelemetry.sdk.trace import TracerProvider

from fairlane_server.core.telemetry import json_line


def test_a_span_is_one_line_of_json_with_bare_hex_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    with (
        tracer.start_as_current_span("parent") as parent,
        tracer.start_as_current_span("child") as child,
    ):
        child.set_attribute("fairlane.request_id", "r1")
    line = json_line(child)  # type: ignore[arg-type]
    assert line.endswith("\n")
    assert line.count("\n") == 1
    doc = json.loads(line)
    context = child.get_span_context()
    assert doc["name"] == "child"
    assert doc["context"]["trace_id"] == format(context.trace_id, "032x")
    assert doc["context"]["span_id"] == format(context.span_id, "016x")
    assert doc["parent_id"] == format(parent.get_span_context().span_id, "016x")
    assert doc["attributes"] == {"fairlane.request_id": "r1"}
    root = json.loads(json_line(parent))  # type: ignore[arg-type]
    assert root["parent_id"] is None
