"""request log partitioned by day (PostgreSQL), idempotency keys in a table of their own

Revision ID: 0005
Revises: 0004

On PostgreSQL `requests` becomes range-partitioned on `id` and `request_events` on
`request_id`: ids are UUIDv7, whose first 48 bits are the Unix time in milliseconds, so a
UTC day of requests is one id range. Retention then drops whole partitions (services/queue/
retention_store.py). The existing tables become the first partition of each, covering every
id before tomorrow (their data is kept in place, not copied); days from tomorrow on get a
partition each.

Unique constraints of a partitioned table must contain the partition key, so per-user
idempotency keys move to `idempotency_keys`, one global primary key that concurrent
intakes of every replica insert into: the second of two racing inserts fails, as the
unique constraint on `requests` made it fail before. `(user_id, lane_seq)` becomes a plain
index: the worker hands out lane_seq values under the lane row's lock, which is what kept
them unique all along.

This file keeps its own copy of the partition arithmetic so it stays as it ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DAY_MS = 86_400_000
AHEAD_DAYS = 7  # partitions created ahead; the maintenance task keeps this many ahead


def _bound(day: int) -> str:
    """The smallest UUIDv7 of a day (days since the Unix epoch, UTC)."""
    h = f"{day * DAY_MS:012x}" + "0" * 20
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _suffix(day: int) -> str:
    try:
        return (date(1970, 1, 1) + timedelta(days=day)).strftime("%Y%m%d")
    except OverflowError:
        return f"d{day}"


def _create_day(day: int) -> None:
    for table in ("requests", "request_events"):
        op.execute(
            f"CREATE TABLE {table}_p{_suffix(day)} PARTITION OF {table} "
            f"FOR VALUES FROM ('{_bound(day)}') TO ('{_bound(day + 1)}')"
        )


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=False),
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "idempotency_key", name=op.f("pk_idempotency_keys")),
    )
    op.create_index(
        op.f("ix_idempotency_keys_request_id"), "idempotency_keys", ["request_id"], unique=False
    )
    op.execute(
        "INSERT INTO idempotency_keys (user_id, idempotency_key, request_id) "
        "SELECT user_id, idempotency_key, id FROM requests WHERE idempotency_key IS NOT NULL"
    )
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table("requests") as batch:
            batch.drop_constraint("uq_requests_user_id_idempotency_key", type_="unique")
            batch.drop_constraint("uq_requests_user_id_lane_seq", type_="unique")
            batch.create_index("ix_requests_user_id_lane_seq", ["user_id", "lane_seq"])
        return
    _partition_postgresql()


def _partition_postgresql() -> None:
    bind = op.get_bind()
    today = int(datetime.now(UTC).timestamp() * 1000) // DAY_MS
    first = today + 1
    split = _bound(first)

    # The tables as they are become the initial partitions.
    for sql in (
        "ALTER TABLE requests RENAME TO requests_initial",
        "ALTER TABLE requests_initial RENAME CONSTRAINT pk_requests TO pk_requests_initial",
        "ALTER TABLE requests_initial DROP CONSTRAINT uq_requests_user_id_idempotency_key",
        "ALTER TABLE requests_initial DROP CONSTRAINT uq_requests_user_id_lane_seq",
        "ALTER INDEX ix_requests_user_id_status RENAME TO ix_requests_initial_user_id_status",
        "ALTER TABLE request_events RENAME TO request_events_initial",
        "ALTER TABLE request_events_initial DROP CONSTRAINT pk_request_events",
        "DROP INDEX ix_request_events_request_id",
        # The partition key must be part of the primary key; (request_id, id) also serves
        # every lookup of a request's history, so it replaces the request_id index.
        "ALTER TABLE request_events_initial "
        "ADD CONSTRAINT pk_request_events_initial PRIMARY KEY (request_id, id)",
    ):
        op.execute(sql)
    sequence = bind.execute(
        sa.text("SELECT pg_get_serial_sequence('request_events_initial', 'id')")
    ).scalar_one()

    op.execute(
        "CREATE TABLE requests (LIKE requests_initial INCLUDING DEFAULTS) PARTITION BY RANGE (id)"
    )
    for sql in (
        "ALTER TABLE requests ADD CONSTRAINT pk_requests PRIMARY KEY (id)",
        "CREATE INDEX ix_requests_user_id_status ON requests (user_id, status)",
        "CREATE INDEX ix_requests_user_id_lane_seq ON requests (user_id, lane_seq)",
        # Requests without a result yet: few at any time. Retention asks each partition
        # whether it still holds one, and a partition that does is never dropped.
        "CREATE INDEX ix_requests_unsequenced ON requests (user_id) WHERE lane_seq IS NULL",
        # Block-range summary of finish times (a few pages per partition, next to nothing to
        # maintain): retention asks whether a partition holds a request finished recently.
        "CREATE INDEX ix_requests_finished_at ON requests USING brin (finished_at)",
        "CREATE TABLE request_events (LIKE request_events_initial INCLUDING DEFAULTS) "
        "PARTITION BY RANGE (request_id)",
        "ALTER TABLE request_events ADD CONSTRAINT pk_request_events PRIMARY KEY (request_id, id)",
        # Otherwise dropping the initial partition would drop the id sequence with it.
        f"ALTER SEQUENCE {sequence} OWNED BY request_events.id",
    ):
        op.execute(sql)

    # Rows with ids from tomorrow on cannot stay in the initial partition. Fairlane only
    # ever wrote UUIDv7 ids of its own clock, so this is at most a clock ahead of time, or
    # ids from elsewhere (random UUIDs spread over millennia): each such day gets its own
    # partition, like any other day.
    later = bind.execute(
        sa.text(
            "SELECT DISTINCT ('x' || left(replace(id::text, '-', ''), 12))::bit(48)::bigint "
            "/ :day AS day FROM requests_initial WHERE id >= CAST(:split AS uuid) "
            "UNION SELECT DISTINCT ('x' || left(replace(request_id::text, '-', ''), 12))"
            "::bit(48)::bigint / :day FROM request_events_initial "
            "WHERE request_id >= CAST(:split AS uuid)"
        ),
        {"split": split, "day": DAY_MS},
    ).scalars()
    days = set(later) | set(range(first, today + AHEAD_DAYS + 1))
    for day in sorted(days):
        _create_day(day)
    for table, key in (("requests", "id"), ("request_events", "request_id")):
        op.execute(
            f"WITH moved AS (DELETE FROM {table}_initial WHERE {key} >= '{split}' RETURNING *) "
            f"INSERT INTO {table} SELECT * FROM moved"
        )
        # The check proves the bound, so ATTACH does not scan the table a second time.
        op.execute(
            f"ALTER TABLE {table}_initial ADD CONSTRAINT ck_{table}_initial_bound "
            f"CHECK ({key} < '{split}')"
        )
        op.execute(
            f"ALTER TABLE {table} ATTACH PARTITION {table}_initial "
            f"FOR VALUES FROM (MINVALUE) TO ('{split}')"
        )
        op.execute(f"ALTER TABLE {table}_initial DROP CONSTRAINT ck_{table}_initial_bound")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _unpartition_postgresql()
    else:
        with op.batch_alter_table("requests") as batch:
            batch.drop_index("ix_requests_user_id_lane_seq")
            batch.create_unique_constraint(
                "uq_requests_user_id_idempotency_key", ["user_id", "idempotency_key"]
            )
            batch.create_unique_constraint("uq_requests_user_id_lane_seq", ["user_id", "lane_seq"])
    op.drop_index(op.f("ix_idempotency_keys_request_id"), table_name="idempotency_keys")
    op.drop_table("idempotency_keys")


def _unpartition_postgresql() -> None:
    """Copies the partitions back into plain tables (data kept)."""
    bind = op.get_bind()
    sequence = bind.execute(
        sa.text("SELECT pg_get_serial_sequence('request_events', 'id')")
    ).scalar_one()
    for sql in (
        "CREATE TABLE requests_flat (LIKE requests INCLUDING DEFAULTS)",
        "INSERT INTO requests_flat SELECT * FROM requests",
        "CREATE TABLE request_events_flat (LIKE request_events INCLUDING DEFAULTS)",
        "INSERT INTO request_events_flat SELECT * FROM request_events",
        f"ALTER SEQUENCE {sequence} OWNED BY request_events_flat.id",
        "DROP TABLE requests",
        "DROP TABLE request_events",
        "ALTER TABLE requests_flat RENAME TO requests",
        "ALTER TABLE request_events_flat RENAME TO request_events",
        "ALTER TABLE requests ADD CONSTRAINT pk_requests PRIMARY KEY (id)",
        "ALTER TABLE requests ADD CONSTRAINT uq_requests_user_id_idempotency_key "
        "UNIQUE (user_id, idempotency_key)",
        "ALTER TABLE requests ADD CONSTRAINT uq_requests_user_id_lane_seq "
        "UNIQUE (user_id, lane_seq)",
        "CREATE INDEX ix_requests_user_id_status ON requests (user_id, status)",
        "ALTER TABLE request_events ADD CONSTRAINT pk_request_events PRIMARY KEY (id)",
        "CREATE INDEX ix_request_events_request_id ON request_events (request_id)",
    ):
        op.execute(sql)
