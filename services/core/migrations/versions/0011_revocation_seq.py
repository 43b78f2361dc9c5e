"""revoked_families.seq: revocations numbered in commit order, for incremental reads

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-11 10:00:00.000000

GetRevokedFamilies returned every unexpired revoked family in one message, which every
queue and worker replica pulled every few seconds; past gRPC's message limit the reply
was refused and revocations stopped reaching the services. It is read in pages now, and
after the first read only the revocations numbered above the caller's last one: `seq`
(services/auth/store.py says how the number follows commit order).

PostgreSQL: an identity column, so rows that replicas of the previous release insert
during a rolling update (they name no seq) are numbered too. Adding it rewrites the table
once, under a lock that holds up Revoke and Refresh until it is done; existing rows are
numbered in no particular order, all below every later revocation, which is all the
reads need. The previous release's inserts also wait for the new release's (the table
lock of services/auth/store.py), so only two of its own replicas revoking at the same
moment can commit out of number order: until those replicas are replaced, a service may
miss one of two such revocations. SQLite (embedded, one process) numbers in revoked_at
order and is given max + 1 by the store.

The index on revoked_at becomes one on (revoked_at, seq): it still serves the previous
release's query (revoked_at > since) and answers the new first read from the index.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "revoked_families"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.add_column(TABLE, sa.Column("seq", sa.BigInteger(), sa.Identity(), nullable=False))
    else:
        # SQLite cannot add a NOT NULL column without a default, nor number rows in ALTER:
        # add, number, then tighten (the batch copies the table; it is a dev database).
        with op.batch_alter_table(TABLE, schema=None) as batch_op:
            batch_op.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        op.execute(
            "UPDATE revoked_families SET seq = numbered.n FROM (SELECT family_id, "
            "row_number() OVER (ORDER BY revoked_at, family_id) AS n FROM revoked_families) "
            "AS numbered WHERE numbered.family_id = revoked_families.family_id"
        )
        with op.batch_alter_table(
            TABLE, schema=None, reflect_kwargs={"resolve_fks": False}
        ) as batch_op:
            batch_op.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
    op.create_index("ix_revoked_families_seq", TABLE, ["seq"], unique=True)
    op.create_index("ix_revoked_families_revoked_at_seq", TABLE, ["revoked_at", "seq"])
    op.drop_index("ix_revoked_families_revoked_at", table_name=TABLE)


def downgrade() -> None:
    op.create_index("ix_revoked_families_revoked_at", TABLE, ["revoked_at"])
    op.drop_index("ix_revoked_families_revoked_at_seq", table_name=TABLE)
    op.drop_index("ix_revoked_families_seq", table_name=TABLE)
    with op.batch_alter_table(
        TABLE, schema=None, reflect_kwargs={"resolve_fks": False}
    ) as batch_op:
        batch_op.drop_column("seq")
