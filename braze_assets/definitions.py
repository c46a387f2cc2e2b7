"""Definitions for every sync in the sync configuration (`BRAZE_ASSETS_SYNCS`, default syncs.yaml).

Environment: BRAZE_API_KEY (secret, never shown), BRAZE_REST_ENDPOINT (default: the local emulator
on http://127.0.0.1:4545), BRAZE_ASSETS_HOME (state directory, default ./.braze_assets),
BRAZE_ASSETS_DUCKDB (the embedded warehouse, default $BRAZE_ASSETS_HOME/warehouse.duckdb),
BRAZE_MAX_RATE_SHARE (share of Braze's rate limit the syncs may use, default 0.8) and
BRAZE_ASSETS_STATE_URL (PostgreSQL for the delivery state and the shared rate budget, default
DuckDB and files in the state directory).
"""

from __future__ import annotations

import os
import warnings

import dagster as dg
from dagster_duckdb import DuckDBResource

from braze_assets.alert_sensors import build_alert_sensors
from braze_assets.assets import build_sync_assets
from braze_assets.automation import (
    build_connection_job,
    build_dry_run_job,
    build_job,
    build_reclaim_sensor,
    build_schedule,
    build_sensor,
    release_held_job,
)
from braze_assets.checks import build_checks
from braze_assets.config import SyncConfig, load_syncs
from braze_assets.resources import (
    BrazeResource,
    DeltaIOManager,
    WatermarkIOManager,
    delivery_state_from_environment,
    home_dir,
    manifest_root,
    rate_share_from_environment,
)
from braze_assets.sources.duckdb_source import SCAN_MEMORY_LIMIT
from braze_assets.sources.factory import resource_key

DEFAULT_ENDPOINT = "http://127.0.0.1:4545"


def warehouse_resource(kind: str):
    """The resource for one source type, configured from environment variables (.env.example).
    Secrets stay `dg.EnvVar`s: resolved when a run starts, never shown in the UI."""
    env = os.environ.get
    if kind == "duckdb":
        return DuckDBResource(
            database=env("BRAZE_ASSETS_DUCKDB") or str(home_dir() / "warehouse.duckdb"),
            connection_config={"access_mode": "READ_ONLY", "memory_limit": SCAN_MEMORY_LIMIT},
        )
    if kind == "snowflake":
        from dagster_snowflake import SnowflakeResource

        key_pair = bool(env("SNOWFLAKE_PRIVATE_KEY"))  # else a password
        return SnowflakeResource(
            account=dg.EnvVar("SNOWFLAKE_ACCOUNT"),
            user=dg.EnvVar("SNOWFLAKE_USER"),
            warehouse=env("SNOWFLAKE_WAREHOUSE"),
            role=env("SNOWFLAKE_ROLE"),
            database=env("SNOWFLAKE_DATABASE"),
            private_key=dg.EnvVar("SNOWFLAKE_PRIVATE_KEY") if key_pair else None,
            password=None if key_pair else dg.EnvVar("SNOWFLAKE_PASSWORD"),
        )
    if kind == "bigquery":
        from dagster_gcp import BigQueryResource

        return BigQueryResource(
            project=env("BIGQUERY_PROJECT"), gcp_credentials=dg.EnvVar("BIGQUERY_CREDENTIALS_BASE64")
        )
    if kind == "redshift":
        from dagster_aws.redshift import RedshiftClientResource

        return RedshiftClientResource(
            host=dg.EnvVar("REDSHIFT_HOST"),
            port=int(env("REDSHIFT_PORT") or 5439),
            user=dg.EnvVar("REDSHIFT_USER"),
            password=dg.EnvVar("REDSHIFT_PASSWORD"),
            database=env("REDSHIFT_DATABASE") or "dev",
            sslmode=env("REDSHIFT_SSLMODE") or "require",
        )
    if kind == "databricks":
        from braze_assets.resources import DatabricksResource

        return DatabricksResource(
            server_hostname=dg.EnvVar("DATABRICKS_SERVER_HOSTNAME"),
            http_path=dg.EnvVar("DATABRICKS_HTTP_PATH"),
            access_token=dg.EnvVar("DATABRICKS_TOKEN"),
        )
    if kind == "s3":
        from dagster_aws.s3 import S3Resource

        # credentials from the default AWS chain (env, profile, instance role)
        return S3Resource(region_name=env("AWS_REGION"), endpoint_url=env("S3_ENDPOINT_URL"))
    raise ValueError(f"unknown source type {kind!r}")


def default_resources(syncs: list[SyncConfig]) -> dict:
    home = home_dir()
    state_dir = str(home / "state")
    delivery_state = delivery_state_from_environment(state_dir)
    resources = {
        "braze": BrazeResource(
            rest_endpoint=os.environ.get("BRAZE_REST_ENDPOINT", DEFAULT_ENDPOINT),
            api_key=dg.EnvVar("BRAZE_API_KEY"),
            state_dir=state_dir,
            **rate_share_from_environment(),
        ),
        "delivery_state": delivery_state,
        "delta_io_manager": DeltaIOManager(base_dir=manifest_root(home)),
        "watermark_io_manager": WatermarkIOManager(state_dir=state_dir, state_url=delivery_state.state_url),
    }
    for kind in sorted({resource_key(sync) for sync in syncs}):
        resources[kind] = warehouse_resource(kind)
    return resources


def build_definitions(syncs: list[SyncConfig], resources: dict | None = None) -> dg.Definitions:
    assets: list[dg.AssetsDefinition | dg.AssetSpec] = []
    checks, jobs, schedules = [], [release_held_job], []
    sensors = [*build_alert_sensors(syncs), build_reclaim_sensor(syncs)]
    for sync in syncs:
        built = build_sync_assets(sync)
        job = build_job(built)
        assets += [built.source, built.delta, built.results]
        checks += build_checks(built)
        jobs += [job, build_connection_job(sync), build_dry_run_job(sync)]
        schedules.append(build_schedule(sync, job))
        sensors.append(build_sensor(sync, job))
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        schedules=schedules,
        sensors=sensors,
        resources=resources if resources is not None else default_resources(syncs),
    )


# Every sync's assets use `backfill_policy`, which Dagster marks beta and announces once per asset
# in each process that loads these definitions (the UI's code servers, every run and step worker):
# hundreds of identical notices. Python's -W / PYTHONWARNINGS cannot name Dagster's category (it
# is resolved before site-packages is on the path), so the notice is silenced here, for this only.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", dg.BetaWarning)
    defs = build_definitions(load_syncs())
