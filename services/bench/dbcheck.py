"""Cross-checks a run against the request log in PostgreSQL (read-only, SQLAlchemy Core)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine


async def request_log_counts(
    database_url: str, schema: str, run_tag: str
) -> dict[str, dict[str, int]]:
    """user_id -> status -> rows, for the requests of this run (client_ref starts with the tag).

    The bench gives every request the client_ref ``<run_tag>.<lane>.<i>``, so the rows of
    this run are told apart from earlier runs of the same bench users.
    """
    requests = sa.table(
        "requests",
        sa.column("user_id", sa.Uuid),
        sa.column("status", sa.String),
        sa.column("client_ref", sa.String),
        schema=schema or None,
    )
    query = (
        sa.select(requests.c.user_id, requests.c.status, sa.func.count())
        .where(requests.c.client_ref.like(f"{run_tag}.%"))
        .group_by(requests.c.user_id, requests.c.status)
    )
    engine = create_async_engine(database_url, pool_size=1, max_overflow=0)
    counts: dict[str, dict[str, int]] = defaultdict(dict)
    try:
        async with engine.connect() as conn:
            for user_id, status_name, n in (await conn.execute(query)).all():
                counts[str(user_id)][str(status_name)] = int(n)
    finally:
        await engine.dispose()
    return dict(counts)


def compare(counts: dict[str, dict[str, int]], lanes: list[dict[str, Any]]) -> dict[str, Any]:
    """Per lane: SUCCEEDED rows must equal SUCCEEDED results received, and rows (any
    status) must equal requests accepted. Lanes that differ are listed."""
    mismatched = []
    by_status: dict[str, int] = defaultdict(int)
    for per_user in counts.values():
        for status_name, n in per_user.items():
            by_status[status_name] += n
    for lane in lanes:
        rows = counts.get(lane["user_id"], {})
        succeeded = rows.get("SUCCEEDED", 0)
        total = sum(rows.values())
        if succeeded != lane["results_succeeded"] or total != lane["accepted"]:
            mismatched.append(
                {
                    "lane": lane["lane"],
                    "user": lane["user"],
                    "rows": dict(rows),
                    "accepted": lane["accepted"],
                    "results_succeeded": lane["results_succeeded"],
                }
            )
    return {
        "checked": True,
        "rows_by_status": dict(by_status),
        "mismatched_lanes": mismatched,
        "ok": not mismatched,
    }
