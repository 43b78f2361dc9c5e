"""usernames are unique whatever their case: a unique index on lower(username)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 10:00:00.000000

Usernames are ASCII (letters, digits, '.', '_', '-'), so lower() folds them alike on
PostgreSQL and SQLite. The index refuses a second name that differs from one already
registered only in case, also when two registrations race, and serves the lookups by
folded name (services/auth/store.py). `users.username` keeps the spelling the user
registered with; its plain unique constraint stays.

Rows that already collide (registered while names were case-sensitive) cannot be merged
automatically, as they are separate users: the upgrade then stops, naming them, and an
operator renames all but one of each group before migrating again (renames, not deletes:
a user's lane and requests hang on its id, and a deleted user's unfinished requests could
never finish).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fairlane_server.core.db import MigrationRefused

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_users_lower_username"


def _collisions() -> list[list[str]]:
    """Groups of existing usernames that differ only in case."""
    rows = op.get_bind().execute(
        sa.text(
            "SELECT username FROM users WHERE lower(username) IN "
            "(SELECT lower(username) FROM users GROUP BY lower(username) HAVING count(*) > 1) "
            "ORDER BY lower(username), username"
        )
    )
    groups: dict[str, list[str]] = {}
    for (name,) in rows:
        groups.setdefault(name.lower(), []).append(name)
    return list(groups.values())


def upgrade() -> None:
    collisions = _collisions()
    if collisions:
        listed = "; ".join(", ".join(repr(n) for n in group) for group in collisions)
        raise MigrationRefused(
            "migration 0008 makes usernames case-insensitive, but these existing users' "
            f"names differ only in case: {listed}. Rename all but one user of each group "
            "(UPDATE users SET username = ...; do not delete users: their unfinished requests "
            "could never finish), then migrate again; nothing was changed."
        )
    op.create_index(INDEX, "users", [sa.text("lower(username)")], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="users")
