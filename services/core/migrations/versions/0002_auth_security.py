"""auth security: throttles, revoked families, refresh successors

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auth_throttle",
        sa.Column("key", sa.String(length=80), nullable=False),
        sa.Column("events", sa.Integer(), nullable=False),
        sa.Column("last_event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("blocked_until", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_auth_throttle")),
    )
    with op.batch_alter_table("auth_throttle", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_auth_throttle_last_event_at"), ["last_event_at"], unique=False
        )

    op.create_table(
        "revoked_families",
        sa.Column("family_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(length=16), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_revoked_families_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("family_id", name=op.f("pk_revoked_families")),
    )
    with op.batch_alter_table("revoked_families", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_revoked_families_revoked_at"), ["revoked_at"], unique=False
        )

    # Families revoked before this revision keep their revocation.
    op.execute(
        "INSERT INTO revoked_families (family_id, user_id, revoked_at, reason) "
        "SELECT family_id, MIN(user_id), MIN(revoked_at), 'revoke' "
        "FROM refresh_tokens WHERE revoked_at IS NOT NULL GROUP BY family_id"
        if op.get_bind().dialect.name == "sqlite"
        else "INSERT INTO revoked_families (family_id, user_id, revoked_at, reason) "
        "SELECT DISTINCT ON (family_id) family_id, user_id, revoked_at, 'revoke' "
        "FROM refresh_tokens WHERE revoked_at IS NOT NULL ORDER BY family_id, revoked_at"
    )
    with op.batch_alter_table("refresh_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("successor_sealed", sa.LargeBinary(), nullable=True))
        batch_op.drop_column("revoked_at")


def downgrade() -> None:
    with op.batch_alter_table("refresh_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.drop_column("successor_sealed")
    op.execute(
        "UPDATE refresh_tokens SET revoked_at = (SELECT revoked_at FROM revoked_families "
        "WHERE revoked_families.family_id = refresh_tokens.family_id)"
    )
    with op.batch_alter_table("revoked_families", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_revoked_families_revoked_at"))
    op.drop_table("revoked_families")
    with op.batch_alter_table("auth_throttle", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_auth_throttle_last_event_at"))
    op.drop_table("auth_throttle")
