"""transactional outbox and lane acceptance counter

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("lanes") as batch:
        batch.add_column(sa.Column("accepted", sa.BigInteger(), server_default="0", nullable=False))
    # Lanes that existed before: every request ever stored was accepted into its lane.
    op.execute(
        "UPDATE lanes SET accepted = "
        "(SELECT count(*) FROM requests WHERE requests.user_id = lanes.user_id)"
    )
    op.create_table(
        "outbox",
        sa.Column("request_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("lane_pos", sa.BigInteger(), nullable=False),
        sa.Column("reply_route", sa.String(length=200), nullable=False),
        sa.Column("traceparent", sa.String(length=64), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("user_id", "lane_pos", name=op.f("uq_outbox_user_id_lane_pos")),
    )
    op.create_index(op.f("ix_outbox_created_at"), "outbox", ["created_at"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_outbox_created_at"), table_name="outbox")
    op.drop_table("outbox")
    with op.batch_alter_table("lanes") as batch:
        batch.drop_column("accepted")
