"""requests.lane_pos: each request's place in its lane, kept after it is published

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-10 10:00:00.000000

A request's lane position was kept only in its outbox row, which goes once the broker has
the request. The embedded broker of `fairlane dev` keeps its lanes in memory, so after a
restart the unfinished requests are put back in their lanes from the log
(services/queue/lane_rebuild.py), and their order has to come from the log too. Rows
accepted before this migration have none (NULL): they are put back in acceptance-time
order after the ones that have one.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: PostgreSQL adds it to the partitioned table and every partition
    # without rewriting them; SQLite adds a column in place.
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lane_pos", sa.BigInteger))


def downgrade() -> None:
    with op.batch_alter_table("requests", schema=None) as batch_op:
        batch_op.drop_column("lane_pos")
