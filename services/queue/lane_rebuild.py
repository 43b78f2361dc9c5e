"""Puts unfinished requests back in their lanes after the broker lost them.

The embedded broker of `fairlane dev` keeps its lanes in process memory: a restart (a
crash, a SIGTERM, the restart a drained worker asks for) empties them, while the log still
holds their requests QUEUED or RUNNING. Left so, those requests would never run, later
ones would overtake them, and their lane's bound (accepted minus finished) would fill up
for good. So at start the queue service gives every request without a lane_seq (not yet
reached by its lane) an outbox row again, at its old lane position, and the relay publishes
them as it publishes any leftover of a replica that died: marked recovered, so the worker
reads the log first (a RUNNING one counts the attempt it lost; a finished one is re-sent,
not re-run). Requests whose outbox row is still there are left as they are.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from fairlane_server.core.db import write_transaction
from fairlane_server.core.logging import get_logger
from fairlane_server.core.models import lanes, outbox, requests

log = get_logger(__name__)

_CHUNK = 500


@dataclass(frozen=True, slots=True)
class OpenRequest:
    request_id: uuid.UUID
    lane_pos: int | None
    enqueued_at: datetime


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def place(
    first: int, last: int, known: set[int], unplaced: list[OpenRequest]
) -> tuple[list[tuple[OpenRequest, int]], list[OpenRequest]]:
    """Positions for requests accepted before their lane position was logged (migration
    0010): the free ones of first..last, in acceptance-time order. Returns (placed, left),
    `left` being what found no free position (a log that contradicts itself)."""
    free = [pos for pos in range(first, last + 1) if pos not in known]
    ordered = sorted(unplaced, key=lambda o: (o.enqueued_at, o.request_id))
    placed = list(zip(ordered, free, strict=False))
    return placed, ordered[len(placed) :]


async def put_back(engine: AsyncEngine, *, reply_route: str) -> dict[uuid.UUID, int]:
    """Gives every unfinished request without an outbox row one again; returns how many
    per lane. One transaction, so an enqueue cannot take a position meanwhile."""
    restored: dict[uuid.UUID, int] = {}
    async with write_transaction(engine) as conn:
        open_lanes = {
            r.user_id: (r.last_seq, r.accepted)
            for r in await conn.execute(
                sa.select(lanes.c.user_id, lanes.c.last_seq, lanes.c.accepted).where(
                    lanes.c.accepted > lanes.c.last_seq
                )
            )
        }
        if not open_lanes:
            return restored
        queued: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
        taken: dict[uuid.UUID, set[int]] = defaultdict(set)
        for row in await conn.execute(
            sa.select(outbox.c.request_id, outbox.c.user_id, outbox.c.lane_pos)
        ):
            queued[row.user_id].add(row.request_id)
            taken[row.user_id].add(row.lane_pos)
        found: dict[uuid.UUID, list[OpenRequest]] = defaultdict(list)
        users = sorted(open_lanes)
        # By lane, so the (user_id, lane_seq) index finds them, not a scan of the whole log;
        # in chunks that stay under SQLite's limit of bound values.
        for start in range(0, len(users), _CHUNK):
            for req in await conn.execute(
                sa.select(
                    requests.c.id, requests.c.user_id, requests.c.lane_pos, requests.c.enqueued_at
                ).where(
                    requests.c.user_id.in_(users[start : start + _CHUNK]),
                    requests.c.lane_seq.is_(None),
                )
            ):
                if req.id not in queued[req.user_id]:
                    found[req.user_id].append(
                        OpenRequest(req.id, req.lane_pos, _aware(req.enqueued_at))
                    )
        rows: list[dict[str, object]] = []
        for user, items in found.items():
            last_seq, accepted = open_lanes[user]
            known = taken[user] | {o.lane_pos for o in items if o.lane_pos is not None}
            placed = [(o, o.lane_pos) for o in items if o.lane_pos is not None]
            more, left = place(
                last_seq + 1, accepted, known, [o for o in items if o.lane_pos is None]
            )
            placed.extend(more)
            if left:
                log.error(
                    "lane_rebuild_unplaced",
                    lane=str(user),
                    requests=[str(o.request_id) for o in left[:10]],
                    count=len(left),
                )
            for item, pos in placed:
                rows.append(
                    {
                        "request_id": item.request_id,
                        "user_id": user,
                        "lane_pos": pos,
                        "reply_route": reply_route,
                        "traceparent": "",
                        # When it was accepted: the relay's sweep treats it as a leftover.
                        "created_at": item.enqueued_at,
                    }
                )
            if placed:
                restored[user] = len(placed)
        if rows:
            await conn.execute(outbox.insert(), rows)
    return restored
