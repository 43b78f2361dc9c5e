"""/metrics and logs of the three services after one known run through real processes.

One module-scoped run (auth, queue, worker as separate processes on RabbitMQ and
PostgreSQL, each with its /metrics on a real port) sends, on one Session of one user:

- N echo requests carrying a recognisable payload, which succeed;
- three `fail` requests: one that fails once and then succeeds (one retry), one that
  fails every attempt of two (one retry, then dead-lettered), one that fails
  permanently (no retry);
- M - 1 more echo requests that the queue's token bucket (burst N + 3, almost no refill)
  rejects with RESOURCE_EXHAUSTED, reason rate_limited.

Then, as unary calls: one more Enqueue of the user (rate limited too, so M in all) and one
Enqueue without a token (UNAUTHENTICATED), for the gRPC server metrics' status codes.

Then every /metrics is scraped and parsed with prometheus_client's parser, the processes
are stopped, and their logs are read. The tests check the counts against that run, that
docs/metrics.md names exactly the fairlane_* series the services export (with their
types and labels), and that the logs are JSON lines without payloads or secrets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.db import drop_schema, migrate
from tests.conftest import DATABASE_URL, broker_url, unique
from tests.e2e.suite import ROOT, Suite
from tests.e2e.users import PASSWORD, bearer, new_user, run_session
from tests.ports import free_ports

pytestmark = pytest.mark.e2e

SERVICES = ("auth", "queue", "worker")
N = 6  # echo requests that succeed
M = 4  # echo requests rejected by the rate limit: M - 1 on the Session, one unary Enqueue
FAILS = 3  # `fail` requests: retried then succeeded, dead-lettered, failed permanently
ADMITTED = N + FAILS
SECRET = b"SECRET-PAYLOAD-123"
SERVICE_SECRET = "e2e-service-secret"  # what Suite.env sets
DOC = ROOT / "docs" / "metrics.md"
LOG_KEYS = ("timestamp", "level", "service", "event")


@dataclass
class Scrape:
    """One parsed /metrics page."""

    text: str = field(repr=False)
    families: dict[str, Metric] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(self.text)}

    def matching(self, name: str, **labels: str) -> list[float]:
        """Values of samples called `name` whose labels include `labels`."""
        return [
            s.value
            for f in self.families.values()
            for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The value of the one sample called `name` with `labels`."""
        found = self.matching(name, **labels)
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples\n{self.fairlane_text}"
        return found[0]

    def total(self, name: str, **labels: str) -> float:
        return sum(self.matching(name, **labels))

    def exposed(self) -> dict[str, Metric]:
        """fairlane_* series by the name they are queried with in PromQL (counters with
        _total, histograms by their base name), without the *_created companions."""
        out: dict[str, Metric] = {}
        for f in self.families.values():
            if not f.name.startswith("fairlane_"):
                continue
            base = f.name.removesuffix("_created")
            if f.name != base and base in self.families:
                continue
            out[f"{f.name}_total" if f.type == "counter" else f.name] = f
        return out

    @property
    def fairlane_text(self) -> str:
        return "\n".join(line for line in self.text.splitlines() if "fairlane_" in line)


@dataclass
class Run:
    responses: list[queue_pb2.SessionResponse] = field(repr=False)
    unary_codes: list[grpc.StatusCode]
    token: str = field(repr=False)
    scrapes: dict[str, Scrape] = field(repr=False)
    logs: dict[str, str] = field(repr=False)
    exit_codes: dict[str, int]


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return Scrape(reply.read().decode())


def enqueues() -> list[queue_pb2.EnqueueRequest]:
    echo = [
        queue_pb2.EnqueueRequest(handler="echo", payload=SECRET, client_ref=f"echo-{i}")
        for i in range(N)
    ]
    fails = [
        queue_pb2.EnqueueRequest(handler="fail", payload=b'{"times": 1}', client_ref="retried"),
        queue_pb2.EnqueueRequest(
            handler="fail", payload=b'{"times": 9}', max_attempts=2, client_ref="dead"
        ),
        queue_pb2.EnqueueRequest(
            handler="fail", payload=b'{"permanent": true}', client_ref="failed"
        ),
    ]
    limited = [
        queue_pb2.EnqueueRequest(handler="echo", payload=SECRET, client_ref=f"limited-{i}")
        for i in range(M - 1)
    ]
    return [*echo, *fails, *limited]


async def unary_enqueue(target: str, token: str | None) -> grpc.StatusCode:
    """One Enqueue outside any Session; returns its status code."""
    metadata = bearer(token) if token else ()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        request = queue_pb2.EnqueueRequest(handler="echo", payload=SECRET)
        try:
            await stub.Enqueue(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def drive(suite: Suite, metrics_ports: dict[str, int]) -> Run:
    """Starts the services, sends the run's requests, scrapes every /metrics."""
    suite.start("auth")
    await suite.wait_serving("auth")
    # Burst ADMITTED, and a refill so slow that no further token arrives during the run.
    suite.start(
        "queue",
        FAIRLANE_USER_BURST=str(ADMITTED),
        FAIRLANE_USER_RATE_PER_SECOND="0.001",
    )
    suite.start("worker")
    await suite.wait_serving("queue")
    await suite.wait_serving("worker")
    _, token = await new_user(suite.target("auth"))
    responses = await run_session(suite.target("queue"), token, enqueues())
    codes = [
        await unary_enqueue(suite.target("queue"), token),
        await unary_enqueue(suite.target("queue"), None),
    ]
    scrapes = {name: await asyncio.to_thread(scrape, port) for name, port in metrics_ports.items()}
    return Run(responses, codes, token, scrapes, {}, {})


@contextlib.contextmanager
def backends() -> Iterator[tuple[str, str]]:
    """A migrated PostgreSQL schema and a RabbitMQ vhost of this module's own (the
    `pg_schema` and `vhost` fixtures, module-scoped), removed afterwards."""
    schema, vhost = unique(), unique()
    asyncio.run(migrate(DATABASE_URL, schema=schema))
    try:
        rabbitmqctl("add_vhost", vhost)
        try:
            rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
            yield schema, vhost
        finally:
            rabbitmqctl("delete_vhost", vhost)
    finally:
        asyncio.run(drop_schema(DATABASE_URL, schema))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """The run described in the module docstring.

    Modelled on the `suite` fixture, but module-scoped (every test here reads the same
    run) and with real metrics ports, which must be in Suite.extra_env before start.
    """
    log_dir = tmp_path_factory.mktemp("metrics-logs")
    with backends() as (schema, vhost):
        suite = Suite(DATABASE_URL, schema, broker_url(vhost), log_dir)
        ports = free_ports(len(SERVICES))
        while set(ports) & set(suite.ports.values()):  # the gRPC ports Suite chose
            ports = free_ports(len(SERVICES))
        metrics_ports = dict(zip(SERVICES, ports, strict=True))
        suite.extra_env.update(
            {f"FAIRLANE_{name.upper()}_METRICS_PORT": str(p) for name, p in metrics_ports.items()}
        )
        try:
            result = asyncio.run(drive(suite, metrics_ports))
            for name, page in result.scrapes.items():  # kept next to the logs, for failures
                (log_dir / f"{name}.metrics").write_text(page.text)
            result.exit_codes = suite.stop_all()
            result.logs = {
                name: (log_dir / f"{name}.log").read_text(errors="replace") for name in SERVICES
            }
            yield result
        finally:
            suite.stop_all()


# --- the run itself -------------------------------------------------------------------


def test_the_run_went_as_planned(run: Run) -> None:
    """N + 3 accepted and finished, M rejected as rate limited; clean shutdown."""
    kinds = [r.WhichOneof("kind") for r in run.responses]
    accepted = [r.accepted for r in run.responses if r.HasField("accepted")]
    rejected = [r.rejected for r in run.responses if r.HasField("rejected")]
    results = {r.result.client_ref: r.result for r in run.responses if r.HasField("result")}
    assert len(accepted) == ADMITTED, kinds
    assert sorted(r.client_ref for r in rejected) == [f"limited-{i}" for i in range(M - 1)]
    assert {r.code for r in rejected} == {grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
    assert all("rate limit" in r.message for r in rejected), rejected
    assert len(results) == ADMITTED
    assert {results[f"echo-{i}"].output for i in range(N)} == {SECRET}
    status = {ref: (r.status, r.attempts) for ref, r in results.items()}
    assert status["retried"] == (common_pb2.REQUEST_STATUS_SUCCEEDED, 2)
    assert status["dead"] == (common_pb2.REQUEST_STATUS_DEAD, 2)
    assert status["failed"] == (common_pb2.REQUEST_STATUS_FAILED, 1)
    assert run.unary_codes == [
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNAUTHENTICATED,
    ]
    assert run.exit_codes == dict.fromkeys(reversed(SERVICES), 0), run.logs


# --- counts -------------------------------------------------------------------------------


def test_worker_metrics_count_the_run(run: Run) -> None:
    w = run.scrapes["worker"]
    # Final statuses, counted once each when the outcome is durable.
    assert w.value("fairlane_requests_total", handler="echo", status="SUCCEEDED") == N
    assert w.value("fairlane_requests_total", handler="fail", status="SUCCEEDED") == 1
    assert w.value("fairlane_requests_total", handler="fail", status="DEAD") == 1
    assert w.value("fairlane_requests_total", handler="fail", status="FAILED") == 1
    assert w.total("fairlane_requests_total") == ADMITTED
    # Attempts: one per echo; fail: 2 (retried) + 2 (dead) + 1 (permanent).
    assert w.value("fairlane_handler_duration_seconds_count", handler="echo") == N
    assert w.value("fairlane_handler_duration_seconds_count", handler="fail") == 5
    assert w.value("fairlane_handler_duration_seconds_bucket", handler="echo", le="+Inf") == N
    assert w.value("fairlane_handler_duration_seconds_sum", handler="echo") > 0
    assert w.value("fairlane_retries_total", handler="fail") == 2
    assert w.matching("fairlane_retries_total", handler="echo") == []
    assert w.value("fairlane_dead_lettered_total", handler="fail") == 1
    assert w.total("fairlane_dead_lettered_total") == 1
    # Nothing running any more; one lane (one user) consumed.
    assert w.value("fairlane_in_flight") == 0
    assert w.value("fairlane_active_lanes") == 1
    # Every outcome written exactly once by the result writer.
    assert w.value("fairlane_db_batch_size_sum", writer="results") == ADMITTED
    batches = w.value("fairlane_db_batch_size_count", writer="results")
    assert 1 <= batches <= ADMITTED
    assert w.value("fairlane_db_batch_seconds_count", writer="results") == batches
    assert w.matching("fairlane_db_batch_size_count", writer="intake") == []
    # Results published to the queue replica, one message to fairlane.dead.
    assert w.value("fairlane_broker_publish_seconds_count", exchange="fairlane.results") >= 1
    assert w.value("fairlane_broker_publish_seconds_count", exchange="fairlane.dead") == 1
    assert w.matching("fairlane_broker_publish_seconds_count", exchange="fairlane.requests") == []
    # Admission happens on the queue only.
    assert w.total("fairlane_rejections_total") == 0
    assert w.value("fairlane_accepted_total") == 0


def test_queue_metrics_count_the_run(run: Run) -> None:
    q = run.scrapes["queue"]
    assert q.value("fairlane_accepted_total") == ADMITTED
    assert q.value("fairlane_rejections_total", reason="rate_limited") == M
    assert q.total("fairlane_rejections_total") == M
    # Every accepted request inserted by the intake writer, once.
    assert q.value("fairlane_db_batch_size_sum", writer="intake") == ADMITTED
    batches = q.value("fairlane_db_batch_size_count", writer="intake")
    assert 1 <= batches <= ADMITTED
    assert q.value("fairlane_db_batch_seconds_count", writer="intake") == batches
    # Lane messages (batched, so at most one per request) and the new lane's announcement.
    lane_publishes = q.value("fairlane_broker_publish_seconds_count", exchange="fairlane.requests")
    assert 1 <= lane_publishes <= ADMITTED
    assert q.value("fairlane_broker_publish_seconds_count", exchange="fairlane.control") >= 1
    # Database breaker closed; the Session is over.
    assert q.value("fairlane_breaker_state", dependency="database") == 0
    assert q.value("fairlane_open_sessions") == 0
    assert q.value("fairlane_lane_depth") >= 0
    assert q.value("fairlane_queued_requests") >= 0
    # Final statuses and attempts are the worker's.
    assert q.total("fairlane_requests_total") == 0
    assert q.total("fairlane_handler_duration_seconds_count") == 0


def test_auth_exports_the_families_but_counts_nothing(run: Run) -> None:
    a = run.scrapes["auth"]
    assert "fairlane_requests" in a.families
    for name in (
        "fairlane_requests_total",
        "fairlane_rejections_total",
        "fairlane_accepted_total",
        "fairlane_handler_duration_seconds_count",
        "fairlane_db_batch_size_count",
        "fairlane_broker_publish_seconds_count",
    ):
        assert a.total(name) == 0, name


def test_histogram_buckets_are_cumulative_and_end_at_the_count(run: Run) -> None:
    for service, s in run.scrapes.items():
        for f in s.families.values():
            if f.type != "histogram" or not f.name.startswith("fairlane_"):
                continue
            series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
            counts: dict[tuple[tuple[str, str], ...], float] = {}
            for sample in f.samples:
                key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                if sample.name.endswith("_bucket"):
                    series.setdefault(key, []).append((float(sample.labels["le"]), sample.value))
                elif sample.name.endswith("_count"):
                    counts[key] = sample.value
            for key, buckets in series.items():
                values = [v for _, v in sorted(buckets)]
                assert values == sorted(values), (service, f.name, key)
                assert values[-1] == counts[key], (service, f.name, key)


def test_queue_wait_is_observed_once_per_started_request(run: Run) -> None:
    waits = sum(s.total("fairlane_queue_wait_seconds_count") for s in run.scrapes.values())
    assert waits == ADMITTED


def test_grpc_server_metrics_count_calls_by_method_and_code(run: Run) -> None:
    q, a, w = run.scrapes["queue"], run.scrapes["auth"], run.scrapes["worker"]
    handled = "fairlane_grpc_server_handled_total"
    queue_service = "fairlane.queue.v1.QueueService"
    assert q.value(handled, grpc_service=queue_service, grpc_method="Session") == 1
    assert q.value(handled, grpc_method="Session", grpc_code="OK") == 1
    assert q.value(handled, grpc_method="Enqueue", grpc_code="RESOURCE_EXHAUSTED") == 1
    assert q.value(handled, grpc_method="Enqueue", grpc_code="UNAUTHENTICATED") == 1
    assert q.total(handled, grpc_method="Enqueue") == 2
    seconds = "fairlane_grpc_server_handling_seconds_count"
    assert q.value(seconds, grpc_service=queue_service, grpc_method="Session") == 1
    assert q.value(seconds, grpc_method="Enqueue") == 2
    auth_service = "fairlane.auth.v1.AuthService"
    assert a.value(handled, grpc_service=auth_service, grpc_method="Register") == 1
    assert a.value(handled, grpc_service=auth_service, grpc_method="Login") == 1
    assert a.value(seconds, grpc_method="Login") == 1
    # Health checks are counted like any other method (wait_serving polled each server).
    for s in (q, a, w):
        assert s.total(handled, grpc_service="grpc.health.v1.Health", grpc_method="Check") >= 1


# --- docs/metrics.md stays true --------------------------------------------------------

_HEADING = re.compile(r"^### `(fairlane_[a-z0-9_]+)`\s*$", re.MULTILINE)
_FIELD = re.compile(r"^- \*\*(Type|Labels):\*\* (.*)$", re.MULTILINE)
_HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


def documented() -> dict[str, dict[str, str]]:
    """Series name -> {"Type": ..., "Labels": ...} from the doc's `### `name`` sections."""
    text = DOC.read_text()
    heads = list(_HEADING.finditer(text))
    out: dict[str, dict[str, str]] = {}
    for head, nxt in zip(heads, [*heads[1:], None], strict=True):
        body = text[head.end() : nxt.start() if nxt else len(text)]
        out[head.group(1)] = {m.group(1): m.group(2).strip() for m in _FIELD.finditer(body)}
    return out


@dataclass
class Series:
    """One fairlane_* series as seen across the three services' scrapes."""

    type: str
    labels: set[str] = field(default_factory=set)
    sampled: bool = False


def exported(run: Run) -> dict[str, Series]:
    out: dict[str, Series] = {}
    for s in run.scrapes.values():
        for name, family in s.exposed().items():
            series = out.setdefault(name, Series(family.type))
            assert series.type == family.type, name
            series.labels.update(k for x in family.samples for k in x.labels if k != "le")
            series.sampled = series.sampled or bool(family.samples)
    return out


def test_docs_name_exactly_the_exported_series(run: Run) -> None:
    docs, live = documented(), exported(run)
    assert docs, f"no '### `fairlane_...`' sections in {DOC}"
    assert sorted(set(docs) - set(live)) == [], "documented but not exported"
    assert sorted(set(live) - set(docs)) == [], "exported but not documented"


def test_docs_give_each_series_its_type_and_labels(run: Run) -> None:
    live = exported(run)
    for name, fields in documented().items():
        series = live[name]
        assert fields.get("Type") == series.type, name
        assert series.sampled, f"{name} has no samples in this run; cannot check its labels"
        said = set(re.findall(r"`([a-z_]+)`", fields.get("Labels", "")))
        assert said == series.labels, name


def test_every_series_the_doc_mentions_exists(run: Run) -> None:
    """Names in PromQL examples too: series names, or a histogram's _bucket/_sum/_count."""
    live = exported(run)
    names = set(live)
    for name, family in live.items():
        if family.type == "histogram":
            names.update(name + part for part in _HISTOGRAM_PARTS)
    mentioned = set(re.findall(r"\bfairlane_[a-z0-9_]*[a-z0-9]\b", DOC.read_text()))
    assert sorted(mentioned - names) == []


# --- logs --------------------------------------------------------------------------------


def test_logs_are_json_lines_with_the_standard_keys(run: Run) -> None:
    for service in SERVICES:
        lines = [line for line in run.logs[service].splitlines() if line.startswith("{")]
        assert lines, f"no JSON log lines from {service}:\n{run.logs[service][-2000:]}"
        for line in lines:
            event = json.loads(line)
            missing = [k for k in LOG_KEYS if k not in event]
            assert not missing, (service, missing, line)
            assert event["service"] == service, line
    # The failing attempts are logged by the worker.
    worker_events = [
        json.loads(line)["event"]
        for line in run.logs["worker"].splitlines()
        if line.startswith("{")
    ]
    assert worker_events.count("attempt_failed") == 3, worker_events


def test_logs_carry_no_payloads_or_secrets(run: Run) -> None:
    forbidden = {
        "payload": SECRET.decode(),
        "payload, base64": base64.b64encode(SECRET).decode(),
        "payload stem": "SECRET-PAYLOAD",
        "password": PASSWORD,
        "access token": run.token,
        "service secret": SERVICE_SECRET,
    }
    for service, text in run.logs.items():
        assert text, f"{service} logged nothing at all"
        for what, value in forbidden.items():
            assert value not in text, f"{service} logged the {what}"
