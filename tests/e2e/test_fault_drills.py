"""Fault drills against real processes, RabbitMQ and PostgreSQL: connections cut through a
TCP proxy, replicas killed, lanes flooded, keys repeated. Each drill checks the counts:
accepted = finished in the log = results received, and no duplicates."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
import sqlalchemy as sa

from fairlane.client.errors import retry_delay_ms
from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane.worker.v1 import worker_pb2, worker_pb2_grpc
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import outbox, request_events, requests
from tests import polling
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import Suite, wait_until
from tests.e2e.users import admin_token, bearer, new_user
from tests.ports import free_port
from tests.proxy import TcpProxy

pytestmark = pytest.mark.e2e
SUCCEEDED = common_pb2.REQUEST_STATUS_SUCCEEDED


def via(url: str, proxy: TcpProxy) -> str:
    """The same URL with host:port replaced by the proxy's."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    hostport = f"127.0.0.1:{proxy.port}"
    return urlunsplit(
        parts._replace(netloc=f"{netloc[0]}@{hostport}" if len(netloc) == 2 else hostport)
    )


@pytest.fixture
async def base(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.extra_env.update(FAIRLANE_BREAKER_RESET_SECONDS="0.5", FAIRLANE_RETRY_AFTER_MS="200")
    try:
        s.start("auth")
        await s.wait_serving("auth")
        yield s
    finally:
        codes = s.stop_all()
    bad = {n: c for n, c in codes.items() if c not in (0, -signal.SIGKILL)}
    assert not bad, {n: s.log(n) for n in bad}


async def start(suite: Suite, name: str, service: str, **env: str) -> str:
    if name not in suite.ports:
        suite.ports[name] = free_port()
    listen = {"queue": "FAIRLANE_QUEUE_LISTEN", "worker": "FAIRLANE_WORKER_LISTEN"}[service]
    suite.start(name, service, **{listen: suite.target(name)}, **env)
    await suite.wait_serving(name)
    return suite.target(name)


async def log_rows(suite: Suite, user_id: str) -> list[Any]:
    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                sa.select(requests.c.id, requests.c.status, requests.c.lane_seq)
                .where(requests.c.user_id == uuid.UUID(user_id))
                .order_by(requests.c.lane_seq)
            )
            return list(result.all())
    finally:
        await engine.dispose()


async def stream(
    target: str,
    token: str,
    enqueues: list[queue_pb2.EnqueueRequest],
    on_result: Any = None,
) -> tuple[list[str], list[common_pb2.Result]]:
    """A Session: returns (accepted ids, results) as received."""

    async def gen() -> AsyncIterator[queue_pb2.SessionRequest]:
        for e in enqueues:
            yield queue_pb2.SessionRequest(enqueue=e)

    accepted: list[str] = []
    results: list[common_pb2.Result] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        async for r in stub.Session(gen(), metadata=bearer(token), timeout=180):
            if r.WhichOneof("kind") == "accepted":
                accepted.append(r.accepted.request_id)
            elif r.WhichOneof("kind") == "result":
                results.append(r.result)
                if on_result is not None:
                    await on_result(len(results))
    return accepted, results


def assert_complete(accepted: list[str], results: list[common_pb2.Result], rows: list[Any]) -> None:
    ids = [r.request_id for r in results]
    assert len(ids) == len(set(ids)), "duplicate results"
    assert ids == accepted, "results missing or out of order"
    assert [r.lane_seq for r in results] == list(range(1, len(accepted) + 1))
    assert [str(r.id) for r in rows] == accepted
    assert {r.status for r in rows} == {"SUCCEEDED"}


async def test_drill_1_worker_broker_connection_cut(base: Suite) -> None:
    amqp = urlsplit(base.broker_url)
    proxy = TcpProxy(amqp.hostname or "127.0.0.1", amqp.port or 5672)
    await proxy.start()
    try:
        await start(base, "queue", "queue")
        await start(base, "worker", "worker", FAIRLANE_BROKER_URL=via(base.broker_url, proxy))
        user_id, token = await new_user(base.target("auth"))
        cuts: list[int] = []

        async def cut_midway(received: int) -> None:
            if received == 180:
                # The second time, the worker's first connections back die right after
                # the broker's Connection.OpenOk: its reconnects used to end there for good.
                proxy.reset_during_handshake(3, connections=3)
            if received in (60, 180):
                cuts.append(proxy.cut())

        sent = [
            queue_pb2.EnqueueRequest(handler="sleep", payload=b"0.004", client_ref=str(i))
            for i in range(300)
        ]
        accepted, results = await stream(base.target("queue"), token, sent, cut_midway)
        assert len(cuts) == 2
        assert all(c > 0 for c in cuts)  # the worker's connection really was cut, twice
        assert proxy.resets == 3
        assert len(accepted) == 300
        assert_complete(accepted, results, await log_rows(base, user_id))
        print(f"\ndrill 1: 300 accepted, 300 finished, 300 results; {cuts} connections cut")
    finally:
        await proxy.close()


async def test_drill_2_queue_database_cut(base: Suite) -> None:
    pg = urlsplit(DATABASE_URL)
    proxy = TcpProxy(pg.hostname or "127.0.0.1", pg.port or 5432)
    await proxy.start()
    try:
        await start(base, "queue", "queue", FAIRLANE_DATABASE_URL=via(DATABASE_URL, proxy))
        await start(base, "worker", "worker")
        user_id, token = await new_user(base.target("auth"))
        sent = [queue_pb2.EnqueueRequest(handler="sleep", payload=b"0.02") for _ in range(60)]
        session = asyncio.create_task(stream(base.target("queue"), token, sent))

        async def all_published() -> bool:
            # Publishing a lane takes its lock in PostgreSQL: what is still in the outbox
            # when the cut starts waits for the database (drill: outbox, below).
            return len(await log_rows(base, user_id)) == 60 and await _outbox_size(base) == 0

        await wait_until(all_published, 30)
        proxy.block()
        proxy.cut()
        async with grpc.aio.insecure_channel(base.target("queue")) as channel:
            stub = queue_pb2_grpc.QueueServiceStub(channel)
            refused = 0
            for _ in range(5):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Enqueue(
                        queue_pb2.EnqueueRequest(handler="echo"), metadata=bearer(token), timeout=30
                    )
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                delay = retry_delay_ms(err.value)
                assert delay is not None
                assert delay > 0
                refused += 1
            # Accepted work goes on: the worker has its own connection to the log.
            accepted, results = await asyncio.wait_for(session, 120)
            proxy.unblock()

            async def enqueue_again() -> bool:
                try:
                    await stub.Enqueue(
                        queue_pb2.EnqueueRequest(handler="echo", payload=b"x"),
                        metadata=bearer(token),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    return False
                return True

            await wait_until(enqueue_again, 30)
        rows = await log_rows(base, user_id)
        assert len(accepted) == 60
        assert_complete(accepted, results, [r for r in rows if str(r.id) in set(accepted)])
        assert len(rows) == 61  # the refused ones left nothing behind
        print(
            f"\ndrill 2: 60 accepted before the cut all finished; {refused} refused with RetryInfo"
        )
    finally:
        await proxy.close()


async def test_drill_2b_queue_broker_cut_accepts_into_the_outbox(base: Suite) -> None:
    """While the broker is away the queue accepts into its outbox, and stays ready: its
    health failed on the broker at the first drop (every replica at once, as they share
    it), which took the replicas that would accept out of rotation. Only the relay's stall
    (work and no publish for FAIRLANE_STALL_SECONDS, 1 s here) turns it NOT_SERVING."""
    amqp = urlsplit(base.broker_url)
    proxy = TcpProxy(amqp.hostname or "127.0.0.1", amqp.port or 5672)
    await proxy.start()
    try:
        await start(
            base,
            "queue",
            "queue",
            FAIRLANE_BROKER_URL=via(base.broker_url, proxy),
            FAIRLANE_STALL_SECONDS="1",
        )
        await start(base, "worker", "worker")
        user_id, token = await new_user(base.target("auth"))
        proxy.block()
        proxy.cut()
        await polling.until(lambda: "broker_connection_lost" in _log(base), timeout=30)
        sent = [queue_pb2.EnqueueRequest(handler="echo", payload=b"%d" % n) for n in range(20)]
        session = asyncio.create_task(stream(base.target("queue"), token, sent))
        await polling.until(lambda: len(_health_changes(base)) > 0, timeout=30)
        assert _health_changes(base)[0] == ["stage:relay"]
        proxy.unblock()
        accepted, results = await asyncio.wait_for(session, 120)
        assert_complete(accepted, results, await log_rows(base, user_id))
    finally:
        await proxy.close()


def _log(suite: Suite) -> str:
    return (suite.log_dir / "queue.log").read_text(errors="replace")


def _health_changes(suite: Suite) -> list[list[str]]:
    """What the queue's health said failed, at each change to NOT_SERVING."""
    return [
        event["failed"]
        for line in _log(suite).splitlines()
        if line.startswith("{")
        and (event := json.loads(line))["event"] == "health_changed"
        and event.get("serving") is False
    ]


async def test_drill_3_queue_replica_killed_client_resumes_elsewhere(base: Suite) -> None:
    first = await start(base, "queue", "queue")
    second = await start(base, "queue2", "queue")
    await start(base, "worker", "worker")
    user_id, token = await new_user(base.target("auth"))
    sent = [queue_pb2.EnqueueRequest(handler="sleep", payload=b"0.04") for _ in range(50)]
    accepted: list[str] = []
    results: list[common_pb2.Result] = []

    async def gen() -> AsyncIterator[queue_pb2.SessionRequest]:
        for e in sent:
            yield queue_pb2.SessionRequest(enqueue=e)
        await asyncio.Event().wait()  # keep the stream open, like a live client

    async def follow_until_killed(channel: grpc.aio.Channel) -> None:
        call = queue_pb2_grpc.QueueServiceStub(channel).Session(gen(), metadata=bearer(token))
        async for r in call:
            if r.WhichOneof("kind") == "accepted":
                accepted.append(r.accepted.request_id)
            elif r.WhichOneof("kind") == "result":
                results.append(r.result)
                if len(results) == 10:
                    base.stop("queue", signal.SIGKILL)

    async with grpc.aio.insecure_channel(first) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await follow_until_killed(channel)
    assert len(accepted) == 50
    last = results[-1].lane_seq
    async with grpc.aio.insecure_channel(second) as channel:
        watch = queue_pb2_grpc.QueueServiceStub(channel).WatchResults(
            queue_pb2.WatchResultsRequest(after_lane_seq=last),
            metadata=bearer(token),
            timeout=60,
        )
        async for r in watch:
            results.append(r.result)
            if len(results) == 50:
                break
        watch.cancel()
    assert_complete(accepted, results, await log_rows(base, user_id))
    print(
        f"\ndrill 3: 50 accepted on a replica killed after {last} results; "
        f"{50 - last} resumed on the other, none twice"
    )


async def test_drill_4_flooded_lane_is_bounded_and_others_unaffected(base: Suite) -> None:
    bound = {"FAIRLANE_LANE_MAX_LENGTH": "3", "FAIRLANE_LANE_PREFETCH": "1"}
    await start(base, "queue", "queue", **bound)
    worker = await start(base, "worker", "worker", **bound)
    flooder_id, flooder = await new_user(base.target("auth"))
    bystander_id, bystander = await new_user(base.target("auth"))
    admin = bearer(await admin_token(base.target("auth")))
    async with (
        grpc.aio.insecure_channel(base.target("queue")) as qch,
        grpc.aio.insecure_channel(worker) as wch,
    ):
        queue = queue_pb2_grpc.QueueServiceStub(qch)
        control = worker_pb2_grpc.WorkerServiceStub(wch)
        # Prime the lane so the worker consumes it, then pause the worker.
        await queue.Enqueue(
            queue_pb2.EnqueueRequest(handler="echo", payload=b"-1"), metadata=bearer(flooder)
        )
        await control.Pause(worker_pb2.PauseRequest(), metadata=admin)
        accepted: list[str] = []
        rejected: list[int] = []
        waiting = list(range(20))
        for i in waiting:
            try:
                reply = await queue.Enqueue(
                    queue_pb2.EnqueueRequest(handler="echo", payload=str(i).encode()),
                    metadata=bearer(flooder),
                )
                accepted.append(reply.request_id)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                delay = retry_delay_ms(exc)
                assert delay is not None
                assert delay > 0
                rejected.append(i)
        assert rejected, "the lane bound never pushed back"
        assert len(accepted) < 20
        # Another user's lane is not affected by the full one.
        other = await queue.Enqueue(
            queue_pb2.EnqueueRequest(handler="echo", payload=b"b"), metadata=bearer(bystander)
        )
        assert other.request_id
        await control.Resume(worker_pb2.ResumeRequest(), metadata=admin)
        # A client that honours RetryInfo gets everything through.
        retries = 0
        for i in rejected:
            while True:
                try:
                    reply = await queue.Enqueue(
                        queue_pb2.EnqueueRequest(handler="echo", payload=str(i).encode()),
                        metadata=bearer(flooder),
                    )
                    accepted.append(reply.request_id)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    retries += 1
                    await asyncio.sleep(
                        (retry_delay_ms(exc) or 100) / 1000 * random.uniform(1, 1.5)
                    )

        async def finished() -> bool:
            rows = await log_rows(base, flooder_id)
            return len(rows) == 21 and {r.status for r in rows} == {"SUCCEEDED"}

        await wait_until(finished, 60)
    rows = await log_rows(base, flooder_id)
    assert {str(r.id) for r in rows} >= set(accepted)
    assert len(accepted) == 20
    assert [r.lane_seq for r in rows] == list(range(1, 22))
    assert len(await log_rows(base, bystander_id)) == 1
    print(
        f"\ndrill 4: {len(rejected)} of 20 pushed back with RetryInfo, {retries} retries, "
        "all 20 finished; the other user was unaffected"
    )


async def test_a_user_who_fills_the_write_bound_waits_and_the_others_are_admitted(
    base: Suite,
) -> None:
    """FAIRLANE_MAX_PENDING_WRITES is shared: the user who fills it is refused past their
    share, another user is still admitted, and everything admitted is stored and runs."""
    bound = 40
    await start(base, "queue", "queue", FAIRLANE_MAX_PENDING_WRITES=str(bound))
    await start(base, "worker", "worker")
    flooder_id, flooder = await new_user(base.target("auth"))
    bystander_id, bystander = await new_user(base.target("auth"))
    engine = create_engine(base.database_url, schema=base.schema, pool_size=1)
    refusals: list[grpc.aio.AioRpcError] = []
    try:
        async with grpc.aio.insecure_channel(base.target("queue")) as channel:
            queue = queue_pb2_grpc.QueueServiceStub(channel)

            async def enqueue(token: str, payload: bytes) -> str | None:
                try:
                    reply = await queue.Enqueue(
                        queue_pb2.EnqueueRequest(handler="echo", payload=payload),
                        metadata=bearer(token),
                        timeout=60,
                    )
                except grpc.aio.AioRpcError as exc:
                    refusals.append(exc)
                    return None
                return str(reply.request_id)

            async with engine.connect() as lock:
                # The log stops taking commits: the intake's statement waits for the lanes.
                await lock.execute(sa.text(f'LOCK TABLE "{base.schema}".lanes IN EXCLUSIVE MODE'))
                flood = [
                    asyncio.create_task(enqueue(flooder, str(i).encode()))
                    for i in range(bound + 20)
                ]
                # Once one of them is refused the bound is full, and stays full while the
                # lock holds.
                await wait_until(lambda: _true(bool(refusals)), 30)
                other = asyncio.create_task(enqueue(bystander, b"b"))
                again = await enqueue(flooder, b"again")
                assert again is None
                # Both were answered: the bystander's waits for the log like the flood's.
                assert not other.done()
                await lock.rollback()
            admitted = [x for x in await asyncio.gather(*flood) if x is not None]
            assert await other is not None
    finally:
        await engine.dispose()
    # The flooder was refused past their share, UNAVAILABLE with a delay to retry after.
    assert refusals
    for exc in refusals:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        assert "more than your share" in (exc.details() or ""), exc
        assert (retry_delay_ms(exc) or 0) > 0
    assert bound <= len(admitted) < bound + 20

    async def finished() -> bool:
        rows = await log_rows(base, flooder_id)
        return len(rows) == len(admitted) and {r.status for r in rows} == {"SUCCEEDED"}

    await wait_until(finished, 60)
    assert {str(r.id) for r in await log_rows(base, flooder_id)} == set(admitted)
    assert [r.status for r in await log_rows(base, bystander_id)] == ["SUCCEEDED"]


async def _true(value: bool) -> bool:
    return value


async def test_drill_5_same_idempotency_key_ten_times(base: Suite) -> None:
    await start(base, "queue", "queue")
    await start(base, "worker", "worker")
    user_id, token = await new_user(base.target("auth"))
    async with grpc.aio.insecure_channel(base.target("queue")) as channel:
        stub = queue_pb2_grpc.QueueServiceStub(channel)
        replies = await asyncio.gather(
            *(
                stub.Enqueue(
                    queue_pb2.EnqueueRequest(
                        handler="echo", payload=b"once", idempotency_key="order-42"
                    ),
                    metadata=bearer(token),
                )
                for _ in range(10)
            )
        )
        assert len({r.request_id for r in replies}) == 1
        assert sorted(r.duplicate for r in replies) == [False] + [True] * 9

        async def done() -> bool:
            rows = await log_rows(base, user_id)
            return bool(rows) and rows[0].status == "SUCCEEDED"

        await wait_until(done, 30)

        # On the stream too: a repeat returns the original and, finished, its result.
        async def again() -> AsyncIterator[queue_pb2.SessionRequest]:
            yield queue_pb2.SessionRequest(
                enqueue=queue_pb2.EnqueueRequest(
                    handler="echo", payload=b"once", idempotency_key="order-42"
                )
            )

        got = [r async for r in stub.Session(again(), metadata=bearer(token), timeout=30)]
    assert got[0].accepted.request_id == replies[0].request_id
    assert got[0].accepted.duplicate
    assert got[1].result.output == b"once"
    rows = await log_rows(base, user_id)
    assert len(rows) == 1
    engine = create_engine(base.database_url, schema=base.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            runs = await conn.execute(
                sa.select(sa.func.count()).where(
                    request_events.c.request_id == rows[0].id,
                    request_events.c.status == "SUCCEEDED",
                )
            )
            assert runs.scalar_one() == 1
    finally:
        await engine.dispose()
    print("\ndrill 5: 10 concurrent enqueues with one key: 1 request, 1 execution, 10 answers")


async def _outbox_size(suite: Suite) -> int:
    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            return int(
                (await conn.execute(sa.select(sa.func.count()).select_from(outbox))).scalar_one()
            )
    finally:
        await engine.dispose()


async def test_a_replica_killed_between_commit_and_publish(base: Suite) -> None:
    """Accepted means it will run: requests committed by a replica that could not reach the
    broker and then died are published by another replica, in lane order, exactly once."""
    amqp = urlsplit(base.broker_url)
    proxy = TcpProxy(amqp.hostname or "127.0.0.1", amqp.port or 5672)
    await proxy.start()
    try:
        first = await start(base, "queue", "queue", FAIRLANE_BROKER_URL=via(base.broker_url, proxy))
        await start(base, "worker", "worker")
        user_id, token = await new_user(base.target("auth"))
        async with grpc.aio.insecure_channel(first) as channel:
            stub = queue_pb2_grpc.QueueServiceStub(channel)
            warm = await stub.Enqueue(
                queue_pb2.EnqueueRequest(handler="echo", payload=b"warm"),
                metadata=bearer(token),
                timeout=30,
            )

            async def warm_done() -> bool:
                rows = await log_rows(base, user_id)
                return [r.status for r in rows] == ["SUCCEEDED"]

            await wait_until(warm_done, 30)
            proxy.block()
            assert proxy.cut() > 0  # the replica's broker connection is gone, and stays gone
            accepted = [warm.request_id]
            for i in range(20):
                reply = await stub.Enqueue(
                    queue_pb2.EnqueueRequest(handler="echo", payload=str(i).encode()),
                    metadata=bearer(token),
                    timeout=30,
                )
                accepted.append(reply.request_id)
        # Committed, not published: the rows wait in the outbox.
        rows = await log_rows(base, user_id)
        assert sorted(r.status for r in rows) == ["QUEUED"] * 20 + ["SUCCEEDED"]
        assert await _outbox_size(base) == 20
        base.stop("queue", signal.SIGKILL)

        second = await start(base, "queue2", "queue", FAIRLANE_OUTBOX_STALE_SECONDS="1")
        results: list[common_pb2.Result] = []
        async with grpc.aio.insecure_channel(second) as channel:
            watch = queue_pb2_grpc.QueueServiceStub(channel).WatchResults(
                queue_pb2.WatchResultsRequest(after_lane_seq=0), metadata=bearer(token), timeout=90
            )
            async for r in watch:
                results.append(r.result)
                if len(results) == 21:
                    break
            watch.cancel()
        assert [r.output for r in results[1:]] == [str(i).encode() for i in range(20)]
        assert_complete(accepted, results, await log_rows(base, user_id))

        async def outbox_empty() -> bool:
            return await _outbox_size(base) == 0

        # A confirmed publish's row goes in the relay's next delete (within 50 ms of the
        # confirm): a fast worker's result can reach the watcher before it.
        await wait_until(outbox_empty, 10)
        print(
            "\noutbox drill: 20 requests committed behind a cut broker, replica killed; "
            "the other replica published all 20, in order, once"
        )
    finally:
        await proxy.close()
