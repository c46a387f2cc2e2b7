"""DuckDB, the embedded default warehouse."""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import duckdb
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from braze_assets.sources.base import CdiSource, SourceError


def _quote(table: str) -> str:
    """Quote each part of an identifier validated by config.TABLE_NAME."""
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
    return ".".join('"' + p.replace('"', '""') + '"' for p in parts)


class DuckDBSource(CdiSource):
    """A CDI table in a DuckDB database file, opened read-only so syncs can run side by side."""

    def __init__(self, database: str | Path, table: str,
                 connect: Callable[[], ContextManager[duckdb.DuckDBPyConnection]] | None = None):
        """`connect` is a `DuckDBResource.get_connection` (configured read-only) when run by
        Dagster; without it the file is opened read-only directly."""
        self.database = str(database)
        self.table = table
        self.description = f"duckdb table {table} in {Path(self.database).name}"
        self._connect_factory = connect
        self._types: dict[str, str] | None = None
        self._names: dict[str, str] = {}

    @classmethod
    def from_resource(cls, resource: DuckDBResource, table: str) -> DuckDBSource:
        return cls(resource.database, table, connect=resource.get_connection)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if not Path(self.database).exists():
            raise SourceError(f"{self.description}: database file {self.database} does not exist")
        try:
            opener = (self._connect_factory or self._open_read_only)()
            con = opener.__enter__()
        except duckdb.Error as exc:
            raise SourceError(f"{self.description}: cannot open the database ({exc})") from None
        try:
            yield con
        finally:
            opener.__exit__(None, None, None)

    def _open_read_only(self) -> ContextManager[duckdb.DuckDBPyConnection]:
        return contextlib.closing(duckdb.connect(self.database, read_only=True))

    def columns(self) -> dict[str, str]:
        if self._types is None:
            with self._connect() as con:
                try:
                    rows = con.execute(f"DESCRIBE {_quote(self.table)}").fetchall()
                except duckdb.CatalogException:
                    raise SourceError(f"{self.description} does not exist") from None
            self._names = {r[0].upper(): r[0] for r in rows}
            self._types = {r[0].upper(): r[1] for r in rows}
        return self._types

    def _param(self, value: dt.datetime) -> dt.datetime:
        """Bind UTC values the way the column stores them (naive TIMESTAMP is UTC by contract)."""
        if "TIME ZONE" in self.columns().get("UPDATED_AT", ""):
            return value
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def _where(self, start, end, include_null=False) -> tuple[str, list]:
        col = '"' + self._names.get("UPDATED_AT", "UPDATED_AT") + '"'
        clauses, params = [], []
        if start is not None:
            clauses.append(f"{col} >= ?")
            params.append(self._param(start))
        if end is not None:
            clauses.append(f"{col} < ?")
            params.append(self._param(end))
        where = " AND ".join(clauses) or "TRUE"
        if include_null:
            where = f"({where}) OR {col} IS NULL"
        return where, params

    def scan(self, start, end, include_null_updated_at, batch_rows, columns=None):
        self.columns()
        wanted = columns or list(self._names)
        select = ", ".join(f'"{self._names[c]}" AS "{c}"' for c in wanted)
        where, params = self._where(start, end, include_null_updated_at)
        with self._connect() as con:
            reader = con.sql(
                f"SELECT {select} FROM {_quote(self.table)} WHERE {where}", params=params
            ).to_arrow_reader(batch_rows)
            for batch in reader:
                yield _utc(batch)

    def count(self, start=None, end=None) -> int:
        self.columns()
        where, params = self._where(start, end)
        with self._connect() as con:
            return con.execute(f"SELECT count(*) FROM {_quote(self.table)} WHERE {where}",
                               params).fetchone()[0]

    def max_updated_at(self):
        return self._extreme("max")

    def min_updated_at(self):
        return self._extreme("min")

    def _extreme(self, func: str) -> dt.datetime | None:
        self.columns()
        col = '"' + self._names.get("UPDATED_AT", "UPDATED_AT") + '"'
        with self._connect() as con:
            value = con.execute(f"SELECT {func}({col}) FROM {_quote(self.table)}").fetchone()[0]
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value


def _utc(batch: pa.RecordBatch) -> pa.RecordBatch:
    """UPDATED_AT as timestamp[us, UTC] whatever the column's own type."""
    index = batch.schema.get_field_index("UPDATED_AT")
    column = batch.column(index)
    if pa.types.is_timestamp(column.type):
        target = pa.timestamp("us", tz="UTC")
        if column.type.tz is None:
            column = column.cast(pa.timestamp("us")).cast(target)  # naive = UTC by contract
        else:
            column = column.cast(target)
        batch = batch.set_column(index, "UPDATED_AT", column)
    return batch
