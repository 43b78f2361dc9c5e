"""lanes.paused_at: a lane paused by an operator, on every worker replica

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-09 10:00:00.000000

WorkerService.Pause with a lane used to set a flag in the one worker replica that was asked,
which stopped the lane only if that replica happened to be its active consumer. The pause
is kept here now, so every replica (running or started later) honours it until Resume.
Every existing lane starts unpaused (NULL): a pause set before this migration was held by
one process only and is not carried over.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable, no default: PostgreSQL adds it without rewriting the table. A batch, as in
    # 0003, so that SQLite (which alters tables only in part) takes the same migration.
    with op.batch_alter_table("lanes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("paused_at", sa.DateTime(timezone=True)))


def downgrade() -> None:
    # Pauses stored by then are lost: the lanes run again on every replica. On SQLite the
    # batch copies the table; its foreign key to users is kept without reflecting users
    # (whose index on lower(username) SQLAlchemy cannot reflect, and warns about).
    with op.batch_alter_table(
        "lanes", schema=None, reflect_kwargs={"resolve_fks": False}
    ) as batch_op:
        batch_op.drop_column("paused_at")
