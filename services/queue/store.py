"""The request log as the queue service reads it (results, listings, lanes) and changes
it outside the intake (cancels, lane activity). The intake's writes are in
accept_store.py."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core import status
from fairlane_server.core.db import one_statement
from fairlane_server.core.models import (
    handlers,
    lanes,
    request_events,
    requests,
)

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

    @property
    def dialect(self) -> str:
        return self._dialect

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
        """Live lanes: active within `idle_seconds` or with requests still pending; and every
        paused lane, idle or not, so that every worker replica learns of its pause (and one
        that is not listed paused is not paused)."""
        cutoff = datetime.now(UTC) - timedelta(seconds=idle_seconds)
        query = (
            sa.select(lanes)
            .where(
                sa.or_(
                    lanes.c.last_active_at > cutoff,
                    lanes.c.paused_at.is_not(None),
                    self._pending_exists(),
                )
            )
            .order_by(lanes.c.user_id)
            .limit(limit)
        )
        if after is not None:
            query = query.where(lanes.c.user_id > after)
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).all())

    async def idle_lanes(self, idle_seconds: float, limit: int = 100) -> list[uuid.UUID]:
        """Lanes idle for `idle_seconds` with nothing pending; a paused lane is never idle."""
        cutoff = datetime.now(UTC) - timedelta(seconds=idle_seconds)
        query = (
            sa.select(lanes.c.user_id)
            .where(
                lanes.c.last_active_at <= cutoff,
                lanes.c.paused_at.is_(None),
                ~self._pending_exists(),
            )
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
