"""The sync log: each ledger row keeps the lookup hashes of its identifiers (`lookup.py`), so a
user's rows can be found and forgotten without their identifier being stored in clear.

No index: the column is read only by an operator's search or purge (a scan of one sync's rows),
and an index would be paid on every settled chunk, the backend's hottest write.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE ledger ADD COLUMN identifier_hash text")
    # Retention deletes run records older than a cutoff (row-level details go by the existing
    # ledger_changed_at index).
    op.execute("CREATE INDEX runs_finished ON runs (sync, finished_at)")


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS runs_finished")
    op.execute("ALTER TABLE ledger DROP COLUMN IF EXISTS identifier_hash")
