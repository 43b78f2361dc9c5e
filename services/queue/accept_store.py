"""The intake's writes to the request log: a batch of new requests, all or nothing.

On PostgreSQL a batch is one statement that is its own transaction (`_PG_ACCEPT`: the
lanes' locks, each request's lane position and every row), on SQLite one transaction of
a few statements. Each request is accepted, or refused because its lane is full; an
answer lost in flight raises CommitUnknown, for the intake to read the log and find out.
What the queue service reads from the log is in store.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core import dberrors, status
from fairlane_server.core.db import one_statement, upsert
from fairlane_server.core.models import idempotency_keys, lanes, outbox, request_events, requests


@dataclass(slots=True)
class NewRequest:
    id: uuid.UUID
    user_id: uuid.UUID
    handler: str
    payload: bytes
    idempotency_key: str | None
    client_ref: str
    max_attempts: int
    deadline: datetime | None
    trace_id: str
    enqueued_at: datetime


class Pending(Protocol):
    """A request on its way into the log, with what its lane message needs besides."""

    @property
    def request(self) -> NewRequest: ...
    @property
    def reply_route(self) -> str: ...
    @property
    def traceparent(self) -> str: ...


@dataclass(slots=True)
class OutboxItem:
    """An accepted request that its lane message has not carried yet."""

    request_id: uuid.UUID
    user_id: uuid.UUID
    lane_pos: int
    reply_route: str
    traceparent: str
    handler: str
    payload: bytes
    max_attempts: int
    deadline: datetime | None
    client_ref: str
    created_at: datetime
    # Read back from the outbox rather than handed over by this replica's intake: it may
    # have been published before (by a replica that died before deleting its row), so the
    # worker checks the log before running it.
    recovered: bool = False
    # When this replica's relay took it over (perf_counter), for the relay stage's metric.
    handed_at: float = 0.0


def _outbox_item(p: Pending, lane_pos: int) -> OutboxItem:
    r = p.request
    return OutboxItem(
        request_id=r.id,
        user_id=r.user_id,
        lane_pos=lane_pos,
        reply_route=p.reply_route,
        traceparent=p.traceparent,
        handler=r.handler,
        payload=r.payload,
        max_attempts=r.max_attempts,
        deadline=r.deadline,
        client_ref=r.client_ref,
        created_at=r.enqueued_at,
    )


class PartlyStored(Exception):
    """The second statement of an accept (for lanes created after the first one's
    snapshot) was refused by the database, an answer that says it stored nothing: `kept`
    and `refused` are the first statement's, committed; `failed` were not stored. One
    item's fault (an idempotency key another replica stored meanwhile) must not fail the
    others: the caller writes `failed` again, on their own."""

    def __init__(
        self, cause: BaseException, kept: list[OutboxItem], refused: list[Any], failed: list[Any]
    ) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.kept = kept
        self.refused = refused
        self.failed = failed


class CommitUnknown(Exception):
    """A write's answer was lost in flight: it may or may not have been committed.

    `unplaced` is None after a transaction's COMMIT failed: `kept` and `refused` are what
    it accepted and refused, if it committed. Otherwise a statement that is its own
    transaction lost its answer: `kept` and `refused` are certain (earlier statements of
    the same accept, committed), and each of `unplaced` is in the log or not; one that is
    was accepted, and its outbox row waits for a relay."""

    def __init__(
        self,
        cause: BaseException,
        kept: list[OutboxItem],
        refused: list[Any],
        unplaced: list[Any] | None = None,
    ) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.kept = kept
        self.refused = refused
        self.unplaced = unplaced


# Lanes are created if missing and locked in user-id order (ORDER BY feeds the upsert in
# that order): the worker locks lane rows in the same order, so the two never deadlock.
_PG_LOCK_LANES = sa.text(
    """
    INSERT INTO lanes (user_id, created_at, last_active_at, last_seq, accepted)
    SELECT u, :now, :now, 0, 0 FROM unnest(CAST(:users AS uuid[])) AS u ORDER BY u
    ON CONFLICT (user_id) DO UPDATE SET last_active_at = EXCLUDED.last_active_at
    RETURNING user_id, accepted, last_seq
    """
)

# A whole batch in one statement, whatever its size, in this order:
# - `fresh` creates the lanes seen for the first time, their first requests counted;
# - `held` locks the others in user-id order (the worker locks lane rows in the same order,
#   so the two never deadlock); EvalPlanQual hands it the newest version of a row it had to
#   wait for, so another replica's accepts just committed are counted;
# - `placed` gives each request its lane position, and says whether its lane had room
#   (`lane_limit` unfinished requests at most: accepted minus finished);
# - the lanes' counts, and the rows of the requests that fit: request, QUEUED event,
#   idempotency key, outbox.
# A lane created by another transaction after this statement began is in neither `fresh`
# nor `held`: its requests are left out of the answer, for the caller to run again.
# A key another transaction holds makes the statement fail (the intake then finds the
# request that holds it); one still uncommitted makes it wait for that outcome.
_PG_ACCEPT = sa.text(
    """
    WITH x AS (
      SELECT * FROM unnest(CAST(:ks AS int[]), CAST(:users AS uuid[])) AS x(k, u)
    ), asked AS (
      SELECT u, count(*) AS n FROM x GROUP BY u
    ), fresh AS (
      INSERT INTO lanes (user_id, created_at, last_active_at, last_seq, accepted)
      SELECT u, :now, :now, 0, LEAST(n, CAST(:lane_limit AS bigint)) FROM asked ORDER BY u
      ON CONFLICT (user_id) DO NOTHING
      RETURNING user_id, CAST(0 AS bigint) AS accepted, CAST(0 AS bigint) AS last_seq
    ), held AS (
      SELECT l.user_id, l.accepted, l.last_seq
      FROM lanes AS l
      WHERE l.user_id IN (SELECT u FROM asked)
      ORDER BY l.user_id
      FOR UPDATE
    ), cur AS (
      SELECT * FROM fresh UNION ALL SELECT * FROM held
    ), placed AS (
      SELECT x.k, x.u, cur.accepted + row_number() OVER w AS pos,
             row_number() OVER w
               <= GREATEST(0, CAST(:lane_limit AS bigint) - (cur.accepted - cur.last_seq))
             AS fits
      FROM x JOIN cur ON cur.user_id = x.u
      WINDOW w AS (PARTITION BY x.u ORDER BY x.k)
    ), kept AS (
      SELECT k, pos FROM placed WHERE fits
    ), counted AS (
      UPDATE lanes SET accepted = lanes.accepted + c.n, last_active_at = :now
      FROM (
        SELECT held.user_id, count(kept.k) AS n
        FROM held LEFT JOIN placed ON placed.u = held.user_id
                  LEFT JOIN kept ON kept.k = placed.k
        GROUP BY held.user_id
      ) AS c
      WHERE lanes.user_id = c.user_id
    ), v AS (
      SELECT y.*, kept.pos
      FROM unnest(CAST(:ks AS int[]), CAST(:ids AS uuid[]), CAST(:users AS uuid[]),
                  CAST(:handlers AS text[]), CAST(:payloads AS bytea[]),
                  CAST(:keys AS text[]), CAST(:refs AS text[]), CAST(:max_attempts AS int[]),
                  CAST(:enqueued AS timestamptz[]), CAST(:deadlines AS timestamptz[]),
                  CAST(:traces AS text[]), CAST(:routes AS text[]), CAST(:parents AS text[]))
           AS y(k, id, uid, h, p, key, c, m, e, d, t, route, parent)
      JOIN kept ON kept.k = y.k
    ), r AS (
      INSERT INTO requests (id, user_id, handler, payload, idempotency_key, client_ref,
                            status, attempts, max_attempts, enqueued_at, deadline, trace_id,
                            lane_pos)
      SELECT id, uid, h, p, key, c, 'QUEUED', 0, m, e, d, t, pos FROM v
      RETURNING id, enqueued_at
    ), ev AS (
      INSERT INTO request_events (request_id, at, status, attempt, detail)
      SELECT id, enqueued_at, 'QUEUED', 0, '' FROM r
    ), ik AS (
      INSERT INTO idempotency_keys (user_id, idempotency_key, request_id)
      SELECT uid, key, id FROM v WHERE key IS NOT NULL
    ), ob AS (
      INSERT INTO outbox (request_id, user_id, lane_pos, reply_route, traceparent, created_at)
      SELECT id, uid, pos, route, parent, e FROM v
    )
    SELECT k, CASE WHEN fits THEN pos END AS pos FROM placed
    """
)


def _outcome(
    batch: Sequence[Pending], placed: dict[int, int | None]
) -> tuple[list[OutboxItem], list[Pending]]:
    """(accepted items in lane order, refused requests) from each placed k's position,
    or None for no room."""
    kept = sorted(
        (_outbox_item(batch[k], pos) for k, pos in placed.items() if pos is not None),
        key=lambda i: (i.user_id, i.lane_pos),
    )
    return kept, [batch[k] for k, pos in sorted(placed.items()) if pos is None]


class AcceptStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        # Built once: a statement built per call costs compile time on the hot path.
        lane_upsert = upsert(self._dialect, lanes)
        self._touch_lane = lane_upsert.on_conflict_do_update(
            index_elements=[lanes.c.user_id],
            set_={"last_active_at": lane_upsert.excluded.last_active_at},
        )

    @property
    def dialect(self) -> str:
        return self._dialect

    async def find_idempotent(
        self, keys: Sequence[tuple[uuid.UUID, str]]
    ) -> dict[tuple[uuid.UUID, str], uuid.UUID]:
        if not keys:
            return {}
        async with one_statement(self._engine) as conn:
            k = idempotency_keys.c
            rows = await conn.execute(
                sa.select(k.user_id, k.idempotency_key, k.request_id).where(
                    sa.tuple_(k.user_id, k.idempotency_key).in_(list(keys))
                )
            )
            return {(r.user_id, r.idempotency_key): r.request_id for r in rows}

    async def accept(
        self, batch: Sequence[Pending], *, lane_limit: int
    ) -> tuple[list[OutboxItem], list[Pending]]:
        """Stores a batch all or nothing (one statement on PostgreSQL, one transaction on
        SQLite): request rows, QUEUED events, outbox rows and each lane's acceptance count.
        Returns (accepted items in lane order, requests refused because their lane already
        holds `lane_limit` unfinished requests).

        The lane rows are locked in user-id order (the worker locks them in the same
        order), and give each accepted request its lane position. Raises CommitUnknown when
        the answer was lost in flight, so the caller can find out what happened.
        """
        now = datetime.now(UTC)
        for p in batch:
            if p.request.id.version != 7:
                # The log is partitioned by the time in the id (see migration 0005).
                raise ValueError(f"request id {p.request.id} is not a UUIDv7")
        if self._dialect == "postgresql":
            return await self._accept_placed(batch, lane_limit, now)
        by_lane: dict[uuid.UUID, list[Pending]] = {}
        for p in batch:
            by_lane.setdefault(p.request.user_id, []).append(p)
        users = sorted(by_lane)
        async with self._engine.connect() as conn:
            tx = await conn.begin()
            counts = await self._lock_lanes(conn, users, now)
            kept: list[OutboxItem] = []
            refused: list[Pending] = []
            added: dict[uuid.UUID, int] = {}
            for user in users:
                accepted, finished = counts[user]
                room = max(0, lane_limit - (accepted - finished))
                lane = by_lane[user]
                refused.extend(lane[room:])
                for offset, p in enumerate(lane[:room]):
                    kept.append(_outbox_item(p, accepted + offset + 1))
                if lane[:room]:
                    added[user] = len(lane[:room])
            if kept:
                await self._write(conn, kept, {i.request_id: i for i in kept}, batch, added)
            try:
                await tx.commit()
            except Exception as exc:
                # It may have happened: the caller reads the log to find out.
                raise CommitUnknown(exc, kept, refused) from exc
        return kept, refused

    async def _accept_placed(
        self, batch: Sequence[Pending], lane_limit: int, now: datetime
    ) -> tuple[list[OutboxItem], list[Pending]]:
        """PostgreSQL: the lanes' locks, the room and positions, and every row in one
        statement (_PG_ACCEPT) that is its own transaction: one round trip, the lanes
        locked only while it runs. (Inside BEGIN and COMMIT it took three, the lanes
        locked until COMMIT arrived.)"""
        placed: dict[int, int | None] = {}
        ks = range(len(batch))
        async with one_statement(self._engine) as conn:
            try:
                placed.update(await self._place(conn, batch, ks, lane_limit, now))
            except Exception as exc:
                if dberrors.answer_lost(exc):
                    raise CommitUnknown(exc, [], [], list(batch)) from exc
                raise  # the server said no: nothing was written
            missing = [k for k in ks if k not in placed]
            if missing:
                # Their lanes were created (or deleted) by another transaction after the
                # statement's snapshot was taken, so it neither saw them nor could create
                # them. Created here, they are there for a second statement. What the
                # first one placed is committed: whatever happens to the second, the
                # caller must know it (an error here leaves `missing` unknown, and the
                # caller reads the log for them).
                try:
                    placed.update(await self._place_missing(conn, batch, missing, lane_limit, now))
                except Exception as exc:
                    kept, refused = _outcome(batch, placed)
                    unknown = [batch[k] for k in missing if k not in placed]
                    if dberrors.answer_lost(exc):
                        raise CommitUnknown(exc, kept, refused, unknown) from exc
                    raise PartlyStored(exc, kept, refused, unknown) from exc
        return _outcome(batch, placed)

    async def _place_missing(
        self,
        conn: Any,
        batch: Sequence[Pending],
        missing: list[int],
        lane_limit: int,
        now: datetime,
    ) -> dict[int, int | None]:
        """Creates the lanes of batch[k] for k in `missing`, then places them."""
        users = sorted({batch[k].request.user_id for k in missing})
        await conn.execute(_PG_LOCK_LANES, {"users": users, "now": now})
        placed = await self._place(conn, batch, missing, lane_limit, now)
        if any(k not in placed for k in missing):
            raise RuntimeError("a created lane was not found by the accept statement")
        return placed

    async def _place(
        self,
        conn: Any,
        batch: Sequence[Pending],
        ks: Sequence[int],
        lane_limit: int,
        now: datetime,
    ) -> dict[int, int | None]:
        """Runs _PG_ACCEPT for batch[k] for k in ks: {k: its lane position, or None when
        its lane had no room}. A k left out had no lane the statement could see."""
        ks = list(ks)
        requests_ = [batch[k].request for k in ks]
        rows = await conn.execute(
            _PG_ACCEPT,
            {
                "ks": ks,
                "ids": [r.id for r in requests_],
                "users": [r.user_id for r in requests_],
                "handlers": [r.handler for r in requests_],
                "payloads": [r.payload for r in requests_],
                "keys": [r.idempotency_key for r in requests_],
                "refs": [r.client_ref for r in requests_],
                "max_attempts": [r.max_attempts for r in requests_],
                "enqueued": [r.enqueued_at for r in requests_],
                "deadlines": [r.deadline for r in requests_],
                "traces": [r.trace_id for r in requests_],
                "routes": [batch[k].reply_route for k in ks],
                "parents": [batch[k].traceparent for k in ks],
                "lane_limit": lane_limit,
                "now": now,
            },
        )
        return {int(k): pos for k, pos in rows}

    async def _lock_lanes(
        self, conn: Any, users: list[uuid.UUID], now: datetime
    ) -> dict[uuid.UUID, tuple[int, int]]:
        """SQLite: creates missing lanes; (accepted, last_seq) per lane. The first upsert
        takes the database's write lock, which keeps every other writer out until commit."""
        out: dict[uuid.UUID, tuple[int, int]] = {}
        for user in users:
            row = (
                await conn.execute(
                    self._touch_lane.returning(lanes.c.accepted, lanes.c.last_seq),
                    {
                        "user_id": user,
                        "created_at": now,
                        "last_active_at": now,
                        "last_seq": 0,
                        "accepted": 0,
                    },
                )
            ).one()
            out[user] = (row.accepted, row.last_seq)
        return out

    async def _write(
        self,
        conn: Any,
        items: list[OutboxItem],
        by_id: dict[uuid.UUID, OutboxItem],
        batch: Sequence[Pending],
        added: dict[uuid.UUID, int],
    ) -> None:
        requests_ = [p.request for p in batch if p.request.id in by_id]
        await conn.execute(
            requests.insert(),
            [
                {
                    "id": r.id,
                    "lane_pos": by_id[r.id].lane_pos,
                    "user_id": r.user_id,
                    "handler": r.handler,
                    "payload": r.payload,
                    "idempotency_key": r.idempotency_key,
                    "client_ref": r.client_ref,
                    "status": status.QUEUED,
                    "attempts": 0,
                    "max_attempts": r.max_attempts,
                    "enqueued_at": r.enqueued_at,
                    "deadline": r.deadline,
                    "trace_id": r.trace_id,
                }
                for r in requests_
            ],
        )
        await conn.execute(
            request_events.insert(),
            [{"request_id": r.id, "at": r.enqueued_at, "status": status.QUEUED} for r in requests_],
        )
        keyed = [
            {"user_id": r.user_id, "idempotency_key": r.idempotency_key, "request_id": r.id}
            for r in requests_
            if r.idempotency_key is not None
        ]
        if keyed:
            await conn.execute(idempotency_keys.insert(), keyed)
        await conn.execute(
            outbox.insert(),
            [
                {
                    "request_id": i.request_id,
                    "user_id": i.user_id,
                    "lane_pos": i.lane_pos,
                    "reply_route": i.reply_route,
                    "traceparent": i.traceparent,
                    "created_at": i.created_at,
                }
                for i in items
            ],
        )
        for user, n in added.items():
            await conn.execute(
                lanes.update().where(lanes.c.user_id == user).values(accepted=lanes.c.accepted + n)
            )

    async def stored(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these requests are in the log (after a commit whose outcome is unknown)."""
        if not ids:
            return set()
        async with one_statement(self._engine) as conn:
            rows = await conn.execute(sa.select(requests.c.id).where(requests.c.id.in_(list(ids))))
            return set(rows.scalars())
