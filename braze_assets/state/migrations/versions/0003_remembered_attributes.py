"""Attribute-level change detection: per sync and user, what Braze last accepted (a hash of the
PAYLOAD and one per attribute, `attribute_diff.py`), read by the delta and written when Braze
accepts a row.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE remembered_attributes (
            sync         text COLLATE "C" NOT NULL,
            user_key     text COLLATE "C" NOT NULL,
            payload_hash text,
            attributes   text        NOT NULL,
            payload_attributes integer NOT NULL,
            changed_at   timestamptz NOT NULL,
            PRIMARY KEY (sync, user_key)
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS remembered_attributes")
