"""The embedded state backend: DuckDB and small files under one directory, nothing to start.

Layout under the state directory (one set per sync, so syncs never contend):

* ``<sync>.duckdb`` - ledger, planned and held_details (base.py). The ledger is append-only (no
  index to maintain: appends stay fast and memory flat however large it grows; probes skip row
  groups by their min/max UPDATED_AT and changed_at).
* ``<sync>.journal`` - an append-only line per request (`S <id>` before it goes on the wire,
  `R <id>` when Braze refused that attempt unprocessed and it waits to go again, `D <json>` with
  its known outcome after), flushed to the OS at once, so it survives kill -9.
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
    Journal,
    LedgerSession,
    StateStore,
    SyncBusyError,
    Watermark,
    nothing_remembered,
)
from braze_assets.state.embedded_ledger import (
    LEDGER_CHECKPOINT_THRESHOLD,
    LEDGER_MEMORY_LIMIT,
    SCHEMA,
    DuckDBLedgerSession,
    migrate,
    one_row,
)
from braze_assets.state.embedded_log import EmbeddedSyncLog
from braze_assets.state.held import held_details_table
from braze_assets.state.recovery import AMBIGUOUS_MESSAGE, JournalRecords, RecoveryPlan, done_record


class FileJournal(Journal):
    """The journal as lines in a file, each flushed to the OS before the call returns."""

    def __init__(self, handle: TextIO):
        self.handle = handle

    async def started(self, batch_id: str) -> None:
        self.handle.write(f"S {batch_id}\n")
        self.handle.flush()  # in the OS before the request leaves: survives kill -9

    async def refused(self, batch_id: str) -> None:
        self.handle.write(f"R {batch_id}\n")
        self.handle.flush()  # in the OS before the backoff: a kill then leaves it unsent

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
                if "lock" not in str(exc).lower():
                    raise
                if time.monotonic() > deadline:
                    raise SyncBusyError(
                        f"the state of sync {self.sync!r} has been in use by another process (a run "
                        f"delivering, or a release) for over {self.lock_timeout_s:g} s; try again when "
                        "it ends"
                    ) from None
                time.sleep(0.2)
        try:
            con.execute(f"SET memory_limit = '{LEDGER_MEMORY_LIMIT}'")
            con.execute(f"SET checkpoint_threshold = '{LEDGER_CHECKPOINT_THRESHOLD}'")
            if not read_only:
                con.execute(SCHEMA)
                migrate(con)
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
                            f"sync {self.sync!r} is being delivered by another run or released from the "
                            "release_held_job; try again when it ends"
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
            return int(one_row(con.execute(sql, [end, start, start]))[0])

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
            held: list[tuple[str, str | None]] = []  # (row_hash, run_id) of every row held here
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
                # rows the dead run held itself (their answer was lost) need what reconcile asks
                held += con.execute(
                    "SELECT p.row_hash, p.run_id FROM planned p JOIN listed k "
                    "ON k.row_hash = p.row_hash AND k.batch_id = p.batch_id WHERE k.status = 'held'"
                ).fetchall()
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
                held += con.execute(
                    "SELECT row_hash, run_id FROM planned WHERE batch_id IN (SELECT batch_id FROM amb)"
                ).fetchall()
                con.unregister("amb")
            if held:
                # `planned` keeps no objects: the crashed run's delta file has them
                objects = self.deltas.objects([h for h, _ in held], sorted({r for _, r in held if r}))
                DuckDBLedgerSession(con, self.deltas)._insert(
                    "held_details", held_details_table(dict(objects))
                )
            maybe = [*plan.answered["batch_id"].to_pylist(), *plan.ambiguous]
            _forget_users_braze_may_have_changed(DuckDBLedgerSession(con, self.deltas), maybe)
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
            count, earliest = one_row(
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
            count = one_row(
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

    def forget_settled_parts(self) -> None:
        self.parts_path.unlink(missing_ok=True)


def _forget_users_braze_may_have_changed(ledger: DuckDBLedgerSession, batch_ids: list[str]) -> None:
    """The users of the planned rows of requests Braze answered or may have applied (`batch_ids`)
    are remembered as holding nothing (`nothing_remembered`), in recovery's transaction."""
    if not batch_ids:
        return
    con = ledger.con
    con.register("maybe", pa.table({"batch_id": pa.array(batch_ids, pa.string())}))
    try:
        users = con.sql(
            "SELECT DISTINCT user_key FROM planned "
            "WHERE user_key IS NOT NULL AND batch_id IN (SELECT batch_id FROM maybe)"
        ).to_arrow_table()["user_key"]
    finally:
        con.unregister("maybe")
    if len(users):
        ledger.remember(nothing_remembered(users.combine_chunks()))
