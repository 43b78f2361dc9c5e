"""Prometheus metrics of every service (prefix fairlane_) and the /metrics endpoint."""

from __future__ import annotations

import gc
import time

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter(
    "fairlane_requests", "Requests that reached a final status.", ["handler", "status"]
)
ACCEPTED = Counter("fairlane_accepted", "Requests accepted by the queue service.")
REJECTIONS = Counter("fairlane_rejections", "Enqueues rejected, by reason.", ["reason"])
IN_FLIGHT = Gauge("fairlane_in_flight", "Requests running on this worker.")
ACTIVE_LANES = Gauge("fairlane_active_lanes", "Lanes this worker consumes.")
BUSY_LANES = Gauge(
    "fairlane_busy_lanes",
    "Lanes this worker is the active consumer of (a delivery within the busy window).",
)
LANES_RELEASED = Counter(
    "fairlane_lanes_released",
    "Lanes this worker handed to another replica to even out the busy lanes.",
)
LANE_DEPTH = Gauge("fairlane_lane_depth", "Queued (not yet started) requests in the deepest lane.")
QUEUED_REQUESTS = Gauge("fairlane_queued_requests", "Queued requests across all lanes.")
OPEN_SESSIONS = Gauge("fairlane_open_sessions", "Session streams open on this queue replica.")
RETRIES = Counter("fairlane_retries", "Handler attempts that failed and were retried.", ["handler"])
DEAD_LETTERED = Counter("fairlane_dead_lettered", "Requests sent to fairlane.dead.", ["handler"])
HANDLER_SECONDS = Histogram(
    "fairlane_handler_duration_seconds",
    "Time spent in one handler attempt.",
    ["handler"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120),
)
QUEUE_WAIT_SECONDS = Histogram(
    "fairlane_queue_wait_seconds",
    "Time from acceptance to the first attempt.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5, 30, 300),
)
DB_BATCH_SIZE = Histogram(
    "fairlane_db_batch_size",
    "Requests written per request-log transaction.",
    ["writer"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
)
DB_BATCH_SECONDS = Histogram(
    "fairlane_db_batch_seconds",
    "Duration of one request-log transaction.",
    ["writer"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
PUBLISH_SECONDS = Histogram(
    "fairlane_broker_publish_seconds",
    "Time from publish to broker confirm.",
    ["exchange"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)

OUTBOX_BACKLOG = Gauge(
    "fairlane_outbox_backlog", "Accepted requests this queue replica has yet to publish."
)
OUTBOX_RECOVERED = Counter(
    "fairlane_outbox_recovered",
    "Accepted requests published from the outbox by a replica that did not accept them.",
)
LOG_MAINTENANCE_TIMESTAMP = Gauge(
    "fairlane_log_maintenance_timestamp_seconds",
    "Unix time this queue replica last completed a request-log maintenance pass.",
)
LOG_PARTITIONS_PAST_RETENTION = Gauge(
    "fairlane_log_partitions_past_retention",
    "Day partitions past retention that the last pass kept (unfinished or recent requests).",
)
LOG_REMOVED = Counter(
    "fairlane_log_removed",
    "Request-log partitions dropped (PostgreSQL) or requests deleted (SQLite) by retention.",
)
RELAY_PUBLISH_FAILURES = Counter(
    "fairlane_relay_publish_failures",
    "Lane publishes that failed and will be retried, by error.",
    ["error"],
)
BATCH_SPLITS = Counter(
    "fairlane_batch_splits",
    "Batches split in two because an item made the write fail, by stage.",
    ["stage"],
)
ITEM_FAILURES = Counter(
    "fairlane_item_failures",
    "Single requests or outcomes the request log refused, by stage.",
    ["stage"],
)
BROKER_BLOCKED = Gauge(
    "fairlane_broker_blocked",
    "1 while RabbitMQ blocks a connection of this process (memory or disk alarm).",
)
STAGE_STALLED = Gauge(
    "fairlane_stage_stalled",
    "1 while a batch stage has work but made no progress for stall_seconds.",
    ["stage"],
)
STAGE_SECONDS = Histogram(
    "fairlane_stage_seconds",
    "Time one request spends in a batch stage: intake (submit to commit), relay (commit "
    "to broker confirm), results (outcome to durable).",
    ["stage"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
LANE_FAILURES = Counter(
    "fairlane_lane_failures",
    "Lane tasks that ended unexpectedly and were rebuilt (worker).",
)
REVOCATION_LIST_AGE = Gauge(
    "fairlane_revocation_list_age_seconds",
    "While fetching the revoked token families fails: seconds since this process's list "
    "was last brought up to date (revocations made since are not enforced). 0 while the "
    "latest fetch succeeded.",
)


LOOP_LAG_SECONDS = Histogram(
    "fairlane_event_loop_lag_seconds",
    "How late the event loop ran a timer, sampled four times a second: how long any task "
    "of this process waits for its turn. High while the database, the broker and the "
    "service's own RPC handling times stay low: the process's CPU is the bottleneck.",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
GC_PAUSE_SECONDS = Histogram(
    "fairlane_gc_pause_seconds",
    "Time the process stood still in one garbage collection, by generation: every task of "
    "the event loop waits for it, so long ones show in every stage's tail latency.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
)


class _GcTimer:
    """prometheus-client counts collections (python_gc_collections_total) but not how long
    they stop the process; gc.callbacks is the one place that sees both ends of one."""

    def __init__(self) -> None:
        self._started = 0.0
        self._children = [GC_PAUSE_SECONDS.labels(str(g)) for g in range(3)]

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._children[info["generation"]].observe(time.perf_counter() - self._started)


def time_gc() -> None:
    """Observes every garbage collection of this process in GC_PAUSE_SECONDS (once)."""
    if not any(isinstance(cb, _GcTimer) for cb in gc.callbacks):
        gc.callbacks.append(_GcTimer())


def serve_metrics(host: str, port: int) -> None:
    """Expose /metrics; port 0 disables it (embedded runs and tests)."""
    time_gc()
    if port:
        start_http_server(port, addr=host)
