"""Durable delivery state of one sync: the row ledger, the request journal and the watermark.

Layout under the state directory (one set per sync, so syncs never contend):

* ``<sync>.duckdb`` - the ledger: one row per CDI row this sync has settled, with the row's stable
  hash and its status:
    - ``accepted``  Braze acknowledged it; never sent again (re-runs, retries, backfills);
    - ``failed``    Braze refused it for good (its message kept);
    - ``invalid``   failed validation, never sent (its reasons kept);
    - ``held``      outcome unknown (see DESIGN §3), parked until a person releases it.
  The ledger is append-only (no index to maintain: appends stay fast and memory flat however large
  it grows); only the run holding the delivery lock appends, and only rows it found unsettled.
  Beside it, ``planned`` holds the rows of the chunk being sent right now, with their request ids.
* ``<sync>.journal`` - an append-only line per request just before it goes on the wire, and one
  with its known outcome after. After a crash, a planned request found in the journal without an
  outcome may have reached Braze (ambiguous); one not in it never left the machine.
* ``<sync>.lock`` - an flock held by the run delivering, so recovery never races a live sender.
* ``<sync>.watermark.json`` - watermark and late-row accounting, replaced atomically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa

TERMINAL = ("accepted", "failed", "invalid", "held")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    row_hash   VARCHAR NOT NULL,
    updated_at TIMESTAMPTZ,
    status     VARCHAR NOT NULL,
    batch_id   VARCHAR,
    identifier VARCHAR,
    message    VARCHAR,
    run_id     VARCHAR,
    changed_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS planned (
    row_hash   VARCHAR NOT NULL,
    updated_at TIMESTAMPTZ,
    batch_id   VARCHAR NOT NULL,
    identifier VARCHAR,
    run_id     VARCHAR
);
"""
#: DuckDB's buffer pool for a ledger connection: scans stream, so this bounds memory, not size.
LEDGER_MEMORY_LIMIT = "256MB"


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Ledgers written before the append-only layout kept a PRIMARY KEY and `planned` rows inline."""
    keyed = con.execute(
        "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'ledger' "
        "AND constraint_type = 'PRIMARY KEY'").fetchall()[0][0]
    if not keyed:
        return
    con.execute("BEGIN TRANSACTION")
    con.execute("INSERT INTO planned SELECT row_hash, updated_at, batch_id, identifier, run_id "
                "FROM ledger WHERE status = 'planned'")
    con.execute("CREATE TABLE ledger_v2 AS SELECT * FROM ledger WHERE status <> 'planned'")
    con.execute("DROP TABLE ledger")
    con.execute("ALTER TABLE ledger_v2 RENAME TO ledger")
    con.execute("COMMIT")


class SyncBusyError(RuntimeError):
    """Another run is delivering this sync right now."""


@dataclass
class Watermark:
    """Every row with UPDATED_AT <= `value` is settled (accepted, failed, invalid or held).
    Scheduled runs rescan from `value - lookback`, so late rows inside the window still go out."""

    value: dt.datetime | None = None
    updated_by_run: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        data["value"] = self.value.isoformat() if self.value else None
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Watermark:
        data = json.loads(text)
        data["value"] = dt.datetime.fromisoformat(data["value"]) if data.get("value") else None
        return cls(**data)


class StateStore:
    """The state of one sync under `state_dir`."""

    def __init__(self, state_dir: str | Path, sync_name: str, lock_timeout_s: float = 600.0):
        self.dir = Path(state_dir)
        self.sync = sync_name
        self.db_path = self.dir / f"{sync_name}.duckdb"
        self.journal_path = self.dir / f"{sync_name}.journal"
        self.lock_path = self.dir / f"{sync_name}.lock"
        self.watermark_path = self.dir / f"{sync_name}.watermark.json"
        self.lock_timeout_s = lock_timeout_s

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
            if not read_only:
                con.execute(_SCHEMA)
                _migrate(con)
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def delivery_lock(self) -> Iterator[None]:
        """Exclusive right to send for this sync; released by the OS if the process dies."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SyncBusyError(
                    f"sync {self.sync!r} is being delivered by another run; try again when it ends"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # ------------------------------------------------------------------ ledger
    @staticmethod
    def known_hashes(con: duckdb.DuckDBPyConnection, hashes: list[str], *,
                     since: dt.datetime | None = None,
                     between: tuple[dt.datetime, dt.datetime] | None = None) -> set[str]:
        """Which of these rows the ledger has settled. `since`: only rows settled from then on;
        `between`: the rows' UPDATED_AT range (a row's hash includes its UPDATED_AT, so settled
        rows outside it cannot match). Both let DuckDB skip row groups by their min/max."""
        if not hashes:
            return set()
        where, params = [], []
        if since is not None:
            where.append("l.changed_at >= ?")
            params.append(since)
        if between is not None:
            where.append("l.updated_at BETWEEN ? AND ?")
            params += list(between)
        probe = pa.table({"row_hash": pa.array(hashes, pa.string())})
        con.register("probe", probe)
        try:
            rows = con.execute(
                "SELECT DISTINCT l.row_hash FROM ledger l SEMI JOIN probe p USING (row_hash)"
                + (" WHERE " + " AND ".join(where) if where else ""), params).fetchall()
        finally:
            con.unregister("probe")
        return {r[0] for r in rows}

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
        if rows.num_rows:
            con.register("incoming", rows)
            try:
                cols = ", ".join(rows.column_names)
                con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM incoming")
            finally:
                con.unregister("incoming")

    @classmethod
    def append(cls, con: duckdb.DuckDBPyConnection, rows: pa.Table) -> None:
        """Record settled rows (ledger columns; `changed_at` added). Callers hold the delivery
        lock and append only rows the ledger does not have."""
        if "changed_at" not in rows.column_names:
            now = dt.datetime.now(dt.timezone.utc)
            rows = rows.append_column("changed_at", pa.array([now] * rows.num_rows,
                                                             pa.timestamp("us", tz="UTC")))
        cls._insert(con, "ledger", rows)

    @classmethod
    def plan(cls, con: duckdb.DuckDBPyConnection, rows: pa.Table) -> None:
        """Rows about to be sent: row_hash, updated_at, batch_id, identifier, run_id."""
        cls._insert(con, "planned", rows)

    @staticmethod
    def clear_planned(con: duckdb.DuckDBPyConnection, prefix: str) -> None:
        """A planned chunk (request ids `<prefix>-<n>`) is settled, or to be sent again later."""
        con.execute("DELETE FROM planned WHERE batch_id LIKE ?", [f"{prefix}-%"])

    def settled_count(self, start: dt.datetime | None, end: dt.datetime) -> int:
        """Settled rows with start <= UPDATED_AT < end (to find rows older than the scan window)."""
        if not self.db_path.exists():
            return 0
        with self.connect(read_only=True) as con:
            return con.execute(
                "SELECT count(*) FROM ledger WHERE updated_at < ? "
                "AND (? IS NULL OR updated_at >= ?)", [end, start, start]
            ).fetchone()[0]

    def status_counts(self) -> dict[str, int]:
        if not self.db_path.exists():
            return {}
        with self.connect(read_only=True) as con:
            return dict(con.execute("SELECT status, count(*) FROM ledger GROUP BY 1").fetchall())

    def release_held(self, row_hashes: list[str] | None = None) -> int:
        """A person decided held rows should be sent again: forget them so the next run does."""
        with self.connect() as con:
            where = "status = 'held'"
            if row_hashes is not None:
                con.register("chosen", pa.table({"row_hash": pa.array(row_hashes, pa.string())}))
                where += " AND row_hash IN (SELECT row_hash FROM chosen)"
            count = con.execute(f"SELECT count(*) FROM ledger WHERE {where}").fetchone()[0]
            con.execute(f"DELETE FROM ledger WHERE {where}")
        return int(count)

    # ------------------------------------------------------------------ journal and recovery
    def journal_start(self, handle, batch_id: str) -> None:
        handle.write(f"S {batch_id}\n")
        handle.flush()  # in the OS before the request leaves: survives kill -9

    def journal_done(self, handle, batch_id: str, rows: list[tuple[str, str | None, str | None]]):
        """The known outcome of a request: its rows that were not accepted, as (row_hash, status
        or None to resend, message); every other row of the request was accepted."""
        handle.write("D " + json.dumps({"batch": batch_id, "rows": rows, "others": "accepted"})
                     + "\n")
        handle.flush()

    def _read_journal(self) -> tuple[set[str], dict[str, list]]:
        started, done = set(), {}
        if self.journal_path.exists():
            for line in self.journal_path.read_text().splitlines():
                kind, _, rest = line.partition(" ")
                if kind == "S":
                    started.add(rest.strip())
                elif kind == "D":
                    try:
                        record = json.loads(rest)
                    except json.JSONDecodeError:
                        continue  # a line cut short by the crash: that request stays ambiguous
                    done[record["batch"]] = record
        return started, done

    def recover(self, policy: str) -> dict[str, int]:
        """Settle `planned` rows left by a run that died. Call with the delivery lock held.

        Requests whose answer was journaled get that outcome; those that never went on the wire
        are forgotten (sent again); those sent without a journaled answer are ambiguous: held, or
        forgotten so they are resent, by the sync's policy.
        """
        started, done = self._read_journal()
        counts = {"recovered_settled": 0, "recovered_ambiguous": 0, "recovered_unsent": 0}
        with self.connect() as con:
            con.begin()  # settle and clear the planned rows at once (see Delivery._send_chunk)
            planned = con.execute("SELECT batch_id, count(*) FROM planned GROUP BY 1").fetchall()
            listed, answered, ambiguous_batches = [], [], []
            for batch_id, count in planned:
                if batch_id in done:
                    listed += [(r[0], batch_id, r[1], r[2]) for r in done[batch_id]["rows"]]
                    answered.append((batch_id, done[batch_id].get("others")))
                    counts["recovered_settled"] += count
                elif batch_id in started:
                    ambiguous_batches.append(batch_id)
                    counts["recovered_ambiguous"] += count
                else:
                    counts["recovered_unsent"] += count
            if answered:
                # Listed rows take their status (None: send again); the others take the request's
                # (journals written before "others" listed every row: the rest were not settled).
                con.register("answered", pa.table({
                    "batch_id": pa.array([a[0] for a in answered], pa.string()),
                    "others": pa.array([a[1] for a in answered], pa.string())}))
                con.register("listed", pa.table({
                    "row_hash": pa.array([r[0] for r in listed], pa.string()),
                    "batch_id": pa.array([r[1] for r in listed], pa.string()),
                    "status": pa.array([r[2] for r in listed], pa.string()),
                    "message": pa.array([r[3] for r in listed], pa.string())}))
                con.execute(
                    "INSERT INTO ledger SELECT p.row_hash, p.updated_at, "
                    "CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END, p.batch_id, "
                    "p.identifier, k.message, p.run_id, now() FROM planned p "
                    "JOIN answered a USING (batch_id) "
                    "LEFT JOIN listed k ON k.row_hash = p.row_hash AND k.batch_id = p.batch_id "
                    "WHERE CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END IS NOT NULL")
                con.unregister("answered")
                con.unregister("listed")
            if ambiguous_batches and policy == "hold":
                con.register("amb", pa.table({"batch_id": pa.array(ambiguous_batches, pa.string())}))
                con.execute(
                    "INSERT INTO ledger SELECT row_hash, updated_at, 'held', batch_id, identifier, "
                    "'outcome unknown: the process stopped while this request was in flight', "
                    "run_id, now() FROM planned WHERE batch_id IN (SELECT batch_id FROM amb)"
                )
                con.unregister("amb")
            con.execute("DELETE FROM planned")
            con.commit()
        self.journal_path.write_text("")
        return counts

    # ------------------------------------------------------------------ delta files
    def delta_dir(self, run_id: str) -> Path:
        return self.dir / "deltas" / self.sync / run_id

    def prune_deltas(self, keep: int = 5) -> int:
        """Delete all but the newest `keep` runs' delta files (the ledger keeps every outcome)."""
        import shutil

        root = self.dir / "deltas" / self.sync
        runs = sorted(root.iterdir(), key=lambda p: p.stat().st_mtime) if root.exists() else []
        for old in runs[:-keep] if keep else runs:
            shutil.rmtree(old, ignore_errors=True)
        return max(0, len(runs) - keep)

    # ------------------------------------------------------------------ settled parts (files)
    @property
    def _parts_path(self) -> Path:
        return self.dir / f"{self.sync}.settled_files.json"

    def settled_parts(self) -> dict[str, str]:
        try:
            return json.loads(self._parts_path.read_text())
        except FileNotFoundError:
            return {}

    def add_settled_parts(self, parts: dict[str, str]) -> None:
        if parts:
            merged = {**self.settled_parts(), **parts}
            tmp = self._parts_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(merged))
            os.replace(tmp, self._parts_path)

    # ------------------------------------------------------------------ watermark
    def read_watermark(self) -> Watermark:
        try:
            return Watermark.from_json(self.watermark_path.read_text())
        except FileNotFoundError:
            return Watermark()

    def write_watermark(self, watermark: Watermark) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.watermark_path.with_suffix(".tmp")
        tmp.write_text(watermark.to_json())
        os.replace(tmp, self.watermark_path)
