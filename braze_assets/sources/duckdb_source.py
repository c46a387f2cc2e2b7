"""DuckDB, the embedded default warehouse."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from dagster_duckdb import DuckDBResource

from braze_assets.masking import mask_text
from braze_assets.sources.base import SourceError
from braze_assets.sources.sql import SqlSource

#: DuckDB keeps each block a query reads in its buffer pool up to its memory limit, 80% of the
#: machine's memory by default: scanning a table grew the run's memory by the table's size (121 MB
#: at 4M rows, about 600 MB at 20M). A read-only scan re-reads an evicted block from the file, so
#: a small pool costs nothing here.
SCAN_MEMORY_LIMIT = "64MB"


class DuckDBSource(SqlSource):
    """A CDI table in a DuckDB database file, opened read-only so syncs can run side by side."""

    def __init__(
        self,
        database: str | Path,
        table: str,
        connect: Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]] | None = None,
    ):
        """`connect` is a `DuckDBResource.get_connection` (configured read-only) when run by
        Dagster; without it the file is opened read-only directly."""
        super().__init__(table, f"duckdb table {table} in {Path(database).name}")
        self.database = str(database)
        self._connect_factory = connect

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

    def _open_read_only(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        return contextlib.closing(
            duckdb.connect(self.database, read_only=True, config={"memory_limit": SCAN_MEMORY_LIMIT})
        )

    def _describe(self) -> list[tuple[str, str]]:
        with self._connect() as con:
            try:
                return [(r[0], r[1]) for r in con.execute(f"DESCRIBE {self.qualified_table}").fetchall()]
            except duckdb.CatalogException:
                raise SourceError(f"{self.description} does not exist") from None

    def _arrow_batches(self, sql: str, params: list[Any], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self._connect() as con:
            try:
                yield from con.sql(sql, params=params).to_arrow_reader(batch_rows)
            except duckdb.Error as exc:
                raise SourceError(self._query_failed(exc)) from None

    def _scalar(self, sql: str, params: list[Any]) -> Any:
        with self._connect() as con:
            try:
                row = con.execute(sql, params).fetchone()
            except duckdb.Error as exc:
                raise SourceError(self._query_failed(exc)) from None
        if row is None:  # the adapter's scalars are aggregates: always one row
            raise SourceError(f"{self.description}: the query returned no row")
        return row[0]

    def _query_failed(self, exc: duckdb.Error) -> str:
        """A failed read in one line. A view that casts or parses each row fails on the first
        cell it cannot read and quotes it, so what DuckDB quotes about the data is masked."""
        about_data = isinstance(exc, (duckdb.ConversionException, duckdb.InvalidInputException))
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return f"{self.description}: the query failed ({mask_text(detail, quoted=about_data)})"
