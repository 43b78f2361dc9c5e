"""refresh_tokens.expires_at indexed: the auth service deletes expired refresh tokens

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-12 10:00:00.000000

Every login added a refresh token row, and every refresh another, and nothing removed
them; revoked families were kept for good too. The auth service now deletes, in batches,
refresh tokens past their expiry and revoked families that no token can use any more
(services/auth/store.py, AuthStore.prune). This index finds the expired tokens without
reading the table.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_refresh_tokens_expires_at", "refresh_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_refresh_tokens_expires_at", table_name="refresh_tokens")
