"""Tables of the request log and the auth store (SQLAlchemy Core; Alembic migrates them)."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

Timestamp = sa.DateTime(timezone=True)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("username", sa.String(64), nullable=False, unique=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
)
# Usernames are case-insensitive (migration 0008): `username` keeps the spelling the user
# registered with, this index makes a name unique whatever its case and serves the lookups
# by lower(username) (usernames are ASCII, so lower() folds them alike in both databases).
sa.Index("ix_users_lower_username", sa.func.lower(users.c.username), unique=True)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    # All tokens rotated from one login share a family; reuse of a spent one revokes it.
    sa.Column("family_id", sa.Uuid, nullable=False, index=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", Timestamp, nullable=False),
    # Indexed (migration 0012): the auth service deletes expired tokens (AuthStore.prune).
    sa.Column("expires_at", Timestamp, nullable=False, index=True),
    sa.Column("used_at", Timestamp),
    # The pair this token was exchanged for, encrypted under a key derived from this token,
    # so a second Refresh with it within the reuse interval returns the same pair.
    sa.Column("successor_sealed", sa.LargeBinary),
)

# A family is revoked by Revoke or by the reuse of a spent token. Services fetch the
# recent ones (GetRevokedFamilies) and refuse access tokens that carry them.
revoked_families = sa.Table(
    "revoked_families",
    metadata,
    sa.Column("family_id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    sa.Column("revoked_at", Timestamp, nullable=False),
    sa.Column("reason", sa.String(16), nullable=False),
    # Numbers revocations in commit order (migration 0011): services read the list once and
    # then only the numbers above the last they saw (services/auth/store.py says how the
    # order is kept). PostgreSQL draws it from the identity; SQLite is given max + 1.
    sa.Column("seq", sa.BigInteger, sa.Identity(), nullable=False),
)
# The incremental read walks seq; the first read starts at the lowest seq revoked after a
# time, which (revoked_at, seq) answers from the index alone.
sa.Index("ix_revoked_families_seq", revoked_families.c.seq, unique=True)
sa.Index(
    "ix_revoked_families_revoked_at_seq", revoked_families.c.revoked_at, revoked_families.c.seq
)

# Login, Register and IssueServiceToken throttles, shared by every auth replica. `key` is
# the rule name and a hash of the username or client address.
auth_throttle = sa.Table(
    "auth_throttle",
    metadata,
    sa.Column("key", sa.String(80), primary_key=True),
    sa.Column("events", sa.Integer, nullable=False),
    sa.Column("last_event_at", Timestamp, nullable=False, index=True),
    sa.Column("blocked_until", Timestamp),
)

signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("kid", sa.String(64), primary_key=True),
    sa.Column("algorithm", sa.String(16), nullable=False),
    sa.Column("private_pem", sa.Text, nullable=False),
    sa.Column("public_jwk", sa.Text, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("retired_at", Timestamp),
)

lanes = sa.Table(
    "lanes",
    metadata,
    sa.Column("user_id", sa.Uuid, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("last_active_at", Timestamp, nullable=False),
    # Last lane_seq handed to a finished request; results are numbered 1, 2, 3... per lane.
    sa.Column("last_seq", sa.BigInteger, nullable=False, server_default="0"),
    # Requests ever accepted into the lane. Every accepted request eventually gets exactly
    # one lane_seq, so `accepted - last_seq` is what the lane holds unfinished (its bound is
    # counted from here), and the n-th accepted request has lane position n (outbox order).
    sa.Column("accepted", sa.BigInteger, nullable=False, server_default="0"),
    # When the janitor deleted the lane's queue for idleness; NULL while the queue exists.
    # A lane active again after it (last_active_at > queue_deleted_at) has a queue again.
    sa.Column("queue_deleted_at", Timestamp),
    # When an operator paused the lane (WorkerService.Pause with a lane, on any worker
    # replica); NULL while it is not paused. Every worker replica honours it until Resume:
    # it is announced on fairlane.control and listed by ListLanes. The janitor leaves a
    # paused lane's queue alone.
    sa.Column("paused_at", Timestamp),
)

# On PostgreSQL `requests` is range-partitioned on `id` and `request_events` on
# `request_id`, one partition per UTC day of UUIDv7 ids (migration 0005), so retention drops
# whole days. There `request_events` has the primary key (request_id, id), `requests` two
# more indexes (ix_requests_unsequenced: user_id WHERE lane_seq IS NULL, and a BRIN index on
# finished_at), and no unique constraint can span the partitions: idempotency keys are
# unique in `idempotency_keys`, lane_seq values by the lane lock that hands them out.
requests = sa.Table(
    "requests",
    metadata,
    sa.Column("id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.Uuid, nullable=False),
    sa.Column("handler", sa.String(128), nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("idempotency_key", sa.String(200)),
    sa.Column("client_ref", sa.String(200), nullable=False, server_default=""),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("output", sa.LargeBinary),
    sa.Column("error", sa.Text),
    sa.Column("lane_seq", sa.BigInteger),
    # Its place in the lane (the outbox's lane_pos), kept after the outbox row is gone: a
    # lane the broker lost (the embedded broker after a restart) is rebuilt in this order.
    sa.Column("lane_pos", sa.BigInteger),
    sa.Column("enqueued_at", Timestamp, nullable=False),
    sa.Column("started_at", Timestamp),
    sa.Column("finished_at", Timestamp),
    sa.Column("deadline", Timestamp),
    sa.Column("trace_id", sa.String(32), nullable=False, server_default=""),
    # The client cancelled it while it ran (CancelRequest answered RUNNING): whatever the
    # handler returns, it ends CANCELLED, and a worker that takes it over does not run it.
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index(None, "user_id", "status"),
    sa.Index(None, "user_id", "lane_seq"),
)

# One row per idempotency key in use: the key's owner, the key and the request it named.
# Its primary key is what makes a key unique across queue replicas. Retention deletes the
# keys of the requests it removes.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("user_id", sa.Uuid, primary_key=True),
    sa.Column("idempotency_key", sa.String(200), primary_key=True),
    sa.Column("request_id", sa.Uuid, nullable=False, index=True),
)

request_events = sa.Table(
    "request_events",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("request_id", sa.Uuid, nullable=False, index=True),
    sa.Column("at", Timestamp, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
    sa.Column("detail", sa.Text, nullable=False, server_default=""),
)

# Transactional outbox: a row per accepted request not yet confirmed by the broker. It is
# written in the transaction that accepts the request and deleted once the lane message
# carrying it is confirmed, so a request is never accepted without being published.
outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("request_id", sa.Uuid, primary_key=True),
    sa.Column("user_id", sa.Uuid, nullable=False),
    # Position in the lane (lanes.accepted when it was accepted): the publish order.
    sa.Column("lane_pos", sa.BigInteger, nullable=False),
    sa.Column("reply_route", sa.String(200), nullable=False),
    sa.Column("traceparent", sa.String(64), nullable=False, server_default=""),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.UniqueConstraint("user_id", "lane_pos"),
    sa.Index(None, "created_at"),
)

handlers = sa.Table(
    "handlers",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("description", sa.Text, nullable=False, server_default=""),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("timeout_seconds", sa.Float, nullable=False, server_default="0"),
    sa.Column("last_seen_at", Timestamp, nullable=False),
)

# Worker replicas alive, by heartbeat: each counts the lanes it is the active consumer of,
# so every replica can compute its fair share (services/worker/rebalance.py).
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("worker_id", sa.String(200), primary_key=True),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("heartbeat_at", Timestamp, nullable=False),
    sa.Column("busy_lanes", sa.Integer, nullable=False, server_default="0"),
)
