"""The request log as the worker reads and writes it."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core import status
from fairlane_server.core.db import one_statement, upsert, write_transaction
from fairlane_server.core.logging import get_logger
from fairlane_server.core.models import handlers, lanes, request_events, requests
from fairlane_server.core.notify import notify_statements
from fairlane_server.worker.registry import Handler

log = get_logger(__name__)

# What an outcome becomes when the client cancelled its request while the handler ran.
CANCELLED_BY_CLIENT = "cancelled by the client"


@dataclass(slots=True)
class Attempt:
    number: int
    started_at: datetime
    error: str = ""


@dataclass(slots=True)
class Outcome:
    """A request's final state, to be written and announced."""

    request_id: uuid.UUID
    user_id: uuid.UUID
    status: str
    output: bytes = b""
    error: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    finished_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    lane_seq: int = 0
    traceparent: str = ""

    @property
    def attempt_count(self) -> int:
        """Handler starts in total, counting those of a replica that died mid-request."""
        return self.attempts[-1].number if self.attempts else 0


@dataclass(frozen=True, slots=True)
class StoredState:
    status: str
    lane_seq: int | None
    attempts: int
    output: bytes | None
    error: str | None
    client_ref: str
    handler: str
    cancel_requested: bool = False  # the client cancelled it while it ran


class WorkerStore:
    def __init__(self, engine: AsyncEngine, *, notify_channel: str = "") -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        # PostgreSQL only: the channel queue replicas listen on for new results.
        self._notify_channel = notify_channel if self._dialect == "postgresql" else ""

    @property
    def dialect(self) -> str:
        """The database's kind, as spans name it (db.system): postgresql or sqlite."""
        return self._dialect

    async def register_handlers(self, specs: Sequence[Handler]) -> None:
        now = datetime.now(UTC)
        stmt = upsert(self._dialect, handlers)
        stmt = stmt.on_conflict_do_update(
            index_elements=[handlers.c.name],
            set_={
                "description": stmt.excluded.description,
                "max_attempts": stmt.excluded.max_attempts,
                "timeout_seconds": stmt.excluded.timeout_seconds,
                "last_seen_at": stmt.excluded.last_seen_at,
            },
        )
        async with self._engine.begin() as conn:
            await conn.execute(
                stmt,
                [
                    {
                        "name": h.name,
                        "description": h.description,
                        "max_attempts": h.max_attempts,
                        "timeout_seconds": h.timeout or 0.0,
                        "last_seen_at": now,
                    }
                    for h in specs
                ],
            )

    async def set_lane_paused(self, user_id: uuid.UUID, paused: bool) -> bool:
        """Pauses (paused_at: now, or kept from an earlier pause) or resumes (NULL) a lane for
        every worker replica. False if the lane has no row (its user never enqueued)."""
        now = sa.literal(datetime.now(UTC), lanes.c.paused_at.type)
        value: Any = sa.func.coalesce(lanes.c.paused_at, now) if paused else None
        async with self._engine.begin() as conn:
            row = await conn.execute(
                lanes.update()
                .where(lanes.c.user_id == user_id)
                .values(paused_at=value)
                .returning(lanes.c.user_id)
            )
            return row.first() is not None

    async def lane_paused(self, user_id: uuid.UUID) -> bool | None:
        """Whether the lane is paused now; None if it has no row."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(sa.select(lanes.c.paused_at).where(lanes.c.user_id == user_id))
            ).first()
            return None if row is None else row.paused_at is not None

    async def paused_lanes(self) -> set[str]:
        """User ids of the lanes paused now."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(lanes.c.user_id).where(lanes.c.paused_at.is_not(None))
            )
            return {str(user_id) for user_id in rows.scalars()}

    async def states(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, StoredState]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                sa.select(
                    requests.c.id,
                    requests.c.status,
                    requests.c.lane_seq,
                    requests.c.attempts,
                    requests.c.output,
                    requests.c.error,
                    requests.c.client_ref,
                    requests.c.handler,
                    requests.c.cancel_requested,
                ).where(requests.c.id.in_(list(ids)))
            )
            return {r.id: StoredState(*r[1:]) for r in rows}

    async def _assign_seqs(self, conn: Any, counts: dict[uuid.UUID, int]) -> dict[uuid.UUID, int]:
        """SQLite: reserves `n` consecutive lane_seq values per lane; returns each lane's
        last one (a lane whose row is gone has none)."""
        last: dict[uuid.UUID, int] = {}
        for user in sorted(counts):
            row = await conn.execute(
                lanes.update()
                .values(last_seq=lanes.c.last_seq + counts[user])
                .where(lanes.c.user_id == user)
                .returning(lanes.c.last_seq)
            )
            value = row.scalar_one_or_none()
            if value is not None:
                last[user] = value
        return last

    async def _lock_requests(self, conn: Any, ids: list[uuid.UUID]) -> Any:
        """Returns (id, status, lane_seq, cancel_requested) of the requests in the log.
        SQLite: the write transaction's lock (BEGIN IMMEDIATE) already keeps everyone else
        out."""
        return await conn.execute(
            sa.select(
                requests.c.id, requests.c.status, requests.c.lane_seq, requests.c.cancel_requested
            )
            .where(requests.c.id.in_(ids))
            .with_for_update()
        )

    async def _mark_running(
        self, conn: Any, running: Sequence[tuple[uuid.UUID, int, datetime]]
    ) -> None:
        # One mark per request, its latest attempt: an UPDATE ... FROM with a request
        # twice would apply either row.
        latest: dict[uuid.UUID, tuple[uuid.UUID, int, datetime]] = {}
        for mark in running:
            if mark[0] not in latest or mark[1] > latest[mark[0]][1]:
                latest[mark[0]] = mark
        running = list(latest.values())
        if self._dialect == "postgresql":
            await conn.execute(
                _PG_MARK_RUNNING,
                {
                    "ids": [i for i, _, _ in running],
                    **_id_range([i for i, _, _ in running]),
                    "attempts": [n for _, n, _ in running],
                    "ats": [at for _, _, at in running],
                },
            )
            return
        await conn.execute(
            requests.update()
            .where(
                requests.c.id == sa.bindparam("b_id"),
                sa.or_(requests.c.status == status.QUEUED, requests.c.status == status.RUNNING),
            )
            .values(
                status=status.RUNNING,
                attempts=sa.bindparam("b_attempt"),
                started_at=sa.bindparam("b_at"),
            ),
            [{"b_id": i, "b_attempt": n, "b_at": at} for i, n, at in running],
        )

    async def finish(
        self,
        outcomes: Sequence[Outcome],
        running: Sequence[tuple[uuid.UUID, int, datetime]] = (),
    ) -> list[Outcome]:
        """Marks `running` requests RUNNING, then writes the outcomes and gives each its
        lane_seq, the outcomes all or none (one statement on PostgreSQL; one transaction,
        the marks included, on SQLite). Returns the outcomes written: one whose request is
        not in the log or already finished (it finished before, or earlier in this very
        batch) is left out.

        Outcomes of one lane must come in lane order; they are numbered in that order.
        """
        if self._dialect == "postgresql":
            return await self._finish_in_one_statement(outcomes, running)
        async with write_transaction(self._engine) as conn:
            if running:
                await self._mark_running(conn, running)
            if not outcomes:
                return []
            # Lock the rows: a client's cancel that landed while the handler ran wins, and
            # one that comes later finds the request finished.
            found = {
                r.id: (r.status, r.lane_seq, r.cancel_requested)
                for r in await self._lock_requests(conn, [o.request_id for o in outcomes])
            }
            kept: list[Outcome] = []
            taken: set[uuid.UUID] = set()
            for o in outcomes:
                current = found.get(o.request_id)
                # Not in the log, finished before, or finished earlier in this very batch
                # (a redelivery ran it again before the first outcome was written).
                if current is None or current[1] is not None or o.request_id in taken:
                    continue
                taken.add(o.request_id)
                cancelled = current[0] == status.CANCELLED or current[2]
                if cancelled and o.status != status.CANCELLED:
                    o.status, o.output, o.error = status.CANCELLED, b"", CANCELLED_BY_CLIENT
                kept.append(o)
            if not kept:
                return []
            outcomes = kept
            counts: dict[uuid.UUID, int] = {}
            for o in outcomes:
                counts[o.user_id] = counts.get(o.user_id, 0) + 1
            last = await self._assign_seqs(conn, counts)
            orphans = [o for o in outcomes if o.user_id not in last]
            if orphans:
                # The lane's row is gone (its user was deleted): nothing to number these
                # by, and nobody to send them to. Left out; the others are written.
                for o in orphans:
                    log.warning("outcome_without_lane", request_id=str(o.request_id))
                outcomes = [o for o in outcomes if o.user_id in last]
                counts = {u: n for u, n in counts.items() if u in last}
                if not outcomes:
                    return []
            next_seq = {u: last[u] - n + 1 for u, n in counts.items()}
            for o in outcomes:
                o.lane_seq = next_seq[o.user_id]
                next_seq[o.user_id] += 1
            await self._write_outcomes(conn, outcomes, counts)
        return outcomes

    async def _finish_in_one_statement(
        self, outcomes: Sequence[Outcome], running: Sequence[tuple[uuid.UUID, int, datetime]]
    ) -> list[Outcome]:
        """PostgreSQL: the locks, the checks, the numbering and the writes in one statement,
        outside an explicit transaction (the statement is its own). As BEGIN, three
        statements and COMMIT it took five round trips, each waiting for a turn of a busy
        event loop while the batch's lane rows stayed locked against the intake: 4.6 ms a
        batch for one request on an idle suite, 48 ms for 71 at 1,000 lanes."""
        async with one_statement(self._engine) as conn:
            if running:
                # Their own statement: a mark only ever moves a request to RUNNING, so it
                # needs nothing of the outcomes' statement (the writer keeps a batch's
                # marks and outcomes to different requests).
                await self._mark_running(conn, running)
            if not outcomes:
                return []
            rows = (await conn.execute(_PG_FINISH, self._finish_params(outcomes))).all()
        written: list[Outcome] = []
        for k, seq, cancelled in sorted(rows, key=lambda row: int(row[0])):
            o = outcomes[k]
            if seq is None:
                # The lane's row is gone (its user was deleted): nothing to number it by,
                # and nobody to send it to. Left out; the others are written.
                log.warning("outcome_without_lane", request_id=str(o.request_id))
                continue
            if cancelled:
                o.status, o.output, o.error = status.CANCELLED, b"", CANCELLED_BY_CLIENT
            o.lane_seq = seq
            written.append(o)
        return written

    def _finish_params(self, outcomes: Sequence[Outcome]) -> dict[str, Any]:
        ks = list(range(len(outcomes)))
        ids = [o.request_id for o in outcomes]
        # (outcome index, at, status, attempt, detail, final): every attempt, then the end.
        events = _events(outcomes)
        users = {o.user_id for o in outcomes}
        return {
            "ks": ks,
            "ids": ids,
            "lock_ids": sorted(set(ids)),
            **_id_range(ids),
            "users": [o.user_id for o in outcomes],
            "statuses": [o.status for o in outcomes],
            "outputs": [o.output or None for o in outcomes],
            "errors": [clean_text(o.error) or None for o in outcomes],
            "attempts": [o.attempt_count for o in outcomes],
            "started": [o.attempts[-1].started_at if o.attempts else None for o in outcomes],
            "finished": [o.finished_at for o in outcomes],
            "e_ks": [e[0] for e in events],
            "e_ats": [e[1] for e in events],
            "e_statuses": [e[2] for e in events],
            "e_attempts": [e[3] for e in events],
            "e_details": [e[4] for e in events],
            "e_final": [e[5] for e in events],
            # Watchers on any replica learn at commit that these users have results (a
            # user none of whose outcomes is written costs a watcher one read).
            "channel": self._notify_channel,
            "notes": notify_statements([str(u) for u in users]) if self._notify_channel else [],
            "cancelled_detail": CANCELLED_BY_CLIENT,
        }

    async def _write_outcomes(
        self, conn: Any, outcomes: list[Outcome], counts: dict[uuid.UUID, int]
    ) -> None:
        rows = [
            {
                "b_id": o.request_id,
                "b_status": o.status,
                "b_output": o.output or None,
                "b_error": clean_text(o.error) or None,
                "b_attempts": o.attempt_count,
                "b_started": o.attempts[-1].started_at if o.attempts else None,
                "b_finished": o.finished_at,
                "b_seq": o.lane_seq,
            }
            for o in outcomes
        ]
        events = [(outcomes[k].request_id, *rest) for k, *rest, _final in _events(outcomes)]
        await conn.execute(
            requests.update()
            .where(requests.c.id == sa.bindparam("b_id"))
            .values(
                status=sa.bindparam("b_status"),
                output=sa.bindparam("b_output"),
                error=sa.bindparam("b_error"),
                attempts=sa.bindparam("b_attempts"),
                started_at=sa.bindparam("b_started"),
                finished_at=sa.bindparam("b_finished"),
                lane_seq=sa.bindparam("b_seq"),
            ),
            rows,
        )
        await conn.execute(
            request_events.insert(),
            [
                {"request_id": e[0], "at": e[1], "status": e[2], "attempt": e[3], "detail": e[4]}
                for e in events
            ],
        )


def _events(outcomes: Sequence[Outcome]) -> list[tuple[int, datetime, str, int, str, bool]]:
    """(outcome index, at, status, attempt, detail, final) of each outcome's log events:
    every attempt's start, then its end."""
    events = [
        (k, a.started_at, status.RUNNING, a.number, clean_text(a.error), False)
        for k, o in enumerate(outcomes)
        for a in o.attempts
    ]
    events += [
        (k, o.finished_at, o.status, o.attempt_count, clean_text(o.error), True)
        for k, o in enumerate(outcomes)
    ]
    return events


def clean_text(text: str) -> str:
    """Text the log can hold: PostgreSQL refuses NUL characters, which a handler's
    exception message may well contain."""
    return text.replace("\x00", "\\x00") if "\x00" in text else text


def _id_range(ids: Sequence[uuid.UUID]) -> dict[str, uuid.UUID]:
    """Bounds of a batch's ids for the statements below. On PostgreSQL the log is split into
    day partitions of the ids (migration 0005); a range on the key lets the planner (or the
    executor, at startup) leave out every day but the batch's own. Without it each statement
    opened every day's partition and indexes: with 39 partitions the worker's writes took
    twice as long. `id = ANY(:ids)` alone prunes nothing, and a join prunes only per row."""
    return {"lo": min(ids), "hi": max(ids)}


# The statements on `requests` carry `id BETWEEN :lo AND :hi`; see _id_range.
_PG_MARK_RUNNING = sa.text(
    """
    UPDATE requests SET status = 'RUNNING', attempts = v.a, started_at = v.t
    FROM unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[]), CAST(:ats AS timestamptz[]))
         AS v(i, a, t)
    WHERE requests.id = v.i AND requests.status IN ('QUEUED', 'RUNNING')
      AND requests.id BETWEEN CAST(:lo AS uuid) AND CAST(:hi AS uuid)
    """
)

# A batch's outcomes in one statement (one round trip), in this order:
# - `cur` locks the requests' rows in id order (as before partitioning) and leaves out those
#   not in the log or finished already (EvalPlanQual re-checks `lane_seq IS NULL` on the
#   newest row after waiting for a lock, so a writer that finished one meanwhile wins);
# - `kept`: of a request twice in the batch (a redelivery ran it again), the first outcome;
# - `ln` numbers each lane's outcomes in batch order, its rows locked in user-id order (the
#   order the queue's intake locks them in, so the two never deadlock); an outcome whose
#   lane row is gone (its user was deleted) drops out here, and comes back with a NULL seq;
# - `fin`: an outcome whose request the client cancelled while it ran becomes CANCELLED
#   (the cancel's answer is the truth: CANCELLED in the log when the log still said
#   QUEUED, cancel_requested when it said RUNNING);
# - the events, the change notification and the request rows.
# A plain SELECT in a WITH runs only if referenced, hence the `nt` check in the WHERE clause
# (an uncorrelated sub-select: evaluated once).
_PG_FINISH = sa.text(
    """
    WITH o AS (
      SELECT * FROM unnest(CAST(:ks AS int[]), CAST(:ids AS uuid[]), CAST(:users AS uuid[]))
             AS o(k, i, u)
    ), cur AS (
      SELECT r.id, r.status, r.cancel_requested
      FROM unnest(CAST(:lock_ids AS uuid[])) AS v(i) JOIN requests AS r ON r.id = v.i
      WHERE r.id BETWEEN CAST(:lo AS uuid) AND CAST(:hi AS uuid) AND r.lane_seq IS NULL
      ORDER BY r.id
      FOR UPDATE OF r
    ), kept AS (
      SELECT DISTINCT ON (o.i) o.k, o.i, o.u,
             CASE WHEN cur.cancel_requested THEN 'CANCELLED' ELSE cur.status END AS was
      FROM o JOIN cur ON cur.id = o.i
      ORDER BY o.i, o.k
    ), numbered AS (
      SELECT k, i, u, was, row_number() OVER (PARTITION BY u ORDER BY k) AS rn
      FROM kept
    ), ln AS (
      UPDATE lanes SET last_seq = lanes.last_seq + v.n
      FROM (
        SELECT l.user_id, c.n
        FROM lanes AS l
        JOIN (SELECT u, count(*) AS n FROM kept GROUP BY u) AS c ON l.user_id = c.u
        ORDER BY l.user_id
        FOR UPDATE OF l
      ) AS v
      WHERE lanes.user_id = v.user_id
      RETURNING lanes.user_id, lanes.last_seq - v.n AS base
    ), fin AS (
      SELECT nb.k, nb.i, ln.base + nb.rn AS seq, (nb.was = 'CANCELLED' AND x.s <> 'CANCELLED')
             AS cancelled, x.s, x.o, x.e, x.a, x.st, x.f
      FROM numbered AS nb
      JOIN ln ON ln.user_id = nb.u
      JOIN unnest(CAST(:ks AS int[]), CAST(:statuses AS text[]), CAST(:outputs AS bytea[]),
                  CAST(:errors AS text[]), CAST(:attempts AS int[]),
                  CAST(:started AS timestamptz[]), CAST(:finished AS timestamptz[]))
           AS x(k, s, o, e, a, st, f) ON x.k = nb.k
    ), ev AS (
      INSERT INTO request_events (request_id, at, status, attempt, detail)
      SELECT fin.i, e.at,
             CASE WHEN e.final AND fin.cancelled THEN 'CANCELLED' ELSE e.s END,
             e.a,
             CASE WHEN e.final AND fin.cancelled THEN CAST(:cancelled_detail AS text)
                  ELSE e.d END
      FROM unnest(CAST(:e_ks AS int[]), CAST(:e_ats AS timestamptz[]),
                  CAST(:e_statuses AS text[]), CAST(:e_attempts AS int[]),
                  CAST(:e_details AS text[]), CAST(:e_final AS boolean[]))
           AS e(k, at, s, a, d, final)
      JOIN fin ON fin.k = e.k
    ), nt AS (
      SELECT pg_notify(CAST(:channel AS text), p) FROM unnest(CAST(:notes AS text[])) AS p
    ), up AS (
      UPDATE requests
      SET status = CASE WHEN fin.cancelled THEN 'CANCELLED' ELSE fin.s END,
          output = CASE WHEN fin.cancelled THEN NULL ELSE fin.o END,
          error = CASE WHEN fin.cancelled THEN CAST(:cancelled_detail AS text) ELSE fin.e END,
          attempts = fin.a, started_at = fin.st, finished_at = fin.f, lane_seq = fin.seq
      FROM fin
      WHERE requests.id = fin.i AND (SELECT count(*) FROM nt) >= 0
        AND requests.id BETWEEN CAST(:lo AS uuid) AND CAST(:hi AS uuid)
      RETURNING fin.k, fin.seq, fin.cancelled
    )
    SELECT k, seq, cancelled FROM up
    UNION ALL
    SELECT k, NULL, NULL FROM kept WHERE NOT EXISTS (SELECT 1 FROM ln WHERE ln.user_id = kept.u)
    """
)
