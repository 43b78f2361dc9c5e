"""A lane pause holds on every worker replica, with real processes: Pause(lane) sent to a
replica that is not the lane's active consumer stops the lane, every replica lists it,
Resume on yet another replica lets it go on, and a replica started after the pause (the
others stopped) honours it too. A pause the announcement never brought comes from the
lane listing. Outside review: a lane pause used to hold only on the replica that was asked,
and stopped the lane only if that replica happened to run it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane.worker.v1 import worker_pb2, worker_pb2_grpc
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import lanes, request_events, requests
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import Suite, auth_and_queue, wait_until
from tests.e2e.users import admin_token, bearer, new_user

pytestmark = pytest.mark.e2e
HOLD = json.dumps(["tests.e2e.pause_handlers:hold"])
Metadata = tuple[tuple[str, str]]


@pytest.fixture
async def cluster(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    """auth + queue, and no worker yet; workers get the `hold` handler."""
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.extra_env.update(FAIRLANE_HANDLERS=HOLD)
    async with auth_and_queue(s, kills=True):
        yield s


async def _start_workers(suite: Suite, names: Iterable[str], **env: str) -> dict[str, str]:
    targets = {name: suite.start_worker(name, **env) for name in names}
    await asyncio.gather(*(suite.wait_serving(name) for name in targets))
    return targets


async def _query(suite: Suite, query: Any) -> list[Any]:
    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(query)
            return list(result.all()) if result.returns_rows else []
    finally:
        await engine.dispose()


async def _status_of(suite: Suite, request_id: uuid.UUID) -> str:
    (status,) = await _query(suite, sa.select(requests.c.status).where(requests.c.id == request_id))
    return str(status[0])


async def _until_status(suite: Suite, request_id: uuid.UUID, status: str) -> None:
    async def reached() -> bool:
        return await _status_of(suite, request_id) == status

    await wait_until(reached, 30)


async def _worker_status(target: str, admin: Metadata) -> worker_pb2.GetStatusResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        reply: worker_pb2.GetStatusResponse = await worker_pb2_grpc.WorkerServiceStub(
            channel
        ).GetStatus(worker_pb2.GetStatusRequest(), metadata=admin, timeout=10)
        return reply


async def _control(target: str, admin: Metadata, *, pause: bool, lane: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        if pause:
            await stub.Pause(worker_pb2.PauseRequest(lane=lane), metadata=admin, timeout=10)
        else:
            await stub.Resume(worker_pb2.ResumeRequest(lane=lane), metadata=admin, timeout=10)


async def _listed_everywhere(
    targets: Iterable[str], admin: Metadata, lane: str, *, paused: bool
) -> None:
    """Until GetStatus of every replica lists the lane as paused (or no longer does)."""
    targets = list(targets)

    async def listed() -> bool:
        replies = await asyncio.gather(*(_worker_status(t, admin) for t in targets))
        return all((lane in r.paused_lanes) == paused for r in replies)

    await wait_until(listed, 30)


async def _active(targets: dict[str, str], admin: Metadata) -> str:
    """The replica running the lane's request (the only one with a request in flight)."""
    found: list[str] = []

    async def one_runs() -> bool:
        replies = {n: await _worker_status(t, admin) for n, t in targets.items()}
        found[:] = [n for n, r in replies.items() if r.in_flight]
        return len(found) == 1

    await wait_until(one_runs, 30)
    return found[0]


async def test_a_lane_pause_holds_on_every_replica_now_and_later(
    cluster: Suite, tmp_path: Path
) -> None:
    names = ["worker0", "worker1", "worker2"]
    # No lane listing after the first: only the announcements can bring a pause here.
    targets = await _start_workers(cluster, names, FAIRLANE_LANE_DISCOVERY_SECONDS="3600")
    admin: Metadata = bearer(await admin_token(cluster.target("auth")))
    user_id, token = await new_user(cluster.target("auth"))
    # Request i runs until its file exists: the test decides when the lane could go on.
    release = [tmp_path / f"release-{i}" for i in range(5)]
    ids: list[uuid.UUID] = []
    async with grpc.aio.insecure_channel(cluster.target("queue")) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)
        for i, path in enumerate(release):
            reply = await queue.Enqueue(
                queue_pb2.EnqueueRequest(
                    handler="hold", payload=str(path).encode(), client_ref=str(i)
                ),
                metadata=bearer(token),
            )
            ids.append(uuid.UUID(reply.request_id))
    # (pause answered, resume asked): no request of the lane may start in between.
    windows: list[tuple[datetime, datetime]] = []
    tried: set[str] = set()

    # Paused on a replica that does not run the lane, each such replica in turn; resumed
    # on yet another one.
    for i in range(2):
        await _until_status(cluster, ids[i], "RUNNING")
        active = await _active(targets, admin)
        others = [n for n in names if n != active]
        pauser = next(n for n in others if n not in tried)
        (resumer,) = [n for n in others if n != pauser]
        tried.add(pauser)
        await _control(targets[pauser], admin, pause=True, lane=user_id)
        answered = datetime.now(UTC)
        await _listed_everywhere(targets.values(), admin, user_id, paused=True)
        release[i].touch()  # the running request finishes; the next one must wait
        await _until_status(cluster, ids[i], "SUCCEEDED")
        for target in targets.values():
            status = await _worker_status(target, admin)
            assert (user_id in status.paused_lanes, status.in_flight) == (True, 0)
        assert await _status_of(cluster, ids[i + 1]) == "QUEUED"
        asked = datetime.now(UTC)
        await _control(targets[resumer], admin, pause=False, lane=user_id)
        windows.append((answered, asked))
        await _listed_everywhere(targets.values(), admin, user_id, paused=False)
    assert len(tried) == 2  # two replicas, neither running the lane when asked

    # A replica started after the pause honours it: the others stop, it holds the lane.
    await _until_status(cluster, ids[2], "RUNNING")
    active = await _active(targets, admin)
    pauser = next(n for n in names if n != active)
    await _control(targets[pauser], admin, pause=True, lane=user_id)
    answered = datetime.now(UTC)
    await _listed_everywhere(targets.values(), admin, user_id, paused=True)
    release[2].touch()
    await _until_status(cluster, ids[2], "SUCCEEDED")
    later = await _start_workers(cluster, ["worker3"], FAIRLANE_LANE_DISCOVERY_SECONDS="3600")
    await _listed_everywhere(later.values(), admin, user_id, paused=True)
    for name in names:
        assert cluster.stop(name) == 0
    # The rest would finish at once if they ran.
    release[3].touch()
    release[4].touch()
    # The later replica runs other lanes meanwhile, and holds this one.
    _, other = await new_user(cluster.target("auth"))
    async with grpc.aio.insecure_channel(cluster.target("queue")) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)
        witness = await queue.Enqueue(
            queue_pb2.EnqueueRequest(handler="echo", payload=b"w"), metadata=bearer(other)
        )
    await _until_status(cluster, uuid.UUID(witness.request_id), "SUCCEEDED")
    status = await _worker_status(later["worker3"], admin)
    assert user_id in status.lanes
    assert list(status.paused_lanes) == [user_id]
    assert [await _status_of(cluster, i) for i in ids[3:]] == ["QUEUED", "QUEUED"]
    asked = datetime.now(UTC)
    await _control(later["worker3"], admin, pause=False, lane=user_id)
    windows.append((answered, asked))
    await _until_status(cluster, ids[4], "SUCCEEDED")
    assert list((await _worker_status(later["worker3"], admin)).paused_lanes) == []

    # The lane finished in order, each request run once, none started while paused.
    rows = await _query(
        cluster,
        sa.select(requests.c.id, requests.c.status, requests.c.lane_seq, requests.c.attempts)
        .where(requests.c.user_id == uuid.UUID(user_id))
        .order_by(requests.c.lane_seq),
    )
    assert [tuple(r) for r in rows] == [
        (rid, "SUCCEEDED", n, 1) for n, rid in enumerate(ids, start=1)
    ]
    events = await _query(
        cluster,
        sa.select(request_events.c.request_id, request_events.c.status, request_events.c.at)
        .where(request_events.c.request_id.in_(ids))
        .order_by(request_events.c.id),
    )
    for rid in ids:
        assert [e.status for e in events if e.request_id == rid] == [
            "QUEUED",
            "RUNNING",
            "SUCCEEDED",
        ]
    starts = [e.at for e in events if e.status == "RUNNING"]
    for answered, asked in windows:
        assert not [at for at in starts if answered <= at <= asked], (answered, asked, starts)


async def test_a_pause_the_announcement_missed_comes_from_the_lane_listing(
    cluster: Suite,
) -> None:
    """A pause in the log that no announcement brought (lost, or from before a replica
    subscribed) is applied from ListLanes, and so is its end; and Pause or Resume of a lane
    that does not exist is NOT_FOUND."""
    targets = await _start_workers(cluster, ["worker0"], FAIRLANE_LANE_DISCOVERY_SECONDS="0.2")
    (target,) = targets.values()
    admin: Metadata = bearer(await admin_token(cluster.target("auth")))
    user_id, token = await new_user(cluster.target("auth"))
    nobody, _ = await new_user(cluster.target("auth"))  # never enqueued: no lane
    async with grpc.aio.insecure_channel(target) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        for call in (
            worker.Pause(worker_pb2.PauseRequest(lane=nobody), metadata=admin),
            worker.Resume(worker_pb2.ResumeRequest(lane=nobody.upper()), metadata=admin),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call
            assert (refused.value.code(), refused.value.details()) == (
                grpc.StatusCode.NOT_FOUND,
                "no such lane",
            )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await worker.Pause(worker_pb2.PauseRequest(lane="nope"), metadata=admin)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    async with grpc.aio.insecure_channel(cluster.target("queue")) as channel:
        queue = queue_pb2_grpc.QueueServiceStub(channel)
        first = await queue.Enqueue(
            queue_pb2.EnqueueRequest(handler="echo", payload=b"1"), metadata=bearer(token)
        )
        await _until_status(cluster, uuid.UUID(first.request_id), "SUCCEEDED")
        lane = lanes.c.user_id == uuid.UUID(user_id)
        await _query(cluster, lanes.update().where(lane).values(paused_at=datetime.now(UTC)))
        await _listed_everywhere([target], admin, user_id, paused=True)
        held = await queue.Enqueue(
            queue_pb2.EnqueueRequest(handler="echo", payload=b"2"), metadata=bearer(token)
        )
        lifted = datetime.now(UTC)
        await _query(cluster, lanes.update().where(lane).values(paused_at=None))
        await _listed_everywhere([target], admin, user_id, paused=False)
        await _until_status(cluster, uuid.UUID(held.request_id), "SUCCEEDED")
    (started,) = await _query(
        cluster,
        sa.select(requests.c.started_at).where(requests.c.id == uuid.UUID(held.request_id)),
    )
    assert started[0] >= lifted
