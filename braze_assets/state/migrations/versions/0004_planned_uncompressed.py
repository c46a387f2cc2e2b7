"""A planned chunk's rows are stored as the client compressed them: the server's own TOAST
compression (pglz) of a chunk of several megabytes cost more than the rest of planning it, on the
path every chunk takes before it is sent.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE planned ALTER COLUMN rows SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.execute("ALTER TABLE planned ALTER COLUMN rows SET STORAGE EXTENDED")
