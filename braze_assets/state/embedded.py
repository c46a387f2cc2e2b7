"""The embedded state backend: DuckDB and small files under one directory, nothing to start.

Layout under the state directory (one set per sync, so syncs never contend):

* ``<sync>.duckdb`` - ledger, planned and held_details (base.py). The ledger is append-only (no
  index to maintain: appends stay fast and memory flat however large it grows; probes skip row
  groups by their min/max UPDATED_AT and changed_at).
* ``<sync>.journal`` - an append-only line per request (`S <id>` before it goes on the wire,
  `D <json>` with its known outcome after), flushed to the OS at once, so it survives kill -9.
* ``<sync>.lock`` - an flock held by the run delivering; the OS drops it when the process dies.
* ``<sync>.watermark.json``, ``<sync>.settled_files.json`` - replaced atomically.
* ``<sync>.runs.jsonl`` - one line per finished run.

Right for one machine, or one shared volume with working `flock`. Runs in fresh pods need the
PostgreSQL backend (postgres.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TextIO

import duckdb
import pyarrow as pa

from braze_assets.config import AmbiguousPolicy
from braze_assets.delta_files import DeltaFiles, delta_root
from braze_assets.state.base import (
    REMEMBERED_COLUMNS,
    REMEMBERED_SQL,
    Journal,
    LedgerSession,
    StateStore,
    SyncBusyError,
    Watermark,
    remembered_schema,
)
from braze_assets.state.embedded_log import EmbeddedSyncLog
from braze_assets.state.held import held_details_table
from braze_assets.state.recovery import AMBIGUOUS_MESSAGE, JournalRecords, RecoveryPlan, done_record

_SCHEMA = """
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
    identifier_hash VARCHAR
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


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Ledgers written by earlier versions: without the lookup-hash column (the sync log), or in
    the layout that kept a PRIMARY KEY and `planned` rows inline."""
    missing = con.execute(
        "SELECT t.name FROM (VALUES ('ledger'), ('planned')) t(name) WHERE NOT EXISTS ("
        "SELECT 1 FROM duckdb_columns() c WHERE c.table_name = t.name "
        "AND c.column_name = 'identifier_hash')"
    ).fetchall()
    for (table,) in missing:
        con.execute(f"ALTER TABLE {table} ADD COLUMN identifier_hash VARCHAR")
    if _one_row(
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


def _one_row(cursor: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
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

    def remembers_anyone(self) -> bool:
        return self._pending_remembered() or bool(
            self.con.execute("SELECT EXISTS (SELECT 1 FROM remembered_attributes)").fetchall()[0][0]
        )

    def _pending_remembered(self) -> bool:
        """Whether `remember` set anything aside that is not folded yet (normally not)."""
        return bool(self.con.execute("SELECT EXISTS (SELECT 1 FROM remembered_pending)").fetchall()[0][0])

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


class FileJournal(Journal):
    """The journal as lines in a file, each flushed to the OS before the call returns."""

    def __init__(self, handle: TextIO):
        self.handle = handle

    async def started(self, batch_id: str) -> None:
        self.handle.write(f"S {batch_id}\n")
        self.handle.flush()  # in the OS before the request leaves: survives kill -9

    async def done(self, batch_id: str, rows: list[tuple[str, str | None, str | None]]) -> None:
        self.handle.write("D " + json.dumps(done_record(batch_id, rows)) + "\n")
        self.handle.flush()


class EmbeddedStateStore(StateStore):
    """The state of one sync under `state_dir` (see the module docstring)."""

    def __init__(
        self,
        state_dir: str | Path,
        sync_name: str,
        lock_timeout_s: float = 600.0,
        deltas: DeltaFiles | None = None,
    ):
        self.dir = Path(state_dir)
        self.db_path = self.dir / f"{sync_name}.duckdb"
        self.journal_path = self.dir / f"{sync_name}.journal"
        self.lock_path = self.dir / f"{sync_name}.lock"
        self.watermark_path = self.dir / f"{sync_name}.watermark.json"
        self.parts_path = self.dir / f"{sync_name}.settled_files.json"
        self.history_path = self.dir / f"{sync_name}.runs.jsonl"
        self.lock_timeout_s = lock_timeout_s
        super().__init__(
            sync_name,
            deltas or DeltaFiles(delta_root(self.dir), sync_name),
            EmbeddedSyncLog(sync_name, self.history_path, self.db_path, self.connect),
        )

    def __repr__(self) -> str:
        return f"EmbeddedStateStore({str(self.dir)!r}, {self.sync!r})"

    # ------------------------------------------------------------------ connections and locks
    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection to the ledger; waits while another process has the file open."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if read_only and not self.db_path.exists():
            read_only = False
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                con = duckdb.connect(str(self.db_path), read_only=read_only)
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            con.execute(f"SET memory_limit = '{LEDGER_MEMORY_LIMIT}'")
            con.execute(f"SET checkpoint_threshold = '{LEDGER_CHECKPOINT_THRESHOLD}'")
            if not read_only:
                con.execute(_SCHEMA)
                _migrate(con)
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def session(self) -> Iterator[LedgerSession]:
        with self.connect() as con:
            yield DuckDBLedgerSession(con, self.deltas)

    @contextlib.contextmanager
    def delivery_lock(self, wait_s: float = 0.0) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + wait_s
        with open(self.lock_path, "w") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise SyncBusyError(
                            f"sync {self.sync!r} is being delivered by another run; try again when it ends"
                        ) from None
                    time.sleep(0.1)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ ledger
    def settled_count(self, start: dt.datetime | None, end: dt.datetime) -> int:
        if not self.db_path.exists():
            return 0
        with self.connect(read_only=True) as con:
            sql = "SELECT count(*) FROM ledger WHERE updated_at < ? AND (? IS NULL OR updated_at >= ?)"
            return int(_one_row(con.execute(sql, [end, start, start]))[0])

    # ------------------------------------------------------------------ journal and recovery
    @contextlib.asynccontextmanager
    async def journal(self) -> AsyncIterator[Journal]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.journal_path, "a") as handle:
            yield FileJournal(handle)
            handle.truncate(0)

    def _journal_records(self) -> JournalRecords:
        records = JournalRecords()
        if self.journal_path.exists():
            for line in self.journal_path.read_text().splitlines():
                records.add_line(line)
        return records

    def _planned_batches(self) -> list[tuple[str, int]]:
        with self.connect() as con:
            return [
                (b, int(n))
                for b, n in con.execute("SELECT batch_id, count(*) FROM planned GROUP BY 1").fetchall()
            ]

    def _apply_recovery(self, plan: RecoveryPlan, policy: AmbiguousPolicy) -> None:
        with self.connect() as con:
            con.begin()  # settle and clear the planned rows at once (see Delivery._settle)
            if plan.answered.num_rows:
                con.register("answered", plan.answered)
                con.register("listed", plan.listed)
                con.execute(
                    "INSERT INTO ledger (row_hash, updated_at, status, batch_id, identifier, message, "
                    "run_id, changed_at, identifier_hash) SELECT p.row_hash, p.updated_at, "
                    "CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END, p.batch_id, "
                    "p.identifier, k.message, p.run_id, now(), p.identifier_hash FROM planned p "
                    "JOIN answered a USING (batch_id) "
                    "LEFT JOIN listed k ON k.row_hash = p.row_hash AND k.batch_id = p.batch_id "
                    "WHERE CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END IS NOT NULL"
                )
                con.unregister("answered")
                con.unregister("listed")
            if plan.ambiguous and policy == "hold":
                con.register("amb", pa.table({"batch_id": pa.array(plan.ambiguous, pa.string())}))
                con.execute(
                    "INSERT INTO ledger (row_hash, updated_at, status, batch_id, identifier, message, "
                    "run_id, changed_at, identifier_hash) SELECT row_hash, updated_at, 'held', batch_id, "
                    "identifier, ?, run_id, now(), identifier_hash FROM planned "
                    "WHERE batch_id IN (SELECT batch_id FROM amb)",
                    [AMBIGUOUS_MESSAGE],
                )
                held = con.execute(
                    "SELECT row_hash, run_id FROM planned WHERE batch_id IN (SELECT batch_id FROM amb)"
                ).fetchall()
                con.unregister("amb")
                # `planned` keeps no objects: the crashed run's delta file has them
                objects = self.deltas.objects([h for h, _ in held], sorted({r for _, r in held if r}))
                DuckDBLedgerSession(con, self.deltas)._insert(
                    "held_details", held_details_table(dict(objects))
                )
            con.execute("DELETE FROM planned")
            con.commit()
        self.journal_path.write_text("")

    # ------------------------------------------------------------------ held rows
    def held_rows(self, row_hashes: list[str] | None = None) -> list[dict[str, Any]]:
        if not self.db_path.exists():
            return []
        with self.connect() as con:
            where = ""
            if row_hashes is not None:
                con.register("chosen", pa.table({"row_hash": pa.array(row_hashes, pa.string())}))
                where = " AND l.row_hash IN (SELECT row_hash FROM chosen)"
            cursor = con.execute(
                "SELECT l.row_hash, l.updated_at, l.batch_id, l.identifier, l.message, l.run_id, "
                "d.id_type, d.id_value, d.kind, d.name, d.sent_time FROM ledger l "
                "LEFT JOIN (SELECT DISTINCT ON (row_hash) * FROM held_details) d USING (row_hash) "
                f"WHERE l.status = 'held'{where} ORDER BY l.updated_at, l.row_hash"
            )
            names = [c[0] for c in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _forget_held(self, row_hashes: list[str] | None) -> tuple[int, dt.datetime | None]:
        with self.connect() as con:
            where = "status = 'held'"
            if row_hashes is not None:
                con.register("chosen", pa.table({"row_hash": pa.array(row_hashes, pa.string())}))
                where += " AND row_hash IN (SELECT row_hash FROM chosen)"
            con.begin()
            count, earliest = _one_row(
                con.execute(f"SELECT count(*), min(updated_at) FROM ledger WHERE {where}")
            )
            con.execute(
                f"DELETE FROM held_details WHERE row_hash IN (SELECT row_hash FROM ledger WHERE {where})"
            )
            con.execute(f"DELETE FROM ledger WHERE {where}")
            con.commit()
        return int(count), earliest

    def _settle_held(self, messages: dict[str, str], status: str) -> int:
        with self.connect() as con:
            con.register(
                "decided",
                pa.table(
                    {
                        "row_hash": pa.array(list(messages), pa.string()),
                        "message": pa.array(list(messages.values()), pa.string()),
                    }
                ),
            )
            con.begin()
            count = _one_row(
                con.execute(
                    "SELECT count(*) FROM ledger WHERE status = 'held' AND row_hash IN "
                    "(SELECT row_hash FROM decided)"
                )
            )[0]
            con.execute(
                "UPDATE ledger SET status = ?, message = d.message, changed_at = now() "
                "FROM decided d WHERE ledger.row_hash = d.row_hash AND ledger.status = 'held'",
                [status],
            )
            if status != "held":
                con.execute("DELETE FROM held_details WHERE row_hash IN (SELECT row_hash FROM decided)")
            con.commit()
            con.unregister("decided")
        return int(count)

    # ------------------------------------------------------------------ small files
    def _replace(self, path: Path, text: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def read_watermark(self) -> Watermark:
        try:
            return Watermark.from_json(self.watermark_path.read_text())
        except FileNotFoundError:
            return Watermark()

    def _write_watermark(self, watermark: Watermark) -> None:
        self._replace(self.watermark_path, watermark.to_json())

    def settled_parts(self) -> dict[str, str]:
        try:
            parts: dict[str, str] = json.loads(self.parts_path.read_text())
            return parts
        except FileNotFoundError:
            return {}

    def add_settled_parts(self, parts: dict[str, str]) -> None:
        if parts:
            self._replace(self.parts_path, json.dumps({**self.settled_parts(), **parts}))
