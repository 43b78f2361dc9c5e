"""The workload matrix's actors and checks, against real service processes.

A case runs up to three clients at once:

* the *main* client: one Session per lane (user), a window of requests in flight, every
  answer and result checked as `fairlane bench` checks a run (fairlane_server.bench.stats);
  optionally it cancels a running and a queued request of its own mid-run;
* an *abandoner*: another user whose unary Enqueues and Sessions give up after 1-10 ms;
* a *bad-input* client: another user sending what the service must refuse, beside valid
  requests of its own.

Afterwards the request log is read back and held against what each client was told.
Every check is about correctness; durations are only printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import timestamp_pb2

from fairlane.common.v1 import common_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane.worker.v1 import worker_pb2, worker_pb2_grpc
from fairlane_server.bench.stats import LaneRecord
from fairlane_server.core import status
from fairlane_server.core.db import create_engine
from fairlane_server.core.models import lanes, request_events, requests
from tests.e2e.suite import Suite, wait_until
from tests.e2e.users import bearer, new_user

CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
STATUS_NAMES = {
    value: name.removeprefix("REQUEST_STATUS_") for name, value in common_pb2.RequestStatus.items()
}
LONG_SLEEP = b"30"  # the handler a running-cancel stops: it cannot end by itself in a case
# A run in which the main client hears nothing for this long while it waits for answers or
# results has stalled (the worst case of a healthy run is a few seconds of silence).
STALL_SECONDS = 30.0
_END = object()
# What grpc-aio's client reports when its own deadline fires while it is still writing a
# stream's request: the abandoning caller's library, not the server.
CLIENT_CORE_RACE = "Internal error from Core"


@dataclass(frozen=True)
class Case:
    handler_ms: int
    lanes: int
    workers: int
    abandoner: bool = False
    bad_input: bool = False
    cancels: bool = False

    @property
    def id(self) -> str:
        extras = [
            name
            for name, on in (
                ("abandon", self.abandoner),
                ("bad-input", self.bad_input),
                ("cancels", self.cancels),
            )
            if on
        ]
        return "-".join([f"{self.handler_ms}ms", f"{self.lanes}lanes", f"{self.workers}w", *extras])

    def requests_per_lane(self, scale: float) -> int:
        """About a second and a half of handler time per lane (at scale 1)."""
        base = {0: 60, 20: 40, 120: 12, 400: 5}.get(self.handler_ms, 10)
        return max(3, round(base * scale))

    def enqueue(self, ref: str) -> queue_pb2.EnqueueRequest:
        if self.handler_ms == 0:
            return queue_pb2.EnqueueRequest(handler="echo", payload=ref.encode(), client_ref=ref)
        seconds = f"{self.handler_ms / 1000:g}".encode()
        return queue_pb2.EnqueueRequest(handler="sleep", payload=seconds, client_ref=ref)


def cancel_named(rejected: queue_pb2.Rejected) -> str:
    """The request id named by the cancel that a Rejected answers ("" for an enqueue's).
    The proto names it in cancel_request_id; servers before that field echoed the id as
    client_ref."""
    return str(getattr(rejected, "cancel_request_id", "") or rejected.client_ref)


# -- the main client -------------------------------------------------------------------------


@dataclass
class MainLane:
    """One lane of the main client: the bench's bookkeeping plus what a check needs."""

    stats: LaneRecord
    token: str
    sent: list[queue_pb2.EnqueueRequest] = field(default_factory=list)
    ids: dict[int, str] = field(default_factory=dict)  # request index -> request_id
    results: dict[int, common_pb2.Result] = field(default_factory=dict)
    rejections: list[tuple[int, str, str]] = field(default_factory=list)  # (i, code, message)
    cancelled: dict[str, str] = field(default_factory=dict)  # request_id -> why it was cancelled
    cancel_errors: list[str] = field(default_factory=list)
    progress: int = 0


class MainClient:
    """L lanes, each one Session with up to `window` requests in flight. Even lanes send
    enqueue_batch messages (answers come batched), odd lanes one enqueue per message."""

    def __init__(
        self,
        suite: Suite,
        case: Case,
        *,
        per_lane: int,
        window: int = 8,
        seed: int = 0,
    ) -> None:
        self.suite = suite
        self.case = case
        self.per_lane = per_lane
        self.window = window
        self.rng = random.Random(seed)
        self.lanes: list[MainLane] = []
        self.results_seen = 0
        self.finished = asyncio.Event()
        self.last_activity = time.monotonic()
        # The requests cancelled while running (and the one queued behind it), by lane.
        self.long_index = per_lane // 3 if case.cancels else -1

    async def login(self) -> None:
        users = await asyncio.gather(
            *(new_user(self.suite.target("auth")) for _ in range(self.case.lanes))
        )
        for i, (user_id, token) in enumerate(users):
            stats = LaneRecord(index=i, username=f"main-{i}", user_id=user_id, prefix=f"m{i}.")
            self.lanes.append(MainLane(stats, token))

    def _request(self, lane: MainLane, i: int) -> queue_pb2.EnqueueRequest:
        ref = lane.stats.ref(i)
        if lane.stats.index < 2 and i == self.long_index:
            return queue_pb2.EnqueueRequest(handler="sleep", payload=LONG_SLEEP, client_ref=ref)
        return self.case.enqueue(ref)

    async def run(self) -> None:
        try:
            async with grpc.aio.insecure_channel(self.suite.target("queue")) as channel:
                stub = queue_pb2_grpc.QueueServiceStub(channel)
                await asyncio.gather(*(self._lane(stub, lane) for lane in self.lanes))
        finally:
            self.finished.set()

    async def _lane(self, stub: queue_pb2_grpc.QueueServiceStub, lane: MainLane) -> None:
        call = stub.Session(metadata=bearer(lane.token))
        outbox: asyncio.Queue[Any] = asyncio.Queue()
        window = asyncio.Semaphore(self.window)
        answered = asyncio.Event()
        cancels_done = asyncio.Event()
        batching = lane.stats.index % 2 == 0
        if not (self.case.cancels and lane.stats.index < 2):
            cancels_done.set()

        async def writer() -> None:
            while (message := await outbox.get()) is not _END:
                await call.write(message)
            await call.done_writing()

        async def sender() -> None:
            i = 0
            while i < self.per_lane:
                await window.acquire()
                chunk = [i]
                while batching and i + len(chunk) < self.per_lane and not window.locked():
                    await window.acquire()
                    chunk.append(i + len(chunk))
                requests_ = [self._request(lane, j) for j in chunk]
                for r in requests_:
                    lane.sent.append(r)
                    lane.stats.sent_at.append(time.perf_counter())
                    lane.stats.measured.append(True)
                    lane.stats.in_flight += 1
                if batching:
                    batch = queue_pb2.EnqueueBatch(requests=requests_)
                    outbox.put_nowait(queue_pb2.SessionRequest(enqueue_batch=batch))
                else:
                    outbox.put_nowait(queue_pb2.SessionRequest(enqueue=requests_[0]))
                i += len(chunk)
            await answered.wait()
            await cancels_done.wait()
            outbox.put_nowait(_END)

        def cancel(request_id: str, why: str) -> None:
            lane.cancelled[request_id] = why
            outbox.put_nowait(
                queue_pb2.SessionRequest(
                    cancel=queue_pb2.CancelRequestRequest(request_id=request_id)
                )
            )

        async def canceller() -> None:
            """Once the long request runs, cancels the one queued behind it, then it."""
            long_i = self.long_index

            async def both_answered() -> bool:
                return lane.stats.last_answer > long_i

            async def long_running() -> bool:
                return await self._is_running(stub, lane, lane.ids[long_i])

            try:
                await wait_until(both_answered, STALL_SECONDS)
                # A rejection of either is a failure of its own; nothing to cancel then.
                if long_i in lane.ids and long_i + 1 in lane.ids:
                    await wait_until(long_running, STALL_SECONDS)
                    cancel(lane.ids[long_i + 1], "queued")
                    cancel(lane.ids[long_i], "running")
            finally:
                cancels_done.set()

        def on_response(r: queue_pb2.SessionResponse) -> None:
            self.last_activity = time.monotonic()
            kind = r.WhichOneof("kind")
            if kind == "accepted":
                i = lane.stats.parse_ref(r.accepted.client_ref)
                if i is None:
                    lane.stats.unknown += 1
                    return
                lane.stats.on_answer(i)
                lane.stats.accepted_at[i] = time.perf_counter()
                lane.ids[i] = r.accepted.request_id
                # Now and then a request is cancelled as soon as it is accepted: queued,
                # running or done by the time the cancel lands.
                if (
                    self.case.cancels
                    and lane.stats.index >= 2
                    and self.rng.random() < 0.1
                    and i != self.long_index
                ):
                    cancel(r.accepted.request_id, "racing")
            elif kind == "rejected":
                ref = r.rejected.client_ref
                if cancel_named(r.rejected) in lane.cancelled:
                    lane.cancel_errors.append(
                        f"{CODE_NAMES[r.rejected.code]}: {r.rejected.message}"
                    )
                    return
                i = lane.stats.parse_ref(ref)
                if i is None:
                    lane.stats.unknown += 1
                    return
                lane.stats.on_answer(i)
                lane.stats.done.add(i)
                code = CODE_NAMES.get(r.rejected.code, str(r.rejected.code))
                lane.stats.rejected[code] += 1
                lane.rejections.append((i, code, r.rejected.message))
                lane.stats.in_flight -= 1
                window.release()
            elif kind == "result":
                i = lane.stats.parse_ref(r.result.client_ref)
                if i is None:
                    lane.stats.unknown += 1
                    return
                if not lane.stats.on_result(i, r.result.lane_seq):
                    return
                lane.results[i] = r.result
                lane.stats.results_by_status[STATUS_NAMES[r.result.status]] += 1
                lane.stats.in_flight -= 1
                self.results_seen += 1
                window.release()
            elif kind == "progress":
                lane.progress += 1
            if lane.stats.accepted + sum(lane.stats.rejected.values()) == self.per_lane:
                answered.set()

        tasks = [asyncio.create_task(writer()), asyncio.create_task(sender())]
        if not cancels_done.is_set():
            tasks.append(asyncio.create_task(canceller()))
        try:
            async for message in call:
                if message.WhichOneof("kind") == "batch":
                    for one in message.batch.responses:
                        on_response(one)
                else:
                    on_response(message)
        except grpc.aio.AioRpcError as exc:
            lane.stats.stream_error = f"{exc.code().name}: {exc.details()}"
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()
            done = await asyncio.gather(*tasks, return_exceptions=True)
        failed = [repr(e) for e in done if isinstance(e, Exception)]
        if failed and not lane.stats.stream_error:
            lane.stats.stream_error = f"client side: {failed}"

    async def _is_running(
        self, stub: queue_pb2_grpc.QueueServiceStub, lane: MainLane, request_id: str
    ) -> bool:
        reply = await stub.GetRequest(
            queue_pb2.GetRequestRequest(request_id=request_id),
            metadata=bearer(lane.token),
            timeout=10,
        )
        return bool(reply.request.status == common_pb2.REQUEST_STATUS_RUNNING)

    def counts(self) -> Counter[str]:
        c: Counter[str] = Counter()
        for lane in self.lanes:
            s = lane.stats
            c["sent"] += len(s.sent_at)
            c["accepted"] += s.accepted
            c["rejected"] += sum(s.rejected.values())
            c["results"] += s.results
            c["unanswered"] += s.unanswered
            c["lost"] += s.lost
            c["duplicates"] += s.duplicates
            c["unknown"] += s.unknown
            c["fifo_violations"] += s.fifo_violations
            c["answer_order_violations"] += s.answer_order_violations
            c["results_before_accepted"] += s.early_results
            c["lane_seq_gaps"] += s.lane_seq_gaps
            c["stream_errors"] += bool(s.stream_error)
            c["cancel_errors"] += len(lane.cancel_errors)
            c["progress"] += lane.progress
        return c


# -- the abandoner ---------------------------------------------------------------------------


@dataclass
class Abandoner:
    """Gives up on unary Enqueues and Sessions after 1-10 ms while the main client runs.
    Whatever answer it did get before giving up must be true."""

    suite: Suite
    user_id: str = ""
    token: str = ""
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    unary_answered: dict[str, str] = field(default_factory=dict)  # client_ref -> request_id
    session_accepted: dict[str, str] = field(default_factory=dict)
    codes: Counter[str] = field(default_factory=Counter)
    sessions: int = 0
    max_calls: int = 600

    async def login(self) -> None:
        self.user_id, self.token = await new_user(self.suite.target("auth"))

    async def run(self, until: asyncio.Event, loops: int = 3) -> None:
        """`loops` callers at once, until `until` is set or `max_calls` were made."""
        calls = 0
        async with grpc.aio.insecure_channel(self.suite.target("queue")) as channel:
            stub = queue_pb2_grpc.QueueServiceStub(channel)

            async def caller() -> None:
                nonlocal calls
                while not until.is_set() and calls < self.max_calls:
                    calls += 1
                    if calls % 4 == 0:
                        await self._session(stub, calls)
                    else:
                        await self._unary(stub, calls)

            await asyncio.gather(*(caller() for _ in range(loops)))

    async def _unary(self, stub: queue_pb2_grpc.QueueServiceStub, n: int) -> None:
        ref = f"a{n}"
        try:
            reply = await stub.Enqueue(
                queue_pb2.EnqueueRequest(handler="echo", payload=ref.encode(), client_ref=ref),
                metadata=bearer(self.token),
                timeout=self.rng.uniform(0.001, 0.010),
            )
        except grpc.aio.AioRpcError as exc:
            self.codes[exc.code().name] += 1
            return
        self.codes["OK"] += 1
        self.unary_answered[ref] = reply.request_id

    async def _session(self, stub: queue_pb2_grpc.QueueServiceStub, n: int) -> None:
        self.sessions += 1
        refs = [f"a{n}.{k}" for k in range(self.rng.randint(1, 5))]
        gone = asyncio.Event()

        async def requests_() -> AsyncIterator[queue_pb2.SessionRequest]:
            yield queue_pb2.SessionRequest(
                enqueue_batch=queue_pb2.EnqueueBatch(
                    requests=[
                        queue_pb2.EnqueueRequest(handler="echo", payload=r.encode(), client_ref=r)
                        for r in refs
                    ]
                )
            )
            await gone.wait()  # the caller goes away; it never half-closes

        call = stub.Session(
            requests_(), metadata=bearer(self.token), timeout=self.rng.uniform(0.001, 0.010)
        )
        try:
            async for message in call:
                answers = (
                    message.batch.responses if message.WhichOneof("kind") == "batch" else [message]
                )
                for answer in answers:
                    if answer.WhichOneof("kind") == "accepted":
                        self.session_accepted[answer.accepted.client_ref] = (
                            answer.accepted.request_id
                        )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INTERNAL and exc.details() == CLIENT_CORE_RACE:
                self.codes["session deadline (client core)"] += 1
            else:
                self.codes[f"session {exc.code().name}"] += 1
        finally:
            call.cancel()
            gone.set()


# -- the bad-input client --------------------------------------------------------------------


def _timestamp(seconds: int, nanos: int = 0) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


# (name, fields of an EnqueueRequest the service must refuse with INVALID_ARGUMENT)
BAD_ENQUEUES: list[tuple[str, dict[str, Any]]] = [
    ("nul in client_ref", {"client_ref": "bad\x00ref"}),
    ("nul in idempotency_key", {"idempotency_key": "key\x00nul"}),
    ("deadline 9999-12-31T23:59:59.999999999Z", {"deadline": _timestamp(253402300799, 999999999)}),
    ("deadline in year 10000", {"deadline": _timestamp(253402300800)}),
    ("deadline before year 1", {"deadline": _timestamp(-62135596801)}),
    ("deadline with negative nanos", {"deadline": _timestamp(4102444800, -1)}),
    ("deadline with nanos over a second", {"deadline": _timestamp(4102444800, 1_000_000_000)}),
    ("deadline at the largest int64", {"deadline": _timestamp(2**63 - 1)}),
    ("deadline passed", {"deadline": _timestamp(1)}),
    ("max_attempts -1 wrapped to uint32", {"max_attempts": 2**32 - 1}),
    ("max_attempts over the limit", {"max_attempts": 101}),
    ("unknown handler", {"handler": "no-such-handler"}),
    ("nul in handler", {"handler": "echo\x00"}),
    ("no handler", {"handler": ""}),
    ("client_ref too long", {"client_ref": "r" * 201}),
    ("idempotency_key too long", {"idempotency_key": "k" * 201}),
]
MAX_PAYLOAD_BYTES = 4096  # the suite's limit in bad-input cases, so one payload can exceed it


def bad_enqueues() -> list[tuple[str, queue_pb2.EnqueueRequest]]:
    out = []
    for name, fields in BAD_ENQUEUES:
        msg = queue_pb2.EnqueueRequest(handler="echo", payload=b"bad")
        for key, value in fields.items():
            if key == "deadline":
                msg.deadline.CopyFrom(value)
            else:
                setattr(msg, key, value)
        out.append((name, msg))
    out.append(
        (
            "payload over the limit",
            queue_pb2.EnqueueRequest(handler="echo", payload=b"x" * (MAX_PAYLOAD_BYTES + 1)),
        )
    )
    return out


@dataclass
class BadInputClient:
    """Sends refused input on unary calls and inside Sessions, beside valid requests; each
    refusal must be INVALID_ARGUMENT for that request alone."""

    suite: Suite
    user_id: str = ""
    token: str = ""
    wrong: list[str] = field(default_factory=list)  # every answer that was not as it must be
    refused: int = 0
    good_accepted: dict[str, str] = field(default_factory=dict)  # client_ref -> request_id
    good_results: dict[str, common_pb2.Result] = field(default_factory=dict)
    rounds: int = 0
    max_rounds: int = 20

    async def login(self) -> None:
        self.user_id, self.token = await new_user(self.suite.target("auth"))

    async def run(self, until: asyncio.Event) -> None:
        async with grpc.aio.insecure_channel(self.suite.target("queue")) as channel:
            stub = queue_pb2_grpc.QueueServiceStub(channel)
            while self.rounds < self.max_rounds and (self.rounds == 0 or not until.is_set()):
                self.rounds += 1
                await self._round(stub, self.rounds)

    def _expect_invalid(self, what: str, code: grpc.StatusCode | None, detail: str) -> None:
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            self.refused += 1
        else:
            self.wrong.append(f"{what}: {code.name if code else 'OK'} {detail!r}")

    async def _round(self, stub: queue_pb2_grpc.QueueServiceStub, n: int) -> None:
        md = bearer(self.token)
        for name, msg in bad_enqueues():
            try:
                reply = await stub.Enqueue(msg, metadata=md, timeout=30)
            except grpc.aio.AioRpcError as exc:
                self._expect_invalid(f"Enqueue {name}", exc.code(), exc.details() or "")
            else:
                self._expect_invalid(f"Enqueue {name}", None, reply.request_id)
        # Refused numbers on other calls.
        for after in (2**63, 2**64 - 1):
            watch = stub.WatchResults(
                queue_pb2.WatchResultsRequest(after_lane_seq=after), metadata=md, timeout=0.5
            )
            try:
                async for _ in watch:
                    self.wrong.append(f"WatchResults after_lane_seq={after}: sent a result")
                    break
            except grpc.aio.AioRpcError as exc:
                # Refused, or accepted as "nothing after that" (the call then just waits).
                if exc.code() not in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    self.wrong.append(
                        f"WatchResults after_lane_seq={after}: {exc.code().name} {exc.details()!r}"
                    )
            finally:
                watch.cancel()
        try:
            await stub.ListRequests(
                queue_pb2.ListRequestsRequest(status=99),  # type: ignore[arg-type]
                metadata=md,
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            self._expect_invalid("ListRequests status=99", exc.code(), exc.details() or "")
        else:
            self._expect_invalid("ListRequests status=99", None, "listed rows")
        await self._mixed_session(stub, n)

    async def _mixed_session(self, stub: queue_pb2_grpc.QueueServiceStub, n: int) -> None:
        """Bad and good enqueues interleaved in one batch and one by one: each bad one is
        refused alone, each good one is accepted and runs."""
        sent: list[tuple[str, queue_pb2.EnqueueRequest]] = []
        for k, (name, bad) in enumerate(bad_enqueues()):
            good = queue_pb2.EnqueueRequest(handler="echo", payload=b"ok", client_ref=f"g{n}.{k}")
            sent.append((name, bad))
            sent.append(("", good))
        bad_ids = ["not-an-id", str(uuid.uuid4())]

        async def requests_() -> AsyncIterator[queue_pb2.SessionRequest]:
            half = len(sent) // 2
            yield queue_pb2.SessionRequest(
                enqueue_batch=queue_pb2.EnqueueBatch(requests=[m for _, m in sent[:half]])
            )
            for _, m in sent[half:]:
                yield queue_pb2.SessionRequest(enqueue=m)
            for rid in bad_ids:
                yield queue_pb2.SessionRequest(
                    cancel=queue_pb2.CancelRequestRequest(request_id=rid)
                )

        answers: list[queue_pb2.SessionResponse] = []
        cancel_answers: dict[str, str] = {}
        try:
            async for message in stub.Session(
                requests_(), metadata=bearer(self.token), timeout=120
            ):
                for r in (
                    message.batch.responses if message.WhichOneof("kind") == "batch" else [message]
                ):
                    kind = r.WhichOneof("kind")
                    if kind == "rejected" and cancel_named(r.rejected) in bad_ids:
                        cancel_answers[cancel_named(r.rejected)] = CODE_NAMES[r.rejected.code]
                    elif kind in ("accepted", "rejected"):
                        answers.append(r)
                    elif kind == "result":
                        self.good_results[r.result.client_ref] = r.result
        except grpc.aio.AioRpcError as exc:
            self.wrong.append(f"mixed Session ended with {exc.code().name}: {exc.details()}")
            return
        if len(answers) != len(sent):
            self.wrong.append(f"mixed Session: {len(answers)} answers to {len(sent)} enqueues")
        for (name, msg), answer in zip(sent, answers, strict=False):
            kind = answer.WhichOneof("kind")
            if name:  # a bad one
                if (
                    kind != "rejected"
                    or answer.rejected.code != grpc.StatusCode.INVALID_ARGUMENT.value[0]
                ):
                    self.wrong.append(f"Session {name}: {kind} {answer}")
                elif answer.rejected.client_ref != msg.client_ref:
                    self.wrong.append(f"Session {name}: answer for {answer.rejected.client_ref!r}")
                else:
                    self.refused += 1
            elif kind != "accepted" or answer.accepted.client_ref != msg.client_ref:
                self.wrong.append(f"Session good {msg.client_ref}: {kind} {answer}")
            else:
                self.good_accepted[msg.client_ref] = answer.accepted.request_id
        expected_cancels = {"not-an-id": "INVALID_ARGUMENT", bad_ids[1]: "NOT_FOUND"}
        if cancel_answers != expected_cancels:
            self.wrong.append(f"cancels of bad ids answered {cancel_answers}")


# -- reading the log back --------------------------------------------------------------------


@dataclass
class LogView:
    rows: list[Any]  # every request of the run
    events: dict[uuid.UUID, list[str]]  # final-status events per request, oldest first
    last_seq: dict[uuid.UUID, int]  # lanes.last_seq per user

    def of(self, user_id: str) -> list[Any]:
        user = uuid.UUID(user_id)
        return [r for r in self.rows if r.user_id == user]


async def read_log(suite: Suite) -> LogView:
    engine = create_engine(suite.database_url, schema=suite.schema, pool_size=1)
    try:
        async with engine.connect() as conn:
            rows = list(
                (
                    await conn.execute(
                        sa.select(requests).order_by(requests.c.user_id, requests.c.id)
                    )
                ).all()
            )
            events: dict[uuid.UUID, list[str]] = {}
            for request_id, name in (
                await conn.execute(
                    sa.select(request_events.c.request_id, request_events.c.status)
                    .where(request_events.c.status.in_(sorted(status.FINAL)))
                    .order_by(request_events.c.id)
                )
            ).all():
                events.setdefault(request_id, []).append(name)
            last_seq = {
                user: int(seq)
                for user, seq in (
                    await conn.execute(sa.select(lanes.c.user_id, lanes.c.last_seq))
                ).all()
            }
        return LogView(rows, events, last_seq)
    finally:
        await engine.dispose()


async def wait_settled(suite: Suite, timeout: float) -> LogView:
    """The log once every request has its final lane_seq (or as it is at the timeout)."""
    view = await read_log(suite)

    async def settled() -> bool:
        nonlocal view
        view = await read_log(suite)
        return all(r.lane_seq is not None for r in view.rows)

    with contextlib.suppress(TimeoutError):
        await wait_until(settled, timeout)
    return view


def log_problems(view: LogView) -> list[str]:
    """What is wrong with the log as a whole: anything unfinished, a lane whose lane_seqs
    are not 1..n or disagree with lanes.last_seq, a request whose history does not end
    as its row does, or that ran to an end twice."""
    problems = []
    stuck = Counter(r.status for r in view.rows if r.lane_seq is None)
    if stuck:
        problems.append(f"left unfinished: {dict(stuck)}")
    by_user: dict[uuid.UUID, list[int]] = {}
    for r in view.rows:
        if r.lane_seq is not None:
            by_user.setdefault(r.user_id, []).append(r.lane_seq)
        if r.status in status.FINAL and r.lane_seq is None:
            problems.append(f"{r.id} is {r.status} without a lane_seq")
        final = view.events.get(r.id, [])
        if r.status in status.FINAL and set(final) != {r.status}:
            problems.append(f"{r.id} is {r.status} but its history ends {final}")
        if r.status in status.FINAL and r.status != "CANCELLED" and len(final) != 1:
            problems.append(f"{r.id} ran to an end {len(final)} times: {final}")
    for user, seqs in by_user.items():
        if sorted(seqs) != list(range(1, len(seqs) + 1)):
            missing = sorted(set(range(1, max(seqs) + 1)) - set(seqs))
            problems.append(f"lane {user}: lane_seq gaps {missing[:10]}, {len(seqs)} results")
        if view.last_seq.get(user) != len(seqs):
            problems.append(f"lane {user}: last_seq {view.last_seq.get(user)} for {len(seqs)}")
    return problems


def main_problems(client: MainClient, view: LogView) -> list[str]:
    """What the main client was told that is not what happened, or not what it asked."""
    problems = []
    counts = client.counts()
    for key in (
        "unanswered",
        "lost",
        "duplicates",
        "unknown",
        "fifo_violations",
        "answer_order_violations",
        "results_before_accepted",
        "lane_seq_gaps",  # its users are its own: nothing else finishes in their lanes
        "stream_errors",
        "cancel_errors",
        "rejected",
    ):
        if counts[key]:
            problems.append(f"{counts[key]} {key.replace('_', ' ')}")
    for lane in client.lanes:
        if lane.stats.stream_error:
            problems.append(f"lane {lane.stats.index}: stream error {lane.stats.stream_error}")
        for i, code, message in lane.rejections[:3]:
            problems.append(f"lane {lane.stats.index} request {i} rejected {code}: {message}")
        problems += [f"lane {lane.stats.index}: cancel answered {e}" for e in lane.cancel_errors]
        rows = {str(r.id): r for r in view.of(lane.stats.user_id)}
        # The request log equals the results, request by request.
        told = {
            lane.ids[i]: (STATUS_NAMES[res.status], res.lane_seq) for i, res in lane.results.items()
        }
        logged = {rid: (r.status, r.lane_seq) for rid, r in rows.items()}
        if told != logged:
            diff = {
                rid: (told.get(rid), logged.get(rid))
                for rid in set(told) | set(logged)
                if told.get(rid) != logged.get(rid)
            }
            problems.append(f"lane {lane.stats.index}: log differs from results: {_head(diff)}")
        for i, res in lane.results.items():
            sent = lane.sent[i]
            name = STATUS_NAMES[res.status]
            why = lane.cancelled.get(lane.ids[i])
            if why in ("queued", "running"):
                if name != "CANCELLED":
                    problems.append(f"lane {lane.stats.index}: {why} request {i} ended {name}")
                if why == "queued" and res.attempts != 0:
                    problems.append(f"queued request {i} cancelled after {res.attempts} attempts")
                continue
            if name == "CANCELLED" and why == "racing":
                continue
            if name != "SUCCEEDED":
                problems.append(f"lane {lane.stats.index} request {i} ended {name}: {res.error}")
            elif res.output != sent.payload:
                problems.append(f"lane {lane.stats.index} request {i}: output {res.output!r}")
    return problems


def abandoner_problems(abandoner: Abandoner, view: LogView) -> list[str]:
    """Every answer the abandoner got was true: an id it was given is in the log, finished,
    with the payload it sent. Everything of it that was stored ran."""
    problems = []
    rows = {str(r.id): r for r in view.of(abandoner.user_id)}
    for ref, rid in {**abandoner.unary_answered, **abandoner.session_accepted}.items():
        row = rows.get(rid)
        if row is None:
            problems.append(f"abandoner was given {rid} for {ref}, which is not in the log")
        elif row.client_ref != ref or row.payload != ref.encode():
            problems.append(f"abandoner's {ref} stored as {row.client_ref!r}")
        elif row.status != "SUCCEEDED":
            problems.append(f"abandoner's {ref} ended {row.status}: {row.error}")
    unexpected = {
        code: n
        for code, n in abandoner.codes.items()
        if code
        not in (
            "OK",
            "DEADLINE_EXCEEDED",
            "CANCELLED",
            "session DEADLINE_EXCEEDED",
            "session deadline (client core)",
        )
    }
    if unexpected:
        problems.append(f"abandoner got {unexpected}")
    return problems


def bad_input_problems(client: BadInputClient, view: LogView) -> list[str]:
    """Each refused request was refused for itself: nothing of it is in the log, and the
    valid requests sent beside it ran."""
    problems = list(client.wrong[:20])
    rows = view.of(client.user_id)
    stored = {str(r.id) for r in rows}
    expected = set(client.good_accepted.values())
    if stored != expected:
        extra = [(r.client_ref, r.status) for r in rows if str(r.id) not in expected]
        problems.append(f"bad-input user's log holds {_head(extra)} besides its valid requests")
    for ref in client.good_accepted:
        result = client.good_results.get(ref)
        if result is None or result.status != common_pb2.REQUEST_STATUS_SUCCEEDED:
            problems.append(f"bad-input user's valid {ref}: {result}")
    return problems


def _head(items: Any, n: int = 5) -> str:
    listed = list(items.items() if isinstance(items, dict) else items)
    more = f" (+{len(listed) - n} more)" if len(listed) > n else ""
    return f"{listed[:n]}{more}"


# -- running a case --------------------------------------------------------------------------


async def worker_targets(suite: Suite, count: int) -> list[str]:
    targets = [suite.start_worker(f"worker{i}") for i in range(count)]
    await asyncio.gather(*(suite.wait_serving(f"worker{i}") for i in range(count)))
    return targets


async def kill_a_busy_worker(suite: Suite, targets: list[str], replace: bool) -> str:
    """kill -9 of a worker replica that is running handlers (else the first live one);
    with `replace`, a new replica takes its place."""
    victim = None
    for i, target in enumerate(targets):
        name = f"worker{i}"
        if suite.procs[name].poll() is not None:
            continue
        with contextlib.suppress(grpc.aio.AioRpcError):
            async with grpc.aio.insecure_channel(target) as channel:
                st = await worker_pb2_grpc.WorkerServiceStub(channel).GetStatus(
                    worker_pb2.GetStatusRequest(), timeout=5
                )
            if st.in_flight:
                victim = name
                break
        victim = victim or name
    assert victim is not None, "no live worker to kill"
    suite.stop(victim, signal.SIGKILL)
    if replace:
        name = f"worker{len(targets)}"
        targets.append(suite.start_worker(name))
        await suite.wait_serving(name)
    return victim


@dataclass
class CaseOutcome:
    case: Case
    main: MainClient
    abandoner: Abandoner | None
    bad: BadInputClient | None
    view: LogView
    problems: list[str]
    seconds: float
    killed: list[str]

    def summary(self) -> str:
        c = self.main.counts()
        by_status: Counter[str] = Counter()
        for lane in self.main.lanes:
            by_status.update(lane.stats.results_by_status)
        parts = [
            f"{self.case.id}: {c['sent']} sent, {c['accepted']} accepted, "
            f"{c['rejected']} rejected, results {dict(by_status)} in {self.seconds:.1f}s"
        ]
        if self.abandoner is not None:
            a = self.abandoner
            stored = len(self.view.of(a.user_id))
            parts.append(
                f"abandoner {dict(a.codes)}, {a.sessions} sessions, "
                f"{len(a.unary_answered) + len(a.session_accepted)} answered, {stored} stored"
            )
        if self.bad is not None:
            parts.append(
                f"bad input: {self.bad.refused} refused, {len(self.bad.wrong)} wrong, "
                f"{len(self.bad.good_accepted)} valid beside them"
            )
        if self.killed:
            parts.append(f"killed {self.killed}")
        return "; ".join(parts)


async def run_case(
    suite: Suite,
    case: Case,
    *,
    scale: float = 1.0,
    kill_worker: bool = False,
    timeout: float = 150.0,
    on_log: Callable[[str], None] = print,
) -> CaseOutcome:
    """Runs one case on a suite with auth and queue up; starts its worker replicas."""
    targets = await worker_targets(suite, case.workers)
    main = MainClient(suite, case, per_lane=case.requests_per_lane(scale), seed=len(case.id))
    abandoner = Abandoner(suite, max_calls=round(600 * scale)) if case.abandoner else None
    bad = BadInputClient(suite, max_rounds=round(20 * scale)) if case.bad_input else None
    await asyncio.gather(main.login(), *(c.login() for c in (abandoner, bad) if c is not None))
    killed: list[str] = []
    started = time.perf_counter()
    tasks = [asyncio.create_task(main.run())]
    if abandoner is not None:
        tasks.append(asyncio.create_task(abandoner.run(main.finished)))
    if bad is not None:
        tasks.append(asyncio.create_task(bad.run(main.finished)))
    problems: list[str] = []
    total = case.lanes * main.per_lane
    try:
        if kill_worker:

            async def halfway() -> bool:
                return main.results_seen >= total // 2 or main.finished.is_set()

            await wait_until(halfway, timeout)
            killed.append(await kill_a_busy_worker(suite, targets, replace=case.workers == 1))
        deadline = time.monotonic() + timeout
        while not main.finished.is_set():
            await asyncio.wait([tasks[0]], timeout=1)
            now = time.monotonic()
            if now - main.last_activity > STALL_SECONDS or now > deadline:
                problems.append(
                    f"stalled: {main.results_seen} of {total} results, nothing heard for "
                    f"{now - main.last_activity:.0f}s"
                )
                break
        if not problems:
            await asyncio.gather(*tasks)
    except TimeoutError:
        problems.append(f"stalled before the kill: {main.results_seen} of {total} results")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    seconds = time.perf_counter() - started
    view = await wait_settled(suite, 30 if not problems else 1)
    problems += log_problems(view)
    problems += main_problems(main, view)
    if abandoner is not None:
        problems += abandoner_problems(abandoner, view)
    if bad is not None:
        problems += bad_input_problems(bad, view)
    outcome = CaseOutcome(case, main, abandoner, bad, view, problems, seconds, killed)
    on_log(outcome.summary())
    return outcome


def service_log_excerpt(suite: Suite) -> str:
    """The error lines of every service, and its own frames of any traceback, for a
    failing case's message."""
    marks = ("error", "failed", "Traceback", "exception", "/services/")
    lines = []
    for name in suite.procs:
        path = suite.log_dir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        found = [line for line in text.splitlines() if any(m in line for m in marks)]
        if found:
            lines.append(f"--- {name}: {len(found)} error lines, last ones:")
            lines += [line[:300] for line in found[-12:]]
    return "\n".join(lines)
