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
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from braze_assets.config import AmbiguousPolicy
from braze_assets.delta_files import DeltaFiles
from braze_assets.state.base import (
    PLANNED_COLUMNS,
    Journal,
    LedgerSession,
    StateStore,
    SyncBusyError,
    Watermark,
    nothing_remembered,
)
from braze_assets.state.held import held_details_table
from braze_assets.state.postgres_ledger import (
    PostgresLedgerSession,
    copy_rows,
    planned_table,
    upsert_remembered,
)
from braze_assets.state.postgres_log import PostgresSyncLog
from braze_assets.state.postgres_schema import StateDatabase
from braze_assets.state.recovery import AMBIGUOUS_MESSAGE, JournalRecords, RecoveryPlan, done_record


def _lock_key(schema: str, sync: str) -> int:
    """A 64-bit advisory lock key per schema and sync."""
    digest = hashlib.blake2b(f"{schema}/{sync}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class PostgresJournal(Journal):
    """The journal table, written by group commit (see the module docstring)."""

    def __init__(self, connection: Any, sync: str):
        self.connection, self.sync = connection, sync
        self._pending: list[tuple[str, str, str | None, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def started(self, batch_id: str) -> None:
        await self._write("S", batch_id, None)

    async def refused(self, batch_id: str) -> None:
        await self._write("R", batch_id, None)

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
                            f"sync {self.sync!r} is being delivered by another run or released from the "
                            "release_held_job; try again when it ends"
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
            records.add(kind, batch_id, record)  # in the order written: a retry follows its refusal
        return records

    def _planned_batches(self) -> list[tuple[str, int]]:
        with self._cursor() as cursor:
            planned = planned_table(cursor, self.sync)
        if not planned.num_rows:
            return []
        counts = pc.value_counts(planned["batch_id"])
        return [(c["values"], int(c["counts"])) for c in counts.to_pylist()]

    def _apply_recovery(self, plan: RecoveryPlan, policy: AmbiguousPolicy) -> None:
        with self._cursor() as cursor:
            planned = planned_table(cursor, self.sync)
            cursor.execute(
                "CREATE TEMP TABLE planned_rows (sync text, row_hash text, updated_at timestamptz, "
                "batch_id text, identifier text, identifier_hash text, run_id text) ON COMMIT DROP"
            )
            copy_rows(
                cursor,
                "planned_rows",
                self.sync,
                planned.select([c for c in PLANNED_COLUMNS if c != "user_key" and c in planned.column_names]),
            )
            held: list[tuple[str, str | None]] = []  # (row_hash, run_id) of every row held here
            if plan.answered.num_rows:
                cursor.execute(
                    "CREATE TEMP TABLE answered (sync text, batch_id text, others text) ON COMMIT DROP"
                )
                cursor.execute(
                    "CREATE TEMP TABLE listed (sync text, row_hash text, batch_id text, status text, "
                    "message text) ON COMMIT DROP"
                )
                copy_rows(cursor, "answered", self.sync, plan.answered)
                copy_rows(cursor, "listed", self.sync, plan.listed)
                cursor.execute(
                    "WITH settled AS (INSERT INTO ledger (sync, row_hash, updated_at, status, batch_id, "
                    "identifier, identifier_hash, message, run_id, changed_at) SELECT p.sync, p.row_hash, "
                    "p.updated_at, CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END, "
                    "p.batch_id, p.identifier, p.identifier_hash, k.message, p.run_id, now() "
                    "FROM planned_rows p "
                    "JOIN answered a USING (batch_id) "
                    "LEFT JOIN listed k ON k.row_hash = p.row_hash AND k.batch_id = p.batch_id "
                    "WHERE CASE WHEN k.row_hash IS NULL THEN a.others ELSE k.status END IS NOT NULL "
                    "ON CONFLICT DO NOTHING RETURNING row_hash, run_id, status) "
                    # rows the dead run held itself (their answer was lost) need what reconcile asks
                    "SELECT row_hash, run_id FROM settled WHERE status = 'held'"
                )
                held += cursor.fetchall()
            if plan.ambiguous and policy == "hold":
                cursor.execute(
                    "INSERT INTO ledger (sync, row_hash, updated_at, status, batch_id, identifier, "
                    "identifier_hash, message, run_id, changed_at) SELECT sync, row_hash, updated_at, "
                    "'held', batch_id, identifier, identifier_hash, %s, run_id, now() FROM planned_rows "
                    "WHERE batch_id = ANY(%s) "
                    "ON CONFLICT DO NOTHING RETURNING row_hash, run_id",
                    (AMBIGUOUS_MESSAGE, plan.ambiguous),
                )
                held += cursor.fetchall()
            if held:
                # `planned` keeps no objects: the crashed run's delta file has them
                objects = self.deltas.objects([h for h, _ in held], sorted({r for _, r in held if r}))
                details = held_details_table(dict(objects))
                if details.num_rows:
                    copy_rows(cursor, "held_details", self.sync, details)
            maybe = pa.array([*plan.answered["batch_id"].to_pylist(), *plan.ambiguous], pa.string())
            if len(maybe) and "user_key" in planned.column_names:
                # those users' rows are settled without what to remember: their next rows go whole
                users = planned["user_key"].filter(pc.is_in(planned["batch_id"], maybe)).drop_null()
                upsert_remembered(cursor, self.sync, nothing_remembered(pc.unique(users.combine_chunks())))
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

    def forget_settled_parts(self) -> None:
        with self._cursor() as cursor:
            cursor.execute("DELETE FROM settled_parts WHERE sync = %s", (self.sync,))
