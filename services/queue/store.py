"""The request log as the queue service reads and writes it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core import dberrors, status
from fairlane_server.core.db import one_statement, upsert
from fairlane_server.core.models import (
    handlers,
    idempotency_keys,
    lanes,
    outbox,
    request_events,
    requests,
)


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
                            status, attempts, max_attempts, enqueued_at, deadline, trace_id)
      SELECT id, uid, h, p, key, c, 'QUEUED', 0, m, e, d, t FROM v
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


_UUID_ARRAY = postgresql.ARRAY(sa.Uuid)

# Implied by QUEUED and RUNNING (a request gets its lane_seq when it finishes), and said
# so the planner can use the small partial index of unfinished requests
# (ix_requests_unsequenced) instead of reading every day's (user_id, status) index.
_UNSEQUENCED = requests.c.lane_seq.is_(None)


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    name: str
    max_attempts: int


RESULT_COLUMNS = (
    requests.c.id,
    requests.c.lane_seq,
    requests.c.status,
    requests.c.output,
    requests.c.error,
    requests.c.attempts,
    requests.c.client_ref,
    requests.c.handler,
)

# Bytes of outputs one read of results loads at most (or its first output alone, when that
# is larger; an output is at most FAIRLANE_MAX_OUTPUT_BYTES). Results are read by pages of
# FAIRLANE_RESULTS_PAGE_SIZE, and a page of 1000 results of 1 MiB was 1 GB loaded at once
# for a WatchResults from 0, 32 of them per user and replica.
RESULT_READ_BYTES = 4 * 1024 * 1024

# An output's size, read without reading the output: on PostgreSQL length() of a TOASTed
# bytea reads its header, on SQLite length() of a blob the record's header.
_OUTPUT_SIZE = sa.func.coalesce(sa.func.length(requests.c.output), 0)


@dataclass(slots=True)
class ResultPage:
    """Results read from the log in lane_seq order, and whether more may follow them: the
    read stopped at its count or its bytes (it may then be the last one all the same). A
    page short of its count is not the end when `more` says so."""

    rows: list[Any]
    more: bool


def _running(size: Any, order: Any) -> tuple[Any, Any]:
    """`total`, the sizes summed up to each row in `order` (its own included), and `nth`,
    its rank: a read keeps the rows with total <= its bytes, and the first whatever its
    size. One window, so PostgreSQL computes both in one pass."""
    return (
        sa.func.sum(size).over(order_by=order, rows=(None, 0)).label("total"),
        sa.func.row_number().over(order_by=order, rows=(None, 0)).label("nth"),
    )


def _in_turn(asks: Sequence[tuple[uuid.UUID, Sequence[uuid.UUID]]]) -> list[uuid.UUID]:
    """The ids of the asks, each once, taken in turn: the first of every ask, then the
    second of every ask, and so on (the order in which a read gives outputs its bytes)."""
    seen: dict[uuid.UUID, None] = {}
    longest = max((len(wanted) for _, wanted in asks), default=0)
    for k in range(longest):
        for _, wanted in asks:
            if k < len(wanted):
                seen.setdefault(wanted[k], None)
    return list(seen)


def _results_after(postgres: bool, *, upto: bool, read_bytes: int) -> Any:
    """RequestStore.results_after's statement (parameters user_id, after, limit and, with
    `upto`, upto): the count's page numbered with a running total of its outputs' sizes,
    of which the rows whose total (theirs included) is within the bound are kept, and the
    first. Each row has `counted`, the rows of the count's page."""
    r = requests.c
    where = [
        r.user_id == sa.bindparam("user_id", type_=sa.Uuid),
        r.lane_seq > sa.bindparam("after"),
    ]
    if upto:
        where.append(r.lane_seq < sa.bindparam("upto"))
    # PostgreSQL passes the outputs of the page through as TOAST pointers, read (when sent)
    # only for the rows kept. SQLite would copy every output of the page into the window's
    # buffer, so there the page is ids and sizes (from the index on (user_id, lane_seq)
    # and the records' headers) and the rows kept are read again.
    columns = (*RESULT_COLUMNS,) if postgres else (r.id, r.lane_seq)
    page = (
        sa.select(*columns, _OUTPUT_SIZE.label("size"))
        .where(*where)
        .order_by(r.lane_seq)
        .limit(sa.bindparam("limit", type_=sa.Integer))
        .subquery("page")
    )
    summed = sa.select(
        page, *_running(page.c.size, page.c.lane_seq), sa.func.count().over().label("counted")
    ).subquery("summed")
    kept = sa.or_(summed.c.total <= read_bytes, summed.c.nth == 1)
    if postgres:
        query = sa.select(*(summed.c[c.name] for c in RESULT_COLUMNS), summed.c.counted)
    else:
        query = sa.select(*RESULT_COLUMNS, summed.c.counted).select_from(
            summed.join(requests, r.id == summed.c.id)
        )
    return query.where(kept).order_by(summed.c.lane_seq)


def _finished_of(postgres: bool, *, read_bytes: int) -> Any:
    """RequestStore.finished_of's statement (parameter ids: a uuid array on PostgreSQL, a
    JSON array of ids as stored on SQLite), in the order of which the outputs are read."""
    r = requests.c
    if postgres:
        # One array parameter: one prepared statement whatever the number of ids. The
        # rows are found by `id = ANY` as before; the ids' order comes from the same array.
        ids = sa.bindparam("ids", type_=_UUID_ARRAY)
        asked = (
            sa.func.unnest(ids)
            .table_valued(sa.column("id", sa.Uuid), with_ordinality="ord")
            .render_derived(name="asked")
        )
        found = (
            sa.select(*RESULT_COLUMNS, r.user_id, _OUTPUT_SIZE.label("size"), asked.c.ord)
            .join_from(requests, asked, asked.c.id == r.id)
            .where(r.id == sa.any_(ids), r.lane_seq.is_not(None))
        )
    else:
        # One JSON parameter rather than one per id (SQLite's older builds allow 999). Only
        # the columns needed to number the rows: a record's columns after its output
        # (lane_seq is one) are reached through the output's overflow pages.
        asked = sa.func.json_each(sa.bindparam("ids", type_=sa.String)).table_valued("key", "value")
        found = (
            sa.select(r.id, r.user_id, r.lane_seq, _OUTPUT_SIZE.label("size"))
            .add_columns(asked.c.key.label("ord"))
            .join_from(asked, requests, r.id == asked.c.value)
            .where(r.lane_seq.is_not(None))
        )
    inner = found.subquery("found")
    summed = sa.select(inner, *_running(inner.c.size, inner.c.ord)).subquery("summed")
    # An empty output has nothing to leave out: such a row always comes whole.
    kept = sa.or_(summed.c.total <= read_bytes, summed.c.nth == 1, summed.c.size == 0)
    output = sa.case((kept, summed.c.output if postgres else r.output)).label("output")
    tail = (summed.c.user_id, summed.c.size, sa.not_(kept).label("withheld"))
    if postgres:
        return sa.select(
            *(output if c.name == "output" else summed.c[c.name] for c in RESULT_COLUMNS), *tail
        )
    # The rest of a kept row, from the log again; a withheld row is not read.
    return sa.select(
        *(output if c.name == "output" else summed.c.get(c.name, c) for c in RESULT_COLUMNS),
        *tail,
    ).select_from(summed.outerjoin(requests, sa.and_(r.id == summed.c.id, kept)))


class RequestStore:
    def __init__(self, engine: AsyncEngine, *, read_bytes: int | None = None) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        # The outputs one read of results loads at most (RESULT_READ_BYTES unless told).
        self.read_bytes = read_bytes if read_bytes is not None else RESULT_READ_BYTES
        if self.read_bytes <= 0:
            raise ValueError("read_bytes must be positive")
        # How SQLite stores an id (SQLAlchemy's Uuid on a database without a uuid type).
        self._id_text = requests.c.id.type.bind_processor(engine.dialect)
        postgres = self._dialect == "postgresql"
        self._results_after = {
            upto: _results_after(postgres, upto=upto, read_bytes=self.read_bytes)
            for upto in (False, True)
        }
        self._finished_of = _finished_of(postgres, read_bytes=self.read_bytes)
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
                    raise CommitUnknown(exc, kept, refused, unknown) from exc
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

    async def handler_specs(self) -> dict[str, HandlerSpec]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(sa.select(handlers.c.name, handlers.c.max_attempts))
            return {r.name: HandlerSpec(r.name, r.max_attempts) for r in rows}

    async def get(self, user_id: uuid.UUID, request_id: uuid.UUID) -> Any:
        async with one_statement(self._engine) as conn:
            return (
                await conn.execute(
                    sa.select(requests).where(
                        requests.c.id == request_id, requests.c.user_id == user_id
                    )
                )
            ).first()

    async def list_requests(
        self,
        user_id: uuid.UUID,
        *,
        status_name: str | None,
        limit: int,
        before: uuid.UUID | None,
    ) -> list[Any]:
        """A page of the user's requests, newest first, without payloads and outputs."""
        columns = [c for c in requests.c if c.name not in ("payload", "output")]
        query = sa.select(*columns).where(requests.c.user_id == user_id)
        if status_name:
            query = query.where(requests.c.status == status_name)
        if before is not None:
            query = query.where(requests.c.id < before)
        query = query.order_by(requests.c.id.desc()).limit(limit)
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def list_requests_with_bodies(
        self,
        user_id: uuid.UUID,
        *,
        status_name: str | None,
        limit: int,
        before: uuid.UUID | None,
        max_bytes: int,
    ) -> tuple[list[Any], bool]:
        """Like list_requests with payloads and outputs, but loading at most `max_bytes` of
        them (or the first row alone, when it is larger), and whether more rows may follow.
        The sizes are read first, without the bodies: a page of 500 dead requests of 1 MiB
        was 500 MB loaded at once, and cut to 4 MiB only afterwards."""
        r = requests.c
        size = sa.func.length(r.payload) + sa.func.coalesce(sa.func.length(r.output), 0)
        where = [r.user_id == user_id]
        if status_name:
            where.append(r.status == status_name)
        if before is not None:
            where.append(r.id < before)
        sized = sa.select(r.id, size.label("size")).where(*where).order_by(r.id.desc()).limit(limit)
        async with self._engine.connect() as conn:
            sizes = (await conn.execute(sized)).all()
            kept: list[uuid.UUID] = []
            total = 0
            for row in sizes:
                total += row.size or 0
                if kept and total > max_bytes:
                    break
                kept.append(row.id)
            if not kept:
                return [], False
            rows = (
                await conn.execute(sa.select(requests).where(r.id.in_(kept)).order_by(r.id.desc()))
            ).all()
        return list(rows), len(sizes) == limit or len(kept) < len(sizes)

    async def results_after(
        self, user_id: uuid.UUID, after: int, *, upto: int | None = None, limit: int = 1000
    ) -> ResultPage:
        """The user's results with after < lane_seq (< upto), in lane_seq order, rows of
        RESULT_COLUMNS: at most `limit` of them, and no more than `read_bytes` of outputs
        unless the first alone is more (it then comes alone). One statement, which does
        not read the outputs of the results past the bound."""
        params: dict[str, Any] = {"user_id": user_id, "after": after, "limit": limit}
        if upto is not None:
            params["upto"] = upto
        async with one_statement(self._engine) as conn:
            rows = list((await conn.execute(self._results_after[upto is not None], params)).all())
        counted = rows[0].counted if rows else 0
        return ResultPage(rows, more=counted >= limit or len(rows) < counted)

    async def finished_of(self, asks: Sequence[tuple[uuid.UUID, Sequence[uuid.UUID]]]) -> list[Any]:
        """The finished (sequenced) requests among those of several users' asks, in one
        statement: rows of RESULT_COLUMNS, user_id, size (of the output, in bytes) and
        withheld, in no particular order. A row is found by its id alone; callers match it
        to the user who asked.

        Outputs are read up to `read_bytes` in all, the asks taking turns (the first id of
        each, then the second of each...), and the first output always, whatever its size.
        Past that a row with an output is `withheld`: it comes without its output (None),
        and on SQLite with only its id, user_id, lane_seq and size; the caller reads its
        output later."""
        ids = _in_turn(asks)
        if not ids:
            return []
        if self._dialect == "postgresql":
            param: Any = ids
        else:
            param = json.dumps([self._id_text(i) if self._id_text else str(i) for i in ids])
        async with one_statement(self._engine) as conn:
            return list((await conn.execute(self._finished_of, {"ids": param})).all())

    async def cancel_queued(self, user_id: uuid.UUID, request_id: uuid.UUID) -> str | None:
        """Marks a QUEUED request CANCELLED, a RUNNING one cancel_requested; returns the
        status it has afterwards."""
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
            updated = await conn.execute(
                requests.update()
                .where(
                    requests.c.id == request_id,
                    requests.c.user_id == user_id,
                    requests.c.status == status.QUEUED,
                )
                .values(status=status.CANCELLED, finished_at=now, error="cancelled by the client")
            )
            if updated.rowcount:
                await conn.execute(
                    request_events.insert().values(
                        request_id=request_id, at=now, status=status.CANCELLED
                    )
                )
                return status.CANCELLED
            running = await conn.execute(
                requests.update()
                .where(
                    requests.c.id == request_id,
                    requests.c.user_id == user_id,
                    requests.c.status == status.RUNNING,
                    requests.c.lane_seq.is_(None),
                )
                .values(cancel_requested=True)
            )
            if running.rowcount:
                # Kept in the log, not only sent to the worker running it: a worker that
                # dies meanwhile leaves it to the next, which must not run it again.
                return status.RUNNING
            current = await conn.execute(
                sa.select(requests.c.status).where(
                    requests.c.id == request_id, requests.c.user_id == user_id
                )
            )
            return current.scalar_one_or_none()

    async def lane(self, user_id: uuid.UUID) -> tuple[Any, int] | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(lanes).where(lanes.c.user_id == user_id))).first()
            if row is None:
                return None
            pending = (
                await conn.execute(
                    sa.select(sa.func.count()).where(
                        requests.c.user_id == user_id,
                        requests.c.status.in_([status.QUEUED, status.RUNNING]),
                        _UNSEQUENCED,
                    )
                )
            ).scalar_one()
            return row, int(pending)

    def _pending_exists(self) -> Any:
        return (
            sa.select(requests.c.id)
            .where(
                requests.c.user_id == lanes.c.user_id,
                requests.c.status.in_([status.QUEUED, status.RUNNING]),
                _UNSEQUENCED,
            )
            .exists()
        )

    async def lanes(self, *, after: uuid.UUID | None, limit: int, idle_seconds: float) -> list[Any]:
        """Live lanes: active within `idle_seconds` or with requests still pending."""
        cutoff = datetime.now(UTC) - timedelta(seconds=idle_seconds)
        query = (
            sa.select(lanes)
            .where(sa.or_(lanes.c.last_active_at > cutoff, self._pending_exists()))
            .order_by(lanes.c.user_id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(lanes.c.user_id > after)
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def idle_lanes(self, idle_seconds: float, limit: int = 100) -> list[uuid.UUID]:
        cutoff = datetime.now(UTC) - timedelta(seconds=idle_seconds)
        query = (
            sa.select(lanes.c.user_id)
            .where(lanes.c.last_active_at <= cutoff, ~self._pending_exists())
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def queued_depth(self) -> tuple[int, int]:
        """(deepest lane, all lanes) in QUEUED requests."""
        per_lane = (
            sa.select(sa.func.count().label("n"))
            .where(requests.c.status == status.QUEUED, _UNSEQUENCED)
            .group_by(requests.c.user_id)
            .subquery()
        )
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(sa.select(sa.func.max(per_lane.c.n), sa.func.sum(per_lane.c.n)))
            ).one()
        return int(row[0] or 0), int(row[1] or 0)

    async def touch_lanes(self, users: list[uuid.UUID]) -> None:
        if not users:
            return
        async with self._engine.begin() as conn:
            await conn.execute(
                lanes.update()
                .where(lanes.c.user_id.in_(users))
                .values(last_active_at=datetime.now(UTC))
            )
