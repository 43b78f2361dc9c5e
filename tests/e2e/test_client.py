"""The Python client (fairlane.client) against the three service processes."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fairlane.client import (
    Accepted,
    AlreadyExists,
    Client,
    ClientClosed,
    FairlaneError,
    InvalidArgument,
    NotFound,
    NotLoggedIn,
    PermissionDenied,
    Progress,
    Rejected,
    RejectedEvent,
    Request,
    Result,
    SessionClosed,
    Status,
    SubmitFuture,
    SyncClient,
    Tokens,
    Unauthenticated,
    WorkerState,
)
from tests.conftest import DATABASE_URL, broker_url
from tests.e2e.suite import Suite, serving
from tests.e2e.users import admin_token
from tests.polling import until
from tests.proxy import TcpProxy
from tests.sync_child import AFTER_THE_INTERRUPT

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery"
TOKEN_TTL = 2


def _client(suite: Suite, **kwargs: object) -> Client:
    return Client(
        suite.target("auth"),
        suite.target("queue"),
        suite.target("worker"),
        **kwargs,  # type: ignore[arg-type]
    )


def _name() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def short_token_suite(pg_schema: str, vhost: str, tmp_path: Path) -> AsyncIterator[Suite]:
    """The suite with access tokens that live TOKEN_TTL seconds."""
    s = Suite(DATABASE_URL, pg_schema, broker_url(vhost), tmp_path)
    s.extra_env["FAIRLANE_ACCESS_TOKEN_TTL_SECONDS"] = str(TOKEN_TTL)
    # Strict rotation: a spent refresh token presented again revokes its login at once.
    s.extra_env["FAIRLANE_REFRESH_REUSE_INTERVAL_SECONDS"] = "0"
    async with serving(s):
        yield s


async def test_session_futures_events_and_watch(suite: Suite) -> None:
    async with _client(suite) as client:
        name = _name()
        user_id = await client.register(name, PASSWORD)
        tokens = await client.login(name, PASSWORD)
        assert tokens.username == name
        assert tokens.refresh_token
        assert tokens.expires_at > time.time()
        me = await client.whoami()
        assert (me.user_id, me.username) == (user_id, name)

        async with client.session() as session:
            futures = []
            for i in range(30):
                if i == 10:
                    bad = await session.submit("no-such-handler", b"x", client_ref="bad")
                if i == 20:
                    slow = await session.submit("sleep", b"0.2", client_ref="slow")
                futures.append(await session.submit("echo", f"p{i}", client_ref=f"r{i}"))
        # Leaving the block half-closed the stream and waited for every result.
        results = [f.result() for f in futures]
        assert [r.output for r in results] == [f"p{i}".encode() for i in range(30)]
        assert all(r.status is Status.SUCCEEDED and r.ok for r in results)
        assert [f.request_id for f in futures] == [r.request_id for r in results]
        assert [r.client_ref for r in results] == [f"r{i}" for i in range(30)]
        slow_result = slow.result()
        assert slow_result.output == b"0.2"
        # FIFO: lane_seq 1..31 in submit order (the slow one sits between r19 and r20).
        seqs = [r.lane_seq for r in results[:20]] + [slow_result.lane_seq]
        seqs += [r.lane_seq for r in results[20:]]
        assert seqs == list(range(1, 32))
        with pytest.raises(Rejected) as rejected:
            bad.result()
        assert rejected.value.code == "INVALID_ARGUMENT"
        assert "unknown handler" in rejected.value.message
        assert rejected.value.client_ref == "bad"
        assert bad.request_id is None
        assert session.last_lane_seq == 31

        events = [e async for e in session.events()]
        answers = [e.client_ref for e in events if isinstance(e, Accepted | RejectedEvent)]
        expected = [f"r{i}" for i in range(30)]
        expected[20:20] = ["slow"]
        expected[10:10] = ["bad"]
        assert answers == expected
        assert isinstance(events[answers.index("bad")], RejectedEvent)
        position = {
            (type(e).__name__, e.request_id): n
            for n, e in enumerate(events)
            if isinstance(e, Accepted | Result)
        }
        for r in [*results, slow_result]:
            assert position[("Accepted", r.request_id)] < position[("Result", r.request_id)]
        in_order = [e.lane_seq for e in events if isinstance(e, Result)]
        assert in_order == sorted(in_order) == list(range(1, 32))
        progress = [e for e in events if isinstance(e, Progress)]
        assert [(p.done, p.total) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
        assert {p.request_id for p in progress} == {slow_result.request_id}
        assert position[("Accepted", slow_result.request_id)] < events.index(progress[0])
        assert events.index(progress[-1]) < position[("Result", slow_result.request_id)]

        # Resume after a lane_seq: stored results first, then live ones.
        watched: list[Result] = []

        async def watch() -> None:
            async for r in client.watch(after_lane_seq=28):
                watched.append(r)
                if len(watched) == 5:
                    return

        watcher = asyncio.create_task(watch())
        async with client.session() as session:
            live = [await session.submit("echo", f"live{i}") for i in range(2)]
        await asyncio.wait_for(watcher, 30)
        assert [r.lane_seq for r in watched] == [29, 30, 31, 32, 33]
        # seq 29 is r27: the slow request took seq 21.
        assert [r.output for r in watched] == [b"p27", b"p28", b"p29", b"live0", b"live1"]
        assert [r.request_id for r in watched[-2:]] == [f.request_id for f in live]

        # A repeated idempotency key on one stream: the same request, one run.
        async with client.session() as session:
            first = await session.submit("echo", b"once", idempotency_key="k1")
            again = await session.submit("echo", b"twice", idempotency_key="k1")
        assert again.duplicate
        assert not first.duplicate
        assert first.request_id == again.request_id
        assert first.result() == again.result()
        assert first.result().output == b"once"

        # Without recorded events the futures still work; events() says why it cannot.
        async with client.session(record_events=False, max_in_flight=2) as session:
            small = [await session.submit("echo", str(i)) for i in range(6)]
            with pytest.raises(Exception, match="not recorded"):
                async for _ in session.events():
                    pass
        assert [f.result().output for f in small] == [str(i).encode() for i in range(6)]


async def test_unary_calls_worker_control_and_sync_client(suite: Suite) -> None:
    async with _client(suite) as client:
        with pytest.raises(NotLoggedIn):
            await client.enqueue("echo", b"x")
        name = _name()
        await client.register(name, PASSWORD)
        with pytest.raises(AlreadyExists):
            await client.register(name, PASSWORD)
        with pytest.raises(Unauthenticated):
            await client.login(name, "wrong password!")
        await client.login(name, PASSWORD)
        with pytest.raises(NotFound, match="no lane yet"):
            await client.lane()

        handlers = {h.name: h for h in await client.list_handlers()}
        assert {"echo", "sleep", "fail"} <= set(handlers)
        assert handlers["echo"].description

        enqueued = await client.enqueue("echo", b"hello", client_ref="u1")
        request = await _wait_final(client, enqueued.request_id)
        assert (request.status, request.output, request.client_ref) == (
            Status.SUCCEEDED,
            b"hello",
            "u1",
        )
        assert request.finished_at is not None
        assert request.lane_seq == 1

        again = await client.enqueue("echo", b"other", idempotency_key="same")
        dup = await client.enqueue("echo", b"other", idempotency_key="same")
        assert dup.duplicate
        assert dup.request_id == again.request_id

        with pytest.raises(InvalidArgument, match="unknown handler"):
            await client.enqueue("no-such-handler", b"x")
        with pytest.raises(InvalidArgument):
            await client.get("not-a-uuid")
        with pytest.raises(NotFound):
            await client.get(str(uuid.uuid4()))

        # A user may not pause the worker; an operator may, and then a new request waits
        # QUEUED and can be cancelled.
        with pytest.raises(PermissionDenied):
            await client.pause()
        operator = _client(
            suite, tokens=Tokens.issued(await admin_token(suite.target("auth")), "", 900)
        )
        assert await operator.pause() == WorkerState.PAUSED
        assert (await client.worker_status()).state == WorkerState.PAUSED
        waiting = await client.enqueue("echo", b"never")
        await asyncio.sleep(0.3)
        assert (await client.get(waiting.request_id)).status == Status.QUEUED
        assert await client.cancel(waiting.request_id) == Status.CANCELLED
        assert await operator.resume() == WorkerState.RUNNING
        await operator.close()
        status = await client.worker_status()
        assert status.state == WorkerState.RUNNING
        assert status.concurrency > 0
        assert "echo" in {h.name for h in status.handlers}
        await _wait_final(client, again.request_id)

        lane = await client.lane()
        assert lane.queue_name.endswith(lane.user_id)
        assert lane.last_lane_seq >= 2

        pages = [page async for page in client.requests(page_size=2)]
        assert [len(p) for p in pages] == [2, 1]
        listed = [r.request_id for page in pages for r in page]
        assert listed == [waiting.request_id, again.request_id, enqueued.request_id]
        cancelled = [r async for page in client.requests("cancelled") for r in page]
        assert [r.request_id for r in cancelled] == [waiting.request_id]

        with pytest.raises(InvalidArgument, match="unknown status"):
            async for _ in client.requests("bogus"):
                pass

        await client.logout()
        assert client.tokens is None

    def use_sync() -> tuple[Result, list[str], str]:
        with SyncClient(suite.target("auth"), suite.target("queue"), suite.target("worker")) as sc:
            sc.login(name, PASSWORD)
            result = sc.submit_and_wait("echo", "from sync")
            ids = [r.request_id for page in sc.requests() for r in page]
            who = sc.whoami().username
            with pytest.raises(Rejected):
                sc.submit_and_wait("no-such-handler")
            return result, ids, who

    result, ids, who = await asyncio.to_thread(use_sync)
    assert result.output == b"from sync"
    assert result.ok
    assert ids[0] == result.request_id
    assert len(ids) == 4
    assert who == name


async def test_session_results_survive_a_queue_restart(suite: Suite) -> None:
    async with _client(suite) as client:
        name = _name()
        await client.register(name, PASSWORD)
        await client.login(name, PASSWORD)
        async with client.session() as session:
            futures = [await session.submit("sleep", b"0.2", client_ref=f"s{i}") for i in range(10)]
            await asyncio.wait_for(asyncio.shield(futures[0]), 30)
            deadline = time.monotonic() + 30
            while not all(f.request_id for f in futures):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            # The replica owning the stream dies mid-session; another one comes up.
            assert not futures[-1].done()
            suite.stop("queue", signal.SIGKILL)
            suite.start("queue")
        # Every accepted request still resolved, from WatchResults on the new replica.
        results = [f.result() for f in futures]
        assert [r.client_ref for r in results] == [f"s{i}" for i in range(10)]
        assert [r.lane_seq for r in results] == list(range(1, 11))
        assert all(r.status is Status.SUCCEEDED for r in results)
        with pytest.raises(SessionClosed):
            await session.submit("echo")


async def _wait_final(client: Client, request_id: str) -> Request:
    deadline = time.monotonic() + 30
    while True:
        request = await client.get(request_id)
        if request.status.final:
            return request
        assert time.monotonic() < deadline, request
        await asyncio.sleep(0.05)


async def test_tokens_are_refreshed_before_and_after_expiry(short_token_suite: Suite) -> None:
    suite = short_token_suite
    seen: list[Tokens | None] = []
    async with _client(suite, on_tokens=seen.append) as client:
        name = _name()
        await client.register(name, PASSWORD)
        first = await client.login(name, PASSWORD)
        assert first.lifetime == TOKEN_TTL
        await asyncio.sleep(TOKEN_TTL + 0.5)
        # Expired by now: refreshed before the call, not after a failure.
        assert (await client.whoami()).username == name
        assert len(seen) == 2
        assert seen[-1] is client.tokens
        assert client.tokens is not None
        assert client.tokens.access_token != first.access_token
        assert client.tokens.refresh_token != first.refresh_token
        assert client.tokens.username == name

    def stale(tokens: Tokens) -> Tokens:
        """Tokens whose access token expired but that claim it is valid for an hour,
        so the client only learns of the expiry from the server."""
        return Tokens(
            access_token=tokens.access_token,
            refresh_token=tokens.refresh_token,
            expires_at=time.time() + 3600,
            lifetime=3600,
            username=tokens.username,
        )

    # Three logins (refresh tokens rotate, so each case needs its own), left to expire.
    async with _client(suite) as other:
        logins = [await other.login(name, PASSWORD) for _ in range(3)]
    await asyncio.sleep(TOKEN_TTL + 0.5)

    # Unary call: UNAUTHENTICATED → refresh once → the same call again.
    old = logins[0]
    async with _client(suite, tokens=stale(old)) as client:
        enqueued = await client.enqueue("echo", b"after refresh")
        assert client.tokens is not None
        assert client.tokens.access_token != old.access_token
    # The refresh token rotated: the spent one now revokes its whole family.
    async with _client(suite, tokens=stale(old)) as client:
        with pytest.raises(Unauthenticated, match="log in again"):
            await client.whoami()

    # Session: refused at the start → refresh → the stream is reopened and resent.
    old = logins[1]
    async with _client(suite, tokens=stale(old)) as client:
        async with client.session() as session:
            futures = [await session.submit("echo", f"s{i}") for i in range(3)]
        assert [f.result().output for f in futures] == [b"s0", b"s1", b"s2"]
        assert client.tokens is not None
        assert client.tokens.access_token != old.access_token

    # WatchResults the same way.
    old = logins[2]
    async with _client(suite, tokens=stale(old)) as client:
        got = []
        async for r in client.watch():
            got.append(r)
            if len(got) == 4:
                break
        assert [r.output for r in got] == [b"after refresh", b"s0", b"s1", b"s2"]
        assert got[0].request_id == enqueued.request_id


async def test_a_payload_over_the_message_limit_fails_only_its_own_submit(suite: Suite) -> None:
    """Callers sharing one Session: one payload is over gRPC's 8 MiB message limit, one
    over the server's payload limit (1 MiB). Only those two submits fail, each with
    Rejected (INVALID_ARGUMENT); the stream and every other caller go on."""
    async with _client(suite) as client:
        name = _name()
        await client.register(name, PASSWORD)
        await client.login(name, PASSWORD)
        payloads = {i: f"c{i}".encode() for i in range(60)}
        payloads[20] = b"x" * 9_000_000
        payloads[30] = b"y" * 1_100_000

        async def caller(i: int) -> Result:
            return await (await session.submit("echo", payloads[i], client_ref=f"c{i}"))

        async with client.session() as session:
            outcomes = await asyncio.gather(*map(caller, range(60)), return_exceptions=True)
        too_large, over_payload_limit = outcomes[20], outcomes[30]
        assert isinstance(too_large, Rejected)
        assert too_large.code == "INVALID_ARGUMENT"
        assert "over the 8388608-byte gRPC message limit" in too_large.message
        assert isinstance(over_payload_limit, Rejected)
        assert over_payload_limit.code == "INVALID_ARGUMENT"
        assert "payload is 1100000 bytes" in over_payload_limit.message
        results = [o for i, o in enumerate(outcomes) if i not in (20, 30)]
        assert all(isinstance(r, Result) and r.ok for r in results), results
        assert [r.output for r in results if isinstance(r, Result)] == [
            p for i, p in payloads.items() if i not in (20, 30)
        ]
        # The unary call is refused at once too (gRPC's own refusal is RESOURCE_EXHAUSTED,
        # which reads as "slow down and retry").
        with pytest.raises(InvalidArgument, match="8388608-byte gRPC message limit"):
            await client.enqueue("echo", payloads[20])


async def test_closing_the_client_ends_what_is_in_progress_with_client_closed(
    suite: Suite,
) -> None:
    """Client.close() with a Session waiting for a result, a watch, and a unary call
    waiting for its answer: each ends with ClientClosed, a FairlaneError. grpc.aio ends
    them with asyncio.CancelledError, which `except Exception` does not catch and which
    a TaskGroup reads as the task's own cancellation."""
    host, port = suite.target("worker").rsplit(":", 1)
    proxy = TcpProxy(host, int(port))  # holds the worker's answers when told to
    await proxy.start()
    name = _name()
    operator = _client(
        suite, tokens=Tokens.issued(await admin_token(suite.target("auth")), "", 900)
    )
    client = Client(suite.target("auth"), suite.target("queue"), f"127.0.0.1:{proxy.port}")
    try:
        await client.register(name, PASSWORD)
        await client.login(name, PASSWORD)
        assert await operator.pause() == WorkerState.PAUSED  # the request waits QUEUED
        await client.worker_status()  # connected through the proxy
        proxy.hold_replies()
        submitted: list[SubmitFuture] = []

        async def session() -> None:
            async with client.session() as s:
                submitted.append(await s.submit("echo", b"never runs"))
                await submitted[0]

        async def watch() -> None:
            async for _ in client.watch():
                pass

        async def unary() -> None:
            await client.worker_status(timeout=None)

        tasks = [asyncio.create_task(job()) for job in (session, watch, unary)]
        await until(lambda: bool(submitted and submitted[0].request_id), timeout=30)
        await client.close()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert [type(o) for o in outcomes] == [ClientClosed] * 3, outcomes
        assert all(isinstance(o, FairlaneError) for o in outcomes)
        with pytest.raises(ClientClosed):
            submitted[0].result()
    finally:
        await client.close()
        await operator.resume()
        await operator.close()
        await proxy.close()


def _call_until_closed(
    client: SyncClient, i: int, calls: threading.Semaphore, ends: list[BaseException]
) -> None:
    try:
        while True:
            if i % 2:
                client.whoami()
            else:
                client.enqueue("noop", b"")
            calls.release()
    except BaseException as exc:
        ends.append(exc)


async def test_sync_client_closed_under_calls_from_many_threads(
    suite: Suite, caplog: pytest.LogCaptureFixture
) -> None:
    """8 threads call one SyncClient (whoami, enqueue) while another thread closes it, over
    several rounds: every thread's call returns (ClientClosed) within a bound, later calls
    raise ClientClosed at once, and nothing is logged ('Event loop is closed' from grpc's
    poller, 'Task was destroyed but it is pending!')."""
    async with _client(suite) as client:
        name = _name()
        await client.register(name, PASSWORD)
        tokens = await client.login(name, PASSWORD)

    def rounds() -> list[str]:
        endings: list[str] = []
        for round_ in range(6):
            sync = SyncClient(
                suite.target("auth"), suite.target("queue"), suite.target("worker"), tokens=tokens
            )
            calls = threading.Semaphore(0)
            ends: list[BaseException] = []
            threads = [
                threading.Thread(
                    target=_call_until_closed, args=(sync, i, calls, ends), daemon=True
                )
                for i in range(8)
            ]
            for thread in threads:
                thread.start()
            for _ in range(8 + 8 * round_):  # close at a later point each round
                assert calls.acquire(timeout=30)
            closer = threading.Thread(target=sync.close, daemon=True)
            closer.start()
            deadline = time.monotonic() + 15
            for thread in [closer, *threads]:
                thread.join(max(0.0, deadline - time.monotonic()))
            assert not [t for t in [closer, *threads] if t.is_alive()], f"round {round_}"
            started = time.monotonic()
            with pytest.raises(ClientClosed):
                sync.whoami()
            sync.close()
            assert time.monotonic() - started < 1
            endings.extend(type(e).__name__ for e in ends)
        return endings

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        endings = await asyncio.to_thread(rounds)
    assert endings == ["ClientClosed"] * 48
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


# Blocks in a SyncClient call until SIGINT; then the client must still work, and nothing of
# the interrupted call may be left on its loop.
INTERRUPTED = (
    """
import asyncio, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # even where SIGINT is ignored
from fairlane.client import SyncClient, Tokens

auth, queue, token, mode = sys.argv[1:]
client = SyncClient(auth, queue, tokens=Tokens.issued(token, "", 900))
try:
    if mode == "watch":
        for result in client.watch():
            print("result", result.lane_seq, flush=True)
    else:
        client.submit_and_wait("sleep", b"60")
    print("returned", flush=True)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
print("lane", client.lane().last_lane_seq, flush=True)

"""
    + AFTER_THE_INTERRUPT
)


def _interrupt_sync_call(suite: Suite, tokens: Tokens, mode: str) -> tuple[int, str, str]:
    """Runs INTERRUPTED and sends it SIGINT once it is in the call: a watch has printed
    the stored result, or submit_and_wait's request is RUNNING."""
    auth, queue = suite.target("auth"), suite.target("queue")
    proc = subprocess.Popen(
        [sys.executable, "-c", INTERRUPTED, auth, queue, tokens.access_token, mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=suite.env(GRPC_VERBOSITY="ERROR"),
        text=True,
    )
    try:
        assert proc.stdout is not None
        if mode == "watch":
            assert proc.stdout.readline() == "result 1\n"
        else:
            with SyncClient(auth, queue, tokens=tokens) as observer:
                deadline = time.monotonic() + 30
                while not [r for page in observer.requests("running") for r in page]:
                    assert time.monotonic() < deadline, "the request never ran"
                    time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


@pytest.mark.parametrize("mode", ["watch", "submit_and_wait"])
async def test_ctrl_c_in_a_sync_client_call(suite: Suite, mode: str) -> None:
    """Ctrl-C in a SyncClient watch() or submit_and_wait (its request running): the caller
    gets KeyboardInterrupt, the client still works, nothing of the call is left on its
    loop, and closing it is silent."""
    async with _client(suite) as client:
        await client.register(name := _name(), PASSWORD)
        tokens = await client.login(name, PASSWORD)
        if mode == "watch":
            await _wait_final(client, (await client.enqueue("echo", b"before")).request_id)
        code, out, err = await asyncio.to_thread(_interrupt_sync_call, suite, tokens, mode)
        # A request that was accepted runs on (the session was cancelled, not the request).
        for request in [r async for page in client.requests("running") for r in page]:
            await client.cancel(request.request_id)
    assert code == 0, (out, err)
    lines = out.splitlines()
    assert lines[0] == "KeyboardInterrupt", out
    assert lines[1].startswith("lane "), out
    assert lines[2].startswith("left 0 "), out
    assert lines[3:] == ["closed"], out
    for noise in ("Traceback", "Event loop is closed", "Task was destroyed", "Exception"):
        assert noise not in err, err
