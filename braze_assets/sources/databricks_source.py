"""Databricks SQL warehouses, through `databricks.sql` (databricks-sql-connector >= 3).

Contract (docs/braze-contract.md §A2.1): `UPDATED_AT TIMESTAMP` (an instant; TIMESTAMP_NTZ is read
as UTC civil time) and PAYLOAD as STRING, STRUCT or MAP; a STRUCT, MAP (or VARIANT) payload is read
back as its JSON text with `to_json`. Names are `[catalog.]schema.table`, each part quoted with
backticks; values are native named parameters (`:p0`, typed TIMESTAMP / TIMESTAMP_NTZ), never
formatted in. Results come as Arrow, `batch_rows` rows at a time (`fetchmany_arrow`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
from databricks.sql import exc as db_errors
from databricks.sql.parameters import TimestampNTZParameter, TimestampParameter

from braze_assets.masking import mask_text
from braze_assets.sources.base import SourceError
from braze_assets.sources.sql import UTC, SqlSource

#: PAYLOAD types read with to_json
JSON_TYPES = ("struct", "map", "variant")


class DatabricksSource(SqlSource):
    """A CDI table or view in Databricks; `connect` opens a `databricks.sql` connection (which is
    a context manager that closes it)."""

    quote_char = "`"

    def __init__(
        self,
        table: str,
        connect: Callable[[], contextlib.AbstractContextManager[Any]],
        host: str = "databricks",
    ):
        super().__init__(table, f"databricks table {table} on {host}")
        self._connect_factory = connect

    @classmethod
    def from_resource(cls, resource: Any, table: str) -> DatabricksSource:
        """From a resource with `connect()` and `server_hostname` (`resources.DatabricksResource`):
        the access token never leaves it."""
        return cls(table, resource.connect, host=resource.server_hostname)

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        try:
            with self._connect_factory() as con, contextlib.closing(con.cursor()) as cur:
                yield cur
        except db_errors.Error as exc:
            raise SourceError(self._explain(exc)) from None

    def _explain(self, exc: db_errors.Error) -> str:
        """The connector's own sentence (it carries no token), after what it means for us."""
        detail = mask_text((exc.message or type(exc).__name__).strip().splitlines()[0][:300])
        if "TABLE_OR_VIEW_NOT_FOUND" in detail or "SCHEMA_NOT_FOUND" in detail:
            return f"{self.description} does not exist ({detail})"
        if isinstance(exc, (db_errors.OperationalError, db_errors.InterfaceError)):
            return f"{self.description}: cannot connect to or authenticate with Databricks ({detail})"
        # anything else may be about a row's data (a cast in a view), whose value it quotes
        return f"{self.description}: query failed ({mask_text(detail, quoted=True)})"

    @staticmethod
    def _parameters(params: list[dt.datetime]) -> list[Any]:
        """`:pN` is the N-th value: TIMESTAMP when it is an instant, TIMESTAMP_NTZ when naive."""
        return [
            (TimestampParameter if v.tzinfo else TimestampNTZParameter)(v, name=f"p{i}")
            for i, v in enumerate(params)
        ]

    # ----------------------------------------------------------------- dialect hooks
    def _placeholder(self, index: int) -> str:
        return f":p{index}"

    def _bind_timestamp(self, value: dt.datetime) -> dt.datetime:
        """An aware UTC instant for TIMESTAMP (a naive one would be read in the session's time
        zone); naive UTC for TIMESTAMP_NTZ."""
        if self.columns().get("UPDATED_AT", "").lower() == "timestamp_ntz":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value.astimezone(UTC)

    def _describe(self) -> list[tuple[str, str]]:
        """DESCRIBE TABLE lists the columns, then (after a blank or `#` row) partitioning."""
        with self._cursor() as cur:
            cur.execute(f"DESCRIBE TABLE {self.qualified_table}")
            described = []
            for row in cur.fetchall():
                if not row[0] or row[0].startswith("#"):
                    break
                described.append((row[0], row[1]))
            return described

    def _select_expression(self, column: str, kind: str) -> str:
        if column == "PAYLOAD" and kind.lower().startswith(JSON_TYPES):
            return f"to_json({super()._select_expression(column, kind)})"
        return super()._select_expression(column, kind)

    def _arrow_batches(self, sql: str, params: list[Any], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self._cursor() as cur:
            cur.execute(sql, self._parameters(params))
            while (table := cur.fetchmany_arrow(batch_rows)).num_rows:
                yield from table.to_batches(max_chunksize=batch_rows)

    def _scalar(self, sql: str, params: list[Any]) -> Any:
        with self._cursor() as cur:
            cur.execute(sql, self._parameters(params))
            return cur.fetchone()[0]
