"""Fills a request log with finished requests made by SQL (generate_series), for benchmarks.

    .venv/bin/python scripts/prefill_log.py --schema bench_xxx --requests 10000000 --days 31

Writes `--requests` SUCCEEDED requests of `--users` made-up users, spread evenly over the
`--days` UTC days before today, each with the three events a real one has (QUEUED, RUNNING,
SUCCEEDED), into day partitions as a log in steady state has them. Made for a bench schema
(scripts/bench_suite.sh up) before its first bench: the migration's initial partition
(everything before tomorrow) must still be empty; it is replaced by day partitions. Ends
with VACUUM ANALYZE, so the planner and the visibility map know the data, as they would
for days-old partitions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from fairlane_server.core.db import create_engine
from fairlane_server.queue.retention_store import DAY_MS, RetentionStore, day_bound, day_of

_REQUESTS = """
INSERT INTO requests (id, user_id, handler, payload, idempotency_key, client_ref, status,
                      attempts, max_attempts, output, error, lane_seq, enqueued_at,
                      started_at, finished_at, deadline, trace_id)
SELECT (lpad(to_hex(t.ms), 12, '0') || '7' || substr(h, 1, 3) || '8' || substr(h, 4, 15))::uuid,
       (md5('prefill-user-' || (g % CAST(:users AS bigint))))::uuid, 'noop',
       '\\x00000000'::bytea, NULL, 'prefill.' || g, 'SUCCEEDED', 1, 3, '\\x00000000'::bytea,
       NULL, g / CAST(:users AS bigint) + 1,
       t.at, t.at, t.at + interval '2 milliseconds', NULL, h
FROM generate_series(CAST(0 AS bigint), CAST(:n AS bigint) - 1) AS g,
     LATERAL (SELECT CAST(:start AS bigint) + g * CAST(:step AS bigint) AS ms) AS m,
     LATERAL (SELECT m.ms, to_timestamp(m.ms / 1000.0) AS at, md5(g::text) AS h) AS t
"""

_EVENTS = """
INSERT INTO request_events (request_id, at, status, attempt, detail)
SELECT r.id, r.enqueued_at + e.after, e.status, e.attempt, ''
FROM requests AS r,
     (VALUES ('QUEUED', 0, interval '0'), ('RUNNING', 1, interval '1 millisecond'),
             ('SUCCEEDED', 1, interval '2 milliseconds')) AS e(status, attempt, after)
WHERE r.client_ref LIKE 'prefill.%'
"""


async def _timed(conn: AsyncConnection, label: str, sql: str, **params: object) -> None:
    started = time.monotonic()
    await conn.execute(sa.text(sql), params)
    print(f"{label}: {time.monotonic() - started:.1f} s", flush=True)


async def prefill(args: argparse.Namespace) -> None:
    engine = create_engine(args.database_url, schema=args.schema, pool_size=1, timeout=7200)
    store = RetentionStore(engine)
    today = day_of(datetime.now(UTC))
    first = today - args.days
    try:
        conn = await store.connect()
        try:
            for table in ("requests", "request_events"):
                for p in await store.partitions(conn, table):
                    if p.lower is None:
                        rows = await conn.execute(sa.text(f'SELECT count(*) FROM "{p.name}"'))
                        if rows.scalar_one():
                            raise SystemExit(f"{p.name} holds rows: prefill a fresh schema")
                        await store.detach(conn, table, p.name)
                        await store.drop(conn, p.name)
            for day in range(first, today + 1):
                for table in ("requests", "request_events"):
                    await store.create_day(table, day)
            start = first * DAY_MS
            step = (today - first) * DAY_MS // args.requests
            assert step >= 1, "more requests than milliseconds in those days"
            await _timed(
                conn,
                f"{args.requests:,} requests over days {first}..{today - 1}",
                _REQUESTS,
                n=args.requests,
                users=args.users,
                start=start,
                step=step,
            )
            await _timed(conn, f"{3 * args.requests:,} events", _EVENTS)
            await _timed(conn, "VACUUM ANALYZE requests", "VACUUM ANALYZE requests")
            await _timed(conn, "VACUUM ANALYZE request_events", "VACUUM ANALYZE request_events")
            size = await conn.execute(
                sa.text(
                    "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = :s AND c.relkind = 'r'"
                ),
                {"s": args.schema},
            )
            print(f"schema {args.schema}: {size.scalar_one()} on disk", flush=True)
            assert day_bound(first) < day_bound(today)
        finally:
            await conn.close()
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "FAIRLANE_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--schema", required=True)
    parser.add_argument("--requests", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=31, help="UTC days before today to fill")
    parser.add_argument("--users", type=int, default=1000)
    asyncio.run(prefill(parser.parse_args()))


if __name__ == "__main__":
    main()
