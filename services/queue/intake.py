"""Batched durable intake: many concurrent enqueues become one transaction, and each
caller learns its own outcome as soon as that transaction is committed.

Accepted means committed: the request's row and its outbox row are in the log, and the
lane relay owes it a publish from then on. Nothing after the commit can turn an accepted
request into a rejected one. Before the commit every item fails or succeeds on its own:
transient database errors are retried for the whole batch, anything else splits the batch
until only the items that cause it fail.

Batches are fair across users and bounded in bytes (services/queue/fair_queue.py): each
user's submissions wait in order in their own FIFO, a batch takes the users in turn, and
it holds at most `write_batch_size` requests and BATCH_BYTES of them. A user's requests
are committed in the order they were submitted (batch after batch, and in order within
one: the store numbers a lane's requests in batch order); different users' interleave.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span, SpanKind
from sqlalchemy.exc import IntegrityError

from fairlane_server.core import dberrors, metrics, tracing
from fairlane_server.core.breaker import CircuitBreaker, CircuitOpen
from fairlane_server.core.describe import describe_error
from fairlane_server.core.logging import get_logger
from fairlane_server.core.tasks import cancel_and_wait, fail_quietly
from fairlane_server.queue.accept_store import (
    AcceptStore,
    CommitUnknown,
    NewRequest,
    OutboxItem,
    PartlyStored,
)
from fairlane_server.queue.fair_queue import FairQueue
from fairlane_server.queue.relay import LaneRelay

log = get_logger(__name__)

# A batch is one transaction: at most this many bytes of requests, counted as payload plus
# ROW_BYTES each (a single larger request still goes, alone). Counted, not sized, batches
# of 500 took up to 500 MiB, and one user's large payloads held everyone's commits back.
BATCH_BYTES = 4 * 1024 * 1024
# What a request costs besides its payload: its rows (request, event, outbox, key) and
# their statement's work, so that a user's empty payloads are not free.
ROW_BYTES = 1024
# What one turn of a user gives them in a batch (deficit round robin, see fair_queue):
# 64 small requests, or one of 1 MiB every 16 turns.
TURN_BYTES = 64 * 1024


class Rejection(Exception):
    """An enqueue that was not accepted; nothing of it was stored."""

    def __init__(self, reason: str, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True, slots=True)
class Admitted:
    request_id: uuid.UUID
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Load:
    """What waits on this replica's intake, as admission sees it for one user."""

    waiting: int  # submissions waiting for a batch, everybody's
    behind: int  # in the batch being written, or committed and waiting for their publish
    own: int  # of `waiting`, this user's
    users: int  # users with submissions waiting

    @property
    def total(self) -> int:
        return self.waiting + self.behind


@dataclass(slots=True)
class Submission:
    request: NewRequest
    reply_route: str
    traceparent: str = ""
    span: Span | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    # Resolved only by the intake. Callers await it through asyncio.shield, so a caller
    # that goes away (deadline, cancel, reset stream) cannot cancel it under the intake.
    future: asyncio.Future[Admitted] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _resolve(sub: Submission, admitted: Admitted) -> None:
    if not sub.future.done():
        sub.future.set_result(admitted)


def _reject(sub: Submission, rejection: Rejection) -> None:
    fail_quietly(sub.future, rejection)
    metrics.REJECTIONS.labels(rejection.reason).inc()


class Intake:
    def __init__(
        self,
        store: AcceptStore,
        relay: LaneRelay,
        *,
        batch_size: int,
        linger_ms: float,
        lane_limit: int,
        retry_after_ms: int = 1000,
        breaker: CircuitBreaker | None = None,
        transient_patience: float = 2.0,
        batch_bytes: int = BATCH_BYTES,
        turn_bytes: int = TURN_BYTES,
    ) -> None:
        self._store = store
        self._relay = relay
        self._lane_limit = lane_limit
        self._retry_after_ms = retry_after_ms
        self._breaker = breaker or CircuitBreaker("database")
        self._patience = transient_patience
        # Each user's submissions wait in order in a FIFO of their own; batches take
        # users in turn, so one user's backlog delays another's request by about one batch.
        self._pending: FairQueue[Submission] = FairQueue(
            max_size=batch_size, max_cost=batch_bytes, quantum=turn_bytes, linger=linger_ms / 1000
        )
        self._task: asyncio.Task[None] | None = None
        self._in_batch = 0
        self._last_progress = time.monotonic()
        # Whether the last batch was refused by the database for a reason of its own (not
        # the data's): such a batch is no progress, or a log that refuses every write (a
        # read-only database, a lock held) looked healthy while refusing everyone.
        self._refused_by_log = False
        # Exported at 0 from the start, so dashboards and alerts see the series before
        # the first event.
        metrics.BATCH_SPLITS.labels("intake")
        metrics.ITEM_FAILURES.labels("intake")

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="intake")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        shutdown = Rejection("shutdown", "the server is shutting down", self._retry_after_ms)
        for sub in self._pending.drain():
            _reject(sub, shutdown)

    def submit(self, sub: Submission) -> asyncio.Future[Admitted]:
        pending = self._pending
        if not self._in_batch and not len(pending) and not self._refused_by_log:
            # Idle until now: a stall counts from here, not from the last batch (the first
            # request after seven idle minutes read as a 412 s stall, and health flapped).
            self._last_progress = time.monotonic()
        request = sub.request
        # Keyed by the id's int: hashing a UUID is a Python call, an int's is not.
        pending.put(sub, request.user_id.int, len(request.payload) + ROW_BYTES)
        return sub.future

    @property
    def pending(self) -> int:
        """Requests of this replica waiting for their commit or their publish."""
        return len(self._pending) + self._in_batch + self._relay.backlog

    def load(self, user: uuid.UUID) -> Load:
        pending = self._pending
        return Load(
            waiting=len(pending),
            behind=self._in_batch + self._relay.backlog,
            own=pending.waiting(user.int),
            users=pending.keys,
        )

    def stalled_for(self) -> float:
        """Seconds intake has had work without finishing a batch (0 when fine)."""
        if not self._in_batch and not len(self._pending):
            return 0.0
        return time.monotonic() - self._last_progress

    async def _run(self) -> None:
        while True:
            batch = await self._pending.next()
            self._in_batch = len(batch)
            self._refused_by_log = False
            try:
                await self._process(batch)
            except Exception:
                # A bug, not a database answer. Only items still unanswered are refused,
                # and none of them was committed: answers follow commits directly.
                log.exception("intake_batch_failed", size=len(batch))
                internal = Rejection(
                    "internal", "internal error; nothing was stored", self._retry_after_ms
                )
                for sub in batch:
                    _reject(sub, internal)
            finally:
                self._in_batch = 0
                if not self._refused_by_log:
                    self._last_progress = time.monotonic()

    async def _process(self, batch: list[Submission]) -> None:
        fresh = await self._dedupe(batch)
        if not fresh:
            return
        # The relay may read these rows from the outbox between the commit and the
        # handover; told they are coming, it waits for them instead of loading them back
        # as another replica's leftovers.
        ids = [s.request.id for s in fresh]
        self._relay.expect(ids)
        try:
            await self._store_batch(fresh)
        finally:
            self._relay.settled(ids)

    # -- idempotency -----------------------------------------------------------------------

    async def _dedupe(self, batch: list[Submission]) -> list[Submission]:
        """Answers repeats of an idempotency key with the first request; returns the rest."""
        keyed = [s for s in batch if s.request.idempotency_key is not None]
        if not keyed:
            return batch
        existing, failed = await self._find_keys(keyed)
        fresh: list[Submission] = []
        first: dict[tuple[uuid.UUID, str], Submission] = {}
        for sub in batch:
            key = sub.request.idempotency_key
            if key is None:
                fresh.append(sub)
                continue
            if sub.future.done() or id(sub) in failed:
                continue  # its key could not be looked up: already answered
            k = (sub.request.user_id, key)
            if k in existing:
                _resolve(sub, Admitted(existing[k], duplicate=True))
            elif k in first:
                _follow(first[k].future, sub, self._retry_after_ms)
            else:
                first[k] = sub
                fresh.append(sub)
        return fresh

    async def _find_keys(
        self, keyed: list[Submission]
    ) -> tuple[dict[tuple[uuid.UUID, str], uuid.UUID], set[int]]:
        """The stored requests of these idempotency keys, and (as ids of the submissions)
        those whose lookup failed and were answered. A lookup the database refuses for a
        value in it is split until the key at fault fails alone."""
        keys = list({(s.request.user_id, s.request.idempotency_key or "") for s in keyed})
        try:
            found: dict[tuple[uuid.UUID, str], uuid.UUID] = await self._call(
                lambda: self._store.find_idempotent(keys)
            )
            return found, set()
        except Exception as exc:
            if not dberrors.is_database_error(exc):
                raise
            if dberrors.is_transient(exc) or len(keys) == 1:
                if dberrors.is_transient(exc):
                    rejection = self._db_rejection(exc)
                    self._refused_by_log = True
                else:
                    metrics.ITEM_FAILURES.labels("intake").inc()
                    log.warning("idempotency_key_refused", error=describe_error(exc)[:200])
                    rejection = Rejection(
                        "refused", "the request log refused this idempotency key", 0
                    )
                for sub in keyed:
                    _reject(sub, rejection)
                return {}, {id(s) for s in keyed}
        metrics.BATCH_SPLITS.labels("intake").inc()
        by_key: dict[tuple[uuid.UUID, str], list[Submission]] = {}
        for sub in keyed:
            by_key.setdefault((sub.request.user_id, sub.request.idempotency_key or ""), []).append(
                sub
            )
        groups = list(by_key.values())
        middle = len(groups) // 2
        found, failed = await self._find_keys([s for g in groups[:middle] for s in g])
        more, failed_more = await self._find_keys([s for g in groups[middle:] for s in g])
        return found | more, failed | failed_more

    # -- the write ---------------------------------------------------------------------------

    async def _store_batch(self, subs: list[Submission]) -> None:
        span = _batch_span(
            "INSERT requests",
            subs,
            {
                "db.system": self._store.dialect,
                "db.operation.name": "INSERT",
                "db.collection.name": "requests",
                "fairlane.batch_size": len(subs),
            },
        )
        started = time.perf_counter()
        try:
            with tracing.current(span):
                kept, refused = await self._accept(subs)
        except CommitUnknown as exc:
            tracing.end(span, exc)
            await self._settle_unknown(subs, exc)
            return
        except PartlyStored as exc:
            tracing.end(span, exc)
            self._accepted(subs, exc.kept, exc.refused)
            # Their lanes exist now: written again, in order, split down to the item at
            # fault if the database refuses them again (a duplicate key is then answered
            # as one).
            ids = {p.request.id for p in exc.failed}
            await self._store_batch([s for s in subs if s.request.id in ids])
            return
        except Exception as exc:
            tracing.end(span, exc)
            if not dberrors.is_database_error(exc):
                raise
            if dberrors.is_transient(exc):
                rejection = self._db_rejection(exc)
                self._refused_by_log = True
                for sub in subs:
                    _reject(sub, rejection)
                return
            # Deterministic: something in the batch makes the statement fail. Split it, so
            # only the guilty items fail; halves go in order, which keeps each lane's order.
            if len(subs) == 1:
                await self._refuse_one(subs[0], exc)
                return
            metrics.BATCH_SPLITS.labels("intake").inc()
            middle = len(subs) // 2
            await self._store_batch(subs[:middle])
            await self._store_batch(subs[middle:])
            return
        tracing.end(span)
        metrics.DB_BATCH_SIZE.labels("intake").observe(len(subs))
        metrics.DB_BATCH_SECONDS.labels("intake").observe(time.perf_counter() - started)
        self._accepted(subs, kept, refused)

    async def _accept(self, subs: list[Submission]) -> tuple[list[OutboxItem], list[Any]]:
        """The store's accept, retried on transient errors for a short while."""
        delay = 0.02
        deadline = time.monotonic() + self._patience
        while True:
            try:
                accepted: tuple[list[OutboxItem], list[Any]] = await self._call(
                    lambda: self._store.accept(subs, lane_limit=self._lane_limit)
                )
                return accepted
            except CircuitOpen:
                raise
            except Exception as exc:
                if not dberrors.is_transient(exc) or isinstance(exc, CommitUnknown):
                    raise
                if time.monotonic() + delay > deadline:
                    raise
                log.info("intake_retry", error=describe_error(exc)[:200], size=len(subs))
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 0.5)

    def _accepted(self, subs: list[Submission], kept: list[OutboxItem], refused: list[Any]) -> None:
        self._relay.hand(kept)
        by_id = {s.request.id: s for s in subs}
        now = time.perf_counter()
        for item in kept:
            sub = by_id[item.request_id]
            _INTAKE_SECONDS.observe(now - sub.submitted_at)
            _resolve(sub, Admitted(item.request_id, duplicate=False))
        metrics.ACCEPTED.inc(len(kept))
        full = Rejection(
            "lane_full",
            f"your lane holds {self._lane_limit} unfinished requests; wait for results",
            self._retry_after_ms,
        )
        for pending in refused:
            _reject(pending, full)

    async def _settle_unknown(self, subs: list[Submission], exc: CommitUnknown) -> None:
        """The commit failed in flight. Read the log until it tells whether it happened:
        committed requests are accepted like any other, uncommitted ones refused as
        nothing stored. Until then nobody is answered: an answer that might be false
        ("rejected" for a stored request) is worse than a late one, and while the log is
        unreachable no other batch can be written anyway."""
        log.warning("intake_commit_unknown", error=describe_error(exc)[:200], size=len(subs))
        ids = [s.request.id for s in subs]
        delay = 0.05
        attempts = 0
        while True:
            try:
                found = await self._store.stored(ids)
                break
            except Exception as err:
                if not dberrors.is_database_error(err):
                    raise
                attempts += 1
                if attempts % 20 == 0:
                    log.warning("intake_commit_still_unknown", error=describe_error(err)[:200])
                await asyncio.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 2.0)
        nothing = Rejection(
            "database_unavailable",
            "the request log is unavailable; nothing was stored",
            self._retry_after_ms,
        )
        if exc.unplaced is None:
            # A transaction: all of it was committed, or none.
            if found:
                self._accepted(subs, exc.kept, exc.refused)
            else:
                for sub in subs:
                    _reject(sub, nothing)
            return
        # Statements of their own: what came back is certain, and each of the rest was
        # stored or not. A stored one waits in the outbox, not handed over (its position
        # is not known here): the relay reads its lane's outbox for it.
        self._accepted(subs, exc.kept, exc.refused)
        stored = [p for p in exc.unplaced if p.request.id in found]
        self._relay.look([p.request.user_id for p in stored])
        for sub in exc.unplaced:
            if sub.request.id in found:
                _resolve(sub, Admitted(sub.request.id, duplicate=False))
            else:
                _reject(sub, nothing)
        metrics.ACCEPTED.inc(len(stored))

    async def _refuse_one(self, sub: Submission, exc: BaseException) -> None:
        """One request the database refuses on its own."""
        key = sub.request.idempotency_key
        if isinstance(exc, IntegrityError) and key is not None:
            # Another replica stored the same idempotency key meanwhile.
            try:
                existing = await self._call(
                    lambda: self._store.find_idempotent([(sub.request.user_id, key)])
                )
            except Exception as err:
                if not dberrors.is_database_error(err):
                    raise
                existing = {}
            found = existing.get((sub.request.user_id, key))
            if found is not None:
                _resolve(sub, Admitted(found, duplicate=True))
                return
        metrics.ITEM_FAILURES.labels("intake").inc()
        log.warning(
            "intake_item_refused",
            request_id=str(sub.request.id),
            error=str(getattr(exc, "orig", exc))[:300],
        )
        _reject(
            sub,
            Rejection(
                "refused",
                "the request log refused this request; nothing was stored",
                0,
            ),
        )

    async def _call(self, call: Any) -> Any:
        """A request-log call through the circuit breaker: only transient errors count
        against it; a data error is an answer from a healthy database."""
        self._breaker.before_call()
        try:
            result = await call()
        except Exception as exc:
            if dberrors.is_transient(exc) or isinstance(exc, CommitUnknown):
                self._breaker.failure()
            else:
                self._breaker.success()
            raise
        self._breaker.success()
        return result

    def _db_rejection(self, exc: BaseException) -> Rejection:
        delay = self._retry_after_ms
        if isinstance(exc, CircuitOpen):
            delay = int(exc.retry_after * 1000)
        return Rejection(
            "database_unavailable",
            "the request log is unavailable; nothing was stored",
            max(delay, 100),
        )


_INTAKE_SECONDS = metrics.STAGE_SECONDS.labels("intake")


def _follow(source: asyncio.Future[Admitted], sub: Submission, retry_after_ms: int) -> None:
    """Answers `sub` like `source`: a repeat of an idempotency key within one batch."""

    def copy(done: asyncio.Future[Admitted]) -> None:
        if done.cancelled():
            _reject(
                sub, Rejection("internal", "internal error; nothing was stored", retry_after_ms)
            )
            return
        error = done.exception()
        if isinstance(error, Rejection):
            _reject(sub, error)
        elif error is not None:
            _reject(
                sub, Rejection("internal", "internal error; nothing was stored", retry_after_ms)
            )
        else:
            _resolve(sub, Admitted(done.result().request_id, duplicate=True))

    source.add_done_callback(copy)


def _batch_span(name: str, subs: list[Submission], attributes: dict[str, Any]) -> Span | None:
    """A span for work done once for many requests: a child of the first request's span,
    linked to the others'."""
    spans = [s.span for s in subs if s.span is not None]
    if not spans:
        return None
    return tracing.start(
        name, parent_span=spans[0], kind=SpanKind.CLIENT, attributes=attributes, links=spans[1:]
    )
