"""Client-side round robin over several queue replicas, and failover when one dies."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fairlane.client import Client, Status
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import Suite
from tests.ports import free_port

pytestmark = pytest.mark.e2e

HOLD_SECONDS = 600


@pytest.fixture
async def two_queues(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    try:
        s.start("auth")
        await s.wait_serving("auth")
        for name in ("queue", "queue2"):
            s.ports.setdefault(name, free_port())
            s.ports[f"{name}-metrics"] = free_port()
            s.start(
                name,
                "queue",
                FAIRLANE_QUEUE_LISTEN=s.target(name),
                FAIRLANE_QUEUE_METRICS_PORT=str(s.ports[f"{name}-metrics"]),
                # Far longer than any test waits: a lane moves between the replicas only
                # by the handover on demand (lane-wanted notifications), not because the
                # holder idled or its sweep found the other replica's rows gone stale.
                FAIRLANE_RELAY_HOLD_SECONDS=str(HOLD_SECONDS),
                FAIRLANE_OUTBOX_STALE_SECONDS=str(HOLD_SECONDS),
            )
        s.start("worker")
        for name in ("queue", "queue2", "worker"):
            await s.wait_serving(name)
        yield s
    finally:
        codes = s.stop_all()
    assert all(c in (0, -signal.SIGKILL) for c in codes.values()), {n: s.log(n) for n in codes}


def _enqueues_handled(suite: Suite, name: str) -> float:
    url = f"http://127.0.0.1:{suite.ports[name + '-metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "fairlane_grpc_server_handled_total"
                and sample.labels.get("grpc_method") == "Enqueue"
            ):
                total += sample.value
    return total


async def test_round_robin_over_replicas_and_failover(two_queues: Suite) -> None:
    s = two_queues
    targets = f"{s.target('queue')},{s.target('queue2')}"
    async with Client(s.target("auth"), targets) as client:
        name = f"rr-{uuid.uuid4().hex[:8]}"
        await client.register(name, "correct horse battery")
        await client.login(name, "correct horse battery")
        first = [await client.enqueue("echo", b"x", idempotency_key=f"a{i}") for i in range(40)]
        assert len({e.request_id for e in first}) == 40
        spread = (_enqueues_handled(s, "queue"), _enqueues_handled(s, "queue2"))
        assert spread[0] > 0
        assert spread[1] > 0
        assert sum(spread) == 40

        s.stop("queue", signal.SIGKILL)
        # The channel notices the dead replica and sends everything to the live one;
        # a call caught on the dead connection is retried (it carries an idempotency key).
        after = [await client.enqueue("echo", b"y", idempotency_key=f"b{i}") for i in range(20)]
        assert len({e.request_id for e in after}) == 20
        assert _enqueues_handled(s, "queue2") >= spread[1] + 20
    print(
        f"\n40 enqueues over two replicas: {spread[0]:.0f} / {spread[1]:.0f}; "
        "20 more after killing one, all accepted"
    )


async def test_a_lane_held_by_one_replica_is_handed_to_the_other_on_demand(
    two_queues: Suite,
) -> None:
    """One user enqueues through one replica, then through the other: the second replica
    cannot publish until the first lets go of the lane, which it does when asked, not after
    its hold time or once the rows are stale (600 s each here)."""
    s = two_queues
    name = f"ho-{uuid.uuid4().hex[:8]}"
    async with (
        Client(s.target("auth"), s.target("queue")) as first,
        Client(s.target("auth"), s.target("queue2")) as second,
    ):
        await first.register(name, "correct horse battery")
        await first.login(name, "correct horse battery")
        await second.login(name, "correct horse battery")
        sent: list[str] = []
        results = []
        results_stream = first.watch()
        # Back and forth, each result awaited before the next enqueue: every request finds
        # the lane held by the other replica, idle, with nothing left of its own to publish.
        async with asyncio.timeout(60):
            for i in range(6):
                via = first if i % 2 == 0 else second
                sent.append((await via.enqueue("echo", b"%d" % i)).request_id)
                results.append(await anext(results_stream))
        await results_stream.aclose()
    assert [r.request_id for r in results] == sent
    assert [r.lane_seq for r in results] == list(range(1, len(sent) + 1))
    assert all(r.status == Status.SUCCEEDED for r in results)
