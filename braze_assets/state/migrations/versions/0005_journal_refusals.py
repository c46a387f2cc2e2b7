"""The journal records a refusal (`R`): Braze answered a request's attempt with a status it
documents as not processed (a 429 while the run waits out its Retry-After, say), and no attempt of
the request is on the wire. A run killed then leaves the request's rows to be sent again instead of
held as if their outcome were unknown (state/recovery.py). Journals without `R` records read as
before.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE journal DROP CONSTRAINT journal_kind_check, "
        "ADD CONSTRAINT journal_kind_check CHECK (kind IN ('S', 'R', 'D'))"
    )


def downgrade() -> None:
    # Without its refusals a request refused unprocessed reads as in flight: held, the safe side.
    op.execute("DELETE FROM journal WHERE kind = 'R'")
    op.execute(
        "ALTER TABLE journal DROP CONSTRAINT journal_kind_check, "
        "ADD CONSTRAINT journal_kind_check CHECK (kind IN ('S', 'D'))"
    )
