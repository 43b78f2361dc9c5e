"""Worker semantics with several worker processes: strict lanes, no head-of-line blocking,
crash takeover, retries and dead letters, cancel and deadlines, control RPCs."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane.worker.v1 import worker_pb2, worker_pb2_grpc
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import request_events, requests
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import Suite, auth_and_queue, wait_until
from tests.e2e.users import admin_token, bearer, new_user, run_session

pytestmark = pytest.mark.e2e
SUCCEEDED = common_pb2.REQUEST_STATUS_SUCCEEDED


@pytest.fixture
async def cluster(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    """auth + queue, and no worker yet: each test starts the replicas it needs."""
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.extra_env.update(FAIRLANE_RETRY_BASE_SECONDS="0.05", FAIRLANE_RETRY_MAX_SECONDS="0.4")
    async with auth_and_queue(s, kills=True):
        yield s


async def workers(suite: Suite, count: int) -> list[str]:
    targets = [suite.start_worker(f"worker{i}") for i in range(count)]
    await asyncio.gather(*(suite.wait_serving(f"worker{i}") for i in range(count)))
    # Handlers are registered in the log before SERVING, so the queue accepts them now.
    return targets


async def _query(suite: Suite, query: Any) -> list[Any]:
    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(query)).all())
    finally:
        await engine.dispose()


async def _running_request(suite: Suite, user_id: str) -> uuid.UUID:
    """The id of the user's request the log shows RUNNING, once it does."""
    running = sa.select(requests.c.id).where(
        requests.c.user_id == uuid.UUID(user_id), requests.c.status == "RUNNING"
    )

    async def is_running() -> bool:
        return bool(await _query(suite, running))

    await wait_until(is_running, 20)
    (request_id,) = [r.id for r in await _query(suite, running)]
    return uuid.UUID(str(request_id))


def _results(responses: list[queue_pb2.SessionResponse]) -> list[common_pb2.Result]:
    return [r.result for r in responses if r.WhichOneof("kind") == "result"]


async def _status(suite: Suite, target: str) -> worker_pb2.GetStatusResponse:
    """GetStatus as an operator (who alone sees the lane ids)."""
    token = await admin_token(suite.target("auth"))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        status: worker_pb2.GetStatusResponse = await stub.GetStatus(
            worker_pb2.GetStatusRequest(), metadata=bearer(token), timeout=10
        )
        return status


async def test_strict_fifo_per_lane_across_three_workers(cluster: Suite) -> None:
    targets = await workers(cluster, 3)
    users = await asyncio.gather(*(new_user(cluster.target("auth")) for _ in range(20)))
    rng = random.Random(7)

    def lane_requests(tag: int) -> list[queue_pb2.EnqueueRequest]:
        return [
            queue_pb2.EnqueueRequest(
                handler="sleep",
                payload=f"{rng.uniform(0.0005, 0.004):.4f}".encode(),
                client_ref=f"{tag}-{i}",
            )
            for i in range(100)
        ]

    started = time.perf_counter()
    got = await asyncio.gather(
        *(
            run_session(cluster.target("queue"), token, lane_requests(n))
            for n, (_, token) in enumerate(users)
        )
    )
    elapsed = time.perf_counter() - started
    violations = 0
    for n, responses in enumerate(got):
        results = _results(responses)
        assert len(results) == 100
        violations += sum(
            1 for i, r in enumerate(results) if r.client_ref != f"{n}-{i}" or r.lane_seq != i + 1
        )
        assert all(r.status == SUCCEEDED for r in results)
    assert violations == 0

    user_ids = [uuid.UUID(u) for u, _ in users]
    rows = await _query(
        cluster,
        sa.select(requests.c.status, sa.func.count())
        .where(requests.c.user_id.in_(user_ids))
        .group_by(requests.c.status),
    )
    assert dict(rows) == {"SUCCEEDED": 2000}
    # Exactly one SUCCEEDED event per request: nothing ran twice to completion.
    per_request = await _query(
        cluster,
        sa.select(request_events.c.request_id, sa.func.count())
        .where(request_events.c.status == "SUCCEEDED")
        .group_by(request_events.c.request_id),
    )
    assert len(per_request) == 2000
    assert {count for _, count in per_request} == {1}
    spread = [len((await _status(cluster, t)).lanes) for t in targets]
    print(f"\n20 lanes x 100 requests, 3 workers: {elapsed:.2f}s, lanes active per worker {spread}")


async def test_a_slow_lane_does_not_delay_the_others(cluster: Suite) -> None:
    await workers(cluster, 1)
    (_, slow_token), *fast = await asyncio.gather(
        *(new_user(cluster.target("auth")) for _ in range(9))
    )
    slow_done: list[float] = []

    async def slow_lane() -> None:
        responses = await run_session(
            cluster.target("queue"),
            slow_token,
            [queue_pb2.EnqueueRequest(handler="sleep", payload=b"2") for _ in range(2)],
        )
        assert [r.status for r in _results(responses)] == [SUCCEEDED, SUCCEEDED]
        slow_done.append(time.perf_counter())

    async def fast_lane(token: str) -> float:
        responses = await run_session(
            cluster.target("queue"),
            token,
            [queue_pb2.EnqueueRequest(handler="echo", payload=b"x") for _ in range(25)],
        )
        assert len(_results(responses)) == 25
        return time.perf_counter()

    started = time.perf_counter()
    slow = asyncio.create_task(slow_lane())
    await asyncio.sleep(0.3)  # the slow handler is running before the fast lanes start
    fast_done = await asyncio.gather(*(fast_lane(token) for _, token in fast))
    await slow
    fast_seconds = max(fast_done) - started
    print(f"\n8 fast lanes x 25 done in {fast_seconds:.2f}s beside a 2 x 2 s lane")
    # Generous: every fast lane finishes before the slow lane's first 2 s request does.
    assert fast_seconds < 2.0
    assert slow_done[0] - started >= 4.0


async def test_kill_9_of_the_running_worker_hands_the_lane_over(cluster: Suite) -> None:
    targets = await workers(cluster, 2)
    user_id, token = await new_user(cluster.target("auth"))
    sent = [queue_pb2.EnqueueRequest(handler="sleep", payload=b"1.5", client_ref="slow")] + [
        queue_pb2.EnqueueRequest(handler="echo", payload=f"{i}".encode(), client_ref=f"e{i}")
        for i in range(10)
    ]
    session = asyncio.create_task(run_session(cluster.target("queue"), token, sent))

    # Once the log shows the slow request RUNNING, find its replica and kill it unwarned.
    await _running_request(cluster, user_id)
    victim = None
    deadline = time.monotonic() + 20
    while victim is None:
        assert time.monotonic() < deadline, "nobody started the request"
        for i, target in enumerate(targets):
            if (await _status(cluster, target)).in_flight:
                victim = i
        await asyncio.sleep(0.05)
    cluster.stop(f"worker{victim}", signal.SIGKILL)

    results = _results(await asyncio.wait_for(session, 60))
    assert [r.client_ref for r in results] == ["slow"] + [f"e{i}" for i in range(10)]
    assert [r.lane_seq for r in results] == list(range(1, 12))
    assert all(r.status == SUCCEEDED for r in results)
    assert results[0].attempts == 2  # started on the dead replica, finished on the other
    survivor = targets[1 - victim]
    assert user_id in (await _status(cluster, survivor)).lanes
    rows = await _query(
        cluster, sa.select(requests.c.status).where(requests.c.user_id == uuid.UUID(user_id))
    )
    assert [r.status for r in rows] == ["SUCCEEDED"] * 11


async def test_a_handler_that_ends_the_worker_process_ends_dead_not_every_worker(
    cluster: Suite,
) -> None:
    """A handler calling os._exit (or segfaulting) killed each worker that took its lane,
    forever; one raising SystemExit stopped the worker. Now the attempts a dead worker
    started count, each recorded before it runs: the request ends DEAD after at most
    max_attempts + 1 runs, and the lane goes on. The test restarts the worker each time
    it dies, as a supervisor would."""
    crashing = json.dumps(
        ["tests.e2e.crash_handlers:exit_process", "tests.e2e.crash_handlers:system_exit"]
    )
    await workers(cluster, 1)
    # The first replica registers the handlers only after its restart with them.
    cluster.stop("worker0")
    cluster.start_worker("worker0", FAIRLANE_HANDLERS=crashing)
    await cluster.wait_serving("worker0")
    user_id, token = await new_user(cluster.target("auth"))
    sent = [
        queue_pb2.EnqueueRequest(handler="exit_process", client_ref="exits"),
        queue_pb2.EnqueueRequest(handler="system_exit", client_ref="raises"),
        queue_pb2.EnqueueRequest(handler="echo", payload=b"after", client_ref="after"),
    ]
    session = asyncio.create_task(run_session(cluster.target("queue"), token, sent))
    deaths: list[int] = []
    async with asyncio.timeout(120):
        while not session.done():
            code = cluster.procs["worker0"].poll()
            if code is not None:
                deaths.append(code)
                cluster.start_worker("worker0", FAIRLANE_HANDLERS=crashing)
            await asyncio.sleep(0.05)
    results = _results(await session)
    assert [r.client_ref for r in results] == ["exits", "raises", "after"]
    exits, raises, after = results
    assert exits.status == common_pb2.REQUEST_STATUS_DEAD
    assert exits.attempts == 2
    assert "the worker stopped during attempt 2" in exits.error
    assert deaths == [7, 7, 7]  # the first run, unrecorded, and the two attempts
    assert raises.status == common_pb2.REQUEST_STATUS_DEAD
    assert raises.attempts == 2
    assert "SystemExit(3)" in raises.error
    assert (after.status, after.output) == (SUCCEEDED, b"after")
    rows = await _query(
        cluster,
        sa.select(requests.c.status, requests.c.attempts)
        .where(requests.c.user_id == uuid.UUID(user_id))
        .order_by(requests.c.lane_seq),
    )
    assert [tuple(r) for r in rows] == [("DEAD", 2), ("DEAD", 2), ("SUCCEEDED", 1)]


async def test_a_cancel_that_finds_its_worker_dead_is_not_lost(cluster: Suite) -> None:
    """The cancel of a running request was a message to the worker running it: if that
    worker had died, the next one ran the request again from the start. The log keeps it
    now; the worker that takes the lane over ends the request CANCELLED without running
    it, and the lane goes on."""
    await workers(cluster, 1)
    user_id, token = await new_user(cluster.target("auth"))
    sent = [
        queue_pb2.EnqueueRequest(handler="sleep", payload=b"30", client_ref="long"),
        queue_pb2.EnqueueRequest(handler="echo", payload=b"after", client_ref="after"),
    ]
    session = asyncio.create_task(run_session(cluster.target("queue"), token, sent))
    long_id = await _running_request(cluster, user_id)
    cluster.stop("worker0", signal.SIGKILL)
    async with grpc.aio.insecure_channel(cluster.target("queue")) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)
        answer = await queue.CancelRequest(
            queue_pb2.CancelRequestRequest(request_id=str(long_id)), metadata=bearer(token)
        )
    assert answer.status == common_pb2.REQUEST_STATUS_RUNNING
    cluster.start_worker("worker0")
    results = _results(await asyncio.wait_for(session, 60))
    assert [(r.client_ref, r.status) for r in results] == [
        ("long", common_pb2.REQUEST_STATUS_CANCELLED),
        ("after", SUCCEEDED),
    ]
    events = await _query(
        cluster,
        sa.select(request_events.c.status, request_events.c.attempt)
        .where(request_events.c.request_id == long_id)
        .order_by(request_events.c.id),
    )
    # Not run again: a run on the new worker would have logged its attempt (RUNNING).
    assert [e.status for e in events] == ["QUEUED", "CANCELLED"]


async def test_fail_is_retried_then_dead_lettered_and_replayed(cluster: Suite) -> None:
    await workers(cluster, 1)
    user_id, token = await new_user(cluster.target("auth"))
    responses = await run_session(
        cluster.target("queue"),
        token,
        [
            queue_pb2.EnqueueRequest(
                handler="fail",
                payload=json.dumps({"times": 4}).encode(),
                max_attempts=3,
                client_ref="doomed",
            ),
            queue_pb2.EnqueueRequest(handler="echo", payload=b"next", client_ref="next"),
        ],
    )
    doomed, following = _results(responses)
    assert doomed.status == common_pb2.REQUEST_STATUS_DEAD
    assert doomed.attempts == 3
    assert "failing attempt 3 of 4" in doomed.error
    assert (following.client_ref, following.status) == ("next", SUCCEEDED)

    events = await _query(
        cluster,
        sa.select(request_events.c.status, request_events.c.attempt, request_events.c.at)
        .where(request_events.c.request_id == uuid.UUID(doomed.request_id))
        .order_by(request_events.c.id),
    )
    assert [(e.status, e.attempt) for e in events] == [
        ("QUEUED", 0),
        ("RUNNING", 1),
        ("RUNNING", 2),
        ("RUNNING", 3),
        ("DEAD", 3),
    ]

    # The dead letter carries the request and its history.
    connection = await aio_pika.connect(cluster.broker_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue("fairlane.dead", durable=True)
        message = await dead.get(timeout=10, fail=True)
        assert message is not None
        await message.ack()
    headers = message.headers
    assert headers["request_id"] == doomed.request_id
    history = json.loads(str(headers["history"]))
    assert [h["attempt"] for h in history] == [1, 2, 3]

    async with grpc.aio.insecure_channel(cluster.target("queue")) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)
        listed = await queue.ListDeadRequests(
            queue_pb2.ListDeadRequestsRequest(), metadata=bearer(token)
        )
        assert [r.request_id for r in listed.requests] == [doomed.request_id]
        replay = await queue.ReplayDeadRequest(
            queue_pb2.ReplayDeadRequestRequest(request_id=doomed.request_id, max_attempts=6),
            metadata=bearer(token),
        )
        watch = queue.WatchResults(
            queue_pb2.WatchResultsRequest(after_lane_seq=following.lane_seq),
            metadata=bearer(token),
            timeout=30,
        )
        replayed = (await watch.read()).result
        watch.cancel()
        assert (replayed.request_id, replayed.status) == (replay.request_id, SUCCEEDED)
        assert replayed.output == b"succeeded on attempt 5"
        # A repeated call (its first answer lost, say) names the first replay and runs
        # nothing more: before, every call enqueued the request once more.
        again = await queue.ReplayDeadRequest(
            queue_pb2.ReplayDeadRequestRequest(request_id=doomed.request_id),
            metadata=bearer(token),
        )
        assert again.request_id == replay.request_id
        ids = await _query(
            cluster, sa.select(requests.c.id).where(requests.c.user_id == uuid.UUID(user_id))
        )
        assert {str(r.id) for r in ids} == {
            doomed.request_id,
            following.request_id,
            replay.request_id,
        }
        not_dead = queue.ReplayDeadRequest(
            queue_pb2.ReplayDeadRequestRequest(request_id=following.request_id),
            metadata=bearer(token),
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await not_dead
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The request is checked before anything is looked up: a bad max_attempts is the
        # caller's mistake whatever the id names.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await queue.ReplayDeadRequest(
                queue_pb2.ReplayDeadRequestRequest(request_id=str(uuid.uuid4()), max_attempts=101),
                metadata=bearer(token),
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_dead_requests_with_large_payloads_are_listed_in_pages_under_the_limit(
    cluster: Suite,
) -> None:
    """ListDeadRequests returns payloads: ten dead requests of almost 1 MiB each made one
    page of 10 MB, over gRPC's 8 MiB message limit, so none of them could be listed."""
    await workers(cluster, 1)
    _, token = await new_user(cluster.target("auth"))
    payload = json.dumps({"times": 9, "pad": "x" * 1_000_000}).encode()
    sent = [
        queue_pb2.EnqueueRequest(
            handler="fail", payload=payload, max_attempts=1, client_ref=f"d{i}"
        )
        for i in range(10)
    ]
    results = _results(await run_session(cluster.target("queue"), token, sent))
    assert [r.status for r in results] == [common_pb2.REQUEST_STATUS_DEAD] * 10
    async with grpc.aio.insecure_channel(cluster.target("queue")) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)
        pages: list[queue_pb2.ListDeadRequestsResponse] = []
        page_token = ""
        while True:
            page = await queue.ListDeadRequests(
                queue_pb2.ListDeadRequestsRequest(page_size=50, page_token=page_token),
                metadata=bearer(token),
            )
            pages.append(page)
            page_token = page.next_page_token
            if not page_token:
                break
    listed = [r for page in pages for r in page.requests]
    assert sorted(r.request_id for r in listed) == sorted(r.request_id for r in results)
    assert all(r.payload == payload for r in listed)
    assert len(pages) > 1
    assert all(page.ByteSize() <= 4 * 1024 * 1024 for page in pages)


async def test_progress_deadline_and_cancel(cluster: Suite) -> None:
    await workers(cluster, 1)
    _, token = await new_user(cluster.target("auth"))
    soon = timestamp_pb2.Timestamp()
    soon.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))

    async with grpc.aio.insecure_channel(cluster.target("queue")) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)
        call = queue.Session(metadata=bearer(token), timeout=60)
        for req in [
            queue_pb2.EnqueueRequest(handler="sleep", payload=b"0.4", client_ref="progress"),
            queue_pb2.EnqueueRequest(handler="sleep", payload=b"30", client_ref="long"),
            queue_pb2.EnqueueRequest(
                handler="echo", payload=b"late", deadline=soon, client_ref="expires"
            ),
            queue_pb2.EnqueueRequest(handler="echo", payload=b"q", client_ref="queued"),
            queue_pb2.EnqueueRequest(handler="echo", payload=b"after", client_ref="after"),
        ]:
            await call.write(queue_pb2.SessionRequest(enqueue=req))
        ids: dict[str, str] = {}
        events: list[queue_pb2.SessionResponse] = []
        cancelled_long = cancelled_queued = False
        while True:
            response = await call.read()
            assert response is not grpc.aio.EOF
            events.append(response)
            kind = response.WhichOneof("kind")
            if kind == "accepted":
                ids[response.accepted.client_ref] = response.accepted.request_id
            if (
                kind == "progress"
                and response.progress.request_id == ids.get("long")
                and not cancelled_long
            ):
                # The 30 s handler is running: cancel a queued one behind it, then it.
                await call.write(
                    queue_pb2.SessionRequest(
                        cancel=queue_pb2.CancelRequestRequest(request_id=ids["queued"])
                    )
                )
                await call.write(
                    queue_pb2.SessionRequest(
                        cancel=queue_pb2.CancelRequestRequest(request_id=ids["long"])
                    )
                )
                cancelled_long = cancelled_queued = True
            if kind == "result" and response.result.client_ref == "after":
                break
        await call.done_writing()

    results = {r.client_ref: r for r in _results(events)}
    progress = [
        e.progress
        for e in events
        if e.WhichOneof("kind") == "progress" and e.progress.request_id == ids["progress"]
    ]
    assert [(p.done, p.total) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    kinds = [(e.WhichOneof("kind"), e.progress.request_id or e.result.request_id) for e in events]
    assert kinds.index(("result", ids["progress"])) > kinds.index(("progress", ids["progress"]))
    assert cancelled_long
    assert cancelled_queued
    assert results["long"].status == common_pb2.REQUEST_STATUS_CANCELLED
    assert results["expires"].status == common_pb2.REQUEST_STATUS_EXPIRED
    assert results["queued"].status == common_pb2.REQUEST_STATUS_CANCELLED
    assert results["queued"].attempts == 0
    assert results["after"].status == SUCCEEDED
    assert [r.lane_seq for r in _results(events)] == [1, 2, 3, 4, 5]


async def test_pause_resume_and_drain(cluster: Suite) -> None:
    (first,) = await workers(cluster, 1)
    user_id, token = await new_user(cluster.target("auth"))
    other_id, other = await new_user(cluster.target("auth"))
    admin = bearer(await admin_token(cluster.target("auth")))
    async with (
        grpc.aio.insecure_channel(first) as wch,
        grpc.aio.insecure_channel(cluster.target("queue")) as qch,
    ):
        worker = worker_pb2_grpc.WorkerServiceStub(wch)
        queue = queue_pb2_grpc.QueueServiceStub(qch)
        # Users and anonymous callers control nothing, not even their own lane.
        for metadata, code in (
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (bearer(other), grpc.StatusCode.PERMISSION_DENIED),
        ):
            for control in (
                worker.Pause(worker_pb2.PauseRequest(lane=user_id), metadata=metadata),
                worker.Pause(worker_pb2.PauseRequest(), metadata=metadata),
                worker.Resume(worker_pb2.ResumeRequest(), metadata=metadata),
                worker.Drain(worker_pb2.DrainRequest(timeout_seconds=1), metadata=metadata),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await control
                assert refused.value.code() == code
        # A lane is named by its user id: anything else is refused as such, not as unknown
        # (the id's upper-case spelling names the same lane: below).
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await worker.Pause(worker_pb2.PauseRequest(lane="not-a-uuid\0"), metadata=admin)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        paused = await worker.Pause(worker_pb2.PauseRequest(), metadata=admin)
        assert paused.state == worker_pb2.WORKER_STATE_PAUSED
        assert (await _status(cluster, first)).state == worker_pb2.WORKER_STATE_PAUSED

        enq = await queue.Enqueue(
            queue_pb2.EnqueueRequest(handler="echo", payload=b"p"), metadata=bearer(token)
        )

        async def request_status(request_id: str) -> int:
            got = await queue.GetRequest(
                queue_pb2.GetRequestRequest(request_id=request_id), metadata=bearer(token)
            )
            return int(got.request.status)

        # While paused nothing runs: the request stays QUEUED for a full second.
        for _ in range(10):
            assert await request_status(enq.request_id) == common_pb2.REQUEST_STATUS_QUEUED
            await asyncio.sleep(0.1)

        # A user sees the state but neither lane ids nor the host.
        seen = await worker.GetStatus(worker_pb2.GetStatusRequest(), metadata=bearer(token))
        assert seen.state == worker_pb2.WORKER_STATE_PAUSED
        assert (seen.worker_id, list(seen.lanes), list(seen.paused_lanes)) == ("", [], [])
        assert user_id in (await _status(cluster, first)).lanes
        await worker.Pause(worker_pb2.PauseRequest(lane=user_id.upper()), metadata=admin)
        assert list((await _status(cluster, first)).paused_lanes) == [user_id]
        await worker.Resume(worker_pb2.ResumeRequest(lane=user_id), metadata=admin)
        assert list((await _status(cluster, first)).paused_lanes) == []

        resumed = await worker.Resume(worker_pb2.ResumeRequest(), metadata=admin)
        assert resumed.state == worker_pb2.WORKER_STATE_RUNNING

        async def first_done() -> bool:
            return await request_status(enq.request_id) == SUCCEEDED

        await wait_until(first_done, 20)

        drained = await worker.Drain(worker_pb2.DrainRequest(timeout_seconds=10), metadata=admin)
        assert drained.state == worker_pb2.WORKER_STATE_DRAINED
        assert drained.abandoned == 0
        status = await _status(cluster, first)
        assert status.state == worker_pb2.WORKER_STATE_DRAINED
        assert list(status.lanes) == []
        # Resume cannot undo a drain: it says so instead of answering OK for nothing.
        for control in (
            worker.Resume(worker_pb2.ResumeRequest(), metadata=admin),
            worker.Pause(worker_pb2.PauseRequest(), metadata=admin),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await control
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "DRAINED" in (refused.value.details() or "")

        # A drained replica takes nothing; a new replica picks the lane up.
        later = await queue.Enqueue(
            queue_pb2.EnqueueRequest(handler="echo", payload=b"l"), metadata=bearer(token)
        )
        await asyncio.sleep(0.5)
        assert await request_status(later.request_id) == common_pb2.REQUEST_STATUS_QUEUED
        cluster.start_worker("second")
        await cluster.wait_serving("second")

        async def later_done() -> bool:
            return await request_status(later.request_id) == SUCCEEDED

        await wait_until(later_done, 30)

    # Every control call is audited with its principal; refusals once per peer and method.
    lines = [json.loads(x) for x in (cluster.log_dir / "worker0.log").read_text().splitlines()]
    audited = {(e["event"], e["outcome"], e["principal"]) for e in lines if e.get("audit")}
    operator = "admin:e2e-operator"
    assert {
        ("worker.pause", "OK", operator),
        ("worker.resume", "OK", operator),
        ("worker.drain", "OK", operator),
        ("worker.resume", "FAILED_PRECONDITION", operator),
        ("worker.pause", "FAILED_PRECONDITION", operator),
        ("authz.denied", "unauthenticated", None),
        ("authz.denied", "permission_denied", other_id),
    } <= audited, audited
    denied = [e for e in lines if e.get("event") == "authz.denied"]
    # Pause was refused twice per caller (own lane, whole replica): audited once.
    assert len(denied) == 6, denied
