"""What quorum lanes cost a RabbitMQ node: memory per idle lane (one Raft member on each
node of a 3-node cluster) and per lane consumer (one channel and consumer per worker).

Starts the throw-away cluster of the drills (tests/cluster.py), declares N quorum lanes
the way the queue service does, consumes each from W connections (workers) the way
workers do, and prints each node's memory (`rabbitmqctl status`, total allocated) at
every step as JSON:

    .venv/bin/python scripts/quorum_memory.py --lanes 500 --workers 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "clients")]

from fairlane_server.core.amqp import AmqpBroker  # noqa: E402
from tests.cluster import RabbitCluster  # noqa: E402


async def node_memory_mb(cluster: RabbitCluster) -> dict[str, float]:
    out: dict[str, float] = {}
    for node in cluster.nodes:
        status = await cluster.actl("status", "--formatter", "json", node=node)
        total = re.search(r'"total":\{"erlang":(\d+)', status) or re.search(
            r'"total":\{[^}]*"allocated":(\d+)', status
        )
        out[node.name.split("@")[0][-2:]] = round(int(total.group(1)) / 2**20, 1) if total else -1
    return out


async def handler(_delivery: Any) -> None:
    """Nothing is published: the lanes stay idle."""


async def main(lanes: int, worker_count: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="fl-qq-memory-"))
    cluster = RabbitCluster(root)
    steps: dict[str, Any] = {}
    try:
        await cluster.start()
        url = cluster.url()
        steps["empty"] = await node_memory_mb(cluster)
        queue_service = AmqpBroker(url, lane_max_length=10_000, queue_type="quorum")
        await queue_service.connect()
        names = [f"mem-{i:06d}" for i in range(lanes)]
        started = time.monotonic()
        for name in names:
            await queue_service.declare_lane(name)
        steps["declare_seconds"] = round(time.monotonic() - started, 1)
        await asyncio.sleep(5)  # let the Raft members settle before reading memory
        steps["lanes"] = await node_memory_mb(cluster)
        workers = [
            AmqpBroker(url, lane_max_length=10_000, queue_type="quorum")
            for _ in range(worker_count)
        ]
        for worker in workers:
            await worker.connect()
            for name in names:
                await worker.consume_lane(name, handler, prefetch=4)
        await asyncio.sleep(5)
        steps["lanes_and_consumers"] = await node_memory_mb(cluster)
        for worker in workers:
            await worker.close()
        await queue_service.close()
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    nodes = list(steps["empty"])
    per_lane = {n: round((steps["lanes"][n] - steps["empty"][n]) * 1024 / lanes, 1) for n in nodes}
    consumers = sum(steps["lanes_and_consumers"][n] - steps["lanes"][n] for n in nodes)
    return {
        "lanes": lanes,
        "workers": worker_count,
        "memory_mb": steps,
        "kb_per_lane_member": per_lane,
        "kb_per_lane_consumer": round(consumers * 1024 / (lanes * worker_count), 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lanes", type=int, default=500)
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.lanes, args.workers)), indent=2))
