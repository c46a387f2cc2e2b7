"""Snowflake, through `snowflake.connector` (as `dagster_snowflake.SnowflakeResource` opens it).

Contract (docs/braze-contract.md §A2.1): `UPDATED_AT TIMESTAMP_NTZ(9)` holding UTC (TIMESTAMP_TZ and
TIMESTAMP_LTZ are read as the instants they are), `PAYLOAD VARCHAR` with JSON text, or a VARIANT /
OBJECT that is read back as its JSON text with `TO_JSON` (which keeps explicit nulls, §A2.2).
Snowflake stores unquoted identifiers upper-cased, so the unquoted parts of the configured name are
upper-cased before every part is quoted. Values are bound on the server (qmark), never formatted in.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
from snowflake.connector import errors as sf_errors
from snowflake.connector.errorcode import ER_NO_ARROW_RESULT

from braze_assets.masking import mask_text
from braze_assets.sources.base import SourceError
from braze_assets.sources.sql import UTC, SqlSource

#: semi-structured PAYLOAD types, read with TO_JSON
JSON_TYPES = ("VARIANT", "OBJECT")
ZONED_TYPES = ("TIMESTAMP_TZ", "TIMESTAMP_LTZ")
#: "Object does not exist or not authorized" (SQL compilation error)
NOT_FOUND = 2003


def snowflake_case(table: str) -> str:
    """`db.schema."Events"` -> `DB.SCHEMA."Events"`, the names Snowflake resolves them to."""
    out, quoted = [], False
    for char in table:
        quoted ^= char == '"'
        out.append(char if quoted or char == '"' else char.upper())
    return "".join(out)


def _base_type(kind: str) -> str:
    """`TIMESTAMP_NTZ(9)` -> `TIMESTAMP_NTZ`."""
    return kind.split("(")[0].strip().upper()


class SnowflakeSource(SqlSource):
    """A CDI table or view in Snowflake; `connect` is a context-manager factory of connections."""

    def __init__(
        self,
        table: str,
        connect: Callable[[], contextlib.AbstractContextManager[Any]],
        account: str | None = None,
    ):
        where = f" in account {account}" if account else ""
        super().__init__(snowflake_case(table), f"snowflake table {table}{where}")
        self._connect_factory = connect

    @classmethod
    def from_resource(cls, resource: Any, table: str) -> SnowflakeSource:
        """From a `dagster_snowflake.SnowflakeResource`: its credentials never leave it."""
        return cls(table, resource.get_connection, account=resource.account)

    @contextlib.contextmanager
    def _cursor(self) -> Iterator[Any]:
        try:
            with self._connect_factory() as con, contextlib.closing(con.cursor()) as cur:
                yield cur
        except sf_errors.Error as exc:
            raise SourceError(self._explain(exc)) from None

    def _explain(self, exc: sf_errors.Error) -> str:
        """The driver's own sentence (it carries no credentials), after what it means for us."""
        detail = mask_text((str(exc).strip().splitlines() or [type(exc).__name__])[0][:300])
        state = exc.sqlstate or ""
        if exc.errno == NOT_FOUND or state == "42S02":
            return f"{self.description} does not exist, or the role may not read it ({detail})"
        if state.startswith(("08", "28")) or isinstance(
            exc, (sf_errors.OperationalError, sf_errors.InterfaceError)
        ):
            return f"{self.description}: cannot connect to or authenticate with Snowflake ({detail})"
        # anything else may be about a row's data (a cast in a view), whose value it quotes
        return f"{self.description}: query failed ({mask_text(detail, quoted=True)})"

    @staticmethod
    def _execute(cur: Any, sql: str, params: list[Any]) -> None:
        # server-side binding whatever paramstyle the connection was opened with
        cur.execute(sql, params, _force_qmark_paramstyle=True)

    # ----------------------------------------------------------------- dialect hooks
    def _describe(self) -> list[tuple[str, str]]:
        with self._cursor() as cur:
            self._execute(cur, f"DESCRIBE TABLE {self.qualified_table}", [])
            return [(row[0], row[1]) for row in cur.fetchall()]

    def _bind_timestamp(self, value: dt.datetime) -> Any:
        """NTZ columns compare with naive UTC; TZ/LTZ ones with an instant bound as TIMESTAMP_TZ
        (a bare datetime would be bound as NTZ and read in the session's time zone)."""
        if _base_type(self.columns().get("UPDATED_AT", "")) in ZONED_TYPES:
            return ("TIMESTAMP_TZ", value.astimezone(UTC))
        return value.astimezone(UTC).replace(tzinfo=None)

    def _select_expression(self, column: str, kind: str) -> str:
        if column == "PAYLOAD" and _base_type(kind) in JSON_TYPES:
            return f"TO_JSON({super()._select_expression(column, kind)})"
        return super()._select_expression(column, kind)

    def _arrow_batches(self, sql: str, params: list[Any], batch_rows: int) -> Iterator[pa.RecordBatch]:
        """The connector's Arrow result chunks, re-cut to at most `batch_rows` rows; a driver that
        cannot give Arrow (a JSON result format, fakesnow's in-process fake) is read with
        fetchmany(batch_rows)."""
        with self._cursor() as cur:
            self._execute(cur, sql, params)
            tables = _arrow_tables(cur)
            if tables is None:
                yield from _fetchmany_batches(cur, batch_rows)
                return
            for table in tables:
                yield from table.to_batches(max_chunksize=batch_rows)

    def _scalar(self, sql: str, params: list[Any]) -> Any:
        with self._cursor() as cur:
            self._execute(cur, sql, params)
            return cur.fetchone()[0]


def _arrow_tables(cur: Any) -> Iterator[pa.Table] | None:
    try:
        return cur.fetch_arrow_batches(force_microsecond_precision=True)
    except (AttributeError, sf_errors.NotSupportedError):
        return None
    except sf_errors.ProgrammingError as exc:
        if exc.errno == ER_NO_ARROW_RESULT:
            return None
        raise


def _fetchmany_batches(cur: Any, batch_rows: int) -> Iterator[pa.RecordBatch]:
    names = [column.name for column in cur.description]
    while rows := cur.fetchmany(batch_rows):
        columns = [pa.array(values) for values in zip(*rows, strict=True)]
        yield pa.RecordBatch.from_arrays(columns, names=names)
