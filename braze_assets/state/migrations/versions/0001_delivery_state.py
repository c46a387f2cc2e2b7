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


#: Keys compare byte by byte: hex digests and request ids need no linguistic collation, which
#: would cost a strcoll per comparison on every index insert and probe, and `LIKE 'prefix%'` on
#: request ids can then use the index.
KEY = 'text COLLATE "C"'


def upgrade() -> None:
    # One row per settled CDI row. The primary key is the delivery probe (`row_hash = ANY(...)`
    # per batch: index lookups, proportional to the batch, not the ledger) and makes a second
    # settlement of the same row impossible.
    op.execute(
        f"""
        CREATE TABLE ledger (
            sync       {KEY}       NOT NULL,
            row_hash   {KEY}       NOT NULL,
            updated_at timestamptz,
            status     text        NOT NULL,
            batch_id   {KEY},
            identifier text,
            message    text,
            run_id     text,
            changed_at timestamptz NOT NULL,
            PRIMARY KEY (sync, row_hash)
        )
        """
    )
    # The delta's probe narrows by the batch's UPDATED_AT span, delivery's by the time the delta
    # was computed (rows settled since): each a range scan of about the batch, not the ledger.
    op.execute("CREATE INDEX ledger_updated_at ON ledger (sync, updated_at)")
    op.execute("CREATE INDEX ledger_changed_at ON ledger (sync, changed_at)")
    op.execute("CREATE INDEX ledger_held ON ledger (sync, updated_at) WHERE status = 'held'")
    # One row per chunk being sent (its rows as an Arrow IPC stream: row_hash, updated_at,
    # batch_id, identifier, run_id): planning and clearing a 20,000-row chunk is one row written
    # or deleted, not 20,000 index entries. At most two chunks of a sync are ever planned.
    op.execute(
        f"""
        CREATE TABLE planned (
            sync       {KEY}       NOT NULL,
            prefix     {KEY}       NOT NULL,
            rows       bytea       NOT NULL,
            planned_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (sync, prefix)
        )
        """
    )
    op.execute(
        f"""
        CREATE TABLE held_details (
            sync      {KEY}       NOT NULL,
            row_hash  {KEY}       NOT NULL,
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
        f"""
        CREATE TABLE journal (
            id         bigserial   PRIMARY KEY,
            sync       {KEY}       NOT NULL,
            batch_id   {KEY}       NOT NULL,
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
