"""The PostgreSQL ledger session and how rows reach the server: Arrow tables COPYed as CSV, and
planned chunks as compressed Arrow streams (postgres.py says why)."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg2.errors import UniqueViolation

from braze_assets.delta_files import DeltaFiles
from braze_assets.state.base import (
    PLANNED_COLUMNS,
    REMEMBERED_COLUMNS,
    REMEMBERED_SQL,
    LedgerSession,
    remembered_schema,
)

_CSV = pacsv.WriteOptions(include_header=False)


def copy_rows(cursor: Any, table: str, sync: str, rows: pa.Table) -> None:
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

    def settled_between(self, oldest: dt.datetime, newest: dt.datetime) -> bool:
        with self._unit() as cursor:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM ledger WHERE sync = %s AND updated_at BETWEEN %s AND %s)",
                (self.sync, oldest, newest),
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
                copy_rows(cursor, table, self.sync, rows)
            return
        # Straight in: callers append only rows the ledger lacks (under the delivery lock). Should
        # one be there after all, the primary key refuses the COPY and the rows go again through a
        # staging table, keeping the first settlement, so a settle never fails on it.
        with self._unit() as cursor:
            cursor.execute("SAVEPOINT ledger_copy")
            try:
                copy_rows(cursor, "ledger", self.sync, rows)
            except UniqueViolation:
                cursor.execute("ROLLBACK TO SAVEPOINT ledger_copy")
                cursor.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS ledger_incoming (LIKE ledger) ON COMMIT DELETE ROWS"
                )
                cursor.execute("TRUNCATE ledger_incoming")
                copy_rows(cursor, "ledger_incoming", self.sync, rows)
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
                        to_ipc(mine.select([c for c in PLANNED_COLUMNS if c in mine.column_names])),
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

    def planned_rows(self) -> int:
        with self._unit() as cursor:
            return planned_table(cursor, self.sync).num_rows

    def planned_user_keys(self) -> pa.Array:
        with self._unit() as cursor:
            planned = planned_table(cursor, self.sync)
        if "user_key" not in planned.column_names:  # nothing planned, or planned before user keys
            return pa.array([], pa.string())
        return pc.unique(planned["user_key"].combine_chunks().drop_null()).cast(pa.string())

    def remembers_anyone(self) -> bool:
        with self._unit() as cursor:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM remembered_attributes WHERE sync = %s)", (self.sync,)
            )
            row = cursor.fetchone()
        return bool(row and row[0])

    def forget_remembered(self) -> None:
        with self._unit() as cursor:
            cursor.execute("DELETE FROM remembered_attributes WHERE sync = %s", (self.sync,))

    def merge_remembered(self) -> None:
        """Nothing to fold: `remember` upserts at once, through the table's primary key."""

    def remember(self, rows: pa.Table) -> None:
        if not rows.num_rows:
            return
        with self._unit() as cursor:
            upsert_remembered(cursor, self.sync, rows)


def upsert_remembered(cursor: Any, sync: str, rows: pa.Table) -> None:
    """What is remembered of these users (`REMEMBERED_COLUMNS`) replaced by `rows`."""
    if not rows.num_rows:
        return
    cursor.execute(
        "CREATE TEMP TABLE IF NOT EXISTS accepted_attributes (sync text, user_key text, "
        "payload_hash text, attributes text, payload_attributes integer) ON COMMIT DELETE ROWS"
    )
    cursor.execute("TRUNCATE accepted_attributes")
    copy_rows(cursor, "accepted_attributes", sync, rows.select(list(REMEMBERED_COLUMNS)))
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


def to_ipc(rows: pa.Table) -> str:
    """A chunk's rows as an Arrow stream, in hex for `decode(%s, 'hex')`: psycopg2 quotes bytes
    in the escape format, which is larger and slower for compressed data."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema, options=_IPC_OPTIONS) as writer:
        writer.write_table(rows)
    return sink.getvalue().hex().decode()


_NOTHING_PLANNED = pa.schema(
    [(c, pa.timestamp("us", tz="UTC") if c == "updated_at" else pa.string()) for c in PLANNED_COLUMNS]
)


def planned_table(cursor: Any, sync: str) -> pa.Table:
    """Every row a sync has planned and not settled, from its planned chunks."""
    cursor.execute("SELECT rows FROM planned WHERE sync = %s", (sync,))
    return from_ipc([bytes(blob) for (blob,) in cursor.fetchall()])


def from_ipc(blobs: list[bytes]) -> pa.Table:
    tables = [pa.ipc.open_stream(pa.py_buffer(blob)).read_all() for blob in blobs]
    if not tables:
        return _NOTHING_PLANNED.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")
