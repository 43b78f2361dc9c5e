"""`fairlane bench` against the real suite: its correctness checks, never its timings."""

from __future__ import annotations

import asyncio
import http.server
import json
import signal
import sys
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa

from fairlane_server.bench.stats import LaneRecord, summarize
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import requests
from tests.e2e.suite import ROOT, Suite, wait_until
from tests.e2e.test_fault_drills import base, start  # noqa: F401 - base is a fixture

pytestmark = pytest.mark.e2e


async def _bench(suite: Suite, *args: str) -> tuple[int, dict[str, Any], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fairlane.cli.main",
        "bench",
        "--target",
        suite.target("queue"),
        "--auth-target",
        suite.target("auth"),
        "--json",
        "--no-progress",
        *args,
        env=suite.env(),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    assert proc.returncode is not None
    report = json.loads(out) if out.strip() else {}
    return proc.returncode, report, err.decode(errors="replace")


async def _succeeded_per_user(suite: Suite) -> dict[str, int]:
    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(requests.c.user_id, sa.func.count())
                .where(requests.c.status == "SUCCEEDED")
                .group_by(requests.c.user_id)
            )
            return {str(user_id): int(n) for user_id, n in rows.all()}
    finally:
        await engine.dispose()


async def test_short_run_loses_nothing_and_matches_the_request_log(suite: Suite) -> None:
    code, report, err = await _bench(
        suite,
        "--lanes",
        "4",
        "--requests",
        "300",
        "--window",
        "8",
        "--warmup",
        "0.3",
        "--handler",
        "echo",
        "--payload-bytes",
        "16",
        "--database-url",
        suite.database_url,
        "--database-schema",
        suite.schema,
        # By its port: found as a client of the queue only once its channel has connected,
        # which gRPC's reconnect backoff can delay past the bench's start on a slow machine.
        "--worker-target",
        suite.target("worker"),
    )
    assert code == 0, err
    assert report["valid"], report["invalid_reasons"]
    counts = report["counts"]
    assert counts["sent_measured"] == 300
    assert counts["accepted"] == counts["sent"] == counts["results"]
    for key in (
        "lost",
        "duplicates",
        "unanswered",
        "unknown",
        "fifo_violations",
        "answer_order_violations",
        "results_before_accepted",
        "output_mismatches",
        "stream_errors",
    ):
        assert counts[key] == 0, (key, report)
    assert report["results_by_status"] == {"SUCCEEDED": counts["results"]}
    assert report["database"]["ok"], report["database"]
    assert report["database"]["rows_by_status"] == {"SUCCEEDED": counts["results"]}

    # Independently of the tool's own check: the suite's request log holds exactly the
    # results each bench lane received (the schema is fresh, so nothing else is in it).
    lanes = report["lanes"]
    assert len(lanes) == 4
    # --requests is shared out evenly: every lane sends 75 measured requests.
    assert [lane["sent_measured"] for lane in lanes] == [75] * 4
    assert await _succeeded_per_user(suite) == {
        lane["user_id"]: lane["results_succeeded"] for lane in lanes
    }
    # The services under test were found as local processes.
    assert {"auth", "queue", "worker"} <= {p["label"] for p in report["processes"]}
    assert report["latency_ms"]["send_to_result"]["count"] == 300
    # Measuring began only once every lane's Session had answered, not at a fixed time.
    assert report["lanes_started_when_measuring"] == 4
    assert report["seconds"]["lanes_started"] is not None
    assert report["seconds"]["lanes_started"] <= report["seconds"]["warmup"]

    # A second run reuses the bench users and is told apart in the log by its run tag.
    code, again, err = await _bench(
        suite,
        "--lanes",
        "2",
        "--duration",
        "0.5",
        "--warmup",
        "0",
        "--window",
        "4",
        "--database-url",
        suite.database_url,
        "--database-schema",
        suite.schema,
    )
    assert code == 0, err
    assert again["valid"], again["invalid_reasons"]
    assert [lane["user_id"] for lane in again["lanes"]] == [lane["user_id"] for lane in lanes[:2]]
    assert again["database"]["ok"], again["database"]

    # A queue that cannot be reached makes an invalid run and a non-zero exit.
    code, broken, _ = await _bench(
        suite, "--lanes", "1", "--requests", "5", "--warmup", "0", "--target", "127.0.0.1:1"
    )
    assert code == 1
    assert not broken["valid"]
    assert broken["counts"]["stream_errors"] == 1


class _SlowMetrics(http.server.BaseHTTPRequestHandler):
    """A /metrics page whose scrapes after the first take 2 s: the bench's scrape at the end
    of the measured phase is still running when its last lane has drained."""

    scrapes = 0
    PAGE = (
        "# TYPE fairlane_stage_seconds histogram\n"
        'fairlane_stage_seconds_bucket{{stage="intake",le="0.01"}} {n}\n'
        'fairlane_stage_seconds_bucket{{stage="intake",le="+Inf"}} {n}\n'
        'fairlane_stage_seconds_count{{stage="intake"}} {n}\n'
        'fairlane_stage_seconds_sum{{stage="intake"}} {total}\n'
    )

    def do_GET(self) -> None:
        type(self).scrapes += 1
        n = self.scrapes
        if n > 1:
            time.sleep(2.0)
        body = self.PAGE.format(n=10 * n, total=0.01 * n).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


async def test_stage_figures_survive_a_scrape_slower_than_the_drain(suite: Suite) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowMetrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code, report, err = await _bench(
            suite,
            # At the end of sending each lane still has 0.5-1 s of work in flight (one
            # request running, one behind it): long enough for the bench to see the end
            # and start its scrape, short enough to drain while the scrape runs.
            "--lanes",
            "2",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--window",
            "2",
            "--handler",
            "sleep",
            "--sleep",
            "0.5",
            "--metrics",
            f"http://127.0.0.1:{server.server_address[1]}/metrics",
        )
    finally:
        server.shutdown()
        server.server_close()
    assert code == 0, err
    assert report["valid"], report["invalid_reasons"]
    # Scraped once as measuring began (10 intake observations) and once as it ended (20).
    assert report["stages"] == {
        "intake": {"count": 10, "mean_ms": 1.0, "p50_ms": 5.0, "p99_ms": 9.9}
    }


def test_the_checks_see_what_they_should() -> None:
    """The zeros above mean something: the same bookkeeping flags each kind of fault."""
    lane = LaneRecord(index=0, username="bench-0", prefix="t.0.")
    for _ in range(5):
        lane.sent_at.append(0.0)
        lane.measured.append(True)
    for i in (0, 1, 2, 4, 3):  # answers out of send order once
        lane.on_answer(i)
        lane.accepted_at[i] = 0.0
    assert lane.answer_order_violations == 1
    assert lane.parse_ref("t.0.3") == 3
    assert lane.parse_ref("t.0.9") is None  # never sent
    assert lane.parse_ref("t.1.3") is None  # another lane's
    assert lane.on_result(0, 10)
    assert lane.on_result(2, 11)  # 1 skipped: fine so far
    assert lane.on_result(1, 12)  # older request after a newer one: FIFO violation
    assert not lane.on_result(1, 13)  # duplicate
    assert lane.on_result(4, 15)  # lane_seq gap (14 went elsewhere): noted, not a violation
    assert (lane.fifo_violations, lane.duplicates, lane.lane_seq_gaps) == (1, 1, 1)
    assert lane.lost == 1  # 3 was accepted, never finished
    assert lane.unanswered == 0
    assert summarize([0.001 * n for n in range(1, 101)])["p99"] == pytest.approx(99.0)
    assert summarize([])["count"] == 0


async def _succeeded(suite: Suite) -> int:
    return sum((await _succeeded_per_user(suite)).values())


async def test_lanes_of_a_killed_queue_replica_resume_on_the_other(
    base: Suite,  # noqa: F811 - the fixture imported above
) -> None:
    """`--target` names two replicas; one is killed mid-run. Its lanes collect their
    results from WatchResults on the other and go on: every accepted request's result
    arrives exactly once, and the request log agrees."""
    first = await start(base, "queue", "queue")
    second = await start(base, "queue2", "queue")
    await start(base, "worker", "worker")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fairlane.cli.main",
        "bench",
        "--target",
        f"{first},{second}",
        "--auth-target",
        base.target("auth"),
        "--json",
        "--no-progress",
        "--lanes",
        "6",
        "--duration",
        "6",
        "--warmup",
        "0",
        "--window",
        "8",
        "--handler",
        "sleep",
        "--sleep",
        "0.005",
        "--database-url",
        base.database_url,
        "--database-schema",
        base.schema,
        env=base.env(),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    run = asyncio.create_task(proc.communicate())

    async def under_way() -> bool:
        return await _succeeded(base) >= 100

    await wait_until(under_way, 60)
    base.stop("queue", signal.SIGKILL)
    out, err = await asyncio.wait_for(run, 180)
    report = json.loads(out) if out.strip() else {}
    assert proc.returncode == 0, (err.decode(errors="replace")[-3000:], report)
    assert report["valid"], report["invalid_reasons"]
    counts = report["counts"]
    assert counts["resumed_streams"] >= 1  # some lanes really were on the killed replica
    for key in ("lost", "duplicates", "unanswered", "fifo_violations", "stream_errors"):
        assert counts[key] == 0, (key, counts)
    assert report["database"]["ok"], report["database"]
    print(
        f"\nbench resume: {counts['accepted']} accepted, {counts['results']} results, "
        f"{counts['resumed_streams']} sessions resumed, {counts['accepted_by_log']} "
        f"accepted as the replica died, {counts['never_accepted']} never accepted"
    )
