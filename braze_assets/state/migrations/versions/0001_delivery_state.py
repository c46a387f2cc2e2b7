"""Delivery state: ledger, planned, held details, journal, watermarks, settled source files, run
history and the shared rate budget.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per settled CDI row. The primary key is the delivery probe (`row_hash = ANY(...)`
    # per batch: index lookups, proportional to the batch, not the ledger) and makes a second
    # settlement of the same row impossible.
    op.execute(
        """
        CREATE TABLE ledger (
            sync       text        NOT NULL,
            row_hash   text        NOT NULL,
            updated_at timestamptz,
            status     text        NOT NULL,
            batch_id   text,
            identifier text,
            message    text,
            run_id     text,
            changed_at timestamptz NOT NULL,
            PRIMARY KEY (sync, row_hash)
        )
        """
    )
    op.execute("CREATE INDEX ledger_updated_at ON ledger (sync, updated_at)")
    op.execute("CREATE INDEX ledger_held ON ledger (sync, updated_at) WHERE status = 'held'")
    op.execute(
        """
        CREATE TABLE planned (
            sync       text NOT NULL,
            row_hash   text NOT NULL,
            updated_at timestamptz,
            batch_id   text NOT NULL,
            identifier text,
            run_id     text
        )
        """
    )
    op.execute("CREATE INDEX planned_batch ON planned (sync, batch_id)")
    op.execute(
        """
        CREATE TABLE held_details (
            sync      text        NOT NULL,
            row_hash  text        NOT NULL,
            id_type   text        NOT NULL,
            id_value  text        NOT NULL,
            kind      text        NOT NULL,
            name      text        NOT NULL,
            sent_time timestamptz NOT NULL
        )
        """
    )
    op.execute("CREATE INDEX held_details_row ON held_details (sync, row_hash)")
    # `S`: the request may be on the wire; `D`: its known outcome (record).
    op.execute(
        """
        CREATE TABLE journal (
            id         bigserial   PRIMARY KEY,
            sync       text        NOT NULL,
            batch_id   text        NOT NULL,
            kind       char(1)     NOT NULL CHECK (kind IN ('S', 'D')),
            record     jsonb,
            written_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute("CREATE INDEX journal_sync ON journal (sync)")
    op.execute(
        """
        CREATE TABLE watermarks (
            sync           text PRIMARY KEY,
            value          timestamptz,
            updated_by_run text,
            updated_at     timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    op.execute(
        """
        CREATE TABLE settled_parts (
            sync        text NOT NULL,
            part        text NOT NULL,
            fingerprint text NOT NULL,
            PRIMARY KEY (sync, part)
        )
        """
    )
    op.execute(
        """
        CREATE TABLE runs (
            id          bigserial   PRIMARY KEY,
            sync        text        NOT NULL,
            run_id      text        NOT NULL,
            finished_at timestamptz NOT NULL DEFAULT now(),
            outcome     jsonb       NOT NULL
        )
        """
    )
    op.execute("CREATE INDEX runs_sync ON runs (sync, id)")
    # The shared Braze request budget per workspace and endpoint (braze/budget.py).
    op.execute(
        """
        CREATE TABLE rate_budget (
            workspace     text             NOT NULL,
            endpoint      text             NOT NULL,
            grants        jsonb            NOT NULL DEFAULT '[]',
            next_grant_id bigint           NOT NULL DEFAULT 1,
            paused_until  double precision NOT NULL DEFAULT 0,
            rate_limit    integer,
            window_s      double precision,
            updated_at    timestamptz      NOT NULL DEFAULT now(),
            PRIMARY KEY (workspace, endpoint)
        )
        """
    )


def downgrade() -> None:
    for table in (
        "rate_budget",
        "runs",
        "settled_parts",
        "watermarks",
        "journal",
        "held_details",
        "planned",
        "ledger",
    ):
        op.execute(f"DROP TABLE IF EXISTS {table}")
