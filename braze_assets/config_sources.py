"""Where a sync reads from: one source model per warehouse type, and the `SourceConfig` union.

Its own module because a source's settings are the warehouse's business (a table name, a bucket and
prefix) and change when a warehouse is added, while `config.py` holds what every sync has (data
type, schedule, alerts, limits) and loads the file. Adding a source is one model here, one member of
`SourceConfig` and one name in `SOURCE_TYPES` (docs/architecture.md, Adding a source). Like
`config.py` it imports neither dagster nor a warehouse driver.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# A plain SQL identifier, optionally double-quoted, optionally dotted (db.schema.table).
_IDENT_PART = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"[^"\x00]+")'
TABLE_NAME = re.compile(rf"{_IDENT_PART}(?:\.{_IDENT_PART}){{0,2}}")
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
SOURCE_TYPES = ("duckdb", "snowflake", "bigquery", "redshift", "databricks", "s3")


class StrictModel(BaseModel):
    """The base of every configuration model: an unknown key is an error (a typo fails at load, not
    silently), and a loaded configuration cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _plain_table_name(value: str) -> str:
    if not TABLE_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a plain table name (letters, digits, _ and $, optionally "
            '"quoted", optionally qualified as schema.table or db.schema.table)'
        )
    return value


class _TableSource(StrictModel):
    table: str = Field(description="Table or view, optionally qualified: [db.]schema.table")

    @field_validator("table")
    @classmethod
    def _plain_identifier(cls, value: str) -> str:
        return _plain_table_name(value)


class DuckDBSourceConfig(_TableSource):
    """The embedded default (resource `duckdb`)."""

    type: Literal["duckdb"] = "duckdb"


class SnowflakeSourceConfig(_TableSource):
    """Snowflake through dagster-snowflake's SnowflakeResource (resource `snowflake`)."""

    type: Literal["snowflake"]


class BigQuerySourceConfig(_TableSource):
    """BigQuery through dagster-gcp's BigQueryResource (resource `bigquery`): project.dataset.table."""

    type: Literal["bigquery"]


class RedshiftSourceConfig(_TableSource):
    """Redshift through dagster-aws's RedshiftClientResource (resource `redshift`)."""

    type: Literal["redshift"]


class DatabricksSourceConfig(_TableSource):
    """Databricks SQL warehouses through databricks-sql-connector (resource `databricks`)."""

    type: Literal["databricks"]


class S3SourceConfig(StrictModel):
    """CDI-style files (JSON lines, CSV, Parquet) under s3://bucket/prefix (resource `s3`).
    Each row's UPDATED_AT is its file's LastModified time."""

    type: Literal["s3"]
    bucket: str
    prefix: str = ""
    #: the file whose columns describe the source (default: the newest readable file)
    sample_key: str | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        if not BUCKET_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not an S3 bucket name")
        return value

    @field_validator("prefix")
    @classmethod
    def _relative_prefix(cls, value: str) -> str:
        if value.startswith("/") or "\x00" in value:
            raise ValueError(f"prefix {value!r} must be relative (no leading /)")
        return value if not value or value.endswith("/") else value + "/"

    @property
    def table(self) -> str:
        """How the source is named in messages and uniqueness checks."""
        return f"s3://{self.bucket}/{self.prefix}"


SourceConfig = Annotated[
    DuckDBSourceConfig
    | SnowflakeSourceConfig
    | BigQuerySourceConfig
    | RedshiftSourceConfig
    | DatabricksSourceConfig
    | S3SourceConfig,
    Field(discriminator="type"),
]
