"""The Session stream over a scripted queue domain: answers in the order sent, a window
that counts until responses are written, results read from the log when they do not
arrive, and a stream that ends once every accepted request has its result."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane.queue.v1 import queue_pb2
from fairlane_server.core.tokens import Principal
from fairlane_server.queue.domain import StreamLimits
from fairlane_server.queue.hub import Hub
from fairlane_server.queue.intake import Admitted, Rejection
from fairlane_server.queue.session import MAX_BATCH_BYTES, SessionStream, StreamError
from fairlane_server.queue.validation import InvalidEnqueue
from tests.polling import until

USER = str(uuid.uuid4())


class Domain:
    """Admits everything at once unless told otherwise; results come only when sent."""

    def __init__(self, *, window: int = 8, grace: float = 30.0, max_batch: int = 4) -> None:
        self.hub = Hub()
        self.streams = StreamLimits(
            session_window=window,
            max_batch_items=max_batch,
            max_streams_per_user=2,
            results_page=100,
            result_grace_seconds=grace,
        )
        self.admitted: list[str] = []
        self.futures: dict[str, asyncio.Future[Admitted]] = {}
        self.hold: set[str] = set()  # client_refs whose admission waits for release()
        self.in_log: dict[str, common_pb2.Result] = {}

    async def admit(
        self, msg: queue_pb2.EnqueueRequest, principal: Principal
    ) -> tuple[uuid.UUID, asyncio.Future[Admitted]]:
        if msg.handler == "bad":
            raise InvalidEnqueue("unknown handler 'bad'")
        rid = uuid.uuid4()
        future: asyncio.Future[Admitted] = asyncio.get_running_loop().create_future()
        self.admitted.append(msg.client_ref)
        self.futures[msg.client_ref] = future
        if msg.handler == "full":
            future.set_exception(Rejection("lane_full", "your lane is full", 1000))
        elif msg.client_ref not in self.hold:
            future.set_result(Admitted(rid, duplicate=False))
        return rid, future

    def release(self, client_ref: str) -> None:
        self.futures[client_ref].set_result(Admitted(uuid.uuid4(), duplicate=False))

    async def cancel(self, user: uuid.UUID, request_id: uuid.UUID) -> str | None:
        return None  # no such request

    async def stored_result(self, user: uuid.UUID, request_id: uuid.UUID) -> Any:
        return None

    async def finished(self, user: uuid.UUID, ids: list[uuid.UUID]) -> list[common_pb2.Result]:
        return [self.in_log[str(i)] for i in ids if str(i) in self.in_log]

    async def result(self, request_id: str, seq: int, output: bytes = b"") -> None:
        batch = lane_pb2.LaneEventBatch(
            events=[
                lane_pb2.LaneEvent(
                    user_id=USER,
                    result=common_pb2.Result(request_id=request_id, lane_seq=seq, output=output),
                )
            ]
        )
        await self.hub.on_message(batch.SerializeToString())


class Client:
    """The client side of the stream: sends through a queue, half-closes with None."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[queue_pb2.SessionRequest | None] = asyncio.Queue()

    def enqueue(self, ref: str, handler: str = "echo") -> None:
        self.outbox.put_nowait(
            queue_pb2.SessionRequest(
                enqueue=queue_pb2.EnqueueRequest(handler=handler, client_ref=ref)
            )
        )

    def cancel(self, request_id: str) -> None:
        self.outbox.put_nowait(
            queue_pb2.SessionRequest(cancel=queue_pb2.CancelRequestRequest(request_id=request_id))
        )

    def close(self) -> None:
        self.outbox.put_nowait(None)

    async def requests(self) -> AsyncIterator[queue_pb2.SessionRequest]:
        while (msg := await self.outbox.get()) is not None:
            yield msg


class Token:
    """The stream's token: good until told otherwise (`refuse` for the per-message check,
    `fire` for what the watch reports while the stream waits)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.on_refused: Callable[[str], None] | None = None
        self.unwatched = False

    async def refusal(self, principal: Principal) -> str | None:
        return self.reason

    def watch(self, principal: Principal, on_refused: Callable[[str], None]) -> Callable[[], None]:
        self.on_refused = on_refused

        def unwatch() -> None:
            self.unwatched = True

        return unwatch

    def fire(self, reason: str) -> None:
        assert self.on_refused is not None
        self.on_refused(reason)


def stream(
    domain: Domain, client: Client, token: Token | None = None
) -> AsyncGenerator[queue_pb2.SessionResponse, None]:
    principal = Principal(user_id=USER, username="u", role="user")
    return SessionStream(domain, principal, client.requests(), token).run()  # type: ignore[arg-type]


def kind(response: queue_pb2.SessionResponse) -> str:
    k = response.WhichOneof("kind")
    if k == "accepted":
        return f"accepted {response.accepted.client_ref}"
    if k == "rejected":
        r = response.rejected
        return f"rejected {r.client_ref or r.cancel_request_id} {r.code}"
    return f"result {response.result.lane_seq}"


async def test_answers_come_in_the_order_sent_whatever_resolves_first() -> None:
    domain, client = Domain(), Client()
    domain.hold.add("a")
    client.enqueue("a")
    client.enqueue("b", handler="bad")
    client.cancel("not-an-id")
    client.enqueue("c", handler="full")
    client.enqueue("d")
    out = stream(domain, client)
    first = asyncio.ensure_future(anext(out))
    await asyncio.sleep(0.05)
    assert not first.done()  # "a" is not answered yet, so nothing after it is either
    domain.release("a")
    answers = [kind(await first)] + [kind(await anext(out)) for _ in range(4)]
    assert answers == [
        "accepted a",
        "rejected b 3",  # INVALID_ARGUMENT
        "rejected not-an-id 3",
        "rejected c 8",  # RESOURCE_EXHAUSTED
        "accepted d",
    ]
    await out.aclose()


async def test_the_window_counts_until_the_result_is_written() -> None:
    domain, client = Domain(window=3), Client()
    for i in range(10):
        client.enqueue(str(i))
    out = stream(domain, client)
    answers = [await anext(out) for _ in range(3)]
    await asyncio.sleep(0.05)
    # Three answered, none finished: the stream stops reading at the window.
    assert domain.admitted == ["0", "1", "2"]
    await domain.result(answers[0].accepted.request_id, 1)
    result = await anext(out)
    assert result.result.lane_seq == 1
    # Written, so its slot is free again: one more request is read.
    assert kind(await anext(out)) == "accepted 3"
    assert domain.admitted == ["0", "1", "2", "3"]
    await out.aclose()


async def test_a_client_that_stops_reading_stops_the_server_reading() -> None:
    domain, client = Domain(window=4), Client()
    for i in range(100):
        client.enqueue(str(i))
    out = stream(domain, client)
    accepted = [await anext(out) for _ in range(4)]
    for seq, a in enumerate(accepted, 1):
        await domain.result(a.accepted.request_id, seq)
    await asyncio.sleep(0.05)
    # Four results are waiting to be written; the client reads nothing, so nothing more
    # is read from it, however many requests it has sent.
    assert len(domain.admitted) == 4
    await out.aclose()


async def test_a_result_that_never_arrives_is_read_from_the_log() -> None:
    domain, client = Domain(grace=0.05), Client()
    client.enqueue("a")
    client.close()
    out = stream(domain, client)
    accepted = await anext(out)
    rid = accepted.accepted.request_id
    domain.in_log[rid] = common_pb2.Result(request_id=rid, lane_seq=7)
    result = await asyncio.wait_for(anext(out), 5)
    assert (result.result.request_id, result.result.lane_seq) == (rid, 7)
    # Half-closed and every result delivered: the stream ends.
    with pytest.raises(StopAsyncIteration):
        await anext(out)


async def test_an_idle_session_holds_one_task_and_starts_the_others_for_work() -> None:
    """Thousands of Sessions sit idle at once: each keeps only the reader of its client's
    messages. The answerer and the log reader start again with the next enqueue, and the
    log reader still finds a result the fan-out never brought."""
    domain, client = Domain(grace=0.05), Client()
    before = len(asyncio.all_tasks())
    out = stream(domain, client)
    client.enqueue("a")
    (a,) = await _accept_all(out, 1)
    await domain.result(a, 1)
    assert kind(await anext(out)) == "result 1"
    await until(lambda: len(asyncio.all_tasks()) - before == 1)

    client.enqueue("b")
    client.close()
    (b,) = await _accept_all(out, 1)
    domain.in_log[b] = common_pb2.Result(request_id=b, lane_seq=2)
    result = await asyncio.wait_for(anext(out), 5)
    assert (result.result.request_id, result.result.lane_seq) == (b, 2)
    with pytest.raises(StopAsyncIteration):
        await anext(out)
    await until(lambda: len(asyncio.all_tasks()) == before)


async def test_an_oversized_batch_ends_the_stream_with_invalid_argument() -> None:
    domain, client = Domain(), Client()
    client.outbox.put_nowait(
        queue_pb2.SessionRequest(
            enqueue_batch=queue_pb2.EnqueueBatch(
                requests=[queue_pb2.EnqueueRequest(handler="echo") for _ in range(5)]
            )
        )
    )
    out = stream(domain, client)
    with pytest.raises(StreamError) as err:
        await anext(out)
    assert "at most 4" in str(err.value)
    assert domain.admitted == []


async def _accept_all(out: AsyncGenerator[queue_pb2.SessionResponse, None], n: int) -> list[str]:
    return [(await anext(out)).accepted.request_id for _ in range(n)]


async def test_results_go_out_in_lane_seq_order_when_an_older_event_is_lost() -> None:
    domain, client = Domain(grace=30.0), Client()
    for ref in "abc":
        client.enqueue(ref)
    client.close()
    out = stream(domain, client)
    a, b, c = await _accept_all(out, 3)
    # a's result event was lost in a broker fault; it is in the log. b's and c's arrive.
    domain.in_log[a] = common_pb2.Result(request_id=a, lane_seq=1)
    await domain.result(b, 2)
    await domain.result(c, 3)
    got = [(await asyncio.wait_for(anext(out), 2)).result for _ in range(3)]
    assert [(r.request_id, r.lane_seq) for r in got] == [(a, 1), (b, 2), (c, 3)]
    with pytest.raises(StopAsyncIteration):
        await anext(out)


async def test_a_result_ahead_of_an_unfinished_older_request_is_not_held() -> None:
    domain, client = Domain(grace=30.0), Client()
    client.enqueue("running")
    client.enqueue("cancelled")
    client.close()
    out = stream(domain, client)
    running, cancelled = await _accept_all(out, 2)
    # The second was cancelled while the first still runs: it finished first. The log
    # says the first has not finished, so the second goes out at once.
    await domain.result(cancelled, 1)
    first = (await asyncio.wait_for(anext(out), 2)).result
    assert (first.request_id, first.lane_seq) == (cancelled, 1)
    await domain.result(running, 2)
    second = (await asyncio.wait_for(anext(out), 2)).result
    assert (second.request_id, second.lane_seq) == (running, 2)
    # The late event of a result already read from the log is not sent twice.
    await domain.result(cancelled, 1)
    with pytest.raises(StopAsyncIteration):
        await anext(out)


def _flat(response: queue_pb2.SessionResponse) -> list[queue_pb2.SessionResponse]:
    if response.WhichOneof("kind") == "batch":
        return list(response.batch.responses)
    return [response]


async def test_large_results_ready_at_once_are_split_into_messages_under_the_byte_bound() -> None:
    """Responses ready together are coalesced once the client sends enqueue_batch, but a
    message never grows past MAX_BATCH_BYTES (gRPC's send limit is 8 MiB; ten 1 MiB
    results in one message failed the whole stream with RESOURCE_EXHAUSTED)."""
    n = 10
    domain, client = Domain(window=2 * n, max_batch=n), Client()
    client.outbox.put_nowait(
        queue_pb2.SessionRequest(
            enqueue_batch=queue_pb2.EnqueueBatch(
                requests=[
                    queue_pb2.EnqueueRequest(handler="echo", client_ref=str(i)) for i in range(n)
                ]
            )
        )
    )
    client.close()
    out = stream(domain, client)
    accepted: list[str] = []
    while len(accepted) < n:
        accepted.extend(r.accepted.request_id for r in _flat(await anext(out)))
    # Every result is ready before the stream writes any: three fit in one message.
    output = b"x" * (MAX_BATCH_BYTES // 3 - 100)
    for seq, rid in enumerate(accepted, 1):
        await domain.result(rid, seq, output)
    messages = [m async for m in out]  # the stream ends after the last result
    results = [r.result for m in messages for r in _flat(m)]
    assert [(r.request_id, r.lane_seq) for r in results] == [
        (rid, seq) for seq, rid in enumerate(accepted, 1)
    ]
    assert all(r.output == output for r in results)
    assert all(m.ByteSize() <= MAX_BATCH_BYTES for m in messages)
    assert [len(_flat(m)) for m in messages] == [3, 3, 3, 1]


async def test_a_response_larger_than_the_byte_bound_goes_out_alone() -> None:
    domain, client = Domain(window=8), Client()
    client.outbox.put_nowait(
        queue_pb2.SessionRequest(
            enqueue_batch=queue_pb2.EnqueueBatch(
                requests=[
                    queue_pb2.EnqueueRequest(handler="echo", client_ref=str(i)) for i in range(3)
                ]
            )
        )
    )
    client.close()
    out = stream(domain, client)
    accepted: list[str] = []
    while len(accepted) < 3:
        accepted.extend(r.accepted.request_id for r in _flat(await anext(out)))
    sizes = [10, MAX_BATCH_BYTES + 1, 10]
    for seq, (rid, size) in enumerate(zip(accepted, sizes, strict=True), 1):
        await domain.result(rid, seq, b"y" * size)
    messages = [m async for m in out]
    assert [m.WhichOneof("kind") for m in messages] == ["result"] * 3
    assert [len(m.result.output) for m in messages] == sizes


async def test_a_message_after_the_token_stopped_holding_ends_the_stream_unauthenticated() -> None:
    domain, client, token = Domain(), Client(), Token()
    out = stream(domain, client, token)
    client.enqueue("a")
    assert kind(await anext(out)) == "accepted a"
    token.reason = "login revoked; log in again and open a new stream"
    client.enqueue("b")
    with pytest.raises(StreamError) as err:
        await anext(out)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert str(err.value) == "login revoked; log in again and open a new stream"
    assert domain.admitted == ["a"]  # b was never admitted
    assert token.unwatched


async def test_an_idle_session_ends_when_its_login_is_revoked() -> None:
    domain, client, token = Domain(), Client(), Token()
    before = len(asyncio.all_tasks())
    out = stream(domain, client, token)
    client.enqueue("a")
    assert kind(await anext(out)) == "accepted a"  # its result never comes
    token.fire("login revoked; log in again and open a new stream")
    with pytest.raises(StreamError) as err:
        await anext(out)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in str(err.value)
    client.enqueue("b")  # too late: nothing reads it
    await until(lambda: len(asyncio.all_tasks()) == before)
    assert domain.admitted == ["a"]
    assert token.unwatched


async def test_what_was_read_before_the_token_stopped_holding_is_answered_first() -> None:
    domain, client, token = Domain(), Client(), Token()
    domain.hold.add("a")
    client.enqueue("a")
    client.enqueue("b", handler="full")
    out = stream(domain, client, token)
    first = asyncio.ensure_future(anext(out))
    await until(lambda: domain.admitted == ["a", "b"])
    token.fire("login revoked; log in again and open a new stream")
    domain.release("a")
    assert kind(await first) == "accepted a"
    assert kind(await anext(out)) == "rejected b 8"
    with pytest.raises(StreamError) as err:
        await anext(out)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_half_closed_session_still_ends_when_its_login_is_revoked() -> None:
    """The client's half-close and the revocation wait together behind an answer: the
    revocation is not dropped with the half-close (the stream would have gone on sending
    the revoked login its results)."""
    domain, client, token = Domain(), Client(), Token()
    domain.hold.add("a")
    client.enqueue("a")
    client.close()
    principal = Principal(user_id=USER, username="u", role="user")
    session = SessionStream(domain, principal, client.requests(), token)  # type: ignore[arg-type]
    out = session.run()
    first = asyncio.ensure_future(anext(out))
    await until(lambda: session._reader is not None and session._reader.done())
    token.fire("login revoked; log in again and open a new stream")
    domain.release("a")
    assert kind(await first) == "accepted a"
    with pytest.raises(StreamError) as err:
        await asyncio.wait_for(anext(out), 5)  # a's result never comes
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
