"""A Session's byte budget: a client that does not read makes the stream hold at most
FAIRLANE_SESSION_BUFFER_BYTES of result outputs, wherever it holds them (waiting to be
written, held back behind an older request, come before their accepted). Past the budget a
result is held without its output, which is read from the log when its turn comes; once the
client reads, it gets every result, in order, with its output."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncGenerator

import grpc
import pytest

from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2
from fairlane_server.core.tokens import Principal
from fairlane_server.queue import session as session_module
from fairlane_server.queue.catch_up import CatchUpStopped
from fairlane_server.queue.domain import Withheld
from fairlane_server.queue.intake import Admitted
from fairlane_server.queue.session import MAX_BATCH_BYTES, SessionStream, StreamError
from tests.polling import until
from tests.unit.test_session_stream import USER, Client, Domain

SIZE = 100_000  # each result's output
BUDGET = 1_000_000  # ten outputs


class LogDomain(Domain):
    """Admits with the request id it handed out, and answers log reads from `in_log`,
    recording each read's ids; `gate` holds reads back, `failures` makes the next ones
    fail."""

    def __init__(self, *, window: int, grace: float = 30.0, max_batch: int = 4) -> None:
        super().__init__(window=window, grace=grace, max_batch=max_batch)
        self.streams = dataclasses.replace(self.streams, session_buffer_bytes=BUDGET)
        self.rids: dict[str, str] = {}
        self.reads: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.failures = 0
        self.failure: Exception = ConnectionResetError("connection lost")

    async def admit(
        self, msg: queue_pb2.EnqueueRequest, principal: Principal
    ) -> tuple[uuid.UUID, asyncio.Future[Admitted]]:
        rid, future = await super().admit(msg, principal)
        self.rids[msg.client_ref] = str(rid)
        return rid, future

    def release(self, client_ref: str) -> None:
        self.futures[client_ref].set_result(
            Admitted(uuid.UUID(self.rids[client_ref]), duplicate=False)
        )

    async def finished(self, user: uuid.UUID, ids: list[uuid.UUID]) -> list[common_pb2.Result]:
        await self.gate.wait()
        self.reads.append([str(i) for i in ids])
        if self.failures:
            self.failures -= 1
            raise self.failure
        return await super().finished(user, ids)

    async def finish(self, ref: str, seq: int, *, published: int = 1) -> None:
        """The request's result: written to the log, then published (`published` times:
        a redelivery publishes it again)."""
        rid = self.rids[ref]
        self.in_log[rid] = common_pb2.Result(
            request_id=rid,
            lane_seq=seq,
            status=common_pb2.REQUEST_STATUS_SUCCEEDED,
            output=output(seq),
        )
        for _ in range(published):
            await self.result(rid, seq, output(seq))


def output(seq: int) -> bytes:
    return seq.to_bytes(4, "big") * (SIZE // 4)


def session_of(domain: Domain, client: Client) -> SessionStream:
    principal = Principal(user_id=USER, username="u", role="user")
    return SessionStream(domain, principal, client.requests())  # type: ignore[arg-type]


def held_bytes(session: SessionStream) -> int:
    """The bytes of outputs the session holds, counted from what it holds."""
    out = sum(
        len(item.response.result.output)
        for item in session._out.waiting()
        if hasattr(item, "response")
    )
    early = sum(len(event.result.output) for event, _ in session._early.values())
    stash = sum(len(e.result.output) for held in session._stash.values() for e, _ in held)
    return out + early + stash


def flat(responses: list[queue_pb2.SessionResponse]) -> list[queue_pb2.SessionResponse]:
    flattened: list[queue_pb2.SessionResponse] = []
    for response in responses:
        if response.WhichOneof("kind") == "batch":
            flattened.extend(response.batch.responses)
        else:
            flattened.append(response)
    return flattened


def assert_every_result_in_order(
    responses: list[queue_pb2.SessionResponse], domain: LogDomain, n: int
) -> None:
    responses = flat(responses)
    accepted = [r.accepted.client_ref for r in responses if r.WhichOneof("kind") == "accepted"]
    assert accepted == [str(i) for i in range(n)]
    results = [r.result for r in responses if r.WhichOneof("kind") == "result"]
    assert [(r.request_id, r.lane_seq) for r in results] == [
        (domain.rids[str(i)], i + 1) for i in range(n)
    ]
    assert all(r.output == output(r.lane_seq) for r in results)
    # A result never before its accepted.
    position = {
        r.accepted.request_id: k
        for k, r in enumerate(responses)
        if r.WhichOneof("kind") == "accepted"
    }
    for k, r in enumerate(responses):
        if r.WhichOneof("kind") == "result":
            assert position[r.result.request_id] < k


async def _started(
    session: SessionStream,
) -> tuple[AsyncGenerator[queue_pb2.SessionResponse, None], queue_pb2.SessionResponse]:
    """The stream with its first response read: it now waits to write the next, as it does
    for a client that reads no more."""
    out = session.run()
    return out, await asyncio.wait_for(anext(out), 5)


@pytest.mark.parametrize("batching", [False, True], ids=["single", "enqueue_batch"])
async def test_a_client_that_does_not_read_holds_at_most_the_budget_then_gets_everything(
    batching: bool,
) -> None:
    n = 64  # 6.4 MB of outputs against a budget of 1 MB
    domain, client = LogDomain(window=n, max_batch=n), Client()
    if batching:
        client.outbox.put_nowait(
            queue_pb2.SessionRequest(
                enqueue_batch=queue_pb2.EnqueueBatch(
                    requests=[
                        queue_pb2.EnqueueRequest(handler="echo", client_ref=str(i))
                        for i in range(n)
                    ]
                )
            )
        )
    else:
        for i in range(n):
            client.enqueue(str(i))
    client.close()
    session = session_of(domain, client)
    out, first = await _started(session)
    await until(lambda: len(flat([first])) + session._out.qsize() == n)  # every accepted
    for i in range(n):
        await domain.finish(str(i), i + 1)

    assert session._out.qsize() >= n  # every result is waiting for the client
    assert session.buffered_bytes <= BUDGET
    assert held_bytes(session) == session.buffered_bytes
    assert domain.reads == []  # nothing is read back before its turn comes

    responses = [first] + [r async for r in out]  # the client reads; the stream ends
    assert_every_result_in_order(responses, domain, n)
    assert session.buffered_bytes == 0
    # The results held without their outputs were read back next in line, several a read,
    # never more than the budget's worth at once.
    assert sum(len(ids) for ids in domain.reads) == n - BUDGET // SIZE
    assert all(len(ids) <= BUDGET // SIZE for ids in domain.reads)
    assert len(domain.reads) < n - BUDGET // SIZE
    if batching:
        assert all(r.ByteSize() <= MAX_BATCH_BYTES for r in responses)


async def test_results_that_come_before_their_accepted_count_against_the_budget() -> None:
    n = 32
    domain, client = LogDomain(window=n), Client()
    for i in range(n):
        domain.hold.add(str(i))  # admission answers late: results come first
        client.enqueue(str(i))
    client.close()
    session = session_of(domain, client)
    out = session.run()
    first = asyncio.ensure_future(anext(out))
    await until(lambda: len(domain.rids) == n)
    for i in range(n):
        await domain.finish(str(i), i + 1, published=2)  # a redelivery: counted once
    assert len(session._stash) == n
    assert session.buffered_bytes <= BUDGET
    assert held_bytes(session) == session.buffered_bytes

    domain.release("0")
    responses = [await asyncio.wait_for(first, 5)]  # the client reads one, then stops
    for i in range(1, n):
        domain.release(str(i))
    await until(lambda: not session._stash)
    assert session.buffered_bytes <= BUDGET
    assert held_bytes(session) == session.buffered_bytes

    responses += [r async for r in out]
    assert_every_result_in_order(responses, domain, n)
    assert session.buffered_bytes == 0


async def test_results_held_back_behind_an_older_request_count_against_the_budget() -> None:
    n = 32
    domain, client = LogDomain(window=n), Client()
    for i in range(n):
        client.enqueue(str(i))
    client.close()
    session = session_of(domain, client)
    out, first = await _started(session)
    await until(lambda: session._out.qsize() == n - 1)
    # The oldest request's event is lost, and the log is slow to answer about it: the
    # others' results are held back meanwhile.
    domain.gate.clear()
    for i in range(1, n):
        await domain.finish(str(i), i + 1, published=2)
    assert len(session._early) == n - 1
    assert session.buffered_bytes <= BUDGET
    assert held_bytes(session) == session.buffered_bytes

    rid0 = domain.rids["0"]
    domain.in_log[rid0] = common_pb2.Result(request_id=rid0, lane_seq=1, output=output(1))
    domain.gate.set()
    await until(lambda: not session._early)
    assert session.buffered_bytes <= BUDGET
    assert held_bytes(session) == session.buffered_bytes

    responses = [first] + [r async for r in out]
    assert_every_result_in_order(responses, domain, n)
    assert session.buffered_bytes == 0


async def test_a_client_that_reads_has_nothing_read_back_from_the_log() -> None:
    n = 40  # 4 MB in all, never more than one output at a time
    domain, client = LogDomain(window=4), Client()
    session = session_of(domain, client)
    out = session.run()
    responses = []
    for i in range(n):
        client.enqueue(str(i))
        responses.append(await asyncio.wait_for(anext(out), 5))
        await domain.finish(str(i), i + 1)
        responses.append(await asyncio.wait_for(anext(out), 5))
    client.close()
    responses += [r async for r in out]
    assert_every_result_in_order(responses, domain, n)
    assert domain.reads == []
    assert session.buffered_bytes == 0


async def _filled_past_the_budget(
    domain: LogDomain, n: int
) -> tuple[
    SessionStream, AsyncGenerator[queue_pb2.SessionResponse, None], list[queue_pb2.SessionResponse]
]:
    client = Client()
    for i in range(n):
        client.enqueue(str(i))
    client.close()
    session = session_of(domain, client)
    out, first = await _started(session)
    await until(lambda: session._out.qsize() == n - 1)
    for i in range(n):
        await domain.finish(str(i), i + 1)
    return session, out, [first]


async def test_a_failed_read_of_an_output_is_tried_again() -> None:
    n = 20
    domain = LogDomain(window=n, grace=5.0)
    session, out, responses = await _filled_past_the_budget(domain, n)
    domain.failures = 2
    responses += [r async for r in out]
    assert_every_result_in_order(responses, domain, n)
    assert domain.failures == 0
    assert session.buffered_bytes == 0


async def test_a_log_that_stays_unreadable_ends_the_stream_unavailable() -> None:
    n = 20
    domain = LogDomain(window=n, grace=0.3)
    _, out, responses = await _filled_past_the_budget(domain, n)
    domain.failures = 1_000_000
    with pytest.raises(StreamError) as err:
        await asyncio.wait_for(_drain(out, responses), 5)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "WatchResults" in str(err.value)
    # What went out is right and in order: every accepted, then the results that were
    # held with their outputs; the rest are in the log, for WatchResults.
    results = [r.result for r in flat(responses) if r.WhichOneof("kind") == "result"]
    assert [r.lane_seq for r in results] == list(range(1, BUDGET // SIZE + 1))
    assert all(r.output == output(r.lane_seq) for r in results)


async def test_a_replica_shutting_down_ends_the_stream_unavailable_at_once() -> None:
    n = 20
    domain = LogDomain(window=n, grace=30.0)
    _, out, _ = await _filled_past_the_budget(domain, n)
    domain.failures = 1
    domain.failure = CatchUpStopped("the server is shutting down")
    with pytest.raises(StreamError) as err:
        await asyncio.wait_for(_drain(out, []), 5)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(domain.reads) == 1


async def _drain(
    out: AsyncGenerator[queue_pb2.SessionResponse, None], into: list[queue_pb2.SessionResponse]
) -> None:
    async for response in out:
        into.append(response)


class CappedLogDomain(LogDomain):
    """A log whose reads load at most `cap` bytes of outputs, the first asked for always,
    as the request log's do: past that a result comes Withheld. The next `taken` reads
    lose all their bytes to other Sessions' asks read with them, the first output too."""

    def __init__(self, *, cap: int, window: int, grace: float = 30.0) -> None:
        super().__init__(window=window, grace=grace)
        self.cap = cap
        self.taken = 0

    async def finished(  # type: ignore[override]
        self, user: uuid.UUID, ids: list[uuid.UUID]
    ) -> list[common_pb2.Result | Withheld]:
        found = await super().finished(user, ids)
        taken = self.taken > 0
        self.taken -= taken
        answer: list[common_pb2.Result | Withheld] = []
        total = 0
        for k, result in enumerate(found):
            total += len(result.output)
            if taken or (k > 0 and total > self.cap):
                thin = common_pb2.Result(request_id=result.request_id, lane_seq=result.lane_seq)
                answer.append(Withheld(thin, len(result.output)))
            else:
                answer.append(result)
        return answer


async def test_outputs_a_read_of_the_log_leaves_out_are_read_when_their_turn_comes() -> None:
    n = 30  # 20 held without their outputs; a read loads two of them
    domain = CappedLogDomain(cap=2 * SIZE, window=n)
    session, out, responses = await _filled_past_the_budget(domain, n)
    responses += [r async for r in out]
    assert_every_result_in_order(responses, domain, n)
    assert session.buffered_bytes == 0
    assert len(domain.reads) == (n - BUDGET // SIZE) // 2


async def test_a_read_back_whose_bytes_went_to_other_asks_is_asked_again_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(session_module.log, "warning", lambda event, **_: warnings.append(event))
    n = 20
    # A grace time shorter than one wait between tries: a result taken for missing from
    # the log would end the stream UNAVAILABLE.
    domain = CappedLogDomain(cap=BUDGET, window=n, grace=0.05)
    session, out, responses = await _filled_past_the_budget(domain, n)
    domain.taken = 3
    responses += [r async for r in out]
    assert_every_result_in_order(responses, domain, n)
    assert domain.taken == 0
    assert "session_output_not_in_log" not in warnings
    assert session.buffered_bytes == 0


async def test_a_catch_up_read_that_leaves_outputs_out_holds_those_results_without() -> None:
    n = 24
    domain = CappedLogDomain(cap=3 * SIZE, window=n, grace=0.1)
    client = Client()
    for i in range(n):
        client.enqueue(str(i))
    client.close()
    session = session_of(domain, client)
    out, first = await _started(session)
    await until(lambda: session._out.qsize() == n - 1)
    # Every result is in the log, none comes through the fan-out: the Session reads them
    # all from the log, which loads three outputs a read.
    for i in range(n):
        rid = domain.rids[str(i)]
        domain.in_log[rid] = common_pb2.Result(
            request_id=rid,
            lane_seq=i + 1,
            status=common_pb2.REQUEST_STATUS_SUCCEEDED,
            output=output(i + 1),
        )
    await until(lambda: not session._mine)
    assert session.buffered_bytes <= BUDGET
    assert held_bytes(session) == session.buffered_bytes
    responses = [first] + [r async for r in out]
    assert_every_result_in_order(responses, domain, n)
    assert session.buffered_bytes == 0
