"""deploy/rabbitmq/fairlane.conf: mounted by compose where RabbitMQ reads it, read by a real
RabbitMQ node (this machine's 3.10, on a private node), and long enough for the lanes."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from fairlane_server.core.settings import Settings
from fairlane_server.queue.relay import MAX_ITEMS_PER_MESSAGE
from tests import cluster
from tests.cluster import RabbitCluster
from tests.deploy.support import DEPLOY
from tests.deploy.test_deploy_compose import compose_json

CONF = DEPLOY / "rabbitmq" / "fairlane.conf"
# The official image reads every file of conf.d, in name order.
TARGET = "/etc/rabbitmq/conf.d/30-fairlane.conf"


def settings() -> dict[str, str]:
    lines = (line.strip() for line in CONF.read_text().splitlines())
    pairs = (line.split("=", 1) for line in lines if line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_compose_mounts_it_into_rabbitmqs_conf_d() -> None:
    config: dict[str, Any] = compose_json()
    [mount] = [v for v in config["services"]["rabbitmq"]["volumes"] if v.get("target") == TARGET]
    assert mount["type"] == "bind"
    assert Path(mount["source"]) == CONF
    assert mount["read_only"] is True


def test_consumer_timeout_covers_every_request_a_worker_holds_of_a_lane() -> None:
    """A lane message is acked when its last request is done, and a worker holds
    FAIRLANE_LANE_PREFETCH of them: the last delivered waits for all before it."""
    timeout_ms = int(settings()["consumer_timeout"])
    held = Settings().lane_prefetch * MAX_ITEMS_PER_MESSAGE
    assert held == 1024  # what the file's comment counts
    per_request = timeout_ms / 1000 / held
    assert per_request >= 60  # a minute per request at least: RabbitMQ's 30 min gave 1.7 s
    assert f"up to {int(per_request)} s each" in CONF.read_text()


class ShippedConfNode(RabbitCluster):
    def _prepare(self) -> None:
        super()._prepare()
        with (self.root / "rabbitmq.conf").open("a") as conf:
            conf.write(CONF.read_text())


def test_rabbitmq_reads_it(tmp_path: Path) -> None:
    assert cluster.available(), f"no RabbitMQ server at {cluster.SERVER}"
    node = ShippedConfNode(tmp_path, size=1)
    try:
        asyncio.run(node.start())
        got = node.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
    finally:
        node.stop()
    assert re.sub(r"\s", "", got) == f"{{ok,{settings()['consumer_timeout']}}}"
