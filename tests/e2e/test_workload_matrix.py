"""The workload matrix (issue 12): handler durations x lanes x worker replicas, with
callers that give up, callers that send refused input, and cancels mid-run, on the real
services. A pairwise-covering subset of the cross product: every pair of values of any
two factors meets in at least one case.

Each case is checked as `fairlane bench` checks a run: nothing lost or duplicated, FIFO
kept, no lane_seq gaps, the request log equal to the results, nothing left QUEUED or
RUNNING; and besides, every answer a giving-up caller got is true, refused input is
refused for its sender alone, and the main client is never rejected.

`make soak` runs the same cases longer (FAIRLANE_SOAK_SCALE times the requests) and kills
a worker replica with SIGKILL halfway through each.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import Suite, auth_and_queue
from tests.e2e.workload import MAX_PAYLOAD_BYTES, Case, run_case, service_log_excerpt

pytestmark = pytest.mark.e2e

SOAK_SCALE = float(os.environ.get("FAIRLANE_SOAK_SCALE", "0") or 0)

# Columns: handler ms, lanes, worker replicas, abandoner, bad input, cancels. For each
# duration, two cases with opposite choices of the five yes/no factors; the four choices
# are picked so that any two of those factors are also seen equal and different.
CASES = [
    Case(0, 2, 1),
    Case(0, 20, 3, abandoner=True, bad_input=True, cancels=True),
    Case(20, 2, 3, bad_input=True),
    Case(20, 20, 1, abandoner=True, cancels=True),
    Case(120, 2, 3, abandoner=True),
    Case(120, 20, 1, bad_input=True, cancels=True),
    Case(400, 20, 1),
    Case(400, 2, 3, abandoner=True, bad_input=True, cancels=True),
]


@pytest.fixture
async def services(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    """auth and one queue replica; each case starts its own worker replicas."""
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.extra_env.update(
        # Up to five service processes share PostgreSQL's 100 connections with whatever
        # else runs on the machine: small pools keep a case from running out of them.
        FAIRLANE_DATABASE_POOL_SIZE="4",
        FAIRLANE_MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD_BYTES),
        FAIRLANE_RETRY_BASE_SECONDS="0.05",
        FAIRLANE_RETRY_MAX_SECONDS="0.2",
    )
    async with auth_and_queue(s, kills=True):
        yield s


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_workload_case(services: Suite, case: Case) -> None:
    soak = SOAK_SCALE > 0
    outcome = await run_case(
        services,
        case,
        scale=SOAK_SCALE if soak else 1.0,
        kill_worker=soak,
        timeout=600 if soak else 150,
    )
    assert not outcome.problems, (
        f"{outcome.summary()}\n"
        + "\n".join(outcome.problems[:40])
        + "\n"
        + service_log_excerpt(services)
    )
