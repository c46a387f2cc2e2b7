"""Amazon Redshift (and anything speaking its PostgreSQL wire protocol).

Connects with the settings of dagster-aws's `RedshiftClientResource` through psycopg2, as that
resource does, and streams the delta with a server-side cursor so only `batch_rows` rows are held at a
time. CDI's Redshift DDL: `UPDATED_AT timestamptz`, `PAYLOAD varchar(max)` [A2.1].
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pyarrow as pa

from braze_assets.masking import mask_text
from braze_assets.sources.base import SourceError
from braze_assets.sources.sql import SqlSource

_INFORMATION_SCHEMA = """
SELECT column_name, data_type FROM information_schema.columns
WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position
"""


def _psycopg2() -> ModuleType:
    import psycopg2

    return psycopg2


class RedshiftSource(SqlSource):
    """A CDI table in Redshift; `connect` opens a DB-API connection (psycopg2)."""

    def __init__(self, table: str, connect: Callable[[], Any], host: str = "redshift"):
        super().__init__(table, f"redshift table {table} on {host}")
        self._connect_fn = connect

    @classmethod
    def from_resource(cls, resource: Any, table: str) -> RedshiftSource:
        """From a dagster_aws.redshift.RedshiftClientResource (password never leaves it)."""
        settings = {
            "host": resource.host,
            "port": resource.port,
            "user": resource.user,
            "password": resource.password,
            "dbname": resource.database,
            "connect_timeout": resource.connect_timeout,
            "sslmode": resource.sslmode,
        }
        return cls(table, lambda: _psycopg2().connect(**settings), host=resource.host)

    def _placeholder(self, index: int) -> str:
        return "%s"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[Any]:
        psycopg2 = _psycopg2()
        try:
            con = self._connect_fn()
        except psycopg2.Error as exc:
            # psycopg2's message names host/user, never the password
            raise SourceError(f"{self.description}: cannot connect ({str(exc).strip()})") from None
        try:
            yield con
        finally:
            con.close()

    def _run(self, action: Callable[[Any], Any]) -> Any:
        psycopg2 = _psycopg2()
        with self._connect() as con:
            try:
                return action(con)
            except psycopg2.errors.UndefinedTable:
                raise SourceError(f"{self.description} does not exist") from None
            except psycopg2.errors.InsufficientPrivilege as exc:
                raise SourceError(f"{self.description}: permission denied ({exc.pgerror})") from None
            except psycopg2.Error as exc:
                raise SourceError(self._query_failed(exc)) from None

    def _query_failed(self, exc: Any) -> str:
        """A failed read in one line; what the server quotes may be a row's data (a cast in a
        view), so quoted values are masked."""
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return f"{self.description}: the query failed ({mask_text(detail, quoted=True)})"

    def _describe(self) -> list[tuple[str, str]]:
        parts = self.table.replace('"', "").split(".")
        schema, table = (parts[-2] if len(parts) > 1 else "public"), parts[-1]

        def describe(con: Any) -> list[tuple[str, str]]:
            with con.cursor() as cur:
                cur.execute(_INFORMATION_SCHEMA, (schema, table))
                rows = cur.fetchall()
                if not rows:  # information_schema folds unquoted names to lower case
                    cur.execute(_INFORMATION_SCHEMA, (schema.lower(), table.lower()))
                    rows = cur.fetchall()
            return [(name, kind) for name, kind in rows]

        columns = self._run(describe)
        if not columns:
            raise SourceError(f"{self.description} does not exist (or is not visible to the user)")
        return columns

    def _arrow_batches(self, sql: str, params: list[Any], batch_rows: int) -> Iterator[pa.RecordBatch]:
        psycopg2 = _psycopg2()
        with self._connect() as con:
            try:
                with con.cursor(name=f"braze_assets_{uuid.uuid4().hex[:12]}") as cur:
                    cur.itersize = batch_rows
                    cur.execute(sql, params)
                    while True:
                        rows = cur.fetchmany(batch_rows)
                        if not rows:
                            break
                        names = [d[0] for d in cur.description]
                        yield pa.RecordBatch.from_pylist([dict(zip(names, r, strict=True)) for r in rows])
            except psycopg2.Error as exc:
                raise SourceError(self._query_failed(exc)) from None
            con.rollback()

    def _scalar(self, sql: str, params: list[Any]) -> Any:
        def scalar(con: Any) -> Any:
            with con.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchone()[0]

        return self._run(scalar)
