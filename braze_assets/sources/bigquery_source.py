"""Google BigQuery, through a `google.cloud.bigquery.Client` (as `dagster_gcp.BigQueryResource`
hands it out).

Contract (docs/braze-contract.md §A2.1): `UPDATED_AT TIMESTAMP` (an instant; a DATETIME column is
read as UTC civil time) and a typed `JSON` PAYLOAD, read back as its JSON text with
`TO_JSON_STRING` (a STRUCT/RECORD payload likewise; a STRING payload as is). Names are
`project.dataset.table` (or `dataset.table` in the client's project), each part quoted with
backticks; values are named query parameters (`@p0`), never formatted in. Results are streamed in
pages of `batch_rows` rows (`RowIterator.to_arrow_iterable`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.cloud import bigquery

from braze_assets.masking import mask_text
from braze_assets.sources.base import SourceError
from braze_assets.sources.sql import UTC, SqlSource, split_table_name

#: PAYLOAD types read with TO_JSON_STRING
JSON_TYPES = ("JSON", "RECORD", "STRUCT")
_DENIED = (api_exceptions.Forbidden, api_exceptions.Unauthorized, auth_exceptions.GoogleAuthError)


class BigQuerySource(SqlSource):
    """A CDI table or view in BigQuery; `client` is a context-manager factory of clients."""

    def __init__(self, table: str, client: Callable[[], contextlib.AbstractContextManager[bigquery.Client]]):
        super().__init__(table, f"bigquery table {table}")
        self._client_factory = client

    @classmethod
    def from_resource(cls, resource: Any, table: str) -> BigQuerySource:
        """From a `dagster_gcp.BigQueryResource`: its credentials never leave it."""
        return cls(table, resource.get_client)

    def quote(self, name: str) -> str:
        """Backticks; GoogleSQL escapes a backtick (and a backslash) inside a quoted name with a backslash."""
        return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"

    @contextlib.contextmanager
    def _client(self) -> Iterator[bigquery.Client]:
        try:
            with self._client_factory() as client:
                yield client
        except (api_exceptions.GoogleAPIError, auth_exceptions.GoogleAuthError) as exc:
            raise SourceError(self._explain(exc)) from None

    def _explain(self, exc: Exception) -> str:
        """BigQuery's own sentence (it carries no credentials), after what it means for us."""
        detail = (getattr(exc, "message", None) or str(exc) or type(exc).__name__).strip()
        detail = mask_text(detail.splitlines()[0][:300])
        if isinstance(exc, api_exceptions.NotFound):
            return f"{self.description} does not exist ({detail})"
        if isinstance(exc, _DENIED):
            return (
                f"{self.description}: access denied; the service account needs BigQuery Data "
                f"Viewer and Job User on it ({detail})"
            )
        # anything else may be about a row's data (a cast in a view), whose value it quotes
        return f"{self.description}: BigQuery request failed ({mask_text(detail, quoted=True)})"

    # ----------------------------------------------------------------- dialect hooks
    def _placeholder(self, index: int) -> str:
        return f"@p{index}"

    def _bind_timestamp(self, value: dt.datetime) -> dt.datetime:
        """An aware UTC instant for TIMESTAMP; naive UTC for a DATETIME column."""
        if self.columns().get("UPDATED_AT", "").upper() == "DATETIME":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value.astimezone(UTC)

    @staticmethod
    def _job_config(params: list[dt.datetime]) -> bigquery.QueryJobConfig:
        return bigquery.QueryJobConfig(
            query_parameters=[
                bigquery.ScalarQueryParameter(f"p{i}", "TIMESTAMP" if v.tzinfo else "DATETIME", v)
                for i, v in enumerate(params)
            ]
        )

    def _describe(self) -> list[tuple[str, str]]:
        with self._client() as client:
            table = client.get_table(".".join(split_table_name(self.table)))
            return [(field.name, field.field_type) for field in table.schema]

    def _select_expression(self, column: str, kind: str) -> str:
        if column == "PAYLOAD" and kind.upper() in JSON_TYPES:
            return f"TO_JSON_STRING({super()._select_expression(column, kind)})"
        return super()._select_expression(column, kind)

    def _arrow_batches(self, sql: str, params: list[Any], batch_rows: int) -> Iterator[pa.RecordBatch]:
        with self._client() as client:
            rows = client.query(sql, job_config=self._job_config(params)).result(page_size=batch_rows)
            for batch in rows.to_arrow_iterable():
                if batch.num_rows:
                    yield batch

    def _scalar(self, sql: str, params: list[Any]) -> Any:
        with self._client() as client:
            return next(iter(client.query(sql, job_config=self._job_config(params)).result()))[0]
