"""Which resource a sync's source needs, and how to build the adapter from it.

Adapters are imported lazily, so a project that syncs only from DuckDB never imports the other
warehouses' drivers.
"""

from __future__ import annotations

import contextlib
from typing import Any

from braze_assets.config import SyncConfig
from braze_assets.sources.base import CdiSource


def resource_key(sync: SyncConfig) -> str:
    """The Dagster resource key of the sync's warehouse: its source type."""
    return sync.source.type


def make_source(sync: SyncConfig, resource: Any) -> CdiSource:
    source = sync.source
    kind, table = source.type, source.table
    if source.type == "s3":
        from braze_assets.sources.s3_source import S3Source

        # in a run, context.resources.s3 is the boto3 client S3Resource attaches
        client = resource.get_client() if hasattr(resource, "get_client") else resource
        return S3Source(client, source.bucket, source.prefix, sample_key=source.sample_key)
    if kind == "duckdb":
        from braze_assets.sources.duckdb_source import DuckDBSource

        return DuckDBSource.from_resource(resource, table)
    if kind == "redshift":
        from braze_assets.sources.redshift_source import RedshiftSource

        return RedshiftSource.from_resource(resource, table)
    # Inside a run, `context.resources.<key>` holds what these resources attach to the context
    # (dagster-snowflake: a SnowflakeConnection wrapper; dagster-gcp: a bigquery.Client).
    if kind == "snowflake":
        from braze_assets.sources.snowflake_source import SnowflakeSource

        account = getattr(resource, "account", None) or getattr(
            getattr(resource, "snowflake_connection_resource", None), "account", "snowflake"
        )
        return SnowflakeSource(table, resource.get_connection, account=account)
    if kind == "bigquery":
        from braze_assets.sources.bigquery_source import BigQuerySource

        if hasattr(resource, "get_client"):
            return BigQuerySource.from_resource(resource, table)
        return BigQuerySource(table, lambda: contextlib.nullcontext(resource))
    if kind == "databricks":
        from braze_assets.sources.databricks_source import DatabricksSource

        return DatabricksSource.from_resource(resource, table)
    raise ValueError(f"sync {sync.name!r}: unknown source type {kind!r}")
