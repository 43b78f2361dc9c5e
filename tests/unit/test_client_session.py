"""Session bookkeeping of fairlane.client with a scripted fake stream (no network)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
import pytest

from fairlane.client import (
    Accepted,
    Client,
    ClientClosed,
    DeadlineExceeded,
    Event,
    FairlaneError,
    InvalidArgument,
    OutcomeUnknown,
    Rejected,
    RejectedEvent,
    Result,
    Session,
    SessionClosed,
    Status,
    SubmitFuture,
    Tokens,
    Unavailable,
)
from fairlane.client.channels import Channels
from fairlane.client.retry import RetryPolicy
from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2
from tests.polling import until
from tests.unit.test_client_retry import FakeAuthStub, rpc_error


class FakeCall:
    """One Session call: records writes; reads come from what the test feeds."""

    def __init__(self) -> None:
        self.written: list[queue_pb2.SessionRequest] = []
        self.half_closed = False
        self.cancelled = False
        self._responses: asyncio.Queue[Any] = asyncio.Queue()

    async def initial_metadata(self) -> tuple[()]:
        # The server accepted the stream (the client waits for this before writing).
        return ()

    def done(self) -> bool:
        return self.cancelled

    async def write(self, message: queue_pb2.SessionRequest) -> None:
        self.written.append(message)

    async def done_writing(self) -> None:
        self.half_closed = True

    async def read(self) -> Any:
        item = await self._responses.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        self._responses.put_nowait(asyncio.CancelledError())
        return True

    def feed(self, **kind: Any) -> None:
        self._responses.put_nowait(queue_pb2.SessionResponse(**kind))

    def end(self, error: BaseException | None = None) -> None:
        self._responses.put_nowait(error if error is not None else grpc.aio.EOF)


class FakeQueueStub:
    def __init__(self) -> None:
        self.calls: list[FakeCall] = []
        self.metadata: list[Any] = []
        self.watches: list[tuple[int, FakeCall]] = []
        self.timeouts: list[float | None] = []
        self.unary: list[FakeCall] = []
        self.enqueued: list[queue_pb2.EnqueueRequest] = []

    async def GetLane(self, request: Any, *, metadata: Any, timeout: Any) -> Any:
        # A unary call that is answered only when the test feeds it (or cancelled).
        self.unary.append(FakeCall())
        return await self.unary[-1].read()

    async def Enqueue(
        self, request: queue_pb2.EnqueueRequest, *, metadata: Any, timeout: Any
    ) -> queue_pb2.EnqueueResponse:
        self.enqueued.append(request)
        return queue_pb2.EnqueueResponse(request_id=f"u{len(self.enqueued)}")

    def WatchResults(self, request: queue_pb2.WatchResultsRequest, *, metadata: Any) -> FakeCall:
        self.watches.append((request.after_lane_seq, FakeCall()))
        return self.watches[-1][1]

    def Session(self, *, metadata: Any, timeout: Any) -> FakeCall:
        self.metadata.append(metadata)
        self.timeouts.append(timeout)
        self.calls.append(FakeCall())
        return self.calls[-1]


def _client(
    monkeypatch: pytest.MonkeyPatch, reconnect: RetryPolicy | None = None, **options: Any
) -> tuple[Client, FakeQueueStub, FakeAuthStub]:
    """A logged-in Client whose channels hand out the fake stubs."""
    tokens = Tokens("access-0", "refresh-0", time.time() + 3600, 3600, "alice")
    queue, auth = FakeQueueStub(), FakeAuthStub()
    monkeypatch.setattr(Channels, "queue", lambda self: queue)
    monkeypatch.setattr(Channels, "auth", lambda self: auth)
    client = Client("auth:1", "queue:1", tokens=tokens, reconnect=reconnect, **options)
    return client, queue, auth


# Reopens at once (no backoff), so that settle() sees each one.
NO_WAIT = RetryPolicy(max_attempts=3, base_backoff=0.0, max_backoff=0.0)


def accepted(ref: str, rid: str) -> queue_pb2.Accepted:
    return queue_pb2.Accepted(client_ref=ref, request_id=rid)


def result(rid: str, seq: int, output: bytes = b"") -> common_pb2.Result:
    return common_pb2.Result(
        request_id=rid, lane_seq=seq, status=common_pb2.REQUEST_STATUS_SUCCEEDED, output=output
    )


def sent(call: FakeCall) -> list[str]:
    """What was written, in order: enqueues by client_ref, cancels by request id."""
    refs: list[str] = []
    for message in call.written:
        kind = message.WhichOneof("kind")
        if kind == "enqueue_batch":
            refs.extend(r.client_ref for r in message.enqueue_batch.requests)
        elif kind == "enqueue":
            refs.append(message.enqueue.client_ref)
        else:
            refs.append(message.cancel.request_id)
    return refs


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_answers_match_submits_in_order_and_cancel_refusals_are_told_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)
    async with client.session() as session:
        call = queue.calls[0]
        first = await session.submit("echo", b"1", client_ref="a")
        await session.cancel("c")
        second = await session.submit("echo", b"2", client_ref="b")
        bad = await session.submit("nope", client_ref="c")
        await settle()
        # Ready together: one message per run of enqueues, the cancel alone in its place.
        assert [m.WhichOneof("kind") for m in call.written] == [
            "enqueue",
            "cancel",
            "enqueue_batch",
        ]
        assert sent(call) == ["a", "c", "b", "c"]
        # The refused cancel comes first, out of the answer order: no submit is consumed,
        # not even the one whose client_ref equals the id the cancel named.
        call.feed(rejected=queue_pb2.Rejected(cancel_request_id="c", code=5, message="no such"))
        call.feed(accepted=accepted("a", "r1"))
        call.feed(accepted=accepted("b", "r2"))
        call.feed(
            rejected=queue_pb2.Rejected(
                client_ref="c", code=8, message="lane full", retry_after_ms=250
            )
        )
        await settle()
        assert (first.request_id, second.request_id) == ("r1", "r2")
        assert session.in_flight == 2
        with pytest.raises(Rejected) as err:
            await bad
        assert (err.value.code, err.value.retry_after_ms) == ("RESOURCE_EXHAUSTED", 250)
        call.feed(result=result("r1", 7, b"one"))
        call.feed(result=result("r2", 8, b"two"))
        await session.close()
        assert call.half_closed
        call.end()
    assert (await first).output == b"one"
    assert (await second).lane_seq == 8
    assert session.last_lane_seq == 8
    events = [e async for e in session.events()]
    assert [type(e).__name__ for e in events] == [
        "RejectedEvent",
        "Accepted",
        "Accepted",
        "RejectedEvent",
        "Result",
        "Result",
    ]
    assert isinstance(events[0], RejectedEvent)
    assert events[0].code == "NOT_FOUND"
    assert (events[0].cancel_request_id, events[0].client_ref) == ("c", "")
    assert isinstance(events[1], Accepted)
    assert isinstance(events[5], Result)
    assert events[5].status is Status.SUCCEEDED
    with pytest.raises(SessionClosed):
        await session.submit("echo")


async def test_refused_token_refreshes_and_resends_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, auth = _client(monkeypatch)
    async with client.session() as session:
        one = await session.submit("echo", b"1", client_ref="a")
        await session.cancel("r0")
        two = await session.submit("echo", b"2", client_ref="b")
        queue.calls[0].end(rpc_error(grpc.StatusCode.UNAUTHENTICATED, "access token expired"))
        await settle()
        assert auth.refreshes == ["refresh-0"]
        assert queue.metadata == [
            (("authorization", "Bearer access-0"),),
            (("authorization", "Bearer access-1"),),
        ]
        second = queue.calls[1]
        assert sent(second) == ["a", "b", "r0"]
        second.feed(accepted=accepted("a", "r1"))
        second.feed(accepted=accepted("b", "r2"))
        second.feed(result=result("r1", 1))
        second.feed(result=result("r2", 2))
        await session.close()
        second.end()
    assert [(await one).lane_seq, (await two).lane_seq] == [1, 2]


# grpc.aio's own status when a write fails because the server has just ended the stream
# (grpc/grpc#36066): the server's status is lost.
CORE_WRITE_RACE = "Internal error from Core"


async def _answer_the_resend(session: Session, call: FakeCall, one: SubmitFuture) -> None:
    """The new stream carries request "a" again under its idempotency key; it is answered
    and the session closed."""
    assert sent(call) == ["a"]
    assert call.written[0].enqueue.idempotency_key == one.idempotency_key
    call.feed(accepted=accepted("a", "r1"))
    call.feed(result=result("r1", 1))
    await session.close()
    call.end()


@pytest.mark.parametrize(
    ("code", "details", "refreshes"),
    [
        # Most likely a refused token: refreshed first.
        (grpc.StatusCode.INTERNAL, CORE_WRITE_RACE, ["refresh-0"]),
        # Most likely a connection that had just dropped: the token was fine.
        (grpc.StatusCode.UNAVAILABLE, "Stream removed", []),
        # A busy server cancelled the call before it ran it.
        (grpc.StatusCode.CANCELLED, "CANCELLED", []),
    ],
    ids=["status lost in a write", "stream broken", "cancelled by the server"],
)
async def test_a_stream_ended_before_any_answer_is_sent_again_once(
    monkeypatch: pytest.MonkeyPatch, code: grpc.StatusCode, details: str, refreshes: list[str]
) -> None:
    client, queue, auth = _client(monkeypatch, NO_WAIT)
    async with client.session() as session:
        one = await session.submit("echo", b"1", client_ref="a")
        queue.calls[0].end(rpc_error(code, details))
        await settle()
        # Everything sent again with the same idempotency key, so a request the server
        # did take cannot run twice.
        assert auth.refreshes == refreshes
        await _answer_the_resend(session, queue.calls[1], one)
    assert (await one).lane_seq == 1


async def test_a_status_lost_twice_before_any_answer_fails_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch, NO_WAIT)
    session = client.session()
    await session.open()
    pending = await session.submit("echo", client_ref="a")
    queue.calls[0].end(rpc_error(grpc.StatusCode.INTERNAL, CORE_WRITE_RACE))
    await settle()
    queue.calls[1].end(rpc_error(grpc.StatusCode.INTERNAL, CORE_WRITE_RACE))
    await settle()
    assert len(queue.calls) == 2
    with pytest.raises(FairlaneError):
        await pending


async def test_a_stream_broken_again_on_its_new_connection_is_reopened_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The new stream can meet the connection that has just dropped, before the channel
    # noticed (sendmsg: Broken pipe): the session tries again, per its reconnect policy.
    client, queue, _ = _client(monkeypatch, NO_WAIT)
    async with client.session() as session:
        one = await session.submit("echo", b"1", client_ref="a")
        queue.calls[0].end(rpc_error(grpc.StatusCode.UNAVAILABLE, "Stream removed"))
        await settle()
        queue.calls[1].end(rpc_error(grpc.StatusCode.UNAVAILABLE, "Broken pipe"))
        await settle()
        await _answer_the_resend(session, queue.calls[2], one)
    assert (await one).lane_seq == 1


async def test_a_stream_that_keeps_breaking_fails_once_the_reconnect_policy_gives_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch, NO_WAIT)
    session = client.session()
    await session.open()
    pending = await session.submit("echo", client_ref="a")
    for n in range(NO_WAIT.max_attempts):
        queue.calls[n].end(rpc_error(grpc.StatusCode.UNAVAILABLE, f"connection refused {n}"))
        await settle()
    # One first call and a new one for each attempt the policy allows after it.
    assert len(queue.calls) == NO_WAIT.max_attempts
    with pytest.raises(Unavailable, match=f"connection refused {NO_WAIT.max_attempts - 1}"):
        await pending


async def test_a_stream_opened_again_gets_what_is_left_of_the_sessions_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch, NO_WAIT)
    async with client.session(timeout=30) as session:
        one = await session.submit("echo", b"1", client_ref="a")
        await asyncio.sleep(0.01)
        queue.calls[0].end(rpc_error(grpc.StatusCode.UNAVAILABLE, "Stream removed"))
        await settle()
        await _answer_the_resend(session, queue.calls[1], one)
    first, second = queue.timeouts
    assert first is not None
    assert second is not None
    assert first <= 30
    assert 0 < second <= first - 0.01


async def test_a_session_whose_timeout_has_passed_is_not_opened_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch, NO_WAIT)
    session = client.session(timeout=0.05)
    await session.open()
    pending = await session.submit("echo", client_ref="a")
    await asyncio.sleep(0.06)
    queue.calls[0].end(rpc_error(grpc.StatusCode.UNAVAILABLE, "Stream removed"))
    await settle()
    assert len(queue.calls) == 1
    with pytest.raises(DeadlineExceeded, match=r"timeout of 0\.05 s passed"):
        await pending


async def test_a_status_lost_with_accepted_requests_is_resumed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)
    session = client.session()
    await session.open()
    call = queue.calls[0]
    running = await session.submit("echo", client_ref="a")
    unanswered = await session.submit("echo", client_ref="b")
    call.feed(accepted=accepted("a", "r1"))
    call.end(rpc_error(grpc.StatusCode.INTERNAL, CORE_WRITE_RACE))
    await settle()
    # Most often the replica died as a submit was written: the session ended, nobody
    # knows whether "b" was stored. Unavailable, as for a stream cut on the way (the
    # usual producer loop catches that), not INTERNAL.
    with pytest.raises(Unavailable, match="lost the server's status"):
        await unanswered
    with pytest.raises(Unavailable, match="lost the server's status"):
        await session.submit("echo")
    assert [after for after, _ in queue.watches] == [0]
    watch = queue.watches[0][1]
    watch._responses.put_nowait(queue_pb2.WatchResultsResponse(result=result("r1", 1, b"a")))
    await settle()
    assert (await running).output == b"a"
    assert len(queue.calls) == 1  # resumed, not resent: "a" was accepted


async def test_any_other_internal_error_is_not_resent(monkeypatch: pytest.MonkeyPatch) -> None:
    client, queue, _ = _client(monkeypatch)
    session = client.session()
    await session.open()
    pending = await session.submit("echo", client_ref="a")
    queue.calls[0].end(rpc_error(grpc.StatusCode.INTERNAL, "internal error (id 1f2e)"))
    await settle()
    assert len(queue.calls) == 1
    with pytest.raises(FairlaneError, match="id 1f2e"):
        await pending


async def test_a_broken_stream_fails_what_is_pending_and_is_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)
    session = client.session(resume=False)
    await session.open()
    call = queue.calls[0]
    done = await session.submit("echo", client_ref="a")
    running = await session.submit("echo", client_ref="b")
    unanswered = await session.submit("echo", client_ref="c")
    call.feed(accepted=accepted("a", "r1"))
    call.feed(accepted=accepted("b", "r2"))
    call.feed(result=result("r1", 1))
    call.end(rpc_error(grpc.StatusCode.UNAVAILABLE, "connection reset"))
    await settle()
    assert (await done).lane_seq == 1
    # Not answered: the stream's error (whether it was stored is unknown; its idempotency
    # key makes sending it again safe).
    with pytest.raises(Unavailable):
        await unanswered
    # Accepted: never the bare stream error, which would read as if it had failed.
    with pytest.raises(OutcomeUnknown) as unknown:
        await running
    assert (unknown.value.request_id, unknown.value.code) == ("r2", "UNAVAILABLE")
    assert isinstance(unknown.value.reason, Unavailable)
    assert isinstance(unknown.value, SessionClosed)
    assert "accepted" in str(unknown.value)
    assert "Client.get('r2')" in str(unknown.value)
    assert running.request_id == "r2"
    assert unanswered.request_id is None
    assert len(queue.calls) == 1  # not reopened: only a refused token is resent
    # Leaving the block normally raises the stream's error rather than hiding it.
    with pytest.raises(Unavailable, match="connection reset"):
        await session.__aexit__(None, None, None)

    received: list[Event] = []

    async def collect() -> None:
        async for event in session.events():
            received.append(event)

    with pytest.raises(Unavailable):
        await collect()
    assert len(received) == 3


async def test_submit_waits_for_room_in_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    client, queue, _ = _client(monkeypatch)
    async with client.session(max_in_flight=2, record_events=False) as session:
        call = queue.calls[0]
        await session.submit("echo", client_ref="a")
        await session.submit("echo", client_ref="b")
        third = asyncio.create_task(session.submit("echo", client_ref="c"))
        await settle()
        assert not third.done()
        assert sent(call) == ["a", "b"]
        call.feed(accepted=accepted("a", "r1"))
        call.feed(result=result("r1", 1))
        await settle()
        assert third.done()
        assert sent(call) == ["a", "b", "c"]
        call.feed(accepted=accepted("b", "r2"))
        call.feed(accepted=accepted("c", "r3"))
        call.feed(result=result("r2", 2))
        call.feed(result=result("r3", 3))
        await session.close()
        call.end()
    assert (await third.result()).lane_seq == 3


async def test_leaving_with_an_exception_cancels_the_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)
    pending = None
    with contextlib.suppress(RuntimeError):
        async with client.session() as session:
            pending = await session.submit("echo", client_ref="a")
            queue.calls[0].feed(accepted=accepted("a", "r1"))
            await until(lambda: pending is not None and pending.request_id is not None)
            raise RuntimeError("caller gave up")
    assert queue.calls[0].cancelled
    assert pending is not None
    # Says what happened (nobody cancelled anything) and where the result still is.
    with pytest.raises(SessionClosed, match=r"left with an exception \(RuntimeError\)") as err:
        await pending
    assert "still runs" in err.value.message
    assert "Client.watch" in err.value.message


async def test_a_broken_stream_is_resumed_with_watch_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)
    session = client.session()
    await session.open()
    call = queue.calls[0]
    done = await session.submit("echo", client_ref="a")
    running = [await session.submit("echo", client_ref=ref) for ref in ("b", "c")]
    unanswered = await session.submit("echo", client_ref="d")
    call.feed(accepted=accepted("a", "r1"))
    call.feed(accepted=accepted("b", "r2"))
    call.feed(accepted=accepted("c", "r3"))
    call.feed(result=result("r1", 11))
    call.end(rpc_error(grpc.StatusCode.UNAVAILABLE, "queue replica died"))
    await settle()
    # Not answered before the break: unknown whether accepted, so it fails.
    with pytest.raises(Unavailable, match="queue replica died"):
        await unanswered
    with pytest.raises(Unavailable):
        await session.submit("echo")
    # The accepted ones are collected from WatchResults after the last lane_seq seen.
    assert [after for after, _ in queue.watches] == [11]
    watch = queue.watches[0][1]
    watch._responses.put_nowait(queue_pb2.WatchResultsResponse(result=result("other", 12)))
    watch._responses.put_nowait(queue_pb2.WatchResultsResponse(result=result("r2", 13, b"b")))
    watch._responses.put_nowait(queue_pb2.WatchResultsResponse(result=result("r3", 14, b"c")))
    await settle()
    assert watch.cancelled
    assert (await done).lane_seq == 11
    assert [(await f).output for f in running] == [b"b", b"c"]
    with pytest.raises(Unavailable):  # one submit was lost: leaving the block says so
        await session.__aexit__(None, None, None)
    results: list[str] = []

    async def collect() -> None:
        async for event in session.events():
            if isinstance(event, Result):
                results.append(event.request_id)

    with pytest.raises(Unavailable):
        await collect()
    assert results == ["r1", "r2", "r3"]


async def test_answers_packed_in_a_batch_are_handled_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)
    async with client.session() as session:
        call = queue.calls[0]
        futures = [await session.submit("echo", client_ref=ref) for ref in "abc"]
        await settle()
        assert [m.WhichOneof("kind") for m in call.written] == ["enqueue_batch"]
        keys = [r.idempotency_key for r in call.written[0].enqueue_batch.requests]
        assert keys == [f.idempotency_key for f in futures]
        assert len(set(keys)) == 3
        inner = [
            queue_pb2.SessionResponse(accepted=accepted("a", "r1")),
            queue_pb2.SessionResponse(accepted=accepted("b", "r2")),
            queue_pb2.SessionResponse(result=result("r1", 1, b"one")),
            queue_pb2.SessionResponse(
                rejected=queue_pb2.Rejected(client_ref="c", code=14, message="busy")
            ),
        ]
        call.feed(batch=queue_pb2.SessionResponseBatch(responses=inner))
        call.feed(result=result("r2", 2, b"two"))
        await session.close()
        assert call.half_closed
        call.end()
    assert [(await f).output for f in futures[:2]] == [b"one", b"two"]
    with pytest.raises(Rejected, match="busy"):
        await futures[2]
    kinds = [type(e).__name__ async for e in session.events()]
    assert kinds == ["Accepted", "Accepted", "Result", "RejectedEvent", "Result"]


async def test_a_failing_writer_fails_the_session_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)
    session = client.session()
    await session.open()

    async def broken(message: queue_pb2.SessionRequest) -> None:
        raise RuntimeError("serializer bug")

    monkeypatch.setattr(queue.calls[0], "write", broken)
    future = await session.submit("echo", client_ref="a")
    with pytest.raises(FairlaneError, match="session writer failed"):
        await future
    assert queue.calls[0].cancelled
    with pytest.raises(FairlaneError, match="session writer failed"):
        await session.submit("echo")


LIMIT = 100_000  # a channel's grpc.max_send_message_length in the tests below


async def test_an_enqueue_over_the_message_limit_fails_alone_and_in_its_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gRPC fails a message over the channel's limit on the client side and with it the
    whole stream: every caller's futures, accepted requests' too. The session refuses
    such a submit itself: its future fails with Rejected (INVALID_ARGUMENT) when its turn
    to be answered comes, and no other caller notices. Batches stay under the limit too."""
    client, queue, _ = _client(
        monkeypatch, channel_options=[("grpc.max_send_message_length", LIMIT)]
    )
    async with client.session() as session:
        call = queue.calls[0]
        first = await session.submit("echo", b"a", client_ref="a")
        big = await session.submit("echo", b"x" * LIMIT, client_ref="big")
        rest = [await session.submit("echo", b"p" * 30_000, client_ref=f"r{i}") for i in range(6)]
        await settle()
        assert sent(call) == ["a", *(f"r{i}" for i in range(6))]
        assert all(message.ByteSize() <= LIMIT for message in call.written)
        assert [m.WhichOneof("kind") for m in call.written] == ["enqueue_batch"] * 2
        assert not big.done()  # answers come in submit order: "a" is answered first
        call.feed(accepted=accepted("a", "ra"))
        await settle()
        with pytest.raises(Rejected) as refused:
            await big
        assert refused.value.code == "INVALID_ARGUMENT"
        assert f"over the {LIMIT}-byte gRPC message limit" in refused.value.message
        assert "it was not sent" in refused.value.message
        assert (refused.value.client_ref, big.request_id) == ("big", None)
        for i in range(6):
            call.feed(accepted=accepted(f"r{i}", f"r{i}"))
        call.feed(result=result("ra", 1))
        for i in range(6):
            call.feed(result=result(f"r{i}", i + 2))
        await session.close()
        call.end()
    assert (await first).lane_seq == 1
    assert [(await f).lane_seq for f in rest] == list(range(2, 8))
    answers = [
        (type(e).__name__, e.client_ref)
        async for e in session.events()
        if isinstance(e, Accepted | RejectedEvent)
    ]
    assert answers == [
        ("Accepted", "a"),
        ("RejectedEvent", "big"),
        *(("Accepted", f"r{i}") for i in range(6)),
    ]


async def test_a_refused_enqueue_first_in_line_is_answered_at_once_and_never_resent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(
        monkeypatch, NO_WAIT, channel_options=[("grpc.max_send_message_length", LIMIT)]
    )
    async with client.session() as session:
        big = await session.submit("echo", b"x" * LIMIT, client_ref="big")
        with pytest.raises(Rejected, match="gRPC message limit"):
            await big
        assert session.in_flight == 0
        after = await session.submit("echo", b"1", client_ref="a")
        too = await session.submit("echo", b"y" * LIMIT, client_ref="too")
        # A stream broken before any answer is opened again with everything unanswered,
        # except what was never sent.
        queue.calls[0].end(rpc_error(grpc.StatusCode.UNAVAILABLE, "Stream removed"))
        await settle()
        await _answer_the_resend(session, queue.calls[1], after)
    with pytest.raises(Rejected, match="gRPC message limit"):
        await too
    assert (await after).lane_seq == 1


async def test_a_unary_enqueue_over_the_message_limit_is_refused_without_a_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # gRPC would refuse it on the client side as RESOURCE_EXHAUSTED, which the client
    # retries (in vain) and then reports as "slow down".
    client, queue, _ = _client(
        monkeypatch, channel_options=[("grpc.max_send_message_length", LIMIT)]
    )
    with pytest.raises(InvalidArgument, match=f"over the {LIMIT}-byte gRPC message limit"):
        await client.enqueue("echo", b"x" * LIMIT)
    assert queue.enqueued == []
    assert (await client.enqueue("echo", b"x" * (LIMIT - 100))).request_id == "u1"
    # Without options: gRPC's 8 MiB, the servers' limit too.
    default, queue, _ = _client(monkeypatch)
    with pytest.raises(InvalidArgument, match="over the 8388608-byte gRPC message limit"):
        await default.enqueue("echo", b"x" * 8 * 1024 * 1024)
    assert queue.enqueued == []


async def _break_while_submitting(
    client: Client, queue: FakeQueueStub, futures: list[SubmitFuture]
) -> None:
    """The usual producer loop: a request accepted ("b") and unfinished when the stream
    breaks; the next submit raises the break, which leaves the block."""
    async with client.session() as session:
        for ref in "abc":
            futures.append(await session.submit("echo", client_ref=ref))
        call = queue.calls[0]
        call.feed(accepted=accepted("a", "r1"))
        call.feed(accepted=accepted("b", "r2"))
        call.feed(result=result("r1", 1))
        call.end(rpc_error(grpc.StatusCode.UNAVAILABLE, "queue replica died"))
        await until(lambda: bool(queue.watches))
        await session.submit("echo", client_ref="d")


async def test_leaving_the_block_with_the_break_still_resolves_accepted_futures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)
    futures: list[SubmitFuture] = []
    producer = asyncio.create_task(_break_while_submitting(client, queue, futures))
    await until(lambda: bool(queue.watches))
    # Not answered before the break: whether it was accepted is unknown.
    with pytest.raises(Unavailable, match="queue replica died"):
        await futures[2]
    await settle()
    # Leaving the block waits for the results being collected from WatchResults.
    assert not producer.done()
    assert not futures[1].done()
    after, watch = queue.watches[0]
    assert after == 1
    watch._responses.put_nowait(queue_pb2.WatchResultsResponse(result=result("r2", 2, b"b")))
    with pytest.raises(Unavailable, match="queue replica died"):
        await producer
    assert (await futures[0]).lane_seq == 1
    assert (await futures[1]).output == b"b"
    assert watch.cancelled


async def test_cancelling_the_caller_while_it_waits_for_the_resume_cancels_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)
    futures: list[SubmitFuture] = []
    producer = asyncio.create_task(_break_while_submitting(client, queue, futures))
    await until(lambda: bool(queue.watches))
    await settle()
    producer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await producer
    with pytest.raises(SessionClosed, match=r"the session was cancelled; .* still runs"):
        await futures[1]
    assert queue.watches[0][1].cancelled


async def test_closing_the_client_ends_what_is_in_progress_with_client_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Client.close() while a session, a watch and a unary call are in progress: each
    ends with ClientClosed (a FairlaneError), not with an asyncio.CancelledError that
    `except Exception` would not catch and that reads as the task's own cancellation."""
    client, queue, _ = _client(monkeypatch)
    close = Channels.close

    async def close_as_grpc_does(self: Channels) -> None:
        # grpc.aio's channel.close() cancels every call on the channel: whoever awaits
        # one gets asyncio.CancelledError, though their task was not cancelled.
        await close(self)
        for call in [*queue.calls, *(c for _, c in queue.watches), *queue.unary]:
            call.cancel()

    monkeypatch.setattr(Channels, "close", close_as_grpc_does)
    submitted: list[SubmitFuture] = []
    left = asyncio.Event()

    async def wait_for_the_result() -> None:
        async with client.session() as session:
            submitted.append(await session.submit("echo", client_ref="a"))
            await submitted[0]

    async def leave_after_close() -> None:
        async with client.session() as session:
            submitted.append(await session.submit("echo", client_ref="b"))
            await left.wait()

    async def watch() -> None:
        async for _ in client.watch():
            pass

    tasks = [
        asyncio.create_task(job())
        for job in (wait_for_the_result, leave_after_close, watch, client.lane)
    ]
    await until(lambda: len(queue.calls) == 2 and len(queue.watches) == 1 and len(queue.unary) == 1)
    await settle()
    await client.close()
    left.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert [type(o).__name__ for o in outcomes] == ["ClientClosed"] * 4
    assert all(isinstance(o, FairlaneError) and str(o) == "the client is closed" for o in outcomes)
    for future in submitted:
        with pytest.raises(ClientClosed):
            await future


async def test_a_callers_own_cancellation_is_still_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, queue, _ = _client(monkeypatch)

    async def watch() -> None:
        async for _ in client.watch():
            pass

    async def session() -> None:
        async with client.session() as s:
            await s.submit("echo")
            await asyncio.Event().wait()

    tasks = [asyncio.create_task(job()) for job in (watch, session, client.lane)]
    await until(lambda: bool(queue.calls and queue.watches and queue.unary))
    await settle()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert all(task.cancelled() for task in tasks)


class HeldCall(FakeCall):
    """A Session call the server has not accepted yet: no initial metadata comes."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()

    async def initial_metadata(self) -> tuple[()]:
        self.waiting.set()
        await asyncio.Event().wait()
        return ()


async def test_cancelled_before_the_server_took_the_stream_cancels_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C or a task cancel while the stream waits to be accepted: the call is
    cancelled, rather than left open on the server until the client closes."""
    client, queue, _ = _client(monkeypatch)
    held = HeldCall()

    def session_call(*, metadata: Any, timeout: Any) -> FakeCall:
        queue.calls.append(held)
        return held

    monkeypatch.setattr(queue, "Session", session_call)

    async def open_session() -> None:
        async with client.session():
            pass

    task = asyncio.create_task(open_session())
    await asyncio.wait_for(held.waiting.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held.cancelled
