"""Definitions for every sync in the sync configuration (`BRAZE_ASSETS_SYNCS`, default syncs.yaml).

Environment: BRAZE_API_KEY (secret, never shown), BRAZE_REST_ENDPOINT (default: the local emulator
on http://127.0.0.1:4545), BRAZE_ASSETS_HOME (state directory, default ./.braze_assets) and
BRAZE_ASSETS_DUCKDB (the embedded warehouse, default $BRAZE_ASSETS_HOME/warehouse.duckdb).
"""

from __future__ import annotations

import os

import dagster as dg
from dagster_duckdb import DuckDBResource

from braze_assets.assets import build_sync_assets
from braze_assets.automation import (
    build_job, build_schedule, build_sensor, release_held_job, sync_failure_alert,
)
from braze_assets.checks import build_checks
from braze_assets.config import SyncConfig, load_syncs
from braze_assets.resources import (
    BrazeResource, DeliveryStateResource, DeltaIOManager, WatermarkIOManager, home_dir,
)

DEFAULT_ENDPOINT = "http://127.0.0.1:4545"


def default_resources() -> dict:
    home = home_dir()
    state_dir = str(home / "state")
    return {
        "braze": BrazeResource(
            rest_endpoint=os.environ.get("BRAZE_REST_ENDPOINT", DEFAULT_ENDPOINT),
            api_key=dg.EnvVar("BRAZE_API_KEY"),
        ),
        "warehouse": DuckDBResource(
            database=os.environ.get("BRAZE_ASSETS_DUCKDB") or str(home / "warehouse.duckdb"),
            connection_config={"access_mode": "READ_ONLY"},
        ),
        "delivery_state": DeliveryStateResource(state_dir=state_dir),
        "delta_io_manager": DeltaIOManager(base_dir=str(home / "deltas")),
        "watermark_io_manager": WatermarkIOManager(state_dir=state_dir),
    }


def build_definitions(syncs: list[SyncConfig], resources: dict | None = None) -> dg.Definitions:
    assets, checks, jobs, schedules, sensors = [], [], [release_held_job], [], [sync_failure_alert]
    for sync in syncs:
        built = build_sync_assets(sync)
        job = build_job(built)
        assets += [built.source, built.delta, built.results]
        checks += build_checks(built)
        jobs.append(job)
        schedules.append(build_schedule(sync, job))
        sensors.append(build_sensor(sync, job))
    return dg.Definitions(
        assets=assets, asset_checks=checks, jobs=jobs, schedules=schedules, sensors=sensors,
        resources=resources if resources is not None else default_resources(),
    )


defs = build_definitions(load_syncs())
