"""Lanes rebalance: workers that join while one worker holds every busy lane converge to a
fair share each, lanes handed over between messages keep their order, and nothing is lost
or run twice into the results (the bench's verdict)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.bench.runner import BenchConfig, BenchRun
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import workers
from tests.conftest import DATABASE_URL
from tests.e2e.suite import Suite, wait_until
from tests.e2e.test_fault_drills import base, start  # noqa: F401 - base is a fixture

pytestmark = pytest.mark.e2e
# make soak measures the figure docs/scaling.md gives: 30 busy lanes over 3 workers.
LANES = 30 if float(os.environ.get("FAIRLANE_SOAK_SCALE", "0") or 0) > 0 else 12
WORKERS = ("worker", "worker2", "worker3")


async def busy_by_worker(engine: AsyncEngine) -> dict[str, int]:
    """The workers table: busy lanes of each replica with a recent heartbeat."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(workers.c.worker_id, workers.c.busy_lanes).where(
                workers.c.heartbeat_at > sa.func.now() - sa.text("interval '5 seconds'")
            )
        )
        return {r.worker_id: r.busy_lanes for r in rows}


async def rate(run: BenchRun, seconds: float) -> float:
    """Results per second the bench receives over the next `seconds` (a figure to print,
    never asserted)."""
    before, t0 = run.progress.results, time.monotonic()
    await asyncio.sleep(seconds)
    return (run.progress.results - before) / (time.monotonic() - t0)


async def test_joining_workers_converge_to_a_fair_share_of_busy_lanes(
    base: Suite,  # noqa: F811
) -> None:
    base.extra_env.update(FAIRLANE_REBALANCE_INTERVAL_SECONDS="1", FAIRLANE_DATABASE_POOL_SIZE="3")
    engine = create_engine(base.database_url, schema=base.schema, pool_size=1)
    try:
        await _converge(base, engine)
    finally:
        await engine.dispose()


async def _converge(base: Suite, engine: AsyncEngine) -> None:  # noqa: F811
    await start(base, "queue", "queue")
    await start(base, WORKERS[0], "worker", FAIRLANE_INSTANCE_ID=WORKERS[0])
    run = BenchRun(
        BenchConfig(
            target=base.target("queue"),
            auth_target=base.target("auth"),
            lanes=LANES,
            duration=40,
            window=4,
            handler="sleep",
            sleep_seconds=0.02,
            warmup=0,
            drain_timeout=60,
            backends=False,
            database_url=DATABASE_URL,
            database_schema=base.schema,
        )
    )
    bench = asyncio.create_task(run.run())

    async def one_holds_all() -> bool:
        return (await busy_by_worker(engine)).get(WORKERS[0]) == LANES

    await wait_until(one_holds_all, 30)
    before = await rate(run, 4)
    joined = time.monotonic()
    for name in WORKERS[1:]:
        await start(base, name, "worker", FAIRLANE_INSTANCE_ID=name)
    serving = time.monotonic()
    share = LANES // len(WORKERS)
    seen: dict[str, int] = {}

    async def fair() -> bool:
        nonlocal seen
        seen = await busy_by_worker(engine)
        return (
            set(seen) == set(WORKERS)
            and sum(seen.values()) == LANES
            and all(share - 1 <= n <= share + 1 for n in seen.values())
        )

    await wait_until(fair, 60)
    converged = time.monotonic()
    after = await rate(run, 4)
    report: dict[str, Any] = await asyncio.wait_for(bench, 180)
    counts = report["counts"]
    print(
        f"\nrebalance: {LANES} busy lanes, 1 -> 3 workers: {seen} {converged - joined:.1f} s "
        f"after the first new worker was started, {converged - serving:.1f} s after both "
        f"were serving; "
        f"{before:.0f} results/s before, {after:.0f} after; valid={report['valid']}, "
        f"{counts['results']} results"
    )
    assert report["valid"], report["invalid_reasons"]
    for key in ("lost", "duplicates", "fifo_violations", "unanswered", "stream_errors"):
        assert counts[key] == 0, (key, counts)
    assert report["database"]["ok"], report["database"]
