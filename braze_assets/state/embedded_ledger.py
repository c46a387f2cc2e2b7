"""The embedded ledger: its DuckDB tables, their migrations from earlier layouts, the connection
settings that keep a delivery's memory flat, and a ledger session on one connection (base.py
says what a session does)."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

import duckdb
import pyarrow as pa

from braze_assets.delta_files import DeltaFiles
from braze_assets.state.base import REMEMBERED_COLUMNS, REMEMBERED_SQL, LedgerSession, remembered_schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    row_hash   VARCHAR NOT NULL,
    updated_at TIMESTAMPTZ,
    status     VARCHAR NOT NULL,
    batch_id   VARCHAR,
    identifier VARCHAR,
    message    VARCHAR,
    run_id     VARCHAR,
    changed_at TIMESTAMPTZ NOT NULL,
    identifier_hash VARCHAR
);
CREATE TABLE IF NOT EXISTS planned (
    row_hash   VARCHAR NOT NULL,
    updated_at TIMESTAMPTZ,
    batch_id   VARCHAR NOT NULL,
    identifier VARCHAR,
    run_id     VARCHAR,
    identifier_hash VARCHAR,
    user_key   VARCHAR  -- the diff's user (attributes syncs), forgotten by recovery
);
CREATE TABLE IF NOT EXISTS remembered_attributes (
    user_key     VARCHAR NOT NULL,  -- one row per user, kept so by merge_remembered (no index:
    payload_hash VARCHAR,           -- DuckDB's upserts through one cost more than the sending)
    attributes   VARCHAR NOT NULL,
    payload_attributes INTEGER NOT NULL,
    changed_at   TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS remembered_pending (
    user_key     VARCHAR NOT NULL,
    payload_hash VARCHAR,
    attributes   VARCHAR NOT NULL,
    payload_attributes INTEGER NOT NULL,
    changed_at   TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS held_details (
    row_hash   VARCHAR NOT NULL,
    id_type    VARCHAR NOT NULL,
    id_value   VARCHAR NOT NULL,
    kind       VARCHAR NOT NULL,
    name       VARCHAR NOT NULL,
    sent_time  TIMESTAMPTZ NOT NULL
);
"""
#: DuckDB's buffer pool for a ledger connection: scans, joins and sorts spill past it, so this
#: bounds memory, not size. Measured on deliveries of 5M attributes: peak RSS 1,081-1,082 MiB
#: at 256 MB, 971-984 MiB at 128 MB, 947 MiB at 96 MB, all at 837-943 requests/s (this
#: machine's noise); folding 5M remembered users at once works at 128 MB.
LEDGER_MEMORY_LIMIT = "128MB"
#: The write-ahead log's size at which DuckDB folds it into the file (its default is 16 MB).
#: Each fold compresses and rewrites the tables' changed blocks, so with the default a delivery
#: of a million rows folded dozens of times: measured, delivery of a million attributes with
#: the diff took 27.6-33 s at 16 MB and 20.8 s at 256 MB (14.3 s without the diff). A larger
#: log only lengthens the replay after a crash, which loses nothing.
LEDGER_CHECKPOINT_THRESHOLD = "256MB"


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Ledgers written by earlier versions: without the lookup-hash column (the sync log), without
    planned rows' user keys (the diff), or in the layout that kept a PRIMARY KEY and `planned`
    rows inline."""
    con.execute("ALTER TABLE planned ADD COLUMN IF NOT EXISTS user_key VARCHAR")
    missing = con.execute(
        "SELECT t.name FROM (VALUES ('ledger'), ('planned')) t(name) WHERE NOT EXISTS ("
        "SELECT 1 FROM duckdb_columns() c WHERE c.table_name = t.name "
        "AND c.column_name = 'identifier_hash')"
    ).fetchall()
    for (table,) in missing:
        con.execute(f"ALTER TABLE {table} ADD COLUMN identifier_hash VARCHAR")
    if one_row(
        con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'remembered_attributes' "
            "AND constraint_type = 'PRIMARY KEY'"
        )
    )[0]:  # the first layout upserted through a key: the same rows, without it
        con.execute("BEGIN TRANSACTION")
        con.execute("CREATE TABLE remembered_v2 AS SELECT * FROM remembered_attributes")
        con.execute("DROP TABLE remembered_attributes")
        con.execute("ALTER TABLE remembered_v2 RENAME TO remembered_attributes")
        con.execute("COMMIT")
    keyed = con.execute(
        "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'ledger' "
        "AND constraint_type = 'PRIMARY KEY'"
    ).fetchall()[0][0]
    if not keyed:
        return
    con.execute("BEGIN TRANSACTION")
    con.execute(
        "INSERT INTO planned (row_hash, updated_at, batch_id, identifier, run_id) "
        "SELECT row_hash, updated_at, batch_id, identifier, run_id FROM ledger WHERE status = 'planned'"
    )
    con.execute("CREATE TABLE ledger_v2 AS SELECT * FROM ledger WHERE status <> 'planned'")
    con.execute("DROP TABLE ledger")
    con.execute("ALTER TABLE ledger_v2 RENAME TO ledger")
    con.execute("COMMIT")


def one_row(cursor: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
    """The row of an aggregate query (which always has exactly one)."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("an aggregate query returned no row")
    return row


class DuckDBLedgerSession(LedgerSession):
    """A ledger session on one DuckDB connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection, deltas: DeltaFiles):
        super().__init__(deltas)
        self.con = con

    def settled_since(self, since: dt.datetime) -> bool:
        query = "SELECT EXISTS (SELECT 1 FROM ledger WHERE changed_at >= ?)"
        return bool(self.con.execute(query, [since]).fetchall()[0][0])

    def settled_between(self, oldest: dt.datetime, newest: dt.datetime) -> bool:
        query = "SELECT EXISTS (SELECT 1 FROM ledger WHERE updated_at BETWEEN ? AND ?)"
        return bool(self.con.execute(query, [oldest, newest]).fetchall()[0][0])

    def known_hashes(
        self,
        hashes: list[str],
        *,
        since: dt.datetime | None = None,
        between: tuple[dt.datetime, dt.datetime] | None = None,
    ) -> set[str]:
        if not hashes:
            return set()
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("l.changed_at >= ?")
            params.append(since)
        if between is not None:
            where.append("l.updated_at BETWEEN ? AND ?")
            params += list(between)
        self.con.register("probe", pa.table({"row_hash": pa.array(hashes, pa.string())}))
        try:
            rows = self.con.execute(
                "SELECT DISTINCT l.row_hash FROM ledger l SEMI JOIN probe p USING (row_hash)"
                + (" WHERE " + " AND ".join(where) if where else ""),
                params,
            ).fetchall()
        finally:
            self.con.unregister("probe")
        return {r[0] for r in rows}

    def _insert(self, table: str, rows: pa.Table) -> None:
        if rows.num_rows:
            self.con.register("incoming", rows)
            try:
                cols = ", ".join(rows.column_names)
                self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM incoming")
            finally:
                self.con.unregister("incoming")

    def clear_planned(self, prefix: str) -> None:
        self.con.execute("DELETE FROM planned WHERE batch_id LIKE ?", [f"{prefix}-%"])

    def remembered_table(self, user_keys: pa.Array, attributes: bool = True) -> pa.Table:
        schema = remembered_schema(attributes)
        if not len(user_keys):
            return schema.empty_table()
        columns = ", ".join(REMEMBERED_SQL[name] for name in schema.names)
        pending = self._pending_remembered()
        self.con.register("wanted", pa.table({"user_key": user_keys}))
        try:
            if not pending:  # the usual case: every delivery folds what it set aside
                query = f"SELECT {columns} FROM remembered_attributes SEMI JOIN wanted USING (user_key)"
            else:  # rows still pending (a delivery that stopped before merging them) are newer
                query = (
                    f"SELECT {columns} FROM ("
                    "SELECT *, 0 AS pending FROM remembered_attributes SEMI JOIN wanted USING (user_key) "
                    "UNION ALL "
                    "SELECT *, 1 AS pending FROM remembered_pending SEMI JOIN wanted USING (user_key)"
                    ") QUALIFY row_number() OVER (PARTITION BY user_key ORDER BY pending DESC, "
                    "changed_at DESC) = 1"
                )
            return self.con.sql(query).to_arrow_table().cast(schema)
        finally:
            self.con.unregister("wanted")

    def remember(self, rows: pa.Table) -> None:
        """Appended to `remembered_pending`, which `merge_remembered` folds in once per delivery:
        an append per chunk is cheap, a per-chunk upsert grew with the table."""
        if not rows.num_rows:
            return
        self.con.register("accepted", rows.select(list(REMEMBERED_COLUMNS)))
        try:
            self.con.execute(
                "INSERT INTO remembered_pending "
                "SELECT user_key, payload_hash, attributes, payload_attributes, now() FROM accepted"
            )
        finally:
            self.con.unregister("accepted")

    def planned_rows(self) -> int:
        return int(one_row(self.con.execute("SELECT count(*) FROM planned"))[0])

    def planned_user_keys(self) -> pa.Array:
        return (
            self.con.sql("SELECT DISTINCT user_key FROM planned WHERE user_key IS NOT NULL")
            .to_arrow_table()["user_key"]
            .combine_chunks()
            .cast(pa.string())
        )

    def remembers_anyone(self) -> bool:
        return self._pending_remembered() or bool(
            self.con.execute("SELECT EXISTS (SELECT 1 FROM remembered_attributes)").fetchall()[0][0]
        )

    def _pending_remembered(self) -> bool:
        """Whether `remember` set anything aside that is not folded yet (normally not)."""
        return bool(self.con.execute("SELECT EXISTS (SELECT 1 FROM remembered_pending)").fetchall()[0][0])

    def forget_remembered(self) -> None:
        with self.transaction():
            self.con.execute("DELETE FROM remembered_attributes")
            self.con.execute("DELETE FROM remembered_pending")

    def merge_remembered(self) -> None:
        if not self._pending_remembered():  # every delivery asks twice; most have nothing
            return
        with self.transaction():
            self.con.execute(
                "CREATE OR REPLACE TEMP TABLE merging AS SELECT * FROM remembered_pending "
                "QUALIFY row_number() OVER (PARTITION BY user_key ORDER BY changed_at DESC, rowid DESC) = 1"
            )
            self.con.execute(
                "DELETE FROM remembered_attributes WHERE user_key IN (SELECT user_key FROM merging)"
            )
            self.con.execute("INSERT INTO remembered_attributes SELECT * FROM merging")
            self.con.execute("DELETE FROM remembered_pending")
            self.con.execute("DROP TABLE merging")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.con.begin()
        try:
            yield
        except BaseException:
            self.con.rollback()
            raise
        self.con.commit()
