"""Sync handlers that hang, on real auth, queue and worker processes.

A sync handler runs in a thread, which a cancel or a timeout cannot stop. The threads were
the event loop's default executor (min(32, cpu + 4) threads), and an attempt gave its
slot back at once: one user cancelling hung handlers in a loop took every thread, and
every other user's sync handlers queued behind them (marked RUNNING meanwhile); and the
interpreter's exit joined the hung threads, so SIGTERM did not stop the worker.
"""

from __future__ import annotations

import asyncio
import json
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import requests
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import Suite, auth_and_queue, wait_until
from tests.e2e.users import bearer, new_user, run_session

pytestmark = pytest.mark.e2e

HANDLERS = json.dumps(["tests.e2e.thread_handlers:wait_for_flag"])
GRACE = 5.0  # FAIRLANE_GRACE_SECONDS of the suite
HUNG = 8  # the abuser's hung requests: more than the default executor's threads here
FINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "DEAD", "EXPIRED"}


@pytest.fixture
async def cluster(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    """auth + queue; the test starts its workers. Every process must exit with 0."""
    suite = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    assert suite.env()["FAIRLANE_GRACE_SECONDS"] == str(int(GRACE))
    async with auth_and_queue(suite):
        yield suite


class Log:
    """The request log, read as the tests need it."""

    def __init__(self, suite: Suite) -> None:
        self._engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)

    async def statuses(self, ids: list[str]) -> dict[str, str]:
        query = sa.select(requests.c.id, requests.c.status).where(
            requests.c.id.in_([uuid.UUID(i) for i in ids])
        )
        async with self._engine.connect() as conn:
            return {str(row.id): row.status for row in await conn.execute(query)}

    async def close(self) -> None:
        await self._engine.dispose()


class Queue:
    """One user's unary calls to the queue service."""

    def __init__(self, suite: Suite, token: str) -> None:
        self._channel = grpc.aio.insecure_channel(suite.target("queue"))
        self._stub = queue_pb2_grpc.QueueServiceStub(self._channel)
        self._auth = bearer(token)

    async def enqueue(self, handler: str, payload: bytes) -> str:
        reply = await self._stub.Enqueue(
            queue_pb2.EnqueueRequest(handler=handler, payload=payload),
            metadata=self._auth,
            timeout=10,
        )
        return str(reply.request_id)

    async def cancel(self, request_id: str) -> None:
        await self._stub.CancelRequest(
            queue_pb2.CancelRequestRequest(request_id=request_id), metadata=self._auth, timeout=10
        )

    async def close(self) -> None:
        await self._channel.close()


def _log_events(suite: Suite, name: str) -> list[dict[str, Any]]:
    path = suite.log_dir / f"{name}.log"
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


async def test_hung_thread_handlers_starve_no_one_and_do_not_hold_up_sigterm(
    cluster: Suite, tmp_path: Path
) -> None:
    cluster.start_worker("worker0", FAIRLANE_HANDLERS=HANDLERS)
    await cluster.wait_serving("worker0")
    (_, abuser_token), (_, victim_token), (_, late_token) = await asyncio.gather(
        *(new_user(cluster.target("auth")) for _ in range(3))
    )
    abuser, late = Queue(cluster, abuser_token), Queue(cluster, late_token)
    log = Log(cluster)
    never = tmp_path / "never"  # the abuser's handlers wait for it until the end
    try:
        # 1. The abuser's handlers hang; each one the log shows RUNNING is cancelled.
        hung = [await abuser.enqueue("wait_for_flag", str(never).encode()) for _ in range(HUNG)]
        cancelled: set[str] = set()

        async def cancel_what_runs() -> None:
            while True:
                for request_id, status in (await log.statuses(hung)).items():
                    if status == "RUNNING" and request_id not in cancelled:
                        cancelled.add(request_id)
                        await abuser.cancel(request_id)
                await asyncio.sleep(0.02)

        canceller = asyncio.create_task(cancel_what_runs())
        # 2. Meanwhile another user's sync handler (the built-in `cpu`) runs again and
        # again: until the abuser has had all but one of theirs cancelled while running
        # (the old worker let them, each holding a thread), or for 8 s.
        seconds: list[float] = []
        started = time.monotonic()
        try:
            while len(cancelled) < HUNG - 1 and time.monotonic() - started < 8:
                begun = time.monotonic()
                responses = await asyncio.wait_for(
                    run_session(
                        cluster.target("queue"),
                        victim_token,
                        [queue_pb2.EnqueueRequest(handler="cpu", payload=b"1000")],
                    ),
                    10,  # a cpu 1000 takes milliseconds; generous
                )
                seconds.append(time.monotonic() - begun)
                (result,) = [r.result for r in responses if r.WhichOneof("kind") == "result"]
                assert result.status == common_pb2.REQUEST_STATUS_SUCCEEDED
        finally:
            canceller.cancel()
            await asyncio.gather(canceller, return_exceptions=True)
        print(
            f"\n{len(seconds)} cpu 1000 requests beside the hung ones: median "
            f"{statistics.median(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms"
        )
        # Only the first hung request ever ran: the rest wait for its thread, unmarked.
        assert cancelled == {hung[0]}

        async def first_cancelled() -> bool:
            return (await log.statuses(hung[:1]))[hung[0]] == "CANCELLED"

        await wait_until(first_cancelled, 30)
        statuses = await log.statuses(hung)
        assert [statuses[i] for i in hung] == ["CANCELLED"] + ["QUEUED"] * (HUNG - 1)
        # Cancelled while they wait, they end at once, without running.
        for request_id in hung[1:]:
            await abuser.cancel(request_id)

        async def all_cancelled() -> bool:
            return set((await log.statuses(hung)).values()) == {"CANCELLED"}

        await wait_until(all_cancelled, 30)

        # 3. SIGTERM while a handler hangs (its thread, and the abuser's, still run): the
        # worker gives the handler its grace period, then exits anyway, with 0.
        flag = tmp_path / "flag"
        stuck = await late.enqueue("wait_for_flag", str(flag).encode())
        after = await late.enqueue("echo", b"after")

        async def stuck_runs() -> bool:
            return (await log.statuses([stuck]))[stuck] == "RUNNING"

        await wait_until(stuck_runs, 30)
        begun = time.monotonic()
        code = await asyncio.to_thread(cluster.stop, "worker0", signal.SIGTERM, 60)
        took = time.monotonic() - begun
        print(f"worker stopped {took:.1f} s after SIGTERM (grace {GRACE} s)")
        assert code == 0, cluster.log("worker0")
        assert took < GRACE + 5 + 10  # the promise is grace + 5 s; 10 s of slack
        (left,) = [e for e in _log_events(cluster, "worker0") if e["event"].startswith("handler_t")]
        assert (left["event"], left["threads"]) == ("handler_threads_abandoned_at_exit", 2)

        # 4. A new worker finishes what the stopped one handed back: nothing is lost.
        flag.touch()
        cluster.start_worker("worker0", FAIRLANE_HANDLERS=HANDLERS)
        await cluster.wait_serving("worker0")

        async def all_final() -> bool:
            return set((await log.statuses([*hung, stuck, after])).values()) <= FINAL

        await wait_until(all_final, 60)
        statuses = await log.statuses([stuck, after])
        assert (statuses[stuck], statuses[after]) == ("SUCCEEDED", "SUCCEEDED")
    finally:
        never.touch()
        await abuser.close()
        await late.close()
        await log.close()
