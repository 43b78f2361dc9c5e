"""One lane under random traffic (hypothesis stateful testing) on the embedded backends:
auth, queue and worker in this process on the in-memory broker and SQLite, as `fairlane
dev` runs them.

Each example is a fresh user, so a fresh lane, driven by a random sequence of: enqueues on
a Session (alone or several in one message) and unary, with every handler outcome (success,
retried success, permanent failure, dead letter, slow), cancels, callers that give up after
1-10 ms, refused input, injected faults at the broker boundary (the next publishes fail,
or land but lose their confirm; a corrupt message reaches the lane while dead-lettering
fails) and at the engine boundary (the next statements of one stage raise OperationalError).

After every step the lane's invariants are checked against the request log; at the end of
each example, once everything accepted has finished, the complete ones are: nothing lost,
duplicated, reordered or left unfinished, lane_seq 1..n, and every answer was true.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane.common.v1 import common_pb2, lane_pb2
from fairlane.queue.v1 import queue_pb2, queue_pb2_grpc
from fairlane_server.auth.service import AuthService
from fairlane_server.core import status
from fairlane_server.core.backends import Backends
from fairlane_server.core.broker import BrokerError
from fairlane_server.core.db import engine_for, migrate
from fairlane_server.core.memory_broker import MemoryBroker
from fairlane_server.core.models import lanes, requests
from fairlane_server.core.settings import Settings
from fairlane_server.queue.service import QueueService
from fairlane_server.worker.service import WorkerService
from tests.e2e.users import bearer, new_user
from tests.e2e.workload import (
    BAD_ENQUEUES,
    CLIENT_CORE_RACE,
    CODE_NAMES,
    MAX_PAYLOAD_BYTES,
    bad_enqueues,
    cancel_named,
)

pytestmark = pytest.mark.integration
T = TypeVar("T")

STATUS_NAMES = {
    value: name.removeprefix("REQUEST_STATUS_") for name, value in common_pb2.RequestStatus.items()
}
SETTLE_SECONDS = 20.0  # everything accepted in one example finishes well within this

# -- faults at the boundaries ------------------------------------------------------------------


class FaultyBroker(MemoryBroker):
    """The in-memory broker, with the next N calls of an operation made to fail.

    `publish_lane_lost` lets the publish land and then raises, like a confirm lost on the
    way back: the message is in the lane although the publisher was told it failed."""

    def __init__(self, *, lane_max_length: int) -> None:
        super().__init__(lane_max_length=lane_max_length)
        self.pending: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()

    def fail_next(self, operation: str, n: int) -> None:
        self.pending[operation] += n

    def _take(self, operation: str) -> bool:
        if self.pending[operation] <= 0:
            return False
        self.pending[operation] -= 1
        self.injected[operation] += 1
        return True

    async def publish_lane(self, user_id: str, body: bytes, headers: dict[str, str]) -> None:
        if self._take("publish_lane"):
            raise BrokerError("injected: publish not confirmed")
        await super().publish_lane(user_id, body, headers)
        if self._take("publish_lane_lost"):
            raise BrokerError("injected: publish confirm lost after the message landed")

    async def publish_lane_unfaulted(self, user_id: str, body: bytes) -> None:
        # The relay publishes accepted requests a moment after Enqueue answers, so the
        # lane may not be declared yet.
        await super().declare_lane(user_id)
        await super().publish_lane(user_id, body, {})

    async def publish_results(self, route: str, body: bytes) -> None:
        if self._take("publish_results"):
            raise BrokerError("injected: results publish failed")
        await super().publish_results(route, body)

    async def publish_dead(self, body: bytes, headers: dict[str, str]) -> None:
        if self._take("publish_dead"):
            raise BrokerError("injected: dead-letter publish failed")
        await super().publish_dead(body, headers)


# Statements of one stage, by how their SQL starts (SQLite's text, as SQLAlchemy sends it).
STAGES = {
    "intake insert": "INSERT INTO requests ",
    "running marks": "UPDATE requests SET status=?, attempts=?, started_at=?",
    "outcomes": "UPDATE requests SET status=?, attempts=?, output=?",
    "lane numbering": "UPDATE lanes SET last_seq",
    "cancels": "UPDATE requests SET status=?, error=?",
}


class StatementFaults:
    """Makes the next N statements of a stage raise the driver's OperationalError, as a
    database that went away or a lock timeout would."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.pending: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        event.listen(engine.sync_engine, "before_cursor_execute", self._before)

    def fail_next(self, stage: str, n: int) -> None:
        self.pending[stage] += n

    def clear(self) -> None:
        self.pending.clear()

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        for stage, prefix in STAGES.items():
            if self.pending[stage] > 0 and statement.startswith(prefix):
                self.pending[stage] -= 1
                self.injected[stage] += 1
                # SQLite's words for contention: a transient error, worth retrying.
                raise self._engine.dialect.loaded_dbapi.OperationalError(
                    f"database is locked (injected into {stage})"
                )


# -- the stack ---------------------------------------------------------------------------------


class Stack:
    """The three services in this process on a private event loop. Hypothesis rules are
    plain functions: each runs its coroutine to completion on that loop, and the services
    make progress meanwhile."""

    def __init__(self, tmp_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.settings = Settings(
            database_url=f"sqlite+aiosqlite:///{tmp_path}/fairlane.db",
            auth_listen="127.0.0.1:0",
            queue_listen="127.0.0.1:0",
            worker_listen="127.0.0.1:0",
            service_secret="stateful-secret",
            max_payload_bytes=MAX_PAYLOAD_BYTES,
            retry_base_seconds=0.01,
            retry_max_seconds=0.05,
            breaker_reset_seconds=0.2,
            lane_max_length=1000,
        )
        self.services: list[Any] = []

    def run(self, coro: Awaitable[T], timeout: float = 60) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def start(self) -> None:
        await migrate(self.settings.database_url)
        self.engine = engine_for(self.settings)
        self.faults = StatementFaults(self.engine)
        self.broker = FaultyBroker(lane_max_length=self.settings.lane_max_length)
        await self.broker.connect()
        auth = AuthService(self.settings, engine=self.engine)
        await auth.start()
        self.settings = self.settings.model_copy(update={"auth_target": auth.address})
        self.queue = QueueService(
            self.settings,
            backends=Backends(self.settings, engine=self.engine, broker=self.broker),
        )
        await self.queue.start()
        self.settings = self.settings.model_copy(update={"queue_target": self.queue.address})
        worker = WorkerService(
            self.settings,
            backends=Backends(self.settings, engine=self.engine, broker=self.broker),
        )
        await worker.start()
        self.services = [auth, self.queue, worker]
        self.auth_target = auth.address
        self.channel = grpc.aio.insecure_channel(self.queue.address)
        self.stub = queue_pb2_grpc.QueueServiceStub(self.channel)

    async def stop(self) -> None:
        await self.channel.close()
        for service, grace in zip(reversed(self.services), (5, 1, 1), strict=False):
            await service.stop(grace)
        await self.broker.close()
        await self.engine.dispose()

    async def lane_state(self, user_id: str) -> tuple[list[Any], int | None]:
        """The lane's requests and lanes.last_seq, read by one statement (one snapshot)."""
        user = uuid.UUID(user_id)
        last_seq = sa.select(lanes.c.last_seq).where(lanes.c.user_id == user).scalar_subquery()
        async with self.engine.connect() as conn:
            result = await conn.execute(
                sa.select(requests, last_seq.label("lane_last_seq")).where(
                    requests.c.user_id == user
                )
            )
            rows = list(result.all())
        return rows, (rows[0].lane_last_seq if rows else None)


@contextlib.contextmanager
def running_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path)
    try:
        stack.run(stack.start())
        yield stack
    except BaseException:
        # The failure already raised is the one to report, not what stopping adds to it.
        with contextlib.suppress(Exception):
            stack.run(stack.stop())
        raise
    else:
        stack.run(stack.stop())  # a service that cannot stop cleanly fails the test
    finally:
        stack.loop.run_until_complete(stack.loop.shutdown_asyncgens())
        stack.loop.close()


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """A handler call and the statuses it can end in when nobody cancels it."""

    handler: str
    payload: bytes
    natural: frozenset[str]
    max_attempts: int = 0
    output: bytes | None = None  # what SUCCEEDED must return; None: the payload itself


KINDS = {
    "echo": Kind("echo", b"", frozenset({"SUCCEEDED"})),
    "retried": Kind(
        "fail",
        b'{"times": 1}',
        frozenset({"SUCCEEDED"}),
        output=b"succeeded on attempt 2",
    ),
    "permanent": Kind("fail", b'{"permanent": true}', frozenset({"FAILED"})),
    "dead": Kind("fail", b'{"times": 9}', frozenset({"DEAD"}), max_attempts=2),
    "slow 50ms": Kind("sleep", b"0.05", frozenset({"SUCCEEDED"})),
    "slow 200ms": Kind("sleep", b"0.2", frozenset({"SUCCEEDED"})),
}


@dataclass
class Sent:
    ref: str
    kind: Kind
    payload: bytes
    via: str  # "session" or "unary"
    faults_before: int  # faults injected in this example when it was sent
    answer: str = ""  # "accepted", or "rejected <CODE>: <message>"
    request_id: str = ""
    cancel_answers: list[str] = field(default_factory=list)
    result: common_pb2.Result | None = None

    @property
    def accepted(self) -> bool:
        return self.answer == "accepted"

    def allowed(self) -> frozenset[str]:
        """Final statuses that are true for it, given the cancels it was answered."""
        if "CANCELLED" in self.cancel_answers:
            return frozenset({"CANCELLED"})
        finals = [a for a in self.cancel_answers if a in status.FINAL]
        if finals:
            return frozenset(finals[:1])
        if self.cancel_answers:  # RUNNING, or a cancel that failed: either may win
            return self.kind.natural | {"CANCELLED"}
        return self.kind.natural


@dataclass
class Seen:
    """What the clients had been told at one moment."""

    sent: dict[str, Sent]
    arrivals: list[str]
    abandoned_answers: dict[str, str]


class LaneMachine(RuleBasedStateMachine):
    accepted = Bundle("accepted")

    def __init__(self, stack: Stack) -> None:
        super().__init__()
        self.stack = stack
        self.user_id, self.token = stack.run(new_user(stack.auth_target))
        self.sent: dict[str, Sent] = {}
        self.by_id: dict[str, Sent] = {}  # accepted requests by request_id
        self.awaiting: list[str] = []  # Session enqueues waiting for their answer, in order
        self.violations: list[str] = []
        self.abandoned: list[str] = []  # refs sent by callers that gave up
        self.abandoned_answers: dict[str, str] = {}  # ref -> request_id they were told
        self.refused_refs: list[str] = []
        self.faults = 0
        self.n = 0
        self.arrivals: list[str] = []  # Session results, as they came
        self.heard = asyncio.Event()  # set whenever the Session brings something
        self.outbox: asyncio.Queue[queue_pb2.SessionRequest | None] = asyncio.Queue()
        self.call, self.reader = stack.run(self._open())

    async def _open(self) -> tuple[Any, asyncio.Task[None]]:
        call = self.stack.stub.Session(self._requests(), metadata=bearer(self.token))
        self.call = call
        return call, asyncio.create_task(self._read())

    # -- the Session -----------------------------------------------------------------------

    async def _requests(self) -> AsyncIterator[queue_pb2.SessionRequest]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def _read(self) -> None:
        try:
            async for message in self.call:
                kind = message.WhichOneof("kind")
                for r in message.batch.responses if kind == "batch" else [message]:
                    self._on_response(r)
                self.heard.set()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.violations.append(f"Session ended: {exc.code().name} {exc.details()}")
        finally:
            self.heard.set()

    def _on_response(self, r: queue_pb2.SessionResponse) -> None:
        kind = r.WhichOneof("kind")
        if kind == "rejected" and cancel_named(r.rejected) in self.by_id:
            # A cancel sent on the Session was refused: only a fault excuses that.
            sent = self.by_id[cancel_named(r.rejected)]
            code = CODE_NAMES.get(r.rejected.code, str(r.rejected.code))
            sent.cancel_answers.append(f"error {code}")
            if code != "UNAVAILABLE" or not self.faults:
                self.violations.append(f"Session cancel of {sent.ref}: {code} {r.rejected.message}")
        elif kind in ("accepted", "rejected"):
            answer = r.accepted if kind == "accepted" else r.rejected
            if not self.awaiting:
                self.violations.append(f"answer to nothing: {r}")
                return
            ref = self.awaiting.pop(0)
            if answer.client_ref != ref:
                self.violations.append(f"answer for {answer.client_ref!r} where {ref!r} was due")
            sent = self.sent[ref]
            if kind == "accepted":
                sent.answer, sent.request_id = "accepted", r.accepted.request_id
                self.by_id[sent.request_id] = sent
            else:
                code = CODE_NAMES.get(r.rejected.code, str(r.rejected.code))
                sent.answer = f"rejected {code}: {r.rejected.message}"
        elif kind == "result":
            sent_ = self.sent.get(r.result.client_ref)
            if sent_ is None or sent_.via != "session":
                self.violations.append(f"result of a request not sent here: {r.result}")
            elif sent_.result is not None:
                self.violations.append(f"second result for {sent_.ref}")
            elif not sent_.accepted:
                self.violations.append(f"result for {sent_.ref} before or without acceptance")
            else:
                sent_.result = r.result
                self.arrivals.append(sent_.ref)

    def _new(self, kind: Kind, via: str) -> Sent:
        self.n += 1
        ref = f"r{self.n}"
        payload = kind.payload or ref.encode()
        sent = Sent(ref, kind, payload, via, self.faults)
        self.sent[ref] = sent
        return sent

    @staticmethod
    def _message(sent: Sent) -> queue_pb2.EnqueueRequest:
        return queue_pb2.EnqueueRequest(
            handler=sent.kind.handler,
            payload=sent.payload,
            max_attempts=sent.kind.max_attempts,
            client_ref=sent.ref,
        )

    async def _answered(self, refs: list[str]) -> None:
        while not (all(self.sent[r].answer for r in refs) or self.reader.done()):
            self.heard.clear()
            await self.heard.wait()

    # -- rules -------------------------------------------------------------------------------

    @rule(target=accepted, kinds=st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=6))
    def enqueue_on_the_session(self, kinds: list[str]) -> Any:
        """One enqueue, or several in one enqueue_batch message (so in one intake batch)."""
        batch = [self._new(KINDS[k], "session") for k in kinds]
        self.awaiting += [s.ref for s in batch]
        if len(batch) == 1:
            self.outbox.put_nowait(queue_pb2.SessionRequest(enqueue=self._message(batch[0])))
        else:
            self.outbox.put_nowait(
                queue_pb2.SessionRequest(
                    enqueue_batch=queue_pb2.EnqueueBatch(requests=[self._message(s) for s in batch])
                )
            )
        self.stack.run(self._answered([s.ref for s in batch]))
        return batch[0].ref

    @rule(target=accepted, kind=st.sampled_from(sorted(KINDS)))
    def enqueue_unary(self, kind: str) -> Any:
        sent = self._new(KINDS[kind], "unary")

        async def call() -> None:
            try:
                reply = await self.stack.stub.Enqueue(
                    self._message(sent), metadata=bearer(self.token), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                sent.answer = f"rejected {exc.code().name}: {exc.details()}"
            else:
                sent.answer, sent.request_id = "accepted", reply.request_id
                self.by_id[sent.request_id] = sent

        self.stack.run(call())
        return sent.ref

    @rule(ref=accepted)
    def cancel(self, ref: str) -> None:
        sent = self.sent[ref]
        if not sent.accepted:
            return

        async def call() -> None:
            try:
                reply = await self.stack.stub.CancelRequest(
                    queue_pb2.CancelRequestRequest(request_id=sent.request_id),
                    metadata=bearer(self.token),
                    timeout=30,
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or not self.faults:
                    self.violations.append(f"cancel of {ref}: {exc.code().name} {exc.details()}")
                sent.cancel_answers.append(f"error {exc.code().name}")
            else:
                sent.cancel_answers.append(STATUS_NAMES[reply.status])

        self.stack.run(call())

    @rule(ref=accepted)
    def cancel_on_the_session(self, ref: str) -> None:
        """A cancel on the Session: nothing answers it unless it is refused."""
        sent = self.sent[ref]
        if not sent.accepted:
            return
        sent.cancel_answers.append("asked on the Session")
        self.outbox.put_nowait(
            queue_pb2.SessionRequest(
                cancel=queue_pb2.CancelRequestRequest(request_id=sent.request_id)
            )
        )

    @rule(timeout_ms=st.integers(1, 10), many=st.booleans())
    def caller_gives_up(self, timeout_ms: int, many: bool) -> None:
        """A unary Enqueue, or a Session with a few enqueues, abandoned after 1-10 ms."""
        self.n += 1
        refs = [f"a{self.n}.{k}" for k in range(3 if many else 1)]
        self.abandoned += refs
        messages = [
            queue_pb2.EnqueueRequest(handler="echo", payload=r.encode(), client_ref=r) for r in refs
        ]

        async def unary() -> None:
            try:
                reply = await self.stack.stub.Enqueue(
                    messages[0], metadata=bearer(self.token), timeout=timeout_ms / 1000
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED and not (
                    exc.code() == grpc.StatusCode.UNAVAILABLE and self.faults
                ):
                    self.violations.append(f"abandoned Enqueue: {exc.code().name} {exc.details()}")
            else:
                self.abandoned_answers[refs[0]] = reply.request_id

        async def session() -> None:
            gone = asyncio.Event()

            async def out() -> AsyncIterator[queue_pb2.SessionRequest]:
                yield queue_pb2.SessionRequest(
                    enqueue_batch=queue_pb2.EnqueueBatch(requests=messages)
                )
                await gone.wait()  # no half-close while the caller is there

            call = self.stack.stub.Session(
                out(), metadata=bearer(self.token), timeout=timeout_ms / 1000
            )
            try:
                async for message in call:
                    kind = message.WhichOneof("kind")
                    for r in message.batch.responses if kind == "batch" else [message]:
                        if r.WhichOneof("kind") == "accepted":
                            self.abandoned_answers[r.accepted.client_ref] = r.accepted.request_id
            except grpc.aio.AioRpcError as exc:
                expected = (
                    exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                    or (exc.code() == grpc.StatusCode.UNAVAILABLE and self.faults > 0)
                    or (
                        exc.code() == grpc.StatusCode.INTERNAL and exc.details() == CLIENT_CORE_RACE
                    )
                )
                if not expected:
                    self.violations.append(f"abandoned Session: {exc.code().name} {exc.details()}")
            finally:
                call.cancel()
                gone.set()

        self.stack.run(session() if many else unary())

    @rule(
        name=st.sampled_from([name for name, _ in BAD_ENQUEUES] + ["payload over the limit"]),
        on_session=st.booleans(),
    )
    def refused_input(self, name: str, on_session: bool) -> None:
        """Refused input is INVALID_ARGUMENT for itself alone, and stores nothing."""
        msg = queue_pb2.EnqueueRequest()
        msg.CopyFrom(dict(bad_enqueues())[name])
        self.n += 1
        # Its own client_ref, keeping what makes it refused.
        msg.client_ref = f"x{self.n}" + msg.client_ref[len(f"x{self.n}") :]
        self.refused_refs.append(msg.client_ref)
        if on_session:
            sent = Sent(msg.client_ref, KINDS["echo"], msg.payload, "refused", self.faults)
            self.sent[msg.client_ref] = sent
            self.awaiting.append(msg.client_ref)
            self.outbox.put_nowait(queue_pb2.SessionRequest(enqueue=msg))
            self.stack.run(self._answered([msg.client_ref]))
            if not sent.answer.startswith("rejected INVALID_ARGUMENT"):
                self.violations.append(f"Session {name}: answered {sent.answer!r}")
            return

        async def unary() -> None:
            try:
                await self.stack.stub.Enqueue(msg, metadata=bearer(self.token), timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    self.violations.append(f"Enqueue {name}: {exc.code().name} {exc.details()}")
            else:
                self.violations.append(f"Enqueue {name}: accepted")

        self.stack.run(unary())

    @rule(
        operation=st.sampled_from(["publish_lane", "publish_lane_lost", "publish_results"]),
        n=st.integers(1, 3),
    )
    def broker_fails(self, operation: str, n: int) -> None:
        self.faults += 1
        self.stack.broker.fail_next(operation, n)

    @rule(stage=st.sampled_from(sorted(STAGES)), n=st.integers(1, 3))
    def database_fails(self, stage: str, n: int) -> None:
        self.faults += 1
        self.stack.faults.fail_next(stage, n)

    @rule(undecodable=st.booleans())
    def corrupt_message_in_the_lane(self, undecodable: bool) -> None:
        """A message no worker can process reaches the lane (undecodable, while the dead
        letter queue refuses it; or an item with an id that is not a UUID). The lane must
        go on with the requests behind it."""
        # Checked here, not as a precondition: whether a request was accepted depends on
        # timing (callers give up after 1-10 ms, faults), and a precondition that varies
        # between replays of the same draws makes Hypothesis fail the test as flaky
        # (FlakyStrategyDefinition, seen once in CI).
        if not any(s.accepted for s in self.sent.values()):
            return  # no lane to publish to yet
        self.faults += 1
        if undecodable:
            body = b"\x0a\xff\x01corrupt"
            self.stack.broker.fail_next("publish_dead", 1)
        else:
            body = lane_pb2.LaneBatch(
                user_id=self.user_id,
                reply_route=self.stack.settings.reply_route,
                items=[lane_pb2.LaneItem(request_id="not-a-uuid", handler="echo")],
            ).SerializeToString()
        self.stack.run(self.stack.broker.publish_lane_unfaulted(self.user_id, body))

    @rule()
    def settle(self) -> None:
        """Waits until everything accepted has finished, then checks the whole lane."""
        self._settle_and_check()

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def answers_are_true_so_far(self) -> None:
        seen = self._snapshot()  # taken first: all it holds was told before the read
        rows, last_seq = self.stack.run(self.stack.lane_state(self.user_id))
        problems = list(self.violations)
        problems += self._check(seen, rows, last_seq, complete=False)
        assert not problems, "\n".join(problems)

    def _snapshot(self) -> Seen:
        return Seen(copy.deepcopy(self.sent), list(self.arrivals), dict(self.abandoned_answers))

    def _check(
        self, seen: Seen, rows: list[Any], last_seq: int | None, *, complete: bool
    ) -> list[str]:
        problems: list[str] = []
        by_ref = {r.client_ref: r for r in rows}
        by_id = {str(r.id): r for r in rows}
        # The log: lane_seq 1..n over the finished requests, as lanes.last_seq says.
        seqs = sorted(r.lane_seq for r in rows if r.lane_seq is not None)
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"lane_seq gaps: {seqs}")
        if seqs and last_seq != len(seqs):
            problems.append(f"lanes.last_seq {last_seq} for {len(seqs)} finished")
        for r in rows:
            # A queued request is CANCELLED in the log at once, and numbered when the
            # worker reaches it; anything else holds a lane_seq exactly when it is final.
            numbered = r.lane_seq is not None
            if numbered != (r.status in status.FINAL) and (complete or r.status != "CANCELLED"):
                problems.append(f"{r.client_ref}: {r.status} with lane_seq {r.lane_seq}")
        # Every answer was true.
        for sent in seen.sent.values():
            row = by_ref.get(sent.ref)
            if sent.via == "refused":
                continue
            if sent.accepted:
                if row is None or str(row.id) != sent.request_id:
                    problems.append(f"{sent.ref} accepted as {sent.request_id}, log has {row}")
                    continue
                if row.payload != sent.payload:
                    problems.append(f"{sent.ref} stored with payload {row.payload!r}")
                if row.status in status.FINAL and row.status not in sent.allowed():
                    problems.append(
                        f"{sent.ref} ({sent.kind.handler} {sent.kind.payload!r}, cancels "
                        f"{sent.cancel_answers}) ended {row.status}: {row.error}"
                    )
                if row.status == "SUCCEEDED" and row.output != (sent.kind.output or sent.payload):
                    problems.append(f"{sent.ref} returned {row.output!r}")
            elif sent.answer:
                if row is not None:
                    problems.append(f"{sent.ref} was told {sent.answer!r} but is in the log")
                if not sent.faults_before:
                    problems.append(f"{sent.ref} {sent.answer!r} with no fault injected")
            if sent.result is not None:
                res = sent.result
                told = (STATUS_NAMES[res.status], res.lane_seq, res.output)
                logged = (row.status, row.lane_seq, row.output or b"") if row else None
                if told != logged:
                    problems.append(f"{sent.ref}: result {told} but the log has {logged}")
        # Results on the Session come in the order the requests were sent (FIFO), with
        # lane_seq rising.
        sent_order = {ref: i for i, ref in enumerate(seen.sent)}
        came = [(sent_order[ref], seen.sent[ref].result) for ref in seen.arrivals]
        if [i for i, _ in came] != sorted(i for i, _ in came):
            problems.append(f"Session results out of send order: {seen.arrivals}")
        seqs_came = [res.lane_seq for _, res in came if res is not None]
        if seqs_came != sorted(set(seqs_came)):
            problems.append(f"Session results with lane_seqs {seqs_came}")
        # A refused request stores nothing; an abandoned caller's answer was true.
        for ref in self.refused_refs:
            if ref in by_ref:
                problems.append(f"refused {ref!r} is in the log")
        for ref, rid in seen.abandoned_answers.items():
            if rid not in by_id or by_id[rid].client_ref != ref:
                problems.append(f"abandoned {ref} was told {rid}, not in the log")
        known = {s.ref for s in seen.sent.values()} | set(self.abandoned)
        for r in rows:
            if r.client_ref not in known:
                problems.append(f"unknown request in the lane: {r.client_ref!r}")
        if complete:
            stuck = [(r.client_ref, r.status) for r in rows if r.lane_seq is None]
            if stuck:
                problems.append(f"left unfinished: {stuck}")
            for sent in seen.sent.values():
                if sent.via == "session" and sent.accepted and sent.result is None:
                    problems.append(f"{sent.ref} accepted on the Session, no result received")
                if sent.via != "refused" and not sent.answer:
                    problems.append(f"{sent.ref} never answered")
        return problems

    def _settle_and_check(self) -> None:
        async def settled() -> tuple[Seen, list[Any], int | None]:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SETTLE_SECONDS
            while True:
                seen = self._snapshot()
                rows, last_seq = await self.stack.lane_state(self.user_id)
                waiting = [
                    s
                    for s in seen.sent.values()
                    if s.via == "session" and s.accepted and s.result is None
                ]
                unfinished = [r for r in rows if r.lane_seq is None]
                if (not waiting and not unfinished) or loop.time() > deadline:
                    return seen, rows, last_seq
                await asyncio.sleep(0.02)

        seen, rows, last_seq = self.stack.run(settled(), timeout=SETTLE_SECONDS + 10)
        problems = list(self.violations) + self._check(seen, rows, last_seq, complete=True)
        assert not problems, "\n".join(problems)

    def teardown(self) -> None:
        try:
            # Faults still pending are dropped: the lane must finish what it accepted.
            self.stack.faults.clear()
            self.stack.broker.pending.clear()
            self._settle_and_check()
        finally:
            self.outbox.put_nowait(None)
            self.call.cancel()
            with contextlib.suppress(Exception):
                self.stack.run(asyncio.gather(self.reader, return_exceptions=True), timeout=5)


def test_one_lane_under_random_traffic_and_faults(tmp_path: Path) -> None:
    examples = int(os.environ.get("FAIRLANE_STATEFUL_EXAMPLES", "25"))
    with running_stack(tmp_path) as stack:

        class OnThisStack(LaneMachine):
            def __init__(self) -> None:
                super().__init__(stack)

        run_state_machine_as_test(
            OnThisStack,
            settings=settings(
                max_examples=examples,
                stateful_step_count=20,
                deadline=None,
                database=None,
                # A failing example is printed step by step; shrinking it would re-run
                # the lane many times over (FAIRLANE_STATEFUL_SHRINK=1 turns it on).
                phases=[Phase.explicit, Phase.generate]
                + ([Phase.shrink] if os.environ.get("FAIRLANE_STATEFUL_SHRINK") else []),
                suppress_health_check=list(HealthCheck),
            ),
        )
