"""The SQL all warehouse adapters share: the pushdown delta query, counts and bounds.

A dialect adapter supplies how to quote identifiers, how to write a bound parameter, how to bind a
UTC timestamp for its `UPDATED_AT` type, and how to run a query (streaming Arrow batches or a
scalar). Table names reach here already validated by `config.TABLE_NAME`; values are always bound
parameters, never formatted into the SQL.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from braze_assets.sources.base import CdiSource, SourceError

UTC = dt.UTC


def split_table_name(table: str) -> list[str]:
    """`db."My Schema".events` -> ['db', 'My Schema', 'events'] (quotes honoured)."""
    parts, part, quoted = [], "", False
    for char in table:
        if char == '"':
            quoted = not quoted
        elif char == "." and not quoted:
            parts.append(part)
            part = ""
        else:
            part += char
    parts.append(part)
    return parts


class SqlSource(CdiSource):
    """A CDI table in a SQL warehouse. Subclasses implement the five dialect hooks below."""

    #: the identifier quote character of the dialect
    quote_char = '"'

    def __init__(self, table: str, description: str):
        self.table = table
        self.description = description
        self._types: dict[str, str] | None = None
        self._names: dict[str, str] = {}

    # ----------------------------------------------------------------- dialect hooks
    @abc.abstractmethod
    def _describe(self) -> list[tuple[str, str]]:
        """(column name, type) of the table; raise SourceError if it is missing."""

    @abc.abstractmethod
    def _arrow_batches(self, sql: str, params: list[Any], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """Run a query and stream its result as Arrow record batches."""

    @abc.abstractmethod
    def _scalar(self, sql: str, params: list[Any]) -> Any:
        """Run a query returning one value."""

    def _select_expression(self, column: str, kind: str) -> str:
        """How a column is read: a JSON/VARIANT/STRUCT PAYLOAD becomes JSON text in the
        dialect's own function (override); everything else as stored."""
        return self.quote(self._names[column])

    def _placeholder(self, index: int) -> str:
        """How the n-th bound parameter is written (qmark style by default)."""
        return "?"

    def _bind_timestamp(self, value: dt.datetime) -> Any:
        """Bind a UTC instant for the UPDATED_AT column: naive UTC unless the type has a zone.
        Dialects whose plain TIMESTAMP is an instant (BigQuery, Databricks) override this."""
        kind = self.columns().get("UPDATED_AT", "").upper()
        if "WITH TIME ZONE" in kind or kind.startswith(("TIMESTAMPTZ", "TIMESTAMP_TZ", "TIMESTAMP_LTZ")):
            return value.astimezone(UTC)
        return value.astimezone(UTC).replace(tzinfo=None)

    # ----------------------------------------------------------------- shared SQL
    def quote(self, name: str) -> str:
        q = self.quote_char
        return q + name.replace(q, q + q) + q

    @property
    def qualified_table(self) -> str:
        return ".".join(self.quote(p) for p in split_table_name(self.table))

    def columns(self) -> dict[str, str]:
        if self._types is None:
            described = self._describe()
            self._names = {name.upper(): name for name, _ in described}
            self._types = {name.upper(): str(kind) for name, kind in described}
        return self._types

    def _updated_at(self) -> str:
        self.columns()
        return self.quote(self._names.get("UPDATED_AT", "UPDATED_AT"))

    def _where(
        self, start: dt.datetime | None, end: dt.datetime | None, include_null: bool = False
    ) -> tuple[str, list[Any]]:
        col = self._updated_at()
        clauses: list[str] = []
        params: list[Any] = []
        for bound, op in ((start, ">="), (end, "<")):
            if bound is not None:
                clauses.append(f"{col} {op} {self._placeholder(len(params))}")
                params.append(self._bind_timestamp(bound))
        where = " AND ".join(clauses) or "1 = 1"
        if include_null:
            where = f"({where}) OR {col} IS NULL"
        return where, params

    def scan_sql(
        self,
        start: dt.datetime | None,
        end: dt.datetime | None,
        include_null: bool,
        columns: list[str] | None = None,
    ) -> tuple[str, list[Any]]:
        types = self.columns()
        wanted = columns or list(self._names)
        select = ", ".join(f"{self._select_expression(c, types[c])} AS {self.quote(c)}" for c in wanted)
        where, params = self._where(start, end, include_null)
        return f"SELECT {select} FROM {self.qualified_table} WHERE {where}", params

    def scan(
        self,
        start: dt.datetime | None,
        end: dt.datetime | None,
        include_null_updated_at: bool,
        batch_rows: int,
        columns: list[str] | None = None,
    ) -> Iterator[pa.RecordBatch]:
        sql, params = self.scan_sql(start, end, include_null_updated_at, columns)
        for batch in self._arrow_batches(sql, params, batch_rows):
            yield normalize_batch(batch)

    def count(self, start: dt.datetime | None = None, end: dt.datetime | None = None) -> int:
        where, params = self._where(start, end)
        return int(self._scalar(f"SELECT count(*) FROM {self.qualified_table} WHERE {where}", params))

    def max_updated_at(self) -> dt.datetime | None:
        return _as_utc(self._scalar(f"SELECT max({self._updated_at()}) FROM {self.qualified_table}", []))

    def fingerprint(self) -> dict:
        """The table's newest UPDATED_AT and rows, and `newest_due`, the newest row not stamped in
        the future: a future row keeps `newest` where it is, and would hide a row updated in place
        (same count, stamped now) and its own time coming, which each move `newest_due`."""
        seen = super().fingerprint()
        now = dt.datetime.now(UTC)
        newest = dt.datetime.fromisoformat(seen["newest"]) if seen["newest"] else None
        if newest is None or newest <= now:
            return {**seen, "newest_due": seen["newest"]}
        where, params = self._where(None, now)
        due = _as_utc(
            self._scalar(
                f"SELECT max({self._updated_at()}) FROM {self.qualified_table} WHERE {where}", params
            )
        )
        return {**seen, "newest_due": due.isoformat() if due else None}

    def min_updated_at(self) -> dt.datetime | None:
        return _as_utc(self._scalar(f"SELECT min({self._updated_at()}) FROM {self.qualified_table}", []))


def _as_utc(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if not isinstance(value, dt.datetime):
        raise SourceError(f"UPDATED_AT must be a timestamp column, got {type(value).__name__}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def normalize_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Upper-case column names; UPDATED_AT as timestamp[us, UTC] (naive values are UTC)."""
    batch = batch.rename_columns([name.upper() for name in batch.schema.names])
    index = batch.schema.get_field_index("UPDATED_AT")
    if index < 0:
        return batch
    column = batch.column(index)
    if pa.types.is_timestamp(column.type):
        target = pa.timestamp("us", tz="UTC")
        if column.type.tz is None:
            column = column.cast(pa.timestamp("us")).cast(target)
        else:
            column = column.cast(target)
        batch = batch.set_column(index, "UPDATED_AT", column)
    return batch
