"""Durable delivery state of one sync: the row ledger, the request journal and the watermark.

Layout under the state directory (one set per sync, so syncs never contend):

* ``<sync>.duckdb`` - the ledger: one row per CDI row this sync has settled, with the row's stable
  hash and its status:
    - ``accepted``  Braze acknowledged it; never sent again (re-runs, retries, backfills);
    - ``failed``    Braze refused it for good (its message kept);
    - ``invalid``   failed validation, never sent (its reasons kept);
    - ``held``      outcome unknown (docs/architecture.md, Delivery guarantees), parked until a
                    person decides.
  The ledger is append-only (no index to maintain: appends stay fast and memory flat however large
  it grows); only the run holding the delivery lock appends, and only rows it found unsettled.
  Beside it, ``planned`` holds the rows of the chunk being sent right now, with their request ids,
  and ``held_details`` what a person's reconcile needs to ask Braze about each held event or
  purchase (the unmasked identifier, the event name or product_id and the time sent); a row's
  details go when it stops being held.
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
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from braze_assets.config import AmbiguousPolicy
from braze_assets.delta_files import DeltaFiles

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
CREATE TABLE IF NOT EXISTS held_details (
    row_hash   VARCHAR NOT NULL,
    id_type    VARCHAR NOT NULL,  -- external_id | user_alias | braze_id | email | phone
    id_value   VARCHAR NOT NULL,  -- user_alias: {"alias_name": .., "alias_label": ..} as JSON
    kind       VARCHAR NOT NULL,  -- event | purchase
    name       VARCHAR NOT NULL,  -- the event name or the product_id
    sent_time  TIMESTAMPTZ NOT NULL  -- the object's `time` (UPDATED_AT when the payload had none)
);
"""
HELD_DETAILS_SCHEMA = pa.schema(
    [
        ("row_hash", pa.string()),
        ("id_type", pa.string()),
        ("id_value", pa.string()),
        ("kind", pa.string()),
        ("name", pa.string()),
        ("sent_time", pa.timestamp("us", tz="UTC")),
    ]
)
#: How Braze picks the user an object names [B1.3]: the first of these the object carries.
_IDENTITY_ORDER = ("external_id", "user_alias", "braze_id", "email", "phone")
_JAVA_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}):(\d{3})(Z|[+-]\d{4})$")


def _sent_time(value: object) -> dt.datetime | None:
    """An object's `time` (ISO 8601 or `yyyy-MM-dd'T'HH:mm:ss:SSSZ`) in UTC; naive means UTC."""
    if not isinstance(value, str):
        return None
    java = _JAVA_TIME.match(value)
    if java:
        value = f"{java[1]}.{java[2]}{'+0000' if java[3] == 'Z' else java[3]}"
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def held_detail(raw: bytes) -> tuple[str, str, str, str, dt.datetime] | None:
    """What reconcile needs of a sent object: (id_type, id_value, kind, name, time), or None for
    objects Braze cannot be asked about (attributes, deletions)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None  # a deletion: [key, id]
    if isinstance(obj.get("product_id"), str):
        kind, name = "purchase", obj["product_id"]
    elif isinstance(obj.get("name"), str):
        kind, name = "event", obj["name"]
    else:
        return None
    sent = _sent_time(obj.get("time"))
    id_type = next((key for key in _IDENTITY_ORDER if obj.get(key) is not None), None)
    if sent is None or id_type is None:
        return None
    value = obj[id_type]
    if id_type == "user_alias":
        if not isinstance(value, dict):
            return None
        value = alias_key(value.get("alias_name"), value.get("alias_label"))
    return id_type, str(value), kind, name, sent


def alias_key(name: object, label: object) -> str:
    """A user alias as `held_details.id_value` keeps it."""
    return orjson.dumps({"alias_name": name, "alias_label": label}).decode()


#: DuckDB's buffer pool for a ledger connection: scans stream, so this bounds memory, not size.
LEDGER_MEMORY_LIMIT = "256MB"


def _migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Ledgers written before the append-only layout kept a PRIMARY KEY and `planned` rows inline."""
    keyed = con.execute(
        "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'ledger' "
        "AND constraint_type = 'PRIMARY KEY'"
    ).fetchall()[0][0]
    if not keyed:
        return
    con.execute("BEGIN TRANSACTION")
    con.execute(
        "INSERT INTO planned SELECT row_hash, updated_at, batch_id, identifier, run_id "
        "FROM ledger WHERE status = 'planned'"
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
        self.deltas = DeltaFiles(self.dir / "deltas", sync_name)

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
    def known_hashes(
        con: duckdb.DuckDBPyConnection,
        hashes: list[str],
        *,
        since: dt.datetime | None = None,
        between: tuple[dt.datetime, dt.datetime] | None = None,
    ) -> set[str]:
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
                + (" WHERE " + " AND ".join(where) if where else ""),
                params,
            ).fetchall()
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

    def append(self, con: duckdb.DuckDBPyConnection, rows: pa.Table) -> None:
        """Record settled rows (ledger columns; `changed_at` added). Callers hold the delivery
        lock and append only rows the ledger does not have.

        An optional `object` column (the objects as sent) keeps `held_details` of the rows held;
        without it, a held row's object is looked up in its run's delta file."""
        objects = None
        if "object" in rows.column_names:
            objects = rows["object"]
            rows = rows.drop_columns(["object"])
        if "changed_at" not in rows.column_names:
            now = dt.datetime.now(dt.UTC)
            rows = rows.append_column(
                "changed_at", pa.array([now] * rows.num_rows, pa.timestamp("us", tz="UTC"))
            )
        self._insert(con, "ledger", rows)
        is_held = pc.equal(rows["status"], "held")
        if rows.num_rows and pc.any(is_held).as_py():
            held = pc.indices_nonzero(is_held)
            hashes = rows["row_hash"].take(held).to_pylist()
            if objects is not None:
                found = dict(zip(hashes, objects.take(held).to_pylist(), strict=True))
            else:
                run_ids = (
                    sorted({r for r in rows["run_id"].to_pylist() if r})
                    if "run_id" in rows.column_names
                    else []
                )
                found = self._objects_from_deltas(hashes, run_ids)
            self._keep_held_details(con, found)

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
            sql = "SELECT count(*) FROM ledger WHERE updated_at < ? AND (? IS NULL OR updated_at >= ?)"
            return int(_one_row(con.execute(sql, [end, start, start]))[0])

    def status_counts(self) -> dict[str, int]:
        if not self.db_path.exists():
            return {}
        with self.connect(read_only=True) as con:
            return dict(con.execute("SELECT status, count(*) FROM ledger GROUP BY 1").fetchall())

    # ------------------------------------------------------------------ held rows: a person decides
    def _keep_held_details(self, con: duckdb.DuckDBPyConnection, objects: Mapping[str, bytes | None]) -> None:
        rows = [
            (h, *detail)
            for h, raw in objects.items()
            if raw is not None and (detail := held_detail(raw)) is not None
        ]
        if rows:
            self._insert(
                con,
                "held_details",
                pa.Table.from_pylist(
                    [dict(zip(HELD_DETAILS_SCHEMA.names, r, strict=True)) for r in rows],
                    HELD_DETAILS_SCHEMA,
                ),
            )

    def _objects_from_deltas(self, hashes: list[str], run_ids: list[str]) -> dict[str, bytes]:
        return self.deltas.objects(hashes, run_ids)

    def held_rows(self, row_hashes: list[str] | None = None) -> list[dict]:
        """Held rows (all, or those of `row_hashes`) with their details where kept: row_hash,
        updated_at, batch_id, identifier (masked), message, run_id, id_type, id_value, kind,
        name, sent_time (None when no details were kept)."""
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
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    @staticmethod
    def _chosen(con: duckdb.DuckDBPyConnection, row_hashes: list[str] | None) -> str:
        where = "status = 'held'"
        if row_hashes is not None:
            con.register("chosen", pa.table({"row_hash": pa.array(row_hashes, pa.string())}))
            where += " AND row_hash IN (SELECT row_hash FROM chosen)"
        return where

    def release_held(self, row_hashes: list[str] | None = None) -> int:
        """A person decided held rows should be sent again: forget them so the next run does.

        The watermark says every row at or before it is settled, so it moves back to just before
        the earliest row forgotten: the next scheduled run reads those rows again, however far
        behind its lookback they lie. Call with the delivery lock held (see `release.py`)."""
        with self.connect() as con:
            con.begin()
            where = self._chosen(con, row_hashes)
            count, earliest = _one_row(
                con.execute(f"SELECT count(*), min(updated_at) FROM ledger WHERE {where}")
            )
            con.execute(
                f"DELETE FROM held_details WHERE row_hash IN (SELECT row_hash FROM ledger WHERE {where})"
            )
            con.execute(f"DELETE FROM ledger WHERE {where}")
            con.commit()
        watermark = self.read_watermark()
        if earliest is not None and watermark.value is not None and watermark.value >= earliest:
            self.write_watermark(
                Watermark(earliest - dt.timedelta(microseconds=1), updated_by_run="release_held")
            )
        return int(count)

    def mark_held_delivered(self, messages: dict[str, str]) -> int:
        """A person (or a reconcile with Braze's evidence) settled held rows as accepted: never
        sent again; `messages` gives each row's reason, kept in the ledger."""
        return self._settle_held(messages, "accepted")

    def note_held(self, messages: dict[str, str]) -> int:
        """Rows that stay held, with why (kept in the ledger's message)."""
        return self._settle_held(messages, "held")

    def _settle_held(self, messages: dict[str, str], status: str) -> int:
        if not messages:
            return 0
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

    # ------------------------------------------------------------------ journal and recovery
    def journal_start(self, handle: TextIO, batch_id: str) -> None:
        handle.write(f"S {batch_id}\n")
        handle.flush()  # in the OS before the request leaves: survives kill -9

    def journal_done(
        self, handle: TextIO, batch_id: str, rows: list[tuple[str, str | None, str | None]]
    ) -> None:
        """The known outcome of a request: its rows that were not accepted, as (row_hash, status
        or None to resend, message); every other row of the request was accepted."""
        handle.write("D " + json.dumps({"batch": batch_id, "rows": rows, "others": "accepted"}) + "\n")
        handle.flush()

    def _read_journal(self) -> tuple[set[str], dict[str, dict[str, Any]]]:
        """Requests that went on the wire (`S`), and the journaled answers (`D`) by request id."""
        started: set[str] = set()
        done: dict[str, dict[str, Any]] = {}
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

    def recover(self, policy: AmbiguousPolicy) -> dict[str, int]:
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
                con.register(
                    "answered",
                    pa.table(
                        {
                            "batch_id": pa.array([a[0] for a in answered], pa.string()),
                            "others": pa.array([a[1] for a in answered], pa.string()),
                        }
                    ),
                )
                con.register(
                    "listed",
                    pa.table(
                        {
                            "row_hash": pa.array([r[0] for r in listed], pa.string()),
                            "batch_id": pa.array([r[1] for r in listed], pa.string()),
                            "status": pa.array([r[2] for r in listed], pa.string()),
                            "message": pa.array([r[3] for r in listed], pa.string()),
                        }
                    ),
                )
                con.execute(
                    "INSERT INTO ledger SELECT p.row_hash, p.updated_at, "
                    "CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END, p.batch_id, "
                    "p.identifier, k.message, p.run_id, now() FROM planned p "
                    "JOIN answered a USING (batch_id) "
                    "LEFT JOIN listed k ON k.row_hash = p.row_hash AND k.batch_id = p.batch_id "
                    "WHERE CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END IS NOT NULL"
                )
                con.unregister("answered")
                con.unregister("listed")
            if ambiguous_batches and policy == "hold":
                con.register("amb", pa.table({"batch_id": pa.array(ambiguous_batches, pa.string())}))
                con.execute(
                    "INSERT INTO ledger SELECT row_hash, updated_at, 'held', batch_id, identifier, "
                    "'outcome unknown: the process stopped while this request was in flight', "
                    "run_id, now() FROM planned WHERE batch_id IN (SELECT batch_id FROM amb)"
                )
                held = con.execute(
                    "SELECT row_hash, run_id FROM planned WHERE batch_id IN (SELECT batch_id FROM amb)"
                ).fetchall()
                con.unregister("amb")
                # `planned` keeps no objects: the crashed run's delta file has them
                self._keep_held_details(
                    con, self._objects_from_deltas([h for h, _ in held], sorted({r for _, r in held if r}))
                )
            con.execute("DELETE FROM planned")
            con.commit()
        self.journal_path.write_text("")
        return counts

    # ------------------------------------------------------------------ delta files
    def delta_dir(self, run_id: str) -> Path:
        return self.deltas.run_dir(run_id)

    def prune_deltas(self, keep: int = 5) -> int:
        return self.deltas.prune(keep)

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
