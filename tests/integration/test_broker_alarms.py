"""RabbitMQ refusing work on its own terms, on a private one-node RabbitMQ (tests/cluster.py)
whose settings the tests may change, unlike the shared broker's:

- a memory alarm blocks the publishing connection (Connection.Blocked): logged with
  RabbitMQ's reason, shown by `AmqpBroker.is_blocked` and the `fairlane_broker_blocked`
  gauge, and undone on Connection.Unblocked, with the publish held meanwhile confirmed;
- a delivery left unacked past consumer_timeout closes the lane's channel: logged as
  `broker_consumer_timeout` with the lane and how to raise the timeout.

The node runs with consumer_timeout = 1 s and checks it every 100 ms (the default check is
once a minute, `channel_tick_interval`), so the timeout is reached within a second or two.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from fairlane_server.core.amqp import AmqpBroker
from tests import cluster
from tests.cluster import RabbitCluster
from tests.conftest import unique
from tests.integration.test_broker_contract import Recorder
from tests.polling import until

pytestmark = pytest.mark.integration

CONSUMER_TIMEOUT_MS = 1000
NORMAL_WATERMARK = "0.4"  # RabbitMQ's default


class AlarmNode(RabbitCluster):
    """One private node with a short consumer_timeout, checked often."""

    def _prepare(self) -> None:
        super()._prepare()
        with (self.root / "rabbitmq.conf").open("a") as conf:
            conf.write(f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n")
        (self.root / "advanced.config").write_text("[{rabbit, [{channel_tick_interval, 100}]}].\n")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AlarmNode]:
    # RabbitMQ's server is installed wherever `make test` runs (it starts the system broker
    # from it): a machine without it fails here rather than skipping the alarms unseen.
    assert cluster.available(), f"no RabbitMQ server at {cluster.SERVER}"
    private = AlarmNode(Path(tmp_path_factory.mktemp("rabbit-alarms")), size=1)
    try:
        asyncio.run(private.start())
        yield private
    finally:
        private.stop()


def blocked_gauge() -> float | None:
    return REGISTRY.get_sample_value("fairlane_broker_blocked")


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_a_memory_alarm_is_seen_and_its_end_too(node: AlarmNode) -> None:
    broker = AmqpBroker(node.url(), lane_max_length=100, publish_timeout=60)
    await broker.connect()
    try:
        await broker.publish_control(b"before")
        assert not broker.is_blocked
        assert blocked_gauge() == 0
        with capture_logs() as logs:
            # Any usage is above this watermark: the node raises its memory alarm at once.
            await node.actl("set_vm_memory_high_watermark", "0.000001")
            try:
                # RabbitMQ blocks a connection when it publishes during the alarm.
                held = asyncio.create_task(broker.publish_control(b"during"))
                await until(lambda: broker.is_blocked, timeout=30)
                assert broker.blocked_reason == "low on memory"
                assert broker.is_connected  # blocked is not down: health must ask for it
                assert blocked_gauge() == 1
                assert not held.done()
            finally:
                await node.actl("set_vm_memory_high_watermark", NORMAL_WATERMARK)
            await until(lambda: not broker.is_blocked, timeout=30)
            await asyncio.wait_for(held, 30)  # confirmed once the alarm cleared
        assert blocked_gauge() == 0
        [blocked] = events(logs, "broker_blocked")
        assert blocked["connection"] == "data"
        assert blocked["reason"] == "low on memory"
        assert blocked["node"] == broker.node
        [unblocked] = events(logs, "broker_unblocked")
        assert unblocked["connection"] == "data"
        assert unblocked["blocked_seconds"] > 0
    finally:
        await broker.close()


async def test_a_consumer_timeout_is_logged_with_the_lane_and_the_cure(node: AlarmNode) -> None:
    broker = AmqpBroker(node.url(), lane_max_length=100, publish_timeout=10)
    await broker.connect()
    lane = unique("lane")
    try:
        await broker.declare_lane(lane)
        await broker.publish_lane(lane, b"long", {})
        rec = Recorder()
        with capture_logs() as logs:
            consumer = await broker.consume_lane(lane, rec, prefetch=4)
            await rec.wait_for(1)  # and never acked
            await until(lambda: not consumer.alive, timeout=30)
            await until(lambda: bool(events(logs, "broker_consumer_timeout")), timeout=5)
        [timed_out] = events(logs, "broker_consumer_timeout")
        assert timed_out["log_level"] == "error"
        assert timed_out["lane"] == lane
        assert timed_out["channel"] == consumer.channel_number
        assert "delivery acknowledgement" in timed_out["error"]
        assert f"{CONSUMER_TIMEOUT_MS} ms" in timed_out["error"]
        assert "consumer_timeout" in timed_out["fix"]
        assert "docs/deploy.md" in timed_out["fix"]
        # The broker put the message back for the lane's next consumer.
        stats = await broker.lane_stats(lane)
        assert stats is not None
        assert stats.messages == 1
    finally:
        await broker.close()
