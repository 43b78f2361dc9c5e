"""requests.cancel_requested: a client's cancel of a running request, kept in the log

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 11:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: PostgreSQL adds the column to the partitioned table and every
    # partition without rewriting them.
    op.add_column(
        "requests",
        sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("requests", "cancel_requested")
