"""The PostgreSQL state backend: every sync's state in one schema, for runs in fresh pods.

Same tables as the embedded backend, plus a `sync` column (postgres_schema.py, migrations/).
What differs, and why:

* the delivery lock is a session-level advisory lock on its own connection: the server drops it
  when the holder's connection dies, so a killed pod never blocks its sync (the connection asks
  the server to probe an idle peer every few seconds, so a pod that vanished without closing its
  socket is noticed too);
* rows go in with COPY; the ledger's primary key makes a row settled twice impossible (the first
  settlement is kept);
* `planned` keeps a chunk as one row (its rows as an Arrow stream), so planning and clearing the
  chunk being sent costs a row, not an index entry per CDI row;
* the journal is a table; requests waiting to go on the wire share one INSERT (group commit), so
  journaling costs a round trip per batch of requests, not per request, and a request still
  leaves only once its `S` record is committed;
* recovery settles the planned rows and empties the journal in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg2.errors import UniqueViolation

from braze_assets.config import AmbiguousPolicy
from braze_assets.delta_files import DeltaFiles
from braze_assets.state.base import (
    PLANNED_COLUMNS,
    REMEMBERED_COLUMNS,
    REMEMBERED_SQL,
    Journal,
    LedgerSession,
    StateStore,
    SyncBusyError,
    Watermark,
    remembered_schema,
)
from braze_assets.state.held import held_details_table
from braze_assets.state.postgres_log import PostgresSyncLog
from braze_assets.state.postgres_schema import StateDatabase
from braze_assets.state.recovery import AMBIGUOUS_MESSAGE, JournalRecords, RecoveryPlan, done_record

_CSV = pacsv.WriteOptions(include_header=False)


def _copy(cursor: Any, table: str, sync: str, rows: pa.Table) -> None:
    """COPY Arrow rows (with the sync prepended) into `table`. pyarrow quotes every string, so an
    empty string stays one and a null (unquoted, empty) is NULL."""
    rows = rows.add_column(0, "sync", pa.array([sync] * rows.num_rows, pa.string()))
    for i, column in enumerate(rows.schema):
        if pa.types.is_timestamp(column.type) and column.type.tz is not None:
            # the same instants as naive UTC (the session's time zone is UTC): pyarrow formats a
            # zoned timestamp about fifteen times slower, the bulk of a chunk's COPY
            naive = rows.column(i).cast(pa.timestamp(column.type.unit))
            rows = rows.set_column(i, column.name, naive)
    buffer = io.BytesIO()
    pacsv.write_csv(rows, buffer, _CSV)
    buffer.seek(0)
    cursor.copy_expert(f"COPY {table} ({', '.join(rows.column_names)}) FROM STDIN WITH (FORMAT csv)", buffer)


def _lock_key(schema: str, sync: str) -> int:
    """A 64-bit advisory lock key per schema and sync."""
    digest = hashlib.blake2b(f"{schema}/{sync}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresLedgerSession(LedgerSession):
    """A ledger session on one connection; each call commits unless inside `transaction()`."""

    def __init__(self, connection: Any, sync: str, deltas: DeltaFiles):
        super().__init__(deltas)
        self.connection, self.sync = connection, sync
        self._depth = 0

    @contextlib.contextmanager
    def _unit(self) -> Iterator[Any]:
        with self.connection.cursor() as cursor:
            try:
                yield cursor
            except BaseException:
                if self._depth == 0:
                    self.connection.rollback()
                raise
        if self._depth == 0:
            self.connection.commit()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        except BaseException:
            self.connection.rollback()
            raise
        finally:
            self._depth -= 1
        self.connection.commit()

    def settled_since(self, since: dt.datetime) -> bool:
        with self._unit() as cursor:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM ledger WHERE sync = %s AND changed_at >= %s)",
                (self.sync, since),
            )
            return bool(cursor.fetchone()[0])

    def known_hashes(
        self,
        hashes: list[str],
        *,
        since: dt.datetime | None = None,
        between: tuple[dt.datetime, dt.datetime] | None = None,
    ) -> set[str]:
        if not hashes:
            return set()
        # One text parameter split by the server: psycopg2 would quote a list element by element
        # (about 40 ms for 20,000 hashes); row hashes are hex digests, never holding a comma.
        sql = "SELECT row_hash FROM ledger WHERE sync = %s AND row_hash = ANY(string_to_array(%s, ','))"
        params: list[Any] = [self.sync, ",".join(hashes)]
        if since is not None:
            sql += " AND changed_at >= %s"
            params.append(since)
        if between is not None:
            sql += " AND updated_at BETWEEN %s AND %s"
            params += list(between)
        with self._unit() as cursor:
            cursor.execute(sql, params)
            return {r[0] for r in cursor.fetchall()}

    def _insert(self, table: str, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        if table != "ledger":
            with self._unit() as cursor:
                _copy(cursor, table, self.sync, rows)
            return
        # Straight in: callers append only rows the ledger lacks (under the delivery lock). Should
        # one be there after all, the primary key refuses the COPY and the rows go again through a
        # staging table, keeping the first settlement, so a settle never fails on it.
        with self._unit() as cursor:
            cursor.execute("SAVEPOINT ledger_copy")
            try:
                _copy(cursor, "ledger", self.sync, rows)
            except UniqueViolation:
                cursor.execute("ROLLBACK TO SAVEPOINT ledger_copy")
                cursor.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS ledger_incoming (LIKE ledger) ON COMMIT DELETE ROWS"
                )
                cursor.execute("TRUNCATE ledger_incoming")
                _copy(cursor, "ledger_incoming", self.sync, rows)
                cols = ", ".join(["sync", *rows.column_names])
                cursor.execute(
                    f"INSERT INTO ledger ({cols}) SELECT {cols} FROM ledger_incoming ON CONFLICT DO NOTHING"
                )
            cursor.execute("RELEASE SAVEPOINT ledger_copy")

    def plan(self, rows: pa.Table) -> None:
        """A chunk's rows as one `planned` row per request-id prefix (normally one per call)."""
        prefixes = pc.unique(pc.replace_substring_regex(rows["batch_id"], r"-[^-]*$", "")).to_pylist()
        with self._unit() as cursor:
            for prefix in prefixes:
                mine = rows.filter(pc.starts_with(rows["batch_id"], f"{prefix}-"))
                cursor.execute(
                    "INSERT INTO planned (sync, prefix, rows) VALUES (%s, %s, decode(%s, 'hex'))",
                    (
                        self.sync,
                        prefix,
                        _to_ipc(mine.select([c for c in PLANNED_COLUMNS if c in mine.column_names])),
                    ),
                )

    def clear_planned(self, prefix: str) -> None:
        with self._unit() as cursor:
            cursor.execute("DELETE FROM planned WHERE sync = %s AND prefix = %s", (self.sync, prefix))

    def remembered_table(self, user_keys: pa.Array, attributes: bool = True) -> pa.Table:
        schema = remembered_schema(attributes)
        if not len(user_keys):
            return schema.empty_table()
        columns = ", ".join(REMEMBERED_SQL[name] for name in schema.names)
        with self._unit() as cursor:
            cursor.execute(  # user keys are hex digests: one text parameter, split by the server
                f"SELECT {columns} FROM remembered_attributes "
                "WHERE sync = %s AND user_key = ANY(string_to_array(%s, ','))",
                (self.sync, ",".join(user_keys.to_pylist())),
            )
            rows = cursor.fetchall()
        return pa.Table.from_pylist(
            [dict(zip(schema.names, row, strict=True)) for row in rows], schema=schema
        )

    def remembers_anyone(self) -> bool:
        with self._unit() as cursor:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM remembered_attributes WHERE sync = %s)", (self.sync,)
            )
            row = cursor.fetchone()
        return bool(row and row[0])

    def merge_remembered(self) -> None:
        """Nothing to fold: `remember` upserts at once, through the table's primary key."""

    def remember(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        with self._unit() as cursor:
            cursor.execute(
                "CREATE TEMP TABLE IF NOT EXISTS accepted_attributes (sync text, user_key text, "
                "payload_hash text, attributes text, payload_attributes integer) ON COMMIT DELETE ROWS"
            )
            cursor.execute("TRUNCATE accepted_attributes")
            _copy(cursor, "accepted_attributes", self.sync, rows.select(list(REMEMBERED_COLUMNS)))
            cursor.execute(
                "INSERT INTO remembered_attributes (sync, user_key, payload_hash, attributes, "
                "payload_attributes, changed_at) SELECT sync, user_key, payload_hash, attributes, "
                "payload_attributes, now() FROM accepted_attributes ON CONFLICT (sync, user_key) DO UPDATE "
                "SET payload_hash = EXCLUDED.payload_hash, attributes = EXCLUDED.attributes, "
                "payload_attributes = EXCLUDED.payload_attributes, changed_at = EXCLUDED.changed_at"
            )


#: Planned chunks are compressed here (zstd: a few milliseconds, a third of the size), not by the
#: server, whose TOAST compression of the blob cost more than the rest of planning (migration 0004).
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def _to_ipc(rows: pa.Table) -> str:
    """A chunk's rows as an Arrow stream, in hex for `decode(%s, 'hex')`: psycopg2 quotes bytes
    in the escape format, which is larger and slower for compressed data."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema, options=_IPC_OPTIONS) as writer:
        writer.write_table(rows)
    return sink.getvalue().hex().decode()


_NOTHING_PLANNED = pa.schema(
    [(c, pa.timestamp("us", tz="UTC") if c == "updated_at" else pa.string()) for c in PLANNED_COLUMNS]
)


def _from_ipc(blobs: list[bytes]) -> pa.Table:
    tables = [pa.ipc.open_stream(pa.py_buffer(blob)).read_all() for blob in blobs]
    if not tables:
        return _NOTHING_PLANNED.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")


class PostgresJournal(Journal):
    """The journal table, written by group commit (see the module docstring)."""

    def __init__(self, connection: Any, sync: str):
        self.connection, self.sync = connection, sync
        self._pending: list[tuple[str, str, str | None, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def started(self, batch_id: str) -> None:
        await self._write("S", batch_id, None)

    async def done(self, batch_id: str, rows: list[tuple[str, str | None, str | None]]) -> None:
        await self._write("D", batch_id, json.dumps(done_record(batch_id, rows)))

    async def _write(self, kind: str, batch_id: str, record: str | None) -> None:
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((kind, batch_id, record, written))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        await written

    async def _write_pending(self) -> None:
        while self._pending:
            records, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._insert, [(self.sync, b, k, r) for k, b, r, _ in records])
            except Exception as exc:  # each waiting request fails: none may go out unjournaled
                for *_, written in records:
                    if not written.done():
                        written.set_exception(exc)
                continue
            for *_, written in records:
                if not written.done():
                    written.set_result(None)

    def _insert(self, records: list[tuple[str, str, str, str | None]]) -> None:
        from psycopg2.extras import execute_values

        with self.connection.cursor() as cursor:
            execute_values(
                cursor,
                "INSERT INTO journal (sync, batch_id, kind, record) VALUES %s",
                records,
                page_size=1000,
            )

    async def drain(self) -> None:
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)


class PostgresStateStore(StateStore):
    """The state of one sync in PostgreSQL (see the module docstring)."""

    def __init__(self, url: str, sync: str, *, deltas: DeltaFiles, lock_timeout_s: float = 600.0):
        self.db = StateDatabase.from_url(url)
        super().__init__(sync, deltas, PostgresSyncLog(sync, self._cursor))
        self.lock_timeout_s = lock_timeout_s

    def __repr__(self) -> str:
        return f"PostgresStateStore({self.db.shown}, {self.sync!r})"

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        """A cursor in one transaction, committed when the block ends."""
        connection = self.db.connect(f"state {self.sync}")
        try:
            with connection, connection.cursor() as cursor:
                yield cursor
        finally:
            connection.close()

    def _all(self, sql: str, params: tuple[Any, ...] | list[Any] = ()) -> list[tuple[Any, ...]]:
        with self._cursor() as cursor:
            cursor.execute(sql, params)
            rows: list[tuple[Any, ...]] = cursor.fetchall()
            return rows

    # ------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def delivery_lock(self, wait_s: float = 0.0) -> Iterator[None]:
        connection = self.db.connect(f"delivery lock {self.sync}", autocommit=True)
        key = _lock_key(self.db.schema, self.sync)
        try:
            with connection.cursor() as cursor:
                # ...and the server notices a client that vanished while holding the lock
                cursor.execute(
                    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; "
                    "SET tcp_keepalives_count = 3"
                )
                deadline = time.monotonic() + wait_s
                while True:
                    cursor.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                    if cursor.fetchone()[0]:
                        break
                    if time.monotonic() >= deadline:
                        raise SyncBusyError(
                            f"sync {self.sync!r} is being delivered by another run; try again when it ends"
                        )
                    time.sleep(0.1)
            try:
                yield
            finally:
                with contextlib.suppress(Exception), connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s)", (key,))
        finally:
            connection.close()

    # ------------------------------------------------------------------ ledger
    @contextlib.contextmanager
    def session(self) -> Iterator[LedgerSession]:
        connection = self.db.connect(f"ledger {self.sync}")
        try:
            yield PostgresLedgerSession(connection, self.sync, self.deltas)
        finally:
            connection.close()

    def settled_count(self, start: dt.datetime | None, end: dt.datetime) -> int:
        rows = self._all(
            "SELECT count(*) FROM ledger WHERE sync = %s AND updated_at < %s "
            "AND (%s::timestamptz IS NULL OR updated_at >= %s::timestamptz)",
            (self.sync, end, start, start),
        )
        return int(rows[0][0])

    # ------------------------------------------------------------------ journal and recovery
    @contextlib.asynccontextmanager
    async def journal(self) -> AsyncIterator[Journal]:
        connection = self.db.connect(f"journal {self.sync}", autocommit=True)
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit = off")
        journal = PostgresJournal(connection, self.sync)
        try:
            yield journal
            await journal.drain()
            with connection.cursor() as cursor:
                cursor.execute("DELETE FROM journal WHERE sync = %s", (self.sync,))
        finally:
            # records still being written finish before their connection closes (a delivery that
            # stopped on an error keeps its journal for the next run's recovery)
            with contextlib.suppress(Exception):
                await journal.drain()
            connection.close()

    def _journal_records(self) -> JournalRecords:
        records = JournalRecords()
        for kind, batch_id, record in self._all(
            "SELECT kind, batch_id, record FROM journal WHERE sync = %s ORDER BY id", (self.sync,)
        ):
            if kind == "S":
                records.started.add(batch_id)
            elif record is not None:
                records.done[batch_id] = record
        return records

    def _planned_rows(self, cursor: Any) -> pa.Table:
        cursor.execute("SELECT rows FROM planned WHERE sync = %s", (self.sync,))
        return _from_ipc([bytes(blob) for (blob,) in cursor.fetchall()])

    def _planned_batches(self) -> list[tuple[str, int]]:
        with self._cursor() as cursor:
            planned = self._planned_rows(cursor)
        if not planned.num_rows:
            return []
        counts = pc.value_counts(planned["batch_id"])
        return [(c["values"], int(c["counts"])) for c in counts.to_pylist()]

    def _apply_recovery(self, plan: RecoveryPlan, policy: AmbiguousPolicy) -> None:
        with self._cursor() as cursor:
            planned = self._planned_rows(cursor)
            cursor.execute(
                "CREATE TEMP TABLE planned_rows (sync text, row_hash text, updated_at timestamptz, "
                "batch_id text, identifier text, identifier_hash text, run_id text) ON COMMIT DROP"
            )
            _copy(cursor, "planned_rows", self.sync, planned)
            if plan.answered.num_rows:
                cursor.execute(
                    "CREATE TEMP TABLE answered (sync text, batch_id text, others text) ON COMMIT DROP"
                )
                cursor.execute(
                    "CREATE TEMP TABLE listed (sync text, row_hash text, batch_id text, status text, "
                    "message text) ON COMMIT DROP"
                )
                _copy(cursor, "answered", self.sync, plan.answered)
                _copy(cursor, "listed", self.sync, plan.listed)
                cursor.execute(
                    "INSERT INTO ledger (sync, row_hash, updated_at, status, batch_id, identifier, "
                    "identifier_hash, message, run_id, changed_at) SELECT p.sync, p.row_hash, "
                    "p.updated_at, CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END, "
                    "p.batch_id, p.identifier, p.identifier_hash, k.message, p.run_id, now() "
                    "FROM planned_rows p "
                    "JOIN answered a USING (batch_id) "
                    "LEFT JOIN listed k ON k.row_hash = p.row_hash AND k.batch_id = p.batch_id "
                    "WHERE CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END IS NOT NULL "
                    "ON CONFLICT DO NOTHING"
                )
            if plan.ambiguous and policy == "hold":
                cursor.execute(
                    "INSERT INTO ledger (sync, row_hash, updated_at, status, batch_id, identifier, "
                    "identifier_hash, message, run_id, changed_at) SELECT sync, row_hash, updated_at, "
                    "'held', batch_id, identifier, identifier_hash, %s, run_id, now() FROM planned_rows "
                    "WHERE batch_id = ANY(%s) "
                    "ON CONFLICT DO NOTHING RETURNING row_hash, run_id",
                    (AMBIGUOUS_MESSAGE, plan.ambiguous),
                )
                held = cursor.fetchall()
                # `planned` keeps no objects: the crashed run's delta file has them
                objects = self.deltas.objects([h for h, _ in held], sorted({r for _, r in held if r}))
                details = held_details_table(dict(objects))
                if details.num_rows:
                    _copy(cursor, "held_details", self.sync, details)
            cursor.execute("DELETE FROM planned WHERE sync = %s", (self.sync,))
            cursor.execute("DELETE FROM journal WHERE sync = %s", (self.sync,))

    # ------------------------------------------------------------------ held rows
    def held_rows(self, row_hashes: list[str] | None = None) -> list[dict[str, Any]]:
        chosen = "" if row_hashes is None else " AND l.row_hash = ANY(%s)"
        with self._cursor() as cursor:
            cursor.execute(
                "SELECT l.row_hash, l.updated_at, l.batch_id, l.identifier, l.message, l.run_id, "
                "d.id_type, d.id_value, d.kind, d.name, d.sent_time FROM ledger l "
                "LEFT JOIN (SELECT DISTINCT ON (row_hash) * FROM held_details WHERE sync = %s) d "
                "USING (row_hash) "
                f"WHERE l.sync = %s AND l.status = 'held'{chosen} ORDER BY l.updated_at, l.row_hash",
                (self.sync, self.sync) + (() if row_hashes is None else (row_hashes,)),
            )
            names = [c[0] for c in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def _forget_held(self, row_hashes: list[str] | None) -> tuple[int, dt.datetime | None]:
        chosen = "" if row_hashes is None else " AND row_hash = ANY(%s)"
        params: tuple[Any, ...] = (self.sync,) + (() if row_hashes is None else (row_hashes,))
        with self._cursor() as cursor:
            cursor.execute(
                f"DELETE FROM ledger WHERE sync = %s AND status = 'held'{chosen} "
                "RETURNING row_hash, updated_at",
                params,
            )
            forgotten = cursor.fetchall()
            cursor.execute(
                "DELETE FROM held_details WHERE sync = %s AND row_hash = ANY(%s)",
                (self.sync, [h for h, _ in forgotten]),
            )
        stamps = [u for _, u in forgotten if u is not None]
        return len(forgotten), min(stamps) if stamps else None

    def _settle_held(self, messages: dict[str, str], status: str) -> int:
        with self._cursor() as cursor:
            cursor.execute(
                "UPDATE ledger l SET status = %s, message = d.message, changed_at = now() "
                "FROM unnest(%s::text[], %s::text[]) AS d(row_hash, message) "
                "WHERE l.sync = %s AND l.row_hash = d.row_hash AND l.status = 'held'",
                (status, list(messages), list(messages.values()), self.sync),
            )
            count = int(cursor.rowcount)
            if status != "held":
                cursor.execute(
                    "DELETE FROM held_details WHERE sync = %s AND row_hash = ANY(%s)",
                    (self.sync, list(messages)),
                )
        return count

    # ------------------------------------------------------------------ watermark, parts, runs
    def read_watermark(self) -> Watermark:
        rows = self._all("SELECT value, updated_by_run FROM watermarks WHERE sync = %s", (self.sync,))
        return Watermark(rows[0][0], rows[0][1]) if rows else Watermark()

    def _write_watermark(self, watermark: Watermark) -> None:
        with self._cursor() as cursor:
            cursor.execute(
                "INSERT INTO watermarks (sync, value, updated_by_run) VALUES (%s, %s, %s) "
                "ON CONFLICT (sync) DO UPDATE SET value = EXCLUDED.value, "
                "updated_by_run = EXCLUDED.updated_by_run, updated_at = now()",
                (self.sync, watermark.value, watermark.updated_by_run),
            )

    def settled_parts(self) -> dict[str, str]:
        rows = self._all("SELECT part, fingerprint FROM settled_parts WHERE sync = %s", (self.sync,))
        return {part: fingerprint for part, fingerprint in rows}

    def add_settled_parts(self, parts: dict[str, str]) -> None:
        if not parts:
            return
        from psycopg2.extras import execute_values

        with self._cursor() as cursor:
            execute_values(
                cursor,
                "INSERT INTO settled_parts (sync, part, fingerprint) VALUES %s "
                "ON CONFLICT (sync, part) DO UPDATE SET fingerprint = EXCLUDED.fingerprint",
                [(self.sync, p, f) for p, f in parts.items()],
            )
