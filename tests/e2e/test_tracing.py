"""One trace per request, through three service processes and the broker, received by an
in-test OTLP collector; and log lines that carry the trace id."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.otlp_collector import Collector
from tests.e2e.suite import Suite, serving
from tests.e2e.users import new_user

pytestmark = pytest.mark.e2e


@pytest.fixture
async def traced(
    pg_schema: str, vhost: str, tmp_path: Path
) -> AsyncIterator[tuple[Suite, Collector]]:
    collector = Collector()
    await collector.start()
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.extra_env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="100",
        FAIRLANE_RETRY_BASE_SECONDS="0.01",
    )
    try:
        async with serving(s):
            yield s, collector
    finally:
        await collector.stop()


def _tree(spans: list[dict[str, Any]], root: str, depth: int = 0) -> list[str]:
    lines = []
    for span in sorted((s for s in spans if s["parent"] == root), key=lambda s: s["start"]):
        lines.append(f"{'  ' * depth}{span['name']}  [{span['service']}]")
        lines += _tree(spans, span["span_id"], depth + 1)
    return lines


async def test_one_trace_follows_a_request_through_every_hop(
    traced: tuple[Suite, Collector],
) -> None:
    suite, collector = traced
    _, token = await new_user(suite.target("auth"))
    # The client's own span, from a private provider (the test process exports nothing).
    client_tracer = TracerProvider().get_tracer("test-client")
    with client_tracer.start_as_current_span("client submit") as client_span:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
    trace_id = format(client_span.get_span_context().trace_id, "032x")
    client_id = format(client_span.get_span_context().span_id, "016x")

    async def one() -> AsyncIterator[queue_pb2.SessionRequest]:
        yield queue_pb2.SessionRequest(
            enqueue=queue_pb2.EnqueueRequest(
                handler="fail", payload=b'{"times": 1}', max_attempts=2
            )
        )

    metadata = (("authorization", f"Bearer {token}"), ("traceparent", carrier["traceparent"]))
    async with grpc.aio.insecure_channel(suite.target("queue")) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        got = [r async for r in stub.Session(one(), metadata=metadata, timeout=60)]
    assert got[-1].result.output == b"succeeded on attempt 2"

    wanted = {
        "/fairlane.queue.v1.QueueService/Session",
        "enqueue fail",
        "INSERT requests",
        "process fail",
        "attempt 1",
        "attempt 2",
        "UPDATE requests",
        "deliver result",
    }

    def mine() -> list[dict[str, Any]]:
        return [s for s in collector.spans if s["trace_id"] == trace_id]

    async def all_arrived() -> None:
        while not wanted <= {s["name"] for s in mine()}:
            collector.changed.clear()
            await collector.changed.wait()

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_arrived(), 30)
    spans = mine()
    names = {s["name"] for s in spans}
    assert wanted <= names, (sorted(names), sorted({s["name"] for s in collector.spans}))
    by_name = {s["name"]: s for s in spans}
    session = by_name["/fairlane.queue.v1.QueueService/Session"]
    enqueue = by_name["enqueue fail"]
    process = by_name["process fail"]
    assert session["parent"] == client_id
    assert session["service"] == "fairlane-queue"
    assert enqueue["parent"] == session["span_id"]
    assert by_name["INSERT requests"]["parent"] == enqueue["span_id"]
    publish = next(s for s in spans if s["name"].startswith("publish fairlane.lane."))
    assert publish["parent"] == enqueue["span_id"]
    # Across the broker hop: the worker's span continues the request's trace.
    assert process["parent"] == enqueue["span_id"]
    assert process["service"] == "fairlane-worker"
    assert by_name["attempt 1"]["parent"] == process["span_id"]
    assert by_name["attempt 2"]["parent"] == process["span_id"]
    assert by_name["UPDATE requests"]["parent"] == process["span_id"]
    assert by_name["deliver result"]["parent"] == process["span_id"]
    assert by_name["deliver result"]["service"] == "fairlane-queue"
    assert enqueue["attributes"]["messaging.system"].string_value == "rabbitmq"
    assert by_name["INSERT requests"]["attributes"]["db.system"].string_value == "postgresql"
    assert by_name["UPDATE requests"]["attributes"]["db.system"].string_value == "postgresql"
    # The kinds docs/observability.md gives (OTLP numbers them: 2 server, 3 client,
    # 4 producer, 5 consumer).
    kinds = {
        name: by_name[name]["kind"]
        for name in ("enqueue fail", "INSERT requests", "process fail", "UPDATE requests")
    }
    assert kinds == {
        "enqueue fail": 4,
        "INSERT requests": 3,
        "process fail": 5,
        "UPDATE requests": 3,
    }
    assert (session["kind"], publish["kind"]) == (2, 3)
    request_id = enqueue["attributes"]["fairlane.request_id"].string_value
    assert process["attributes"]["fairlane.request_id"].string_value == request_id
    print("\n" + "\n".join(["client submit  [test]", *_tree(spans, client_id, 1)]))

    # The worker's log line about the failed first attempt carries the trace.
    lines = [json.loads(line) for line in suite.log("worker").splitlines() if line.startswith("{")]
    failed = [e for e in lines if e["event"] == "attempt_failed"]
    assert failed
    assert failed[0]["trace_id"] == trace_id
    assert failed[0]["request_id"] == request_id
    assert {"timestamp", "level", "service", "span_id"} <= failed[0].keys()
